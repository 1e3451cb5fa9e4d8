"""The UnZipLoRA training loop: one image in, a content LoRA and a style LoRA out.

Reads top to bottom like the recipe of SPEC section 6: encode the three prompts and the image once,
attach the dual LoRA, train with recalibrated column masks, export, put the UNet back as it was.
"""

from __future__ import annotations

import math
import platform
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import FitConfig, Prompts
from .errors import FitDivergedError, InputError
from .images import image_to_tensor, load_image
from .importance import mask_stats, recalibrate
from .layers import UnZipLoRA
from .models import BaseModel, load_base_model_for

StepCallback = Callable[[int, dict], None]


@dataclass
class FitResult:
    config: FitConfig  # with resolution and role table resolved
    record: dict  # what fit.json holds: settings, final losses, mask stats, timings, versions
    tensors: dict[str, dict[str, torch.Tensor]]  # "content"/"style" LoRA state dicts, "mergers", "masks"
    out_dir: Path | None = None
    history: list[dict] = field(default_factory=list)  # per-step losses


def fit(image, config: FitConfig, *, base: BaseModel | None = None, out_dir: str | Path | None = None,
        overwrite: bool = False, progress: bool = True, on_step: StepCallback | None = None) -> FitResult:
    """Train the content and style LoRAs of `image` (a path, bytes or binary file).

    Pass a loaded `base` to reuse it across fits (the pipeline does); it is left exactly as it was found.
    With `out_dir`, the files of SPEC section 7 are written there atomically.
    """
    from . import export

    timings = {}
    start = time.perf_counter()
    if out_dir is not None:
        export.check_output_dir(out_dir, overwrite)
    if base is None:
        base = load_base_model_for(config)
        timings["load_base_model_s"] = time.perf_counter() - start
    resolution = config.resolution or base.default_resolution
    _check_resolution(resolution, base)
    # the saved settings name what was used: the table, the resolution, a hub model's exact commit
    config = config.replace(resolution=resolution, role_table=config.role_table or base.role_table,
                            revision=base.location.revision if base.location else config.revision)

    t = time.perf_counter()
    picture = load_image(image, resolution)
    prompts = config.prompts()
    embeds = encode_prompts(base, prompts)
    latents = encode_image(base, picture)
    timings["encode_s"] = time.perf_counter() - t

    t = time.perf_counter()
    adapter = UnZipLoRA(base.unet, config.rank, config.role_table, config.init, config.seed).to(base.device)
    history = train(base, adapter, embeds, latents, config, progress=progress, on_step=on_step)
    timings["train_s"] = time.perf_counter() - t
    timings["s_per_step"] = timings["train_s"] / config.steps

    tensors = export.adapter_tensors(adapter, config.save_precision)
    record = _record(config, prompts, base, adapter, history, timings)
    result = FitResult(config=config, record=record, tensors=tensors, history=history)
    if out_dir is not None:  # fit.json, written last, holds export_s and total_s too
        result.out_dir = export.write_fit(result, out_dir, overwrite=overwrite, started=start)
    else:
        record["timings"]["total_s"] = time.perf_counter() - start
    return result


def train(base: BaseModel, adapter: UnZipLoRA, embeds: dict, latents: torch.Tensor, config: FitConfig, *,
          progress: bool = True, on_step: StepCallback | None = None) -> list[dict]:
    unet, gates = base.unet, adapter.gates
    device, dtype = base.device, base.dtype  # read once: diffusers walks every parameter to answer
    rng = torch.Generator().manual_seed(config.seed)  # CPU generator: the same draws on every device
    size = config.resolution // base.vae_scale_factor
    time_ids = torch.tensor([[config.resolution, config.resolution, 0, 0, config.resolution, config.resolution]],
                            device=device, dtype=dtype)
    unet_kwargs = dict(
        encoder_hidden_states=embeds["combined"],
        added_cond_kwargs={"text_embeds": embeds["pooled"], "time_ids": time_ids},
        cross_attention_kwargs={"content_states": embeds["content"], "style_states": embeds["style"]},
    )
    optimizer = torch.optim.AdamW(
        [{"params": adapter.lora_parameters(), "lr": config.lr, "weight_decay": config.weight_decay},
         # no decay on mergers: it would pull every gate below 1, not only the overlapping ones
         {"params": [gates.mergers], "lr": config.merger_lr, "weight_decay": 0.0}],
        # fused: one kernel for all parameters (a per-tensor loop over hundreds of LoRA factors costs ~20 % of
        # a tiny step on CPU; benchmarks/step_overhead.py)
        betas=(0.9, 0.999), eps=1e-8, fused=device.type in ("cpu", "cuda"))
    # fp16 activations underflow in the backward pass without loss scaling (bf16 and fp32 need none)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    trainable = adapter.lora_parameters() + [gates.mergers]
    calibration_steps = set(config.calibration_steps)
    checkpointing_before = unet.is_gradient_checkpointing
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    forward = compiled_unet(base) if config.compile else unet
    history = []
    bar = tqdm(range(config.steps), desc="unziplora fit", disable=not progress, leave=False)
    try:
        adapter.attach()
        for step in bar:
            calibrating = step in calibration_steps
            gates.masks_enabled = not calibrating  # a recalibration step trains unmasked, mergers frozen
            x0 = _random_crop(latents, size, rng)
            noise = torch.randn(x0.shape, generator=rng).to(device, dtype)
            timestep = torch.randint(0, base.scheduler.config.num_train_timesteps, (1,), generator=rng)
            noisy = base.scheduler.add_noise(x0, noise, timestep).to(dtype)
            pred = forward(noisy, timestep.to(device), **unet_kwargs).sample
            mse = F.mse_loss(pred.float(), prediction_target(base.scheduler, x0, noise, timestep).float())
            ortho = gates.orthogonality_loss()
            loss = mse + config.ortho_lambda * ortho
            if not math.isfinite(loss.item()):
                raise FitDivergedError(step, loss.item())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # true gradients for the cone scores and the clip
            if calibrating:
                recalibrate(adapter, config.column_ratio)
                gates.mergers.grad = None  # frozen for this step
            else:
                gates.keep_overlap_grad()
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            gates.clamp_()
            gates.masks_enabled = True
            metrics = {"loss": loss.item(), "mse": mse.item(), "ortho": ortho.item(), "timestep": int(timestep)}
            if calibrating:
                metrics["mask_stats"] = mask_stats(adapter)
            history.append(metrics)
            bar.set_postfix(loss=f"{metrics['mse']:.4f}", ortho=f"{metrics['ortho']:.4f}")
            if on_step is not None:
                on_step(step, metrics)
    finally:
        adapter.detach()
        gates.masks_enabled = True
        if config.gradient_checkpointing and not checkpointing_before:
            unet.disable_gradient_checkpointing()
    return history


