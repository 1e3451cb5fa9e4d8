"""Paths on any fsspec filesystem (plain paths, file://, s3://, gs://, ...), with atomic-ish writes.

Object stores have no rename: "atomic" here means write to a temporary key, copy to the final key, delete
the temporary one, and only then write the completion marker that makes the item count as done.
"""

from __future__ import annotations

import hashlib
import json
import uuid

import fsspec
from fsspec.core import url_to_fs


class Store:
    """One root URL and its filesystem; every path method takes paths relative to that root."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.fs, self.root = url_to_fs(root.rstrip("/") or "/", **(storage_options or {}))
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.url_prefix = "" if self.protocol in ("file", "local") else f"{self.protocol}://"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        """A URL a user (or another process) can open: s3://bucket/..., or a local absolute path."""
        return self.url_prefix + self.path(*parts)

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
        """Write via a temporary key in the same folder, then move it into place."""
        final = self.path(*parts)
        folder, name = final.rsplit("/", 1)
        self.fs.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        write(temporary)
        self.fs.mv(temporary, final)

    def cat_many(self, paths: list[str]) -> dict[str, bytes | None]:
        """Read many small files at once (concurrently on object stores); missing ones map to None."""
        full = [self.path(p) for p in paths]
        found = self.fs.cat(full, on_error="return") if full else {}
        out = {}
        for rel, f in zip(paths, full):
            value = found.get(f, found.get(self.fs._strip_protocol(f)))
            out[rel] = value if isinstance(value, bytes) else None
        return out

    def list(self, *parts: str) -> list[str]:
        try:
            return sorted(self.fs.ls(self.path(*parts), detail=False))
        except FileNotFoundError:
            return []

    def remove(self, path: str) -> None:
        self.fs.rm(path)


def open_url(url: str, storage_options: dict | None = None) -> bytes:
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return f.read()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def url_key(url: str) -> str:
    """A short stable file name for a source URL."""
    return hashlib.sha1(url.encode()).hexdigest()[:20]
