"""A fit's files (SPEC section 7), written atomically, and `load_fit` to read them back.

DIR/
  content_lora.safetensors        each LoRA once, in kohya format with ss_* / modelspec.* metadata and sd-scripts'
  style_lora.safetensors          hashes: diffusers' load_lora_weights, ComfyUI, A1111 and Civitai load it as is
  mergers.safetensors             per-column mergers "<layer>.content" / "<layer>.style" (combined mode)
  masks.safetensors               per-column binary masks, same keys
  fit.json                        settings, prompts, base model, final losses, mask stats, timings, versions
  config.yaml                     the exact settings: `unziplora fit --config DIR/config.yaml` redoes the fit
  README.md                       the model card (unziplora.card), as the Hugging Face Hub shows it
Each LoRA has its binary mask folded into lora_B's rows; mergers stay separate (SPEC section 7).

Formats (`formats`, `--formats`): `{kind}_lora.safetensors` is in the first one, every other is written beside it
as `{kind}_lora_{format}.safetensors`; `export_lora` converts a fit's LoRA later. Fits made before this
default were written with formats ("diffusers", "kohya"): a diffusers/peft-format `{kind}_lora.safetensors`
(peft's LoraConfig in its metadata) and `{kind}_lora_kohya.safetensors`. Readers tell the two apart by the
file's keys (`lora_format`), so both kinds of fit load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from .config import DEFAULT_FORMATS, FitConfig, check_formats
from .errors import InputError
from .card import write_model_card
from .fit_files import CONFIG, FILES, LORA_COPY, MASKS, MERGERS, RECORD  # noqa: F401 (FILES: export.FILES)
from .layers import TARGETS, UnZipLoRA
from .roles import KINDS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def lora_file_name(kind: str, fmt: str, formats: tuple[str, ...] | None = None) -> str:
    """The first format's file is `{kind}_lora.safetensors`, any other's `{kind}_lora_{fmt}.safetensors`."""
    return FILES[kind] if formats and fmt == formats[0] else LORA_COPY.format(kind=kind, fmt=fmt)


@torch.no_grad()
def adapter_tensors(adapter: UnZipLoRA, save_precision: str = "fp16") -> dict[str, dict[str, torch.Tensor]]:
    """Plain CPU tensors of a trained adapter: per-kind peft-format LoRA state dicts, mergers, masks."""
    dtype = DTYPES[save_precision]
    out = {kind: {} for kind in KINDS} | {"mergers": {}, "masks": {}}
    for name, layer in adapter.named_layers():
        for kind in KINDS:
            A, B = layer.factors(kind)
            mask = layer.mask(kind)
            out[kind][f"{name}.lora_A.weight"] = A.detach().to("cpu", dtype).contiguous()
            out[kind][f"{name}.lora_B.weight"] = (B * mask[:, None]).to("cpu", dtype).contiguous()
            out["mergers"][f"{name}.{kind}"] = layer.merger(kind).detach().float().cpu().contiguous()
            out["masks"][f"{name}.{kind}"] = mask.float().cpu().contiguous()
    return out


# ---- kohya format ----

def kohya_module_name(name: str, layers_per_block: int = 2) -> str:
    """diffusers UNet module name -> kohya SDXL key stem (original SGM block numbering).

    down_blocks.i.attentions.j -> input_blocks.{1 + i*(L+1) + j}.1; mid_block.attentions.0 -> middle_block.1;
    up_blocks.i.attentions.j -> output_blocks.{i*(L+1) + j}.1, with L = layers_per_block.
    """
    parts = name.split(".")
    if parts[0] == "down_blocks":
        block, rest = f"input_blocks.{1 + int(parts[1]) * (layers_per_block + 1) + int(parts[3])}.1", parts[4:]
    elif parts[0] == "up_blocks":
        block, rest = f"output_blocks.{int(parts[1]) * (layers_per_block + 1) + int(parts[3])}.1", parts[4:]
    elif parts[0] == "mid_block":
        block, rest = "middle_block.1", parts[3:]
    else:
        raise ValueError(f"no kohya name for {name}")
    return "lora_unet_" + ".".join([block, *rest]).replace(".", "_")


def to_kohya(state_dict: dict[str, torch.Tensor], rank: int, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state_dict.items():
        name, factor = key.rsplit(".lora_", 1)
        stem = kohya_module_name(name, layers_per_block)
        out[f"{stem}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = tensor
        out[f"{stem}.alpha"] = torch.tensor(float(rank), dtype=tensor.dtype)  # alpha = rank: scale 1
    return out


def from_kohya(state_dict: dict[str, torch.Tensor], layer_names, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """kohya keys back to peft-format ones (`<module>.lora_A.weight`), for the given diffusers module names (the
    kohya stems join names with "_", which cannot be split back without knowing them). The `.alpha` entries go:
    our files always hold alpha = rank."""
    names = {kohya_module_name(name, layers_per_block): name for name in layer_names}
    out = {}
    for key, tensor in state_dict.items():
        stem, _, rest = key.partition(".")
        if rest == "alpha":
            continue
        if stem not in names or rest not in ("lora_down.weight", "lora_up.weight"):
            raise InputError(f"the kohya key {key} names no layer of this fit")
        out[f"{names[stem]}.lora_{'A' if rest == 'lora_down.weight' else 'B'}.weight"] = tensor
    return out


def lora_format(path: str | Path) -> str:
    """"kohya" or "diffusers": which layout a LoRA file holds, from its keys (reads the header only)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return "kohya" if any(key.startswith("lora_unet_") for key in f.keys()) else "diffusers"


