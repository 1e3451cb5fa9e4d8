"""Search a library's bank: by text, by example image, by metadata, or any mix; and fetch what a hit names.

Exact brute force over NumPy float32 (benchmarks/bank_search.py: it holds at 1M vectors on one core, with
no index to build or keep in step, and metadata filters are a boolean mask). Scores are computed once per
distinct vector and gathered per row, so rows sharing a description cost one dot product.

    bank = Bank("s3://bucket/library")
    hits = bank.search("soft watercolor with ink outlines", k=5, class_word="dog")
    hits[0]["style_lora_uri"], hits[0]["registry"]["style"], hits[0]["score"]
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from unziplora import fit_files
from unziplora.errors import InputError

from ..store import layout
from ..store.manifest import check_item_id
from ..registry.registry_names import KINDS, item_handle, library_name
from ..store.storage import Store, open_url
from .embedders import TEXT_DEFAULT, load_embedder
from .index import decode, field_texts, read_meta, read_rows, read_vectors

# Files a fit directory needs for `unziplora generate` (copies in other formats, where a fit has them, are not).
FIT_FILES = (fit_files.RECORD, fit_files.CONFIG, *fit_files.FILES.values(), fit_files.MERGERS, fit_files.MASKS)
ITEM_ID = re.compile(r"^[0-9a-f]{6,64}$")


class Bank:
    """One library's manifest and bank vectors, loaded once for many queries."""

    def __init__(self, library: str, storage_options: dict | None = None):
        self.store = Store(library, storage_options)
        self.storage_options = storage_options
        self.rows = read_rows(self.store, storage_options)
        self.meta = read_meta(self.store)
        # written by tracking when the job was tracked; the registry names follow it, else the folder's name
        self.registry = self.store.read_json("registry.json") if self.store.exists("registry.json") else {}
        self.library_name = self.registry.get("library") or library_name(self.store.url())
        self._embedders: dict[str, object] = {}
        self._vectors: dict[str, tuple[pa.Array, np.ndarray]] = {}
        self._row_slots: dict[tuple[str, str], np.ndarray] = {}

    # ---- queries

    def search(self, text: str | None = None, image=None, *, field: str = "style", k: int | None = 10,
               text_embedder=TEXT_DEFAULT, image_embedder=None, **filters) -> list[dict]:
        """Best `k` rows for a text query (compared with each row's `field` text), an example image (path,
        bytes, PIL image or URL; compared with each source image), both (mean score), or neither (newest
        first). k=None: all matches. Filters: see `mask`. Rows not indexed yet (no `bank build` since their
        job) match no query."""
        keep = self.mask(**filters)
        parts = {}
        if text:
            embedder = self.embedder(text_embedder)
            parts["text"] = self._scores(embedder, embedder.embed([text])[0], field)
        if image is not None:
            embedder = self.embedder(image_embedder or self._only_image_embedder())
            if self.meta["embedders"].get(embedder.name, {}).get("kind") != "image":
                raise InputError(f"the bank of {self.store.url()} holds no image vectors of {embedder.spec}: run "
                                 f"`unziplora bank build {self.store.url()} --image-embedder {embedder.spec}`")
            query = embedder.embed([_as_image(image, self.storage_options)])[0]
            parts["image"] = self._scores(embedder, query, "image")
        if not parts:
            order = np.flatnonzero(keep)
            dates = np.array(self.rows["finished_at"].fill_null("").to_pylist(), dtype=object)[order]
            picked = order[np.argsort(dates, kind="stable")[::-1][:k]]
            return [self.hit(int(i)) for i in picked]
        score = np.mean(list(parts.values()), axis=0)
        candidates = np.flatnonzero(keep & ~np.isnan(score))
        k = len(candidates) if k is None else min(k, len(candidates))
        if k == 0:
            return []
        best = candidates[np.argpartition(-score[candidates], k - 1)[:k]]
        best = best[np.argsort(-score[best], kind="stable")]
        return [self.hit(int(i), float(score[i]), {name: float(s[i]) for name, s in parts.items()}) for i in best]

    def mask(self, status: str | list[str] | None = "ok", class_word: str | None = None,
             base_model: str | None = None, since: str | None = None, until: str | None = None,
             run: str | None = None, content: str | None = None, min_content_score: float | None = None,
             min_style_score: float | None = None, max_leak: float | None = None,
             min_split_score: float | None = None, skip_gate_failures: bool = False) -> np.ndarray:
        """Rows passing every given filter. status: ok (default), failed, skipped, a list, or None/"any".
        class_word: the content's class ("dog"; case-insensitive, also matched as the trigger's last word).
        since/until: ISO dates or times compared with finished_at (until a date includes that whole day).
        run: the job's run_id (or its MLflow run id when tracked). content: a substring of the trigger.
        min_content_score / min_style_score / max_leak: bounds on the fit's quality scores (pipeline/quality/scoring.py;
        max_leak bounds both leaks); a row without that score does not pass. min_split_score: the quality gate's
        score (pipeline/quality/gate.py); skip_gate_failures: leave out fits that never reached the gate's bar."""
        rows, keep = self.rows, np.ones(self.rows.num_rows, bool)

        def apply(condition):
            nonlocal keep
            keep &= np.asarray(condition.fill_null(False).to_numpy(zero_copy_only=False), bool)

        if status not in (None, "any"):
            apply(pc.is_in(rows["status"], value_set=pa.array([status] if isinstance(status, str) else status)))
        if class_word:
            word = class_word.strip().lower()
            content_lc = pc.utf8_lower(rows["content"].fill_null(""))
            apply(pc.or_(pc.equal(pc.utf8_lower(rows["class_word"].fill_null("")), word),
                         pc.or_(pc.equal(content_lc, word), pc.ends_with(content_lc, " " + word))))
        if content:
            apply(pc.match_substring(rows["content"], content, ignore_case=True))
        if base_model:
            apply(pc.equal(rows["base_model"], base_model))
        finished = rows["finished_at"].fill_null("")
        if since:
            apply(pc.greater_equal(finished, since))
        if until:
            apply(pc.less_equal(pc.utf8_slice_codeunits(finished, 0, len(until)), until))
        bounds = [("score_content", pc.greater_equal, min_content_score), ("score_style", pc.greater_equal, min_style_score),
                  ("score_content_style_leak", pc.less_equal, max_leak),
                  ("score_style_shape_leak", pc.less_equal, max_leak), ("split_score", pc.greater_equal, min_split_score)]
        for column, compare, bound in bounds:
            if bound is not None:
                values = rows[column] if column in rows.column_names else pa.nulls(rows.num_rows, pa.float64())
                apply(compare(values, bound))
        if skip_gate_failures and "gate_passed" in rows.column_names:
            apply(pc.invert(pc.equal(rows["gate_passed"], False)).fill_null(True))
        if run:
            runs = [rows[c] for c in ("run_id", "mlflow_run_id") if c in rows.column_names]
            apply(functools.reduce(pc.or_kleene, [pc.equal(r, run) for r in runs]))
        return keep

    def get(self, item: str) -> dict | None:
        """The ok row of an item id, or of a unique id prefix (at least 6 hex characters)."""
        if not ITEM_ID.match(item):
            return None
        ok = self.mask()
        ids = self.rows["item_id"].fill_null("")
        found = np.flatnonzero(ok & np.asarray(pc.starts_with(ids, item).to_numpy(zero_copy_only=False), bool))
        matches = {self.rows["item_id"][int(i)].as_py(): int(i) for i in found}
        if len(matches) > 1:
            raise InputError(f"item id prefix {item!r} is ambiguous: {sorted(matches)[:5]}")
        return self.hit(next(iter(matches.values()))) if matches else None

    def resolve(self, ref: str, field: str) -> dict:
        """An item id (or unique prefix) of an ok row, else the best `field` match of `ref` as a text query."""
        hit = self.get(ref)
        if hit is None:
            hits = self.search(ref, field=field, k=1)
            if not hits:
                raise InputError(f"no ok item in {self.store.url()} matches {ref!r} (run `unziplora bank build`?)")
            hit = hits[0]
        return hit

    def unindexed(self, field: str = "style", text_embedder=TEXT_DEFAULT) -> int:
        """How many ok rows a `field` text query cannot see yet (their job ran after the last build)."""
        slots = self._slots(self.embedder(text_embedder), field)
        return int(np.sum(self.mask() & (slots < 0)))

    # ---- rows and vectors

    def hit(self, i: int, score: float | None = None, scores: dict | None = None) -> dict:
        """A row as a result: every manifest column (with tracking, `content_model_uri`/`style_model_uri` name
        the registered versions), the parsed files, preview URIs, and `registry`: per kind the item's handle
        `<library>-<kind>@item-<id>` that `unziplora registry get` resolves (by the version's item tag)."""
        row = {name: self.rows[name][i].as_py() for name in self.rows.column_names}
        row["files"] = json.loads(row["files"]) if row.get("files") else {}
        row["previews"] = {kind: row["files"][name]["uri"] for kind, name in fit_files.PREVIEWS.items()
                           if name in row["files"]}
        row["registry"] = ({kind: item_handle(self.library_name, kind, row["item_id"]) for kind in KINDS}
                           if row["status"] == "ok" and row["item_id"] else {})
        return {"score": score, "scores": scores or {}, **row}

    def embedder(self, spec_or_embedder):
        if not isinstance(spec_or_embedder, str):
            return spec_or_embedder
        if spec_or_embedder not in self._embedders:
            self._embedders[spec_or_embedder] = load_embedder(spec_or_embedder)
        return self._embedders[spec_or_embedder]

    def _only_image_embedder(self) -> str:
        specs = [e["spec"] for e in self.meta["embedders"].values() if e["kind"] == "image"]
        if not specs:  # the CLI's words: this reaches `bank search --image` users
            offline = "toy" if self._all_toy() else "clip:/local/clip/dir"
            raise InputError(f"the bank of {self.store.url()} has no image vectors to match an example image "
                             f"against: run `unziplora bank build {self.store.url()} --image-embedder {offline}` first"
                             + (" (the toy world's style judge, offline)" if offline == "toy" else
                                " (a CLIP vision model saved locally; `toy` for toy-world libraries)"))
        if len(specs) > 1:
            raise InputError(f"the bank has {len(specs)} image embedders: name one with --image-embedder "
                             f"({' or '.join(specs)})")
        return specs[0]

    def _all_toy(self) -> bool:
        """Every row of the library fitted on the toy world's base model."""
        models = set(self.rows["base_model"].to_pylist()) if "base_model" in self.rows.column_names else set()
        return models == {"toy"}

    def _slots(self, embedder, field: str) -> np.ndarray:
        """For each row, the position of its vector in the embedder's matrix (-1: none stored)."""
        if (embedder.name, field) not in self._row_slots:
            keys, vectors = read_vectors(self.store, embedder.name)
            self._vectors[embedder.name] = (keys, vectors)
            row_keys = self.rows["image_sha256"] if field == "image" else field_texts(self.rows, field)
            slots = pc.index_in(row_keys, value_set=keys).fill_null(-1)
            self._row_slots[(embedder.name, field)] = np.asarray(slots.to_numpy(zero_copy_only=False), np.int64)
        return self._row_slots[(embedder.name, field)]

    def _scores(self, embedder, query: np.ndarray, field: str) -> np.ndarray:
        slots = self._slots(embedder, field)
        _, vectors = self._vectors[embedder.name]
        distinct = vectors @ query.astype(np.float32) if len(vectors) else np.zeros(0, np.float32)
        return np.where(slots >= 0, distinct[np.maximum(slots, 0)] if len(distinct) else np.nan, np.nan)

    # ---- fetching a hit's fit

    def fit_dir(self, hit: dict, cache_dir: str | Path) -> Path:
        """A local fit directory for a hit (for `unziplora generate`): the item folder itself for a local
        library, else its files downloaded once into cache_dir/<item_id>/. Either way every file is checked
        against the manifest's sha256, and only the item's own folder is read (whatever the row's URIs say)."""
        item_id = check_item_id(hit.get("item_id"), "bank hit")
        files = {name: info for name, info in hit["files"].items() if name in FIT_FILES}
        missing = set(FIT_FILES) - set(files)
        if missing:
            raise InputError(f"item {item_id} lacks {sorted(missing)} in its manifest row")
        if self.store.url_prefix == "":
            folder = Path(self.store.path(*layout.item(item_id)))
            for name, info in files.items():
                try:
                    data = (folder / name).read_bytes()
                except OSError as exc:
                    raise InputError(f"{folder / name}: {exc.strerror}") from None
                if hashlib.sha256(data).hexdigest() != info["sha256"]:
                    raise InputError(f"{folder / name}: sha256 differs from the manifest")
            return folder
        folder = Path(cache_dir).expanduser() / item_id
        folder.mkdir(parents=True, exist_ok=True)
        for name, info in files.items():
            target = folder / name
            if target.is_file() and target.stat().st_size == info["bytes"]:
                continue
            data = self.store.read_bytes(*layout.item(item_id, name))
            if hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise InputError(f"{self.store.url('items', item_id, name)}: sha256 differs from the manifest")
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(data)
            partial.replace(target)
        return folder


def _as_image(image, storage_options):
    """A PIL image, image bytes, a local path or any fsspec URL -> RGB image at the bank's decode size."""
    if hasattr(image, "convert"):
        return image.convert("RGB")
    if isinstance(image, str) and "://" in image:
        image = open_url(image, storage_options)
    return decode(image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes())
