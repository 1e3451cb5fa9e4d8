"""Does a method separate content from style? Measured against the toy world's ground truth (issue 6).

    python benchmarks/disentangle.py [--set A|B|C] [--images 12] [--fit-seeds 0 1 2] [--methods all]
                                     [--compare A B] [--quick] [--out DIR] [--plot PNG] [--json FILE]

A fixed, seeded set of held-out toy-world images (each one shape in one style, seeds the base model never
saw). Each image is fitted by every method once per fit seed (a unit: one image, one fit seed); then, with
fixed sampling seeds and the shape/style judges:

- content LoRA alone, asked for each OTHER style:  shape accuracy (higher is better) and source-style
  leakage (how often the judge still sees the source style: lower is better);
- style LoRA alone, asked for each OTHER shape:    style accuracy and source-shape leakage;
- content of image A + style of image B:            both right (and each one alone), for each of up to
  --recomb-partners images B that differ from A in shape and style, --recomb-seeds images each;
- both LoRAs of one image, its own prompt:          reconstruction (did the fit learn the image at all?).

The content and style are named with words the base model never learned ("sks shape", "zwx"), so only the
LoRAs can supply them: the base cannot draw the right answer from the prompt alone.

Each metric is reported as its mean over units with a 95 % interval (a bootstrap over images, then fit seeds
within each image: `disentangle_stats`), for all images and for the "reconstructable" ones: those that the
whole-image DreamBooth LoRA redraws under its own prompt (what the base can draw at all). `--compare A B` gives
B - A per metric over the same units with its interval, and says "better", "worse" or "no measurable
difference". Fits and each unit's judged hits are kept under --out and reused, so a row can be built up over
several sittings (another fit seed, more images) and methods can run in parallel processes sharing --out.

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
import contextlib
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from toyworld import judges as judges_mod  # noqa: E402
from toyworld import world  # noqa: E402
from unziplora.config import RETIRED, FitConfig  # noqa: E402
from unziplora.errors import UnZipLoRAError  # noqa: E402
from unziplora.export import FILES, RECORD, load_fit  # noqa: E402
from unziplora.generate import generate, recombined  # noqa: E402
from unziplora.models import load_base_model  # noqa: E402
from unziplora.roles import TABLES  # noqa: E402
from unziplora.training import fit_many  # noqa: E402

import disentangle_stats as stats  # noqa: E402  (beside this file)
import fit_patches  # noqa: E402  (beside this file)

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
    # a way to draw another method's fits: theirs are used (and their LoRAs-alone scores, drawn the same way)
    fits_of: str | None = None
    recombine: str = "all"  # generate's content_blocks when one fit's content meets another's style
    mode: str | None = None  # generate's mode for both LoRAs (default: direct with one prompt, else routed)
    patch: str | None = None  # a change to the fit that the fit code does not carry (fit_patches.PATCHES)
    style_prompt: str | None = None  # what the style LoRA reads when recombined (generate's style_prompt)


METHODS = [
    Method("unziplora", "UnZipLoRA (prompt + column + block)", "{table}"),
    Method("prompt+column", "prompt + column separation", "none"),
    Method("prompt-only", "prompt separation only", "free", ortho=False),
    Method("b-lora", "B-LoRA (block split, one prompt)", "{table}-blora", one_prompt=True, ortho=False),
    Method("dreambooth", "DreamBooth-LoRA (whole LoRA)", "free", one_prompt=True, whole=True, ortho=False),
]

# The benchmark's own role tables (its ablations; a fit naming one loads where this module is imported): the toy
# probe's suggestion (`python -m toyworld.evaluate toy --probe`), which leaves up_blocks.1 shared, and the 16 px
# input block given to the content LoRA or to the style LoRA (issue 16).
TABLES.update({
    "toy-probe": [
        (r"down_blocks\.1\.attentions\.0\.", "shared"),
        (r"down_blocks\.2\.attentions\.0\.", "content"),
        (r"mid_block\.attentions\.0\.", "content"),
        (r"up_blocks\.0\.attentions\.[01]\.", "style"),
        (r"up_blocks\.1\.attentions\.[01]\.", "shared"),
    ],
    "toy-content-down1": [
        (r"down_blocks\.1\.attentions\.0\.", "content"),
        (r"down_blocks\.2\.attentions\.0\.", "content"),
        (r"mid_block\.attentions\.0\.", "content"),
        (r"up_blocks\.[01]\.attentions\.\d+\.", "style"),
    ],
    "toy-style-down1": [
        (r"down_blocks\.1\.attentions\.0\.", "style"),
        (r"down_blocks\.2\.attentions\.0\.", "content"),
        (r"mid_block\.attentions\.0\.", "content"),
        (r"up_blocks\.[01]\.attentions\.\d+\.", "style"),
    ],
})

# What limits the style LoRA (issue 16): UnZipLoRA with one thing changed, each its own row (`--methods ablations`).
# Rows whose change was a fit setting since retired (config.RETIRED: fresh-columns, the alone steps, per-LoRA
# learning rates) run at the commit config.RETIRED_AT names; their figures stay in docs/toy-world.md.
ABLATIONS = [
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
]


# Issue 28's candidates for a split that holds: each one change from the paper's recipe (`--methods candidates`)
# (retired with their settings: owner, style-stage-25, window-8, down-ortho; see ABLATIONS)
CANDIDATES = [
    Method("lambda-0", "UnZipLoRA, no orthogonality loss (lambda 0)", "{table}", ortho=False),
    Method("class-free", "UnZipLoRA, style prompt names no subject", "{table}",
           overrides=(("style_prompt", f"An image in {STYLE} style"),)),
    # no new fits: UnZipLoRA's, recombined with the content LoRA on its own blocks only (generate's content_blocks)
    Method("recomb-content-own", "UnZipLoRA, recombined with the content LoRA on its own blocks", "{table}",
           fits_of="unziplora", recombine="own"),
    Method("style-down1-own", "UnZipLoRA, the 16 px input block the style LoRA's, recombined with the content "
           "LoRA on its own blocks", "{table}-style-down1", fits_of="style-down1", recombine="own"),
    # the portable way (both LoRA files under one prompt, as ComfyUI and A1111 load them), on UnZipLoRA's fits
    Method("direct", "UnZipLoRA, both LoRA files at weight 1 under one prompt", "{table}", fits_of="unziplora",
           mode="direct"),
    Method("direct-content-own", "UnZipLoRA, both LoRA files under one prompt, the content file's own blocks only",
           "{table}", fits_of="unziplora", mode="direct", recombine="own"),
    # lambda 0 cost set A 17 points of style: does a stronger orthogonality loss than the paper's 0.5 give more?
    Method("lambda-2", "UnZipLoRA, orthogonality loss weight 2 (the paper's: 0.5)", "{table}",
           overrides=(("ortho_lambda", 2.0),)),
    Method("lambda-2-own", "UnZipLoRA, orthogonality loss weight 2, recombined with the content LoRA on its own "
           "blocks", "{table}", fits_of="lambda-2", recombine="own"),
    Method("complementary", "UnZipLoRA, complementary mergers on columns both LoRAs hold", "{table}",
           patch="complementary"),
    Method("complementary-own", "UnZipLoRA, complementary mergers, recombined with the content LoRA on its own "
           "blocks", "{table}", fits_of="complementary", recombine="own"),
    Method("random-subject", "UnZipLoRA, the style prompt's subject word drawn at random each step", "{table}",
           patch="random-subject"),
    Method("importance-mergers", "UnZipLoRA, mergers of a newly shared column started from the importance scores",
           "{table}", patch="importance-mergers"),
    Method("saliency-ties", "UnZipLoRA, equal cone scores ranked by their saliency instead of column index",
           "{table}", patch="saliency-ties"),
    # no new fits: every fit's style LoRA was trained reading "A shape in zwx style"; recombined, it reads that
    # prompt again and may redraw its own image's shape. Here it reads one without the class word.
    Method("recomb-style-free", "UnZipLoRA, recombined with the content LoRA on its own blocks and the style LoRA "
           "reading a prompt without the class word", "{table}", fits_of="unziplora", recombine="own",
           style_prompt=f"An image in {STYLE} style"),
]


def fits_method(method: Method) -> Method:
    """The method whose fits `method` draws: itself, or the one it names in `fits_of`."""
    return next(m for m in METHODS + ABLATIONS + CANDIDATES if m.key == method.fits_of) if method.fits_of else method


def held_out_images(n: int, seed: int = HELD_OUT_SEED) -> world.Batch:
    """n images in which consecutive ones differ in both shape and style (so each has a recombination partner)."""
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


def fit_config(method: Method, base_table: str, args, factors: world.Factors, seed: int) -> FitConfig:
    table = method.role_table.format(table=base_table)
    if table not in TABLES:
        raise SystemExit(f"no role table {table!r} for this base model (unziplora/roles.py)")
    config = FitConfig(content=CONTENT, style=STYLE, base_model=args.model, steps=args.steps, rank=args.rank,
                       lr=args.lr, seed=seed, role_table=table, ortho_lambda=0.5 if method.ortho else 0.0,
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
    mode = method.mode or ("direct" if method.one_prompt else "routed")  # B-LoRA's: plain LoRAs on disjoint blocks
    both = recombined(content, style)
    return to_tensor(generate(base, content=content, style=style, prompt=prompt, mode=mode,
                              content_blocks=method.recombine if both else "all",
                              style_prompt=method.style_prompt if both else None, **call))


def own_hits(base, judges, method: Method, batch: world.Batch, i: int, own, call: dict) -> dict[str, list[float]]:
    """The judged hits (1.0 / 0.0 per image) of image i's fit `own` alone: each LoRA alone, and both together."""
    hits: dict[str, list[float]] = {}

    def add(name, values: torch.Tensor):
        hits.setdefault(name, []).extend(values.float().tolist())

    def alone(kind: str, names: tuple[str, ...], exclude: str, prompt):
        """One LoRA alone for every other value of `names`, all prompts in one batch (`num_images` each, in
        prompt order): the judged shapes and styles, and the index of the value each image was asked for."""
        others = [n for n in names if n != exclude]
        shapes, styles = judges.classify(draw(base, method, call=call, prompt=[prompt(o) for o in others],
                                              **{kind: own}))
        return shapes, styles, torch.tensor([names.index(o) for o in others]).repeat_interleave(call["num_images"])

    f = batch.factors[i]
    shape, style = batch.shapes[i].item(), batch.styles[i].item()
    shapes, styles, asked = alone("content", world.STYLE_NAMES, f.style,
                                  lambda o: f"A {CONTENT} in {world.STYLES[o]} style")
    add("content_acc", shapes == shape)
    add("content_style_leak", styles == style)
    add("content_follows_style", styles == asked)
    shapes, styles, asked = alone("style", world.SHAPE_NAMES, f.shape, lambda o: f"A {world.SHAPES[o]} in {STYLE} style")
    add("style_acc", styles == style)
    add("style_shape_leak", shapes == shape)
    add("style_follows_shape", shapes == asked)
    shapes, styles = judges.classify(draw(base, method, content=own, style=own, prompt=COMBINED, call=call))
    add("recon_both", (shapes == shape) & (styles == style))
    return hits


