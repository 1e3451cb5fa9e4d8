"""One fit worker, used by both executors: loads the base model once, then fits image after image, or
several images at once (`--fits-per-worker K`: trained together in one batched UNet pass, `unziplora.fit_many`).

For each item, in named steps (`process_many`): identify it (read the bytes, derive the item id); reuse it if it
is complete (its `_SUCCESS` marker exists); admit it (give up on an image that killed its worker too often,
else record the attempt first, so a crash leaves the record); fit, make the previews and upload the files
(each written whole: pipeline.store.storage); commit (the marker makes the item count as complete); track it
in MLflow (run id and registered versions go into the row and the marker; a tracking error only into
`tracking_error`).
Every error becomes a `failed` row, including a library that cannot be written (a full disk): one line, no
temporary files, no marker, and the attempt's record removed, so it is not charged as a crash. Only a crash
of the process escapes, and the executor retries the item on a fresh worker.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unziplora import FitConfig, UnZipLoRAError, fit_files, fit_many
from unziplora.export import FitArtifacts, write_fit
from unziplora.models import load_base_model_for
from unziplora.quiet import quiet_libraries
from unziplora.redact import redact

from ..store import layout
from .identify import batch_columns, batch_rows, check_job_settings, identify, ids_of, item_config, plain_row
from ..store.manifest import (LibraryChangedError, clear_attempts, crashes, earlier_candidates, end_attempt, failed_row,
                              marker_problems, note_attempt, ok_row, past_attempts, scrubbed, source_key, start_attempt)
from ..quality.gate import fit_gated
from ..quality.previews import draw_previews, save_previews
from ..quality.scoring import load_scorer, scorer_spec
from .spec import JobSpec
from ..store.storage import Store, sha256_hex
from ..registry.tracking import track_row


class FitWorker:
    """Callable for Ray Data's map_batches (one row per batch), and a plain per-item worker for Ray Train."""

    def __init__(self, job: JobSpec | dict, device: str | torch.device | None = None):
        quiet_libraries()  # a worker on another node inherits none of the driver's settings
        self.job = job if isinstance(job, JobSpec) else JobSpec(**job)
        self.store = Store(self.job.output, self.job.storage_options)
        self.device = torch.device(device) if device is not None else _assigned_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(self.job.scaling.cpus_per_worker)))
        self.base = load_base_model_for(check_job_settings(self.job.fit), device=self.device)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.device}"
        # the driver named the weights in every item id (run_job); a node holding other files under that name
        # must not fit under those ids
        planned = self.job.state.base_fingerprint
        self.base_mismatch = "" if not planned or self.base.fingerprint == planned else (
            f"the base model {self.base.name} on {socket.gethostname()} is not the one the job planned with "
            f"(fingerprint {self.base.fingerprint}, planned {self.job.state.base_fingerprint}): make every node hold "
            f"the same weights")
        self.inflight: tuple[str, ...] | None = None  # set by the Train executor: where this rank notes its items
        self.held: list[dict] = []  # Train: the attempts this rank holds now (the batch on its device)
        # one batch on the device at a time; with several in flight the others read, upload and track meanwhile
        self.device_lock = threading.Lock()
        spec = scorer_spec(self.job.previews.scorer, self.base.name) if self.job.previews.steps > 0 else None
        self.scorer = load_scorer(spec, self.base) if spec else None

    def __call__(self, batch: dict) -> dict:
        """Ray Data batch (dict of columns) in, manifest rows out, with a `this_run` column."""
        # a column for every key: a reused marker of an older run may lack some
        return batch_columns(self.process_many([plain_row(item) for item in batch_rows(batch)]))

    def process(self, item: dict) -> dict:
        """One input -> its manifest row (also stored under sources/), plus `this_run` (fit|reused|failed)."""
        return self.process_many([item])[0]

    def process_many(self, items: list[dict]) -> list[dict]:
        """Several inputs -> their rows, in order. Those to fit train together in one batch (`fit_many`), except
        an image whose fit already killed a worker: it is fitted alone, its attempt recorded only for its own
        fit, so a poison image is charged its crashes and its batch mates at most the one it shared with them."""
        rows: dict[int, dict] = {}
        ready: list[_Ready] = []
        for n, item in enumerate(items):
            try:
                outcome = self._before_fit(item)
            except Exception as exc:  # the library could not be read or written: this item fails, the worker lives
                outcome = failed_row(item, self._failure_text(item, exc), this_run="failed")
            if isinstance(outcome, _Ready):
                outcome.n = n
                ready.append(outcome)
            else:
                rows[n] = outcome
        together = [r for r in ready if not r.crashed]
        for group in ([together] if together else []) + [[r] for r in ready if r.crashed]:
            try:
                rows |= self._fit_group(group)
            except Exception as exc:
                rows |= {r.n: failed_row(r.item, self._failure_text(r.item, exc), this_run="failed")
                         for r in group if r.n not in rows}
        return [self._report(item, rows[n]) for n, item in enumerate(items)]

    def _report(self, item: dict, row: dict) -> dict:
        try:  # `reported_by`: the driver takes this run's word over its plan (the bytes may have changed)
            self.store.write_json(row | {"reported_by": self.job.state.run_id}, *source_key(item["source_uri"]))
        except Exception as exc:  # the row still reaches the driver through the executor
            row = row | {"error": row.get("error") or self._failure_text(item, exc)}
        return row

    def _before_fit(self, item: dict) -> dict:
        """The item's row when it needs no fit (it fails first, or it is complete), else a `_Ready`."""
        identity, data = identify(item, self.job)
        known = ids_of(identity)
        if identity["error"] or self.base_mismatch:
            return failed_row(item, identity["error"] or self.base_mismatch, this_run="failed", **known)
        done = self._complete(known["item_id"])
        if done:  # e.g. fitted before a Train group restart
            return done | {"source_uri": item["source_uri"], "this_run": "reused"}
        records = past_attempts(self.store, known["item_id"])
        crashed = crashes(records, self.job.scaling.executor, self.job.state.run_id)
        if crashed >= self.job.failure.max_attempts:
            return failed_row(item, f"gave up after {self.job.failure.max_attempts} attempts: the worker process died "
                              "each time it fitted this image", attempts=len(records), this_run="failed", **known)
        earlier = earlier_candidates(self.store, known["item_id"], records) if self.job.gate.active and records else []
        return _Ready(item=item, data=data, config=item_config(item, self.job), known=known, records=len(records),
                      crashed=crashed, earlier=earlier)

    def _fit_group(self, group: list["_Ready"]) -> dict[int, dict]:
        """Fit the group and draw its previews (the device's work, under the device lock), then per item: files,
        upload, marker, tracking. With two batches in flight (`--batches-in-flight`), this batch's export,
        uploads and tracking, and the next batch's reading and identifying, overlap the other batch's fit."""
        with contextlib.ExitStack() as stack:  # the fits' local folders, until their files are in the library
            out_dirs = [Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unziplora-item-"))) / "fit"
                        for _ in group]
            with self.device_lock:
                results = self._on_device(group, out_dirs, stack)
            results = [self._files(result, out_dir) for result, out_dir in zip(results, out_dirs)]
            rows = [self._upload_or_fail(r, result) for r, result in zip(group, results)]
        out = {}
        for r, row in zip(group, rows):
            item_id = r.known["item_id"]
            try:  # each item on its own: one that cannot be committed does not take its mates' rows along
                if row["status"] == "ok":
                    self.store.write_json(row, *layout.marker(item_id))  # the item now counts as complete
                    if r.records:  # the records of earlier fits that never came back: no longer needed
                        clear_attempts(self.store, item_id)
                out[r.n] = self._track(row) | {"this_run": "fit" if row["status"] == "ok" else "failed"}
            except Exception as exc:
                out[r.n] = failed_row(r.item, self._failure_text(r.item, exc), this_run="failed", **r.known)
        return out

    def _on_device(self, group: list["_Ready"], out_dirs: list[Path], stack: contextlib.ExitStack) -> list:
        """Under the device lock: record an attempt for each item (first, so a crash leaves it), fit them
        together, draw each fit's previews from its tensors, end the attempts (a crash while this batch uploads
        is then charged to no image of it). Per item: (FitResult, drawn previews), or the exception that failed
        it. Ungated fits come back as tensors, written outside the lock; the gate writes its chosen fit's files."""
        attempts = [self._admit(r.item, r.known["item_id"], r.records) for r in group]
        try:
            if self.job.gate.active:  # candidates per image, the best kept (pipeline/quality/gate.py)
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unziplora-candidates-")))
                results = fit_gated([r.data for r in group], [r.config for r in group], base=self.base,
                                    gate=self.job.gate, scorer=self.scorer, out_dirs=out_dirs, workdir=workdir,
                                    steps=self.job.previews.steps, subjects=self.job.previews.subjects,
                                    styles=self.job.previews.styles, formats=self.job.lora_formats,
                                    earlier=[r.earlier for r in group],
                                    on_pass=lambda i, tried: self._note_candidates(group[i], attempts[i], tried))
            else:
                results = fit_many([io.BytesIO(r.data) for r in group], [r.config for r in group], base=self.base,
                                   progress=False, formats=self.job.lora_formats,
                                   on_steps=[step_progress(redact(r.item["source_uri"]), r.config.steps)
                                             for r in group])
            results = [result if isinstance(result, Exception) else (result, self._draw_previews(r, result))
                       for r, result in zip(group, results)]
        except Exception as exc:
            results = [exc] * len(group)
        for n, (r, attempt) in enumerate(zip(group, attempts)):
            try:  # the fit came back: it is no crash
                self._release(r.known["item_id"], attempt)
            except Exception as exc:
                results[n] = exc
        return results

    def _draw_previews(self, ready: "_Ready", result) -> dict | None:
        if self.job.previews.steps <= 0:
            return None
        return draw_previews(self.base, FitArtifacts.of(result), self.job.previews.steps,
                             subjects=self.job.previews.subjects, styles=self.job.previews.styles, scorer=self.scorer,
                             source=ready.data)

    def _files(self, result, out_dir: Path):
        """A finished fit's files in its local folder (CPU work): LoRAs, gates, fit.json and card (unless the
        gate wrote them), history, previews. (result, preview scores), or the error that failed it."""
        if isinstance(result, Exception):
            return result
        result, drawn = result
        try:
            if result.out_dir is None:  # its total time: the fit's, plus this export's, not the wait for the lock
                result.out_dir = write_fit(result, out_dir, formats=self.job.lora_formats,
                                           started=time.perf_counter() - result.record["timings"]["total_s"])
            # per-step losses and mask stats: MLflow's metric history, also for a later `registry sync`
            (result.out_dir / fit_files.HISTORY).write_text(json.dumps(result.history))
            return result, save_previews(drawn, result.out_dir)["scores"]
        except Exception as exc:
            return exc

    def _upload_or_fail(self, ready: "_Ready", result) -> dict:
        """The item's ok row once its files are in the library, or its failed row (NaN, bad image, out of
        memory, a full disk ...): a failed row, never a dead job, and never its batch mates' failure."""
        try:
            if isinstance(result, Exception):
                raise result
            return self._upload(ready, *result)
        except Exception as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            self._discard_files(ready.known["item_id"])  # what was uploaded of a fit that did not finish
            return failed_row(ready.item, self._failure_text(ready.item, exc), attempts=ready.records + 1,
                              worker=self.name, **ready.known)

    def _complete(self, item_id: str) -> dict | None:
        """The item's marker, if it holds (every file it vouches for is there, at its size)."""
        if not self.store.exists(*layout.marker(item_id)):
            return None
        marker = self.store.read_json(*layout.marker(item_id))
        return None if marker_problems(self.store, {item_id: marker}) else marker

    def _admit(self, item: dict, item_id: str, records: int) -> str:
        """Record this attempt (its name is returned) before the fit starts."""
        attempt = start_attempt(self.store, item_id, self.job.state.run_id,
                                {"source_uri": item["source_uri"], "worker": self.name})
        if self.inflight is not None:  # Train: which attempts this rank holds, should its process die
            self.held.append({"item_id": item_id, "attempt": attempt})
            self.store.write_json({"held": self.held}, *self.inflight)
        self._maybe_crash(item["source_uri"], records + 1)
        return attempt

    def _note_candidates(self, ready: "_Ready", attempt: str, tried: list[dict]) -> None:
        """The gate fits more candidates of this item: its attempt's record keeps those scored so far, which a
        run after a crash takes up (gate.fit_gated's `earlier`) instead of fitting them all again."""
        note_attempt(self.store, ready.known["item_id"], attempt, {"candidates": tried})
        faults = self.job.faults.crash_between_candidates_on
        if ready.records == 0 and any(s in ready.item["source_uri"] for s in faults):
            os._exit(13)  # fault injection, as _maybe_crash

    def _release(self, item_id: str, attempt: str) -> None:
        """The fit came back (ok or a handled error): its attempt's record goes, and the rank holds it no more."""
        if self.inflight is not None:
            self.held = [h for h in self.held if h["attempt"] != attempt]
            self.store.write_json({"held": self.held}, *self.inflight)
        end_attempt(self.store, item_id, attempt)

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
            for path in self.store.list(*layout.item(item_id)):
                if path.rsplit("/", 1)[-1] != layout.MARKER:
                    self.store.remove(path)
        except Exception:
            pass  # best effort: without a marker these files are not part of the library anyway

    def _track(self, row: dict) -> dict:
        """The fit in MLflow, once its files and marker are safe; an error is recorded, never raised."""
        if not (self.job.tracking.enabled and self.job.tracking.uri and row.get("item_id")):  # uri: set by run_job
            return row
        row = scrubbed(row | track_row(self.job, row))
        if row["status"] == "ok":  # the marker is the row: a later run or `sync` finds what is tracked
            self.store.write_json(row, *layout.marker(row["item_id"]))
        return row

    def _upload(self, ready: "_Ready", result, scores: dict) -> dict:
        """A finished fit's files into the library; its ok row."""
        files = upload_fit_files(self.store, ready.known["item_id"], result.out_dir)
        return ok_row(ready.item, ready.known, result, files, attempts=ready.records + 1, worker=self.name,
                      code_version=self.job.state.code_version or code_version(), run_id=self.job.state.run_id,
                      **{f"score_{name}": value for name, value in scores.items()})

    def _maybe_crash(self, uri: str, attempts: int) -> None:
        if any(s in uri for s in self.job.faults.crash_always_on) or \
                (attempts == 1 and any(s in uri for s in self.job.faults.crash_once_on)):
            os._exit(13)  # fault injection: die like an OOM-killed or segfaulted process would


