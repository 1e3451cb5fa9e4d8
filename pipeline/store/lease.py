"""One job at a time writes a library: a lease under `<output>/lease/`.

The lease is a sequence of generations, `lease/<generation>.json` ({run_id, host, pid, heartbeat, ttl_s,
released}), each created with an exclusive, atomic write (`Store.create`: a hard link on local disk, a
conditional PUT with If-None-Match on S3). The highest generation is the lease: its owner rewrites it every `ttl_s / 4` seconds
(the heartbeat) and marks it released at the end. A job may take the library when the highest generation is
released, or stale: no heartbeat for `ttl_s` seconds (a killed job), or a dead process on this very host. To
take it, it creates the next generation; when two jobs race, the store lets exactly one create it.

A second job therefore refuses at once with who holds the library (or waits for it, `wait_s`). An owner that
finds a newer generation than its own lost the lease (it stalled past `ttl_s`): it stops writing the manifest
(its fits are safe under their ids; the new owner counts them).
Clocks: staleness compares the owner's UTC heartbeat with this host's clock; keep hosts NTP-synced.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

from unziplora.errors import UnZipLoRAError

from . import layout
from .storage import Store

TTL_S = 120.0
KEEP_GENERATIONS = 8  # older generations are pruned by the next owner


class LibraryBusyError(UnZipLoRAError):
    """Another live job writes this library."""


class LeaseLostError(UnZipLoRAError):
    """This job stalled past the lease's time to live and another job took the library over."""


class LibraryLease:
    def __init__(self, store: Store, run_id: str, ttl_s: float = TTL_S):
        self.store, self.run_id, self.ttl_s = store, run_id, ttl_s
        self.generation: int | None = None
        self.lost_to: dict | None = None
        self.took_over: dict | None = None  # the stale lease this job replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquire / release -----------------------------------------------------------------------------------

    def acquire(self, wait_s: float = 0.0, poll_s: float = 2.0) -> "LibraryLease":
        deadline = time.monotonic() + wait_s
        while True:
            holder = self._try_acquire()
            if holder is None:
                self._thread = threading.Thread(target=self._beat, name="unziplora-lease", daemon=True)
                self._thread.start()
                return self
            if time.monotonic() >= deadline:
                age = time.time() - holder.get("heartbeat", 0)
                raise LibraryBusyError(
                    f"{self.store.url()} is being written by job {holder.get('run_id')} (host "
                    f"{holder.get('host')}, pid {holder.get('pid')}, last heartbeat {age:.0f} s ago); run one job "
                    f"per library at a time, or wait for it (--wait-for-library SECONDS). A job that died is "
                    f"taken over {self.ttl_s:.0f} s after its last heartbeat")
            time.sleep(min(poll_s, max(0.1, deadline - time.monotonic())))

    def _try_acquire(self) -> dict | None:
        """Take the next generation if the library is free; else the live holder's record."""
        current, record = self._highest()
        if record is not None and not self._free(record):
            return record
        generation = (current or 0) + 1
        try:
            self.store.create(self._record(generation), layout.LEASE, _name(generation))
        except FileExistsError:  # another job took this generation first
            return self._highest()[1] or {"run_id": "?"}
        self.generation = generation
        self.took_over = record if record is not None and not record.get("released") else None
        self._prune(generation)
        return None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.generation is not None and self.lost_to is None:
            try:
                self.store.write_bytes(self._record(self.generation, released=True), layout.LEASE, _name(self.generation))
            except Exception as exc:  # the next job takes it over after ttl_s
                print(f"warning: could not release the library lease: {exc}", file=sys.stderr)

    def __enter__(self) -> "LibraryLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def check(self) -> None:
        """Raise if another job took the library over (before this job writes what it owns: the manifest)."""
        self._look_for_newer()
        if self.lost_to is not None:
            raise LeaseLostError(
                f"job {self.lost_to.get('run_id')} took {self.store.url()} over after this job sent no heartbeat "
                f"for {self.ttl_s:.0f} s: this run does not write the manifest (its fits are kept; the other "
                f"job or the next run counts them)")

    # -- heartbeat ---------------------------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if self._look_for_newer():
                    return
                self.store.write_bytes(self._record(self.generation), layout.LEASE, _name(self.generation))
            except Exception as exc:  # a store hiccup: the next beat tries again, well within ttl_s
                print(f"warning: lease heartbeat failed: {exc}", file=sys.stderr)

    def _look_for_newer(self) -> bool:
        current, record = self._highest()
        if current is not None and self.generation is not None and current > self.generation:
            self.lost_to = record or {}
            return True
        return False

    # -- records -----------------------------------------------------------------------------------------------

    def _record(self, generation: int, released: bool = False) -> bytes:
        return json.dumps({"generation": generation, "run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "heartbeat": time.time(), "ttl_s": self.ttl_s,
                           "released": released}).encode()

    def _highest(self) -> tuple[int | None, dict | None]:
        generations = sorted(g for g in (_generation(p) for p in self.store.list(layout.LEASE)) if g is not None)
        if not generations:
            return None, None
        name = _name(generations[-1])
        try:
            return generations[-1], json.loads(self.store.read_bytes(layout.LEASE, name))
        except (OSError, ValueError):  # being written, or left half-written: as old as the file itself
            try:
                written = self.store.fs.modified(self.store.path(layout.LEASE, name)).timestamp()
            except Exception:
                written = time.time()
            return generations[-1], {"heartbeat": written, "run_id": "?"}

    def _free(self, record: dict) -> bool:
        if record.get("released"):
            return True
        if time.time() - float(record.get("heartbeat", 0)) > float(record.get("ttl_s", self.ttl_s)):
            return True
        return record.get("host") == socket.gethostname() and not _alive(record.get("pid"))

    def _prune(self, generation: int) -> None:
        for path in self.store.list(layout.LEASE):
            old = _generation(path)
            if old is not None and old <= generation - KEEP_GENERATIONS:
                try:
                    self.store.remove(path)
                except OSError:
                    pass


def _name(generation: int) -> str:
    return f"{generation:012d}.json"


def _generation(path: str) -> int | None:
    name = path.rsplit("/", 1)[-1]
    stem = name.removesuffix(".json")
    return int(stem) if name.endswith(".json") and stem.isdigit() else None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or no pid: assume alive
    return True