def recomb_hits(base, judges, method: Method, batch: world.Batch, i: int, own, partners: dict, call: dict
                ) -> dict[str, list[float]]:
    """Image i's content LoRA with the style LoRA of each partner image j (`partners`: j -> its fit, same fit
    seed), `num_images` each: is the shape i's and the style j's?"""
    hits: dict[str, list[float]] = {}
    shape = batch.shapes[i].item()
    for j, partner in partners.items():
        shapes, styles = judges.classify(draw(base, method, content=own, style=partner, prompt=COMBINED, call=call))
        style = batch.styles[j].item()
        for name, values in (("recomb_shape", shapes == shape), ("recomb_style", styles == style),
                             ("recomb_both", (shapes == shape) & (styles == style))):
            hits.setdefault(name, []).extend(values.float().tolist())
    return hits


def partners_of(i: int, batch: world.Batch, k: int) -> list[int]:
    """The images whose style image i's content meets: the first k after i (cyclically) that differ from it in
    both shape and style, so that a right answer is neither image's own. Consecutive images always differ in
    both (held_out_images), so every image of a set of two or more has at least one partner."""
    n = len(batch.factors)
    others = [(i + step) % n for step in range(1, n)]
    return [j for j in others if batch.shapes[j] != batch.shapes[i] and batch.styles[j] != batch.styles[i]][:k]


