"""The local Ray a job starts when no cluster is given, and what a killed job leaves of it.

`ray.init()` without an address starts a private cluster whose processes end with the driver when it exits
or is stopped (SIGTERM, SIGINT, SIGHUP: handled as an exit, so Ray's shutdown runs). A driver killed with
SIGKILL cannot clean up: Ray's reaper takes the raylet and the GCS with it, but node agents (DashboardAgent,
RuntimeEnvAgent) and workers outlive it. So every process of such a cluster carries `UNZIPLORA_LOCAL_RAY=
<driver pid>:<driver start time>` in its environment, and the next job on this machine ends those whose
driver is gone (Linux: /proc; elsewhere nothing is left to find).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

MARK = "UNZIPLORA_LOCAL_RAY"


def start_local_ray(num_cpus: int) -> None:
    import ray

    reap_orphans()
    os.environ[MARK] = _identity(os.getpid())  # inherited by every process the cluster starts
    exit_cleanly_on_signals()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def exit_cleanly_on_signals() -> None:
    """SIGTERM and SIGHUP raise SystemExit in the main thread (where nobody handles them yet): `finally` blocks
    and atexit run (the job's MLflow run is closed KILLED, its lease released, a local Ray stopped)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set there; a job run in a thread keeps its process's handling
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _exit_on_signal)


def reap_orphans() -> list[int]:
    """End the processes of local clusters whose driver died; returns their pids."""
    ended = []
    proc = Path("/proc")
    if not proc.is_dir():
        return ended
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        owner = next((v[len(MARK) + 1:].decode() for v in environ if v.startswith(MARK.encode() + b"=")), None)
        if owner is None:
            continue
        pid = int(owner.split(":", 1)[0])
        if _identity(pid) != owner:  # its driver is dead (or the pid now belongs to another process)
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                ended.append(int(entry.name))
            except OSError:
                pass
    if ended:
        print(f"ended {len(ended)} processes left by a local Ray whose job was killed", file=sys.stderr)
    return ended


def _identity(pid: int) -> str:
    """pid plus its start time (field 22 of /proc/<pid>/stat): a reused pid is another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return f"{pid}:gone"


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # atexit then runs ray.shutdown(), which stops the local cluster
