"""`ray job submit ... -- python -m jobs.decompose ...` against a real `ray start --head` cluster.

The cluster runs in its own session (process group) with a private --temp-dir, so it shares no state with
~/.ray, /tmp/ray or the in-process Ray of test_pipeline.py; it is stopped by killing exactly the processes it
consists of (`ray stop` would stop every Ray of this user, including other tests' and sessions').

Auth: Ray >= 2.59 enables token auth for new local clusters; with RAY_AUTH_MODE unset, `ray start` turns it
on only when ~/.ray/auth_token happens to exist, and the `ray job submit` client sends a token only when its
own environment says token mode - so leftover ~/.ray state decides whether the test passes. We set
RAY_AUTH_MODE=token and a fresh random RAY_AUTH_TOKEN in the environment of every process we start (the
cluster, hence the job driver and its workers, and the CLI): the test exercises the default, authenticated
path that real 2.60 clusters use, never reads or writes ~/.ray/auth_token, and checks that the dashboard
rejects requests without the token or with another one.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.manifest import read_manifest
from pipeline_fixtures import check_artifacts, check_rows, free_port, make_dataset, write_local
from ray_nodes import RAY, RayNode

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Working-dir upload: only what the job imports. .venv alone is gigabytes (over Ray's package size limit).
EXCLUDES = ["/.venv/", "/.git/", "/out/", "/build/", "/infra/", "/benchmarks/", "/tests/", "/.pytest_cache/",
            "**/__pycache__/", "*.egg-info", "*.pyc"]


class RayHead(RayNode):
    """A head node with the dashboard (the job API) on free ports."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.gcs_port, self.dashboard_port, agent_port = free_port(), free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = env
        super().__init__(
            ["--head", f"--port={self.gcs_port}", "--num-cpus=6", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             # not the default 52365: a local Ray in a test running alongside (pytest-xdist) holds that port,
             # and an agent that cannot bind never registers ("No available agent to submit job")
             f"--dashboard-agent-listen-port={agent_port}"], env, log_path)

    def get(self, path: str, token: str | None) -> int:
        """The HTTP status of GET `path` on the dashboard, with `token` as the bearer token (or none)."""
        return self._request(path, token)[0]

    def get_json(self, path: str, token: str):
        status, body = self._request(path, token)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def _request(self, path: str, token: str | None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.dashboard + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, token: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ray start exited with {self.proc.returncode}: {self.log_text()}"
            try:
                if self.get("/api/jobs/", token) == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"the job API at {self.dashboard} did not come up in {timeout} s: {self.log_text()}")


@pytest.mark.timeout(600)
def test_ray_job_submit_end_to_end(tmp_path):
    data = make_dataset(valid=2, corrupt=False, no_prompt=True, duplicate=True)
    write_local(data, tmp_path / "in")
    out = tmp_path / "library"

    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONUNBUFFERED": "1",
            # the job's `python` is this virtual environment's (the cluster passes its PATH on to jobs)
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    head = RayHead(env, tmp_path / "ray-start.log")
    try:
        head.wait_ready(token)
        # token auth is really on, and checks the token of our environment (not a ~/.ray/auth_token)
        assert head.get("/api/jobs/", None) == 401
        assert head.get("/api/jobs/", secrets.token_hex(32)) == 403

        def submit(submission: str) -> subprocess.CompletedProcess:
            command = [RAY, "job", "submit", "--address", head.dashboard, "--submission-id", submission,
                       "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
                       "--log-style", "record", "--log-color", "false", "--",
                       "python", "-m", "jobs.decompose", "--input", str(tmp_path / "in"), "--output", str(out),
                       "--steps", "4", "--rank", "2", "--workers", "1", "--quiet"]
            return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)

        # The job API answers before the node's dashboard agent (which starts job drivers) has registered; the
        # server then refuses with "No available agent to submit job, please try again later" - so we do.
        deadline = time.monotonic() + 240  # the agent can take minutes on a loaded 2-core machine
        while True:
            submission = f"decompose-{secrets.token_hex(4)}"
            result = submit(submission)
            if result.returncode == 0 or "No available agent" not in result.stdout + result.stderr \
                    or time.monotonic() > deadline:
                break
            time.sleep(2)
        logs = result.stdout[-6000:] + result.stderr[-3000:]
        assert result.returncode == 0, f"ray job submit failed ({result.returncode}):\n{logs}"
        assert "succeeded" in result.stdout.lower(), logs

        details = head.get_json(f"/api/jobs/{submission}", token)
        assert details["status"] == "SUCCEEDED" and details["entrypoint"].startswith("python -m jobs.decompose"), details

        # the job's printed report (streamed back by `ray job submit`) and the one it stored agree
        reports = sorted((out / "reports").glob("*.json"))
        assert len(reports) == 1, reports
        report = json.loads(reports[0].read_text())
        assert f'"run_id": "{report["run_id"]}"' in result.stdout, logs
        assert report["inputs"] == len(data.images) and report["fits_this_run"] == 2, report
        assert (report["ok"], report["failed"], report["skipped"]) == (2, 1, 1), report

        named = check_rows(read_manifest(str(out)).to_pylist(), data, str(tmp_path / "in"))
        for name in data.names("ok"):
            check_artifacts(named[name], lambda path: open(path, "rb").read())
            assert named[name]["run_id"] == report["run_id"]
    finally:
        head.stop()
