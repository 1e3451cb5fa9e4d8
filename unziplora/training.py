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
from .errors import FitDivergedError, InputError, NotChosen
from .images import image_to_tensor, load_image
from .importance import mask_stats, recalibrate
from .layers import FitBatch, UnZipLoRA
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
        overwrite: bool = False, progress: bool = True, on_step: StepCallback | None = None,
        formats=None) -> FitResult:
    """Train the content and style LoRAs of `image` (a path, bytes or binary file).

    Pass a loaded `base` to reuse it across fits (the pipeline does); it is left exactly as it was found.
    With `out_dir`, the files of SPEC section 7 are written there atomically; `formats`: the LoRA files'
    formats (export.DEFAULT_FORMATS, each LoRA once in kohya format, unless given).
    """
    result = fit_many([image], [config], base=base, out_dirs=[out_dir], overwrite=overwrite, progress=progress,
                      on_steps=[on_step], formats=formats)[0]
    if isinstance(result, Exception):
        raise result
    return result


@dataclass(frozen=True)
class Selection:
    """fit_many's look at its fits mid-training: each pauses after `after` of its steps (a fraction in (0, 1]);
    `choose` gets the paused fits (fit index -> `snapshot`) and returns the indices that train on. The others end
    there with NotChosen (quality control's early choice among candidates: pipeline/quality/gate.py)."""

    after: float
    choose: Callable[[dict[int, object]], set[int]]

    def pause(self, config: FitConfig) -> int:
        return pause_step(self.after, config.steps)


def pause_step(after: float, steps: int) -> int:
    """The step after which a fit of `steps` steps pauses at a selection after a fraction `after` of them."""
    return min(steps, max(1, round(after * steps)))


def fit_many(images: list, configs: list[FitConfig], *, base: BaseModel | None = None,
             out_dirs: list[str | Path | None] | None = None, overwrite: bool = False, progress: bool = True,
             on_steps: list[StepCallback | None] | None = None, formats=None,
             select: Selection | None = None) -> list[FitResult | Exception]:
    """Several independent fits on one base model, trained together: one batched UNet pass per step for the
    fits of one resolution and rank (`train_batch`), each ending as it would alone. Returns, per fit, its
    FitResult or the exception that failed it (a bad image, a NaN): one fit's failure is not its mates'.
    Timings: `train_s` is the fit's share of its batches' training time (batch wall time / fits in it).
    `select`: the fits are looked at once mid-training and only those chosen train on (Selection)."""
    from . import export

    count = len(images)
    formats = export.check_formats(formats or export.DEFAULT_FORMATS)
    out_dirs, on_steps = out_dirs or [None] * count, on_steps or [None] * count
    start = time.perf_counter()
    results: list[FitResult | Exception | None] = [None] * count
    for i, out_dir in enumerate(out_dirs):
        if out_dir is not None:
            try:
                export.check_output_dir(out_dir, overwrite)
            except Exception as exc:
                results[i] = exc
    loaded = {}
    if base is None:
        base = load_base_model_for(configs[0])
        loaded["load_base_model_s"] = time.perf_counter() - start
    prepared = {}  # fit index -> (FitState, prompts, timings)
    for i, (image, config) in enumerate(zip(images, configs)):
        if results[i] is None:
            try:
                prepared[i] = _prepare(image, config, base, on_steps[i], dict(loaded))
            except Exception as exc:
                results[i] = exc
    if select is not None:
        _train_groups(base, prepared, list(prepared), progress, select)
        _select(base, prepared, select)
    _train_groups(base, prepared, list(prepared), progress)
    for i, (state, prompts, timings) in prepared.items():
        if state.error is not None:
            results[i] = state.error
            continue
        try:
            results[i] = _finish(state, prompts, base, timings, out_dirs[i], overwrite, start, formats)
        except Exception as exc:
            results[i] = exc
    return results


def _train_groups(base: BaseModel, prepared: dict, fits: list[int], progress: bool,
                  select: Selection | None = None) -> None:
    """Train `fits` that are still running, one batch per resolution and rank (and pause step, with `select`)."""
    groups: dict[tuple, list[int]] = {}
    for i in fits:
        state = prepared[i][0]
        if state.running:
            key = (state.config.resolution, state.config.rank, select and select.pause(state.config))
            groups.setdefault(key, []).append(i)
    for (*_, until), members in groups.items():
        _train_halving(base, prepared, members, progress, until)


