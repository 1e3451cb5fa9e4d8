"""`unziplora rescore LIBRARY`: redraw a library's previews and scores with today's protocol, without fitting."""

from __future__ import annotations

import argparse
import json

from pipeline.run.spec import Failure, Previews, add_flags, add_storage_options, check_options, from_flags
from unziplora.config import check_number


def add_commands(sub) -> None:
    p = sub.add_parser("rescore", help="redraw the previews and quality scores of a library's fits with today's "
                       "protocol and scorer, without fitting again (the LoRA files are not touched)")
    p.add_argument("library", help="the library (the --output of decompose)")
    # --preview-steps, --preview-subjects, --preview-styles, --scorer: decompose's (0 steps, no previews, is not
    # a rescore)
    add_flags(p, Previews, prefix=None, helps={"steps": "sampling steps of the redrawn content/style previews "
                                                        "(>= 1)"})
    add_storage_options(p)
    add_flags(p, Failure, prefix=None, names=("wait_for_library_s",))  # --wait-for-library, as decompose's
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    previews = from_flags(args, Previews, prefix=None)
    check_options(previews)
    check_number("--preview-steps", previews.steps, integer=True, minimum=1)  # 0 (no previews): nothing to rescore
    from_flags(args, Failure, prefix=None, names=("wait_for_library_s",)).check()
    from pipeline.quality.rescore import rescore_library

    report = rescore_library(args.library, storage_options=args.storage_options, steps=previews.steps,
                             scorer=previews.scorer, subjects=previews.subjects, styles=previews.styles,
                             wait_s=args.wait_for_library, progress=not args.quiet)
    print(json.dumps(report, indent=1))
    return 3 if report["failed"] else 0