def finished_fit(folder: Path, config: FitConfig, image: Path, patch: str | None = None):
    """The fit in `folder` if it was made from `image` with `config` and `patch` (a re-run re-scores without
    fitting)."""
    try:
        saved = json.loads((folder / RECORD).read_text())["settings"]
        if (folder / "source.sha256").read_text() != hashlib.sha256(image.read_bytes()).hexdigest():
            return None
        if _read(folder / PATCH_FILE) != patch:
            return None
    except (OSError, ValueError, KeyError):
        return None
    wanted = {k: v for k, v in config.to_dict().items() if v is not None and k != "device"}
    # a fit made with a setting since retired is this code's fit only where the setting did nothing
    if not all(saved.get(k) == v for k, v in wanted.items()) or \
            any(saved.get(k, v) != v for k, v in RETIRED.items()):
        return None
    try:
        return load_fit(folder)
    except UnZipLoRAError:  # a fit this code cannot read (a setting since removed): fitted again
        return None


PATCH_FILE = "patch"  # beside a fit made under a patch: its name


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def unit_folder(out: Path, method: Method, image: int, seed: int, fits: bool = False) -> Path:
    """A unit's folder: its scores (and its fit, unless `fits` and the method draws another method's fits)."""
    return out / (method.fits_of if fits and method.fits_of else method.key) / f"{image:03d}-seed{seed}"


