"""`unziplora forget LIBRARY [PREFIX ...] [--missing]`: remove sources from a library's manifest on purpose."""

from __future__ import annotations

import argparse
import json

from pipeline.run.spec import Failure, add_flags, add_storage_options, from_flags
from unziplora.errors import InputError


def add_commands(sub) -> None:
    p = sub.add_parser("forget", help="remove sources from a library's manifest (its fits are kept)")
    p.add_argument("library", help="the library (the --output of decompose)")
    p.add_argument("prefixes", nargs="*", metavar="PREFIX", help="input folders, URL prefixes or files to forget")
    p.add_argument("--missing", action="store_true", help="also forget sources whose file no longer exists")
    p.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")
    add_storage_options(p)
    add_flags(p, Failure, prefix=None, names=("wait_for_library_s",))  # --wait-for-library, as decompose's
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from_flags(args, Failure, prefix=None, names=("wait_for_library_s",)).check()
    if not args.prefixes and not args.missing:
        raise InputError("name the sources to forget (PREFIX ...) or give --missing")
    from pipeline.store.forget import forget_sources

    print(json.dumps(forget_sources(args.library, args.prefixes, missing=args.missing, dry_run=args.dry_run,
                                    storage_options=args.storage_options, wait_s=args.wait_for_library)))
    return 0