def compiled_unet(base: BaseModel):
    """`torch.compile` of the base model's UNet, made once and kept with the base model: later fits reuse the
    compiled code (the first fit pays the compilation). The UNet module itself is left as it is."""
    if "compiled_unet" not in base.extra:
        base.extra["compiled_unet"] = torch.compile(base.unet)
    return base.extra["compiled_unet"]


def prediction_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, as its scheduler config says: the noise (SDXL base) or the velocity
    (v-prediction models, such as the toy model)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timestep.to(x0.device))
    raise InputError(f"unsupported prediction_type {kind!r} in the base model's scheduler config")


@torch.no_grad()
def encode_prompts(base: BaseModel, prompts: Prompts) -> dict[str, torch.Tensor]:
    """Each prompt through both text encoders once (penultimate states, concatenated to one context).
    Only the combined prompt's pooled embedding is used (it feeds add_text_embeds)."""
    for name, text in prompts._asdict().items():
        n_tokens = len(base.tokenizer(text).input_ids)
        if n_tokens > base.tokenizer.model_max_length:
            warnings.warn(f"the {name} prompt has {n_tokens} tokens; CLIP reads only the first "
                          f"{base.tokenizer.model_max_length} (the rest is truncated): {text!r}", UserWarning)
    pipe = base.pipeline()
    out = {}
    for name, text in prompts._asdict().items():
        embeds, _, pooled, _ = pipe.encode_prompt(text, device=base.device, do_classifier_free_guidance=False)
        out[name] = embeds.to(base.dtype)
        if name == "combined":
            out["pooled"] = pooled.to(base.dtype)
    return out


@torch.no_grad()
def encode_image(base: BaseModel, picture) -> torch.Tensor:
    """The whole (resized) image through the VAE once; training crops happen in latent space."""
    pixels = image_to_tensor(picture).to(base.vae.device, base.vae.dtype)
    latents = base.vae.encode(pixels).latent_dist.mode() * base.vae.config.scaling_factor
    return latents.to(base.dtype)


def _random_crop(latents: torch.Tensor, size: int, rng: torch.Generator) -> torch.Tensor:
    h, w = latents.shape[-2:]
    top = int(torch.randint(0, h - size + 1, (1,), generator=rng))
    left = int(torch.randint(0, w - size + 1, (1,), generator=rng))
    return latents[..., top:top + size, left:left + size]


def _check_resolution(resolution: int, base: BaseModel) -> None:
    # the latent must survive the UNet's downsamplings
    multiple = base.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise InputError(f"resolution {resolution} must be a multiple of {multiple} for {base.name}")


def _record(config: FitConfig, prompts: Prompts, base: BaseModel, adapter: UnZipLoRA, history: list[dict],
            timings: dict) -> dict:
    tail = history[-min(50, len(history)):]
    return {
        "format": "unziplora-fit/1",
        "settings": config.to_dict(),
        "prompts": prompts._asdict(),
        "base_model": base.name,
        "base_model_fingerprint": base.fingerprint,
        # what the LoRA files must say for other tools to sample them right (kohya / modelspec metadata)
        "prediction_type": base.scheduler.config.prediction_type,
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "final": {"loss": history[-1]["loss"], "mse": history[-1]["mse"], "ortho": history[-1]["ortho"],
                  "mse_mean_last_50": sum(h["mse"] for h in tail) / len(tail)},
        "mask_stats": mask_stats(adapter),
        "adapted_layers": len(adapter.layers),
        "layers_per_block": base.unet.config.layers_per_block,
        "timings": timings | {"peak_memory_mb": peak_memory_mb(base.device)},
        "versions": library_versions(),
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("unziplora", "torch", "diffusers", "transformers", "peft", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
