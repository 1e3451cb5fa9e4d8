"""MLflow tracking and registry of decomposition jobs, against a real `mlflow server` process (SQLite backend,
artifacts on the moto S3 endpoint) and against the default local SQLite store (no server).

Fits are tiny (4-6 steps, rank 2, 2-step previews): the bookkeeping is under test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.run.job
from jobs.cli import main as cli_main
from pipeline.store import layout
from pipeline.run.job import run_job
from pipeline.store.manifest import SCHEMA, read_manifest
from pipeline.registry.registry_names import item_filter, item_handle, item_key, model_name
from pipeline.run.spec import JobSpec, Previews, Scaling, Tracking
from pipeline.store.storage import Store
from pipeline.registry.tracking import TAG, redact
from pipeline_fixtures import (AWS_ENV, FIT, LocalS3, environ, files_of, free_port, make_dataset, sha256_hex,
                               write_local)
from unziplora.fit_files import CONFIG, FILES, HISTORY, PREVIEWS, PREVIEW_PROMPTS, RECORD, SCORES

pytestmark = pytest.mark.timeout(600)  # generous: CI runs two test files at once on 2 cores

SECRET = "sEcReT-do-not-log-42"  # an S3 secret key in storage_options: must never reach MLflow
# scored by a tiny random image embedder (cosine similarity of each preview panel to the source)
JOB = {"fit": dict(FIT), "scaling": Scaling(workers=2), "previews": Previews(steps=2, scorer="tiny:0")}
FAST_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
RAY_WORKER_ENV = FAST_FAILURE | {"MLFLOW_TRACKING_URI": None}  # conftest's ray_cluster: each job names its server


class MlflowServer:
    """`mlflow server` in a child process on 127.0.0.1; stop() and start() again keep port and database."""

    def __init__(self, folder, s3: LocalS3, backend_store_uri: str | None = None):
        self.port, self.folder = free_port(), folder
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = os.environ | AWS_ENV | {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
        self.args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                     "--workers", "1", "--backend-store-uri", backend_store_uri or f"sqlite:///{folder}/mlflow.db",
                     "--artifacts-destination", f"s3://{s3.bucket}/mlartifacts"]
        self.process = None

    def start(self) -> None:
        with open(self.folder / "server.log", "ab") as log:  # the child keeps its own handle
            # its own process group: stop() ends the server's children too (uvicorn, job runners)
            self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            time.sleep(0.3)
        raise TimeoutError("mlflow server did not start")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:  # a busy machine: stop it for sure
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), s3)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pg_mlflow_server(s3, tmp_path_factory):
    """`mlflow server` on a real PostgreSQL (Debian's `postgresql`, started here as the benchmark starts it)."""
    from benchmarks.registry_scale import postgres

    if not Path("/usr/lib/postgresql").is_dir() and not os.environ.get("CI"):  # CI installs it: never skip there
        pytest.skip("PostgreSQL is not installed (scripts/setup.sh installs it as root)")
    with postgres() as database:
        server = MlflowServer(tmp_path_factory.mktemp("mlflow-pg"), s3, backend_store_uri=database)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def dataset():
    # two images to fit, one that fails in the fit (tracked as a FAILED run), one duplicate
    data = make_dataset(valid=2, corrupt=True, no_prompt=False, duplicate=True)
    del data.files["truncated.png"], data.expected["truncated.png"]
    return data


def s3_job(s3, dataset, prefix: str, tracking_uri: str) -> JobSpec:
    options = s3.storage_options | {"key": "testing", "secret": SECRET}  # moto takes any secret
    return JobSpec(input=s3.upload(dataset, f"{prefix}-in"), output=f"s3://{s3.bucket}/{prefix}",
                   storage_options=options, **JOB, tracking=Tracking(uri=tracking_uri))


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def by_item(c, name: str, item_id: str):
    """The one version of the model `name` tagged with the item's key: the documented look-up."""
    [version] = c.search_model_versions(item_filter(name, item_key(item_id)))
    assert version.tags[item_key(item_id)] == version.tags["item_id"] == item_id
    return version


def item_uri(c, library: str, kind: str, item_id: str) -> str:
    """The URI a user writes for an item, as docs/mlflow.md shows it: `models:/<model>/<version>`, the version
    found by the item tag in plain MLflow."""
    name = model_name(library, kind)
    [version] = c.search_model_versions(f"name = '{name}' AND tags.`{item_key(item_id)}` LIKE '%'")
    return f"models:/{name}/{version.version}"


def everything_logged(c, experiment_id: str) -> str:
    """All params, tags and metric names of every run, and all model version tags, as one text."""
    runs = c.search_runs([experiment_id])
    texts = [json.dumps([r.data.params, r.data.tags, sorted(r.data.metrics)]) for r in runs]
    texts += [json.dumps(v.tags) + (v.description or "") for v in c.search_model_versions("")]
    return "\n".join(texts)


def check_tracked(job: JobSpec, uri: str, rows: list[dict], library: str) -> dict:
    """Every ok row: a finished nested run under one parent, with params, step metrics, artifacts, and two
    registered versions (tags, alias); returns the ok rows by item id."""
    c = client(uri)
    experiment = c.get_experiment_by_name(library)
    ok = {r["item_id"]: r for r in rows if r["status"] == "ok"}
    assert len(ok) == 2
    for row in rows:
        assert row["tracking_error"] is None, row["tracking_error"]
    for item_id, row in ok.items():
        run = c.get_run(row["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags[TAG + "item_id"] == item_id
        assert run.data.tags[TAG + "source_uri"] == row["source_uri"]
        assert run.data.tags[TAG + "status"] == "ok" and run.data.tags[TAG + "worker"] == row["worker"]
        parent = c.get_run(run.data.tags["mlflow.parentRunId"])
        assert parent.data.tags[TAG + "job_run_id"] == row["run_id"]
        assert run.data.params["steps"] == str(row["steps"]) and run.data.params["content"] == row["content"]
        assert run.data.params["prompt.style"] == row["prompt_style"] and run.data.params["base_model"] == "tiny"
        loss = c.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in loss] == list(range(row["steps"]))
        assert {"mse", "ortho", "final_loss", "train_s", "final_mask.shared.content"} <= set(run.data.metrics)
        assert any(k.startswith("mask.") for k in run.data.metrics), sorted(run.data.metrics)  # recalibrations
        # quality scores: in the row and the run (an embedding scorer gives no leaks)
        assert -1 <= row["score_content"] <= 1 and -1 <= row["score_style"] <= 1, row
        assert row["score_content_style_leak"] is None and row["score_style_shape_leak"] is None
        assert run.data.metrics["score.style"] == pytest.approx(row["score_style"])
        assert "score.style_shape_leak" not in run.data.metrics
        artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert {RECORD, PREVIEWS["content"], PREVIEWS["style"], PREVIEW_PROMPTS, SCORES,
                "loss_curves.png"} <= artifacts, artifacts
        assert "job_summary.png" in {a.path for a in c.list_artifacts(parent.info.run_id)}  # MLflow's log_figure
        files = files_of(row)
        assert {PREVIEWS["content"], PREVIEWS["style"], HISTORY} <= set(files)
        for kind in ("content", "style"):
            version = by_item(c, model_name(library, kind), item_id)
            assert row[f"{kind}_model_uri"] == f"models:/{model_name(library, kind)}/{version.version}"
            assert version.run_id == run.info.run_id
            tags = version.tags
            assert tags["item_id"] == item_id and tags["style"] == row["style"] and tags["content"] == row["content"]
            assert tags["class_word"] == row["class_word"] and tags["source_uri"] == row["source_uri"]
            assert tags["sha256"] == files[f"{kind}_lora.safetensors"]["sha256"]
            assert float(tags["score_style"]) == pytest.approx(row["score_style"])
    for kind in ("content", "style"):  # no alias per item: its cost grew with the library (issue 34)
        assert not c.get_registered_model(model_name(library, kind)).aliases
    failed = [r for r in c.search_runs([experiment.experiment_id], f"tags.`{TAG}status` = 'failed'")]
    assert len(failed) == 1 and failed[0].info.status == "FAILED" and "garbage" in failed[0].data.tags[TAG + "error"]
    assert SECRET not in everything_logged(c, experiment.experiment_id)
    return ok


def counts(uri: str) -> tuple[int, int]:
    c = client(uri)
    return len(c.search_runs([e.experiment_id for e in c.search_experiments()])), len(c.search_model_versions(""))


def test_job_against_server_and_lookup_commands(s3, mlflow_server, ray_cluster, dataset, tmp_path, capsys):
    job = s3_job(s3, dataset, "lib-a", mlflow_server.url)
    report = run_job(job, progress=False)
    assert report["ok"] == 2 and report["tracking"]["error"] is None and report["tracking_errors"] == 0
    assert "View run" not in capsys.readouterr().out  # MLflow's links per ended run: the job's stdout is its report
    rows = read_manifest(job.output, job.storage_options).to_pylist()
    ok = check_tracked(job, mlflow_server.url, rows, "lib-a")
    parent = client(mlflow_server.url).get_run(report["tracking"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["ok"] == 2
    assert parent.data.params["input"] == job.input and parent.data.params["fit.rank"] == str(FIT["rank"])
    registry = json.loads(s3.get(f"{job.output}/registry.json"))
    assert registry["tracking_uri"] == mlflow_server.url and registry["models"]["style"] == "lib-a-style"

    # the plain MLflow API: one call fetches a registered LoRA (here: the item's folder in the library)
    import mlflow.artifacts

    item_id, row = sorted(ok.items())[0]
    with environ({"MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "MLFLOW_TRACKING_URI": mlflow_server.url} | AWS_ENV):
        uri = item_uri(client(mlflow_server.url), "lib-a", "style", item_id)
        assert uri == row["style_model_uri"]
        got = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "plain"))
        lora = (Path(got) / FILES["style"]).read_bytes()
        assert sha256_hex(lora) == files_of(row)[FILES["style"]]["sha256"]

        # `unziplora registry search` finds by style text (case-insensitive), `get` fetches one kind's files
        capsys.readouterr()
        assert cli_main(["registry", "search", row["style"].upper(), "--tracking-uri", mlflow_server.url]) == 0
        out = capsys.readouterr().out
        assert "lib-a-style/" in out and f"@{item_key(item_id)}" in out and out.count("\n") == 2, out
        dest = tmp_path / "got"
        assert cli_main(["registry", "get", item_handle("lib-a", "content", item_id), "--dest", str(dest),
                         "--tracking-uri", mlflow_server.url]) == 0
        assert json.loads(capsys.readouterr().out)["model_uri"] == row["content_model_uri"]
        # a bare item key (the whole id too) with --kind
        dest_style = tmp_path / "got-style"
        assert cli_main(["registry", "get", f"item-{item_id}", "--kind", "style", "--dest", str(dest_style),
                         "--tracking-uri", mlflow_server.url]) == 0
        assert json.loads(capsys.readouterr().out)["model_uri"] == row["style_model_uri"]
        assert FILES["style"] in os.listdir(dest_style)
    got_files = sorted(p.name for p in dest.iterdir())
    assert got_files == [CONFIG, FILES["content"], RECORD, PREVIEWS["content"]], got_files
    assert sha256_hex((dest / FILES["content"]).read_bytes()) == \
        files_of(row)[FILES["content"]]["sha256"]

    # a re-run fits nothing and registers nothing new
    before = counts(mlflow_server.url)
    report = run_job(job, progress=False)
    assert report["fits_this_run"] == 0 and counts(mlflow_server.url)[1] == before[1]
    assert counts(mlflow_server.url)[0] == before[0] + 1  # only the new job's parent run


def test_server_down_mid_job_then_sync_twice(s3, mlflow_server, ray_cluster, dataset, monkeypatch):
    job = s3_job(s3, dataset, "lib-b", mlflow_server.url).replace(scaling={"workers": 1})  # 2: the test above
    started = pipeline.run.job.start_job

    def start_then_stop(*args, **kwargs):  # the parent run exists, then the server goes away
        out = started(*args, **kwargs)
        mlflow_server.stop()
        return out

    monkeypatch.setattr(pipeline.run.job, "start_job", start_then_stop)
    try:
        report = run_job(job, progress=False)
    finally:
        mlflow_server.start()
    # every fit completed and is in the manifest; tracking failed for each, and says so
    assert report["ok"] == 2 and report["tracking_errors"] == 2 and report["tracking"]["error"]
    rows = read_manifest(job.output, job.storage_options).to_pylist()
    ok_rows = [r for r in rows if r["status"] == "ok"]
    assert all(r["tracking_error"] and r["mlflow_run_id"] is None for r in ok_rows)
    assert all(s3.get(r["content_lora_uri"]) for r in ok_rows)

    sync = ["registry", "sync", job.output, "--tracking-uri", mlflow_server.url,
            "--storage-options", json.dumps(job.storage_options)]
    assert cli_main(sync) == 0
    rows = read_manifest(job.output, job.storage_options).to_pylist()
    ok = {r["item_id"]: r for r in rows if r["status"] == "ok"}
    assert all(r["mlflow_run_id"] and r["tracking_error"] is None and r["style_model_uri"] for r in ok.values())
    c = client(mlflow_server.url)
    experiment = c.get_experiment_by_name("lib-b")
    [parent] = c.search_runs([experiment.experiment_id], f"tags.`{TAG}kind` = 'job'")  # the job's own parent
    # the server went away before the job could close it: the sync closes it with the job's stored report
    assert parent.info.status == "FINISHED" and parent.data.metrics["ok"] == 2, parent
    for item_id, row in ok.items():
        run = c.get_run(row["mlflow_run_id"])
        assert len(c.get_metric_history(run.info.run_id, "loss")) == row["steps"]  # history.json in the library
        marker = json.loads(s3.get(f"{row['output_uri']}/{layout.MARKER}"))
        assert marker["mlflow_run_id"] == row["mlflow_run_id"] and marker["tracking_error"] is None
        assert by_item(c, "lib-b-style", item_id).run_id == run.info.run_id
    assert SECRET not in everything_logged(c, experiment.experiment_id)

    before = counts(mlflow_server.url)
    assert cli_main(sync) == 0
    assert cli_main(sync + ["--all"]) == 0  # re-checks every row: finds the runs and versions, makes none
    assert counts(mlflow_server.url) == before


def test_local_library_default_sqlite_store(ray_cluster, dataset, tmp_path, capsys):
    write_local(dataset, tmp_path / "in")
    out = tmp_path / "my lib"
    job = JobSpec(input=str(tmp_path / "in"), output=str(out), **JOB, tracking=Tracking(log_lora_artifacts=True))
    report = run_job(job, progress=False)
    uri = f"sqlite:///{out}/mlflow.db"
    assert report["tracking"]["tracking_uri"] == uri and report["tracking_errors"] == 0
    library = "my-lib"  # registry_names.library_name of the folder
    rows = read_manifest(str(out)).to_pylist()
    ok = check_tracked(job, uri, rows, library)
    import mlflow.artifacts

    item_id = sorted(ok)[0]
    with environ({"MLFLOW_TRACKING_URI": uri}):  # models:/ URIs resolve in the default registry (only)
        got = mlflow.artifacts.download_artifacts(item_uri(client(uri), library, "style", item_id),
                                                  dst_path=str(tmp_path / "dl"))
    # with log_lora_artifacts the version points at the run's copy: only that kind's files
    assert sorted(os.listdir(got)) == [FILES["style"]]  # the one file (kohya format)
    assert (out / "mlartifacts").as_uri() in client(uri).get_model_version(f"{library}-style", "1").source
    for spec in (f"{library}-content/1", f"{library}-content"):  # a version number; the latest version
        dest = tmp_path / spec.replace("/", "_")
        assert cli_main(["registry", "get", spec, "--dest", str(dest), "--tracking-uri", uri]) == 0
        assert sorted(p.name for p in dest.iterdir()) == [FILES["content"]]

    # the same library as the layout before issue 34 left it: no item tags, an alias `item-<id>` per version
    c = client(uri)
    for kind in ("content", "style"):
        name = model_name(library, kind)
        for version in c.search_model_versions(f"name = '{name}'"):
            c.delete_model_version_tag(name, version.version, item_key(version.tags["item_id"]))
            c.set_registered_model_alias(name, item_key(version.tags["item_id"]), version.version)
        c.set_registered_model_alias(name, "champion", "1")  # a user's own alias
        assert not c.search_model_versions(item_filter(name, item_key(item_id)))
    # `registry get NAME@item-<id>` still finds an item of an old library, by its alias
    capsys.readouterr()
    assert cli_main(["registry", "get", item_handle(library, "style", item_id), "--dest", str(tmp_path / "old"),
                     "--tracking-uri", uri]) == 0
    assert json.loads(capsys.readouterr().out)["model_uri"] == ok[item_id]["style_model_uri"]
    before = counts(uri)
    # `registry sync` moves it: item tags on every version, the item aliases gone, the user's alias kept
    assert cli_main(["registry", "sync", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["migrated"] == {"tagged": 4, "aliases_removed": 4} and summary["errors"] == 0, summary
    assert json.loads((out / "registry.json").read_text())["format"] == "unziplora-registry/2"
    for kind in ("content", "style"):
        assert c.get_registered_model(model_name(library, kind)).aliases == {"champion": 1}
        for other_id, row in ok.items():
            version = by_item(c, model_name(library, kind), other_id)
            assert row[f"{kind}_model_uri"] == f"models:/{model_name(library, kind)}/{version.version}"
    with environ({"MLFLOW_TRACKING_URI": uri}):  # the documented URI, after the move
        got = mlflow.artifacts.download_artifacts(item_uri(c, library, "content", item_id),
                                                  dst_path=str(tmp_path / "migrated"))
    assert FILES["content"] in os.listdir(got)
    # a second sync finds nothing to move, and neither creates a run or a version
    assert cli_main(["registry", "sync", str(out), "--all"]) == 0
    assert "migrated" not in json.loads(capsys.readouterr().out)
    assert counts(uri) == before


def test_redact_and_old_manifest_parts(tmp_path):
    assert redact("http://user:pw@host:5000/x?a=1&X-Amz-Signature=abc&token=t") == \
        "http://user:***@host:5000/x?a=1&X-Amz-Signature=***&token=***"
    assert redact("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    # a version-1 part (no MLflow columns) still reads, with the new columns null
    old = pa.table({"schema_version": pa.array([1], pa.int32()), "source_uri": ["a.png"], "status": ["ok"]})
    buffer = io.BytesIO()
    pq.write_table(old, buffer)
    Store(str(tmp_path)).write_bytes(buffer.getvalue(), layout.MANIFEST, "part-old-00000.parquet")
    table = read_manifest(str(tmp_path))
    assert table.schema.equals(SCHEMA) and table.to_pylist()[0]["mlflow_run_id"] is None


def test_decompose_tracking_flags():
    from jobs.cli import build_parser
    from jobs.decompose import job_spec

    args = build_parser().parse_args(["decompose", "--input", "in", "--output", "out", "--no-tracking",
                                      "--tracking-uri", "http://h:5000", "--library", "cats", "--log-lora-artifacts",
                                      "--preview-steps", "0"])
    job = job_spec(args, {})
    assert job.tracking == Tracking(enabled=False, uri="http://h:5000", library="cats", log_lora_artifacts=True)
    assert job.previews.steps == 0
    job = job_spec(build_parser().parse_args(["decompose", "--input", "in", "--output", "out"]), {})
    assert job.tracking.enabled and job.tracking.uri is None and job.previews.steps == 8


def test_loras_registered_as_diffusers_models(s3, pg_mlflow_server, ray_cluster, tmp_path, capsys):
    """`log_diffusers_models`, on a server backed by PostgreSQL: beside the folder versions, each LoRA is an
    mlflow.diffusers model (an MLmodel naming the base folder) that MLflow's own flavour and pyfunc load through
    the documented URI: the base pipeline with the LoRA on it. `registry search` and `get` find the item."""
    mlflow_server = pg_mlflow_server
    import mlflow.diffusers
    import mlflow.pyfunc
    import pandas as pd
    from unziplora.models import build_preset

    folder = tmp_path / "tiny-sdxl"
    build_preset("tiny").pipeline().save_pretrained(folder)
    data = make_dataset(valid=1, corrupt=False, no_prompt=False, duplicate=False)
    write_local(data, tmp_path / "in")
    job = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "lib-d"), fit=dict(FIT, base_model=str(folder)),
                  tracking=Tracking(uri=mlflow_server.url, log_diffusers_models=True), previews=Previews(steps=0))
    # the submitting side names the code (`ray job submit` uploads no .git); workers learn it from the driver
    with environ({"UNZIPLORA_CODE_VERSION": "0.1.0+gc0ffee1234"}):
        report = run_job(job, progress=False)
    assert report["ok"] == 1 and report["tracking_errors"] == 0, report
    row = read_manifest(job.output).to_pylist()[0]
    c = client(mlflow_server.url)
    assert row["code_version"] == "0.1.0+gc0ffee1234"
    assert c.get_run(row["mlflow_run_id"]).data.params["code_version"] == "0.1.0+gc0ffee1234"
    with environ({"MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "MLFLOW_TRACKING_URI": mlflow_server.url} | AWS_ENV):
        for kind in ("content", "style"):
            name = model_name("lib-d", kind, "diffusers")
            version = by_item(c, name, row["item_id"])
            assert row[f"{kind}_diffusers_model_uri"] == f"models:/{name}/{version.version}"
            assert version.run_id == row["mlflow_run_id"]
            assert by_item(c, model_name("lib-d", kind), row["item_id"])  # kept
            model = mlflow.diffusers.load_model(f"models:/{name}/{version.version}")
            assert model.base_model == str(folder)
            pipe = model.load_pipeline()
            lora = [m for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k")][0]
            assert {k: v.r for k, v in pipe.unet.peft_config.items()} and lora.r[next(iter(lora.r))] == FIT["rank"]
        # the item as a user finds it: `registry search` by its style, `get` by its handle
        capsys.readouterr()
        assert cli_main(["registry", "search", row["style"], "--library", "lib-d", "--json",
                         "--tracking-uri", mlflow_server.url]) == 0
        found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert {f["name"] for f in found} == {model_name("lib-d", k, f) for k in ("content", "style")
                                              for f in (None, "diffusers")}
        assert {f["item"] for f in found} == {item_key(row["item_id"])}
        assert cli_main(["registry", "get", item_handle("lib-d", "style", row["item_id"]), "--dest",
                         str(tmp_path / "got"), "--tracking-uri", mlflow_server.url]) == 0
        assert json.loads(capsys.readouterr().out)["model_uri"] == row["style_model_uri"]
        assert sha256_hex((tmp_path / "got" / FILES["style"]).read_bytes()) == \
            files_of(row)[FILES["style"]]["sha256"]
        image = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").predict(
            pd.DataFrame({"prompt": ["A sks thing0"]}), params={"num_inference_steps": 2, "height": 64, "width": 64})
        assert len(image) == 1
    # a re-run registers nothing new
    before = counts(mlflow_server.url)[1]
    run_job(job, progress=False)
    assert counts(mlflow_server.url)[1] == before


def test_the_production_combination_end_to_end(s3, mlflow_server, ray_cluster, dataset, tmp_path, capsys):
    """What a real user runs, in one go: Ray Train with two workers, input and output on S3, an `mlflow server`,
    previews and scores; then `registry sync`, a `models:/` download through MLflow, `bank build` on the S3
    library, `bank search`, and `generate --bank s3://...` recombining the content of one real fit with the
    style of the other. Each step's output is checked, not only its exit status."""
    import mlflow.artifacts
    from PIL import Image

    from unziplora.export import lora_format

    # two batches in flight per worker, as on a GPU: a batch uploads and tracks while the next one fits
    job = s3_job(s3, dataset, "lib-e", mlflow_server.url).replace(scaling={"executor": "train", "batches_in_flight": 2})
    report = run_job(job, progress=False)
    assert report["ok"] == 2 and report["tracking_errors"] == 0 and report["executor"] == "train", report
    rows = read_manifest(job.output, job.storage_options).to_pylist()
    ok = check_tracked(job, mlflow_server.url, rows, "lib-e")  # runs, metrics, scores, versions, no secret
    for row in ok.values():  # one file per LoRA, in the format every tool loads, written straight to S3
        names = sorted(s3.objects(row["output_uri"].removeprefix(f"s3://{s3.bucket}/")))
        assert not [n for n in names if ".tmp-" in n or n.endswith(("_kohya.safetensors", "_diffusers.safetensors"))]
        lora = tmp_path / f"{row['item_id']}.safetensors"
        lora.write_bytes(s3.get(row["style_lora_uri"]))
        assert lora_format(lora) == "kohya"

    # registry sync over the complete library: finds every run and version, creates nothing
    before = counts(mlflow_server.url)
    storage = json.dumps(job.storage_options)
    assert cli_main(["registry", "sync", job.output, "--tracking-uri", mlflow_server.url, "--all",
                     "--storage-options", storage]) == 0
    assert counts(mlflow_server.url) == before

    # a registered style LoRA through MLflow alone: the very bytes the manifest vouches for
    first, second = sorted(ok.values(), key=lambda r: r["style"])
    with environ({"MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "MLFLOW_TRACKING_URI": mlflow_server.url} | AWS_ENV):
        uri = item_uri(client(mlflow_server.url), "lib-e", "style", second["item_id"])
        got = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "models")))
    want = files_of(second)[FILES["style"]]["sha256"]
    assert sha256_hex((got / FILES["style"]).read_bytes()) == want

    # the bank of the S3 library: built, searched by the second fit's own style text
    capsys.readouterr()
    bank = ["--storage-options", storage]
    assert cli_main(["bank", "build", job.output, *bank]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["rows"] == len(rows) and built["added"]["all-MiniLM-L6-v2"] > 0, built
    assert cli_main(["bank", "search", job.output, second["style"], "-k", "1", "--json", *bank]) == 0
    [hit] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hit["item_id"] == second["item_id"] and hit["style_lora_uri"] == second["style_lora_uri"]

    # recombined from the S3 bank: the first fit's content (by id prefix) in the second fit's style (by text)
    out = tmp_path / "recombined.png"
    assert cli_main(["generate", "--bank", job.output, "--content", first["item_id"][:10], "--style", second["style"],
                     "--out", str(out), "--steps", "2", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
                     *bank]) == 0
    picked = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [(p.get("content"), p.get("style")) for p in picked] == [(first["item_id"], None), (None, second["item_id"])]
    image = Image.open(out)
    assert image.size == (64, 64) and len(set(image.getdata())) > 1  # drawn, not a blank
    for row in (first, second):  # what generate read: the fits' files, downloaded and checked against the manifest
        cached = tmp_path / "cache" / row["item_id"] / FILES["style"]
        assert sha256_hex(cached.read_bytes()) == files_of(row)[FILES["style"]]["sha256"]


def test_job_summary_figure_counts_in_whole_numbers_and_labels_do_not_overlap():
    from pipeline.registry.figures import job_figure

    rows = [dict(status="ok", run_id="r", total_s=t) for t in (3.1, 2.0, 1.7)] + \
        [dict(status="ok", run_id="earlier", total_s=9.0), dict(status="skipped", run_id="r", total_s=None)] + \
        [dict(status="failed", run_id="r", total_s=None)] * 2
    figure = job_figure(rows, "r")
    left, right = figure.axes
    assert [p.get_height() for p in left.patches] == [3.1, 2.0, 1.7]  # this run's fits, slowest first
    assert all(float(t).is_integer() for t in left.get_xticks())  # fit 1, 2, 3
    assert [p.get_height() for p in right.patches] == [4, 2, 1]
    assert all(float(t).is_integer() for t in right.get_yticks())  # counts of inputs
    figure.canvas.draw()  # the layout as saved
    renderer = figure.canvas.get_renderer()
    labels = [t.get_window_extent(renderer) for t in right.get_xticklabels()]
    assert [t.get_text() for t in right.get_xticklabels()] == ["ok", "failed", "skipped"]
    assert not any(a.overlaps(b) for a, b in zip(labels, labels[1:]))
    assert not right.yaxis.label.get_window_extent(renderer).overlaps(left.get_window_extent(renderer))
    figure = job_figure([dict(status="failed", run_id="r", total_s=None)], "r")
    left = figure.axes[0]
    assert [t.get_text() for t in left.texts] == ["no fit completed in this run"] and not len(left.get_xticks())


def test_figures_are_drawn_from_threads_at_once_without_pyplot():
    """A worker with two batches in flight tracks two fits at once: each draws its loss curves in its own thread
    (pyplot's global state lost one of them); every figure comes out whole, and pyplot is never imported."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.registry.figures import loss_figure, png

    history = [{"mse": 1.0 / (i + 1), "ortho": 0.01 * i} | ({"mask_stats": {}} if i == 5 else {}) for i in range(40)]
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda _: png(lambda: loss_figure(history)), range(16)))
    assert len(set(images)) == 1 and images[0].startswith(b"\x89PNG")
    code = ("import sys; from pipeline.registry.figures import loss_figure, job_figure; "
            "loss_figure([{'mse': 1.0, 'ortho': 0.0}]*3); job_figure([], 'r'); "
            "sys.exit('matplotlib.pyplot' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent).returncode == 0