def kohya_metadata(kind: str, config: FitConfig, record: dict) -> dict[str, str]:
    """sd-scripts' `ss_*` keys and Stability's modelspec keys, from the fit's own record: the base model's
    prediction type (v-prediction fine-tunes, the toy model), its name and revision, the resolution."""
    prompts = record["prompts"]
    res = config.resolution
    v_prediction = record.get("prediction_type", "epsilon") == "v_prediction"
    base = config.base_model + (f"@{config.revision}" if config.revision else "")
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(float(config.rank)),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_v_parameterization": str(v_prediction),
        "ss_sd_model_name": base,
        "ss_output_name": f"unziplora_{kind}",
        "ss_resolution": f"({res}, {res})",
        "ss_steps": str(config.steps),
        "ss_max_train_steps": str(config.steps),
        "ss_learning_rate": str(config.lr),
        "ss_seed": str(config.seed),
        "ss_num_train_images": "1",
        "ss_training_comment": f"UnZipLoRA {kind} LoRA; {kind} prompt: {prompts[kind]}",
        "ss_tag_frequency": json.dumps({kind: {config.content if kind == 'content' else config.style: 1}}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": f"UnZipLoRA {kind}: {config.content if kind == 'content' else config.style}",
        "modelspec.description": f"{kind} LoRA decomposed by UnZipLoRA from one image "
                                 f"({prompts['combined']})",
        "modelspec.trigger_phrase": config.content if kind == "content" else config.style,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    } | _base_checkpoint_hash(record.get("base_model_fingerprint") or "")


def _base_checkpoint_hash(fingerprint: str) -> dict[str, str]:
    """sd-scripts' `ss_new_sd_model_hash` (the sha256 of the base checkpoint file) when the base was a single
    file: our fingerprint is exactly that hash."""
    kind, _, digest = fingerprint.partition(":")
    return {"ss_new_sd_model_hash": digest} if kind == "sha256" and "+" not in digest else {}


def with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The hashes A1111, Civitai and sd-webui-additional-networks identify a LoRA by, as sd-scripts computes
    them: `sshs_model_hash` is the sha256 of the file's bytes after the safetensors header (the tensor data,
    which no metadata changes), `sshs_legacy_hash` the first 8 hex digits of the sha256 of the 64 KiB at
    offset 1 MiB of the file written with the `ss_*` metadata alone; `modelspec.hash_sha256` is the first
    one, in modelspec's 0x notation."""
    data = safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    model_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return metadata | {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash,
                       "modelspec.hash_sha256": "0x" + model_hash}


def adapter_metadata(rank: int) -> dict:
    """peft's LoraConfig of the saved LoRA, stored in the diffusers file: rank and alpha load as they were
    trained, instead of being guessed from shapes. Not in the kohya file: diffusers takes a kohya file's alpha
    from its `.alpha` entries and refuses a file that also holds this ("Both `network_alphas` and `metadata`
    cannot be specified", diffusers 0.42)."""
    return {"r": rank, "lora_alpha": rank, "target_modules": list(TARGETS), "init_lora_weights": True,
            "use_dora": False, "use_rslora": False, "lora_bias": False}


# ---- writing and reading a fit directory ----

def check_output_dir(out_dir: str | Path, overwrite: bool) -> None:
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"output directory {out} exists; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")


def write_lora(path: Path, fmt: str, kind: str, state: dict[str, torch.Tensor], config: FitConfig,
               record: dict) -> Path:
    """One LoRA (a peft-format state dict) as a file of one format."""
    if fmt == "kohya":
        kohya = to_kohya(state, config.rank, record.get("layers_per_block", 2))
        save_file(kohya, path, metadata=with_hashes(kohya, kohya_metadata(kind, config, record)))
    else:
        from diffusers import StableDiffusionXLPipeline

        StableDiffusionXLPipeline.save_lora_weights(path.parent, unet_lora_layers=state, weight_name=path.name,
                                                    unet_lora_adapter_metadata=adapter_metadata(config.rank))
    return path


