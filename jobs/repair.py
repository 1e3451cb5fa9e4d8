"""`unziplora repair LIBRARY [--dry-run]`: rebuild a manifest part that cannot be read from the library's records."""

from __future__ import annotations

import argparse
import json

from unziplora.config import check_number


def add_commands(sub) -> None:
    p = sub.add_parser("repair", help="rebuild a library's manifest from its records (sources/, markers): after "
                       "a manifest part was truncated or lost")
    p.add_argument("library", help="the library (the --output of decompose)")
    p.add_argument("--dry-run", action="store_true", help="say what would be rebuilt, change nothing")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    p.add_argument("--wait-for-library", type=float, default=0.0, metavar="SECONDS",
                   help="if a job is writing the library, wait up to this long for it")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_number("--wait-for-library", args.wait_for_library, minimum=0)
    from pipeline.store.repair import repair_manifest

    print(json.dumps(repair_manifest(args.library, storage_options=args.storage_options, dry_run=args.dry_run,
                                     wait_s=args.wait_for_library), indent=1))
    return 0
