"""Does a method separate content from style? Measured against the toy world's ground truth (issue 6).

    python benchmarks/disentangle.py [--images 8] [--seeds 2] [--steps 600] [--methods all] [--out DIR]

A fixed, seeded set of held-out toy-world images (each one shape in one style, seeds the base model never
saw). Each image is fitted by every method; then, with fixed seeds and the shape/style judges:

- content LoRA alone, asked for each OTHER style:  shape accuracy (higher is better) and source-style
  leakage (how often the judge still sees the source style: lower is better);
- style LoRA alone, asked for each OTHER shape:    style accuracy and source-shape leakage;
- content of image A + style of image B:            both right (and each one alone);
- both LoRAs of one image, its own prompt:          reconstruction (did the fit learn the image at all?).

The content and style are named with words the base model never learned ("sks shape", "zwx"), so only the
LoRAs can supply them: the base cannot draw the right answer from the prompt alone.

Methods (SPEC section 10 and the paper's ablation table), all on the same training loop and settings:
- unziplora      prompt + column + block separation (the base model's measured role table);
- prompt+column  no block separation (role table "none": every block shared, disjoint sparse columns);
- prompt-only    neither column nor block separation (role table "free": both LoRAs on every column);
- b-lora         one LoRA on the content block and the style block only, one prompt, split by block;
- dreambooth     one LoRA on every column, one prompt; it cannot be split, so its "content" and "style"
                 are the whole LoRA (a rank-2r LoRA: both halves, trained under one prompt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toyworld import judges as judges_mod  # noqa: E402
from toyworld import world  # noqa: E402
from unziplora.config import IMPLIED_BEFORE, FitConfig  # noqa: E402
from unziplora.errors import UnZipLoRAError  # noqa: E402
from unziplora.export import FILES, load_fit  # noqa: E402
from unziplora.generate import generate  # noqa: E402
from unziplora.models import load_base_model  # noqa: E402
from unziplora.roles import TABLES  # noqa: E402
from unziplora.training import fit  # noqa: E402

HELD_OUT_SEED = 424242  # the base model trains on fresh random draws, the judges on seeds 0-10,000
CONTENT, STYLE = "sks shape", "zwx"  # words the base model never saw in training
COMBINED = f"A {CONTENT} in {STYLE} style"  # each fit's own prompt


@dataclass(frozen=True)
class Method:
    key: str
    name: str
    role_table: str  # "{table}" stands for the base model's own table
    one_prompt: bool = False  # both LoRAs trained under the combined prompt: no prompt separation
    whole: bool = False  # cannot be split: content and style are the whole LoRA
    ortho: bool = True  # the orthogonality loss (only meaningful with sparse columns)
    # settings changed from the fit's defaults ("{shape}" in a text stands for each image's own shape word)
    overrides: tuple[tuple[str, object], ...] = ()


METHODS = [
    Method("unziplora", "UnZipLoRA (prompt + column + block)", "{table}"),
    Method("prompt+column", "prompt + column separation", "none"),
    Method("prompt-only", "prompt separation only", "free", ortho=False),
    Method("b-lora", "B-LoRA (block split, one prompt)", "{table}-blora", one_prompt=True, ortho=False),
    Method("dreambooth", "DreamBooth-LoRA (whole LoRA)", "free", one_prompt=True, whole=True, ortho=False),
]

# What limits the style LoRA (issue 16): UnZipLoRA with one thing changed, each its own row (`--methods ablations`)
ABLATIONS = [
    # the defaults again with another fit seed: how far a row moves by chance alone
    Method("seed-1", "UnZipLoRA, fit seed 1 (the defaults otherwise)", "{table}", overrides=(("seed", 1),)),
    Method("seed-2", "UnZipLoRA, fit seed 2 (the defaults otherwise)", "{table}", overrides=(("seed", 2),)),
    Method("fresh-columns", "UnZipLoRA, masks grow by fresh columns", "{table}",
           overrides=(("column_picks", "fresh"),)),
    Method("probe-table", "UnZipLoRA, up_blocks.1 shared (the probe's table)", "{table}-probe"),
    Method("content-down1", "UnZipLoRA, the 16 px input block the content LoRA's", "{table}-content-down1"),
    Method("style-down1", "UnZipLoRA, the 16 px input block the style LoRA's", "{table}-style-down1"),
    # the mergers start at 1 and, at the paper's merger rate, fall together on overlapping columns (both to
    # 0.01-0.12): frozen, both LoRAs keep every column they picked
    Method("mergers-frozen", "UnZipLoRA, mergers frozen at 1", "{table}", overrides=(("merger_lr", 1e-12),)),
    Method("true-class", "UnZipLoRA, style prompt names the true shape", "{table}",
           overrides=(("class_word", "{shape}"),)),
    Method("rank-32", "UnZipLoRA, rank 32", "{table}", overrides=(("rank", 32),)),
    Method("steps-1000", "UnZipLoRA, 1000 steps", "{table}", overrides=(("steps", 1000),)),
    Method("style-alone-25", "UnZipLoRA, 1 step in 4 trains the style LoRA alone", "{table}",
           overrides=(("style_alone", 0.25),)),
    Method("content-alone-25", "UnZipLoRA, 1 step in 4 trains the content LoRA alone", "{table}",
           overrides=(("content_alone", 0.25),)),
    Method("alone-25", "UnZipLoRA, 1 step in 4 trains the style LoRA alone, 1 in 4 the content LoRA", "{table}",
           overrides=(("style_alone", 0.25), ("content_alone", 0.25))),
    Method("content-lr-2x", "UnZipLoRA, content LoRA at 2x the learning rate", "{table}",
           overrides=(("lr", 2e-3), ("style_lr", 1e-3))),
    Method("style-lr-3x", "UnZipLoRA, style LoRA at 3x the learning rate", "{table}", overrides=(("style_lr", 3e-3),)),
]


def held_out_images(n: int, seed: int = HELD_OUT_SEED) -> world.Batch:
    """n images in which consecutive ones (the recombination pairs) differ in both shape and style."""
    rng = np.random.default_rng(seed)
    pairs = [(sh, st) for sh in world.SHAPE_NAMES for st in world.STYLE_NAMES]
    order = rng.permutation(len(pairs))
    chosen = []
    for i in order:
        if not chosen or (pairs[i][0] != chosen[-1][0] and pairs[i][1] != chosen[-1][1]):
            chosen.append(pairs[i])
        if len(chosen) == n:
            break
    return world.batch_of([world.sample_factors(rng, sh, st) for sh, st in chosen])


def write_image(image: torch.Tensor, path: Path) -> Path:
    """Atomically (processes sharing --out write the same files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    world.to_pil(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def fit_config(method: Method, base_table: str, args, factors: world.Factors) -> FitConfig:
    table = method.role_table.format(table=base_table)
    if table not in TABLES:
        raise SystemExit(f"no role table {table!r} for this base model (unziplora/roles.py)")
    config = FitConfig(content=CONTENT, style=STYLE, base_model=args.model, steps=args.steps, rank=args.rank,
                       lr=args.lr, seed=0, role_table=table, ortho_lambda=0.5 if method.ortho else 0.0,
                       recalibrations=min(3, args.steps), prompt=COMBINED,
                       content_prompt=COMBINED if method.one_prompt else None,
                       style_prompt=COMBINED if method.one_prompt else None)
    return config.replace(**{key: value.format(shape=world.SHAPES[factors.shape]) if isinstance(value, str) else
                             value for key, value in method.overrides})


def to_tensor(images) -> torch.Tensor:
    return torch.stack([world.from_pil(im) for im in images])


def whole_loras(base, fits, prompt: str, call: dict):
    """Every fit's two LoRA halves at weight 1 under one prompt (how a user stacks whole LoRAs)."""
    pipe = base.pipeline()
    names = []
    try:
        for i, f in enumerate(fits):
            for kind, file in FILES.items():
                name = f"{kind}{i}"
                pipe.load_lora_weights(str(f.path), weight_name=file, adapter_name=name)
                names.append(name)
        pipe.set_adapters(names, [1.0] * len(names))
        return pipe(prompt, negative_prompt=call["negative_prompt"], num_inference_steps=call["steps"],
                    guidance_scale=call["guidance"],
                    num_images_per_prompt=call["num_images"], generator=torch.Generator().manual_seed(call["seed"]),
                    height=base.default_resolution, width=base.default_resolution).images
    finally:
        pipe.unload_lora_weights()


def draw(base, method: Method, content=None, style=None, prompt: str | list[str] = "", call: dict = None
         ) -> torch.Tensor:
    """Images from the method's content LoRA, style LoRA, or both (recombined when they differ)."""
    if method.whole:
        fits = [f for f in (content, style) if f is not None]
        fits = fits[:1] if len(fits) == 2 and fits[0] is fits[1] else fits
        return to_tensor(whole_loras(base, fits, prompt, call))
    mode = "direct" if method.one_prompt else "routed"  # B-LoRA's halves are plain LoRAs on disjoint blocks
    return to_tensor(generate(base, content=content, style=style, prompt=prompt, mode=mode, **call))


def evaluate_method(base, judges, method: Method, batch: world.Batch, fits: list, seeds: int, steps: int,
                    guidance: float, negative_prompt: str | None = None) -> dict:
    counts: dict[str, list[float]] = {}
    per_image: list[dict[str, list[float]]] = [{} for _ in fits]  # which images a method fails on

    def add(name, hits: torch.Tensor, image: int | None = None):
        counts.setdefault(name, []).extend(hits.float().tolist())
        if image is not None:
            per_image[image].setdefault(name, []).extend(hits.float().tolist())

    call = dict(steps=steps, guidance=guidance, seed=0, num_images=seeds, negative_prompt=negative_prompt)

    def alone(kind: str, fit, names: tuple[str, ...], own: str, prompt):
        """One LoRA alone for every other value of `names`, all prompts in one batch (`seeds` images each, in
        prompt order): the judged shapes and styles, and the index of the value each image was asked for."""
        others = [n for n in names if n != own]
        shapes, styles = judges.classify(draw(base, method, call=call, prompt=[prompt(o) for o in others],
                                              **{kind: fit}))
        return shapes, styles, torch.tensor([names.index(o) for o in others]).repeat_interleave(seeds)

    for i, f in enumerate(batch.factors):
        shape, style = batch.shapes[i].item(), batch.styles[i].item()
        shapes, styles, asked = alone("content", fits[i], world.STYLE_NAMES, f.style,
                                      lambda o: f"A {CONTENT} in {world.STYLES[o]} style")
        add("content_acc", shapes == shape, i)
        add("content_style_leak", styles == style, i)
        add("content_follows_style", styles == asked, i)
        shapes, styles, asked = alone("style", fits[i], world.SHAPE_NAMES, f.shape,
                                      lambda o: f"A {world.SHAPES[o]} in {STYLE} style")
        add("style_acc", styles == style, i)
        add("style_shape_leak", shapes == shape, i)
        add("style_follows_shape", shapes == asked, i)
        shapes, styles = judges.classify(draw(base, method, content=fits[i], style=fits[i], prompt=COMBINED,
                                              call=call))
        add("recon_both", (shapes == shape) & (styles == style), i)
        if i % 2 == 0 and i + 1 < len(fits):  # content of A with style of B, and the other way round
            for a, b in ((i, i + 1), (i + 1, i)):
                shapes, styles = judges.classify(draw(base, method, content=fits[a], style=fits[b],
                                                      prompt=COMBINED, call=call))
                add("recomb_shape", shapes == batch.shapes[a].item())
                add("recomb_style", styles == batch.styles[b].item())
                add("recomb_both", (shapes == batch.shapes[a].item()) & (styles == batch.styles[b].item()))
    return {name: float(np.mean(v)) for name, v in counts.items()} | {
        "per_image": [{name: round(float(np.mean(v)), 3) for name, v in scores.items()} for scores in per_image]}


def finished_fit(folder: Path, config: FitConfig, image: Path):
    """The fit in `folder` if it was made from `image` with `config` (a re-run re-scores without fitting)."""
    try:
        saved = json.loads((folder / "fit.json").read_text())["settings"]
        if (folder / "source.sha256").read_text() != hashlib.sha256(image.read_bytes()).hexdigest():
            return None
    except (OSError, ValueError, KeyError):
        return None
    wanted = {k: v for k, v in config.to_dict().items() if v is not None and k != "device"}
    # a fit made before a setting existed did what the setting's implied value does (as item ids count it)
    if not all(saved.get(k, IMPLIED_BEFORE.get(k)) == v for k, v in wanted.items()):
        return None
    try:
        return load_fit(folder)
    except UnZipLoRAError:  # a fit this code cannot read (a setting since removed): fitted again
        return None


COLUMNS = [  # (key, header); arrows say which way is better
    ("content_acc", "content shape ↑"), ("content_style_leak", "style leak ↓"),
    ("style_acc", "style ↑"), ("style_shape_leak", "shape leak ↓"),
    ("recomb_both", "recombined ↑"), ("recon_both", "reconstructed ↑"), ("fit_s", "s/fit"),
]


def table(results: dict) -> str:
    lines = ["| method | " + " | ".join(h for _, h in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, r in results.items():
        cells = [f"{r[k]:.1f}" if k == "fit_s" else f"{100 * r[k]:.0f} %" for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", help="the base model (its role table must have a -blora twin)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--held-out-seed", type=int, default=HELD_OUT_SEED,
                   help="which held-out images (another seed: a second, independent image set)")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt")
    p.add_argument("--steps", type=int, default=600, help="fit steps")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, help="default: the base model's (2.5 for toy)")
    p.add_argument("--negative-prompt", help="default: none, as diffusers' pipe(prompt) draws (SDXL zeroes the "
                   "unconditional embedding); '' encodes an empty prompt instead")
    p.add_argument("--methods", default="all", help="comma-separated: 'all' (the methods), 'ablations', or "
                   f"names from {[m.key for m in METHODS + ABLATIONS]}")
    p.add_argument("--out", default="out/disentangle")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--plot", help="also draw the table as grouped bars (per metric, one bar per method) into this PNG")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    diffusers_logging.set_verbosity_error()  # not one "no LoRA keys for the text encoder" line per image
    groups = {"all": METHODS, "ablations": ABLATIONS}
    known = {m.key: m for m in METHODS + ABLATIONS}
    names = a.methods.split(",")
    unknown = [n for n in names if n not in known and n not in groups]
    if unknown:
        raise SystemExit(f"no such method {unknown}; choose from {list(groups) + list(known)}")
    chosen = list({m.key: m for n in names for m in groups.get(n, [known.get(n)])}.values())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_base_model(a.model, device="cpu" if not torch.cuda.is_available() else "auto")
    a.guidance = base.guidance if a.guidance is None else a.guidance
    judges = judges_mod.load_judges()
    batch = held_out_images(a.images, a.held_out_seed)
    print(f"{a.images} held-out images: " + ", ".join(f.prompt for f in batch.factors), flush=True)
    paths = [write_image(image, out / "images" / f"{i:03d}.png") for i, image in enumerate(batch.images)]
    results, started = {}, time.time()
    # what a method's scores depend on; a finished method with the same settings is reused, so a long run
    # resumes, and methods can run in parallel processes sharing --out
    same = {k: vars(a)[k] for k in ("model", "images", "held_out_seed", "seeds", "steps", "rank", "lr",
                                    "sample_steps", "guidance", "negative_prompt")}
    for method in chosen:
        saved = out / method.key / "scores.json"
        previous = json.loads(saved.read_text()) if saved.is_file() else {}
        if previous.get("settings") == same:
            results[method.name] = previous["scores"]
            print(f"{method.name}: reused {saved}", flush=True)
            continue
        fits, seconds = [], []
        for i, path in enumerate(paths):
            config, folder = fit_config(method, base.role_table, a, batch.factors[i]), out / method.key / f"{i:03d}"
            done = finished_fit(folder, config, path)
            if done is not None:
                fits.append(done)
                seconds.append(json.loads((folder / "fit.json").read_text())["timings"]["total_s"])
                continue
            result = fit(str(path), config, base=base, out_dir=folder, overwrite=True, progress=False)
            seconds.append(result.record["timings"]["total_s"])
            (folder / "source.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
            fits.append(load_fit(result.out_dir))
        scores = evaluate_method(base, judges, method, batch, fits, a.seeds, a.sample_steps, a.guidance,
                                 a.negative_prompt)
        results[method.name] = scores | {"fit_s": float(np.mean(seconds))}
        saved.write_text(json.dumps({"settings": same, "scores": results[method.name]}, indent=1))
        means = {k: v for k, v in results[method.name].items() if k != "per_image"}
        print(f"{method.name}: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items())
              + f" ({time.time() - started:.0f} s so far)", flush=True)
        for factors, image in zip(batch.factors, scores["per_image"]):
            print(f"  {factors.prompt}: " + ", ".join(f"{k} {v:.2f}" for k, v in image.items()), flush=True)
    report = dict(settings=vars(a), base_model=base.name, role_table=base.role_table,
                  images=[asdict(f) for f in batch.factors], results=results)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(table(results))
    if a.plot:
        plot(results, a.plot,
             f"{base.name} base, {a.images} held-out images (seed {a.held_out_seed}) x {a.seeds} seeds")
    return report


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(k, h) for k, h in COLUMNS if k != "fit_s"]
    figure, axes = plt.subplots(figsize=(8, 4.4), dpi=100)
    width = 0.8 / len(results)
    for i, (name, scores) in enumerate(results.items()):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(metrics))]
        axes.bar(xs, [100 * scores[k] for k, _ in metrics], width, label=name)
    axes.set_xticks(range(len(metrics)), [h.replace(" ", "\n", 1) for _, h in metrics], fontsize=8)
    axes.set_ylabel("% of judged images")
    axes.set_ylim(0, 100)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
