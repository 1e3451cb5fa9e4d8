"""Real Ray nodes for tests: `ray start --block` in a new session with a private temp dir each, so a test's
cluster shares no state with ~/.ray, /tmp/ray or another test's Ray, and each node can be stopped, or killed
like a lost machine, by killing exactly its own processes (`ray stop` would stop every Ray of this user)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline_fixtures import free_port

RAY = str(Path(sys.executable).parent / "ray")


def session_processes(sid: int, marker: str) -> list[int]:
    """Pids of a node's processes: in the session `ray start` got (start_new_session), or naming the node's
    private temp dir on their command line (in case one started a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                continue  # killed already, only not reaped yet by its parent
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if os.getsid(pid) == sid or marker in cmdline:
                found.append(pid)
        except (OSError, ProcessLookupError):
            continue
    return found


class RayNode:
    """One `ray start ... --block` node; `args` are its own flags (--head or --address, ports, CPUs)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        # short path: Ray puts unix sockets under it (108-byte limit), so not under pytest's deep tmp_path
        self.temp_dir = tempfile.mkdtemp(prefix="urn-", dir="/tmp")
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
             f"--temp-dir={self.temp_dir}", *args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL every process of this node at once, as when its machine is lost."""
        self._kill_all(self.proc.pid)

    def stop(self, graceful: bool = True) -> None:
        sid = self.proc.pid  # the session id of a start_new_session child is its pid
        if graceful and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # --block: ray start then stops the processes it started
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self._kill_all(sid)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not session_processes(sid, self.temp_dir), "processes of the test cluster survived stop()"

    def _kill_all(self, sid: int) -> None:
        for _ in range(20):  # whatever is left of this node (workers, a job driver, agents)
            left = session_processes(sid, self.temp_dir)
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


class RayHead(RayNode):
    """A head node with the dashboard (the job API) on free ports; `args`: its other flags (CPUs)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.gcs_port, self.dashboard_port, agent_port = free_port(), free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        super().__init__(
            ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}",
             # not the default 52365: a local Ray in a test running alongside (pytest-xdist) holds that port,
             # and an agent that cannot bind never registers ("No available agent to submit job")
             f"--dashboard-agent-listen-port={agent_port}", *args], env, log_path)

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
