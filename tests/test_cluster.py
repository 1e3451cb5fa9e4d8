"""A real two-node Ray cluster on this machine (`ray start --head` with the job API, and `ray start --address`,
each with its own ports and temp dir), a job submitted to it as a user would (`ray job submit`), and a node
killed mid-job with every process on it, as when its machine is lost.

Auth: Ray >= 2.59 enables token auth for new local clusters; with RAY_AUTH_MODE unset, `ray start` turns it
on only when ~/.ray/auth_token happens to exist, and the `ray job submit` client sends a token only when its
own environment says token mode - so leftover ~/.ray state would decide whether the test passes. We set
RAY_AUTH_MODE=token and a fresh random RAY_AUTH_TOKEN in the environment of every process we start (the
nodes, hence the job driver and its workers, and the CLI): the test exercises the default, authenticated path
that real 2.60 clusters use, never reads or writes ~/.ray/auth_token, and checks that the dashboard rejects
requests without the token or with another one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store.manifest import read_manifest
from pipeline_fixtures import check_artifacts, check_rows, make_dataset, write_local
from ray_nodes import RAY, RayHead, RayNode

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Working-dir upload: only what the job imports. .venv alone is gigabytes (over Ray's package size limit).
EXCLUDES = ["/.venv/", "/.git/", "/out/", "/build/", "/infra/", "/benchmarks/", "/tests/", "/.pytest_cache/",
            "**/__pycache__/", "*.egg-info", "*.pyc", "/.whl/"]
pytestmark = pytest.mark.timeout(600)


def _cluster_cpus(address: str, env: dict) -> float:
    status = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, text=True,
                            timeout=60).stdout
    found = re.search(r"/([\d.]+) CPU", status)
    return float(found.group(1)) if found else 0.0


def _submit(head: RayHead, env: dict, cwd: Path, *args: str) -> str:
    """`ray job submit --no-wait ... -- python -m jobs.decompose ARGS`; returns the submission id. The job API
    answers before the head's dashboard agent (which starts job drivers) has registered, and the server then
    refuses with "No available agent to submit job, please try again later" - so we do."""
    deadline = time.monotonic() + 240  # the agent can take minutes on a loaded 2-core machine
    while True:
        submission = f"decompose-{secrets.token_hex(4)}"
        result = subprocess.run(
            [RAY, "job", "submit", "--no-wait", "--address", head.dashboard, "--submission-id", submission,
             "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
             "--log-style", "record", "--log-color", "false", "--", "python", "-m", "jobs.decompose", *args],
            env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
        if result.returncode == 0:
            return submission
        assert "No available agent" in result.stdout + result.stderr and time.monotonic() < deadline, \
            f"ray job submit failed ({result.returncode}):\n{result.stdout[-4000:]}{result.stderr[-3000:]}"
        time.sleep(2)


def test_submitted_train_job_goes_on_with_the_node_left_after_losing_one(tmp_path):
    """`ray job submit` of a Train job with two fit workers of 2 CPUs: one on the head (3 CPUs), one on the
    second node (2 CPUs). The second node is killed while both fit. Train restarts its group, cannot place 2
    workers any more, and after the start timeout the job goes on with the 1 worker the head holds: the job
    succeeds, every image is fitted, failed or skipped as it should be, and none is given up."""
    data = make_dataset(valid=2, corrupt=False, no_prompt=True, duplicate=True, steps_each=40)
    write_local(data, tmp_path / "in")
    library = tmp_path / "library"
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            # the job's `python` is this virtual environment's (the cluster passes its PATH on to jobs)
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    head = RayHead(["--num-cpus=3"], env, tmp_path / "head.log")
    nodes = [head]
    try:
        nodes.append(RayNode([f"--address={head.address}", "--num-cpus=2"], env, tmp_path / "node.log"))
        head.wait_ready(token)
        # token auth is really on, and checks the token of our environment (not a ~/.ray/auth_token)
        assert head.get("/api/jobs/", None) == 401
        assert head.get("/api/jobs/", secrets.token_hex(32)) == 403
        deadline = time.monotonic() + 180
        while _cluster_cpus(head.address, env) < 5:
            assert time.monotonic() < deadline, head.log_text() + nodes[1].log_text()
            time.sleep(1)

        submission = _submit(head, env, tmp_path, "--input", str(tmp_path / "in"), "--output", str(library),
                             "--executor", "train", "--workers", "2", "--cpus-per-worker", "2",
                             "--train-start-timeout", "10", "--rank", "2", "--preview-steps", "0", "--no-tracking",
                             "--max-failed-fraction", "0.25")  # 1 of its 4 inputs has no prompt row

        def job() -> dict:
            return head.get_json(f"/api/jobs/{submission}", token)

        def logs() -> str:
            return head.get_json(f"/api/jobs/{submission}/logs", token)["logs"]

        deadline = time.monotonic() + 300
        while True:  # both workers hold an item (Train's per-rank in-flight records)
            held = [h for p in library.glob("inflight/*/rank-*.json") for h in json.loads(p.read_text())["held"]]
            if len(held) == 2:
                break
            assert job()["status"] in ("PENDING", "RUNNING"), logs()[-4000:]
            assert time.monotonic() < deadline, logs()[-4000:]
            time.sleep(0.2)
        nodes[1].kill()
        deadline = time.monotonic() + 400
        while job()["status"] in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, logs()[-4000:]
            time.sleep(1)
        details, text = job(), logs()
        assert details["status"] == "SUCCEEDED", (details, text[-4000:])
        assert details["entrypoint"].startswith("python -m jobs.decompose"), details
        assert "could not start 2 fit workers within 10 s; going on with 1" in text, text[-4000:]

        # the job's printed report (in the job's logs) and the one it stored agree
        reports = sorted((library / "reports").glob("*.json"))
        assert len(reports) == 1, reports
        report = json.loads(reports[0].read_text())
        assert f'"run_id": "{report["run_id"]}"' in text, text[-4000:]
        assert (report["ok"], report["failed"], report["skipped"]) == (2, 1, 1), report
        assert report["exit_code"] == 0 and "within --max-failed-fraction 0.25" in report["exit_reason"], report
        named = check_rows(read_manifest(str(library)).to_pylist(), data, str(tmp_path / "in"))
        for name in data.names("ok"):
            check_artifacts(named[name], lambda path: open(path, "rb").read())
            assert named[name]["run_id"] == report["run_id"]
    finally:
        for node in reversed(nodes):
            node.stop(graceful=False)  # a test cluster: nothing to flush


def test_train_start_failures_go_on_with_fewer_workers_or_fail_in_one_line(monkeypatch):
    """run_train's decisions after Train could not start its group, without a cluster: fewer workers when the
    live nodes hold fewer, a bounded retry when they seem to hold enough, one line when they hold none."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from pipeline.run import executors
    from pipeline.run.spec import JobSpec, Scaling

    job = JobSpec(input="in", output="out", scaling=Scaling(executor="train", workers=3, cpus_per_worker=2,
                                                            gpus_per_worker=0, train_start_timeout_s=7))
    tried: list[int] = []
    cpus_per_node: list[float] = []

    def fit_with_train(job, items, workers, storage_path):
        tried.append(workers)
        if workers * job.scaling.cpus_per_worker > sum(cpus_per_node):
            raise ControllerError(WorkerGroupStartupTimeoutError(workers))

    monkeypatch.setattr(executors, "_fit_with_train", fit_with_train)
    monkeypatch.setattr(executors.ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": c}} for c in
                                                        cpus_per_node] + [{"Alive": False, "Resources": {"CPU": 8}}])
    cpus_per_node[:] = [3, 2]  # 1 worker per node: 2 of the 3 asked for (the dead node's 8 CPUs do not count)
    assert executors.run_train(job, []) == {} and tried == [3, 2]

    tried.clear()
    def never_starts(job, items, workers, storage_path):  # though the nodes hold all 3: retried twice, then one line
        tried.append(workers)
        raise ControllerError(WorkerGroupStartupTimeoutError(workers))

    monkeypatch.setattr(executors, "_fit_with_train", never_starts)
    cpus_per_node[:] = [6, 2]
    with pytest.raises(executors.JobError, match="could not start 3 fit workers of .* within 7 s, three times"):
        executors.run_train(job, [])
    assert tried == [3, 3, 3]

    cpus_per_node[:] = [1, 1]
    monkeypatch.setattr(executors, "_fit_with_train", fit_with_train)
    with pytest.raises(executors.JobError, match="could not start a fit worker within 7 s: no live node has"):
        executors.run_train(job, [])