def _select(base: BaseModel, prepared: dict, select: Selection) -> None:
    """The paused fits shown to `select.choose`; those it leaves out end with NotChosen."""
    paused = {i: state for i, (state, _, _) in prepared.items() if state.running}
    try:
        keep = set(select.choose({i: snapshot(state, base) for i, state in paused.items()}))
    except Exception as exc:  # a choice that could not be made fails the fits it was to choose among
        keep, failed = set(), exc
    else:
        failed = None
    for i, state in paused.items():
        if i not in keep:
            state.error = failed or NotChosen(state.step)


def _train_halving(base: BaseModel, prepared: dict, members: list[int], progress: bool,
                   until: int | None = None) -> None:
    """Train the fits `members` (keys of `prepared`) together (to step `until`, see train_batch). A batch that
    runs out of device memory starts again from step 0 as two halves, down to one fit, whose out-of-memory error
    is its own: a K too large for the device costs time, not fits. Restarted fits end as they would alone (same
    seed, fresh adapters)."""
    states = [prepared[i][0] for i in members]
    t = time.perf_counter()
    halve = False
    try:
        train_batch(base, states, progress=progress, until=until)
    except torch.OutOfMemoryError as exc:
        if len(members) == 1:  # without its traceback, which holds the failed pass's tensors
            states[0].error = exc.with_traceback(None)
        else:
            halve = True  # after this block: its traceback holds the failed pass's tensors
    except Exception as exc:  # the pass itself failed: every fit in it did
        for state in states:
            state.error = state.error or exc
    if halve:
        del states
        for i in members:  # a fit that had already failed on its own (diverged) keeps its error
            if prepared[i][0].error is None:
                prepared[i] = (prepared[i][0].restarted(base), *prepared[i][1:])
        if base.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(members) // 2
        warnings.warn(f"{len(members)} fits trained together ran out of memory on {base.device}; training them "
                      f"again as {half} and {len(members) - half} (a lower --fits-per-worker saves the time)",
                      RuntimeWarning)
        _train_halving(base, prepared, members[:half], progress, until)
        _train_halving(base, prepared, members[half:], progress, until)
        return
    share = (time.perf_counter() - t) / len(members)
    for i, state in zip(members, states):
        timings = prepared[i][2]
        timings["train_s"] = timings.get("train_s", 0.0) + share  # a fit paused at a selection trains twice
        timings.update(s_per_step=timings["train_s"] / state.config.steps,
                       batch_size=max(len(members), timings.get("batch_size", 1)))


def _prepare(image, config: FitConfig, base: BaseModel, on_step: StepCallback | None,
             timings: dict) -> tuple["FitState", object, dict]:
    """A fit ready to train: settings resolved, image and prompts encoded once, its adapter made."""
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
    return FitState(config, _new_adapter(base, config), embeds, latents, on_step=on_step), prompts, timings


def _new_adapter(base: BaseModel, config: FitConfig) -> UnZipLoRA:
    return UnZipLoRA(base.unet, config.rank, config.role_table, config.init, config.seed).to(base.device)


def _finish(state: "FitState", prompts, base: BaseModel, timings: dict, out_dir, overwrite: bool,
            start: float, formats: tuple[str, ...]) -> FitResult:
    from . import export

    config = state.config
    tensors = export.adapter_tensors(state.adapter, config.save_precision)
    record = _record(config, prompts, base, state.adapter, state.history, timings)
    result = FitResult(config=config, record=record, tensors=tensors, history=state.history)
    if timings.get("batch_size", 1) > 1:  # its own share of the batch: encoding, training share, export
        start = time.perf_counter() - timings["encode_s"] - timings["train_s"]
    if out_dir is not None:  # fit.json, written last, holds export_s and total_s too
        result.out_dir = export.write_fit(result, out_dir, overwrite=overwrite, started=start, formats=formats)
    else:
        record["timings"]["total_s"] = time.perf_counter() - start
    return result


def train(base: BaseModel, adapter: UnZipLoRA, embeds: dict, latents: torch.Tensor, config: FitConfig, *,
          progress: bool = True, on_step: StepCallback | None = None) -> list[dict]:
    """Train one fit's adapter; returns its per-step history (FitDivergedError on a NaN/inf loss)."""
    state = FitState(config, adapter, embeds, latents, on_step=on_step)
    train_batch(base, [state], progress=progress)
    if state.error is not None:
        raise state.error
    return state.history


