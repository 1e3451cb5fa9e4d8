"""What one UnZipLoRA fit of the full SDXL-base costs on a GPU, counted without one.

    .venv/bin/python benchmarks/sdxl_budget.py                      # 512/768/1024 px, with and without checkpointing
    .venv/bin/python benchmarks/sdxl_budget.py --validate           # the account beside real CPU runs (tiny)
    .venv/bin/python benchmarks/sdxl_budget.py --json out.json      # the table as data (gpu_check reads it)
    .venv/bin/python benchmarks/sdxl_budget.py --export-bytes --json docs/results/export_bytes.json
    .venv/bin/python benchmarks/sdxl_budget.py --export-bytes       # bytes one fit writes, per LoRA format choice

The real fit code (prompt and image encoding, then the training loop: a recalibration step and an ordinary
step) runs on the `sdxl-random` architecture built on PyTorch's meta device: every tensor has a shape and a
dtype but no memory, so neither a GPU nor 10 GB of weights are needed. One dispatch mode, `Account`, watches
every op:
- FLOPs of every matmul, convolution and attention, by torch's own formulas (`torch.utils.flop_counter`'s
  registry; its FlopCounterMode itself is not used: its module tracking keeps gradients alive, which would
  spoil the memory account);
- live bytes: every storage on the device from the op that creates it until it is released (a weak reference
  on the storage), which gives the peak: the weights, the LoRA factors and gates, gradients, AdamW state, the
  activations saved for the backward pass and each op's transient outputs. That is what
  `torch.cuda.max_memory_allocated` reports on a GPU (the CUDA context and allocator slack come on top).
Attention is counted as flash attention (what SDPA runs on an H100 in bf16: O(tokens) saved state), not the
math fallback the meta device would take. On the meta device `.item()` answers 0.5 (loss checks, mask stats).

The projected fit time is FLOPs / (H100 SXM dense bf16 peak x an assumed utilisation, --mfu); the GPU check
(benchmarks/gpu_check.py) measures the real s/step and prints this prediction beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from unziplora.config import FitConfig
from unziplora.images import load_image
from unziplora.layers import UnZipLoRA
from unziplora.models import build_preset, place
from unziplora.training import encode_image, encode_prompts, train

# ops CUDA runs with tensors on two devices: copies between devices, and indexing with host index tensors
MIXED_DEVICES_OK = {torch.ops.aten._to_copy, torch.ops.aten.copy_, torch.ops.aten._copy_from,
                    torch.ops.aten._copy_from_and_resize, torch.ops.aten.index, torch.ops.aten.index_put,
                    torch.ops.aten.index_put_, torch.ops.aten._index_put_impl_}
H100_BF16_FLOPS = 989e12  # H100 SXM, dense bf16 (datasheet); an H200 has the same compute
GB = 1e9


class Account(TorchDispatchMode):
    """FLOPs of the ops run, and the live bytes of the storages on one device with their peak: each storage is
    counted once, from the op that creates it until its last tensor is gone (views share their storage).
    `.item()` on the meta device returns `scalar` so that code which checks a loss can run there."""

    def __init__(self, device: torch.device, scalar: float = 0.5):
        super().__init__()
        self.device, self.scalar = device, scalar
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.flops = 0
        self.mixed: list[str] = []  # ops that took tensors on two devices (a GPU refuses them)

    def track(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.device:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def track_module(self, module: torch.nn.Module) -> None:
        for tensor in [*module.parameters(), *module.buffers()]:
            self.track(tensor)

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _check_devices(self, func, args, kwargs) -> None:
        """CUDA's rule, checked here because some meta kernels do not: the tensors of one op live on one
        device, except 0-dim host tensors (scalars) and MIXED_DEVICES_OK."""
        if func._overloadpacket in MIXED_DEVICES_OK:
            return
        devices = {t.device for t in tree_flatten((args, kwargs))[0]
                   if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            self.mixed.append(f"{func}: {sorted(map(str, devices))}")

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return {torch.bool: True}.get(args[0].dtype, self.scalar if args[0].is_floating_point() else 0)
        self._check_devices(func, args, kwargs)
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out


@contextlib.contextmanager
def flash_attention_on_meta():
    """SDPA on the meta device as flash attention (the GPU kernel), not the math path that materialises the
    attention matrix: the activation account then matches what an H100 keeps."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or attn_mask is not None:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  False, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def account(model: str = "sdxl-random", resolution: int = 1024, *, checkpointing: bool = False, rank: int = 64,
            device: str = "meta", dtype: torch.dtype = torch.bfloat16) -> dict:
    """FLOPs and live bytes of one fit's set-up and of a recalibration step and an ordinary step."""
    dev = torch.device(device)
    base = place(build_preset(model, device=dev, dtype=dtype), dev)  # frozen, VAE in fp32: as load_base_model
    config = FitConfig(content="sks dog", style="watercolor painting", base_model=model, steps=2, recalibrations=1,
                       rank=rank, resolution=resolution, gradient_checkpointing=checkpointing, role_table="sdxl")
    image = Image.new("RGB", (resolution, resolution), (120, 80, 40))
    tracker = Account(dev)
    for module in (base.unet, base.vae, base.text_encoder, base.text_encoder_2):
        tracker.track_module(module)
    out = {"model": model, "resolution": resolution, "checkpointing": checkpointing, "rank": rank,
           "dtype": str(dtype).removeprefix("torch."), "weights_gb": tracker.current / GB}
    step_flops, step_peaks = [], []
    with flash_attention_on_meta(), tracker:
        embeds = encode_prompts(base, config.prompts())
        latents = encode_image(base, load_image(_png(image), resolution))
        out["setup_peak_gb"], out["setup_tflop"] = tracker.peak / GB, tracker.flops / 1e12
        adapter = UnZipLoRA(base.unet, rank, config.role_table, config.init, config.seed).to(dev)
        tracker.track_module(adapter)
        own = [*adapter.lora_parameters(), *adapter.gates.parameters(), *adapter.gates.buffers()]
        out["adapter_gb"] = sum(p.numel() * p.element_size() for p in own) / GB
        out["lora_parameters"] = sum(p.numel() for p in adapter.lora_parameters())
        tracker.reset_peak()
        before = [tracker.current, tracker.flops]

        def on_step(step, metrics):
            step_flops.append(tracker.flops - before[1])
            step_peaks.append(tracker.peak)
            before[1] = tracker.flops
            tracker.reset_peak()
            out["after_step_gb"] = tracker.current / GB

        train(base, adapter, embeds, latents, config, progress=False, on_step=on_step)
    out["train_start_gb"] = before[0] / GB
    out["recalibration_tflop"], out["step_tflop"] = step_flops[0] / 1e12, step_flops[1] / 1e12
    out["recalibration_peak_gb"], out["step_peak_gb"] = step_peaks[0] / GB, step_peaks[1] / GB
    out["peak_gb"] = max(out["setup_peak_gb"], *(p / GB for p in step_peaks))
    out["mixed_devices"] = sorted(set(tracker.mixed))
    return out


