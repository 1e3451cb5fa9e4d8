"""A decomposition job from start to end: list inputs, run the fits on Ray, write the manifest and report."""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass, field

from unziplora.config import FitConfig
from unziplora.errors import InputError
from unziplora.locate import locate_base_model
from unziplora.redact import redact, scrub

from ..store import layout
from .executors import EXECUTORS, longest_first
from .identify import check_job_settings, identify_batch, identify_row, plain_row
from ..store.layout import marker_key
from ..store.lease import LibraryLease
from .local_ray import exit_cleanly_on_signals, reap_orphans, start_local_ray
from ..store.manifest import (check_item_id, failed_row, loads_json, manifest_rows, manifest_schema_versions,
                       marker_problems, source_key, utc_now, write_manifest)
from .source import Inputs, read_inputs
from ..quality.scoring import load_scorer, scorer_spec
from .spec import JobSpec
from ..store.storage import Store, library_store
from ..registry.sync import needs_tracking
from ..registry.tracking import abort_job, end_job, start_job
from .worker import code_version


def run_job(job: JobSpec, *, address: str | None = None, progress: bool = True) -> dict:
    """Run `job` on the Ray cluster at `address` (or $RAY_ADDRESS, or a new local one); return the report."""
    job.check()  # every number and choice, before anything starts
    exit_cleanly_on_signals()  # SIGTERM (`ray job stop`), SIGHUP: an exit that closes the MLflow run and the lease
    settings = check_job_settings(job.fit)
    scorer = scorer_spec(job.previews.scorer, settings.base_model) if job.previews.steps > 0 else None
    if scorer:
        load_scorer(scorer)  # a scorer that cannot load refuses the job here, not in every worker
    elif job.gate.active:
        raise InputError(f"--candidates {job.gate.limit} needs a scorer to choose among them (--scorer; on "
                         f"{settings.base_model} 'auto' has none) and --preview-steps above 0")
    job = pin_base_model(job, settings)
    reap_orphans()  # what a killed local job left running on this machine
    store = library_store(job.output, job.storage_options)
    # a copy with this run's id (the caller's spec can be run again and gets a new one), the driver's code
    # version, which workers cannot find out themselves under `ray job submit`, and the library's one spelling
    job = job.replace(output=store.url(), state={
        "run_id": job.state.run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
        "code_version": job.state.code_version or code_version()})
    inputs = read_inputs(job.input, job.prompts, default_content=job.default_content,
                         default_style=job.default_style, storage_options=job.storage_options, library=job.output)
    items = inputs.items
    if not items:
        raise InputError(f"no images found under {job.input}" + (
            f" ({len(inputs.ignored)} other files, e.g. {inputs.ignored[0]['uri']}: {inputs.ignored[0]['reason']})"
            if inputs.ignored else ""))
    lease = LibraryLease(store, job.state.run_id, job.failure.lease_ttl_s)
    with lease.acquire(job.failure.wait_for_library_s):
        if lease.took_over and progress:
            print(f"took {job.output} over from job {lease.took_over.get('run_id')}, which stopped without "
                  "releasing it", file=sys.stderr)
        return _run_leased(job, inputs, store, lease, address, progress)


def _run_leased(job: JobSpec, inputs: Inputs, store: Store, lease: LibraryLease, address: str | None,
                progress: bool) -> dict:
    items = inputs.items
    legacy = {v for v in manifest_schema_versions(store) if v < 3}
    if legacy and not job.adopt_legacy:
        print(f"note: {job.output} was written before item ids held the base model's fingerprint (manifest "
              f"schema {min(legacy)}): its images are fitted again; if its fits were made with these very "
              f"weights, run with --adopt-legacy to reuse them", file=sys.stderr)
    previous = manifest_rows(job.output, job.storage_options)
    index = {row["source_uri"]: row for row in previous}
    plan = plan_items(job, items, store, index, lambda: _init_ray(address, job))
    if progress:
        print(f"{len(items)} inputs: {len(plan.to_fit)} to fit, {plan.complete} already complete, "
              f"{len(plan.duplicates)} duplicates, {plan.unfit} failed before fitting"
              + _accounting_line(inputs), file=sys.stderr)
        if plan.refit:
            print(f"{len(plan.refit)} fits no longer hold what their marker vouches for, and are fitted again "
                  f"(e.g. {next(iter(plan.refit.values()))})", file=sys.stderr)
    # the parent MLflow run, before any worker tracks a fit; a job with nothing to fit opens none (it only closes
    # the runs of jobs that died)
    job = start_job(job, store, progress, parent=bool(plan.to_fit))
    try:
        return _fit_and_report(job, inputs, plan, index, previous, store, lease, address, progress)
    except BaseException as exc:  # an error, or an interruption (Ctrl-C, SIGTERM: `ray job stop`)
        abort_job(job, exc)
        raise


