"""Helpers for the dataset-pipeline tests: a local S3 (moto), a small image collection with known outcomes,
an in-process Ray with a deliberate auth mode, and manifest/artifact checks.

Imported by tests/test_pipeline.py and tests/test_cluster.py (plain module, not a conftest).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import socket
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from unziplora.fit_files import CONFIG, FILES, MASKS, MERGERS, RECORD

# Tiny fits: the pipeline is under test, not the fit quality.
FIT = {"steps": 4, "rank": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(seed: int, width: int, height: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Dataset:
    """Files to upload (name -> bytes) and what the manifest must say about each of them."""

    files: dict[str, bytes]
    expected: dict[str, str]  # image name -> ok | failed | skipped
    steps: dict[str, int]  # image name -> the per-image steps of its prompt row (ok images)
    duplicate_of: dict[str, str] = field(default_factory=dict)  # skipped name -> the name it duplicates
    no_prompt: str = ""

    @property
    def images(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".png"))

    def names(self, status: str) -> list[str]:
        return sorted(n for n, s in self.expected.items() if s == status)


def make_dataset(valid: int = 8, corrupt: bool = True, no_prompt: bool = True, duplicate: bool = True,
                 steps_each: int | None = None) -> Dataset:
    """`valid` small random PNGs (64-80 px, uneven steps 4..8, or `steps_each`), a garbage .png and a truncated
    PNG (both with prompt rows), one valid PNG without a prompt row, one byte-identical copy of a valid image
    whose prompt row is identical too (a duplicate), and prompts.csv (image,content,style,steps)."""
    files, expected, steps, rows = {}, {}, {}, []
    for i in range(valid):
        name = f"img{i:02d}.png"
        files[name] = png_bytes(100 + i, 64 + (5 * i) % 17, 64 + (3 * i) % 17)
        expected[name] = "ok"
        steps[name] = steps_each or 4 + i % 5  # 4..8, uneven across images
        rows.append({"image": name, "content": f"sks thing{i}", "style": f"style number {i}", "steps": steps[name]})
    duplicate_of = {}
    if duplicate:
        files["img01_copy.png"] = files["img01.png"]
        expected["img01_copy.png"] = "skipped"
        duplicate_of["img01_copy.png"] = "img01.png"
        rows.append(dict(rows[1], image="img01_copy.png"))
    if corrupt:
        files["garbage.png"] = np.random.default_rng(7).integers(0, 256, 900, dtype=np.uint8).tobytes()
        whole = png_bytes(8, 72, 72)
        files["truncated.png"] = whole[: len(whole) // 2]
        for name in ("garbage.png", "truncated.png"):
            expected[name] = "failed"
            rows.append({"image": name, "content": "sks broken", "style": "broken style", "steps": 4})
    name = ""
    if no_prompt:
        name = "noprompt.png"
        files[name] = png_bytes(9, 70, 66)
        expected[name] = "failed"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["image", "content", "style", "steps"])
    writer.writeheader()
    writer.writerows(rows)
    files["prompts.csv"] = out.getvalue().encode()
    return Dataset(files=files, expected=expected, steps=steps, duplicate_of=duplicate_of, no_prompt=name)


def write_local(dataset: Dataset, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in dataset.files.items():
        (folder / name).write_bytes(data)


# ---------------------------------------------------------------------------------------------------------
# Local S3


class LocalS3:
    """A moto S3 server on 127.0.0.1 in a thread of this process, reachable from Ray worker processes."""

    def __init__(self, bucket: str = "bucket"):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.bucket = bucket
        self.client = self.boto_client()
        self.client.create_bucket(Bucket=bucket)

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint}

    def boto_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def fs(self):
        """A fresh s3fs filesystem (no instance or listing cache), independent of the pipeline's own."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing",
                                 skip_instance_cache=True, use_listings_cache=False)

    def upload(self, dataset: Dataset, prefix: str) -> str:
        for name, data in dataset.files.items():
            self.client.put_object(Bucket=self.bucket, Key=f"{prefix}/{name}", Body=data)
        return f"s3://{self.bucket}/{prefix}"

    def objects(self, prefix: str) -> dict[str, dict]:
        """key -> {etag, modified, size} of every object under `prefix` (paginated)."""
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = {"etag": obj["ETag"], "modified": obj["LastModified"], "size": obj["Size"]}
        return out

    def get(self, url: str) -> bytes:
        assert url.startswith(f"s3://{self.bucket}/"), url
        key = url[len(f"s3://{self.bucket}/"):]
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def stop(self) -> None:
        self.server.stop()


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def local_s3():
    """A LocalS3 server, with its credentials in this process's environment (boto3/s3fs here; Ray fixtures set
    them again for their workers), stopped afterwards."""
    with environ(AWS_ENV):
        server = LocalS3()
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def environ(values: dict[str, str | None]):
    """Set (or with None, remove) environment variables of this process; restore them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------------------
# In-process Ray
#
# Auth mode (Ray >= 2.59 turns token auth on by default for new local clusters): when RAY_AUTH_MODE is
# unset, `ray.init()` switches this process to token mode and creates ~/.ray/auth_token if it is missing,
# while `ray start` (and drivers attaching to a found local cluster) switch to token mode only if such a
# token file already exists - so a leftover ~/.ray would change how the tests run. We set it explicitly.
#
# For the in-process cluster we choose RAY_AUTH_MODE=disabled. The auth mode a process uses is read into Ray's
# C++ config once (when ray is imported - pytest imports it while collecting, via pipeline.run.executors), but the
# GCS/raylet/workers that ray.init() spawns read it from the environment when they start. Setting "token" in
# os.environ now would make the cluster demand a token that this driver does not send (verified: ray.init
# fails with AuthenticationError "... RAY_AUTH_MODE is currently 'disabled'") unless Ray's private
# `Config.initialize("")` is called. "disabled" agrees with the default cached value even without that call,
# reads and writes no token file, and does not depend on ~/.ray; we still refresh the cached config (private
# API, best effort) so that a shell which exported RAY_AUTH_MODE=token cannot split driver and cluster either.
# Trade-off, accepted for a throwaway test cluster: it listens on the machine's interfaces without auth for the
# module's duration (Ray binds to the node IP; _node_ip_address does not change that). The token path - the
# default of real 2.60 clusters - is covered end to end by test_cluster.py, whose cluster runs in fresh
# processes with RAY_AUTH_MODE=token and a per-test RAY_AUTH_TOKEN.


def _refresh_ray_config() -> None:
    try:
        from ray._raylet import Config

        Config.initialize("")  # what ray itself does after changing RAY_AUTH_MODE (authentication_token_setup)
    except Exception:  # pragma: no cover - private API; "disabled" is the default cached mode anyway
        pass


@contextlib.contextmanager
def local_ray(num_cpus: int = 6, env: dict[str, str] | None = None):
    """One private local Ray for a test module. address="local" never attaches to another cluster on this
    machine (a `ray start` one recorded in /tmp/ray/ray_current_cluster, or $RAY_ADDRESS); num_cpus is
    over-declared so fit workers holding CPUs never starve Ray Data's own tasks. `env` is set before
    ray.init so that Ray's worker processes inherit it (e.g. AWS credentials for s3fs)."""
    import ray

    values = {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": None, **(env or {})}
    with environ(values):
        _refresh_ray_config()
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
    _refresh_ray_config()


# ---------------------------------------------------------------------------------------------------------
# Manifest checks


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def by_name(rows: list[dict]) -> dict[str, dict]:
    """Manifest rows keyed by image file name; fails on a repeated source."""
    uris = [r["source_uri"] for r in rows]
    assert len(uris) == len(set(uris)), f"repeated source_uri rows: {sorted(uris)}"
    return {u.rsplit("/", 1)[-1]: r for u, r in zip(uris, rows)}


def check_rows(rows: list[dict], dataset: Dataset, input_url: str, expected: dict | None = None) -> dict[str, dict]:
    """Exactly one row per input image, each with the expected status (`expected`: the dataset's, or a test's
    own) and a sound error / settings."""
    named = by_name(rows)
    assert sorted(named) == dataset.images, (sorted(named), dataset.images)
    for name, row in named.items():
        assert row["source_uri"] == f"{input_url.rstrip('/')}/{name}", row["source_uri"]
    statuses = {name: row["status"] for name, row in named.items()}
    assert statuses == (expected or dataset.expected), statuses
    changed = {n for n, s in (expected or {}).items() if s != dataset.expected[n]}  # the test checks those
    named_all, named = named, {n: r for n, r in named.items() if n not in changed}
    for name in dataset.names("failed"):
        assert row_error(named[name]), f"{name}: failed without an error text"
        assert named[name]["files"] is None and named[name]["content_lora_uri"] is None
    if dataset.no_prompt:
        assert "no prompt row" in named[dataset.no_prompt]["error"], named[dataset.no_prompt]["error"]
    for name in dataset.names("failed"):
        if name != dataset.no_prompt:  # undecodable: the fit itself failed, with the loader's message
            error = named[name]["error"]
            assert "not an image" in error or "truncated" in error or "corrupt" in error, (name, error)
    for name in [n for n in dataset.names("ok") if n in named]:
        row = named[name]
        assert row["error"] is None, (name, row["error"])
        assert row["steps"] == dataset.steps[name], (name, row["steps"])  # per-image override applied
        assert row["rank"] == FIT["rank"]
        assert row["content"] == f"sks thing{int(name[3:5])}"
        assert row["item_id"] and row["image_sha256"] == sha256_hex(dataset.files[name])
        assert row["attempts"] >= 1
    ids = [named[n]["item_id"] for n in dataset.names("ok") if n in named]
    assert len(set(ids)) == len(ids), "distinct images got the same item id"
    for copy, original in dataset.duplicate_of.items():
        assert named[copy]["item_id"] == named[original]["item_id"]
        assert original in named[copy]["error"] and "duplicate" in named[copy]["error"]
        assert named[copy]["content_lora_uri"] == named[original]["content_lora_uri"]
    return named_all


def row_error(row: dict) -> str:
    return (row.get("error") or "").strip()


def files_of(row: dict) -> dict[str, dict]:
    files = json.loads(row["files"])
    assert {*FILES.values(), MERGERS, MASKS, RECORD, CONFIG} <= set(files), sorted(files)
    assert files[FILES["content"]]["uri"] == row["content_lora_uri"]
    assert files[FILES["style"]]["uri"] == row["style_lora_uri"]
    return files


def check_artifacts(row: dict, read) -> dict[str, bytes]:
    """Every file of an ok row exists (read via `read(uri)`) with the sha256 and size the row records."""
    out = {}
    for name, info in files_of(row).items():
        data = read(info["uri"])
        assert sha256_hex(data) == info["sha256"], f"{info['uri']}: sha256 differs from the manifest"
        assert len(data) == info["bytes"]
        out[name] = data
    return out


def assert_lora_loads(pipe, files: dict[str, bytes], folder) -> None:
    """The content (and style) LoRA files load into a diffusers SDXL pipeline of the tiny base model."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (FILES["content"], FILES["style"]):
        (folder / name).write_bytes(files[name])
    try:
        pipe.load_lora_weights(str(folder), weight_name=FILES["content"], adapter_name="content")
        pipe.load_lora_weights(str(folder), weight_name=FILES["style"], adapter_name="style")
        adapters = pipe.get_list_adapters()
        assert "content" in adapters.get("unet", []) and "style" in adapters.get("unet", []), adapters
        lora_modules = [n for n, _ in pipe.unet.named_modules() if n.endswith("lora_A.content")]
        assert lora_modules, "no LoRA layer was attached to the UNet"
    finally:
        pipe.unload_lora_weights()