def project(row: dict, mfu: float, steps: int = 600, recalibrations: int = 3) -> dict:
    """Seconds per step and per fit on an H100 at a given model-FLOP utilisation."""
    rate = H100_BF16_FLOPS * mfu
    s_step = row["step_tflop"] * 1e12 / rate
    s_recal = row["recalibration_tflop"] * 1e12 / rate
    fit = (steps - recalibrations) * s_step + recalibrations * s_recal + row["setup_tflop"] * 1e12 / rate
    return {"mfu": mfu, "s_per_step": s_step, "recalibration_s": s_recal, "fit_600_s": fit}


# ---- the bytes one fit writes ----

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def safetensors_size(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str]) -> int:
    """The size of the safetensors file these tensors (name -> shape, dtype) and this metadata make, without
    their data: 8 bytes of header length, the JSON header (the metadata first, then the tensors, largest
    alignment first, by name), padded with spaces to 8 bytes, then the data."""
    order = sorted(tensors, key=lambda k: (-tensors[k][1].itemsize, k))
    header, offset = {"__metadata__": metadata} if metadata else {}, 0
    for name in order:
        shape, dtype = tensors[name]
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + text + (-text % 8) + offset


def export_bytes(model: str = "sdxl-random", rank: int = 64, formats: tuple[str, ...] = ("kohya",),
                 config: FitConfig | None = None) -> dict[str, int]:
    """Bytes of each tensor file one fit writes (unziplora.export.write_fit) with these LoRA formats, from the
    adapter's shapes on the meta device: no weights, no GPU (`config`: the fit's settings, default SDXL's at this
    rank). The small text files (fit.json, config.yaml, README.md: some 10 KB) and the optional previews are
    left out."""
    from unziplora.export import (DTYPES, FILES, MASKS, MERGERS, adapter_metadata, kohya_metadata,
                                  kohya_module_name, lora_file_name)
    from unziplora.roles import KINDS

    dev = torch.device("meta")
    base = place(build_preset(model, device=dev, dtype=torch.bfloat16), dev)
    config = config or FitConfig(content="sks dog", style="watercolor painting", base_model=model, rank=rank)
    rank = config.rank
    adapter = UnZipLoRA(base.unet, rank, config.role_table or base.role_table, config.init, config.seed).to(dev)
    per_block = base.unet.config.layers_per_block
    dtype = DTYPES[config.save_precision]
    prediction = base.scheduler.config.get("prediction_type") or "epsilon"
    record = {"prompts": config.prompts()._asdict(), "prediction_type": prediction, "base_model_fingerprint": ""}
    lora, gates = {kind: {} for kind in KINDS}, {}
    for name, layer in adapter.named_layers():
        for kind in KINDS:
            A, B = layer.factors(kind)
            lora[kind][name] = (tuple(A.shape), tuple(B.shape))
            gates[f"{name}.{kind}"] = (tuple(layer.mask(kind).shape), torch.float32)
    out = {}
    for kind in KINDS:
        for fmt in formats:
            if fmt == "kohya":
                tensors = {}
                for name, (a, b) in lora[kind].items():
                    stem = kohya_module_name(name, per_block)
                    tensors |= {f"{stem}.lora_down.weight": (a, dtype), f"{stem}.lora_up.weight": (b, dtype),
                                f"{stem}.alpha": ((), dtype)}
                # the hashes with_hashes adds have fixed lengths: 64 hex digits, 8, and "0x" + 64
                metadata = kohya_metadata(kind, config, record) | {
                    "sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8, "modelspec.hash_sha256": "0x" + "0" * 64}
            else:
                tensors = {f"unet.{name}.lora_{f}.weight": (shape, dtype) for name, (a, b) in lora[kind].items()
                           for f, shape in (("A", a), ("B", b))}
                metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(
                    {f"unet.{k}": v for k, v in adapter_metadata(rank).items()}, indent=2, sort_keys=True)}
            out[lora_file_name(kind, fmt, formats)] = safetensors_size(tensors, metadata)
    for name in (MERGERS, MASKS):
        out[name] = safetensors_size(gates, {})
    assert set(FILES.values()) <= set(out)
    return out


