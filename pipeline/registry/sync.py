"""Backfill a library's MLflow runs and registered LoRAs from its manifest (`unziplora registry sync`).

For every ok item whose row lacks a run or a registered version (MLflow was down during the fit, or the
library is being registered on a new server): track it as the worker would have, under the parent run of the
job that fitted it, then write the new columns into the item's marker, its sources' rows and the manifest.
Idempotent twice over: rows already tracked are skipped, and tracking itself finds existing runs/versions.
A library registered before issue 34 (an alias `item-<id>` per item) is moved to item tags on the way.
"""

from __future__ import annotations

import os
import time

from unziplora.errors import InputError

from ..store import layout
from ..store.manifest import read_manifest, source_key, write_manifest
from .registry_names import library_name
from ..store.lease import LibraryLease
from ..store.storage import Store, library_store, require_library
from .tracking import (REGISTRY_FILE, Tracker, default_tracking_uri, describe, is_local, redact, retrying,
                       sqlite_file)


def resolve_uri(output: str, tracking_uri: str | None, recorded: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the one registry.json recorded (unless its password
    was removed, or it is the SQLite file of a local library, which may have moved), else the default."""
    if recorded and ("***" in recorded or (recorded.startswith("sqlite:") and is_local(output))):
        recorded = None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or recorded or default_tracking_uri(output)
    if not uri:
        raise InputError(f"no MLflow tracking URI known for {output}: give --tracking-uri")
    return uri


def needs_tracking(row: dict) -> bool:
    return row["status"] == "ok" and bool(row["tracking_error"] or not row["mlflow_run_id"]
                                          or not row["content_model_uri"] or not row["style_model_uri"])


def sync_library(output: str, *, tracking_uri: str | None = None, library: str | None = None,
                 storage_options: dict | None = None, log_lora_artifacts: bool = False,
                 everything: bool = False, wait_s: float = 0.0) -> dict:
    """Track every ok item that needs it (all ok items with `everything`); returns counts. Under the library's
    lease, as a job and `forget` write it: a sync cannot race a job's manifest."""
    # one spelling: `./lib`, `/abs/lib` and a symlink to it are one library with one set of runs
    store = library_store(output, storage_options)
    require_library(store)
    with LibraryLease(store, "sync-" + time.strftime("%Y%m%dT%H%M%S")).acquire(wait_s) as lease:
        return _sync(store, lease, tracking_uri, library, storage_options, log_lora_artifacts, everything)


def _sync(store: Store, lease: LibraryLease, tracking_uri: str | None, library: str | None,
          storage_options: dict | None, log_lora_artifacts: bool, everything: bool) -> dict:
    output = store.url()
    recorded = store.read_json(REGISTRY_FILE) if store.exists(REGISTRY_FILE) else {}
    uri = resolve_uri(output, tracking_uri, recorded.get("tracking_uri"))
    library = library or recorded.get("library") or library_name(output)
    rows = read_manifest(output, storage_options).to_pylist()
    todo: dict[str, dict] = {}  # item id -> the row of its first ok source
    for row in rows:
        if row["status"] == "ok" and (everything or needs_tracking(row)):
            todo.setdefault(row["item_id"], row)
    summary = {"tracking_uri": redact(uri), "library": library, "ok_items": len({r["item_id"] for r in rows
                                                                                if r["status"] == "ok"}),
               "synced": 0, "errors": 0}
    # a library tracked before may need its registry moved to item tags, even with no row to track (but a
    # SQLite store that is gone is not made anew for that)
    database = sqlite_file(uri)
    if not todo and not (recorded and (database is None or os.path.exists(database))):
        return summary

    tracker = Tracker(uri, library, output, storage_options, log_lora_artifacts=log_lora_artifacts,
                      create_store=True)
    retrying(tracker.ensure_registered_models)
    # holding the lease, every job run still RUNNING is over: one that stored its report ended while MLflow was
    # away (FINISHED with its metrics), any other died (KILLED)
    summary["closed_job_runs"] = len(retrying(lambda: tracker.close_dead_jobs("sync", store)))
    if retrying(tracker.aliased_models):  # the layout before issue 34: an alias per item
        summary["migrated"] = retrying(tracker.migrate_registry)
    store.write_json(tracker.registry_record(), REGISTRY_FILE)
    if not todo:
        return summary
    parents: dict[str, str] = {}
    updates: dict[str, dict] = {}
    for item_id, row in todo.items():
        job_run = row["run_id"] or "unknown"
        try:
            if job_run not in parents:
                parents[job_run] = retrying(lambda run=job_run: tracker.job_run(run))
            updates[item_id] = tracker.track_fit(row, parents[job_run])
            summary["synced"] += 1
        except Exception as exc:  # recorded in the row; the next sync tries again
            updates[item_id] = {"tracking_error": describe(exc)}
            summary["errors"] += 1
    for parent in parents.values():  # parents created here have no job to close them
        if tracker.client.get_run(parent).info.status == "RUNNING":
            tracker.client.set_terminated(parent, "FINISHED")

    for row in rows:
        if row["item_id"] in updates:
            row.update(updates[row["item_id"]])
            if row["status"] == "ok":
                store.write_json(row, *source_key(row["source_uri"]))
    for item_id, update in updates.items():
        marker = store.read_json(*layout.marker(item_id))
        store.write_json(marker | update, *layout.marker(item_id))
    lease.check()
    write_manifest(store, rows, "sync-" + time.strftime("%Y%m%dT%H%M%S"))
    return summary
