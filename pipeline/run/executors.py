"""Two ways to drive the same FitWorker over a Ray Dataset of small item rows (URLs + prompts).

- actor pool (default): Ray Data `map_batches` with a pool of FitWorker actors, one row per batch (K with
  `fits_per_worker`) and `batches_in_flight` tasks per actor (1 on CPU, so an idle worker pulls the next image;
  2 on a GPU, so uploads overlap the next fit); a
  crashed actor is restarted and only its batch is retried (Ray Data's defaults for actors: max_restarts=-1,
  max_task_retries=-1).
- Ray Train: a TorchTrainer whose workers each consume a streaming shard, K rows at a time (`feed`, with
  `batches_in_flight` batches in threads). Train V2's traps,
  handled: the default DataConfig splits with equal=True and DROPS rows, so we split with equal=False;
  report() is a barrier, so every worker calls it exactly once, at the end; a worker failure restarts the
  whole group, which re-streams from row 0 - finished items are skipped through their markers; max_failures
  is set (its default, 0, would end the job at the first crash).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import ray
from tqdm.auto import tqdm

from unziplora.errors import UnZipLoRAError

from ..store import layout
from .identify import item_config, plain_row
from ..store.manifest import SCHEMA, charge_crash
from .spec import JobSpec
from ..store.storage import Store
from .worker import FitWorker

START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class JobError(UnZipLoRAError, RuntimeError):
    """The job cannot go on (no fit worker can start); the items not fitted keep no row of this run."""


def longest_first(items: list[dict], job: JobSpec) -> list[dict]:
    """The items in the order to hand them out: the costliest fits (steps x pixels) first, so that the job does
    not end with one worker on a long fit while the others idle, and fits of one length share a batch."""
    def cost(item: dict) -> int:
        try:
            config = item_config(item, job)
        except Exception:  # a bad override fails in its worker, with its own error
            return 0
        return config.steps * (config.resolution or 1024) ** 2

    return sorted(items, key=cost, reverse=True)  # stable: equal costs keep their order


def item_dataset(items: list[dict]):
    """One row per block: rows are handed out one by one, never batched behind a slow fit."""
    return ray.data.from_items(items, override_num_blocks=len(items))


def run_actor_pool(job: JobSpec, items: list[dict], progress: bool = True) -> dict[str, dict]:
    """Fit `items`; returns the rows the workers returned, by source URL."""
    fitted = item_dataset(items).map_batches(
        FitWorker, fn_constructor_kwargs={"job": job.to_dict()}, batch_size=job.scaling.fits_per_worker,
        # `in_flight` batches per actor, run in threads: FitWorker holds its device lock only while it fits
        compute=ray.data.ActorPoolStrategy(size=job.scaling.workers,
                                           max_tasks_in_flight_per_actor=job.scaling.in_flight,
                                           max_concurrent_calls_per_actor=job.scaling.in_flight,
                                           enable_true_multi_threading=job.scaling.in_flight > 1),
        num_cpus=job.scaling.cpus_per_worker, num_gpus=job.scaling.gpus_per_worker)
    counts = Counter()
    rows = {}
    with tqdm(total=len(items), desc="images", unit="img", disable=not progress) as bar:
        for row in fitted.iter_rows():  # streams: results arrive as fits finish
            row = manifest_row(row)
            rows[row["source_uri"]] = row
            counts[row["this_run"]] += 1
            bar.update()
            bar.set_postfix(fit=counts["fit"], reused=counts["reused"], failed=counts["failed"])
    return rows


def manifest_row(row: dict) -> dict:
    """A row as Ray Data hands it back (numpy scalars, NaN for a missing number) -> manifest values."""
    out = plain_row(row)
    for field in SCHEMA:
        value = out.get(field.name)
        if isinstance(value, float) and value != value:
            out[field.name] = None
        elif value is not None and pa.types.is_integer(field.type):
            out[field.name] = int(value)
    return out


def run_train(job: JobSpec, items: list[dict], progress: bool = True, storage_path: str | None = None) -> dict:
    """Fit `items`; the workers store their rows (Train returns no rows).

    Train waits for its whole worker group: after a node is lost, or on a cluster smaller than asked, it would
    wait for CPUs forever. Here a group that cannot start within `train_start_timeout_s` goes on with the
    workers the cluster's live nodes hold (finished items are skipped), or the job fails in one line."""
    from ray.train import ControllerError

    workers, retries = job.scaling.workers, 0
    while True:
        try:
            _fit_with_train(job, items, workers, storage_path)
            return {}
        except ControllerError as error:
            cause = type(error.controller_failure).__name__
            if cause not in ("WorkerGroupStartupTimeoutError", "InsufficientClusterResourcesError",
                             "WorkerGroupStartupFailedError"):
                raise
            held = min(job.scaling.workers, workers_the_cluster_holds(job))
            need = _worker_resources(job)
            if held == 0:
                raise JobError("Ray Train could not start a fit worker within "
                               f"{job.scaling.train_start_timeout_s:.0f} s: "
                               f"no live node has {need} (lower --cpus-per-worker/--gpus-per-worker, or add a node)"
                               ) from None
            if held >= workers:  # the cluster holds them, yet they did not start: another job, a node starting
                retries += 1
                if retries > 2:
                    raise JobError(f"Ray Train could not start {workers} fit workers of {need} within "
                                   f"{job.scaling.train_start_timeout_s:.0f} s, three times ({cause}); the cluster "
                                   "holds "
                                   f"{held}: is another job using them?") from None
                continue
            print(f"Ray Train could not start {workers} fit workers within {job.scaling.train_start_timeout_s:.0f} s; "
                  f"going on with {held}, what the live nodes hold", file=sys.stderr, flush=True)
            workers = held


