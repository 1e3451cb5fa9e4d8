"""`unziplora fit` and `unziplora generate`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from .config import FitConfig, read_settings_file
from .errors import UnZipLoRAError

# CLI flag -> FitConfig field, with type and help; every field can also come from --config.
FIT_FLAGS = {
    "content": (str, "content trigger, e.g. 'sks dog'"),
    "style": (str, "style description, e.g. 'watercolor painting'"),
    "class_word": (str, "class word for the style prompt (default: the trigger without its first word)"),
    "prompt": (str, "combined prompt (default 'A {content} in {style} style')"),
    "content_prompt": (str, "content prompt (default 'A {content}')"),
    "style_prompt": (str, "style prompt (default 'A {class word} in {style} style')"),
    "base_model": (str, "tiny | sdxl-random | a diffusers SDXL directory | a hub id (default tiny)"),
    "steps": (int, "training steps (600)"),
    "rank": (int, "LoRA rank (64)"),
    "resolution": (int, "training resolution (default: the base model's, 1024 for SDXL)"),
    "seed": (int, "random seed (0)"),
    "lr": (float, "learning rate of both LoRAs (default: 5e-5, SPEC's for SDXL; 1e-3 for toy)"),
    "merger_lr": (float, "learning rate of the column mergers (5e-3)"),
    "weight_decay": (float, "AdamW weight decay (1e-4)"),
    "grad_clip": (float, "gradient-norm clip (1.0)"),
    "column_ratio": (float, "fraction of columns added per recalibration (0.1)"),
    "recalibrations": (int, "number of mask recalibrations (3)"),
    "ortho_lambda": (float, "weight of the orthogonality loss (0.5)"),
    "init": (str, "LoRA init: reference | zeros"),
    "role_table": (str, "block-role table (default: the base model's)"),
    "precision": (str, "UNet precision on GPU: bf16 | fp16 | fp32 (CPU always fp32)"),
    "save_precision": (str, "dtype of the saved LoRA files: fp16 | bf16 | fp32"),
    "device": (str, "auto | cpu | cuda | cuda:N"),
}


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    _quiet_libraries()
    try:
        return args.run(args)
    except UnZipLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


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
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="trade compute for memory (SDXL in 24 GB)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, (kind, text) in FIT_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)
    p.set_defaults(run=_fit)

    g = sub.add_parser("generate", help="make images from fits: content, style, combined, recombined")
    g.add_argument("fit_dir", nargs="?", help="a fit directory: its content AND style (combined)")
    g.add_argument("--content-from", help="fit directory whose content LoRA to use")
    g.add_argument("--style-from", help="fit directory whose style LoRA to use")
    g.add_argument("--mode", default="routed", choices=("routed", "direct"),
                   help="with both LoRAs: three-prompt routing with mergers (routed) or plain addition (direct)")
    g.add_argument("--prompt", help="prompt (default: the fit's content, style or combined prompt)")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--out", required=True, help="PNG path; with --num-images > 1, a suffix _N is added")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--steps", type=int, default=50, help="sampling steps (50)")
    g.add_argument("--guidance", type=float,
                   help="classifier-free guidance (default: the base model's; 5.0 for SDXL, 2.5 for toy)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resolution", type=int, help="default: the fit's training resolution")
    g.add_argument("--base-model", help="default: the fit's base model")
    g.add_argument("--device", default="auto")
    g.add_argument("--precision", default="bf16")
    g.set_defaults(run=_generate)


def _fit(args) -> int:
    from .training import fit

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = read_settings_file(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in FIT_FLAGS if getattr(args, name) is not None}
    if args.gradient_checkpointing is not None:
        flags["gradient_checkpointing"] = True
    missing = [n for n in ("content", "style") if n not in settings and n not in flags]
    if missing:
        raise SystemExit(f"unziplora fit: give --{' and --'.join(missing)} (or put them in --config)")
    config = FitConfig.from_dict({**settings, **flags})
    result = fit(args.image, config, out_dir=args.out, overwrite=args.overwrite, progress=not args.quiet)
    summary = {"out": str(result.out_dir), **result.record["final"], "train_s": result.record["timings"]["train_s"]}
    print(json.dumps(summary))
    return 0


def _generate(args) -> int:
    from .export import load_fit
    from .generate import generate
    from .models import load_base_model

    content = load_fit(args.content_from or args.fit_dir) if (args.content_from or args.fit_dir) else None
    style = load_fit(args.style_from or args.fit_dir) if (args.style_from or args.fit_dir) else None
    if content is None and style is None:
        raise SystemExit("unziplora generate: give FIT_DIR, --content-from or --style-from")
    first = content or style
    base = load_base_model(args.base_model or first.config.base_model, device=args.device, precision=args.precision)
    images = generate(base, content=content, style=style, prompt=args.prompt, mode=args.mode,
                      negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                      seed=args.seed, resolution=args.resolution, num_images=args.num_images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    print(json.dumps({"images": [str(p) for p in paths]}))
    return 0


def _quiet_libraries() -> None:
    """Keep the terminal for our own progress and errors."""
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