def _fit_and_report(job: JobSpec, inputs: Inputs, plan: "Plan", index: dict, previous: list[dict], store: Store,
                    lease: LibraryLease, address: str | None, progress: bool) -> dict:
    items = inputs.items
    start = time.perf_counter()
    returned = {}
    if plan.to_fit:  # Ray only now: a re-run with nothing to fit starts no cluster
        # no worker without work: each one loads the base model and holds its CPUs or GPU for the whole job
        job = job.replace(scaling={"workers": min(job.scaling.workers,
                                                  -(-len(plan.to_fit) // job.scaling.fits_per_worker))})
        _init_ray(address, job)
        if job.scaling.gpus_per_worker is None:
            import ray

            job = job.replace(scaling={"gpus_per_worker": 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0})
        returned = EXECUTORS[job.scaling.executor](job, longest_first(plan.to_fit, job), progress)
    wall = time.perf_counter() - start

    rows = collect_rows(store, items, plan, returned, job.state.run_id)
    # a library accumulates: rows of sources other jobs fed it stay (`unziplora forget` removes sources)
    sources = {item["source_uri"] for item in items}
    kept = [row for uri, row in index.items() if uri not in sources]
    lease.check()  # a job that lost the library to another writes no manifest over the new owner's
    parts = write_manifest(store, rows + kept, job.state.run_id, previous)
    report = summarize(job, rows, wall, parts, plan.complete) | inputs.notes() | {
        "library_rows": len(rows) + len(kept), "refitted_markers": len(plan.refit)}
    report |= outcome(job, report)
    report["tracking"] = end_job(job, report, rows)
    if progress and report["tracking"].get("parent_run_id") and not report["tracking"].get("closed"):
        print(f"the job's MLflow run could not be closed ({report['tracking']['error']}); the next job or "
              f"`unziplora registry sync` closes it", file=sys.stderr)
    if report["tracking_incomplete"] and progress:
        print(f"{report['tracking_incomplete']} fits are not fully tracked in MLflow: run `unziplora registry sync "
              f"{redact(job.output)}`", file=sys.stderr)
    store.write_json(report, layout.REPORTS, f"{job.state.run_id}.json")
    return report


EXIT_FAILED_INPUTS = 3  # `decompose`'s exit status when more inputs failed than --max-failed-fraction allows


def outcome(job: JobSpec, report: dict) -> dict:
    """The job's exit status and why: 0, or EXIT_FAILED_INPUTS when the failed inputs are more than the
    tolerated fraction (0 by default: any failed input), so that a RayJob that fitted nothing is no success."""
    failed, inputs = report["failed"], report["inputs"]
    share = f"{failed} of {inputs} inputs failed ({100 * failed / max(1, inputs):.0f} %)"
    if failed > job.failure.max_failed_fraction * inputs:
        return {"exit_code": EXIT_FAILED_INPUTS, "exit_reason": f"{share}, more than --max-failed-fraction "
                f"{job.failure.max_failed_fraction:g} tolerates; their rows say why (`failures`)"}
    return {"exit_code": 0, "exit_reason": f"{share}, within --max-failed-fraction {job.failure.max_failed_fraction:g}"
            if failed else f"no input failed ({inputs} inputs)"}


def _accounting_line(inputs: Inputs) -> str:
    """The plan line's tail: what was found that is not an input, with the first few names."""
    out = ""
    if inputs.library_files:
        out += f"; {inputs.library_files} files of the library itself (--output inside --input) skipped"
    if inputs.ignored:
        names = ", ".join(i["uri"].rsplit("/", 1)[-1] for i in inputs.ignored[:5])
        out += f"; {len(inputs.ignored)} files ignored ({names}{', ...' if len(inputs.ignored) > 5 else ''})"
    if inputs.unmatched_rows:
        names = ", ".join(redact(r["image"]) for r in inputs.unmatched_rows[:5])
        out += (f"; {len(inputs.unmatched_rows)} prompt rows name no image "
                f"({names}{', ...' if len(inputs.unmatched_rows) > 5 else ''})")
    return out


def pin_base_model(job: JobSpec, settings: FitConfig) -> JobSpec:
    """Locate the job's base model once, before any image: a wrong kind of model is one clear line, a hub
    revision ("main", a tag) becomes its commit so that every worker loads the very same snapshot, and the
    weights' fingerprint goes into every item id. Hub models are not downloaded here (model_index.json
    names the commit); a local folder or file is hashed (cached), where the driver can read it."""
    location = locate_base_model(settings.base_model, revision=settings.revision, variant=settings.variant,
                                 config=settings.base_config, fetch=False)
    fit = dict(job.fit, base_model=settings.base_model)
    if location.kind == "hub":
        fit["revision"] = location.revision
    return job.replace(fit=fit, state={"base_fingerprint": location.fingerprint})


@dataclass
class Plan:
    item_ids: dict[str, str | None]  # source URL -> item id (None: unreadable or no prompts)
    to_fit: list[dict]
    duplicates: dict[str, str]  # source URL -> the URL of the same item that represents it
    complete: int = 0
    unfit: int = 0
    unchanged: dict[str, dict] = field(default_factory=dict)  # source URL -> its manifest row, which stands
    refit: dict[str, str] = field(default_factory=dict)  # item id -> why its marker no longer holds


INLINE_IDENTIFY = 32  # at most this many images to read: hashed in the driver, without a Ray Data pass
IDENTIFY_BATCH = 16  # images per identify task


def plan_items(job: JobSpec, items: list[dict], store: Store, index: dict[str, dict] | None = None,
               start_ray=lambda: None) -> Plan:
    """Identify every item, then keep for fitting only the first of each item that is not complete yet.

    The last manifest (`index`: source URL -> row) is the index: an input whose listing stamp is the one its
    row recorded is not read again (its recorded image hash stands), and an item that a row holds as ok is
    complete without reading its marker; so a re-run costs in proportion to what is new (`recheck` reads
    everything). The other images are read and hashed where they are, in a streaming Ray Data pass of many
    images per task (only small rows come back). Items that cannot be fitted get their failed row now;
    complete ones keep their row."""
    index = {} if job.recheck else (index or {})
    rows, unread = [], []
    for item in items:
        known = index.get(item["source_uri"])
        if known and known.get("image_sha256") and item["source_stat"] and \
                known.get("source_stat") == item["source_stat"]:
            rows.append(plain_row(identify_row(item, job, known["image_sha256"])))
        else:
            unread.append(item)
    rows = sorted(rows + _identify(job, unread, start_ray), key=lambda r: r["source_uri"])
    complete = {row["item_id"]: row for row in index.values() if row["status"] == "ok" and row["item_id"]}
    markers = {k: loads_json(v) for k, v in store.cat_many(sorted(
        {marker_key(r["item_id"]) for r in rows if r["item_id"] and r["item_id"] not in complete})).items()}
    legacy = _legacy_markers(job, rows, markers, store)
    plan = Plan(item_ids={}, to_fit=[], duplicates={})
    # a marker vouches for its fit's files: one that no longer holds (a file deleted or truncated behind the
    # library's back) is no fit, and goes, so that no later run trusts it either
    found = {key: marker for key, marker in (markers | legacy).items() if marker and "adopted_from" not in marker}
    for item_id, problem in marker_problems(store, {key.split("/")[1]: m for key, m in found.items()}).items():
        plan.refit[item_id] = problem
        markers.pop(marker_key(item_id), None)
        legacy.pop(marker_key(item_id), None)
        store.remove(store.path(marker_key(item_id)))
    first: dict[str, str] = {}
    for row in rows:
        uri, item_id = row["source_uri"], row["item_id"]
        plan.item_ids[uri] = item_id
        was = index.get(uri)
        if row["error"]:
            plan.unfit += 1
            if was and was["status"] == "failed" and was["error"] == scrub(row["error"]):
                plan.unchanged[uri] = was  # the same failure as last time: its row stands
            else:
                store.write_json(failed_row(row, row["error"], image_sha256=row["image_sha256"]), *source_key(uri))
            continue
        if item_id in first:
            plan.duplicates[uri] = first[item_id]
            continue
        first[item_id] = uri
        if item_id in complete:  # the manifest holds its fit
            plan.complete += 1
            done = complete[item_id]
            if was and was["status"] == "ok" and was["item_id"] == item_id:
                plan.unchanged[uri] = was
            else:  # the same image and settings as another source's complete fit
                store.write_json(done | {"source_uri": uri}, *source_key(uri))
            continue
        done = markers.get(marker_key(item_id))
        if done and "adopted_from" in done:  # a legacy fit adopted by an earlier run (id checked by _legacy_markers)
            done = legacy.get(marker_key(done["adopted_from"]))
        elif not done and job.adopt_legacy and _adoptable(legacy.get(marker_key(row["legacy_item_id"])), job):
            done = legacy[marker_key(row["legacy_item_id"])]
            store.write_json({"adopted_from": done["item_id"], "base_model_fingerprint": job.state.base_fingerprint,
                              "run_id": job.state.run_id, "adopted_at": utc_now()}, marker_key(item_id))
        if done:
            plan.complete += 1
            plan.item_ids[uri] = done["item_id"]
            store.write_json(done | {"source_uri": uri}, *source_key(uri))
        else:
            plan.to_fit.append({k: v or "" for k, v in row.items() if k in items[0]})
    return plan


def _identify(job: JobSpec, items: list[dict], start_ray) -> list[dict]:
    """Read and hash `items`: a few in the driver, many in a Ray Data pass."""
    if len(items) <= INLINE_IDENTIFY:
        return [plain_row(identify_row(item, job)) for item in items]
    start_ray()
    import ray

    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // IDENTIFY_BATCH))
    identified = dataset.map_batches(identify_batch, fn_kwargs={"job": job.to_dict()}, batch_size=IDENTIFY_BATCH,
                                     num_cpus=0.25)
    return [plain_row(r) for r in identified.iter_rows()]


def _legacy_markers(job: JobSpec, rows: list[dict], markers: dict, store: Store) -> dict[str, dict | None]:
    """The markers of legacy fits this run may reuse: those adopted before, and with --adopt-legacy, those
    under the schema-2 id of every item not complete under its own."""
    wanted = {marker_key(check_item_id(m["adopted_from"], f"{key}: adopted_from"))
              for key, m in markers.items() if m and "adopted_from" in m}
    if job.adopt_legacy:
        wanted |= {marker_key(r["legacy_item_id"]) for r in rows
                   if r["item_id"] and r["legacy_item_id"] and not markers.get(marker_key(r["item_id"]))}
    return {k: loads_json(v) for k, v in store.cat_many(sorted(wanted)).items()}


def _adoptable(marker: dict | None, job: JobSpec) -> bool:
    """A legacy fit that is complete and was not made with weights known to differ."""
    return bool(marker) and marker.get("status") == "ok" and \
        marker.get("base_model_fingerprint") in (None, job.state.base_fingerprint)


def collect_rows(store: Store, items: list[dict], plan: Plan, returned: dict[str, dict] | None = None,
                 run_id: str = "") -> list[dict]:
    """The row of every input; an input no worker finished is a failed row, never a missing one. Rows the
    executor returned (the worker's own words, even where it could not store them) win over stored ones."""
    returned = returned or {}
    keys = {item["source_uri"]: "/".join(source_key(item["source_uri"])) for item in items
            if item["source_uri"] not in returned and item["source_uri"] not in plan.unchanged}
    found = store.cat_many(list(keys.values()))
    stamps = {item["source_uri"]: item.get("source_stat") or None for item in items}
    rows = {}
    for item in items:
        uri = item["source_uri"]
        if uri in plan.unchanged:
            rows[uri] = plan.unchanged[uri]
            continue
        row = returned.get(uri) or loads_json(found[keys[uri]])
        fresh = uri in returned or (row or {}).get("reported_by") == run_id  # a worker of this run wrote it
        if row is None or (not fresh and row.get("item_id") != plan.item_ids.get(uri)):  # none, or stale
            row = failed_row(item, "not processed: the worker was lost and the executor gave up",
                             item_id=plan.item_ids.get(uri))
        # the listing stamp came before any read of the bytes this row's hash is of: while it holds, the hash does
        rows[uri] = row | {"source_stat": stamps[uri]}
    for uri, owner in plan.duplicates.items():
        rows[uri] = rows[owner] | {"source_uri": uri, "status": "skipped", "source_stat": stamps[uri],
                                   "error": f"duplicate of {owner} (same image bytes and settings)"}
    return list(rows.values())


def summarize(job: JobSpec, rows: list[dict], wall_s: float, parts: list[str], complete: int = 0) -> dict:
    """Counts, fits per hour and executor efficiency (summed fit time / (wall x workers)) of this run.
    `ok`, `failed`, `skipped` count the rows by status (`skipped`: duplicates of another input);
    `fits_this_run` the fits made now, `already_complete` the items a previous run had fitted (`complete`)."""
    # the files of these were made by this run (a group restart's re-stream only reuses them)
    fitted = [r for r in rows if r["status"] == "ok" and r.get("run_id") == job.state.run_id]
    fit_time = sum(r["total_s"] or 0 for r in fitted)
    statuses = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    return {
        "run_id": job.state.run_id, "executor": job.scaling.executor, "workers": job.scaling.workers,
        "inputs": len(rows),
        **statuses, "fits_this_run": len(fitted), "already_complete": complete,
        "redone_fits": sum(max(0, (r["attempts"] or 1) - 1) for r in fitted),
        "wall_s": round(wall_s, 2), "fit_s": round(fit_time, 2),
        # rates of a run that fitted nothing are no figures (null, not 0.0)
        "efficiency": round(fit_time / (wall_s * job.scaling.workers), 3) if wall_s > 0 and fitted else None,
        "fits_per_hour": round(3600 * len(fitted) / wall_s, 1) if wall_s > 0 and fitted else None,
        "manifest": parts, "output": redact(job.output),
        "failures": [{"source_uri": r["source_uri"], "error": (r["error"] or "")[:300]}
                     for r in rows if r["status"] == "failed"],
        "tracking_errors": sum(bool(r.get("tracking_error")) for r in fitted),
        # every fit of the library whose run or registered versions are missing, whatever run made it
        "tracking_incomplete": sum(needs_tracking(r) for r in rows) if job.tracking.enabled else 0,
    } | ({"gate": gate_counts(job, fitted)} if job.gate.active else {})


def gate_counts(job: JobSpec, fitted: list[dict]) -> dict:
    """The quality gate over this run's fits: how many passed, how many needed candidates beyond the first
    round (refitted), how many never passed (kept as the best found), and the candidates fitted in all (of
    which, with --select-after, how many stopped at the early choice)."""
    passed = sum(r.get("gate_passed") is True for r in fitted)
    counts = {"passed": passed, "never_passed": sum(r.get("gate_passed") is False for r in fitted),
              "refitted": sum((r.get("candidates") or 0) > job.gate.candidates for r in fitted),
              "candidates_fitted": sum(r.get("candidates") or 0 for r in fitted)}
    if job.gate.select_after < 1:
        counts["stopped_early"] = sum("stopped_at_step" in c for r in fitted
                                      for c in loads_json(r.get("candidate_scores")) or [])
    return counts


def _init_ray(address: str | None, job: JobSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
        return
    # A local Ray on a small machine: declare more logical CPUs than cores, so that fit workers holding
    # their CPUs never starve Ray Data's own read/split tasks (which would hang the job).
    cpus = max(os.cpu_count() or 1, int(job.scaling.workers * job.scaling.cpus_per_worker) + 2)
    start_local_ray(cpus)
