"""The dataset-scale decomposition end to end, on a real local Ray and a real (moto) S3 endpoint.

One in-process Ray and one S3 server for the whole module (conftest; pipeline_fixtures.local_ray for the auth mode).
Fits are tiny (4-8 steps, rank 2, the `tiny` base model): the pipeline's bookkeeping is under test.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.store import layout
from pipeline.run.job import run_job
from pipeline.store.manifest import SCHEMA, read_manifest
from pipeline.run.spec import Failure, Faults, JobSpec, Previews, Scaling, Tracking
from pipeline_fixtures import (FIT, assert_lora_loads, by_name, check_artifacts, check_rows, make_dataset, png_bytes,
                               write_local)
from unziplora.fit_files import RECORD

pytestmark = pytest.mark.timeout(600)  # generous: CI runs two test files at once on 2 cores

@pytest.fixture(scope="module")
def dataset():
    return make_dataset(valid=5)


@pytest.fixture(scope="module")
def s3_input(s3, dataset):
    return s3.upload(dataset, "in")


@pytest.fixture(scope="module")
def tiny_pipe():
    from unziplora import load_base_model

    return load_base_model("tiny", device="cpu").pipeline()


def s3_job(s3, input_url: str, prefix: str, **changes) -> JobSpec:
    """The S3 job, with `changes` (a group's as a dict of the fields that change: JobSpec.replace)."""
    return JobSpec(input=input_url, output=f"s3://{s3.bucket}/{prefix}", fit=dict(FIT),
                   storage_options=s3.storage_options, scaling=Scaling(workers=2),
                   previews=Previews(steps=2)).replace(**changes)


def manifest_rows(job: JobSpec) -> list[dict]:
    table = read_manifest(job.output, job.storage_options)
    assert table.schema.equals(SCHEMA, check_metadata=False), table.schema
    return table.to_pylist()


def assert_counts(report: dict, dataset, fits: int) -> None:
    assert report["inputs"] == len(dataset.images)
    assert {k: report[k] for k in ("ok", "failed", "skipped")} == \
        {s: len(dataset.names(s)) for s in ("ok", "failed", "skipped")}, report
    assert report["fits_this_run"] == fits, report
    assert len(report["failures"]) == len(dataset.names("failed"))


@pytest.mark.parametrize("executor", ["actor-pool"])  # Train: test_train_restarts_... (Train's runs cost minutes)
def test_s3_job_then_rerun_fits_nothing(executor, s3, ray_cluster, dataset, s3_input, tiny_pipe, tmp_path):
    prefix = f"out-{executor}"
    # two fits per worker, trained together in one batched UNet pass (a worker's batch: 2 items), and two such
    # batches in flight per actor (threads: one fits while the other uploads), as on a GPU worker
    job = s3_job(s3, s3_input, prefix, scaling={"executor": executor, "fits_per_worker": 2, "batches_in_flight": 2})
    report = run_job(job, progress=False)
    assert_counts(report, dataset, fits=len(dataset.names("ok")))
    assert report["redone_fits"] == 0

    # the manifest through pyarrow (the pipeline's reader) ...
    named = check_rows(manifest_rows(job), dataset, s3_input)
    assert all(named[n]["attempts"] == 1 for n in dataset.names("ok"))
    assert all(named[n]["run_id"] == report["run_id"] for n in dataset.names("ok"))

    # ... through pandas straight from S3, and DuckDB on the downloaded part files
    options = s3.storage_options | {"key": "testing", "secret": "testing"}
    frame = pd.read_parquet(f"{job.output}/manifest/", storage_options=options)
    assert len(frame) == len(dataset.images) and frame["source_uri"].is_unique
    assert frame.set_index("source_uri")["status"].to_dict() == {r["source_uri"]: r["status"] for r in named.values()}
    local = tmp_path / layout.MANIFEST
    fs = s3.fs()
    parts = [p for p in fs.ls(f"{s3.bucket}/{prefix}/manifest") if p.endswith(".parquet")]
    assert len(parts) == 1 and report["run_id"] in parts[0], parts
    fs.get(parts, str(local) + "/")
    counts = dict(duckdb.sql(f"SELECT status, count(*) FROM read_parquet('{local}/*.parquet') GROUP BY status").fetchall())
    assert counts == {s: len(dataset.names(s)) for s in ("ok", "failed", "skipped")}
    uniq = duckdb.sql(f"SELECT count(DISTINCT source_uri), count(*) FROM read_parquet('{local}/*.parquet')").fetchall()[0]
    assert uniq == (len(dataset.images), len(dataset.images))

    # every artifact of every ok row is on S3 with the recorded sha256; the LoRAs load in a diffusers pipeline
    artifacts = {n: check_artifacts(named[n], s3.get) for n in dataset.names("ok")}
    assert any(json.loads(a[RECORD])["timings"]["batch_size"] == 2 for a in artifacts.values())
    assert_lora_loads(tiny_pipe, artifacts["img00.png"], tmp_path / "lora")
    for name in dataset.names("ok"):  # _SUCCESS is the row itself, written after the files
        success = json.loads(s3.get(f"{named[name]['output_uri']}/{layout.MARKER}"))
        assert success["files"] == named[name]["files"] and success["status"] == "ok"
    # the job's report is stored next to the library
    stored = json.loads(s3.get(f"{job.output}/reports/{report['run_id']}.json"))
    assert stored["fits_this_run"] == report["fits_this_run"]

    # re-run: nothing is fitted again, no item file is rewritten, the manifest is replaced (not appended)
    items_before = s3.objects(f"{prefix}/{layout.ITEMS}/")
    assert sum(k.endswith("/" + layout.MARKER) for k in items_before) == len(dataset.names("ok"))
    assert not [k for k in items_before if ".tmp-" in k], "temporary keys left behind"
    rerun = run_job(s3_job(s3, s3_input, prefix, scaling={"executor": executor}), progress=False)
    assert rerun["run_id"] != report["run_id"]
    assert_counts(rerun, dataset, fits=0)
    items_after = s3.objects(f"{prefix}/{layout.ITEMS}/")
    assert items_after == items_before, "a re-run rewrote item files"
    named_again = check_rows(manifest_rows(job), dataset, s3_input)
    for name in dataset.names("ok") + dataset.names("skipped"):
        assert named_again[name]["run_id"] == report["run_id"]  # the row still points at the first run's fit
        assert named_again[name]["files"] == named[name]["files"]
    parts = [p for p in s3.fs().ls(f"{s3.bucket}/{prefix}/manifest") if p.endswith(".parquet")]
    assert len(parts) == 1 and rerun["run_id"] in parts[0], parts


def test_a_crash_is_retried_once_and_a_poison_image_is_given_up(s3, ray_cluster, dataset, s3_input):
    """Actor pool, two fits per worker, one job: the worker process dies (os._exit) the first time it starts
    `victim`, and every time it starts `poison`. The victim is fitted on its second attempt; the poison image is
    given up after max_attempts; a batch mate that was admitted when its worker died is charged that one
    crash, fitted alone next time, and never given up with the poison image; no other item is fitted twice."""
    victim, poison = "img01.png", "img03.png"  # each second in its batch (longest first: 8, 7 | 6, 5 | 4 steps)
    job = s3_job(s3, s3_input, "crash-actor-pool", faults=Faults(crash_once_on=[victim], crash_always_on=[poison]),
                 failure={"max_attempts": 2}, scaling={"fits_per_worker": 2})
    report = run_job(job, progress=False)
    named = check_rows(manifest_rows(job), dataset, s3_input, expected=dict(dataset.expected, **{poison: "failed"}))
    assert named[victim]["status"] == "ok" and named[victim]["attempts"] == 2, named[victim]
    # the crash left its attempt's record until the item was complete; then every record went
    assert not s3.objects(f"{job.output.split('/', 3)[-1]}/attempts/{named[victim]['item_id']}/")
    row = named[poison]
    assert row["status"] == "failed" and "gave up after 2 attempts" in row["error"], row
    assert row["attempts"] == 2 and row["item_id"]
    # the batch mate of each (img04, img02) shared one crash with it, then was fitted alone; no other item was
    refitted = {n: named[n]["attempts"] for n in dataset.names("ok") if n not in (victim, poison)
                and named[n]["attempts"] != 1}
    assert sorted(refitted.values()) == [2, 2], refitted
    assert all(named[n]["status"] == "ok" for n in refitted)
    assert report["redone_fits"] == 1 + len(refitted)
    assert report["ok"] == len(dataset.names("ok")) - 1 and report["failed"] == len(dataset.names("failed")) + 1
    assert any(f["source_uri"].endswith(poison) and "gave up" in f["error"] for f in report["failures"])


def test_train_restarts_do_not_give_up_a_healthy_workers_image(ray_cluster, tmp_path):
    """Train, 2 workers, two fits per worker, 4 images: `b_poison` kills its worker each time; `a_slow` (a valid
    image, 60 steps) is in flight when that happens, and Train then restarts the whole worker group. Only the
    dead rank's batch is charged: `b_poison` twice (then given up, max_attempts=2) and at most one batch mate
    once (the crash it shared, after which it is fitted alone). A healthy item charged for another rank's
    crash too would reach 2 and be given up. And the uneven split (equal=False) drops no row."""
    (tmp_path / "in").mkdir()
    names = ["a_slow", "b_poison", "c_quick", "d_quick"]
    for seed, name in enumerate(names):
        (tmp_path / "in" / f"{name}.png").write_bytes(png_bytes(seed + 1, 64, 64))
    (tmp_path / "in" / "prompts.csv").write_text("image,content,style,steps\n" + "".join(
        f"{name}.png,sks {name[0]},style {name[0]},{60 if name == 'a_slow' else 4}\n" for name in names))
    job = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "out"), fit=dict(FIT),
                  scaling=Scaling(executor="train", workers=2, fits_per_worker=2), failure=Failure(max_attempts=2),
                  previews=Previews(steps=0), faults=Faults(crash_always_on=["b_poison"]))
    report = run_job(job, progress=False)
    named = by_name(read_manifest(job.output).to_pylist())
    assert sorted(named) == [f"{name}.png" for name in names]
    assert named["b_poison.png"]["status"] == "failed" and "gave up" in named["b_poison.png"]["error"]
    for name in ("a_slow.png", "c_quick.png", "d_quick.png"):
        assert named[name]["status"] == "ok", named[name]["error"]
    assert report["ok"] == 3
    # the poison image's records stay (it never completed): two crashes, each charged to it
    crashed = list((tmp_path / "out" / layout.ATTEMPTS / named["b_poison.png"]["item_id"]).glob("*.crashed"))
    assert len(crashed) == 2, crashed


