"""The library's Parquet manifest: one row per input image, rebuilt from per-item records after each run.

The library's layout (items/, sources/, attempts/, manifest/, ...): pipeline/store/layout.py, which spells each name.

Schema version 5 (`schema_version` column; version 2 added the MLflow columns, version 3 the base model's
fingerprint and the mlflow.diffusers model URIs, version 4 the source's listing stamp, version 5 the quality
scores, version 6 the quality gate's columns; older parts still read).
Rows go into hash buckets of about ROWS_PER_PART rows by source URL, one part file each
(`part-<bucket>of<buckets>-<run>.parquet`); a run rewrites only the buckets whose rows changed. Item ids are sha256(image bytes) + sha256(settings and the base model's
fingerprint) mixed: the same image with the same settings on the same weights is the same item, whatever its
name. Ids of schema < 3 did not hold the fingerprint: `--adopt-legacy` reuses such fits (`job.plan_items`).
"""

from __future__ import annotations

import io
import json
import math
import re
import time
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from unziplora import fit_files
from unziplora.errors import InputError, UnZipLoRAError, first_line
from unziplora.redact import scrub

from . import layout
from .storage import Store, url_key

SCHEMA_VERSION = 6
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
    ("source_stat", pa.string()),  # the source's listing stamp when it was identified (source.listing_stamp)
    # quality scores from the previews (pipeline/quality/scoring.py; null: not scored): content kept, style carried to
    # other subjects (higher is better), and what each LoRA leaks of the other's factor (lower is better)
    ("score_content", pa.float64()),
    ("score_style", pa.float64()),
    ("score_content_style_leak", pa.float64()),
    ("score_style_shape_leak", pa.float64()),
    # quality control (pipeline/quality/gate.py; null: no gate): candidates fitted, each one's seed and scores (JSON
    # list), the kept one's split score, and whether it reached --min-split-score
    ("candidates", pa.int32()),
    ("candidate_scores", pa.string()),
    ("split_score", pa.float64()),
    ("gate_passed", pa.bool_()),
])
FIELDS = SCHEMA.names
SCORE_COLUMNS = tuple(name for name in FIELDS if name.startswith("score_"))  # pipeline/quality/scoring.py's SCORES


def empty_row(source_uri: str) -> dict:
    return {name: None for name in FIELDS} | {"schema_version": SCHEMA_VERSION, "source_uri": source_uri}


def failed_row(item: dict, error: str, **known) -> dict:
    row = empty_row(item["source_uri"]) | {"status": "failed", "error": error, "attempts": 0,
                                           "content": item.get("content"), "style": item.get("style"),
                                           "finished_at": utc_now()}
    return scrubbed(row | known)


def ok_row(item: dict, known: dict, result, files: dict, **fields) -> dict:
    """The row of a finished fit: what it learned from (`result`: unziplora.FitResult), where its files are
    (`files`: {name: {"uri", "sha256", "bytes"}}), and `fields` from the worker (attempts, worker, run ids)."""
    record, cfg = result.record, result.config
    return empty_row(item["source_uri"]) | known | {
        "schema_version": SCHEMA_VERSION, "status": "ok",
        "content": cfg.content, "style": cfg.style, "class_word": cfg.resolved_class_word,
        "prompt_combined": record["prompts"]["combined"], "prompt_content": record["prompts"]["content"],
        "prompt_style": record["prompts"]["style"],
        "output_uri": files[fit_files.RECORD]["uri"].rsplit("/", 1)[0],
        "content_lora_uri": files[fit_files.FILES["content"]]["uri"],
        "style_lora_uri": files[fit_files.FILES["style"]]["uri"],
        "files": json.dumps(files, sort_keys=True),
        "rank": cfg.rank, "steps": cfg.steps, "resolution": cfg.resolution, "seed": cfg.seed,
        "final_loss": record["final"]["loss"], "final_mse": record["final"]["mse"],
        "final_ortho": record["final"]["ortho"], "mask_stats": json.dumps(record["mask_stats"]),
        "train_s": record["timings"]["train_s"], "total_s": record["timings"]["total_s"],
        "base_model": record["base_model"], "base_model_fingerprint": record["base_model_fingerprint"],
        "finished_at": utc_now(),
    } | gate_columns(record.get("gate")) | fields


