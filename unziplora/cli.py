"""`unziplora fit` and `unziplora generate`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .config import LORA_FORMATS, FitConfig, check_formats, check_number, read_settings_file, settings, value_type
from .errors import InputError, UnZipLoRAError
from .quiet import quiet_libraries
from .redact import scrub

def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    quiet_libraries()
    try:
        return args.run(args)
    except UnZipLoRAError as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a store that went away: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {scrub(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unziplora", description="Decompose one image into a content LoRA "
                                     "and a style LoRA for SDXL (UnZipLoRA).")
    add_commands(parser.add_subparsers(required=True, metavar="COMMAND"))
    return parser


def add_commands(sub) -> None:
    """Add `fit` and `generate` to a subparsers object (the `unziplora` command adds dataset commands)."""
    p = sub.add_parser("fit", help="train the content and style LoRAs of one image")
    p.add_argument("image", help="the stylized image")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--config", help="YAML or TOML file with any of the settings below; flags win")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # --formats, and the dataset job's quality gate on one image: decompose's flags (pipeline/run/spec.py)
    from pipeline.run.spec import Gate, JobSpec, Previews, add_flags

    add_flags(p, JobSpec, prefix=None, names=("lora_formats",))

    q = p.add_argument_group("quality control: several candidate fits, the best split kept (docs/collection.md)")
    add_flags(q, Gate, prefix=None)  # --candidates, --max-candidates, --min-split-score
    add_flags(q, Previews, prefix=None, names=("scorer",))
    # the job's --preview-steps (its gate scores the panels drawn with them), under a name of its own here: fit
    # draws no previews, and needs at least 1 step to score the candidates
    q.add_argument("--gate-steps", type=int, default=Previews().steps,
                   help="sampling steps of each candidate's scored panels")
    add_setting_flags(p, settings(), "fit settings (also keys of a --config file; flags win)")
    p.set_defaults(run=_fit)

    e = sub.add_parser("export", help="write a fit's LoRAs in another format (kohya or diffusers)")
    e.add_argument("fit_dir", metavar="ITEM", help="a fit directory (with `--bank LIBRARY`: an item id of it)")
    e.add_argument("--format", required=True, choices=LORA_FORMATS)
    e.add_argument("--kind", choices=("content", "style", "both"), default="both")
    e.add_argument("--out", help="folder to write {kind}_lora_{format}.safetensors into (default: the fit's)")
    e.set_defaults(run=_export)

    g = sub.add_parser("generate", help="make images from fits: content, style, combined, recombined")
    g.add_argument("fit_dir", nargs="?", help="a fit directory: its content AND style (combined)")
    g.add_argument("--content-from", help="fit directory whose content LoRA to use")
    g.add_argument("--style-from", help="fit directory whose style LoRA to use")
    g.add_argument("--mode", default="routed", choices=("routed", "direct"),
                   help="with both LoRAs: three-prompt routing with mergers (routed) or plain addition (direct)")
    g.add_argument("--content-blocks", default="auto", choices=("auto", "all", "own"),
                   help="with both LoRAs: where the content LoRA acts: only in its own blocks, not its sparse columns "
                   "in the style and shared ones (own), or every block it was fitted on (all, the paper's); auto "
                   "(default): own when recombining two fits in the routed mode, else all (docs/one-image.md)")
    g.add_argument("--prompt", help="prompt (default: the fit's content, style or combined prompt)")
    g.add_argument("--negative-prompt",
                   help="default: none (SDXL zeroes the unconditional embedding, as diffusers' pipe(prompt) does)")
    g.add_argument("--out", required=True, help="PNG path; with --num-images > 1, a suffix _N is added")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--steps", type=int, default=50, help="sampling steps (50)")
    g.add_argument("--guidance", type=float,
                   help="classifier-free guidance (default: the base model's; 5.0 for SDXL, 2.0 for toy)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resolution", type=int, help="default: the fit's training resolution")
    g.add_argument("--base-model", help="default: the fit's base model")
    g.add_argument("--device", default="auto")
    g.add_argument("--precision", default="bf16")
    g.add_argument("--threads", type=int, help=THREADS_HELP)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(run=_generate)


THREADS_HELP = ("CPU threads for torch (default: the cores no other process keeps busy, at least 1, at most "
                "torch's default; docs/one-image.md#threads)")


def default_threads(cores: int | None = None, load: float | None = None, most: int | None = None) -> int:
    """Torch threads for a command run on this machine: the cores that other processes leave free (the cores this
    process may use minus the 1-minute load average, rounded), at least 1, at most `most` (torch's own default,
    one per physical core). Torch's default takes every core even when others are busy, and its threads then
    wait on each other at every op: on this project's 2-core machine with 2 other busy processes a `toy` fit
    step took 0.67-0.77 s with 2 threads, 0.11-0.16 s with 1 (docs/one-image.md#threads). A machine nobody
    else uses gets torch's default, which larger models (SDXL on a CPU) need."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, round(cores - load))
    return min(free, most) if most else free


def set_threads(threads: int | None, say: str | None = None) -> int:
    """Set torch's threads: `threads` (--threads), else default_threads(). With `say` (the command's name), one
    line on stderr names the count, so that the cause of a slow run is visible."""
    import torch

    chosen = threads or default_threads(most=torch.get_num_threads())
    torch.set_num_threads(chosen)
    if say:
        how = "--threads" if threads else "the cores other processes leave free; --threads N to choose"
        print(f"unziplora {say}: {chosen} torch thread{'s' if chosen > 1 else ''} ({how})", file=sys.stderr)
    return chosen


def _fit(args) -> int:
    check_number("--threads", args.threads, integer=True, minimum=1, optional=True)
    from_file = read_settings_file(args.config) if args.config else {}
    flags = setting_values(args, settings())
    missing = [n for n in ("content", "style") if n not in from_file and n not in flags]
    if missing:
        raise InputError(f"give --{' and --'.join(missing)} (or the same keys in a --config file)")
    config = FitConfig.from_dict({**from_file, **flags})
    from pipeline.run.spec import Gate, from_flags

    gate = from_flags(args, Gate, prefix=None)
    gate.check()  # every fit: a bad gate flag or format answers before torch is imported
    check_formats(args.formats)
    from .training import fit  # torch and diffusers: seconds, so only once the arguments are known to be good

    set_threads(args.threads, say=None if args.quiet else "fit")
    if gate.active:
        result = _fit_candidates(args, config, gate)
    else:
        result = fit(args.image, config, out_dir=args.out, overwrite=args.overwrite, progress=not args.quiet,
                     formats=args.formats)
    summary = {"out": str(result.out_dir), **result.record["final"], "train_s": result.record["timings"]["train_s"]}
    if "gate" in result.record:
        gate = result.record["gate"]
        summary |= {"seed": gate["chosen_seed"], "split_score": gate["split_score"], "gate_passed": gate["passed"],
                    "candidates": {c["seed"]: c.get("split_score", c.get("error")) if "stopped_at_step" not in c else
                                   {k: c.get(k) for k in ("stopped_at_step", "early_split_score")}
                                   for c in gate["candidates"]}}
    print(json.dumps(summary), flush=True)
    if not args.quiet:
        print(fit_next_steps(args.image, result.out_dir, result.record), file=sys.stderr)
    return 0


def _fit_candidates(args, config: FitConfig, gate):
    """`fit --candidates N`: the dataset job's quality gate (pipeline/quality/gate.py) on one image."""
    import shutil
    import tempfile

    from pipeline.quality.gate import fit_gated
    from pipeline.quality.scoring import load_scorer, scorer_spec

    from .export import check_output_dir
    from .models import load_base_model_for

    check_number("--gate-steps", args.gate_steps, integer=True, minimum=1)
    spec = scorer_spec(args.scorer, config.base_model)
    if spec is None:
        raise InputError(f"--candidates needs a scorer to choose among them (--scorer; on {config.base_model} "
                         "'auto' has none)")
    scorer = load_scorer(spec)  # refused before the base model loads; `base` is made of it, below
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    image = Path(args.image).read_bytes()
    base = load_base_model_for(config)
    scorer = scorer or load_scorer(spec, base)
    with tempfile.TemporaryDirectory(prefix="unziplora-candidates-") as work:
        staged = Path(work) / "chosen"
        [result] = fit_gated([image], [config], base=base, gate=gate, scorer=scorer, out_dirs=[staged],
                             workdir=Path(work) / "all", steps=args.gate_steps, formats=args.formats,
                             progress=not args.quiet)
        if isinstance(result, Exception):
            raise result
        if out.exists():  # --overwrite (checked above)
            shutil.rmtree(out)
        shutil.move(staged, out)
    result.out_dir = out
    return result


def _export(args) -> int:
    from .export import export_lora, load_fit

    fit = load_fit(args.fit_dir)
    kinds = ("content", "style") if args.kind == "both" else (args.kind,)
    paths = [export_lora(fit, kind, args.format, args.out or fit.path) for kind in kinds]
    print(json.dumps({"files": [str(p) for p in paths]}))
    return 0


def fit_next_steps(image, out_dir, record: dict) -> str:
    """After a fit, for a person: the resolution it trained at when the image had another size, and the
    `generate` commands that show the two LoRAs."""
    import shlex

    from PIL import Image

    lines = []
    resolution = record["settings"].get("resolution")
    try:
        with Image.open(image) as im:
            width, height = im.size
        if resolution and min(width, height) != resolution:
            lines.append(f"unziplora fit: trained at {resolution} px on the shorter side (the base model's, or "
                         f"--resolution), from a {width}x{height} image")
    except (OSError, ValueError):  # a URL or stream: no size to compare
        pass
    out, style_prompt = shlex.quote(str(out_dir)), record["prompts"]["style"]
    lines += ["next:",
              f"  unziplora generate {out} --out combined.png                 # content and style together",
              f"  unziplora generate --content-from {out} --out content.png   # the subject alone",
              f"  unziplora generate --style-from {out} --prompt {shlex.quote(style_prompt)} --out style.png",
              "  (another subject in the style prompt shows the style alone; --content-from A --style-from B "
              "recombines two fits)"]
    return "\n".join(lines)


def add_setting_flags(parser: argparse.ArgumentParser, fields, title: str) -> None:
    """One flag per FitConfig field (`--rank`, `--gradient-checkpointing/--no-gradient-checkpointing`), typed
    and documented by the field itself; unset flags stay None, so a --config file or the defaults apply."""
    group = parser.add_argument_group(title)
    for f in fields:
        kind, _ = value_type(f)
        default = "" if f.default in (None, dataclasses.MISSING) or kind is bool else f" (default {f.default})"
        flag = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                           choices=f.metadata["choices"], help=f.metadata["help"] + default, **flag)


