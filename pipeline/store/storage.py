"""Paths on any fsspec filesystem (plain paths, file://, s3://, gs://, ...), with atomic writes.

No reader ever sees a file half written. On an object store (S3, GCS, Azure Blob) one PUT, or a completed
multipart upload, makes the whole object appear at once, and a failed or killed upload makes none: files are
written straight to their final key (one write; a temporary key would cost a server-side copy and a delete
per file, and a killed job would leave it behind). Elsewhere (local disk, SFTP, HDFS ...) a file is written
under a temporary name in its folder, then renamed. A write that fails (a full disk, a store that went away)
leaves no temporary file behind. The completion marker that makes an item count as done is written last.

Paths below the root are built from parts that may come from data (item ids, file names in a manifest): a part
that would leave the root (`..`, an absolute path, a backslash) is refused here, for every caller.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid

import fsspec
from fsspec.asyn import AsyncFileSystem, _run_coros_in_chunks, sync
from fsspec.core import url_to_fs

from unziplora.errors import InputError

from . import layout


FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a write failed because the destination is full
# stores where a single write of an object is atomic (all or nothing, visible only when complete): S3 (PUT,
# CompleteMultipartUpload), GCS (simple and finalized resumable uploads), Azure block blobs (commit of the
# block list). Checked against moto for S3 (tests/test_storage_writes.py); the others by their documentation
WHOLE_OBJECT_WRITES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


class Store:
    """One root URL and its filesystem; every path method takes paths relative to that root."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = url_to_fs(root.rstrip("/") or "/", **self.storage_options)
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.url_prefix = "" if self.protocol in ("file", "local") else f"{self.protocol}://"

    def path(self, *parts: str) -> str:
        for part in parts:
            segments = str(part).split("/")
            if not part or "\\" in part or "\0" in part or any(s in ("", ".", "..") for s in segments):
                raise UnsafePathError(f"refusing the path {part!r} below {self.url()}: it would leave its folder")
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        """A URL a user (or another process) can open: s3://bucket/..., or a local absolute path."""
        return self.url_prefix + (self.path(*parts) if parts else self.root)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_json(self, *parts: str):
        return json.loads(self.read_bytes(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        self._put(lambda temporary: self.fs.pipe_file(temporary, data), parts)

    def write_json(self, value, *parts: str) -> None:
        self.write_bytes(json.dumps(value, indent=1, sort_keys=True).encode(), *parts)

    def upload_file(self, local_path: str, *parts: str) -> None:
        self._put(lambda temporary: self.fs.put_file(local_path, temporary), parts)

    def _put(self, write, parts: tuple[str, ...]) -> None:
        """Write the final key once on an object store; elsewhere via a temporary name in the same folder,
        then a rename."""
        final = self.path(*parts)
        if self.protocol in WHOLE_OBJECT_WRITES:  # no folders to make, nothing to rename
            try:
                return write(final)
            except OSError as exc:
                if exc.errno in FULL:
                    raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), self.url_prefix + final) from exc
                raise
        folder, name = final.rsplit("/", 1)
        self.fs.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            write(temporary)
            self.fs.mv(temporary, final)
        except BaseException as exc:
            self._discard(temporary)
            # name the library's file: not our temporary key, nor the local source a copy was reading (shutil
            # names the source first when the destination's disk fills up)
            if isinstance(exc, OSError) and exc.errno and (exc.errno in FULL or temporary in (exc.filename,
                                                                                               exc.filename2)):
                raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), self.url_prefix + final) from exc
            raise

    def create(self, data: bytes, *parts: str) -> None:
        """Write a new file, atomically, only if none is there: FileExistsError otherwise (a lease, a claim).
        Local disk: a hard link of a complete temporary file (atomic, exclusive). S3: a conditional PUT
        (If-None-Match). Other stores: fsspec's mode="create" (exclusive where the store supports it)."""
        final = self.path(*parts)
        if self.url_prefix == "":
            folder, name = final.rsplit("/", 1)
            os.makedirs(folder, exist_ok=True)
            temporary = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(temporary, "xb") as f:
                    f.write(data)
                try:
                    os.link(temporary, final)
                except OSError as exc:
                    if exc.errno == errno.EEXIST:
                        raise
                    with open(final, "xb") as f:  # no hard links here (some network or FAT disks): O_EXCL
                        f.write(data)
            finally:
                self._discard(temporary)
        else:
            self.fs.pipe_file(final, data, mode="create")

    def _discard(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except (OSError, FileNotFoundError):
            pass  # never written, or the store is gone: nothing more to do

    def cat_many(self, paths: list[str]) -> dict[str, bytes | None]:
        """Read many small files at once (concurrently on object stores); missing ones map to None."""
        full = [self.path(p) for p in paths]
        found = self.fs.cat(full, on_error="return") if full else {}
        out = {}
        for rel, f in zip(paths, full):
            value = found.get(f, found.get(self.fs._strip_protocol(f)))
            out[rel] = value if isinstance(value, bytes) else None
        return out

    def sizes_many(self, folders: list[str]) -> dict[str, dict[str, int]]:
        """{folder: {file name: size}} of the files directly in each folder (paths relative to the root; a
        missing folder maps to {}). Listed afresh, never from a listing cache (another process may have
        deleted files meanwhile); concurrently on object stores."""
        full = [self.path(*folder.split("/")) for folder in folders]
        if isinstance(self.fs, AsyncFileSystem) and self.fs.async_impl:
            coros = [self.fs._ls(path, detail=True, refresh=True) for path in full]
            listings = sync(self.fs.loop, _run_coros_in_chunks, coros, return_exceptions=True) if coros else []
        else:
            listings = []
            for path in full:
                try:
                    listings.append(self.fs.ls(path, detail=True))
                except Exception as exc:  # noqa: BLE001 - sorted out below, as for the concurrent listings
                    listings.append(exc)
        out = {}
        for folder, listing in zip(folders, listings):
            if isinstance(listing, FileNotFoundError):
                listing = []
            elif isinstance(listing, BaseException):
                raise listing
            out[folder] = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry["size"]) for entry in listing
                           if entry.get("type") == "file"}
        return out

    def list(self, *parts: str) -> list[str]:
        try:
            return sorted(self.fs.ls(self.path(*parts), detail=False))
        except FileNotFoundError:
            return []

    def remove(self, path: str) -> None:
        self.fs.rm(path)


def library_store(url: str, storage_options: dict | None = None) -> Store:
    """The Store of a library under its one spelling: a local path resolved (relative, `..`, symlinks), so that
    every way of naming one library is one library, with one lease and one set of MLflow runs."""
    store = Store(url, storage_options)
    if store.url_prefix == "":
        store = Store(os.path.realpath(store.root), storage_options)
    return store


def require_library(store: Store) -> None:
    """Refuse, creating nothing, a folder that holds no library manifest (a mistyped path, say)."""
    if not store.list(layout.MANIFEST):
        raise InputError(f"{store.url()} holds no library manifest (manifest/*.parquet): not the --output of a "
                         "decompose job, or none has finished there yet")


class UnsafePathError(InputError):
    """A path part from data that would leave its folder."""


def open_url(url: str, storage_options: dict | None = None) -> bytes:
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return f.read()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def url_key(url: str) -> str:
    """A short stable file name for a source URL."""
    return hashlib.sha1(url.encode()).hexdigest()[:20]
