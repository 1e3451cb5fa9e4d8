"""One per-item fit worker, used by both executors: loads the base model once, then fits image after image.

For each item: read the bytes, derive the item id, return at once if the item is already complete (its
`_SUCCESS` marker exists), else count the attempt (so a crash counts too), fit, make the previews, upload the
files (temporary key -> final key), write the marker, track the fit in MLflow (its run id and registered
versions go into the row and the marker; a tracking error only into the row's `tracking_error`), then the
source's row. Every error becomes a `failed` row; only a crash of the process escapes, and the executor
retries the item on a fresh worker.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch

from unziplora import FitConfig, UnZipLoRAError, fit
from unziplora.models import load_base_model_for

from .identify import check_job_settings, identify, ids_of, item_config, plain_row
from .manifest import (SCHEMA_VERSION, empty_row, failed_row, read_attempts, source_key, utc_now,
                       write_attempts)
from .previews import write_previews
from .spec import JobSpec
from .storage import Store, sha256_hex
from .tracking import track_row


class FitWorker:
    """Callable for Ray Data's map_batches (one row per batch), and a plain per-item worker for Ray Train."""

    def __init__(self, job: JobSpec | dict, device: str | torch.device | None = None):
        self.job = job if isinstance(job, JobSpec) else JobSpec(**job)
        self.store = Store(self.job.output, self.job.storage_options)
        self.device = torch.device(device) if device is not None else _assigned_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(self.job.cpus_per_worker)))
        self.base = load_base_model_for(check_job_settings(self.job.fit), device=self.device)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.device}"
        # the driver named the weights in every item id (run_job); a node holding other files under that name
        # must not fit under those ids
        planned = self.job.base_fingerprint
        self.base_mismatch = "" if not planned or self.base.fingerprint == planned else (
            f"the base model {self.base.name} on {socket.gethostname()} is not the one the job planned with "
            f"(fingerprint {self.base.fingerprint}, planned {self.job.base_fingerprint}): make every node hold "
            f"the same weights")
        self.inflight: tuple[str, ...] | None = None  # set by the Train executor: where this rank notes its item

    def __call__(self, batch: dict) -> dict:
        """Ray Data batch (dict of columns) in, manifest rows out, with a `this_run` column."""
        items = [{k: batch[k][i] for k in batch} for i in range(len(batch["source_uri"]))]
        rows = [self.process(plain_row(item)) for item in items]
        return {k: [r.get(k) for r in rows] for k in rows[0]}

    def process(self, item: dict) -> dict:
        """One input -> its manifest row (also stored under sources/), plus `this_run` (fit|reused|failed)."""
        row = self._process(item)
        self.store.write_json(row, *source_key(item["source_uri"]))
        return row

    def _process(self, item: dict) -> dict:
        identity, data = identify(item, self.job)
        if identity["error"] or self.base_mismatch:
            return failed_row(item, identity["error"] or self.base_mismatch, this_run="failed", **ids_of(identity))
        item_id, known = identity["item_id"], ids_of(identity)
        if self.store.exists("items", item_id, "_SUCCESS"):  # e.g. fitted before a Train group restart
            done = self.store.read_json("items", item_id, "_SUCCESS")
            return done | {"source_uri": item["source_uri"], "this_run": "reused"}
        counts = read_attempts(self.store, item_id)
        if crashes(counts, self.job.executor) >= self.job.max_attempts:
            return failed_row(item, f"gave up after {self.job.max_attempts} attempts: the worker process died "
                              "each time it fitted this image", attempts=counts["started"], this_run="failed",
                              **known)
        attempts = counts["started"] + 1
        # saved before the fit, so a crash counts; per item, so a replaced (fixed) file starts from zero
        write_attempts(self.store, item_id, counts | {"started": attempts, "source_uri": item["source_uri"]})
        if self.inflight is not None:  # Train: which item this rank holds, should its process die
            self.store.write_json({"item_id": item_id, "source_uri": item["source_uri"]}, *self.inflight)
        self._maybe_crash(item["source_uri"], attempts)
        try:
            row = self._fit(item, data, item_config(item, self.job), attempts, known)
        except Exception as exc:  # NaN, bad image, out of memory ...: a failed row, never a dead job
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            # the fit reads the image from memory: name the source in the message
            error = f"{item['source_uri']}: {exc}" if isinstance(exc, UnZipLoRAError) else \
                f"{item['source_uri']}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            row = failed_row(item, error, attempts=attempts, worker=self.name, **known)
        # re-read: the Train controller may have charged a crash meanwhile
        write_attempts(self.store, item_id, read_attempts(self.store, item_id) | {"finished": counts["finished"] + 1})
        if self.inflight is not None:
            self.store.write_json({"item_id": None}, *self.inflight)
        if row["status"] == "failed":
            return self._track(row) | {"this_run": "failed"}
        self.store.write_json(row, "items", item_id, "_SUCCESS")  # the item now counts as complete
        return self._track(row) | {"this_run": "fit"}

    def _track(self, row: dict) -> dict:
        """The fit in MLflow, once its files and marker are safe; an error is recorded, never raised."""
        if not (self.job.tracking and self.job.tracking_uri and row.get("item_id")):  # uri: set by run_job
            return row
        row = row | track_row(self.job, row)
        if row["status"] == "ok":  # the marker is the row: a later run or `sync` finds what is tracked
            self.store.write_json(row, "items", row["item_id"], "_SUCCESS")
        return row

    def _fit(self, item: dict, data: bytes, config: FitConfig, attempts: int, known: dict) -> dict:
        item_id = known["item_id"]
        with tempfile.TemporaryDirectory(prefix="unziplora-item-") as tmp:
            result = fit(io.BytesIO(data), config, base=self.base, out_dir=Path(tmp) / "fit", progress=False)
            # per-step losses and mask stats: MLflow's metric history, also for a later `registry sync`
            (result.out_dir / "history.json").write_text(json.dumps(result.history))
            if self.job.preview_steps > 0:
                write_previews(self.base, result.out_dir, self.job.preview_steps)
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
            "worker": self.name, "base_model": record["base_model"],
            "base_model_fingerprint": record["base_model_fingerprint"],
            "code_version": self.job.code_version or code_version(),
            "run_id": self.job.run_id, "finished_at": utc_now(),
        }

    def _maybe_crash(self, uri: str, attempts: int) -> None:
        if any(s in uri for s in self.job.crash_always_on) or \
                (attempts == 1 and any(s in uri for s in self.job.crash_once_on)):
            os._exit(13)  # fault injection: die like an OOM-killed or segfaulted process would


def crashes(counts: dict, executor: str) -> int:
    """How often a fit of this item killed its worker. In an actor pool a dead actor took only its own item,
    so every fit started and never finished is one. Train restarts the whole group when one worker dies, so
    there only the crashes charged to the dead rank's item (`charge_crashed_ranks`) count."""
    if executor == "train":
        return counts.get("crashed", 0)
    return counts["started"] - counts["finished"]


def _assigned_device() -> torch.device:
    """The GPU Ray assigned to this actor (Ray restricts CUDA_VISIBLE_DEVICES to it), else the CPU."""
    import ray

    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def code_version() -> str:
    """The code that runs: $UNZIPLORA_CODE_VERSION when the submitting side sets it (`ray job submit` uploads
    the working tree without .git), else the package version plus the git commit of this checkout, if any."""
    from importlib import metadata

    if os.environ.get("UNZIPLORA_CODE_VERSION"):
        return os.environ["UNZIPLORA_CODE_VERSION"]
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
