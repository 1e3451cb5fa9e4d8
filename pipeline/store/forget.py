"""Remove sources from a library's manifest, on purpose: a library accumulates the rows of every source any
job fed it, and a job over one folder never drops another folder's rows (`unziplora forget`).

The rows go (and their `sources/` records); the fits stay under `items/` and in the registry: another source
may share an item, and a fit is cheap to keep and dear to redo.
"""

from __future__ import annotations

import time

import fsspec

from unziplora.errors import InputError

from .lease import LibraryLease
from .manifest import manifest_rows, source_key, write_manifest
from .storage import Store, library_store, require_library


def forget_sources(output: str, prefixes: list[str], *, missing: bool = False, storage_options: dict | None = None,
                   dry_run: bool = False, wait_s: float = 0.0) -> dict:
    """Drop the rows whose source lies under one of `prefixes` (a folder, a URL prefix or one file), and with
    `missing` those whose source file no longer exists. Returns counts and the first names. A path that is no
    library, or a prefix that names no source of it, is refused before anything changes (or is created)."""
    options = storage_options or {}
    store = library_store(output, options)
    require_library(store)
    folders = [Store(p, options).url().rstrip("/") for p in prefixes]
    run_id = "forget-" + time.strftime("%Y%m%dT%H%M%S")
    with LibraryLease(store, run_id).acquire(wait_s) as lease:
        rows = manifest_rows(store.url(), options)
        unknown = [p for p, f in zip(prefixes, folders) if not any(_under(r["source_uri"], [f]) for r in rows)]
        if unknown:
            example = f" (its sources look like {rows[0]['source_uri']})" if rows else ""
            raise InputError(f"{', '.join(unknown)} names no source of {store.url()}: nothing forgotten{example}")
        dropped = [r for r in rows if _under(r["source_uri"], folders) or (missing and not _exists(r, options))]
        gone = {r["source_uri"] for r in dropped}
        if dropped and not dry_run:
            lease.check()
            write_manifest(store, [r for r in rows if r["source_uri"] not in gone], run_id, previous=rows)
            for uri in sorted(gone):
                if store.exists(*source_key(uri)):
                    store.remove(store.path(*source_key(uri)))
    return {"library": store.url(), "removed": len(dropped), "kept": len(rows) - len(dropped),
            "dry_run": dry_run, "sources": sorted(gone)[:100]}


def _under(uri: str, folders: list[str]) -> bool:
    return any(uri == f or uri.startswith(f + "/") for f in folders)


def _exists(row: dict, options: dict) -> bool:
    fs, path = fsspec.core.url_to_fs(row["source_uri"], **options)
    return fs.exists(path)