def test_local_folders_and_cli(ray_cluster, tmp_path, capsys):
    from jobs.cli import main

    data = make_dataset(valid=2, corrupt=True, no_prompt=True, duplicate=True)
    write_local(data, tmp_path / "in")
    out = tmp_path / "library"
    rc = main(["decompose", "--input", str(tmp_path / "in"), "--output", str(out), "--steps", "4", "--rank", "2",
               "--workers", "1", "--preview-steps", "2", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 3, captured.err  # inputs failed: a job that reports success must have fitted them all
    start = captured.out.index("{")
    report, _ = json.JSONDecoder().raw_decode(captured.out[start:])
    assert report["inputs"] == len(data.images) and report["ok"] == 2 and report["fits_this_run"] == 2
    assert report["failed"] == 3 and report["skipped"] == 1 and report["output"] == str(out)
    assert "failures" not in report  # printed one per line on stderr instead
    failures = [line for line in captured.err.splitlines() if line.startswith("failed: ")]
    assert len(failures) == 3 and "no prompt row" in captured.err, failures
    assert report["exit_reason"] == "3 of 6 inputs failed (50 %), more than --max-failed-fraction 0 tolerates; " \
        "their rows say why (`failures`)" and f"exit status 3: {report['exit_reason']}\n" in captured.err
    # a tolerated share of failed inputs is a success (the undecodable images are tried again, and fail again)
    assert main(["decompose", "--input", str(tmp_path / "in"), "--output", str(out), "--steps", "4", "--rank", "2",
                 "--preview-steps", "2", "--max-failed-fraction", "0.5"]) == 0
    captured = capsys.readouterr()
    again, _ = json.JSONDecoder().raw_decode(captured.out)  # stdout: the JSON report alone
    assert again["fits_this_run"] == 0 and again["exit_reason"] == "3 of 6 inputs failed (50 %), within " \
        "--max-failed-fraction 0.5", again
    # a re-run that fits nothing new: its counts say so, and no rate of nothing (a re-run with nothing at all to
    # fit opens no MLflow run: test_reliability; this one tries the undecodable images again)
    assert (again["ok"], again["already_complete"], again["skipped"]) == (2, 2, 1), again
    assert again["efficiency"] is None and again["fits_per_hour"] is None
    # the last lines say what it did and what to do next, with commands for this library
    tail = captured.err[captured.err.index("done: "):]
    assert tail.startswith("done: 6 inputs: 0 fitted now, 2 already complete, 1 duplicates, 3 failed\n"), tail
    for says in (f"{out}/{layout.ITEMS}/<item id>/", f"unziplora bank gallery {out} --out {out}-gallery",
                 f"then open {out}-gallery/index.html", f"unziplora ui {out}", f"unziplora bank search {out} ",
                 f"unziplora registry search WORDS --tracking-uri sqlite:///{out}/mlflow.db",
                 f"unziplora generate --bank {out} --content ITEM_ID"):
        assert says in tail, (says, tail)

    named = check_rows(read_manifest(str(out)).to_pylist(), data, str(tmp_path / "in"))
    for name in data.names("ok"):
        check_artifacts(named[name], lambda path: open(path, "rb").read())
        assert named[name]["output_uri"].startswith(str(out / layout.ITEMS))
    parts = sorted((out / layout.MANIFEST).glob("*.parquet"))
    assert len(parts) == 1
    assert pq.read_table(parts[0]).num_rows == len(data.images)
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/manifest/*.parquet') WHERE status = 'ok'").fetchall()[0] == (2,)
    assert json.loads((out / "reports" / f"{report['run_id']}.json").read_text())["ok"] == 2


def test_next_steps_of_a_remote_or_untracked_library():
    from jobs.decompose import next_steps

    report = {"output": "s3://bucket/lib", "run_id": "R", "inputs": 3, "fits_this_run": 3, "already_complete": 0,
              "skipped": 0, "failed": 0, "fits_per_hour": 120.0, "efficiency": 0.9,
              "tracking": {"enabled": True, "tracking_uri": "http://mlflow:5000"}}
    text = next_steps(report)
    assert text.startswith("done: 3 inputs: 3 fitted now, 0 already complete, 0 duplicates, 0 failed; 120 "
                           "fits/hour, executor efficiency 0.9\n  this run's report: s3://bucket/lib/reports/R.json")
    assert "--out lib-gallery    then open lib-gallery/index.html" in text  # a local folder for a remote library
    assert "MLflow         open http://mlflow:5000 (or: unziplora ui s3://bucket/lib)" in text
    untracked = next_steps(report | {"output": "/data/my lib", "tracking": {"enabled": False}})
    assert "unziplora bank build '/data/my lib'" in untracked and "MLflow         tracking was off" in untracked
    assert "registry search" not in untracked


def test_rerun_keeps_the_real_error_of_an_undecodable_image(ray_cluster, tmp_path):
    """An image that fails with an ordinary error (here: undecodable) finished its attempt; re-running the job
    must not turn it into 'the worker process died each time' once the re-runs exceed max_attempts."""
    data = make_dataset(valid=1, corrupt=True, no_prompt=False, duplicate=False)
    write_local(data, tmp_path / "in")
    job = dict(input=str(tmp_path / "in"), output=str(tmp_path / "out"), fit=dict(FIT), failure={"max_attempts": 1},
               tracking={"enabled": False}, previews={"steps": 0})  # neither is what is tested here
    for run in range(2):
        report = run_job(JobSpec(**job), progress=False)
        named = check_rows(read_manifest(job["output"]).to_pylist(), data, job["input"])
        assert report["fits_this_run"] == (1 if run == 0 else 0)
        for name in data.names("failed"):
            error = named[name]["error"]
            # an attempt that ended in a handled error is not a crash: re-runs keep the real error
            assert "worker process died" not in error, f"run {run + 1}: {name}: {error}"
            assert "not an image" in error or "truncated" in error or "corrupt" in error, error


def test_manifest_parts_of_a_new_run_replace_the_old(tmp_path):
    """No Ray needed: the manifest schema round-trips through Parquet with its version metadata."""
    from pipeline.store.manifest import SCHEMA_VERSION, write_manifest
    from pipeline.store.storage import Store

    store = Store(str(tmp_path))
    rows = [{"source_uri": f"/x/{i}.png", "status": "failed", "error": "e", "attempts": 0, "schema_version": 1}
            for i in range(3)]
    parts = write_manifest(store, rows, "r1")
    table = pq.read_table(io.BytesIO(open(parts[0], "rb").read()))
    assert table.schema.metadata[b"unziplora.manifest.schema_version"] == str(SCHEMA_VERSION).encode()
    assert table.num_rows == 3 and table.schema.equals(SCHEMA, check_metadata=False)
    parts2 = write_manifest(store, rows[:1], "r2")  # a new run replaces the old parts
    assert sorted(p.name for p in (tmp_path / layout.MANIFEST).iterdir()) == [parts2[0].rsplit("/", 1)[-1]]


def _as_schema_2(library, job: JobSpec) -> dict[str, str]:
    """Rewrite a library written now the way schema 2 wrote it: each fit under its schema-2 id (no base-model
    fingerprint in it), rows and markers without a fingerprint, manifest parts marked version 2. Returns
    source URL -> schema-2 item id."""
    from pipeline.run.identify import identify
    from pipeline.run.source import read_inputs

    items = {item["source_uri"]: item for item in read_inputs(job.input, job.prompts).items}
    legacy = {}
    for marker in sorted(library.glob(layout.marker_key("*"))):
        row = json.loads(marker.read_text())
        ids = identify(items[row["source_uri"]], dataclasses.replace(job, adopt_legacy=True))[0]
        old_id = ids["legacy_item_id"]
        assert ids["item_id"] == row["item_id"] and old_id and old_id != row["item_id"]
        text = marker.read_text().replace(row["item_id"], old_id)
        marker.parent.rename(library / layout.ITEMS / old_id)
        row = json.loads(text) | {"schema_version": 2, "base_model_fingerprint": None}
        (library / layout.ITEMS / old_id / layout.MARKER).write_text(json.dumps(row))
        legacy[row["source_uri"]] = old_id
    shutil.rmtree(library / layout.SOURCES)
    shutil.rmtree(library / layout.ATTEMPTS)
    for part in library.glob("manifest/*.parquet"):  # its rows under the old ids, without the columns since
        table = pq.read_table(part)
        rows = []
        for row in table.to_pylist():
            text = json.dumps(row)
            if row["item_id"]:
                text = text.replace(row["item_id"], legacy[row["source_uri"]])
            rows.append(json.loads(text) | {"schema_version": 2, "source_stat": None})
        table = pa.Table.from_pylist(rows, schema=table.schema)
        pq.write_table(table.replace_schema_metadata({"unziplora.manifest.schema_version": "2"}), part)
    return legacy


def test_a_library_from_before_fingerprints_is_refit_or_adopted(ray_cluster, tmp_path, capsys):
    """Item ids now hold the base model's fingerprint, so a schema-2 library's fits are not found under them:
    a re-run fits again and says why, unless --adopt-legacy vouches for the old fits, which are then reused
    (in place, under their old ids) by that run and every later one."""
    data = make_dataset(valid=2, corrupt=False, no_prompt=False, duplicate=False)
    write_local(data, tmp_path / "in")
    job = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "first"), fit=dict(FIT),
                  tracking=Tracking(enabled=False), previews=Previews(steps=0))
    run_job(job, progress=False)
    shutil.copytree(tmp_path / "first", tmp_path / "second")
    planned = job.replace(state={"base_fingerprint": "preset:tiny"})
    _as_schema_2(tmp_path / "first", planned)
    legacy = _as_schema_2(tmp_path / "second", planned)
    capsys.readouterr()

    report = run_job(job, progress=False)  # no flag: fitted again, with a note
    assert report["fits_this_run"] == 2 and "--adopt-legacy" in capsys.readouterr().err
    for adopt in (True, False):  # adopted once; later runs follow the adoption without the flag
        again = dataclasses.replace(job, output=str(tmp_path / "second"), adopt_legacy=adopt)
        report = run_job(again, progress=False)
        assert report["fits_this_run"] == 0 and report["ok"] == 2, report
        named = check_rows(read_manifest(again.output).to_pylist(), data, again.input)
        for name, row in named.items():
            assert row["item_id"] == legacy[row["source_uri"]]
            check_artifacts(row, lambda path: open(path, "rb").read())


def test_prompt_table_cells_are_read_as_their_settings(tmp_path):
    """No Ray needed: every per-item setting is a column; a bad cell fails its own image with the column and the
    value, a per-job setting as a column refuses the table, and the job's own settings are checked up front."""
    from pipeline.run.identify import check_job_settings
    from pipeline.run.source import read_inputs
    from unziplora.errors import InputError

    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(png_bytes(1, 8, 8))
    (tmp_path / "prompts.csv").write_text("image,content,style,steps,seed,lr,init\n"
                                          "a.png,sks a,ink,5,,2e-4,zeros\n"
                                          "b.png,sks b,ink,4.7,1,,\n"
                                          "c.png,sks c,ink,6,abc,,\n")
    items = {i["source_uri"].rsplit("/", 1)[-1]: i for i in read_inputs(str(tmp_path)).items}
    assert json.loads(items["a.png"]["overrides"]) == {"steps": 5, "lr": 2e-4, "init": "zeros"}
    assert not items["a.png"]["prompt_error"]
    assert "column steps must be an integer, got 4.7" in items["b.png"]["prompt_error"]
    assert "column seed must be an integer, got 'abc'" in items["c.png"]["prompt_error"]
    (tmp_path / "prompts.csv").write_text("image,content,style,base_model\na.png,sks a,ink,toy\n")
    with pytest.raises(InputError, match=r"\['base_model'\], which are set for the whole job"):
        read_inputs(str(tmp_path))
    (tmp_path / "prompts.csv").write_text("image,content,style,style_alone\na.png,sks a,ink,0.25\n")
    with pytest.raises(InputError, match=r"\['style_alone'\]: retired fit settings"):
        read_inputs(str(tmp_path))
    with pytest.raises(InputError, match=r"\['content'\] are per image"):
        check_job_settings({"content": "sks", "steps": 4})
    with pytest.raises(InputError, match="setting rank must be an integer"):
        check_job_settings({"rank": "64x"})
    assert check_job_settings({"steps": 4, "base_model": "org/name@v1"}).revision == "v1"


def test_fits_are_handed_out_longest_first():
    """No Ray needed: the costliest fits (steps x pixels) go first, so no worker starts a long fit while the
    others run out of work; equal costs keep their order, and an item whose settings do not parse goes last
    (its worker fails it with its own error)."""
    from pipeline.run.executors import longest_first

    job = JobSpec(input="in", output="out", fit={"steps": 10, "resolution": 64})
    items = [{"source_uri": name, "content": "sks", "style": "ink", "overrides": json.dumps(overrides)}
             for name, overrides in [("a", {}), ("b", {"steps": 30}), ("c", {"steps": 8, "resolution": 256}),
                                     ("d", {"steps": "bad"}), ("e", {}), ("f", {"steps": 20})]]
    assert [i["source_uri"] for i in longest_first(items, job)] == ["c", "b", "f", "a", "e", "d"]
