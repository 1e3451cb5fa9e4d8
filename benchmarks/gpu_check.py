"""The GPU check: what a real-size fit costs on this machine's GPU, beside what benchmarks/sdxl_budget.py predicts.

    bash benchmarks/gpu_check.sh                 # on a GPU (through the device tool: one command, minutes)
    bash benchmarks/gpu_check.sh --smoke         # `tiny` on the CPU: the same code path in seconds (CI runs it)
    bash benchmarks/gpu_check.sh --compile       # also a 1024 px fit with compile=True (adds torch.compile's time)

On `sdxl-random` (the full SDXL-base architecture with random weights, built offline) in bf16 it runs the real
`fit()`: prompt and image encoding, then --steps training steps with two mask recalibrations; at 1024 px without
and with gradient checkpointing, then 768 and 512 px while the time budget (--budget-s) allows. Per run: s/step
of ordinary steps (median; the first two are warm-up), s of a recalibration step (the second one; the first is
warm-up too), the set-up (encoding), the projected 600-step fit (597 ordinary + 3 recalibration steps + set-up),
peak GPU memory (torch.cuda.max_memory_allocated), and beside each the budget's prediction: peak bytes, and the
TFLOP of a step, which with the measured time gives the utilisation the GPU reached.
Results print as they come (a markdown table at the end) and go to --json (default $OUT/gpu_check.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unziplora.config import FitConfig
from unziplora.models import load_base_model
from unziplora.training import fit, fit_many, library_versions

HERE = Path(__file__).resolve().parent
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}  # dense, datasheets


def step_durations(stamps: list[tuple[int, float]], calibration: set[int]) -> tuple[list[float], list[float]]:
    """Split the gaps between consecutive step callbacks into ordinary and recalibration steps."""
    ordinary, recal = [], []
    for (_, t0), (step, t1) in zip(stamps, stamps[1:]):
        (recal if step in calibration else ordinary).append(t1 - t0)
    return ordinary, recal


def random_png(resolution: int, seed: int) -> bytes:
    picture = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def step_clock(device: torch.device):
    """(stamps, on_step): a step callback that notes (step, time) once the GPU has finished the step; the
    peak-memory counter starts afresh."""
    stamps = []

    def on_step(step, _):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append((step, time.perf_counter()))

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return stamps, on_step


def measure(base, resolution: int, checkpointing: bool, steps: int, rank: int, compile_unet: bool = False) -> dict:
    """One real fit; per-step times from its step callback (synchronised with the GPU)."""
    device = base.device
    config = FitConfig(content="sks dog", style="watercolor painting", base_model=base.name, steps=steps,
                       recalibrations=2, rank=rank, resolution=resolution, gradient_checkpointing=checkpointing,
                       compile=compile_unet)
    stamps, on_step = step_clock(device)
    start = time.perf_counter()
    result = fit(random_png(resolution, 0), config, base=base, progress=False, on_step=on_step)
    calibration = set(config.calibration_steps)
    ordinary, recal = step_durations(stamps, calibration)
    s_step = statistics.median(ordinary[1:] or ordinary)  # the step after the first recalibration is warm-up
    recal_s = recal[-1] if recal else s_step
    setup_s = result.record["timings"]["encode_s"]
    first_step_s = stamps[0][1] - start - setup_s  # includes kernel selection, compilation
    return {
        "model": base.name, "resolution": resolution, "checkpointing": checkpointing, "rank": rank,
        "compile": compile_unet, "steps": steps, "s_per_step": s_step, "recalibration_s": recal_s,
        "setup_s": setup_s, "first_step_s": first_step_s,
        "fit_600_s": 597 * s_step + 3 * recal_s + setup_s,
        "peak_gb": (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0) / 1e9,
        "final_mse": result.record["final"]["mse"],
    }


def measure_batch(base, resolution: int, checkpointing: bool, steps: int, rank: int, fits: int) -> dict:
    """`fits` real fits trained together (fit_many: one batched UNet pass per step); per-step times from the
    first fit's step callback."""
    device = base.device
    images, configs = [], []
    for n in range(fits):
        images.append(random_png(resolution, n))
        configs.append(FitConfig(content="sks dog", style="watercolor painting", base_model=base.name, steps=steps,
                                 recalibrations=2, rank=rank, resolution=resolution, seed=n,
                                 gradient_checkpointing=checkpointing))
    stamps, on_step = step_clock(device)
    results = fit_many(images, configs, base=base, progress=False, on_steps=[on_step] + [None] * (fits - 1))
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise failed[0]
    sizes = sorted({r.record["timings"]["batch_size"] for r in results})
    if sizes != [fits]:  # fit_many trained them again in smaller batches: no figure for K
        raise torch.cuda.OutOfMemoryError(f"{fits} fits together did not fit; fit_many trained batches of {sizes}")
    ordinary, _ = step_durations(stamps, set(configs[0].calibration_steps))
    return {"resolution": resolution, "checkpointing": checkpointing, "fits": fits,
            "s_per_step": statistics.median(ordinary[1:] or ordinary),
            "peak_gb": (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0) / 1e9}


