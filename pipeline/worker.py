"""One per-item fit worker, used by both executors: loads the base model once, then fits image after image.

For each item: read the bytes, derive the item id, return at once if the item is already complete (its
`_SUCCESS` marker exists), else count the attempt (so a crash counts too), fit, upload the files (temporary
key -> final key), write the marker, then the source's row. Every error becomes a `failed` row; only a
crash of the process escapes, and the executor retries the item on a fresh worker.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unziplora import FitConfig, UnZipLoRAError, fit, load_base_model

from .manifest import SCHEMA_VERSION, empty_row, failed_row
from .storage import Store, open_url, sha256_hex, url_key

EXECUTORS = ("actor-pool", "train")


@dataclass
class JobSpec:
    """Everything a worker needs; plain data so Ray can ship it to every worker."""

    input: str
    output: str
    prompts: str | None = None
    default_content: str | None = None
    default_style: str | None = None
    fit: dict = field(default_factory=dict)  # FitConfig settings shared by every item (steps, base_model, ...)
    executor: str = "actor-pool"
    workers: int = 1
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    max_attempts: int = 3  # a source whose fit was started this often without finishing is failed
    storage_options: dict = field(default_factory=dict)
    run_id: str = ""
    # Fault injection, for tests and benchmarks: kill the worker process when it starts an item whose URL
    # contains one of these strings (on the first attempt only, or on every attempt).
    crash_once_on: list[str] = field(default_factory=list)
    crash_always_on: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class FitWorker:
    """Callable for Ray Data's map_batches (one row per batch), and a plain per-item worker for Ray Train."""

    def __init__(self, job: JobSpec | dict, device: str | torch.device | None = None):
        self.job = job if isinstance(job, JobSpec) else JobSpec(**job)
        self.store = Store(self.job.output, self.job.storage_options)
        self.device = torch.device(device) if device is not None else _assigned_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(self.job.cpus_per_worker)))
        self.base = load_base_model(self.job.fit.get("base_model", "tiny"), device=self.device,
                                    precision=self.job.fit.get("precision", "bf16"))
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.device}"

    def __call__(self, batch: dict) -> dict:
        """Ray Data batch (dict of columns) in, manifest rows out, with a `this_run` column."""
        items = [{k: batch[k][i] for k in batch} for i in range(len(batch["source_uri"]))]
        rows = [self.process(plain_row(item)) for item in items]
        return {k: [r.get(k) for r in rows] for k in rows[0]}

    def process(self, item: dict) -> dict:
        """One input -> its manifest row (also stored under sources/), plus `this_run` (fit|reused|failed)."""
        row = self._process(item)
        self.store.write_json(row, "sources", url_key(item["source_uri"]) + ".json")
        return row

    def _process(self, item: dict) -> dict:
        identity, data = identify(item, self.job)
        if identity["error"]:
            return failed_row(item, identity["error"], this_run="failed", **_ids(identity))
        item_id, known = identity["item_id"], _ids(identity)
        if self.store.exists("items", item_id, "_SUCCESS"):  # e.g. fitted before a Train group restart
            done = self.store.read_json("items", item_id, "_SUCCESS")
            return done | {"source_uri": item["source_uri"], "this_run": "reused"}
        attempts = self._count_attempt(item_id, item["source_uri"])
        if attempts > self.job.max_attempts:
            return failed_row(item, f"gave up after {self.job.max_attempts} attempts: the worker process died "
                              "each time it fitted this image", attempts=attempts - 1, this_run="failed", **known)
        self._maybe_crash(item["source_uri"], attempts)
        try:
            row = self._fit(item, data, item_config(item, self.job), attempts, known)
        except Exception as exc:  # NaN, bad image, out of memory ...: a failed row, never a dead job
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            error = str(exc) if isinstance(exc, UnZipLoRAError) else \
                f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            return failed_row(item, error, attempts=attempts, this_run="failed", worker=self.name, **known)
        self.store.write_json(row, "items", item_id, "_SUCCESS")  # last: the item now counts as complete
        return row | {"this_run": "fit"}

    def _fit(self, item: dict, data: bytes, config: FitConfig, attempts: int, known: dict) -> dict:
        item_id = known["item_id"]
        with tempfile.TemporaryDirectory(prefix="unziplora-item-") as tmp:
            result = fit(io.BytesIO(data), config, base=self.base, out_dir=Path(tmp) / "fit", progress=False)
            files = {}
            for path in sorted(result.out_dir.iterdir()):
                self.store.upload_file(str(path), "items", item_id, path.name)
                files[path.name] = {"uri": self.store.url("items", item_id, path.name),
                                    "sha256": sha256_hex(path.read_bytes()), "bytes": path.stat().st_size}
        record, cfg = result.record, result.config
        return empty_row(item["source_uri"]) | known | {
            "schema_version": SCHEMA_VERSION, "status": "ok", "attempts": attempts,
            "content": cfg.content, "style": cfg.style, "class_word": cfg.resolved_class_word,
            "prompt_combined": record["prompts"]["combined"], "prompt_content": record["prompts"]["content"],
            "prompt_style": record["prompts"]["style"],
            "output_uri": self.store.url("items", item_id),
            "content_lora_uri": files["content_lora.safetensors"]["uri"],
            "style_lora_uri": files["style_lora.safetensors"]["uri"],
            "files": json.dumps(files, sort_keys=True),
            "rank": cfg.rank, "steps": cfg.steps, "resolution": cfg.resolution, "seed": cfg.seed,
            "final_loss": record["final"]["loss"], "final_mse": record["final"]["mse"],
            "final_ortho": record["final"]["ortho"], "mask_stats": json.dumps(record["mask_stats"]),
            "train_s": record["timings"]["train_s"], "total_s": record["timings"]["total_s"],
            "worker": self.name, "base_model": record["base_model"], "code_version": code_version(),
            "run_id": self.job.run_id, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _count_attempt(self, item_id: str, uri: str) -> int:
        key = ("attempts", item_id + ".json")  # per item: a replaced (fixed) file starts from zero
        attempts = self.store.read_json(*key)["attempts"] + 1 if self.store.exists(*key) else 1
        self.store.write_json({"source_uri": uri, "attempts": attempts}, *key)
        return attempts

    def _maybe_crash(self, uri: str, attempts: int) -> None:
        if any(s in uri for s in self.job.crash_always_on) or \
                (attempts == 1 and any(s in uri for s in self.job.crash_once_on)):
            os._exit(13)  # fault injection: die like an OOM-killed or segfaulted process would


def item_config(item: dict, job: JobSpec) -> FitConfig:
    """The job's fit settings, the item's prompts, then the item's overrides from the prompt table."""
    prompts = {k: item.get(k) for k in ("content", "style", "class_word", "prompt", "content_prompt",
                                       "style_prompt") if item.get(k)}
    return FitConfig.from_dict({**job.fit, **prompts, **json.loads(item.get("overrides") or "{}")})


def identify(item: dict, job: JobSpec) -> tuple[dict, bytes | None]:
    """The item's id (hash of its image bytes + hash of its settings), or why it cannot be fitted."""
    out = {"item_id": None, "image_sha256": None, "settings_sha256": None, "error": item.get("prompt_error")}
    if out["error"]:
        return out, None
    try:
        data = open_url(item["source_uri"], job.storage_options)
    except Exception as exc:  # missing, permissions, network: the item fails, the job goes on
        return out | {"error": f"cannot read {item['source_uri']}: {exc}"}, None
    try:
        config = item_config(item, job)
    except UnZipLoRAError as exc:
        return out | {"error": str(exc)}, None
    image_sha = sha256_hex(data)
    settings_sha = sha256_hex(json.dumps(config.to_dict(), sort_keys=True).encode())
    item_id = sha256_hex(f"{image_sha}:{settings_sha}".encode())[:24]
    return out | {"item_id": item_id, "image_sha256": image_sha, "settings_sha256": settings_sha}, data


def identify_row(item: dict, job: dict) -> dict:
    """Ray Data `map` form of `identify`: the item row plus its id columns ("" for none)."""
    identity, _ = identify(plain_row(item), JobSpec(**job))
    return dict(item) | {k: v or "" for k, v in identity.items()}


def _ids(identity: dict) -> dict:
    return {k: identity[k] for k in ("item_id", "image_sha256", "settings_sha256")}


def _assigned_device() -> torch.device:
    """The GPU Ray assigned to this actor (Ray restricts CUDA_VISIBLE_DEVICES to it), else the CPU."""
    import ray

    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def plain_row(item: dict) -> dict:
    """numpy scalars from a Ray batch -> Python values; "" (no value) -> None."""
    values = {k: (v.item() if hasattr(v, "item") else v) for k, v in item.items()}
    return {k: (None if v == "" else v) for k, v in values.items()}


def code_version() -> str:
    from importlib import metadata

    try:
        version = metadata.version("unziplora")
    except metadata.PackageNotFoundError:
        version = "unknown"
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        sha = (head.parent / ref[5:]).read_text().strip() if ref.startswith("ref: ") else ref
        return f"{version}+g{sha[:10]}"
    except OSError:
        return version
