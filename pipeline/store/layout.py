"""A library's layout, every name of it spelled here only (a fit folder's own files: unziplora/fit_files.py).

Under the job's --output:
  items/<item_id>/...            the fit's files (content/style LoRAs, diffusers + kohya, mergers, masks,
                                 fit.json, config.yaml, ...: unziplora/fit_files.py); `_SUCCESS` (the row, JSON) is written last: its
                                 `files` names every file it vouches for, with size and sha256; the worker
                                 checks them in the library before writing it, `--recheck` checks them again
                                 (`marker_problems`)
  sources/<key>.json             the latest row for one source URL (ok or failed), written by the worker
  attempts/<item_id>/<run>.<t>.<r>.json   one record per fit of the item started and not come back yet (a
                                 crash or an interruption; removed when the fit ends); `.crashed` beside one:
                                 the Train controller saw its rank die (poison-image guard, `crashes`)
  lease/<generation>.json        which job writes the library now (lease.py)
  manifest/part-<run>-<n>.parquet   manifest.SCHEMA; pandas, pyarrow, DuckDB read the folder directly
  reports/<run>.json             the run's summary
  registry.json                  where the library's MLflow runs and registered LoRAs are (tracking.py)
"""

from __future__ import annotations

ITEMS = "items"  # items/<item_id>/: one fit's files and its marker
MARKER = "_SUCCESS"  # items/<item_id>/_SUCCESS: the item's ok row, written last
SOURCES = "sources"  # sources/<key>.json: the latest row of one source URL
ATTEMPTS = "attempts"  # attempts/<item_id>/...: one record per started fit
CRASHED = ".crashed"  # beside an attempt record: its worker died
INFLIGHT = "inflight"  # inflight/<run>/rank-<n>.json: the attempts a Ray Train rank holds on its device
LEASE = "lease"  # lease/<generation>.json
MANIFEST = "manifest"  # manifest/part-<run>-<n>.parquet
REPORTS = "reports"  # reports/<run>.json


def item(item_id: str, *names: str) -> tuple[str, ...]:
    """The path parts (for a Store) of an item's folder, or of files in it."""
    return (ITEMS, item_id, *names)


def marker(item_id: str) -> tuple[str, ...]:
    """The path parts of an item's completion marker."""
    return item(item_id, MARKER)


def marker_key(item_id: str) -> str:
    """The marker's key under the library root: items/<item_id>/_SUCCESS."""
    return "/".join(marker(item_id))