def gate_columns(gate: dict | None) -> dict:
    """The quality gate's columns of a fit that went through it (fit.json's "gate")."""
    if not gate:
        return {}
    return {"candidates": len(gate["candidates"]), "candidate_scores": json.dumps(gate["candidates"]),
            "split_score": gate["split_score"], "gate_passed": gate["passed"]}


def scrubbed(row: dict) -> dict:
    """The row with its error texts through the one redaction (unziplora.redact)."""
    return row | {k: scrub(row[k]) for k in ("error", "tracking_error") if row.get(k)}


ITEM_ID = re.compile(r"^[0-9a-f]{16,64}$")  # ours are 24; any hex name is a safe folder name


class LibraryChangedError(UnZipLoRAError):
    """Files of the library went missing while this process wrote them (a library moved or deleted mid-job)."""


def check_item_id(value, where: str) -> str:
    """An item id read from data (a manifest, a marker, a bank): hex digits, or a clear error. Item ids
    become folder names (items/<id>/, a bank's cache), so nothing else may pass."""
    if not isinstance(value, str) or not ITEM_ID.match(value):
        raise InputError(f"{where}: {str(value)[:80]!r} is not an item id (hex digits)")
    return value


def marker_problems(store: Store, markers: dict[str, dict]) -> dict[str, str]:
    """Why completion markers do not hold: {item id: reason} for each of `markers` ({item id: marker}) that
    vouches for a file missing from items/<id>/ or of another size than it records; items whose marker holds
    are absent. A marker is the item's ok row: its `files` names every file of the fit with its size and
    sha256. One listing per item (concurrent on object stores); no file's bytes are read."""
    vouched, out = {}, {}
    for item_id, marker in markers.items():
        try:
            files = json.loads(marker.get("files") or "{}")
            vouched[item_id] = {store.path(*layout.item(item_id, name)): info.get("bytes") for name, info in files.items()}
        except (ValueError, TypeError, AttributeError, InputError) as exc:
            out[item_id] = f"its completion marker is unreadable ({exc})"
            continue
        if not vouched[item_id]:
            del vouched[item_id]
            out[item_id] = "its completion marker names no files"
    listings = store.sizes_many(["/".join(layout.item(item_id)) for item_id in vouched])
    for item_id, files in vouched.items():
        found = listings["/".join(layout.item(item_id))]
        for path, size in sorted(files.items()):
            name = path.rsplit("/", 1)[-1]
            if name not in found:
                out[item_id] = f"{store.url_prefix + path} is missing"
                break
            if size is not None and found[name] != size:
                out[item_id] = f"{store.url_prefix + path} has {found[name]} bytes, not the {size} its marker vouches for"
                break
    return out


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def source_key(uri: str) -> tuple[str, str]:
    """Where the latest row of one source URL is kept."""
    return layout.SOURCES, url_key(uri) + ".json"


# ---- crash accounting: one record per started fit ------------------------------------------------------


def start_attempt(store: Store, item_id: str, run_id: str, info: dict) -> str:
    """Record that a fit of the item starts (before it starts, so a crash leaves the record); returns its name."""
    name = f"{run_id}.{time.time_ns()}.{uuid.uuid4().hex[:6]}.json"
    store.write_json(info | {"run_id": run_id, "started_at": utc_now()}, layout.ATTEMPTS, item_id, name)
    return name


def note_attempt(store: Store, item_id: str, name: str, done: dict) -> None:
    """Add to an attempt's record what it has done so far (the gate's scored candidates), so that a run after
    a crash can take it up."""
    store.write_json(store.read_json(layout.ATTEMPTS, item_id, name) | done, layout.ATTEMPTS, item_id, name)


def earlier_candidates(store: Store, item_id: str, records: list[dict]) -> list[dict]:
    """The gate's candidates that the newest of these attempts noting any had scored (each notes all it knew)."""
    for record in reversed(records):
        try:
            noted = store.read_json(layout.ATTEMPTS, item_id, record["name"]).get("candidates")
        except (OSError, ValueError):  # a record cut short by its crash: it noted nothing usable
            continue
        if noted:
            return noted
    return []


