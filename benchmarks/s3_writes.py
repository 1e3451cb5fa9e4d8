"""S3 requests and bytes of one fit's export (its files into the library, the check, the marker), before and
after issue 31: each LoRA once instead of in two formats, and each file written straight to its final key
instead of a temporary key moved into place (on S3 a move is a server-side copy plus a delete). A middle round,
the new write path with the old two-format files, tells the two changes apart.

    .venv/bin/python benchmarks/s3_writes.py                 # SDXL-size files: 1.9 GB through moto, ~2 min
    .venv/bin/python benchmarks/s3_writes.py --scale tiny    # the same files, 1/1000 of the size (seconds)

The library is on a moto S3 server in this process, behind a WSGI layer that counts every request by S3
operation, the bytes sent in request bodies and the bytes copied server-side (CopyObject / UploadPartCopy).
The export is pipeline.run.worker.upload_fit_files (the worker's own code) and the marker write; "before" runs the
same code with the old write path (temporary key, then fs.mv) and the old file set. File sizes come from the
budget model (benchmarks/sdxl_budget.py --export-bytes); the text files and previews get nominal sizes.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.store import layout, storage  # noqa: E402
from pipeline.store.storage import Store  # noqa: E402
from pipeline.run.worker import upload_fit_files  # noqa: E402
from unziplora import fit_files as names  # noqa: E402

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# SDXL rank 64, fp16 (sdxl_budget.export_bytes, counted 2026-12-04)
LORA_BYTES = 186_047_096
GATE_BYTES = 5_478_624
# the other files of a job's fit: nominal sizes (text files are a few KB; previews depend on the images)
OTHER_FILES = {names.RECORD: 8_000, names.CONFIG: 1_000, names.CARD: 4_000, names.HISTORY: 60_000,
               names.PREVIEWS["content"]: 1_000_000, names.PREVIEWS["style"]: 1_000_000, names.PREVIEW_PROMPTS: 1_000,
               names.SCORES: 300}


def fit_files(formats: tuple[str, ...], scale: float) -> dict[str, int]:
    """name -> size of the files one fit hands to the library with these LoRA formats."""
    from unziplora.export import lora_file_name

    files = {lora_file_name(kind, fmt, formats): LORA_BYTES for kind in ("content", "style") for fmt in formats}
    files |= {names.MERGERS: GATE_BYTES, names.MASKS: GATE_BYTES} | OTHER_FILES
    return {name: max(1, int(size * scale)) for name, size in files.items()}


def s3_operation(environ: dict) -> str:
    """The S3 API operation of a request, from its method, query and headers."""
    method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
    keys = {part.split("=", 1)[0] for part in query.split("&") if part}
    key_path = environ.get("PATH_INFO", "/").strip("/").count("/") > 0  # bucket/key, not the bucket alone
    if method == "PUT":
        if "partNumber" in keys:
            return "UploadPartCopy" if "HTTP_X_AMZ_COPY_SOURCE" in environ else "UploadPart"
        if "HTTP_X_AMZ_COPY_SOURCE" in environ:
            return "CopyObject"
        return "PutObject" if key_path else "CreateBucket"
    if method == "POST":
        if "uploads" in keys:
            return "CreateMultipartUpload"
        if "uploadId" in keys:
            return "CompleteMultipartUpload"
        return "DeleteObjects" if "delete" in keys else "POST"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in keys else "DeleteObject"
    if method == "HEAD":
        return "HeadObject" if key_path else "HeadBucket"
    if "list-type" in keys or not key_path:
        return "ListObjectsV2" if "list-type" in keys else "ListBuckets/ListObjects"
    return "GetObject"


class CountingMoto:
    """A moto S3 server on 127.0.0.1 (as the tests' LocalS3) whose every request is counted."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.lock = threading.Lock()
        self.reset()
        app = DomainDispatcherApplication(create_backend_app)
        self.server = make_server("127.0.0.1", 0, self._counted(app), True, request_handler=MotoRequestHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.requests: collections.Counter = collections.Counter()
            self.sent = 0  # bytes in request bodies
            self.copy_targets: list[tuple[str, int | None]] = []  # (bucket/key, bytes) of every server-side copy

    def _counted(self, app):
        def counted(environ, start_response):
            op = s3_operation(environ)
            with self.lock:
                self.requests[op] += 1
                self.sent += int(environ.get("CONTENT_LENGTH") or 0)
                if "HTTP_X_AMZ_COPY_SOURCE" in environ:  # a part copy names its byte range
                    span = environ.get("HTTP_X_AMZ_COPY_SOURCE_RANGE", "").removeprefix("bytes=")
                    first, _, last = span.partition("-")
                    size = int(last) - int(first) + 1 if last else None  # None: the whole object
                    self.copy_targets.append((environ["PATH_INFO"].strip("/"), size))
            return app(environ, start_response)
        return counted

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()


@contextmanager
def write_path(old: bool):
    """The old write path (every store renames a temporary key into place) or the current one."""
    saved = set(storage.WHOLE_OBJECT_WRITES)
    if old:
        storage.WHOLE_OBJECT_WRITES.clear()
    try:
        yield
    finally:
        storage.WHOLE_OBJECT_WRITES.update(saved)


def export_one_fit(server: CountingMoto, store: Store, folder: Path, item_id: str) -> dict:
    """The worker's export of one fit: its files, the check, the marker; the requests it made, and the bytes
    its server-side copies moved (each copy's target is a final key: its size once the round is over)."""
    server.reset()
    files = upload_fit_files(store, item_id, folder)
    store.write_json({"item_id": item_id, "status": "ok", "files": json.dumps(files)}, *layout.marker(item_id))
    with server.lock:
        requests, sent, targets = dict(server.requests), server.sent, list(server.copy_targets)
    sizes = {store.path(*layout.item(item_id, p.rsplit('/', 1)[-1])): store.fs.size(p)
             for p in store.fs.ls(store.path(*layout.item(item_id)), detail=False, refresh=True)}
    return {"requests": sum(requests.values()), "by_operation": dict(sorted(requests.items())), "bytes_sent": sent,
            "copies": sum(requests.get(op, 0) for op in ("CopyObject", "UploadPartCopy")),
            "bytes_copied": sum(sizes.get(target, 0) if size is None else size for target, size in targets),
            "file_bytes": sum(p.stat().st_size for p in folder.iterdir())}


def measure(scale: float) -> dict:
    """Both rounds (before, after) on one server; returns their counts and the ratios."""
    os.environ.update({k: os.environ.get(k, v) for k, v in AWS.items()})
    import boto3

    server = CountingMoto()
    try:
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket="lib")
        out = {"scale": scale}
        with tempfile.TemporaryDirectory(prefix="s3-writes-") as tmp:
            # the middle round separates the two changes: the new write path with the old file set
            for name, formats, old in (("before", ("diffusers", "kohya"), True),
                                       ("direct writes, both formats", ("diffusers", "kohya"), False),
                                       ("after", ("kohya",), False)):
                folder = Path(tmp, name)
                folder.mkdir()
                for file, size in fit_files(formats, scale).items():
                    with open(folder / file, "wb") as f:  # random bytes: nothing for a store to deduplicate
                        for start in range(0, size, 1 << 24):
                            f.write(os.urandom(min(1 << 24, size - start)))
                store = Store("s3://lib/library", {"endpoint_url": server.endpoint, "skip_instance_cache": True})
                with write_path(old):
                    out[name] = export_one_fit(server, store, folder, f"item-{len(out)}")
                for path in folder.iterdir():
                    path.unlink()
        out["requests_ratio"] = out["after"]["requests"] / out["before"]["requests"]
        out["bytes_sent_ratio"] = out["after"]["bytes_sent"] / out["before"]["bytes_sent"]
        out["write_path_requests_ratio"] = out["direct writes, both formats"]["requests"] / out["before"]["requests"]
        return out
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="sdxl", help="sdxl (real sizes), tiny (1/1000) or a factor")
    parser.add_argument("--json", help="write the figures here, as a result file (docs/results/s3_writes.json)")
    args = parser.parse_args()
    scale = {"sdxl": 1.0, "tiny": 1e-3}.get(args.scale) or float(args.scale)
    result = measure(scale)
    for name in ("before", "direct writes, both formats", "after"):
        r = result[name]
        print(f"{name}: {r['requests']} requests, {r['bytes_sent'] / 1e6:.1f} MB sent, {r['copies']} copies "
              f"({r['bytes_copied'] / 1e6:.1f} MB copied server-side) for {r['file_bytes'] / 1e6:.1f} MB of files")
        print("   " + ", ".join(f"{op} {n}" for op, n in r["by_operation"].items()))
    print(f"requests after/before: {result['requests_ratio']:.3f} (the write path alone: "
          f"{result['write_path_requests_ratio']:.3f}); bytes sent after/before: {result['bytes_sent_ratio']:.3f}")
    if args.json:
        try:
            from benchmarks import results as result_files
        except ImportError:  # run as a file: benchmarks/ is sys.path[0]
            import results as result_files
        result_files.save(args.json, result)


if __name__ == "__main__":
    main()
