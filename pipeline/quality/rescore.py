"""Redraw the previews and scores of a library's fits without fitting again (`unziplora rescore LIBRARY`).

A library scored by an older protocol (other preview prompts or steps, another scorer, fits made before scores
existed) gets today's: for each `ok` item its LoRA files are read, the previews drawn and scored against its
source image (pipeline/quality/previews.py), and the new preview files, `scores.json` and model card written beside the
fit; its marker, its `sources/` record and the manifest then vouch for them, with the new `score_*` columns. The
LoRA files are never touched. An interrupted rescore leaves at most one item whose marker does not match its new
preview files: a job would fit it again, so run the rescore again first (it finishes such an item: only files
it writes may differ). A tracked library's fit runs get the new scores as metrics at the next `registry sync`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from unziplora import fit_files
from unziplora.errors import InputError, first_line

from ..store import layout
from ..store.lease import LibraryLease
from ..store.manifest import SCORE_COLUMNS, manifest_rows, marker_problems, source_key, write_manifest
from .previews import write_previews
from .scoring import load_scorer, scorer_spec
from ..store.storage import library_store, open_url, sha256_hex

WRITTEN = (*fit_files.PREVIEWS.values(), fit_files.PREVIEW_PROMPTS, fit_files.SCORES, fit_files.CARD)


def rescore_library(output: str, *, storage_options: dict | None = None, steps: int = 8, scorer: str = "auto",
                    subjects=None, styles=None, wait_s: float = 0.0, progress: bool = True) -> dict:
    """Rescore every ok item of the library at `output`, under its lease; returns what was done."""
    from unziplora.models import load_base_model

    store = library_store(output, storage_options)
    rows = manifest_rows(store.url(), storage_options)
    if not rows:
        raise InputError(f"{store.url()} holds no manifest rows: not a library (the --output of decompose), or "
                         "no job has written one yet")
    run_id = "rescore-" + time.strftime("%Y%m%dT%H%M%S")
    out = {"library": store.url(), "rescored": 0, "failed": [], "scorer": None}
    bases: dict[str, tuple] = {}  # base model and fingerprint -> (the loaded base, its scorer)
    with LibraryLease(store, run_id).acquire(wait_s):
        ok = [r for r in rows if r["status"] == "ok"]
        broken = _broken_fits(store, ok)
        new_rows = {}
        for n, row in enumerate(ok, 1):
            item = row["item_id"]
            if item in broken:
                out["failed"].append(f"{item}: {broken[item]} (left as it is: the next job fits it again)")
                continue
            try:
                key = f"{row['base_model']}@{row.get('base_model_fingerprint')}"
                if key not in bases:  # each base model and its scorer loaded once, not once per item
                    base = _base(load_base_model, row)
                    spec = scorer_spec(scorer, base.name)
                    bases[key] = base, load_scorer(spec, base) if spec else None
                base, judge = bases[key]
                out["scorer"] = judge.name if judge else None
                new_rows[row["source_uri"]] = _rescore(store, row, base, judge, steps, subjects, styles,
                                                      storage_options)
                out["rescored"] += 1
                if progress:
                    print(f"rescore: {n}/{len(ok)} {item}", file=sys.stderr, flush=True)
            except Exception as exc:  # one item's trouble is its own line; the others go on
                out["failed"].append(f"{item}: {type(exc).__name__}: {first_line(exc, 200)}")
        if new_rows:
            write_manifest(store, [new_rows.get(r["source_uri"], r) for r in rows], run_id, previous=rows)
    return out


def _broken_fits(store, ok: list[dict]) -> dict[str, str]:
    """Items whose marker does not hold for a file the rescore does not write (a LoRA missing, say)."""
    trimmed = {}
    for row in ok:
        files = {k: v for k, v in json.loads(row.get("files") or "{}").items() if k not in WRITTEN}
        trimmed[row["item_id"]] = {"files": json.dumps(files)}
    return marker_problems(store, trimmed)


def _base(load_base_model, row: dict):
    """The row's base model, refused when its weights are not the ones the fit was made on."""
    base = load_base_model(row["base_model"])
    if row.get("base_model_fingerprint") and base.fingerprint != row["base_model_fingerprint"]:
        raise InputError(f"the base model {row['base_model']} here is not the one its fits were made on "
                         f"(fingerprint {base.fingerprint}, fitted on {row['base_model_fingerprint']})")
    return base


def _rescore(store, row: dict, base, judge, steps: int, subjects, styles, storage_options) -> dict:
    """One item: its fit read into a scratch folder, previews and scores drawn there, the new files uploaded,
    then its marker and source record rewritten to vouch for them; returns its new row."""
    item = row["item_id"]
    files = json.loads(row["files"])
    with tempfile.TemporaryDirectory(prefix="unziplora-rescore-") as scratch:
        folder = Path(scratch)
        for name in files:
            if name not in WRITTEN:
                (folder / name).write_bytes(store.read_bytes(*layout.item(item, name)))
        source = None
        if judge is not None:
            try:
                source = open_url(row["source_uri"], storage_options)
            except Exception as exc:  # the source image is gone: previews only, no scores
                raise InputError(f"cannot read its source image {row['source_uri']} to score against ({exc})") from None
        made = write_previews(base, folder, steps, subjects=subjects, styles=styles, scorer=judge, source=source)
        if not made["files"]:
            raise InputError("no previews could be drawn (see the log above)")
        files = {k: v for k, v in files.items() if k not in WRITTEN}
        for path in sorted(folder.iterdir()):
            if path.name in WRITTEN:
                store.upload_file(str(path), *layout.item(item, path.name))
                files[path.name] = {"uri": store.url(*layout.item(item, path.name)),
                                    "sha256": sha256_hex(path.read_bytes()), "bytes": path.stat().st_size}
    new = row | {"files": json.dumps(files, sort_keys=True)} | {column: None for column in SCORE_COLUMNS} | {
        f"score_{name}": value for name, value in made["scores"].items()}
    store.write_json(new, *layout.marker(item))
    store.write_json(new, *source_key(row["source_uri"]))
    return new
