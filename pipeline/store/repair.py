"""Rebuild a library's manifest from its own records (`unziplora repair LIBRARY`).

The manifest is derived data: every source's latest row is also kept under `sources/` (written by the worker,
or by the driver for an image that failed before fitting), and every fit's marker vouches for its files. So a
manifest part that cannot be read (truncated by a full disk or a killed copy, say) loses nothing that cannot be
rebuilt: the readable parts' rows stay as they are, and the rows of every source missing from them come back
from `sources/`. A recovered `ok` row whose files do not all hold (missing, or of another size) is recovered
as failed, so that the next run fits its image again. What `sources/` never held comes back with the next run
of its job: the `skipped` rows of duplicates and the listing stamps (those images are read once more).
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from unziplora.errors import InputError

from . import layout
from .lease import LibraryLease
from .manifest import (FIELDS, SCHEMA, SCHEMA_VERSION, ManifestPartError, _part_paths, _read_part, check_item_id,
                       failed_row, marker_problems, write_manifest)
from .storage import library_store, url_key


def repair_manifest(output: str, *, storage_options: dict | None = None, dry_run: bool = False,
                    wait_s: float = 0.0) -> dict:
    """Make the manifest readable and whole again, under the library's lease; returns what was done."""
    store = library_store(output, storage_options)
    if not store.list(layout.MANIFEST) and not store.list(layout.SOURCES):
        raise InputError(f"{store.url()} holds no manifest and no source records: not a library (the --output "
                         "of decompose), or no job has written one yet")
    run_id = "repair-" + time.strftime("%Y%m%dT%H%M%S")
    with LibraryLease(store, run_id).acquire(wait_s):
        kept, unreadable = [], []
        for part in _part_paths(store):
            try:
                kept += _read_part(store, part).to_pylist()
            except ManifestPartError:
                unreadable.append(part)
        known = {url_key(row["source_uri"]) for row in kept}
        records = [path.rsplit("/", 1)[-1] for path in store.list(layout.SOURCES)]
        missing = [f"{layout.SOURCES}/{name}" for name in records
                   if name.endswith(".json") and name.removesuffix(".json") not in known]
        recovered, bad_records = [], []
        for key, data in store.cat_many(missing).items():
            try:
                recovered.append(_row(json.loads(data), key))
            except (ValueError, TypeError, AttributeError, InputError) as exc:  # a half-written record
                bad_records.append(f"{store.url(*key.split('/'))}: {str(exc)[:120]}")
        problems = marker_problems(store, {r["item_id"]: r for r in recovered if r["status"] == "ok"})
        recovered = [failed_row(row, f"recovered by `unziplora repair`: {problems[row['item_id']]}; the next run "
                                f"fits it again", item_id=row["item_id"], image_sha256=row["image_sha256"])
                     if row["status"] == "ok" and row["item_id"] in problems else row for row in recovered]
        changed = bool(unreadable or recovered)
        if changed and not dry_run:
            write_manifest(store, kept + recovered, run_id, previous=kept, replace=frozenset(unreadable))
    return {"library": store.url(), "unreadable_parts": [store.url_prefix + p for p in unreadable],
            "rows_kept": len(kept), "rows_recovered": len(recovered),
            "recovered_as_failed": len(problems), "unreadable_records": bad_records[:100],
            "repaired": changed and not dry_run, "dry_run": dry_run}


def _row(record, key: str) -> dict:
    """A `sources/` record as a manifest row: the manifest's columns only, its item id checked."""
    if not isinstance(record, dict) or not isinstance(record.get("source_uri"), str) or \
            record.get("status") not in ("ok", "failed", "skipped"):
        raise ValueError("not a manifest row")
    if record.get("item_id") is not None:
        check_item_id(record["item_id"], f"{key}: item_id")
    row = {name: record.get(name) for name in FIELDS} | {"schema_version": record.get("schema_version")
                                                         or SCHEMA_VERSION, "source_stat": None}
    try:
        pa.Table.from_pylist([row], schema=SCHEMA)  # values of the column types, or not a row at all
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise ValueError(f"not a manifest row ({str(exc).splitlines()[0][:100]})") from None
    return row
