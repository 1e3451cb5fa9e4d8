"""Base models: a real SDXL (diffusers folder, single-file checkpoint or hub id; see `locate`) or one built
offline from a config.

Presets built offline (random weights, no download):
- ``tiny``: SDXL's block layout and module names at toy width; the default for tests and CPU runs.
- ``sdxl-random``: the full published SDXL-base architecture, for real-size speed and memory checks.
Both get real CLIP tokenizers built from the BPE vocabulary shipped in the ``open-clip-torch`` wheel.
Trained presets, shipped as package data:
- ``toy``: a mini-SDXL trained on the toy world (``toyworld/``, 32 px), with its own measured role table.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import BaseModelError, first_line
from .locate import PACKAGED, BaseLocation, cache_root, locate_base_model

# SDXL-base's noise schedule (scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", clip_sample=False,
)

_SDXL_BLOCKS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, use_linear_projection=True, addition_embed_type="text_time",
    in_channels=4, out_channels=4,
)

# Each preset: UNet, VAE and the two text encoders' configs, plus the training resolution it suits.
_PRESET_CONFIGS = {
    "tiny": dict(
        resolution=64,
        # the two text encoders differ in width, as in SDXL (768 / 1280): context 32 + 48, pooled 48
        unet=dict(_SDXL_BLOCKS, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1),
                  attention_head_dim=(2, 4, 4), cross_attention_dim=32 + 48, norm_num_groups=8,
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 6 * 8, sample_size=8),
        vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64),
        text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          hidden_act="quick_gelu"),
        text_encoder_2=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                            hidden_act="gelu", projection_dim=48),
    ),
    # Published SDXL-base 1.0 component configs (unet/vae/text_encoder*/config.json).
    "sdxl-random": dict(
        resolution=1024,
        unet=dict(_SDXL_BLOCKS, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                  attention_head_dim=(5, 10, 20), cross_attention_dim=2048, norm_num_groups=32,
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                 sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="quick_gelu", projection_dim=768),
        text_encoder_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
    ),
}


@dataclass
class BaseModel:
    """The frozen SDXL components a fit needs, loaded once and reused across fits."""

    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler: DDPMScheduler
    default_resolution: int = 1024
    role_table: str = "sdxl"
    guidance: float = 5.0  # default classifier-free guidance for its samples
    # what previews draw a style LoRA on and a content LoRA in (the first few the source is not)
    preview_subjects: tuple[str, ...] = ("house", "cat", "car", "tree")
    preview_styles: tuple[str, ...] = ("pencil sketch", "oil painting", "pixel art", "watercolor painting")
    location: BaseLocation | None = None  # where the weights came from; its fingerprint names them
    extra: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.location.fingerprint if self.location else ""

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def pipeline(self):
        """A `StableDiffusionXLPipeline` sharing these very modules (no copy), with an Euler sampler."""
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
            scheduler=EulerDiscreteScheduler.from_config(self.scheduler.config),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU always (half precision on CPU is slow and lossy); as asked on an accelerator."""
    if device.type == "cpu" or precision == "fp32":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def load_base_model(spec: str = "tiny", *, revision: str | None = None, variant: str | None = None,
                    config: str | None = None, device: str | torch.device = "auto", precision: str = "bf16",
                    seed: int = 0) -> BaseModel:
    """Load `spec`: a preset name (built offline), a packaged model, a diffusers SDXL folder, a single-file
    checkpoint (read with the diffusers config folder `config`, default SDXL-base 1.0's) or a hub id."""
    dev = pick_device(device) if isinstance(device, str) else device
    dtype = pick_dtype(precision, dev)
    if spec in PACKAGED:
        from .roles import TABLES

        table = PACKAGED[spec].role_table
        if table not in TABLES:  # a model without its measured block roles would fit with the wrong ones
            raise BaseModelError(f"no role table {table!r} for the {spec!r} model yet: measure it with "
                                 f"`python -m toyworld.evaluate DIR --probe` and add it to unziplora/roles.py")
    location = locate_base_model(spec, revision=revision, variant=variant, config=config)
    if location.kind == "preset":
        base = build_preset(spec, seed=seed, dtype=dtype)
    elif location.kind == "single-file":
        base = _load_single_file(location, dtype)
    else:
        base = _load_pretrained(location, dtype)
    if location.kind == "packaged":
        packaged = PACKAGED[spec]
        base.role_table, base.guidance = packaged.role_table, packaged.guidance
        base.preview_subjects, base.preview_styles = packaged.preview_subjects, packaged.preview_styles
    base.name, base.location = spec, location
    return place(base, dev)


def place(base: BaseModel, device: torch.device) -> BaseModel:
    """Frozen and in eval mode, the VAE in fp32 (it runs once per fit, and SDXL's VAE overflows in fp16),
    every module on `device`."""
    for module in (base.unet, base.vae, base.text_encoder, base.text_encoder_2):
        module.requires_grad_(False).eval()
    if base.vae.dtype != torch.float32:
        base.vae.to(dtype=torch.float32)
    for module in (base.vae, base.unet, base.text_encoder, base.text_encoder_2):
        module.to(device)
    return base


