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

from pipeline.run.identify import check_job_settings
# plain data: the job itself (Ray, torch, MLflow) loads in run()
from pipeline.run.spec import GROUPS, SECTIONS, JobSpec, add_flags, from_flags, options
from unziplora import cli
from unziplora.cli import add_setting_flags, setting_values
from unziplora.config import read_settings_file, settings

# fit settings a job sets for every image (the prompt table may override the per-item ones, pipeline/run/source.py)
JOB_SETTINGS = settings("item", "worker")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, JobSpec)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--quiet", action="store_true")
    for name in SECTIONS:
        add_flags(p.add_argument_group(SECTIONS[name]), GROUPS[name], prefix=name + ".")
    p.add_argument("--config", help="YAML or TOML file of fit settings for every image; flags win")
    add_setting_flags(p, JOB_SETTINGS, "fit settings for every image (per-item ones also as prompt-table "
                      "columns, which win)")


def job_spec(args: argparse.Namespace, fit: dict) -> JobSpec:
    """The JobSpec the flags declare: each option's value from its flag (add_flags), `fit` the fit settings."""
    groups = {name: from_flags(args, GROUPS[name], prefix=name + ".") for name in SECTIONS}
    return JobSpec(**{f.name: getattr(args, f.name) for f in options(JobSpec)}, fit=fit, **groups)


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
    job = job_spec(args, fit_settings)
    job.check()  # a bad flag answers here, before seconds of imports (Ray, torch, MLflow)
    check_job_settings(job.fit)
    from pipeline.run.job import run_job

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
        if "stopped_early" in gate:
            counts += f" ({gate['stopped_early']} stopped at the early choice, --select-after)"
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