def step_progress(name: str, total: int, every: int = 10):
    """A fit's sign of life in the job's output (Ray forwards a worker's stderr to the driver): a line at each
    tenth of its steps, with the time per step."""
    start, marks = time.perf_counter(), {max(1, round(total * k / every)) for k in range(1, every + 1)}

    def on_step(step: int, _metrics: dict) -> None:
        if step + 1 in marks:
            per_step = (time.perf_counter() - start) / (step + 1)
            print(f"fit {name}: step {step + 1}/{total} ({per_step:.2f} s/step)", file=sys.stderr, flush=True)
    return on_step


@dataclass
class _Ready:
    """An item to fit."""

    item: dict
    data: bytes
    config: FitConfig  # its settings (identify checked them)
    known: dict  # its ids (identify.ids_of)
    records: int  # fits of it that never came back
    crashed: int  # how many of those killed a worker (manifest.crashes)
    earlier: list[dict] = field(default_factory=list)  # the gate's candidates those attempts scored (noted)
    n: int = -1  # its place in the worker's batch


def upload_fit_files(store: Store, item_id: str, folder: Path) -> dict[str, dict]:
    """Every file of a finished fit's folder into `items/<item_id>/` (each written whole: Store), checked there;
    returns what the marker will vouch for: {name: {uri, sha256, bytes}}."""
    files = {}
    for path in sorted(folder.iterdir()):
        store.upload_file(str(path), *layout.item(item_id, path.name))
        files[path.name] = {"uri": store.url(*layout.item(item_id, path.name)), "sha256": sha256_hex(path.read_bytes()),
                            "bytes": path.stat().st_size}
    # the marker will vouch for these files: they must be in the library now, whole (a library folder
    # deleted or moved during the job would otherwise leave a marker, and an ok row, with no fit)
    problem = marker_problems(store, {item_id: {"files": json.dumps(files)}})
    if problem:
        raise LibraryChangedError(f"the library lost the fit's files before its marker was written "
                                  f"({problem[item_id]}): was it moved or deleted during the job? "
                                  "Nothing is recorded; the next run fits the image again")
    return files


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
