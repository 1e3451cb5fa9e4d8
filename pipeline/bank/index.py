"""Build the bank's vectors next to a library's manifest, incrementally.

Layout under the library:
  bank/bank.json                              embedders used (name -> spec, kind, dim) and a log of builds
  bank/embeddings/<embedder>/part-*.parquet   columns key, vector: one vector per distinct KEY, never per row
                                              (vector: fixed_size_binary, the float32 little-endian values)

The manifest stays the one table of rows; the bank only adds vectors, keyed by what they embed: a text
embedder's key is the text itself (style descriptions and content classes), an image embedder's key is the
image's sha256 (the manifest's `image_sha256`). A build embeds only keys that no part holds yet and writes
them as new parts, so a new job's rows cost only their new texts and images, rows sharing a style
description share one vector, nothing is ever rewritten, and an interrupted build resumes where it stopped.
Rows the manifest drops simply stop matching.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unziplora.errors import InputError
from unziplora.images import load_image

from ..store import layout
from ..store.manifest import read_manifest
from ..store.storage import Store, open_url
from .embedders import TEXT_DEFAULT, load_embedder

log = logging.getLogger(__name__)
BANK_VERSION = 1
FIELDS = ("style", "content")  # what a text query is compared with
IMAGE_SIDE = 224  # source images are decoded at this shorter side before an image embedder sees them
PART_SIZE = 10_000  # keys per part: a build that dies keeps the parts it finished, the next one goes on


def field_texts(rows: pa.Table, field: str) -> pa.ChunkedArray:
    """The text of each row that a `field` query is compared with: the style description, or the content's
    class word (falling back to the whole content trigger)."""
    if field == "style":
        return rows["style"]
    if field == "content":
        return pc.coalesce(rows["class_word"], rows["content"])
    raise InputError(f"field must be one of {FIELDS}, got {field!r}")


def read_meta(store: Store) -> dict:
    if store.exists("bank", "bank.json"):
        return store.read_json("bank", "bank.json")
    return {"version": BANK_VERSION, "embedders": {}, "builds": []}


def read_vectors(store: Store, name: str, keys_only: bool = False) -> tuple[pa.Array, np.ndarray | None]:
    """All keys (and vectors) stored for one embedder; a key written twice (concurrent builds) keeps its first.
    Part footers are read first, so the vectors go straight into one float32 matrix, one part at a time."""
    parts = [pq.ParquetFile(store.fs.open(p, "rb")) for p in store.list("bank", "embeddings", name)
             if p.endswith(".parquet")]
    keys = pa.concat_arrays([pa.array([], pa.string())] + [f.read(columns=["key"])["key"].combine_chunks()
                                                           for f in parts])
    if keys_only:
        return keys, None
    width = parts[0].schema_arrow.field("vector").type.byte_width // 4 if parts else 0
    vectors, row = np.empty((len(keys), width), np.float32), 0
    for part in parts:
        for chunk in part.read(columns=["vector"])["vector"].chunks:
            n = len(chunk)
            vectors[row:row + n] = np.frombuffer(chunk.buffers()[1], "<f4", n * width,
                                                 chunk.offset * 4 * width).reshape(n, width)
            row += n
    return keys, vectors


def write_part(store: Store, name: str, keys: list[str], vectors: np.ndarray) -> str:
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    blobs = pa.FixedSizeBinaryArray.from_buffers(pa.binary(vectors.shape[1] * 4), len(vectors),
                                                 [None, pa.py_buffer(vectors.tobytes())])
    buffer = io.BytesIO()
    # random floats neither compress nor repeat: stored plain, they load ~8x faster than a list<float> column
    pq.write_table(pa.table({"key": pa.array(keys, pa.string()), "vector": blobs}), buffer,
                   use_dictionary=["key"], compression={"key": "snappy", "vector": "none"})
    part = f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.parquet"
    store.write_bytes(buffer.getvalue(), "bank", "embeddings", name, part)
    return part


def missing_keys(store: Store, name: str, wanted: pa.Array) -> list[str]:
    """The distinct non-empty keys in `wanted` that no part of this embedder holds yet."""
    wanted = pc.unique(pc.drop_null(wanted))
    wanted = wanted.filter(pc.not_equal(wanted, ""))
    have, _ = read_vectors(store, name, keys_only=True)
    return wanted.filter(pc.invert(pc.is_in(wanted, value_set=have))).to_pylist()


def decode(data: bytes):
    """An RGB image at the bank's decode size (embedders resize further; small images need no warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*upscaling.*")
        return load_image(data, IMAGE_SIDE)


