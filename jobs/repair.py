"""`unziplora repair LIBRARY [--dry-run]`: rebuild a manifest part that cannot be read from the library's records."""

from __future__ import annotations

import argparse
import json

from pipeline.run.spec import Failure, add_flags, add_storage_options, from_flags


def add_commands(sub) -> None:
    p = sub.add_parser("repair", help="rebuild a library's manifest from its records (sources/, markers): after "
                       "a manifest part was truncated or lost")
    p.add_argument("library", help="the library (the --output of decompose)")
    p.add_argument("--dry-run", action="store_true", help="say what would be rebuilt, change nothing")
    add_storage_options(p)
    add_flags(p, Failure, prefix=None, names=("wait_for_library_s",))  # --wait-for-library, as decompose's
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from_flags(args, Failure, prefix=None, names=("wait_for_library_s",)).check()
    from pipeline.store.repair import repair_manifest

    print(json.dumps(repair_manifest(args.library, storage_options=args.storage_options, dry_run=args.dry_run,
                                     wait_s=args.wait_for_library), indent=1))
    return 0