def write_fit(result, out_dir: str | Path, *, overwrite: bool = False, started: float | None = None,
              formats=DEFAULT_FORMATS) -> Path:
    """Write every file into a temporary sibling directory, then move it into place in one rename.
    fit.json is written last, with the export's time and (given the fit's start) the total."""
    formats = check_formats(formats)
    t = time.perf_counter()
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    config, record, tensors = result.config, result.record, result.tensors
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for kind in KINDS:
            for fmt in formats:
                write_lora(staging / lora_file_name(kind, fmt, formats), fmt, kind, tensors[kind], config, record)
        save_file(tensors["mergers"], staging / MERGERS)
        save_file(tensors["masks"], staging / MASKS)
        config.save(staging / CONFIG)
        record["timings"]["export_s"] = time.perf_counter() - t
        if started is not None:
            record["timings"]["total_s"] = time.perf_counter() - started
        (staging / RECORD).write_text(json.dumps(record, indent=2))
        write_model_card(staging)
        _make_readable(staging)
        if out.exists():  # --overwrite: move the old fit aside first, delete it only once the new one is in
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; a finished fit gets the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


@dataclass
class FitArtifacts:
    """A fit directory read back, or a fit not yet written (`of`: its tensors in memory, no path)."""

    path: Path | None
    config: FitConfig
    record: dict
    tensors: dict[str, dict[str, torch.Tensor]] | None = None  # in memory: FitResult.tensors

    @classmethod
    def of(cls, result) -> "FitArtifacts":
        """A finished fit (unziplora.FitResult) as artifacts, before (or without) its files: previews drawn on
        the device while the files are written elsewhere (pipeline/run/worker.py)."""
        return cls(path=None, config=result.config, record=result.record, tensors=result.tensors)

    def lora_weights(self, kind: str) -> tuple:
        """What diffusers' `load_lora_weights` takes for this LoRA: (its file's folder, {"weight_name": ...}), or
        the in-memory state dict in diffusers' keys (alpha = rank, as in the files: scale 1)."""
        if self.tensors is not None:
            return {f"unet.{key}": value for key, value in self.tensors[kind].items()}, {}
        return str(self.path), {"weight_name": FILES[kind]}

    def lora_file(self, kind: str, fmt: str | None = None) -> Path:
        """The LoRA's file (`{kind}_lora.safetensors`), or with `fmt` its file of that format: that one if it
        has the format, else `{kind}_lora_{fmt}.safetensors` (InputError if the fit has none)."""
        main = self.path / FILES[kind]
        if fmt is None or _format_of(main) == fmt:
            return main
        other = self.path / lora_file_name(kind, fmt)
        if not other.is_file():
            raise InputError(f"{self.path} holds no {fmt}-format {kind} LoRA: `unziplora export {self.path} "
                             f"--format {fmt}` writes one")
        return other

    def lora_state_dict(self, kind: str) -> dict[str, torch.Tensor]:
        """The peft-format state dict (module name -> lora_A/lora_B), from a file of either format."""
        if self.tensors is not None:
            return self.tensors[kind]
        tensors = read_tensors(self.lora_file(kind))
        if any(key.startswith("lora_unet_") for key in tensors):
            layers = {key.rsplit(".", 1)[0] for key in self.masks()}  # the masks hold every adapted layer's name
            return from_kohya(tensors, layers, self.record.get("layers_per_block", 2))
        return {k.removeprefix("unet."): v for k, v in tensors.items()}

    def mergers(self) -> dict[str, torch.Tensor]:
        return self.tensors["mergers"] if self.tensors is not None else read_tensors(self.path / MERGERS)

    def masks(self) -> dict[str, torch.Tensor]:
        return self.tensors["masks"] if self.tensors is not None else read_tensors(self.path / MASKS)


def _format_of(path: Path) -> str:
    return read_safetensors(path, lora_format)


def export_lora(fit: "FitArtifacts", kind: str, fmt: str, out_dir: str | Path) -> Path:
    """A fit's LoRA converted to another format (`unziplora export`): `{kind}_lora_{fmt}.safetensors` in
    `out_dir`, written whole under a temporary name, then renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / lora_file_name(kind, check_formats([fmt])[0])
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=out))
    try:
        write_lora(staging / final.name, fmt, kind, fit.lora_state_dict(kind), fit.config, fit.record)
        os.replace(staging / final.name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or one line naming it (a corrupt header, a truncated or missing file)."""
    return read_safetensors(path, load_file)


def read_safetensors(path, read):
    """`read(path)` of a safetensors file, or one line naming the file (a corrupt header, a truncated or missing
    file) instead of safetensors' own error, whose type differs between versions."""
    try:
        return read(path)
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


def load_fit(path: str | Path) -> FitArtifacts:
    path = Path(path)
    record_file = path / RECORD
    if not record_file.is_file():
        raise InputError(f"{path} is not a fit directory (no {RECORD})")
    try:
        record = json.loads(record_file.read_text())
    except ValueError as exc:
        raise InputError(f"{record_file}: not valid JSON ({exc})") from None
    return FitArtifacts(path=path, config=FitConfig.from_dict(record["settings"], saved=True), record=record)