def gpu_class(peak_gb: float) -> str:
    """The smallest common GPU memory size that holds a peak (1.5 GB kept for the CUDA context and slack)."""
    for size, names in ((16, "16 GB (T4, V100-16)"), (24, "24 GB (L4, A10G, RTX 4090)"),
                        (40, "40 GB (A100-40)"), (48, "48 GB (L40S, A6000)"), (80, "80 GB (A100/H100)")):
        if peak_gb + 1.5 <= size:
            return names
    return "over 80 GB"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- validation: the account beside a real run on this machine's CPU ----

def measure_cpu(model: str, resolution: int, rank: int, checkpointing: bool) -> dict:
    """A real fit set-up and two steps on the CPU, in this (fresh) process: peak RSS growth over the training
    steps (large blocks go straight to mmap, so RSS follows live memory) and the seconds of the ordinary step."""
    base = place(build_preset(model), torch.device("cpu"))
    config = FitConfig(content="sks dog", style="watercolor painting", base_model=model, steps=2, recalibrations=1,
                       rank=rank, resolution=resolution, gradient_checkpointing=checkpointing, role_table="sdxl")
    embeds = encode_prompts(base, config.prompts())
    latents = encode_image(base, load_image(_png(Image.new("RGB", (resolution,) * 2, (120, 80, 40))), resolution))
    adapter = UnZipLoRA(base.unet, rank, config.role_table, config.init, config.seed)
    rss_before = _rss()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    stamps = [time.perf_counter()]
    train(base, adapter, embeds, latents, config, progress=False, on_step=lambda *_: stamps.append(time.perf_counter()))
    return {"train_growth_gb": (_peak_rss() - rss_before) / GB, "step_s": stamps[2] - stamps[1],
            "recalibration_s": stamps[1] - stamps[0]}


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_gemm_rate(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of an fp32 matrix product on this CPU (the ceiling the step's FLOPs are divided by)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def validate(cases: list[tuple[str, int, bool]], rank: int) -> list[dict]:
    rows = []
    rate = cpu_gemm_rate()
    for model, resolution, checkpointing in cases:
        predicted = account(model, resolution, checkpointing=checkpointing, rank=rank, dtype=torch.float32)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(torch.get_num_threads()))
        code = (f"import json, sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"torch.set_num_threads({torch.get_num_threads()}); from sdxl_budget import measure_cpu; "
                f"print(json.dumps(measure_cpu({model!r}, {resolution}, {rank}, {checkpointing})))")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        growth = max(predicted["recalibration_peak_gb"], predicted["step_peak_gb"]) - predicted["train_start_gb"]
        rows.append({"model": model, "resolution": resolution, "checkpointing": checkpointing,
                     "predicted_growth_gb": growth, "measured_growth_gb": measured["train_growth_gb"],
                     "step_tflop": predicted["step_tflop"], "cpu_gemm_gflops": rate / 1e9,
                     "predicted_step_s": predicted["step_tflop"] * 1e12 / rate, "measured_step_s": measured["step_s"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl-random")
    parser.add_argument("--resolutions", type=int, nargs="*", default=[512, 768, 1024])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed H100 utilisation for the projection")
    parser.add_argument("--validate", nargs="*", metavar="MODEL:PX[:ckpt]",
                        help="also run real CPU steps beside the account (default: tiny:256 tiny:256:ckpt tiny:512; "
                        "sdxl-random:256 needs about 20 GB of RAM and minutes per step)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export-bytes", action="store_true",
                        help="only the bytes one fit writes: each LoRA once (kohya, the default) beside both formats "
                        "(what every fit wrote before)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.export_bytes:
        counted = print_export_bytes(args.model, args.rank)
        if args.json:  # a result file (docs/results/export_bytes.json)
            try:
                from benchmarks import results as result_files
            except ImportError:  # run as a file: benchmarks/ is sys.path[0]
                import results as result_files
            result_files.save(args.json, counted, machine="any: counted from shapes on the meta device, not timed")
        return

    rows = []
    print(f"{args.model}, rank {args.rank}, bf16 UNet, fp32 LoRAs and AdamW; H100 at {args.mfu:.0%} of "
          f"{H100_BF16_FLOPS / 1e12:.0f} TFLOP/s")
    print("| px | checkpointing | TFLOP/step | TFLOP/recal. step | weights GB | LoRA+gates GB | after a step GB "
          "| peak GB | s/step | 600-step fit | GPU memory that holds it |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for resolution in args.resolutions:
        for checkpointing in (False, True):
            t = time.perf_counter()
            row = account(args.model, resolution, checkpointing=checkpointing, rank=args.rank)
            row["projection"] = project(row, args.mfu)
            row["account_s"] = time.perf_counter() - t
            rows.append(row)
            p = row["projection"]
            print(f"| {resolution} | {'on' if checkpointing else 'off'} | {row['step_tflop']:.1f} | "
                  f"{row['recalibration_tflop']:.1f} | {row['weights_gb']:.1f} | {row['adapter_gb']:.2f} | "
                  f"{row['after_step_gb']:.1f} | {row['peak_gb']:.1f} | {p['s_per_step']:.3f} | "
                  f"{p['fit_600_s']:.0f} s | {gpu_class(row['peak_gb'])} |", flush=True)
    if args.validate is not None:
        cases = [(spec.split(":")[0], int(spec.split(":")[1]), spec.endswith(":ckpt"))
                 for spec in args.validate or ["tiny:256", "tiny:256:ckpt", "tiny:512"]]
        print("\nvalidation on this CPU (fp32; growth = peak during the two training steps over the memory "
              "before them; time = TFLOP / measured fp32 GEMM rate):")
        print("| model | px | checkpointing | predicted growth GB | measured GB | TFLOP/step | predicted s/step "
              "| measured s/step |")
        print("|---|---|---|---|---|---|---|---|")
        for v in validate(cases, args.rank):
            rows.append({"validation": v})
            print(f"| {v['model']} | {v['resolution']} | {'on' if v['checkpointing'] else 'off'} | "
                  f"{v['predicted_growth_gb']:.3f} | {v['measured_growth_gb']:.3f} | {v['step_tflop']:.3f} | "
                  f"{v['predicted_step_s']:.2f} | {v['measured_step_s']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def print_export_bytes(model: str, rank: int) -> dict:
    """Print the bytes one fit writes, before (both formats) and now (kohya); returns them."""
    before = export_bytes(model, rank, formats=("diffusers", "kohya"))
    after = export_bytes(model, rank, formats=("kohya",))
    print(f"bytes one fit writes, {model}, rank {rank}, fp16 LoRAs (previews and the ~10 KB of text files aside):")
    print("| file | both formats (before) | kohya only (now) |\n|---|---|---|")
    for name in sorted(set(before) | set(after)):
        print(f"| {name} | {before.get(name, 0) / 1e6:.1f} MB | {after.get(name, 0) / 1e6:.1f} MB |")
    total_before, total_after = sum(before.values()), sum(after.values())
    print(f"| total | {total_before / 1e6:.1f} MB | {total_after / 1e6:.1f} MB |")
    print(f"ratio now/before: {total_after / total_before:.3f}; per million fits: {total_before * 1e6 / 1e15:.2f} PB "
          f"-> {total_after * 1e6 / 1e15:.2f} PB")
    return {"model": model, "rank": rank, "before": before, "now": after, "total_before": total_before,
            "total_now": total_after, "ratio": total_after / total_before}


if __name__ == "__main__":
    main()