@dataclass
class FitState:
    """One fit in a training batch: its own settings, prompts, latents, adapter, optimizer, RNG stream,
    recalibration schedule and history. Fits trained together share only the UNet pass."""

    config: FitConfig
    adapter: UnZipLoRA
    embeds: dict
    latents: torch.Tensor
    on_step: StepCallback | None = None
    history: list[dict] = field(default_factory=list)
    error: Exception | None = None
    step: int = 0

    def __post_init__(self):
        gates, config = self.adapter.gates, self.config
        device = gates.mergers.device
        self.rng = torch.Generator().manual_seed(config.seed)  # CPU generator: the same draws on every device
        loras = self.adapter.lora_parameters()
        self.optimizer = torch.optim.AdamW(
            [{"params": loras, "lr": config.lr, "weight_decay": config.weight_decay},
             # no decay on mergers: it would pull every gate below 1, not only the overlapping ones
             {"params": [gates.mergers], "lr": config.merger_lr, "weight_decay": 0.0}],
            # fused: one kernel for all parameters (a per-tensor loop over hundreds of LoRA factors costs ~20 %
            # of a tiny step on CPU; benchmarks/step_overhead.py)
            betas=(0.9, 0.999), eps=1e-8, fused=device.type in ("cpu", "cuda"))
        # fp16 activations underflow in the backward pass without loss scaling (bf16 and fp32 need none)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.latents.dtype == torch.float16)
        self.trainable = loras + [gates.mergers]
        self.calibration_steps = set(config.calibration_steps)

    def restarted(self, base: BaseModel) -> "FitState":
        """This fit from step 0 again: a fresh adapter from its seed, its encoded prompts and image kept."""
        return FitState(self.config, _new_adapter(base, self.config), self.embeds, self.latents, on_step=self.on_step)

    @property
    def running(self) -> bool:
        return self.error is None and self.step < self.config.steps

    @property
    def calibrating(self) -> bool:
        return self.step in self.calibration_steps

    def draw(self, base: BaseModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's latent crop, noise and timestep, from this fit's own RNG stream."""
        size = self.config.resolution // base.vae_scale_factor
        x0 = _random_crop(self.latents, size, self.rng)
        noise = torch.randn(x0.shape, generator=self.rng).to(self.latents.device, self.latents.dtype)
        timestep = torch.randint(0, base.scheduler.config.num_train_timesteps, (1,), generator=self.rng)
        return x0, noise, timestep

    def update(self, loss: torch.Tensor, mse: torch.Tensor, ortho: torch.Tensor, timestep: torch.Tensor) -> None:
        """After the batch's backward pass: this fit's recalibration, gradient clip and optimizer step."""
        gates, config = self.adapter.gates, self.config
        self.scaler.unscale_(self.optimizer)  # true gradients for the cone scores and the clip
        if self.calibrating:
            recalibrate(self.adapter, config.column_ratio)
            gates.mergers.grad = None  # frozen for this step
        else:
            gates.keep_overlap_grad()
        torch.nn.utils.clip_grad_norm_(self.trainable, config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        gates.clamp_()
        metrics = {"loss": loss.item(), "mse": mse.item(), "ortho": ortho.item(), "timestep": int(timestep)}
        if self.calibrating:
            metrics["mask_stats"] = mask_stats(self.adapter)
        gates.masks_enabled = True
        self.history.append(metrics)
        if self.on_step is not None:
            self.on_step(self.step, metrics)
        self.step += 1


BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_inv_fmt}{postfix}]"


def train_batch(base: BaseModel, states: list[FitState], *, progress: bool = True, until: int | None = None) -> None:
    """Train several fits of one UNet together: one batched UNet pass per step, sample k is fit k's (its own
    crop, noise, timestep and prompts), and each fit's LoRAs apply to its own sample only (`FitBatch`). Each
    fit keeps its own optimizer, clip, recalibrations and step count: it ends as it would alone (same seed,
    same LoRAs, within float rounding). A fit whose loss is NaN or inf gets `error` (FitDivergedError) and
    leaves the batch; the others go on. Fits of one batch need one resolution and one rank.

    `until`: stop once every fit has taken that many steps (or ended). The fits can then be looked at
    (`snapshot`) and trained on, all or some, by passing them again: a fit paused and resumed takes the same
    steps as one trained straight through."""
    if len({s.config.resolution for s in states}) > 1:
        raise ValueError("fits trained together need one resolution")
    unet, device, dtype = base.unet, base.device, base.dtype  # read once: diffusers walks every parameter
    resolution = states[0].config.resolution
    checkpointing_before = unet.is_gradient_checkpointing
    checkpointing = any(s.config.gradient_checkpointing for s in states)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    forward = compiled_unet(base) if any(s.config.compile for s in states) else unet
    # seconds per step always (tqdm's default turns to steps/s when fast): the figure docs/one-image.md quotes
    stop = [s.config.steps if until is None else min(until, s.config.steps) for s in states]
    bar = tqdm(total=sum(max(end - s.step, 0) for s, end in zip(states, stop)), desc="unziplora fit",
               disable=not progress, leave=False, unit="step", bar_format=BAR_FORMAT)
    try:
        with FitBatch(unet, [s.adapter for s in states]) as batch:
            while live := [s for s, end in zip(states, stop) if s.running and s.step < end]:
                if batch.adapters != [s.adapter for s in live]:
                    batch.use([s.adapter for s in live])
                _batch_step(base, forward, live, resolution, device, dtype)
                bar.update(len(live))
                if len(states) == 1 and states[0].history:
                    bar.set_postfix(loss=f"{states[0].history[-1]['mse']:.4f}",
                                    ortho=f"{states[0].history[-1]['ortho']:.4f}")
    finally:
        bar.close()
        for state in states:
            state.adapter.gates.masks_enabled = True
        if checkpointing and not checkpointing_before:
            unet.disable_gradient_checkpointing()


def snapshot(state: FitState, base: BaseModel):
    """A fit as it stands, paused mid-training or ended, in memory (export.FitArtifacts, no files): what
    previews and scorers take."""
    from .export import FitArtifacts, adapter_tensors

    record = _record(state.config, state.config.prompts(), base, state.adapter, state.history, {})
    return FitArtifacts(path=None, config=state.config, record=record,
                        tensors=adapter_tensors(state.adapter, state.config.save_precision))


def _batch_step(base: BaseModel, forward, live: list[FitState], resolution: int, device, dtype) -> None:
    for state in live:
        state.adapter.gates.masks_enabled = not state.calibrating  # recalibration: unmasked, mergers frozen
    draws = [state.draw(base) for state in live]
    x0 = torch.cat([d[0] for d in draws])
    noise = torch.cat([d[1] for d in draws])
    timesteps = torch.cat([d[2] for d in draws])
    noisy = base.scheduler.add_noise(x0, noise, timesteps).to(dtype)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(live),
                            device=device, dtype=dtype)
    embeds = {name: torch.cat([s.embeds[name] for s in live])  # pooled: the combined prompt's, add_text_embeds
              for name in ("combined", "content", "style", "pooled_combined")}
    pred = forward(noisy, timesteps.to(device), encoder_hidden_states=embeds["combined"],
                   added_cond_kwargs={"text_embeds": embeds["pooled_combined"], "time_ids": time_ids},
                   cross_attention_kwargs={"content_states": embeds["content"], "style_states": embeds["style"]}
                   ).sample
    target = prediction_target(base.scheduler, x0, noise, timesteps)
    finished = []
    for k, state in enumerate(live):
        state.optimizer.zero_grad(set_to_none=True)
        mse = F.mse_loss(pred[k:k + 1].float(), target[k:k + 1].float())
        ortho = state.adapter.gates.orthogonality_loss()
        loss = mse + state.config.ortho_lambda * ortho
        if not math.isfinite(loss.item()):
            state.error = FitDivergedError(state.step, loss.item())
            continue
        finished.append((state, loss, mse, ortho, timesteps[k]))
    if finished:  # each fit's gradients come from its own loss only (no op mixes samples of the batch)
        sum(state.scaler.scale(loss) for state, loss, *_ in finished).backward()
    for state, loss, mse, ortho, timestep in finished:
        state.update(loss, mse, ortho, timestep)


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
    The combined prompt's pooled embedding feeds add_text_embeds."""
    prompts = prompts._asdict()
    for name, text in prompts.items():
        n_tokens = len(base.tokenizer(text).input_ids)
        if n_tokens > base.tokenizer.model_max_length:
            warnings.warn(f"the {name} prompt has {n_tokens} tokens; CLIP reads only the first "
                          f"{base.tokenizer.model_max_length} (the rest is truncated): {text!r}", UserWarning)
    pipe = base.pipeline()
    out = {}
    for name, text in prompts.items():
        embeds, _, pooled, _ = pipe.encode_prompt(text, device=base.device, do_classifier_free_guidance=False)
        out[name] = embeds.to(base.dtype)
        out[f"pooled_{name}"] = pooled.to(base.dtype)
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