def end_attempt(store: Store, item_id: str, name: str) -> None:
    """The fit came back from the device (ok or a handled error): its record goes. A removal, so it works on a
    full disk too."""
    path = store.path(layout.ATTEMPTS, item_id, name)
    if store.fs.exists(path):
        store.remove(path)


def clear_attempts(store: Store, item_id: str) -> None:
    """The item is complete: the records of its earlier fits that never came back (and their crash marks) go."""
    for path in store.list(layout.ATTEMPTS, item_id):
        store.remove(path)


def charge_crash(store: Store, item_id: str, name: str) -> None:
    """The Train controller saw the rank that held this attempt die."""
    store.write_bytes(b"", layout.ATTEMPTS, item_id, name.removesuffix(".json") + layout.CRASHED)


def past_attempts(store: Store, item_id: str) -> list[dict]:
    """The item's records of fits that never came back, oldest first: {"name", "run_id", "crashed"}."""
    names = [p.rsplit("/", 1)[-1] for p in store.list(layout.ATTEMPTS, item_id)]
    crashed = {n.removesuffix(".crashed") for n in names if n.endswith(".crashed")}
    records = [{"name": n, "run_id": n.rsplit(".", 3)[0], "crashed": n.removesuffix(".json") in crashed}
               for n in names if n.endswith(".json") and n.count(".") >= 3]
    return sorted(records, key=lambda r: int(r["name"].rsplit(".", 3)[1]))


def crashes(records: list[dict], executor: str, run_id: str) -> int:
    """How often a fit of this item killed its worker, from the records of fits that never came back.
    - actor pool: a dead actor takes only its own item, and the job retries it at once. So a record is a crash
      when the same run started the item again after it (this run is doing so now: all of its records count).
      The last record of an earlier run is not: that run stopped (its driver was stopped or killed) while
      the fit ran, which says nothing about the image.
    - Train restarts the whole group when one worker dies, so a record there is a crash only when the
      controller charged it to the dead rank (`charge_crash`)."""
    if executor == "train":
        return sum(r["crashed"] for r in records)
    runs = Counter(r["run_id"] for r in records)
    return sum(n if run == run_id else n - 1 for run, n in runs.items())


def write_manifest(store: Store, rows: list[dict], run_id: str, previous: list[dict] | None = None,
                   replace: frozenset[str] = frozenset()) -> list[str]:
    """Make the manifest hold exactly `rows`; returns the URLs of its parts. Only buckets whose rows changed
    get a new part (written before the old one goes): a re-run that changed nothing writes nothing.
    `previous`: the manifest's rows as read by the caller, if it has them (else read here). `replace`: parts
    (paths) that are rewritten or removed whatever they hold (unreadable ones, `repair_manifest`)."""
    # no copies of rows that need no scrubbing: at 100k rows every copy of the rows costs hundreds of MB
    rows = sorted((scrubbed(r) if r.get("error") or r.get("tracking_error") else r for r in rows),
                  key=lambda r: r["source_uri"])
    buckets = 1 << max(0, math.ceil(len(rows) / ROWS_PER_PART) - 1).bit_length()  # a power of two
    wanted = _by_bucket(rows, buckets)
    parts: dict[int, list[str]] = {}  # bucket -> its part files in this layout
    stale = []  # parts of another layout (another bucket count, or the names before buckets)
    for path in store.list(layout.MANIFEST):
        match = PART_NAME.match(path.rsplit("/", 1)[-1])
        if match and int(match["of"]) == buckets:
            parts.setdefault(int(match["bucket"]), []).append(path)
        elif path.rsplit("/", 1)[-1].startswith("part-"):
            stale.append(path)
    if previous is None and parts:
        previous = manifest_rows(store.url(), store.storage_options)
    had = _by_bucket(sorted(previous or [], key=lambda r: r["source_uri"]), buckets)
    out = []
    for bucket in range(buckets):
        old = parts.get(bucket, [])
        if len(old) == 1 and not stale and old[0] not in replace and \
                _same_rows(had.get(bucket, []), wanted.get(bucket, [])):
            out.append(store.url_prefix + old[0])
            continue
        table = pa.Table.from_pylist(wanted.get(bucket, []), schema=SCHEMA)
        table = table.replace_schema_metadata({"unziplora.manifest.schema_version": str(SCHEMA_VERSION)})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        name = f"part-{bucket:05d}of{buckets:05d}-{run_id}.parquet"
        store.write_bytes(buffer.getvalue(), layout.MANIFEST, name)
        out.append(store.url(layout.MANIFEST, name))
        stale += [p for p in old if p.rsplit("/", 1)[-1] != name]
    for path in stale:
        store.remove(path)
    return out


