"""A real two-node Ray cluster on this machine (`ray start --head` and `ray start --address`, each with its own
ports and temp dir), a job driver connected to it as a user's would be (`--address`), and a node killed mid-job
with every process on it, as when its machine is lost."""

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

from pipeline.manifest import read_manifest
from pipeline_fixtures import by_name, free_port, png_bytes
from ray_nodes import RAY, RayNode

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


def _cluster_cpus(address: str, env: dict) -> float:
    status = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, text=True,
                            timeout=60).stdout
    found = re.search(r"/([\d.]+) CPU", status)
    return float(found.group(1)) if found else 0.0


def _decompose(address: str, inputs: Path, library: Path, env: dict, log: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.decompose", "--address", address, "--input", str(inputs), "--output",
         str(library), "--executor", "train", "--rank", "2", "--preview-steps", "0", "--no-tracking", *flags],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO)


def test_train_goes_on_with_the_node_left_after_losing_one(tmp_path):
    """Two fit workers of 2 CPUs: one on the head (3 CPUs), one on the second node (2 CPUs). The second node is
    killed while both fit. Train restarts its group, cannot place 2 workers any more, and after the start
    timeout the job goes on with the 1 worker the head holds: every image is fitted, none is failed or given
    up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = [RayNode(["--head", f"--port={port}", "--num-cpus=3", "--include-dashboard=false"], env,
                     tmp_path / "head.log")]
    try:
        nodes.append(RayNode([f"--address={address}", "--num-cpus=2"], env, tmp_path / "node.log"))
        deadline = time.monotonic() + 180
        while _cluster_cpus(address, env) < 5:
            assert time.monotonic() < deadline, nodes[0].log_text() + nodes[1].log_text()
            time.sleep(1)

        inputs, library = tmp_path / "in", tmp_path / "library"
        inputs.mkdir()
        rows = ["image,content,style,steps"]
        for i in range(2):
            (inputs / f"{i}.png").write_bytes(png_bytes(200 + i, 64, 64))
            rows.append(f"{i}.png,sks thing{i},style {i},40")
        (inputs / "prompts.csv").write_text("\n".join(rows) + "\n")
        log = tmp_path / "job.log"
        driver = _decompose(address, inputs, library, env, log, "--workers", "2", "--cpus-per-worker", "2",
                            "--train-start-timeout", "10")
        deadline = time.monotonic() + 300
        while True:  # both workers hold an item (Train's per-rank in-flight records)
            held = [json.loads(p.read_text()).get("item_id") for p in library.glob("inflight/*/rank-*.json")]
            if len([h for h in held if h]) == 2:
                break
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        nodes[1].kill()
        assert driver.wait(timeout=400) == 0, log.read_text()[-4000:]
        text = log.read_text()
        assert "could not start 2 fit workers within 10 s; going on with 1" in text, text[-4000:]
        report = json.loads(next((library / "reports").glob("*.json")).read_text())
        assert (report["ok"], report["failed"]) == (2, 0), report
        named = by_name(read_manifest(str(library)).to_pylist())
        assert all(row["status"] == "ok" for row in named.values()), named

    finally:
        for node in reversed(nodes):
            node.stop(graceful=False)  # a test cluster: nothing to flush


def test_train_start_failures_go_on_with_fewer_workers_or_fail_in_one_line(monkeypatch):
    """run_train's decisions after Train could not start its group, without a cluster: fewer workers when the
    live nodes hold fewer, a bounded retry when they seem to hold enough, one line when they hold none."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from pipeline import executors
    from pipeline.spec import JobSpec

    job = JobSpec(input="in", output="out", executor="train", workers=3, cpus_per_worker=2, gpus_per_worker=0,
                  train_start_timeout_s=7)
    tried: list[int] = []
    cpus_per_node: list[float] = []

    def fit_with_train(job, items, workers, storage_path):
        tried.append(workers)
        if workers * job.cpus_per_worker > sum(cpus_per_node):
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
