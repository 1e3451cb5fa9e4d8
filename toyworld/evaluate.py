"""Measure a toy base model with the judges: does it draw the prompted shape in the prompted style, and which
UNet blocks carry content vs style (the measured probe behind `roles.TABLES["toy-probe"]`).

    python -m toyworld.evaluate MODEL_DIR [--seeds 4] [--probe] [--prompt-gap]

Sampling is a plain DDIM (or, with `sampler="ddpm"`, ancestral DDPM) loop with classifier-free guidance (zeros
as the unconditional input, as StableDiffusionXLPipeline does for an absent negative prompt; the model's own
guidance unless told), so the probe can change one block's cross-attention input without touching the pipeline.
"""

from __future__ import annotations

import argparse
import json
import re

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from toyworld import judges as judges_mod
from toyworld import world
from unziplora.training import prediction_target


@torch.no_grad()
def encode(base, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = base.pipeline()
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, device=base.device, do_classifier_free_guidance=False)
    return hidden, pooled


@torch.no_grad()
def sample(base, prompts: list[str], seed: int = 0, steps: int = 20, guidance: float | None = None,
           swap: dict[str, list[str]] | None = None, sampler: str = "ddim") -> torch.Tensor:
    """Images (B x 3 x H x W in [-1, 1]) for `prompts`. `swap` maps attention-module names (e.g.
    "up_blocks.0.attentions.1") to other prompts, which that block's cross-attention reads instead."""
    unet, size = base.unet, base.default_resolution // base.vae_scale_factor
    guidance = base.guidance if guidance is None else guidance
    hidden, pooled = encode(base, prompts)
    n = len(prompts)
    cond = torch.cat([torch.zeros_like(hidden), hidden])
    added = {"text_embeds": torch.cat([torch.zeros_like(pooled), pooled]),
             "time_ids": torch.tensor([[base.default_resolution] * 2 + [0, 0] + [base.default_resolution] * 2]
                                      ).float().repeat(2 * n, 1)}
    saved = dict(unet.attn_processors)
    if swap:
        procs = dict(saved)
        for block, other in swap.items():
            states = torch.cat([torch.zeros_like(hidden), encode(base, other)[0]])
            for name in procs:
                if name.startswith(block + ".") and ".attn2." in name:
                    procs[name] = _FixedContext(states)
        unet.set_attn_processor(procs)
    try:
        sched = SAMPLERS[sampler].from_config(base.scheduler.config)
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, unet.config.in_channels, size, size, generator=g) * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = unet(torch.cat([x, x]), t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
            uncond, text = eps.chunk(2)
            x = sched.step(uncond + guidance * (text - uncond), t, x).prev_sample
        return base.vae.decode(x / base.vae.config.scaling_factor).sample.clamp(-1, 1)
    finally:
        unet.set_attn_processor(saved)


SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


class _FixedContext(AttnProcessor2_0):
    """Cross-attention that reads fixed text states instead of the UNet's."""

    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states = states

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        return super().__call__(attn, hidden_states, self.states, *args, **kwargs)


def all_pairs() -> list[tuple[str, str]]:
    return [(sh, st) for sh in world.SHAPE_NAMES for st in world.STYLE_NAMES]


def judged_accuracy(base, judges, seeds: int = 2, steps: int = 20, guidance: float | None = None,
                    sampler: str = "ddim") -> dict:
    """Every shape x style prompt, `seeds` samples each: how often the judges find what was prompted."""
    pairs = all_pairs()
    shape_ok, style_ok = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for seed in range(seeds):
        images = sample(base, [world.prompt(*p) for p in pairs], seed=seed, steps=steps, guidance=guidance,
                        sampler=sampler)
        shapes, styles = judges.classify(images)
        shape_ok += (shapes == torch.tensor([world.SHAPE_NAMES.index(p[0]) for p in pairs])).float() / seeds
        style_ok += (styles == torch.tensor([world.STYLE_NAMES.index(p[1]) for p in pairs])).float() / seeds
    both = {f"{sh}/{st}": (shape_ok[i].item(), style_ok[i].item()) for i, (sh, st) in enumerate(pairs)}
    return dict(shape=shape_ok.mean().item(), style=style_ok.mean().item(),
                per_style={st: style_ok[[i for i, p in enumerate(pairs) if p[1] == st]].mean().item()
                           for st in world.STYLE_NAMES},
                per_shape={sh: shape_ok[[i for i, p in enumerate(pairs) if p[0] == sh]].mean().item()
                           for sh in world.SHAPE_NAMES},
                per_pair=both, samples=len(pairs) * seeds)


@torch.no_grad()
def prompt_gap(base, n: int = 128, seed: int = 777) -> dict[str, float]:
    """How much the right prompt lowers the noise-prediction loss against a shuffled (wrong) one, per noise
    band: wrong / right - 1 on `n` held-out images with the same noise and timesteps for both. A model that
    ignores its prompt scores about 0; the early check of a training run, before sampling is worth it."""
    batch = world.dataset(seed, n)
    right = batch.prompts
    wrong = [right[i] for i in torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()]
    unet, res = base.unet, base.default_resolution
    x0 = base.vae.encode(batch.images.to(base.vae.dtype)).latent_dist.mode() * base.vae.config.scaling_factor
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=unet.dtype).repeat(n, 1)
    gaps = {}
    for lo, hi in ((0, 300), (300, 700), (700, 1000)):
        g = torch.Generator().manual_seed(1)
        t = torch.randint(lo, hi, (n,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        noisy = base.scheduler.add_noise(x0, noise, t).to(unet.dtype)
        loss = {}
        for name, prompts in (("right", right), ("wrong", wrong)):
            hidden, pooled = encode(base, prompts)
            pred = unet(noisy, t, encoder_hidden_states=hidden,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            target = prediction_target(base.scheduler, x0, noise, t)
            loss[name] = torch.nn.functional.mse_loss(pred.float(), target.float()).item()
        gaps[f"t{lo}-{hi}"] = loss["wrong"] / loss["right"] - 1
    return gaps


def save_grid(base, path: str, seed: int = 0, steps: int = 20, guidance: float | None = None, sampler: str = "ddim",
              scale: int = 4) -> None:
    """One sample per prompt: rows are shapes, columns styles (in world order), enlarged `scale` x."""
    from PIL import Image

    images = sample(base, [world.prompt(*p) for p in all_pairs()], seed=seed, steps=steps, guidance=guidance,
                    sampler=sampler)
    n, size = len(world.STYLE_NAMES), images.shape[-1]
    grid = Image.new("RGB", (n * size, len(world.SHAPE_NAMES) * size), "white")
    for i, image in enumerate(images):
        grid.paste(world.to_pil(image), ((i % n) * size, (i // n) * size))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def cross_attention_blocks(unet) -> list[str]:
    return sorted({name.split(".attn2")[0].rsplit(".transformer_blocks", 1)[0]
                   for name in unet.attn_processors if ".attn2." in name})


def role_probe(base, judges, seeds: int = 2, steps: int = 20, guidance: float | None = None,
               sampler: str = "ddim") -> dict:
    """Per cross-attention block: feed it a prompt with another shape AND another style than the rest of the
    UNet gets; how often does the image take the block's shape (content) or its style (style)?"""
    pairs = all_pairs()
    rng = torch.Generator().manual_seed(0)
    others = [pairs[j] for j in torch.randperm(len(pairs), generator=rng).tolist()]
    # keep only pairs where both factors differ, so each flip is unambiguous
    keep = [i for i, (p, o) in enumerate(zip(pairs, others)) if p[0] != o[0] and p[1] != o[1]]
    prompts = [world.prompt(*pairs[i]) for i in keep]
    swapped = [world.prompt(*others[i]) for i in keep]
    target_shape = torch.tensor([world.SHAPE_NAMES.index(others[i][0]) for i in keep])
    target_style = torch.tensor([world.STYLE_NAMES.index(others[i][1]) for i in keep])
    result = {}
    blocks = cross_attention_blocks(base.unet)
    # the last row swaps every block: the reference (both factors should follow the swapped prompt)
    for block, swap in [*((b, {b: swapped}) for b in blocks), ("(all blocks)", {b: swapped for b in blocks})]:
        content = style = 0.0
        for seed in range(seeds):
            images = sample(base, prompts, seed=seed, steps=steps, guidance=guidance, swap=swap, sampler=sampler)
            shapes, styles = judges.classify(images)
            content += (shapes == target_shape).float().mean().item() / seeds
            style += (styles == target_style).float().mean().item() / seeds
        result[block] = dict(content=content, style=style)
        print(f"{block:32s} takes the swapped shape {content:.2f}, style {style:.2f}", flush=True)
    return result


def suggest_role_table(probe: dict, margin: float = 0.1) -> dict[str, list[tuple[str, str]]]:
    """The role tables a probe measures: a block whose swap moves the shape at least `margin` more often than
    the style is "content", the reverse "style", the rest "shared"; the most content-leaning and the most
    style-leaning block are always content and style (the method needs one of each). The B-LoRA twin puts
    its one LoRA on exactly those two blocks. The probe sees only what a block takes from the prompt: blocks
    that draw texture without reading the prompt come out "shared" (see roles.TABLES["toy"] for what that
    cost in the toy world), so the suggestion is named "toy-probe"."""
    blocks = {b: r for b, r in probe.items() if not b.startswith("(")}
    lean = {b: r["content"] - r["style"] for b, r in blocks.items()}
    top_content = max(lean, key=lean.get)
    top_style = min((b for b in lean if b != top_content), key=lean.get)
    rows = []
    for block in sorted(blocks):
        if block == top_content or (lean[block] >= margin and block != top_style):
            role = "content"
        elif block == top_style or lean[block] <= -margin:
            role = "style"
        else:
            role = "shared"
        rows.append((re.escape(block + "."), role))
    blora = [(re.escape(top_content + "."), "content-only"), (re.escape(top_style + "."), "style-only"), (".*", "off")]
    return {"toy-probe": rows, "toy-blora": blora}


def main(argv=None) -> None:
    from unziplora.models import load_base_model

    p = argparse.ArgumentParser(description="Judge a toy base model (and probe its block roles).")
    p.add_argument("model")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, help="default: the model's (2.0 for toy)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--probe", action="store_true")
    p.add_argument("--prompt-gap", action="store_true", help="only the right-vs-wrong-prompt loss gap (fast)")
    p.add_argument("--grid", help="also save a shapes x styles sample grid (PNG) here")
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    base = load_base_model(a.model, device="cpu")
    if a.prompt_gap:
        print(json.dumps({band: round(gap, 4) for band, gap in prompt_gap(base).items()}), flush=True)
        return
    judges = judges_mod.load_judges()
    out = dict(accuracy=judged_accuracy(base, judges, a.seeds, a.steps, a.guidance, a.sampler))
    print(json.dumps({k: v for k, v in out["accuracy"].items() if k != "per_pair"}, indent=1), flush=True)
    if a.probe:
        out["probe"] = role_probe(base, judges, a.seeds, a.steps, a.guidance, a.sampler)
        out["role_tables"] = suggest_role_table(out["probe"])
        print("measured role tables (for unziplora/roles.py):", flush=True)
        for name, rows in out["role_tables"].items():
            print(f'    "{name}": [', *(f"        (r\"{p}\", \"{r}\")," for p, r in rows), "    ],", sep="\n")
    if a.grid:
        save_grid(base, a.grid, steps=a.steps, guidance=a.guidance, sampler=a.sampler)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