def predictions(model: str, smoke: bool) -> dict:
    """The budget's rows by (resolution, checkpointing): counted now for `tiny` (on the CPU itself, which is
    quicker than the meta device at this size), read from benchmarks/sdxl_budget.json (made by
    `sdxl_budget.py --json`) for sdxl-random."""
    if smoke:
        sys.path.insert(0, str(HERE))
        from sdxl_budget import account

        rows = [account(model, 64, checkpointing=True, rank=4, dtype=torch.float32, device="cpu")]  # real, faster
    else:
        path = HERE / "sdxl_budget.json"
        rows = [r for r in json.loads(path.read_text()) if r.get("model") == model] if path.exists() else []
    return {(r["resolution"], r["checkpointing"]): r for r in rows}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny on the CPU, 64 px, checkpointing on: checks the script itself")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting new runs after this")
    parser.add_argument("--compile", action="store_true", help="also a 1024 px fit with compile=True")
    parser.add_argument("--json", help="default: $OUT/gpu_check.json, else gpu_check.json")
    parser.add_argument("--fits", type=int, default=4, help="fits trained together in the multi-fit runs (0: none)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    model = "tiny" if args.smoke else "sdxl-random"
    runs = [(64, True)] if args.smoke else [(1024, False), (1024, True), (768, False), (512, False)]
    rank = 4 if args.smoke else args.rank
    steps = 4 if args.smoke else args.steps
    if args.smoke:
        torch.set_num_threads(1)
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    report = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "versions": library_versions(), "model": model, "runs": []}
    print(json.dumps({k: report[k] for k in ("gpu", "torch", "cuda", "python")}), flush=True)
    out = Path(args.json or Path(os.environ.get("OUT", ".")) / "gpu_check.json")

    t = time.perf_counter()
    base = load_base_model(model, device="cuda" if cuda else "cpu", precision="bf16")
    report["load_base_model_s"] = time.perf_counter() - t
    print(f"loaded {model} on {base.device} ({base.dtype}) in {report['load_base_model_s']:.1f} s", flush=True)
    predicted = predictions(model, args.smoke)
    plan = [(res, ck, False) for res, ck in runs] + ([(runs[0][0], False, True)] if args.compile else [])
    for resolution, checkpointing, compile_unet in plan:
        spent = time.perf_counter() - t0
        if spent > args.budget_s and (resolution, checkpointing, compile_unet) != plan[0]:
            print(f"skipped {resolution} px (checkpointing {checkpointing}): {spent:.0f} s spent", flush=True)
            continue
        try:
            row = measure(base, resolution, checkpointing, steps, rank, compile_unet)
        except torch.cuda.OutOfMemoryError as exc:
            row = {"resolution": resolution, "checkpointing": checkpointing, "compile": compile_unet,
                   "error": f"out of memory: {str(exc).splitlines()[0]}"}
        budget = predicted.get((resolution, checkpointing))
        if budget and "error" not in row:
            row["predicted_peak_gb"] = budget["peak_gb"]
            row["step_tflop"] = budget["step_tflop"]
            row["achieved_tflops"] = budget["step_tflop"] / row["s_per_step"]
            peak = peak_flops(gpu)
            row["mfu"] = row["achieved_tflops"] * 1e12 / peak if peak else None
        report["runs"].append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(report, indent=1))  # after every run: a cut-off check keeps what it measured
    report["multifit"] = []
    for resolution, checkpointing in ([(64, True)] if args.smoke else [(512, False), (1024, True)]):
        if not args.fits or (time.perf_counter() - t0 > args.budget_s + 120 and not args.smoke):
            break
        single = next((r for r in report["runs"] if (r.get("resolution"), r.get("checkpointing"), r.get("compile"))
                       == (resolution, checkpointing, False) and "error" not in r), None)
        try:
            one = single or measure(base, resolution, checkpointing, steps, rank)
            row = measure_batch(base, resolution, checkpointing, steps, rank, args.fits)
            # fits per hour, K together vs one at a time: K x (s/step alone) / (s/step of the batch)
            row["speedup"] = args.fits * one["s_per_step"] / row["s_per_step"]
            row["single_s_per_step"] = one["s_per_step"]
        except torch.cuda.OutOfMemoryError as exc:
            row = {"resolution": resolution, "checkpointing": checkpointing, "fits": args.fits,
                   "error": f"out of memory: {str(exc).splitlines()[0]}"}
        report["multifit"].append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(report, indent=1))
    report["total_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(report, indent=1))
    print(table(report))


def table(report: dict) -> str:
    lines = [f"GPU check: {report['model']} on {report['gpu']} (torch {report['torch']}, CUDA {report['cuda']}), "
             f"base model loaded in {report['load_base_model_s']:.0f} s, check {report.get('total_s', 0):.0f} s",
             "| px | checkpointing | compile | s/step | recal. step s | set-up s | first step s | 600-step fit s "
             "| peak GB (predicted) | TFLOP/step | achieved TFLOP/s (MFU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['resolution']} | {r['checkpointing']} | {r['compile']} | {r['error']} |")
            continue
        mfu = f" ({r['mfu']:.0%})" if r.get("mfu") else ""
        predicted = f" ({r['predicted_peak_gb']:.1f})" if "predicted_peak_gb" in r else ""
        flops = f"{r['step_tflop']:.2f} | {r['achieved_tflops']:.1f}{mfu}" if "step_tflop" in r else "| "
        lines.append(f"| {r['resolution']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{'on' if r['compile'] else 'off'} | {r['s_per_step']:.3f} | {r['recalibration_s']:.3f} | "
                     f"{r['setup_s']:.2f} | {r['first_step_s']:.1f} | {r['fit_600_s']:.0f} | "
                     f"{r['peak_gb']:.1f}{predicted} | {flops} |")
    if report.get("multifit"):
        lines += ["", "| px | checkpointing | fits together | s/step | s/step alone | fits/hour vs alone | peak GB |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["multifit"]:
            if "error" in r:
                lines.append(f"| {r['resolution']} | {r['checkpointing']} | {r['fits']} | {r['error']} |")
                continue
            lines.append(f"| {r['resolution']} | {'on' if r['checkpointing'] else 'off'} | {r['fits']} | "
                         f"{r['s_per_step']:.3f} | {r['single_s_per_step']:.3f} | {r['speedup']:.2f}x | "
                         f"{r['peak_gb']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
