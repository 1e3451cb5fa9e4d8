"""Decompose a folder or bucket of images into a library of content and style LoRAs.

    ray job submit --working-dir . -- python -m jobs.decompose --input s3://bucket/images/ --output s3://bucket/library/
    ray job submit --working-dir . -- python -m jobs.decompose --input "$PWD/images" --output "$PWD/out/library"
    unziplora decompose --input DIR_OR_URL --output DIR_OR_URL          # starts a local Ray if none is given

Exit status: 0 done (no input failed, or no more than --max-failed-fraction of them); 1 the library cannot be
written (a full disk, a store that went away); 2 refused (bad input or flags, a library another job writes, an
unreadable manifest part: one line says why); 3 more inputs failed than --max-failed-fraction tolerates (the
report's exit_reason, and one `failed:` line per input, say why).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from pipeline.identify import check_job_settings
from pipeline.spec import EXECUTORS, JobSpec  # plain data: the job itself (Ray, torch, MLflow) loads in run()
from unziplora import cli
from unziplora.cli import add_setting_flags, setting_values
from unziplora.config import DEFAULT_FORMATS, LORA_FORMATS, read_settings_file, settings

# fit settings a job sets for every image (the prompt table may override the per-item ones, pipeline/source.py)
JOB_SETTINGS = settings("item", "worker")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder or URL (s3://, gs://, file://, path) of images")
    p.add_argument("--output", required=True, help="folder or URL of the LoRA library (created)")
    p.add_argument("--prompts", help="CSV/Parquet prompt table (default: prompts.csv|parquet in --input)")
    p.add_argument("--default-content", help="content trigger for images without a prompt row")
    p.add_argument("--default-style", help="style description for images without a prompt row")
    p.add_argument("--executor", choices=EXECUTORS, default="actor-pool",
                   help="actor-pool (Ray Data, default) or train (Ray Train TorchTrainer)")
    p.add_argument("--workers", type=int, default=1, help="fit workers (one base model each)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 if the cluster has GPUs")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--train-start-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="executor train: a worker group that cannot start within this (a node lost, a cluster "
                   "smaller than --workers) goes on with the workers the live nodes hold, or the job fails")
    p.add_argument("--max-attempts", type=int, default=3, help="give up on an image after this many crashes")
    p.add_argument("--wait-for-library", type=float, default=0.0, metavar="SECONDS",
                   help="if another job is writing --output, wait up to this long for it (default: refuse at "
                   "once); a job that died is taken over 120 s after its last heartbeat")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--storage-options", type=json.loads, default={},
                   help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    p.add_argument("--adopt-legacy", action="store_true",
                   help="reuse the fits of a library made before item ids held the base model's fingerprint "
                   "(manifest schema < 3), vouching that they were made with these same weights")
    p.add_argument("--fits-per-worker", type=int, default=1, metavar="K",
                   help="each worker trains up to K images together, one batched UNet pass per step (more fits "
                   "per hour per device; benchmarks/multifit.py)")
    p.add_argument("--batches-in-flight", type=int, default=0, metavar="N",
                   help="batches a worker holds at once: one fits on the device while the others are read, "
                   "uploaded and tracked (default 0: 2 on a GPU worker, 1 on a CPU one; benchmarks/device_overlap.py)")
    p.add_argument("--recheck", action="store_true",
                   help="read every image and completion marker again instead of trusting the manifest (a "
                   "re-run reads only images whose size or time/ETag changed, and takes ok rows as complete)")
    p.add_argument("--max-failed-fraction", type=float, default=0.0, metavar="F",
                   help="exit status 0 while at most this share of the inputs failed (default 0: any failed input "
                   "makes the exit status 3, so a RayJob in which images failed is not reported as succeeded)")
    p.add_argument("--formats", type=_words, default=list(DEFAULT_FORMATS), metavar="FORMAT[,FORMAT]",
                   help=f"LoRA file formats, of {', '.join(LORA_FORMATS)} (default {','.join(DEFAULT_FORMATS)}: each "
                   "LoRA once, in the file diffusers, ComfyUI and A1111 all load); the first is "
                   "{kind}_lora.safetensors, others {kind}_lora_{format}.safetensors")
    p.add_argument("--quiet", action="store_true")
    t = p.add_argument_group("MLflow tracking and model registry")
    t.add_argument("--tracking-uri", help="MLflow tracking/registry URI, e.g. http://mlflow:5000 (default: "
                   "$MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db for a local --output; none for a "
                   "remote one)")
    t.add_argument("--no-tracking", dest="tracking", action="store_false", help="no MLflow runs or registry")
    t.add_argument("--library", help="registry prefix: models <library>-content, <library>-style "
                   "(default: the --output folder's name)")
    t.add_argument("--log-lora-artifacts", action="store_true",
                   help="also copy the LoRA files into the MLflow runs (default: referenced by URI)")
    t.add_argument("--log-diffusers-models", action="store_true",
                   help="also register each LoRA as an mlflow.diffusers model (MLmodel: base pipeline + LoRA, "
                   "loadable with mlflow.pyfunc) as <library>-<kind>-diffusers, when the base model is a hub id "
                   "or a local folder")
    t.add_argument("--preview-steps", type=int, default=8,
                   help="sampling steps of the content/style preview images of each fit (0: no previews)")
    t.add_argument("--preview-subjects", type=_words, default=[], metavar="A,B,C",
                   help="what the style preview draws the style LoRA on (default: the base model's; SDXL: "
                   "house, cat, car, tree; toy: its shapes); the source's own class word is skipped")
    t.add_argument("--preview-styles", type=_words, default=[], metavar="A,B,C",
                   help="the styles the content preview draws the content LoRA in (default: the base model's)")
    t.add_argument("--scorer", default="auto",
                   help="quality scores of each fit from its previews, into its manifest row and MLflow run: "
                   "auto (the toy world's judges on the toy model, else none) | none | toy | clip:/local/dir | "
                   "tiny[:seed] | package.module:factory (an image embedder: cosine similarity to the source, or "
                   "a scorer)")
    q = p.add_argument_group("quality control (each image's split checked: pipeline/gate.py)")
    q.add_argument("--candidates", type=int, default=1, metavar="N",
                   help="fit each image with N seeds together, score each candidate with --scorer on its own "
                   "preview panels, keep the best (default 1: no gate)")
    q.add_argument("--max-candidates", type=int, default=0, metavar="M",
                   help="while an image's best split score is below --min-split-score, fit N more, up to M in all")
    q.add_argument("--min-split-score", type=float, default=0.0, metavar="S",
                   help="the split score (mean of content kept, style carried, 1 - each leak; 0-1) a fit must "
                   "reach; one that never does is kept as the best found, with gate_passed false")
    p.add_argument("--config", help="YAML or TOML file of fit settings for every image; flags win")
    add_setting_flags(p, JOB_SETTINGS, "fit settings for every image (per-item ones also as prompt-table "
                      "columns, which win)")


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def check_paths_under_ray_job(args: argparse.Namespace) -> None:
    """Under `ray job submit --working-dir DIR` the driver runs in Ray's temporary copy of DIR (a folder under the
    head's session directory, named by the upload's hash), not where the command was typed: a relative --input
    would be read from that copy and recorded by its path there (each upload another path, so re-runs would
    not find their rows), and a relative --output would be written into it and lost with it. Refused in one
    line naming the copy; absolute paths and URLs are as they are everywhere."""
    try:
        runtime_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return
    if not runtime_env.get("working_dir"):
        return
    from unziplora.errors import InputError

    for flag, value in (("--input", args.input), ("--output", args.output), ("--prompts", args.prompts)):
        if value and "://" not in value and not os.path.isabs(value):
            raise InputError(
                f"{flag} {value} is a relative path, and this job runs in Ray's temporary copy of its working dir "
                f"({os.getcwd()}), not where `ray job submit` was typed: give an absolute path (\"$PWD/{value}\") "
                "or a URL")


def run(args: argparse.Namespace) -> int:
    check_paths_under_ray_job(args)
    fit_settings = (read_settings_file(args.config) if args.config else {}) | setting_values(args, JOB_SETTINGS)
    job = JobSpec(input=args.input, output=args.output, prompts=args.prompts, default_content=args.default_content,
                  default_style=args.default_style, fit=fit_settings, executor=args.executor,
                  workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                  fits_per_worker=args.fits_per_worker, batches_in_flight=args.batches_in_flight,
                  train_start_timeout_s=args.train_start_timeout,
                  max_attempts=args.max_attempts, wait_for_library_s=args.wait_for_library,
                  storage_options=args.storage_options,
                  tracking=args.tracking, tracking_uri=args.tracking_uri, library=args.library,
                  log_lora_artifacts=args.log_lora_artifacts, preview_steps=args.preview_steps,
                  preview_subjects=args.preview_subjects, preview_styles=args.preview_styles, scorer=args.scorer,
                  adopt_legacy=args.adopt_legacy, log_diffusers_models=args.log_diffusers_models,
                  recheck=args.recheck, max_failed_fraction=args.max_failed_fraction, lora_formats=args.formats,
                  candidates=args.candidates, max_candidates=args.max_candidates,
                  min_split_score=args.min_split_score)
    job.check()  # a bad flag answers here, before seconds of imports (Ray, torch, MLflow)
    check_job_settings(job.fit)
    from pipeline.job import run_job

    connected = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # a caller's Ray (tests) stays
    report = run_job(job, address=args.address, progress=not args.quiet)
    if not connected and "ray" in sys.modules and sys.modules["ray"].is_initialized():
        # the job's own Ray (a local cluster stops): now rather than at exit, so that its workers' last log
        # lines come before the report and the next steps, not after them
        sys.modules["ray"].shutdown()
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}, indent=1), flush=True)
    for failure in report["failures"]:
        print(f"failed: {failure['source_uri']}: {failure['error'].splitlines()[0]}", file=sys.stderr)
    if report["exit_code"]:
        print(f"exit status {report['exit_code']}: {report['exit_reason']}", file=sys.stderr)
    if not args.quiet:
        print(next_steps(report), file=sys.stderr)
    return report["exit_code"]


def next_steps(report: dict) -> str:
    """The job's last lines, for a person: what this run did, and the commands that show the library (its
    fits, a gallery, the MLflow UI, looking an item up, using one). Stdout keeps only the JSON report."""
    library = report["output"]
    q = shlex.quote(library)
    local = "://" not in library
    gallery = shlex.quote((library.rstrip("/") if local else library.rstrip("/").rsplit("/", 1)[-1]) + "-gallery")
    counts = (f"{report['inputs']} inputs: {report['fits_this_run']} fitted now, {report['already_complete']} "
              f"already complete, {report['skipped']} duplicates, {report['failed']} failed")
    if report.get("fits_per_hour"):
        counts += f"; {report['fits_per_hour']:g} fits/hour, executor efficiency {report['efficiency']:g}"
    gate = report.get("gate")
    if gate:
        counts += (f"; quality gate: {gate['passed']} passed, {gate['refitted']} needed more candidates, "
                   f"{gate['never_passed']} never passed (kept as the best found; gate_passed false), "
                   f"{gate['candidates_fitted']} candidate fits")
    tracking = report.get("tracking") or {}
    if not tracking.get("enabled"):
        ui = "tracking was off (--no-tracking, or a remote --output without --tracking-uri)"
    elif (tracking.get("tracking_uri") or "").startswith(("http://", "https://")):
        ui = f"open {tracking['tracking_uri']} (or: unziplora ui {q})"
    else:
        ui = f"unziplora ui {q}    (starts `mlflow ui` on the library's store, names the page)"
    lines = [
        f"done: {counts}",
        f"  this run's report: {library}/reports/{report['run_id']}.json",
        "next:",
        f"  the fits       {library}/items/<item id>/: LoRA files, README.md (model card), previews;"
        f" one row per input in {library}/manifest/*.parquet",
        f"  a gallery      unziplora bank build {q} && unziplora bank gallery {q} --out {gallery}"
        f"    then open {gallery}/index.html",
        f"  MLflow         {ui}",
        f"  look one up    unziplora bank search {q} 'WORDS OF A STYLE'    (after bank build; --json for every column)",
        f"  use two        unziplora generate --bank {q} --content ITEM_ID --style 'WORDS OF A STYLE' --out x.png",
    ]
    if tracking.get("enabled") and tracking.get("tracking_uri"):
        lines.insert(-1, f"                 unziplora registry search WORDS --tracking-uri {shlex.quote(tracking['tracking_uri'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.decompose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, build_parser())  # bad input: one "error: ..." line and exit status 2, no traceback


if __name__ == "__main__":
    sys.exit(main())