def load_base_model_for(config, **overrides) -> BaseModel:
    """The base model a FitConfig names (spec, revision, variant, single-file config, device, precision)."""
    return load_base_model(**{"spec": config.base_model, "revision": config.revision, "variant": config.variant,
                              "config": config.base_config, "device": config.device,
                              "precision": config.precision} | overrides)


def build_preset(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> BaseModel:
    cfg = _PRESET_CONFIGS[name]
    torch.manual_seed(seed)  # the random weights are part of the preset: same seed, same model
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build big presets directly in their dtype (halves peak memory)
    try:
        with torch.device(device):  # "meta": the architecture alone, no memory (configs, budgets)
            unet = UNet2DConditionModel(**cfg["unet"])
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
                up_block_types=("UpDecoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
                **cfg["vae"],
            )
            te1 = CLIPTextModel(_clip_config(cfg["text_encoder"]))
            te2 = CLIPTextModelWithProjection(_clip_config(cfg["text_encoder_2"]))
    finally:
        torch.set_default_dtype(previous)
    tok1, tok2 = clip_tokenizers()
    return BaseModel(name=name, unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                     tokenizer_2=tok2, scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
                     default_resolution=cfg["resolution"], role_table="sdxl")


def sdxl_config_dir() -> Path:
    """A diffusers config folder of SDXL-base 1.0 (configs and tokenizers, no weights), written once into the
    user's cache from the `sdxl-random` preset: what a single-file SDXL checkpoint is read with, offline."""
    folder = cache_root() / "sdxl-base-1.0-config"
    if (folder / "model_index.json").is_file():
        return folder
    pipe = build_preset("sdxl-random", device="meta").pipeline()
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}")
    pipe.save_config(temporary)  # model_index.json
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(temporary / name)
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).config.save_pretrained(temporary / name)
    for name in ("tokenizer", "tokenizer_2"):
        getattr(pipe, name).save_pretrained(temporary / name)
    try:
        os.replace(temporary, folder)
    except OSError:  # another process wrote it first
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def _clip_config(overrides: dict) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407, **overrides)


def _load_pretrained(location: BaseLocation, dtype: torch.dtype) -> BaseModel:
    from diffusers import StableDiffusionXLPipeline

    try:
        with _no_loading_bars():
            pipe = StableDiffusionXLPipeline.from_pretrained(str(location.path), dtype=dtype,
                                                             variant=location.variant, local_files_only=True)
    except Exception as exc:  # missing files, a variant it lacks, broken configs: say which model
        raise BaseModelError(f"cannot load SDXL base model {location.spec!r}: {first_line(exc)}") from exc
    return _from_pipeline(pipe, location.spec)


def _load_single_file(location: BaseLocation, dtype: torch.dtype) -> BaseModel:
    from diffusers import StableDiffusionXLPipeline

    config = location.config or sdxl_config_dir()
    try:
        with _no_loading_bars():
            pipe = StableDiffusionXLPipeline.from_single_file(str(location.path), config=str(config), dtype=dtype,
                                                              local_files_only=True)
    except Exception as exc:  # shapes that do not fit the config, a damaged file: say which
        raise BaseModelError(f"cannot load the single-file checkpoint {location.spec} with the config "
                             f"{config}: {first_line(exc)}") from exc
    return _from_pipeline(pipe, location.spec)


@contextlib.contextmanager
def _no_loading_bars():
    """diffusers' and transformers' bars off while a model loads from local files: seconds of work whose bars (one
    set per fit worker in a job's log, and on `--quiet` commands) say nothing the command does not say itself."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [(library, library.is_progress_bar_enabled()) for library in (diffusers_logging, transformers_logging)]
    for library, _ in enabled:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was_on in enabled:
            if was_on:
                library.enable_progress_bar()


def _from_pipeline(pipe, spec: str) -> BaseModel:
    if pipe.unet.config.addition_embed_type != "text_time" or pipe.text_encoder is None or \
            pipe.text_encoder_2 is None:
        raise BaseModelError(f"{spec} does not have the SDXL base UNet/text-encoder layout")
    # the resolution the UNet was trained at (1024 for SDXL: 128 latents x 8)
    resolution = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return BaseModel(name=spec, unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                     text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2,
                     scheduler=DDPMScheduler.from_config(pipe.scheduler.config), default_resolution=resolution)


# ---- tokenizers from open-clip's BPE file ----

def _bpe_vocab_path() -> Path:
    # Located through package metadata, not `import open_clip` (which would import torchvision).
    try:
        dist = metadata.distribution("open_clip_torch")
    except metadata.PackageNotFoundError as exc:
        raise BaseModelError("the offline CLIP tokenizer needs the open-clip-torch wheel: "
                             "pip install --no-deps open-clip-torch") from exc
    return Path(dist.locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table, in CLIP's vocabulary order:
    printable bytes first (as themselves), then the rest mapped to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


@lru_cache(maxsize=1)
def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(_bpe_vocab_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # line 0: version header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's two tokenizers: same BPE; the second pads with "!" like OpenCLIP's."""
    vocab, merges = _clip_vocab()
    tok1 = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
    tok2 = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token="!")
    return tok1, tok2
