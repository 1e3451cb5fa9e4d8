"""`unziplora rescore LIBRARY`: redraw a library's previews and scores with today's protocol, without fitting."""

from __future__ import annotations

import argparse
import json

from pipeline.run.spec import Failure, add_flags, from_flags
from unziplora.config import check_number


def add_commands(sub) -> None:
    p = sub.add_parser("rescore", help="redraw the previews and quality scores of a library's fits with today's "
                       "protocol and scorer, without fitting again (the LoRA files are not touched)")
    p.add_argument("library", help="the library (the --output of decompose)")
    p.add_argument("--preview-steps", type=int, default=8, help="sampling steps of the previews (as decompose)")
    p.add_argument("--scorer", default="auto", help="as decompose --scorer: auto (the toy world's judges on toy, "
                   "else none) | none | toy | clip:/local/dir | package.module:factory")
    p.add_argument("--preview-subjects", type=_words, default=None, metavar="A,B,C")
    p.add_argument("--preview-styles", type=_words, default=None, metavar="A,B,C")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    add_flags(p, Failure, prefix=None, names=("wait_for_library_s",))  # --wait-for-library, as decompose's
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def run(args: argparse.Namespace) -> int:
    check_number("--preview-steps", args.preview_steps, integer=True, minimum=1)
    from_flags(args, Failure, prefix=None, names=("wait_for_library_s",)).check()
    from pipeline.quality.rescore import rescore_library

    report = rescore_library(args.library, storage_options=args.storage_options, steps=args.preview_steps,
                             scorer=args.scorer, subjects=args.preview_subjects, styles=args.preview_styles,
                             wait_s=args.wait_for_library, progress=not args.quiet)
    print(json.dumps(report, indent=1))
    return 3 if report["failed"] else 0
