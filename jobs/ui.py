"""`unziplora ui LIBRARY`: the MLflow UI on a library's runs and LoRAs (`mlflow ui` with the library's store).

    unziplora ui out/library              # starts `mlflow ui` on out/library/mlflow.db, says which page to open
    unziplora ui out/library --print      # only says the command and the page
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from pipeline.run.spec import add_storage_options
from unziplora.config import check_number
from unziplora.errors import InputError
from unziplora.redact import redact

# MLflow 3's UI opens on its GenAI view (traces, prompts); this query opens its "Model training" view, where an
# experiment's page lists its runs (the GenAI / Model training toggle at the top of MLflow's sidebar; 3.17.2)
RUNS_VIEW = "?workflowType=machine_learning"
REGISTRY_FILE = "registry.json"  # pipeline.registry.tracking.REGISTRY_FILE: where a job records its tracking URI


def add_commands(sub) -> None:
    p = sub.add_parser("ui", help="open the MLflow UI on a library's runs and LoRAs (starts `mlflow ui` on its "
                       "store)")
    p.add_argument("library", help="the library (the --output of decompose)")
    p.add_argument("--tracking-uri", help="default: the one the library's registry.json records, else "
                   "$MLFLOW_TRACKING_URI, else sqlite:///<library>/mlflow.db")
    p.add_argument("--host", default="127.0.0.1", help="address the UI listens on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="only print the command and the page to open; start nothing")
    add_storage_options(p)
    p.set_defaults(run=run)


def plan(library: str, tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000,
         storage_options: dict | None = None) -> dict:
    """Where the library's runs are and how to see them: {tracking_uri, experiment, experiment_id, models,
    command (None when a server already serves them), url}."""
    from pipeline.store.storage import library_store  # fsspec; pipeline.registry.tracking would import MLflow (seconds)

    store = library_store(library, storage_options)
    try:
        record = store.read_json(REGISTRY_FILE) if store.exists(REGISTRY_FILE) else {}
    except (OSError, ValueError):
        record = {}
    own = "sqlite:///" + str(Path(store.root) / "mlflow.db") if store.url_prefix == "" else None
    recorded = record.get("tracking_uri")
    if recorded and own and recorded != own and recorded.startswith("sqlite:///") and \
            not Path(recorded.removeprefix("sqlite:///")).is_file() and Path(store.root, "mlflow.db").is_file():
        recorded = own  # the library was moved: its own store, not the one registry.json named at its old place
    uri = tracking_uri or recorded or os.environ.get("MLFLOW_TRACKING_URI") or own
    if not uri:
        raise InputError(f"{store.url()} records no MLflow store (registry.json): give --tracking-uri")
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise InputError(f"no MLflow store at {db}: the library was made with --no-tracking, or tracked "
                             "elsewhere (give --tracking-uri)")
    if uri != recorded:  # another store than the job's: its experiment ids are its own
        record = {k: v for k, v in record.items() if k != "experiment_id"}
    served = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if served else f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    experiment_id = record.get("experiment_id")
    page = f"{base}/#/experiments/{experiment_id}{RUNS_VIEW}" if experiment_id else f"{base}/#/experiments{RUNS_VIEW}"
    mlflow = Path(sys.executable).with_name("mlflow")  # the venv's, whether or not it is on PATH
    launcher = [str(mlflow)] if mlflow.is_file() else [sys.executable, "-m", "mlflow"]
    command = None if served else [*launcher, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
                                   "--workers", "1"]
    return {"tracking_uri": uri, "experiment": record.get("experiment"), "experiment_id": experiment_id,
            "models": record.get("models") or {}, "command": command, "url": page}


def describe(found: dict) -> str:
    """What to open, and where in MLflow's UI the runs and the LoRAs are."""
    experiment = found["experiment"] or "the library's name"
    models = " and ".join(found["models"].values()) or "<library>-content and <library>-style"
    return (f"open {found['url']}\n"
            f"  runs: experiment {experiment!r}, one run per job that fitted something, each fit a run nested "
            f"under it (its losses, previews and scores: open the run, tab Artifacts); MLflow 3 opens on its "
            f"GenAI view: the link above, or 'Model training' at the top of the sidebar, shows the runs\n"
            f"  LoRAs: Models (sidebar), {models}; one version per fit, alias item-<first 16 hex of its item id>")


def run(args: argparse.Namespace) -> int:
    check_number("--port", args.port, integer=True, minimum=1)
    found = plan(args.library, args.tracking_uri, args.host, args.port, args.storage_options)
    if found["command"] is None:
        print(f"the library's runs are on the MLflow server {redact(found['tracking_uri'])}: nothing to start\n"
              + describe(found))
        return 0
    shown = shlex.join(found["command"])
    if args.print_only:
        print(f"{shown}\n{describe(found)}")
        return 0
    print(f"starting: {shown}\n{describe(found)}\n(Ctrl-C stops it)", file=sys.stderr, flush=True)
    # this process becomes `mlflow ui`: Ctrl-C, SIGTERM and its exit status are the server's own
    os.execve(found["command"][0], found["command"], os.environ | {"MLFLOW_TRACKING_URI": found["tracking_uri"]})