def read_rows(store: Store, storage_options: dict | None) -> pa.Table:
    """The library's manifest; a URL without one is a user error, not an empty bank."""
    if not any(p.endswith(".parquet") for p in store.list(layout.MANIFEST)):
        raise InputError(f"{store.url()} has no manifest/*.parquet: is it a library (a decompose --output)?")
    return read_manifest(store.url(), storage_options)


def build_bank(library: str, *, storage_options: dict | None = None, text_embedder=TEXT_DEFAULT,
               image_embedders=(), batch_size: int = 64, threads: int = 8) -> dict:
    """Index a library's manifest: text vectors for every style and content text, image vectors for every
    source image with each image embedder (objects or specs). Returns what this build added."""
    store = Store(library, storage_options)
    rows = read_rows(store, storage_options)
    meta = read_meta(store)
    summary = {"library": store.url(), "rows": rows.num_rows, "added": {}, "unreadable_images": 0}
    for embedder in [e for e in [text_embedder, *image_embedders] if e is not None]:
        embedder = load_embedder(embedder) if isinstance(embedder, str) else embedder
        if embedder.kind == "text":
            chunks = _text_chunks(store, embedder, rows, batch_size)
        else:
            chunks = _image_chunks(store, embedder, rows, storage_options, batch_size, threads, summary)
        summary["added"][embedder.name] = 0
        for keys, vectors in chunks:
            write_part(store, embedder.name, keys, vectors)
            summary["added"][embedder.name] += len(keys)
        meta["embedders"][embedder.name] = {"spec": embedder.spec, "kind": embedder.kind, "dim": embedder.dim}
    meta["builds"].append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows.num_rows,
                           "added": summary["added"]})
    store.write_json(meta, "bank", "bank.json")
    return summary


def _text_chunks(store, embedder, rows: pa.Table, batch_size: int):
    todo = missing_keys(store, embedder.name, pa.concat_arrays([field_texts(rows, f).combine_chunks()
                                                                for f in FIELDS]))
    for start in range(0, len(todo), PART_SIZE):
        keys = todo[start:start + PART_SIZE]
        yield keys, np.concatenate([embedder.embed(keys[i:i + batch_size]) for i in range(0, len(keys), batch_size)])


def _image_chunks(store, embedder, rows: pa.Table, storage_options, batch_size: int, threads: int, summary: dict):
    """Vectors of the source images whose sha256 this embedder has not seen; unreadable sources are
    counted and retried by the next build (the source may be back by then)."""
    todo = set(missing_keys(store, embedder.name, rows["image_sha256"].combine_chunks()))
    sources = {}
    for sha, uri in zip(rows["image_sha256"].to_pylist(), rows["source_uri"].to_pylist()):
        if sha in todo and sha not in sources:
            sources[sha] = uri

    def read(uri):
        try:
            return decode(open_url(uri, storage_options))
        except Exception as exc:  # a moved or damaged source must not stop the build
            log.warning("bank: cannot read %s: %s", uri, exc)
            return None

    items = list(sources.items())
    with ThreadPoolExecutor(threads) as pool:
        for part_start in range(0, len(items), PART_SIZE):
            keys, vectors = [], []
            for start in range(part_start, min(part_start + PART_SIZE, len(items)), batch_size):
                chunk = items[start:min(start + batch_size, part_start + PART_SIZE)]
                good = [(sha, im) for (sha, _), im in zip(chunk, pool.map(read, [u for _, u in chunk]))
                        if im is not None]
                summary["unreadable_images"] += len(chunk) - len(good)
                if good:
                    keys += [sha for sha, _ in good]
                    vectors.append(embedder.embed([im for _, im in good]))
            if keys:
                yield keys, np.concatenate(vectors)