def workers_the_cluster_holds(job: JobSpec) -> int:
    """How many fit workers the live nodes' resources hold in all (each worker on one node)."""
    need = {k: v for k, v in _worker_resources(job).items() if v > 0}
    held = 0
    for node in ray.nodes():
        if node.get("Alive"):
            have = node.get("Resources", {})
            held += int(min(have.get(k, 0.0) // v for k, v in need.items()))
    return held


def _worker_resources(job: JobSpec) -> dict[str, float]:
    scaling = job.scaling
    return {"CPU": scaling.cpus_per_worker} | ({"GPU": scaling.gpus_per_worker} if scaling.gpus_per_worker else {})


def _fit_with_train(job: JobSpec, items: list[dict], workers: int, storage_path: str | None) -> None:
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
    from ray.train.torch import TorchTrainer

    class UnevenSplit(DataConfig):
        """Like DataConfig, but splits with equal=False: every row is fitted, none dropped."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            splits = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                for i, split in enumerate(ds.streaming_split(world_size, equal=False,
                                                             locality_hints=worker_node_ids)):
                    splits[i][name] = split
            return splits

    class ChargeCrashedRanks(UserCallback):
        """Runs in the Train controller: when workers fail, charge a crash to the items each failed rank held
        (its batch: which of them killed it cannot be told; the other ranks' items were only interrupted by the
        group restart)."""

        def after_exception(self, run_context, worker_exceptions):
            store = Store(job.output, job.storage_options)
            for rank in worker_exceptions:
                key = inflight_key(job, rank)
                for held in (store.read_json(*key) if store.exists(*key) else {}).get("held", []):
                    charge_crash(store, held["item_id"], held["attempt"])
                store.write_json({"held": []}, *key)

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"job": job.to_dict()},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(job.scaling.gpus_per_worker),
                                     resources_per_worker=_worker_resources(job)),
        datasets={"items": item_dataset(items)},
        dataset_config=UnevenSplit(),
        run_config=RunConfig(
            name=f"unziplora-{job.state.run_id}-{workers}w-{uuid.uuid4().hex[:6]}",
            storage_path=storage_path or tempfile.mkdtemp(prefix="unziplora-train-"),
            # each restart makes progress (finished items are skipped, crashing ones are counted and given
            # up on after max_attempts), so this bound is only against crashes outside any item; a group that
            # cannot start is not retried by the controller (it would wait forever) but by run_train
            failure_config=FailureConfig(max_failures=job.failure.max_attempts * len(items) + 1,
                                         controller_failure_limit=0),
            callbacks=[ChargeCrashedRanks()],
        ),
    )
    # the controller reads its start timeout from this variable, which Train hands from the driver to it
    previous = os.environ.get(START_TIMEOUT_VAR)
    os.environ[START_TIMEOUT_VAR] = str(job.scaling.train_start_timeout_s)
    try:
        trainer.fit()
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT_VAR, None)
        else:
            os.environ[START_TIMEOUT_VAR] = previous


def _train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    job = JobSpec(**config["job"])
    inflight = inflight_key(job, ray.train.get_context().get_world_rank())
    # what this rank held in an earlier group was interrupted, not crashed: should this process die before it
    # holds anything (loading the model, say), nothing is charged
    Store(job.output, job.storage_options).write_json({"held": []}, *inflight)
    worker = FitWorker(job, device=ray.train.torch.get_device())
    worker.inflight = inflight
    shard = ray.train.get_dataset_shard("items")
    batches = shard.iter_batches(batch_size=job.scaling.fits_per_worker, batch_format="numpy", prefetch_batches=0)
    ray.train.report({"items": feed(worker, batches, job.scaling.in_flight)})  # a barrier: exactly once per worker


def feed(worker: FitWorker, batches, in_flight: int = 1) -> int:
    """Every batch through the worker, `in_flight` at a time (threads that take the next batch when theirs is
    done): while one batch holds the device, the others are read, identified, uploaded and tracked. Returns how
    many items went through."""
    taking, batches = threading.Lock(), iter(batches)

    def drain() -> int:
        done = 0
        while True:
            with taking:
                batch = next(batches, None)
            if batch is None:
                return done
            done += len(worker(batch)["source_uri"])

    if in_flight == 1:
        return drain()
    with ThreadPoolExecutor(in_flight, thread_name_prefix="batch") as pool:
        return sum(f.result() for f in [pool.submit(drain) for _ in range(in_flight)])


def inflight_key(job: JobSpec, rank: int) -> tuple[str, str, str]:
    return layout.INFLIGHT, job.state.run_id, f"rank-{rank}.json"


EXECUTORS = {"actor-pool": run_actor_pool, "train": run_train}