def fit_units(base, method: Method, batch: world.Batch, paths: list[Path], a, out: Path) -> dict:
    """Every (image, fit seed) fit of `method`: finished ones reused, the rest trained `a.fits_together` at a
    time in one batched pass (fit_many; each fit ends as it would alone)."""
    units = [(i, seed) for i in range(len(paths)) for seed in a.fit_seeds]
    fits, todo = {}, []
    fitter = fits_method(method)
    patch = fit_patches.PATCHES[fitter.patch] if fitter.patch else contextlib.nullcontext
    for i, seed in units:
        config = fit_config(fitter, base.role_table, a, batch.factors[i], seed)
        done = finished_fit(unit_folder(out, method, i, seed, fits=True), config, paths[i], fitter.patch)
        if done is None:
            todo.append((i, seed, config))
        else:
            fits[i, seed] = done
    for start in range(0, len(todo), a.fits_together):
        chunk = todo[start:start + a.fits_together]
        t = time.time()
        folders = [unit_folder(out, method, i, seed, fits=True) for i, seed, _ in chunk]
        with patch():
            results = fit_many([str(paths[i]) for i, _, _ in chunk], [c for _, _, c in chunk], base=base,
                               out_dirs=folders, overwrite=True, progress=False)
        for (i, seed, _), folder, result in zip(chunk, folders, results):
            if isinstance(result, Exception):
                raise result
            (folder / "source.sha256").write_text(hashlib.sha256(paths[i].read_bytes()).hexdigest())
            if fitter.patch:
                (folder / PATCH_FILE).write_text(fitter.patch)
            fits[i, seed] = load_fit(folder)
        print(f"  {method.key}: fitted {min(start + a.fits_together, len(todo))}/{len(todo)} "
              f"({(time.time() - t) / len(chunk):.0f} s per fit)", flush=True)
    return fits


