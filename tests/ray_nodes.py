"""Real Ray nodes for tests: `ray start --block` in a new session with a private temp dir each, so a test's
cluster shares no state with ~/.ray, /tmp/ray or another test's Ray, and each node can be stopped, or killed
like a lost machine, by killing exactly its own processes (`ray stop` would stop every Ray of this user)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
