"""Images from fits (SPEC section 8): content only, style only, both combined, or recombined across fits.

- one LoRA alone: loaded from its file with `load_lora_weights`, exactly as a user would (a kohya-format file,
  or the diffusers-format one of an older fit: diffusers reads both);
- both, mode "routed" (faithful): the three-prompt routing of training, with masks and mergers;
- both, mode "direct": both LoRA files as adapters at weight 1 under one prompt (the portable approximation).
The content and the style may come from different fits (recombination). The base model is left as found.

`content_blocks`: where the content LoRA acts beside a style LoRA. "own": only in its own blocks, those where it
holds every column (role "content"), not in its sparse columns of the style and shared blocks (in the direct mode:
its file's layers of those blocks only); "all": wherever it was fitted (the paper's). "auto" (the default):
"own" when one fit's content meets another fit's style in the routed mode (measured better in the toy world:
docs/toy-world.md) and its role table gives the content LoRA blocks of its own, else "all" (one fit's own pair
is drawn as it was fitted).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image

from .config import Prompts
from .errors import InputError
from .export import FitArtifacts, kohya_module_name, read_safetensors
from .layers import UnZipLoRA
from .models import BaseModel
from .roles import KINDS, role_for

MODES = ("routed", "direct")
CONTENT_BLOCKS = ("auto", "all", "own")  # where the content LoRA acts when both LoRAs are drawn


def default_prompts(content: FitArtifacts | None, style: FitArtifacts | None) -> Prompts:
    """The training prompts, recombined: content trigger and class from one fit, style from the other."""
    c = (content or style).config
    s = (style or content).config
    return c.replace(style=s.style, prompt=None, style_prompt=None, content_prompt=c.content_prompt).prompts()


def generate(base: BaseModel, *, content: FitArtifacts | None = None, style: FitArtifacts | None = None,
             prompt: str | list[str] | None = None, mode: str = "routed", negative_prompt: str | None = None,
             steps: int = 50, guidance: float | None = None, seed: int = 0, resolution: int | None = None,
             num_images: int = 1, content_blocks: str = "auto", style_prompt: str | None = None,
             progress: bool = False) -> list[Image.Image]:
    """`progress`: a bar over the sampling steps (stderr). `negative_prompt=None` draws as diffusers' `pipe(prompt)` does: SDXL zeroes the unconditional embedding
    (`force_zeros_for_empty_prompt`). An encoded "" is a different, weaker guidance for these LoRAs
    (docs/toy-world.md, disentanglement benchmark). `style_prompt`: in the routed mode with both LoRAs, what the
    style LoRA reads (default: its fit's style prompt, naming the content's class)."""
    if content is None and style is None:
        raise InputError("give a content fit, a style fit, or both")
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if content_blocks not in CONTENT_BLOCKS:
        raise InputError(f"content_blocks must be one of {CONTENT_BLOCKS}, got {content_blocks!r}")
    if content_blocks == "own" and (content is None or style is None):
        raise InputError("content_blocks='own' limits the content LoRA beside a style LoRA: give both fits")
    if content_blocks == "auto" and not (recombined(content, style) and mode == "routed"):
        content_blocks = "all"
    if style_prompt is not None and not (content is not None and style is not None and mode == "routed"):
        raise InputError("style_prompt is what the style LoRA reads beside a content LoRA in the routed mode")
    check_same_base(content, style)
    for kind, fit in (("content", content), ("style", style)):
        if fit is not None:
            check_lora(fit.lora_file(kind), base)
    prompts = default_prompts(content, style)
    if content is not None and style is not None:
        prompt = prompt or prompts.combined
    elif content is not None:
        prompt = prompt or prompts.content
    else:
        prompt = prompt or prompts.style
    pipe = base.pipeline()
    pipe.set_progress_bar_config(disable=not progress, desc="generate", leave=False)
    call = _call(base, content or style, steps, guidance, seed, resolution, negative_prompt, num_images)
    if content is not None and style is not None and mode == "routed":
        if not isinstance(prompt, str):
            raise InputError("the routed mode takes one prompt; give a list of prompts to one LoRA or mode='direct'")
        routed = prompts._replace(combined=prompt, style=style_prompt or prompts.style)
        return _routed(base, pipe, content, style, routed, call, content_blocks)
    fits = {"content": content, "style": style}
    loaded = [kind for kind in KINDS if fits[kind] is not None]
    try:
        for kind in loaded:
            own = kind == "content" and content_blocks == "own"
            weights, where = (own_blocks_weights(fits[kind], kind, base), {}) if own else fits[kind].lora_weights(kind)
            pipe.load_lora_weights(weights, **where, adapter_name=kind)
        pipe.set_adapters(loaded, [1.0] * len(loaded))
        return pipe(prompt, **call).images
    finally:
        pipe.unload_lora_weights()


def recombined(content: FitArtifacts | None, style: FitArtifacts | None) -> bool:
    """One fit's content LoRA with another fit's style LoRA (a fit is its folder, or the object in memory)."""
    if content is None or style is None:
        return False
    return content is not style and (content.path is None or style.path is None or
                                     Path(content.path).resolve() != Path(style.path).resolve())


def check_same_base(content: FitArtifacts | None, style: FitArtifacts | None) -> None:
    """A content LoRA and a style LoRA recombined must come from fits of one base model: their fit.json's
    fingerprints are compared before any weights load, and each base is named (else: a tensor-size error
    deep inside the adapter)."""
    if content is None or style is None:
        return
    prints = [fit.record.get("base_model_fingerprint") for fit in (content, style)]
    if all(prints) and prints[0] != prints[1]:
        raise InputError(f"the content LoRA ({content.path}) was fitted on {_base_of(content)} and the style LoRA "
                         f"({style.path}) on {_base_of(style)}: recombine fits of one base model")


def _base_of(fit: FitArtifacts) -> str:
    return f"{fit.record.get('base_model') or fit.config.base_model} ({fit.record.get('base_model_fingerprint')})"


LORA_KEY = re.compile(r"unet\.(?P<layer>.+)\.lora_(?P<factor>[AB])\.weight")
KOHYA_KEY = re.compile(r"(?P<stem>lora_unet_\w+)\.(?:lora_(?P<factor>down|up)\.weight|alpha)")


def check_lora(path, base: BaseModel) -> None:
    """A LoRA file (kohya or diffusers format) fits this base model's UNet: every key names one of its linear
    layers and every factor has that layer's width; else one line naming the file (diffusers would raise a
    traceback deep inside, or load nothing without a word). Reads the file's header only."""
    from safetensors import safe_open

    def header_shapes(path):
        with safe_open(str(path), "pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}

    shapes = read_safetensors(path, header_shapes)
    layers = dict(base.unet.named_modules())
    kohya = _kohya_layers(base) if any(key.startswith("lora_unet_") for key in shapes) else {}
    foreign = []
    for key, shape in sorted(shapes.items()):
        match = KOHYA_KEY.fullmatch(key) if kohya else LORA_KEY.fullmatch(key)
        layer = (kohya.get(match["stem"]) if kohya else layers.get(match["layer"])) if match else None
        if not isinstance(layer, torch.nn.Linear):
            foreign.append(key)
            continue
        if kohya and match["factor"] is None:  # a kohya `.alpha`: one number
            continue
        first = match["factor"] in ("A", "down")
        width = layer.in_features if first else layer.out_features
        if len(shape) != 2 or shape[1 if first else 0] != width:
            raise InputError(f"{path}: a LoRA of another base model: {key} has the shape {shape}, which does not "
                             f"fit the layer of {width} features in {base.name} ({base.fingerprint})")
    if foreign or not shapes:
        raise InputError(f"{path}: not a LoRA of {base.name}'s UNet ({base.fingerprint}): {len(foreign)} of its "
                         f"{len(shapes)} keys name no layer of it" + (f", e.g. {foreign[0]!r}" if foreign else ""))


def _kohya_layers(base: BaseModel) -> dict[str, torch.nn.Module]:
    """kohya key stem -> linear layer, for the linears of the UNet's transformer (attention) blocks."""
    per_block = base.unet.config.layers_per_block
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    return {kohya_module_name(name, per_block): module for name, module in base.unet.named_modules()
            if ".attentions." in name and isinstance(module, torch.nn.Linear)}


def generate_each(base: BaseModel, fits: dict[str, FitArtifacts], prompts: dict[str, str | list[str]], *,
                  steps: int = 50, seed: int = 0, **kwargs) -> dict[str, list[Image.Image]]:
    """Each LoRA alone on its own prompts ({"content": ..., "style": ...}), as `generate` draws one LoRA, pixel for
    pixel; but the pipeline's adapter is wrapped around the UNet's layers once, and each next LoRA's weights are
    swapped into it when it comes from the same fit (diffusers' hotswap). Wrapping is the costly part of loading
    (peft makes new modules for every adapted layer): a fit's previews take 20 % less time on `tiny`."""
    pipe = base.pipeline()
    images = {}
    try:
        loaded = None  # the fit whose LoRA the adapter holds
        for kind, fit in fits.items():
            same = fit.path or id(fit)  # a fit's folder, or the fit in memory
            swap = loaded is not None and same == loaded  # one fit's two LoRAs: the same layers, rank and alpha
            if loaded is not None and not swap:  # another fit's may differ, and a hotswap would not say so
                pipe.unload_lora_weights()
            weights, where = fit.lora_weights(kind)
            pipe.load_lora_weights(weights, **where, adapter_name="each", hotswap=swap)
            loaded = same
            images[kind] = pipe(prompts[kind], **_call(base, fit, steps, seed=seed, **kwargs)).images
        return images
    finally:
        pipe.unload_lora_weights()


def _call(base: BaseModel, fit: FitArtifacts, steps: int, guidance: float | None = None, seed: int = 0,
          resolution: int | None = None, negative_prompt: str | None = None, num_images: int = 1) -> dict:
    """The pipeline call's settings: the fit's resolution and the base model's guidance unless given."""
    size = resolution or fit.config.resolution or base.default_resolution
    return dict(num_inference_steps=steps, guidance_scale=base.guidance if guidance is None else guidance,
                height=size, width=size, negative_prompt=negative_prompt, num_images_per_prompt=num_images,
                generator=torch.Generator().manual_seed(seed))


def load_adapter(base: BaseModel, content: FitArtifacts, style: FitArtifacts, content_blocks: str = "all"
                 ) -> UnZipLoRA:
    """An UnZipLoRA holding the content half of one fit and the style half of another (`content_blocks` "own":
    the content half in its own blocks only; "auto": there too where the role table gives it blocks of its own)."""
    if content.config.rank != style.config.rank:
        raise InputError(f"routed recombination needs equal ranks ({content.config.rank} vs {style.config.rank}); "
                         "use mode='direct'")
    adapter = UnZipLoRA(base.unet, content.config.rank, content.config.role_table or base.role_table,
                        init="zeros").to(base.device)
    for kind, fit in zip(KINDS, (content, style)):
        state, mergers, masks = fit.lora_state_dict(kind), fit.mergers(), fit.masks()
        try:
            adapter.load_kind(kind, state, mergers, masks)
        except (KeyError, RuntimeError) as exc:  # another role table or model: name the fit, not a line of ours
            raise InputError(f"{fit.path}: its {kind} LoRA, mergers or masks do not fit the adapter on "
                             f"{base.name} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if content_blocks != "all":
        own_blocks_only(adapter, "content", required=content_blocks == "own")
    return adapter


def own_blocks_weights(fit: FitArtifacts, kind: str, base: BaseModel) -> dict[str, torch.Tensor]:
    """One LoRA of a fit, in its own blocks only (the layers whose role gives it every column), as the state dict
    `load_lora_weights` takes. A role table that gives it no blocks of its own is refused."""
    table = fit.config.role_table or base.role_table
    state = {key: value for key, value in fit.lora_state_dict(kind).items()
             if role_for(key.rsplit(".lora_", 1)[0], table).is_full(kind)}
    if not state:
        raise no_own_blocks(kind)
    return {f"unet.{key}": value for key, value in state.items()}


def no_own_blocks(kind: str) -> InputError:
    return InputError(f"the role table gives the {kind} LoRA no blocks of its own: it would act nowhere")


@torch.no_grad()
def own_blocks_only(adapter: UnZipLoRA, kind: str, required: bool = True) -> None:
    """One LoRA of the adapter off outside its own blocks: the layers whose role gives it every column. A role
    table that gives it none (every block shared) leaves it as it is, or with `required` is refused."""
    layers = [layer for _, layer in adapter.named_layers()]
    if not any(layer.role.is_full(kind) for layer in layers):
        if not required:
            return
        raise no_own_blocks(kind)
    for layer in layers:
        if not layer.role.is_full(kind):
            layer.factors(kind)[1].zero_()  # B = 0: the layer adds nothing of this LoRA


def _routed(base, pipe, content, style, prompts: Prompts, call: dict, content_blocks: str = "all"
            ) -> list[Image.Image]:
    n, neg = call.pop("num_images_per_prompt"), call.pop("negative_prompt")
    embeds = {}
    for name, text in prompts._asdict().items():
        pos, negative, pooled, neg_pooled = pipe.encode_prompt(
            text, negative_prompt=neg, device=base.device, num_images_per_prompt=n, do_classifier_free_guidance=True)
        embeds[name] = (pos, negative, pooled, neg_pooled)
    pos, negative, pooled, neg_pooled = embeds["combined"]
    # the pipeline batches [negative, positive]; the LoRAs' own prompts must line up with that
    routing = {f"{kind}_states": torch.cat([embeds[kind][1], embeds[kind][0]]) for kind in KINDS}
    with load_adapter(base, content, style, content_blocks):
        return pipe(prompt_embeds=pos, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=neg_pooled, cross_attention_kwargs=routing, **call).images
