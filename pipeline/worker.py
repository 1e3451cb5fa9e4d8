"""One per-item fit worker, used by both executors: loads the base model once, then fits image after image.

For each item, in named steps (`_process`): identify it (read the bytes, derive the item id); reuse it if it
is complete (its `_SUCCESS` marker exists); admit it (give up on an image that killed its worker too often,
else record the attempt first, so a crash leaves the record); fit, make the previews and upload the files
(temporary key -> final key); commit (the marker makes the item count as complete); track it in MLflow (run
id and registered versions go into the row and the marker; a tracking error only into `tracking_error`).
Every error becomes a `failed` row, including a library that cannot be written (a full disk): one line, no
temporary files, no marker, and the attempt's record removed, so it is not charged as a crash. Only a crash
of the process escapes, and the executor retries the item on a fresh worker.
"""

from __future__ import annotations

import errno
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
from .manifest import (crashes, end_attempt, failed_row, ok_row, past_attempts, scrubbed, source_key,
                       start_attempt)
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
        try:
            row = self._process(item)
        except Exception as exc:  # the library could not be read or written: this item fails, the worker lives
            row = failed_row(item, self._failure_text(item, exc), this_run="failed")
        try:  # `reported_by`: the driver takes this run's word over its plan (the bytes may have changed)
            self.store.write_json(row | {"reported_by": self.job.run_id}, *source_key(item["source_uri"]))
        except Exception as exc:  # the row still reaches the driver through the executor
            row = row | {"error": row.get("error") or self._failure_text(item, exc)}
        return row

    def _process(self, item: dict) -> dict:
        identity, data = identify(item, self.job)
        known = ids_of(identity)
        if identity["error"] or self.base_mismatch:
            return failed_row(item, identity["error"] or self.base_mismatch, this_run="failed", **known)
        done = self._complete(known["item_id"])
        if done:  # e.g. fitted before a Train group restart
            return done | {"source_uri": item["source_uri"], "this_run": "reused"}
        attempt, previous = self._admit(item, known["item_id"])
        if attempt is None:
            return failed_row(item, f"gave up after {self.job.max_attempts} attempts: the worker process died "
                              "each time it fitted this image", attempts=previous, this_run="failed", **known)
        row = self._fit_or_fail(item, data, previous + 1, known)
        if row["status"] == "ok":
            self.store.write_json(row, "items", known["item_id"], "_SUCCESS")  # the item now counts as complete
        self._release(known["item_id"], attempt, complete=row["status"] == "ok")
        return self._track(row) | {"this_run": "fit" if row["status"] == "ok" else "failed"}

    def _complete(self, item_id: str) -> dict | None:
        if self.store.exists("items", item_id, "_SUCCESS"):
            return self.store.read_json("items", item_id, "_SUCCESS")
        return None

    def _admit(self, item: dict, item_id: str) -> tuple[str | None, int]:
        """(the record of this attempt, fits of the item that never came back); no record: give up on it."""
        records = past_attempts(self.store, item_id)
        if crashes(records, self.job.executor, self.job.run_id) >= self.job.max_attempts:
            return None, len(records)
        attempt = start_attempt(self.store, item_id, self.job.run_id,
                                {"source_uri": item["source_uri"], "worker": self.name})
        if self.inflight is not None:  # Train: which attempt this rank holds, should its process die
            self.store.write_json({"item_id": item_id, "attempt": attempt}, *self.inflight)
        self._maybe_crash(item["source_uri"], len(records) + 1)
        return attempt, len(records)

    def _release(self, item_id: str, attempt: str, complete: bool) -> None:
        """The fit came back: it is no crash (a complete item needs no records at all)."""
        end_attempt(self.store, item_id, attempt, all_records=complete)
        if self.inflight is not None:
            self.store.write_json({"item_id": None}, *self.inflight)

    def _fit_or_fail(self, item: dict, data: bytes, attempts: int, known: dict) -> dict:
        try:
            return self._fit(item, data, item_config(item, self.job), attempts, known)
        except Exception as exc:  # NaN, bad image, out of memory, a full disk ...: a failed row, never a dead job
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            self._discard_files(known["item_id"])  # what was uploaded of a fit that did not finish
            return failed_row(item, self._failure_text(item, exc), attempts=attempts, worker=self.name, **known)

    def _failure_text(self, item: dict, exc: Exception) -> str:
        """Why this item failed, naming its source: one line for expected errors (bad input, a store that
        cannot be written), a short traceback for anything else (a bug to report)."""
        uri = item["source_uri"]
        if isinstance(exc, UnZipLoRAError):
            return f"{uri}: {exc}"
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return (f"{uri}: could not write {exc.filename or 'to the library'}: {os.strerror(exc.errno)} "
                    f"(the fit is not recorded; free space or fix the store, then run the job again)")
        return f"{uri}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"

    def _discard_files(self, item_id: str) -> None:
        try:
            for path in self.store.list("items", item_id):
                if not path.endswith("/_SUCCESS"):
                    self.store.remove(path)
        except Exception:
            pass  # best effort: without a marker these files are not part of the library anyway

    def _track(self, row: dict) -> dict:
        """The fit in MLflow, once its files and marker are safe; an error is recorded, never raised."""
        if not (self.job.tracking and self.job.tracking_uri and row.get("item_id")):  # uri: set by run_job
            return row
        row = scrubbed(row | track_row(self.job, row))
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
        return ok_row(item, known, result, files, attempts=attempts, worker=self.name,
                      code_version=self.job.code_version or code_version(), run_id=self.job.run_id)

    def _maybe_crash(self, uri: str, attempts: int) -> None:
        if any(s in uri for s in self.job.crash_always_on) or \
                (attempts == 1 and any(s in uri for s in self.job.crash_once_on)):
            os._exit(13)  # fault injection: die like an OOM-killed or segfaulted process would


# a library that cannot be written: a full disk or quota, a read-only or failing store
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.EFBIG}


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