def setting_values(args: argparse.Namespace, fields) -> dict:
    """The settings given as flags."""
    return {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}


def _generate(args) -> int:
    check_number("--steps", args.steps, integer=True, minimum=1)
    check_number("--num-images", args.num_images, integer=True, minimum=1)
    check_number("--resolution", args.resolution, integer=True, minimum=1, optional=True)
    check_number("--guidance", args.guidance, optional=True)
    check_number("--threads", args.threads, integer=True, minimum=1, optional=True)
    if not (args.content_from or args.style_from or args.fit_dir):
        raise InputError("give FIT_DIR, --content-from or --style-from")
    both = bool(args.fit_dir or (args.content_from and args.style_from))
    if args.content_blocks == "own" and not both:
        raise InputError("--content-blocks own limits the content LoRA beside a style LoRA: give both (FIT_DIR, or "
                         "--content-from and --style-from)")
    from .export import load_fit
    from .generate import check_same_base, generate
    from .models import load_base_model_for

    set_threads(args.threads)  # silent: an error of generate's is one line on stderr
    content = load_fit(args.content_from or args.fit_dir) if (args.content_from or args.fit_dir) else None
    style = load_fit(args.style_from or args.fit_dir) if (args.style_from or args.fit_dir) else None
    check_same_base(content, style)  # before a base model is loaded
    first = content or style
    # the fit's own base model (a hub model at the commit it was fitted on), unless told otherwise
    overrides = {"spec": args.base_model, "revision": None, "variant": None, "config": None} if args.base_model else {}
    base = load_base_model_for(first.config, device=args.device, precision=args.precision, **overrides)
    images = generate(base, content=content, style=style, prompt=args.prompt, mode=args.mode,
                      negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                      seed=args.seed, resolution=args.resolution, num_images=args.num_images,
                      content_blocks=args.content_blocks, progress=not args.quiet)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    print(json.dumps({"images": [str(p) for p in paths]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
