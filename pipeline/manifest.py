"""The library's Parquet manifest: one row per input image, rebuilt from per-item records after each run.

Layout under the job's --output:
  items/<item_id>/...            the fit's files (content/style LoRAs, diffusers + kohya, mergers, masks,
                                 fit.json, config.yaml); `_SUCCESS` (the row, JSON) is written last
  sources/<key>.json             the latest row for one source URL (ok or failed), written by the worker
  attempts/<item_id>.json        how many times a fit of that item was started (poison-image guard)
  manifest/part-<run>-<n>.parquet   this file's SCHEMA; pandas, pyarrow, DuckDB read the folder directly
  reports/<run>.json             the run's summary
  registry.json                  where the library's MLflow runs and registered LoRAs are (tracking.py)

Schema version 3 (`schema_version` column; version 2 added the MLflow columns, version 3 the base model's
fingerprint and the mlflow.diffusers model URIs; older parts still read). Item ids are sha256(image bytes) + sha256(settings and the base model's
fingerprint) mixed: the same image with the same settings on the same weights is the same item, whatever its
name. Ids of schema < 3 did not hold the fingerprint: `--adopt-legacy` reuses such fits (`job.plan_items`).
"""

from __future__ import annotations

import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Store, url_key

SCHEMA_VERSION = 3
ROWS_PER_PART = 10_000
STATUSES = ("ok", "failed", "skipped")

SCHEMA = pa.schema([
    ("schema_version", pa.int32()),
    ("item_id", pa.string()),  # null when the image could not be read at all
    ("source_uri", pa.string()),
    ("status", pa.string()),  # ok | failed | skipped (a duplicate of another input)
    ("error", pa.string()),
    ("attempts", pa.int32()),
    ("content", pa.string()),
    ("style", pa.string()),
    ("class_word", pa.string()),
    ("prompt_combined", pa.string()),
    ("prompt_content", pa.string()),
    ("prompt_style", pa.string()),
    ("output_uri", pa.string()),
    ("content_lora_uri", pa.string()),
    ("style_lora_uri", pa.string()),
    ("files", pa.string()),  # JSON {file name: {"uri", "sha256", "bytes"}}
    ("image_sha256", pa.string()),
    ("settings_sha256", pa.string()),
    ("rank", pa.int32()),
    ("steps", pa.int32()),
    ("resolution", pa.int32()),
    ("seed", pa.int64()),
    ("final_loss", pa.float64()),
    ("final_mse", pa.float64()),
    ("final_ortho", pa.float64()),
    ("mask_stats", pa.string()),  # JSON, per block role
    ("train_s", pa.float64()),
    ("total_s", pa.float64()),
    ("worker", pa.string()),
    ("base_model", pa.string()),
    ("base_model_fingerprint", pa.string()),  # the exact weights: hub:<repo>@<commit>, sha256:..., preset:<name>
    ("code_version", pa.string()),
    ("run_id", pa.string()),  # the run that produced the item's files
    ("finished_at", pa.string()),
    ("mlflow_run_id", pa.string()),  # the fit's nested MLflow run
    ("content_model_uri", pa.string()),  # models:/<library>-content/<version>
    ("style_model_uri", pa.string()),
    ("content_diffusers_model_uri", pa.string()),  # models:/<library>-content-diffusers/<version> (option)
    ("style_diffusers_model_uri", pa.string()),
    ("tracking_error", pa.string()),  # why the fit is not (fully) tracked; `unziplora registry sync` retries
])
FIELDS = SCHEMA.names


def empty_row(source_uri: str) -> dict:
    return {name: None for name in FIELDS} | {"schema_version": SCHEMA_VERSION, "source_uri": source_uri}


def failed_row(item: dict, error: str, **known) -> dict:
    row = empty_row(item["source_uri"]) | {"status": "failed", "error": error, "attempts": 0,
                                           "content": item.get("content"), "style": item.get("style"),
                                           "finished_at": utc_now()}
    return row | known


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def source_key(uri: str) -> tuple[str, str]:
    """Where the latest row of one source URL is kept."""
    return "sources", url_key(uri) + ".json"


def read_attempts(store: Store, item_id: str) -> dict:
    """How often a fit of this item was started, came back (ok or a handled error), and was charged a crash."""
    key = ("attempts", item_id + ".json")
    return store.read_json(*key) if store.exists(*key) else {"started": 0, "finished": 0}


def write_attempts(store: Store, item_id: str, counts: dict) -> None:
    store.write_json(counts, "attempts", item_id + ".json")


def write_manifest(store: Store, rows: list[dict], run_id: str) -> list[str]:
    """Write all rows as new part files, then remove the previous run's parts."""
    rows = sorted(rows, key=lambda r: r["source_uri"])
    old = [p for p in store.list("manifest") if p.rsplit("/", 1)[-1].startswith("part-")]
    written = []
    for n, start in enumerate(range(0, max(len(rows), 1), ROWS_PER_PART)):
        table = pa.Table.from_pylist([{f: r.get(f) for f in FIELDS} for r in rows[start:start + ROWS_PER_PART]],
                                     schema=SCHEMA)
        table = table.replace_schema_metadata({"unziplora.manifest.schema_version": str(SCHEMA_VERSION)})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        name = f"part-{run_id}-{n:05d}.parquet"
        store.write_bytes(buffer.getvalue(), "manifest", name)
        written.append(store.url("manifest", name))
    names = {w.rsplit("/", 1)[-1] for w in written}
    for path in old:
        if path.rsplit("/", 1)[-1] not in names:
            store.remove(path)
    return written


def read_manifest(url: str, storage_options: dict | None = None) -> pa.Table:
    store = Store(url, storage_options)
    parts = [p for p in store.list("manifest") if p.endswith(".parquet")]
    tables = [_upgrade(pq.read_table(io.BytesIO(store.fs.cat_file(p)))) for p in parts]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def manifest_schema_versions(store: Store) -> set[int]:
    """The schema versions of the library's manifest parts, from their footers alone."""
    versions = set()
    for path in store.list("manifest"):
        if path.endswith(".parquet"):
            with store.fs.open(path, "rb") as f:
                metadata = pq.read_schema(f).metadata or {}
            versions.add(int(metadata.get(b"unziplora.manifest.schema_version", b"1")))
    return versions


def _upgrade(table: pa.Table) -> pa.Table:
    """A part written by an older schema version, with the columns added since as nulls."""
    columns = [table[name] if name in table.column_names else pa.nulls(len(table), SCHEMA.field(name).type)
               for name in FIELDS]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def loads_json(value: bytes | None):
    return json.loads(value) if value else None