def score_units(base, judges, method: Method, batch: world.Batch, fits: dict, a, out: Path) -> dict:
    """(image, fit seed) -> {metric: mean of its hits, "fit_s", "score_s"}. Each unit's hits are kept in its fit
    folder (`scores.json`) in two parts, each with what it depends on: the LoRAs alone (the sampling protocol
    and its own fit) and the recombinations (also the partners, their fits, and the recombination draws), so a
    re-run, another fit seed, another method or a change of one part re-scores only what changed."""
    call = dict(steps=a.sample_steps, guidance=a.guidance, seed=0, num_images=a.seeds, negative_prompt=a.negative_prompt)
    units = {}
    recipe = {} if method.recombine == "all" else {"content_blocks": method.recombine}
    recipe |= {"style_prompt": method.style_prompt} if method.style_prompt else {}
    drawing = {"mode": method.mode} if method.mode else {}  # how both LoRAs of a fit are drawn, where not the default
    for (i, seed), own in fits.items():
        partners = {j: fits[j, seed] for j in partners_of(i, batch, a.recomb_partners) if (j, seed) in fits}
        keys = dict(own=dict(call, fit=_digest(own), **drawing),
                    recomb=dict(call, num_images=a.recomb_seeds, fit=_digest(own), **recipe, **drawing,
                                partners={str(j): _digest(f) for j, f in partners.items()}))
        cache = unit_folder(out, method, i, seed) / "scores.json"
        saved = _upgraded(json.loads(cache.read_text())) if cache.is_file() else {}
        changed = False
        for part, key in keys.items():
            if saved.get(part, {}).get("key") == key:
                continue
            if part == "own" and method.fits_of:  # the LoRAs alone are drawn alike: the fits' method's hits
                theirs = unit_folder(out, method, i, seed, fits=True) / "scores.json"
                drawn = _upgraded(json.loads(theirs.read_text())).get("own", {}) if theirs.is_file() else {}
                if drawn.get("key") == key:
                    saved["own"], changed = drawn, True
                    continue
            t, changed = time.time(), True
            hits = (own_hits(base, judges, method, batch, i, own, call) if part == "own" else
                    recomb_hits(base, judges, method, batch, i, own, partners, dict(call, num_images=a.recomb_seeds)))
            saved[part] = dict(key=key, hits=hits, score_s=time.time() - t)
        if changed:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".scores.{os.getpid()}")
            tmp.write_text(json.dumps(saved))
            os.replace(tmp, cache)
        hits = saved["own"]["hits"] | saved["recomb"]["hits"]
        units[i, seed] = {name: float(np.mean(h)) for name, h in hits.items() if h} | {
            "fit_s": own.record["timings"]["total_s"],
            "score_s": saved["own"]["score_s"] + saved["recomb"]["score_s"]}
    return units


def _upgraded(saved: dict) -> dict:
    """A unit's scores.json as this code keeps it. Before the recombination had its own part (one partner,
    `num_images` draws), one key covered everything: its single-LoRA hits are still good under the "own" key."""
    if "key" not in saved:
        return saved
    key = {k: v for k, v in saved["key"].items() if k != "partner"}
    hits = {k: v for k, v in saved["hits"].items() if not k.startswith("recomb_")}
    return {"own": dict(key=key, hits=hits, score_s=saved["score_s"])}


def _digest(fit) -> str:
    return hashlib.sha256((fit.path / RECORD).read_bytes()).hexdigest()[:16]