PART_NAME = re.compile(r"^part-(?P<bucket>\d{5})of(?P<of>\d{5})-.*\.parquet$")


def _same_rows(old: list[dict], new: list[dict]) -> bool:
    """The same manifest rows (a row kept as it was is the very same object: no field compared)."""
    return len(old) == len(new) and all(
        a is b or all(a.get(f) == b.get(f) for f in FIELDS) for a, b in zip(old, new))


def _by_bucket(rows: list[dict], buckets: int) -> dict[int, list[dict]]:
    """Rows by their bucket: a stable hash of the source URL (rows keep their order)."""
    out: dict[int, list[dict]] = {}
    for row in rows:
        out.setdefault(int(url_key(row["source_uri"])[:8], 16) % buckets, []).append(row)
    return out


def read_manifest(url: str, storage_options: dict | None = None) -> pa.Table:
    """Every part of a library's manifest; an item id that is not one (a hostile or broken part) is refused."""
    store = Store(url, storage_options)
    tables = [_read_part(store, part) for part in _part_paths(store)]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def _part_paths(store: Store) -> list[str]:
    return [p for p in store.list(layout.MANIFEST) if p.endswith(".parquet")]


class ManifestPartError(InputError):
    """A manifest part that cannot be read (truncated, not Parquet, columns of other types)."""

    def __init__(self, store: Store, part: str, exc: Exception):
        self.part = part
        cause = first_line(exc, 200)
        super().__init__(f"manifest part {store.url_prefix + part} cannot be read ({cause}): run `unziplora repair "
                         f"{store.url()}` to rebuild it from the library's records (sources/ and the fits' markers)")


def _read_part(store: Store, part: str) -> pa.Table:
    try:
        table = _upgrade(pq.read_table(io.BytesIO(store.fs.cat_file(part))))
    except (pa.ArrowException, ValueError, TypeError) as exc:  # a truncated or foreign file: name it
        raise ManifestPartError(store, part, exc) from None
    for n, item_id in enumerate(table["item_id"].to_pylist()):
        if item_id is not None:
            check_item_id(item_id, f"manifest part {part}, row {n}: item_id")
    return table


def manifest_rows(url: str, storage_options: dict | None = None) -> list[dict]:
    """read_manifest's rows as dicts, converted one part at a time (the whole table and all its rows as
    dicts are never in memory together)."""
    store = Store(url, storage_options)
    rows = []
    for part in _part_paths(store):
        rows += _read_part(store, part).to_pylist()
    return rows


def manifest_schema_versions(store: Store) -> set[int]:
    """The schema versions of the library's manifest parts, from their footers alone."""
    versions = set()
    for path in _part_paths(store):
        try:
            with store.fs.open(path, "rb") as f:
                metadata = pq.read_schema(f).metadata or {}
        except (pa.ArrowException, ValueError) as exc:
            raise ManifestPartError(store, path, exc) from None
        versions.add(int(metadata.get(b"unziplora.manifest.schema_version", b"1")))
    return versions


def _upgrade(table: pa.Table) -> pa.Table:
    """A part written by an older schema version, with the columns added since as nulls."""
    columns = [table[name] if name in table.column_names else pa.nulls(len(table), SCHEMA.field(name).type)
               for name in FIELDS]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def loads_json(value: bytes | None):
    return json.loads(value) if value else None