COLUMNS = [  # (key, header, higher is better)
    ("content_acc", "content shape ↑", True), ("content_style_leak", "style leak ↓", False),
    ("style_acc", "style ↑", True), ("style_shape_leak", "shape leak ↓", False),
    ("recomb_both", "recombined ↑", True), ("recon_both", "reconstructed ↑", True),
]
METRICS = [k for k, _, _ in COLUMNS]
HIGHER = {k: h for k, _, h in COLUMNS}


def cell(stat) -> str:
    if stat is None:
        return "-"
    mean, low, high = stat
    return f"{100 * mean:.0f} % ({100 * low:.0f}-{100 * high:.0f})"


def table(rows: dict[str, dict], subset: str) -> str:
    """Markdown: per method, each metric's mean and 95 % interval over the `subset` ("all" or "reconstructable")."""
    lines = ["| method | " + " | ".join(h for _, h, _ in COLUMNS) + " | s/fit |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(r[subset][k]) for k in METRICS) + f" | {r['fit_s']:.0f} |")
    return "\n".join(lines)


def comparison_table(comparison: dict) -> str:
    lines = ["| metric | B - A, points (95 % interval) | B is | units |", "|---|---|---|---|"]
    for _, header, _ in COLUMNS:
        c = comparison[header_key(header)]
        if c["diff"] is None:
            lines.append(f"| {header} | - | {c['verdict']} | 0 |")
            continue
        lines.append(f"| {header} | {100 * c['diff']:+.0f} ({100 * c['low']:+.0f} to {100 * c['high']:+.0f}) "
                     f"| {c['verdict']} | {c['units']} |")
    return "\n".join(lines)


def header_key(header: str) -> str:
    return next(k for k, h, _ in COLUMNS if h == header)


SETS = {"A": HELD_OUT_SEED, "B": 7, "C": 2026}  # the image sets the docs report (by held-out seed)
REFERENCE = "dreambooth"  # whose reconstruction says which images the base can draw at all


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", help="the base model (its role table must have a -blora twin)")
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--set", choices=sorted(SETS), help=f"a named image set: {SETS} (default A)")
    p.add_argument("--held-out-seed", type=int, help="which held-out images: any other seed is another, "
                   "independent image set")
    p.add_argument("--fit-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="every method is fitted once per image and fit seed")
    p.add_argument("--seeds", type=int, default=2, help="sampling seeds: images per prompt")
    p.add_argument("--recomb-partners", type=int, default=3, help="each image's content LoRA meets the style LoRAs "
                   "of this many other images (each differing from it in shape and style)")
    p.add_argument("--recomb-seeds", type=int, default=4, help="sampling seeds: images per recombination")
    p.add_argument("--steps", type=int, default=600, help="fit steps")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, help="default: the base model's (2.0 for toy)")
    p.add_argument("--negative-prompt", help="default: none, as diffusers' pipe(prompt) draws (SDXL zeroes the "
                   "unconditional embedding); '' encodes an empty prompt instead")
    p.add_argument("--methods", default="all", help="comma-separated: 'all' (the methods), 'ablations', "
                   f"'candidates', or names from {[m.key for m in METHODS + ABLATIONS + CANDIDATES]}")
    p.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="paired comparison of two methods: B - A per metric with its 95 %% interval (repeatable; "
                   "both are fitted if needed)")
    p.add_argument("--fits-together", type=int, default=4, help="fits trained together in one batched pass")
    p.add_argument("--quick", action="store_true", help="development only, NOT a measurement: 2 images, 1 fit "
                   "seed, 100 steps, 1 sampling seed, 10 sampling steps (explicit flags still win)")
    p.add_argument("--out", help="default: out/disentangle-<set> (out/disentangle-quick with --quick)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--plot", help="also draw the tables as bars with their 95 %% intervals into this PNG")
    p.add_argument("--json", help="also write the rows and comparisons (not the units) as a result file, e.g. "
                   "docs/results/disentangle-A.json, whose numbers the docs cite")
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    a = p.parse_args(argv)
    if a.quick:
        for flag, value in (("images", 2), ("fit_seeds", [0]), ("steps", 100), ("seeds", 1), ("sample_steps", 10),
                            ("recomb_partners", 1), ("recomb_seeds", 1)):
            if f"--{flag.replace('_', '-')}" not in given:
                setattr(a, flag, value)
    if a.set and a.held_out_seed is not None:
        raise SystemExit("give --set or --held-out-seed, not both")
    a.held_out_seed = SETS[a.set or "A"] if a.held_out_seed is None else a.held_out_seed
    name = a.set or ("A" if a.held_out_seed == SETS["A"] else f"seed{a.held_out_seed}")
    a.out = a.out or ("out/disentangle-quick" if a.quick else f"out/disentangle-{name}")
    if min(a.images, a.seeds, a.fits_together, a.recomb_partners, a.recomb_seeds) < 1 or \
            len(set(a.fit_seeds)) != len(a.fit_seeds):
        raise SystemExit("--images, --seeds, --recomb-partners, --recomb-seeds and --fits-together must be >= 1, "
                         "and --fit-seeds distinct")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    diffusers_logging.set_verbosity_error()  # not one "no LoRA keys for the text encoder" line per image
    groups = {"all": METHODS, "ablations": ABLATIONS, "candidates": CANDIDATES}
    known = {m.key: m for m in METHODS + ABLATIONS + CANDIDATES}
    names = a.methods.split(",") + [k for pair in a.compare for k in pair]
    unknown = [n for n in names if n not in known and n not in groups]
    if unknown:
        raise SystemExit(f"no such method {unknown}; choose from {list(groups) + list(known)}")
    # the reference comes first: its fits say which images are reconstructable at all
    chosen = list({m.key: m for n in [REFERENCE, *names] for m in groups.get(n, [known.get(n)])}.values())
    if a.quick:
        print("QUICK MODE: a plumbing check with too few images, fit seeds and steps; NOT a measurement", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_base_model(a.model, device="cpu" if not torch.cuda.is_available() else "auto")
    a.guidance = base.guidance if a.guidance is None else a.guidance
    judges = judges_mod.load_judges()
    batch = held_out_images(a.images, a.held_out_seed)
    print(f"{a.images} held-out images (seed {a.held_out_seed}) x fit seeds {a.fit_seeds}: "
          + ", ".join(f.prompt for f in batch.factors), flush=True)
    paths = [write_image(image, out / "images" / f"{i:03d}.png") for i, image in enumerate(batch.images)]
    images = list(range(a.images))
    units, started = {}, time.time()
    for method in chosen:
        t = time.time()
        fits = fit_units(base, method, batch, paths, a, out)
        units[method.key] = score_units(base, judges, method, batch, fits, a, out)
        cost = sum(u["fit_s"] + u["score_s"] for u in units[method.key].values())
        print(f"{method.name}: {len(fits)} fits; row cost {cost / 60:.1f} CPU-min "
              f"({time.time() - t:.0f} s now, {time.time() - started:.0f} s so far)", flush=True)
    reference = units[REFERENCE]
    recon = {i: np.mean([reference[i, s]["recon_both"] for s in a.fit_seeds]) for i in images}
    drawable = [i for i in images if recon[i] >= 0.5]
    subsets = {"all": images, "reconstructable": drawable}
    print(f"reconstructable (the whole-image DreamBooth LoRA redraws it under its own prompt in >= half of its "
          f"samples): {len(drawable)} of {len(images)}; not: "
          + (", ".join(f"{batch.factors[i].prompt} ({100 * recon[i]:.0f} %)" for i in images if i not in drawable)
             or "none"), flush=True)
    rows = {}
    for method in chosen:
        u = units[method.key]
        rows[method.name] = {name: stats.summarize(u, METRICS, subset, a.fit_seeds) for name, subset in
                             subsets.items()} | {"fit_s": float(np.mean([x["fit_s"] for x in u.values()])),
                                                 "cost_cpu_min": sum(x["fit_s"] + x["score_s"] for x in u.values()) / 60}
        (out / method.key / "scores.json").write_text(json.dumps(dict(
            settings=protocol(a), summary=rows[method.name],
            units={f"{i:03d}-seed{s}": v for (i, s), v in sorted(u.items())}), indent=1))
    comparisons = {}
    for ka, kb in a.compare:
        comparisons[f"{kb} - {ka}"] = {name: stats.compare(units[ka], units[kb], HIGHER, subset, a.fit_seeds)
                                       for name, subset in subsets.items()}
    label = "QUICK, not a measurement: " if a.quick else ""
    title = (f"{label}{base.name} base, {a.images} images (seed {a.held_out_seed}) x fit seeds "
             f"{','.join(map(str, a.fit_seeds))} x {a.seeds} sampling seeds (recombination: {a.recomb_partners} "
             f"partners x {a.recomb_seeds})")
    report = dict(settings=vars(a) | {"quick": a.quick}, title=title, base_model=base.name,
                  role_table=base.role_table, images=[asdict(f) for f in batch.factors],
                  reconstructable=drawable, reference_reconstruction={i: recon[i] for i in images},
                  results=rows, comparisons=comparisons,
                  units={m: {f"{i:03d}-seed{s}": v for (i, s), v in sorted(u.items())} for m, u in units.items()})
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"\n{title}; mean (95 % interval), bootstrap over images x fit seeds\n\nall {len(images)} images:\n"
          + table(rows, "all") + f"\n\nthe {len(drawable)} reconstructable images:\n" + table(rows, "reconstructable"))
    for name, c in comparisons.items():
        for subset in subsets:
            print(f"\n{name} ({subset} images):\n" + comparison_table(c[subset]))
    if a.plot:
        plot(rows, a.plot, title, {name: len(s) for name, s in subsets.items()})
    if a.json:
        import results as result_files  # beside this file

        # rows by method key (`unziplora.all.style_acc.0`: the mean; .1, .2: the interval)
        result_files.save(a.json, {k: v for k, v in report.items() if k not in ("units", "results")} | {
            "methods": {m.key: m.name for m in chosen}, "rows": {m.key: rows[m.name] for m in chosen}})
    return report


def protocol(a) -> dict:
    """What a row's numbers depend on, besides the method."""
    return {k: vars(a)[k] for k in ("model", "images", "held_out_seed", "fit_seeds", "seeds", "recomb_partners",
                                    "recomb_seeds", "steps", "rank", "lr", "sample_steps", "guidance",
                                    "negative_prompt", "quick")}


def plot(rows: dict, path: str, title: str, sizes: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(12, 4.6), dpi=100, sharey=True)
    width = 0.8 / len(rows)
    colours = plt.get_cmap("tab20").colors  # one colour per row (the default cycle repeats after 10)
    for axes, (subset, size) in zip(panels, sizes.items()):
        for i, (name, row) in enumerate(rows.items()):
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(METRICS))]
            stat = [row[subset][k] or (np.nan,) * 3 for k in METRICS]
            means, lows, highs = (np.array(column, dtype=float) * 100 for column in zip(*stat))
            axes.bar(xs, np.nan_to_num(means), width, label=name, color=colours[i % len(colours)],
                     yerr=np.nan_to_num([means - lows, highs - means]), capsize=1.5, error_kw=dict(lw=0.7))
        axes.set_xticks(range(len(METRICS)), [h.replace(" ", "\n") for _, h, _ in COLUMNS], fontsize=8)
        axes.set_title(f"{subset} images ({size})", fontsize=9)
        axes.set_ylim(0, 100)
        axes.grid(axis="y", alpha=0.3)
    panels[0].set_ylabel("% of judged images (95 % interval)")
    figure.suptitle(title, fontsize=9)
    handles, labels = panels[0].get_legend_handles_labels()
    figure.tight_layout(rect=(0, 0.12, 1, 1))  # room below for the legend, none between the panels
    figure.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
