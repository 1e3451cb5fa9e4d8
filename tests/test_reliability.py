"""Hostile input and unlucky operators: bad cells and stray files, two jobs on one library, a full disk,
paths and ids from data, secrets in error texts, quotes in MLflow filters, jobs that died. Each test fixes a
class of failure, not one case: the property test at the end draws the cases.

Real components: a local Ray, a moto S3 server, MLflow on SQLite; a full disk is an fsspec filesystem with a
quota (the one stand-in: a real full disk needs root here), driven through the real worker code.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.store import layout
from pipeline.run.job import run_job
from pipeline.store.lease import LeaseLostError, LibraryBusyError, LibraryLease
from pipeline.store.manifest import past_attempts, read_manifest
from pipeline.run.source import read_inputs
from pipeline.run.spec import Failure, JobSpec, Previews, RunState, Tracking
from pipeline.store.storage import Store, UnsafePathError
from pipeline_fixtures import check_artifacts, free_port, png_bytes
from unziplora.errors import InputError
from unziplora.fit_files import FILES, PREVIEWS, RECORD
from unziplora.redact import redact, scrub

pytestmark = pytest.mark.timeout(600)
SMALL = {"steps": 2, "rank": 2, "recalibrations": 1}


def library_store(where: str, tmp_path, s3, name: str) -> Store:
    if where == "local":
        return Store(str(tmp_path / name))
    return Store(f"s3://{s3.bucket}/{name}-{time.time_ns()}", s3.storage_options)


def small_input(folder: Path, n: int = 2, extra: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,content,style"]
    for i in range(n):
        (folder / f"im{i}.png").write_bytes(png_bytes(40 + i, 24, 24))
        rows.append(f"im{i}.png,sks thing{i},style {i}")
    (folder / "prompts.csv").write_text("\n".join(rows) + "\n")
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    return folder


# ---------------------------------------------------------------------------------------------------------
# 5. one redaction for every text that leaves a process


def test_one_redaction_hides_secrets_in_uris_and_free_text():
    assert redact("http://user:pw@host:5000/x?token=abc&run=1") == "http://user:***@host:5000/x?token=***&run=1"
    assert redact("sqlite:////tmp/lib/mlflow.db") == "sqlite:////tmp/lib/mlflow.db"
    text = ("MlflowException: API request to http://h:5000/api/2.0?token=SECRET1 failed; "
            "https://b.s3.amazonaws.com/k.png?X-Amz-Credential=SECRET2&X-Amz-Signature=SECRET3 "
            "aws_secret_access_key=SECRET4 Authorization: Bearer SECRET5 {'api_key': 'SECRET6'} "
            "postgresql://me:SECRET7@db/x")
    clean = scrub(text)
    assert "SECRET" not in clean, clean
    assert "http://h:5000/api/2.0?token=***" in clean and "me:***@db" in clean
    assert scrub("tokenizer: CLIPTokenizer, steps=4") == "tokenizer: CLIPTokenizer, steps=4"  # not secrets


# ---------------------------------------------------------------------------------------------------------
# 4. paths and ids from data never leave their folder


def test_paths_and_ids_from_data_never_leave_their_folder(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.cli import main
    from pipeline.store.manifest import SCHEMA, empty_row

    store = Store(str(tmp_path / "lib"))
    for part in ("../x", "a/../../x", "/etc/passwd", "", "a\\b", "."):
        with pytest.raises(UnsafePathError, match="would leave its folder"):
            store.write_bytes(b"x", layout.ITEMS, part, layout.MARKER)
    assert not (tmp_path / "x").exists()
    # a hostile manifest: the bank and `registry sync` refuse it with one line, and write nothing outside
    row = empty_row(str(tmp_path / "a.png")) | {"item_id": "../../escaped", "status": "ok"}
    (tmp_path / "lib" / layout.MANIFEST).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), tmp_path / "lib" / layout.MANIFEST / "part-x.parquet")
    with pytest.raises(InputError, match="'../../escaped' is not an item id"):
        read_manifest(str(tmp_path / "lib"))
    assert main(["bank", "build", str(tmp_path / "lib")]) == 2
    assert main(["registry", "sync", str(tmp_path / "lib"), "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("is not an item id") == 2 and "Traceback" not in err, err
    assert not (tmp_path / "escaped").exists()


# ---------------------------------------------------------------------------------------------------------
# 2. one job at a time writes a library: the lease


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_library_lease(where, tmp_path, s3):
    store = library_store(where, tmp_path, s3, "lease")
    first = LibraryLease(store, "run-a", ttl_s=30).acquire()
    with pytest.raises(LibraryBusyError, match=r"being written by job run-a .*last heartbeat \d+ s ago"):
        LibraryLease(store, "run-b", ttl_s=30).acquire()
    first.release()
    # a released library is free; of many jobs racing for it, the store lets exactly one in
    results: list = []
    barrier = threading.Barrier(6)

    def contender(n: int) -> None:
        barrier.wait()
        try:
            results.append(LibraryLease(store, f"race-{n}", ttl_s=30).acquire())
        except LibraryBusyError as exc:
            results.append(exc)

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [r for r in results if isinstance(r, LibraryLease)]
    assert len(winners) == 1 and len(results) == 6, results
    winners[0].release()
    # the heartbeat keeps a live job's lease; a job that stopped beating (killed) is taken over after its ttl,
    # and if it comes back it finds out before it writes anything of its own
    live = LibraryLease(store, "run-live", ttl_s=2.0).acquire()
    time.sleep(3.0)
    with pytest.raises(LibraryBusyError, match="run-live"):
        LibraryLease(store, "run-c", ttl_s=30).acquire()
    live._stop.set()  # its process froze (or was killed): no more heartbeats
    live._thread.join()
    time.sleep(2.2)
    taker = LibraryLease(store, "run-d", ttl_s=30).acquire()
    assert taker.took_over["run_id"] == "run-live"
    with pytest.raises(LeaseLostError, match="job run-d took"):
        live.check()
    taker.release()
    live.release()  # the loser's release must not free the winner's lease...
    last = LibraryLease(store, "run-e", ttl_s=30).acquire()
    assert last.took_over is None  # ...which run-d released
    last.release()


def test_a_dead_process_on_this_host_frees_its_lease_at_once(tmp_path):
    store = Store(str(tmp_path / "lib"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = LibraryLease(store, "run-dead", ttl_s=3600).acquire()
    lease._stop.set()
    lease._thread.join()
    record = json.loads(store.read_bytes("lease", "000000000001.json")) | {"pid": int(dead.stdout)}
    store.write_json(record, "lease", "000000000001.json")
    with LibraryLease(store, "run-next", ttl_s=3600).acquire() as taker:
        assert taker.took_over["run_id"] == "run-dead"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_jobs_on_one_library(where, ray_cluster, s3, tmp_path):
    """Job A fits; job B, started meanwhile, refuses at once and names A; job C waits for A and then finds
    everything complete: nothing is fitted twice and every file matches the manifest's sha256."""
    folder = small_input(tmp_path / "in")
    output = library_store(where, tmp_path, s3, "shared").url()
    options = s3.storage_options if where == "s3" else {}

    def job(**kwargs) -> JobSpec:
        return JobSpec(input=str(folder), output=output, fit=dict(SMALL), storage_options=options, **kwargs,
                       tracking=Tracking(enabled=False), previews=Previews(steps=0))

    reports: dict = {}
    first = threading.Thread(target=lambda: reports.setdefault("a", run_job(job(state=RunState(run_id="job-a")),
                                                                            progress=False)))
    first.start()
    store = Store(output, options)
    deadline = time.monotonic() + 120
    while not store.list("lease") and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(LibraryBusyError, match="being written by job job-a"):
        run_job(job(state=RunState(run_id="job-b")), progress=False)
    waited = run_job(job(state=RunState(run_id="job-c"), failure=Failure(wait_for_library_s=300)), progress=False)
    first.join()
    assert reports["a"]["fits_this_run"] == 2 and reports["a"]["ok"] == 2
    assert waited["fits_this_run"] == 0 and waited["ok"] == 2
    rows = read_manifest(output, options).to_pylist()
    assert len(rows) == 2
    for row in rows:
        check_artifacts(row, lambda uri: store.fs.cat_file(uri))


# ---------------------------------------------------------------------------------------------------------
# 3. a full disk


class QuotaFS(MemoryFileSystem):
    """An in-memory store that fails writes with ENOSPC once `quota` bytes are written (a full disk)."""

    protocol = "quotafs"
    store: dict = {}
    pseudo_dirs = [""]
    quota = 10**12
    written = 0

    def _charge(self, n: int, path: str) -> None:
        if QuotaFS.written + n > QuotaFS.quota:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        QuotaFS.written += n

    def pipe_file(self, path, value, *args, **kwargs):
        self._charge(len(value), path)
        return super().pipe_file(path, value, *args, **kwargs)

    def put_file(self, lpath, rpath, *args, **kwargs):
        self._charge(os.path.getsize(lpath), rpath)
        return super().put_file(lpath, rpath, *args, **kwargs)


def test_a_full_disk_fails_the_item_cleanly(tmp_path, capsys):
    """The store fills up while the fit's files are uploaded: the item gets one clear line, no temporary or
    partial file is left, no marker claims it, and it is not charged a crash; with space again it is fitted."""
    import fsspec

    from pipeline.run.worker import FitWorker

    fsspec.register_implementation("quotafs", QuotaFS, clobber=True)
    folder = small_input(tmp_path / "in", n=1)
    job = JobSpec(input=str(folder), output="quotafs://lib", fit=dict(SMALL), tracking=Tracking(enabled=False),
                  previews=Previews(steps=0), state=RunState(run_id="run-full"))
    item = read_inputs(job.input).items[0]
    worker = FitWorker(job, device="cpu")
    QuotaFS.written, QuotaFS.quota = 0, 20_000  # room for the bookkeeping, not for the LoRAs
    row = worker.process(item)
    assert row["status"] == "failed" and row["this_run"] == "failed"
    assert "No space left on device" in row["error"] and "\n" not in row["error"], row["error"]
    fs = QuotaFS()
    left = fs.find("/lib")
    assert not [p for p in left if ".tmp-" in p], left
    assert not [p for p in left if f"/{layout.ITEMS}/" in p], left  # no partial fit, no marker
    assert past_attempts(worker.store, row["item_id"]) == []  # a full disk is not a crash
    QuotaFS.quota = 10**12
    again = worker.process(item)
    assert again["status"] == "ok" and again["attempts"] == 1, again.get("error")
    # the driver's side: a library that cannot be written is one line and exit status 1, not a traceback
    from jobs.cli import main

    (tmp_path / "a_file").write_text("")
    capsys.readouterr()  # the fits' own output above (progress lines, warnings) is not the driver's
    assert main(["decompose", "--input", str(folder), "--output", str(tmp_path / "a_file" / "lib"),
                 "--no-tracking", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Not a directory" in err, err


# ---------------------------------------------------------------------------------------------------------
# 5, 6, 7, 8 in real jobs: secrets, quotes, dead jobs' runs, every input named


def test_secrets_quotes_dead_runs_and_stray_files_in_real_jobs(ray_cluster, tmp_path, capfd, monkeypatch):
    from mlflow import MlflowClient

    folder = small_input(tmp_path / "in", n=1, extra={"logo.svg": b"<svg/>", "photo.heic": b"x"})
    with open(folder / "prompts.csv", "a") as f:
        f.write("gone.png,sks gone,style gone\n")
    # a tracking server that is down, whose URI carries a token: no row, marker, report or line shows it
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not after MLflow's backoff
    dead = f"http://127.0.0.1:{free_port()}/?token=SECRET123"
    job = JobSpec(input=str(folder), output=str(tmp_path / "secret-lib"), fit=dict(SMALL),
                  tracking=Tracking(uri=dead), previews=Previews(steps=0))
    report = run_job(job, progress=True)
    out = capfd.readouterr()
    texts = [out.out, out.err, json.dumps(report)] + [p.read_text() for p in (tmp_path / "secret-lib").rglob("*")
                                                      if p.is_file() and p.suffix in (".json", "")]
    texts.append(json.dumps(read_manifest(job.output).to_pylist(), default=str))
    assert not [t for t in texts if "SECRET123" in t]
    row = read_manifest(job.output).to_pylist()[0]
    assert row["status"] == "ok" and "not tracked" in row["tracking_error"] and "token=***" in row["tracking_error"]
    # every input is named: stray files and a prompt row that names no image, in the plan line and report
    assert "2 files ignored (logo.svg, photo.heic)" in out.err and "1 prompt rows name no image (gone.png)" in out.err
    assert report["ignored_files"] == 2 and {i["uri"].rsplit("/", 1)[-1] for i in report["ignored"]} == {
        "logo.svg", "photo.heic"}
    assert report["unmatched"] == [{"row": 2, "image": "gone.png"}]

    # quotes in the library's path reach MLflow filters: tracking still works, and nothing is tracked twice
    quoted = tmp_path / "it's \"quoted\""
    job = JobSpec(input=str(folder), output=str(quoted), fit=dict(SMALL), previews=Previews(steps=0))
    first = run_job(job, progress=False)
    assert first["tracking_errors"] == 0 and first["tracking"]["error"] is None, first["tracking"]
    row = read_manifest(job.output).to_pylist()[0]
    assert row["mlflow_run_id"] and row["content_model_uri"] and not row["tracking_error"]
    client = MlflowClient(first["tracking"]["tracking_uri"])
    experiment = client.get_experiment_by_name(first["tracking"]["library"]).experiment_id
    # a job that died: its parent run stays RUNNING and it stored no report; the next job on the library (even
    # one with nothing to fit, which opens no run of its own) closes it as KILLED
    client.update_run(first["tracking"]["parent_run_id"], status="RUNNING")
    (quoted / "reports" / f"{first['run_id']}.json").unlink()
    second = run_job(job, progress=False)
    assert client.get_run(first["tracking"]["parent_run_id"]).info.status == "KILLED"
    assert second["fits_this_run"] == 0 and second["tracking"]["parent_run_id"] is None
    fits = client.search_runs([experiment], "tags.`unziplora.kind` = 'fit'")
    assert len(fits) == 1, [r.data.tags for r in fits]
    versions = client.search_model_versions(f"name = '{first['tracking']['library']}-content'")
    assert len(versions) == 1

    # one library, many jobs: a second folder adds its rows, a re-run of the first keeps the second's
    other = small_input(tmp_path / "other", n=1)
    (other / "im0.png").write_bytes(png_bytes(99, 24, 24))
    run_job(dataclasses.replace(job, input=str(other)), progress=False)
    again = run_job(job, progress=False)
    assert again["fits_this_run"] == 0 and again["inputs"] == 1 and again["library_rows"] == 2
    assert len(read_manifest(job.output).to_pylist()) == 2
    # another spelling of the library (relative, trailing slash) is the same library: nothing synced twice
    from jobs.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["registry", "sync", f"./{quoted.name}/", "--all"]) == 0
    assert len(client.search_runs([experiment], "tags.`unziplora.kind` = 'fit'")) == 2
    assert len(client.search_model_versions(f"name = '{first['tracking']['library']}-style'")) == 2
    # ... and so is a symlink to it
    (tmp_path / "link").symlink_to(quoted)
    runs = len(client.search_runs([experiment]))
    assert main(["registry", "sync", str(tmp_path / "link"), "--all"]) == 0
    assert len(client.search_runs([experiment])) == runs
    assert len(client.search_model_versions(f"name = '{first['tracking']['library']}-style'")) == 2
    # `registry sync` takes the library's lease, as a job does: it cannot race a job's manifest
    capsys = capfd
    capsys.readouterr()
    with LibraryLease(Store(str(quoted)), "job-busy", ttl_s=30).acquire():
        assert main(["registry", "sync", str(quoted), "--all"]) == 2
    assert "being written by job job-busy" in capsys.readouterr().err
    # `forget` on a path that is no library, or of a prefix naming no source: refused, nothing made or changed
    assert main(["forget", str(tmp_path / "no-such-lib"), str(other)]) == 2
    assert "holds no library manifest" in capsys.readouterr().err and not (tmp_path / "no-such-lib").exists()
    assert main(["forget", str(quoted), str(other), str(tmp_path / "elsewhere")]) == 2
    assert f"{tmp_path / 'elsewhere'} names no source of {quoted}" in capsys.readouterr().err
    assert len(read_manifest(job.output).to_pylist()) == 2
    # removing sources is explicit, and keeps their fits
    assert main(["forget", str(quoted), str(other)]) == 0
    rows = read_manifest(job.output).to_pylist()
    assert [r["source_uri"] for r in rows] == [str(folder / "im0.png")]
    assert len(list(quoted.glob(layout.marker_key("*")))) == 2


def test_rows_carry_the_workers_own_error(tmp_path):
    """An input deleted or replaced after planning: the row says what its worker found, not "not processed"."""
    from pipeline.run.job import Plan, collect_rows
    from pipeline.store.manifest import failed_row, source_key

    store = Store(str(tmp_path / "lib"))
    items = [{"source_uri": f"/in/{n}.png"} for n in ("gone", "replaced", "lost", "stale")]
    plan = Plan(item_ids={i["source_uri"]: "a" * 24 for i in items}, to_fit=items, duplicates={})
    returned = {"/in/gone.png": failed_row(items[0], "cannot read /in/gone.png: No such file")}
    store.write_json(failed_row(items[1], "fitted under its new bytes") | {"item_id": "b" * 24,
                     "reported_by": "run-now"}, *source_key("/in/replaced.png"))
    store.write_json(failed_row(items[3], "from an older run") | {"item_id": "c" * 24, "reported_by": "run-old"},
                     *source_key("/in/stale.png"))
    rows = {r["source_uri"]: r for r in collect_rows(store, items, plan, returned, "run-now")}
    assert "No such file" in rows["/in/gone.png"]["error"]
    assert rows["/in/replaced.png"]["error"] == "fitted under its new bytes"
    assert rows["/in/lost.png"]["error"].startswith("not processed")
    assert rows["/in/stale.png"]["error"].startswith("not processed")


# ---------------------------------------------------------------------------------------------------------
# 7. a job killed mid-fit (kill -9 of its driver)


def test_a_killed_job_costs_nothing_and_leaves_nothing(ray_cluster, tmp_path):
    """The next job on the library takes the lease over at once (the dead driver's process is gone), fits the
    image even with --max-attempts 1 (an interrupted fit is no crash), and ends the local Ray processes the dead
    driver left running. (Closing its MLflow run: test_secrets_quotes_dead_runs_and_stray_files_in_real_jobs.)"""
    from pipeline.run.local_ray import MARK

    folder = small_input(tmp_path / "in", n=1)
    library = tmp_path / "lib"
    settings_ = ["--steps", "30", "--rank", "2", "--recalibrations", "1", "--preview-steps", "0"]
    driver = subprocess.Popen([sys.executable, "-m", "jobs.decompose", "--input", str(folder), "--output",
                               str(library), "--quiet", "--no-tracking", *settings_], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 240
    while not list(library.glob("attempts/*/*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(library.glob("attempts/*/*.json")), "the job never started its fit"
    driver.kill()
    driver.wait()

    def orphans() -> list[str]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if f"{MARK}={driver.pid}:".encode() in (entry / "environ").read_bytes():
                    found.append(entry.name)
            except OSError:
                pass
        return found

    time.sleep(1)
    # node agents outlive the driver (unless a job in another test process has ended them already: any next
    # job on the machine does, which is the point)
    left = orphans()
    started = time.monotonic()
    job = JobSpec(input=str(folder), output=str(library), fit={"steps": 30, "rank": 2, "recalibrations": 1},
                  failure=Failure(max_attempts=1), tracking=Tracking(enabled=False), previews=Previews(steps=0))
    report = run_job(job, progress=False)
    print(f"kill after {started - deadline + 240:.1f} s; rerun {time.monotonic() - started:.1f} s")
    assert report["ok"] == 1 and report["fits_this_run"] == 1, report["failures"]
    time.sleep(1)
    assert not orphans(), f"{len(left)} processes were left by the killed driver and are still there"


# ---------------------------------------------------------------------------------------------------------
# 1, 8, 9: whatever the files and the prompt table hold, the job never crashes and every input gets one row

IMAGES = ["a.png", "b.png", "c.jpg", "sub/d.png", "e.webp", "Weird name 'x'.png"]
OTHERS = ["f.svg", "g.heic", "notes.txt"]
CELLS = st.sampled_from(["", "", "", "1", "2", "abc", "4.7", "-3", "nan"])
# cells are written with errors="surrogateescape": "\udcff" becomes the byte 0xff, invalid UTF-8


def not_text(cell: str) -> bool:
    return "\x00" in cell or any(0xDC80 <= ord(c) <= 0xDCFF for c in cell)

CONTENTS = st.sampled_from(["sks a", "sks a", "sks b", "sks b", "", "sks \udcff a", "sks\x00a"])


@st.composite
def collections(draw):
    """Files (images, byte-identical copies, garbage, other kinds) and a prompt table with 0-2 rows per file,
    cells good, bad and not text (invalid UTF-8, a NUL byte), and rows that name no file, try to leave the
    folder or name no text at all, in any order; the library inside the input folder or beside it."""
    names = draw(st.lists(st.sampled_from(IMAGES), unique=True, min_size=1, max_size=4)) + \
        draw(st.lists(st.sampled_from(OTHERS), unique=True, max_size=2))
    kinds = {n: draw(st.sampled_from(["image", "image", "copy", "garbage"])) for n in names}
    rows = []
    for name in names:
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
            rows.append({"image": name, "content": draw(CONTENTS),
                         "style": draw(st.sampled_from(["ink", "ink", "ink", " "])), "steps": draw(CELLS)})
    stray = ["missing.png", "../../etc/passwd", ""] * 3 + ["bad\udcfe.png"]
    strays = st.fixed_dictionaries({"image": st.sampled_from(stray),
                                    "content": st.just("sks a"), "style": st.just("ink"), "steps": st.just("")})
    rows += draw(st.lists(strays, max_size=2))
    return kinds, draw(st.permutations(rows)), draw(st.booleans())


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(collections())
def test_the_job_never_crashes_and_every_input_gets_one_row(ray_cluster, monkeypatch_module, case):
    import csv

    kinds, rows, library_inside = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "in")
        for n, (name, kind) in enumerate(sorted(kinds.items())):
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {"image": png_bytes(n, 12, 12), "copy": png_bytes(0, 12, 12), "garbage": b"\x89PNG junk"}[kind]
            path.write_bytes(data)
        folder.mkdir(exist_ok=True)
        with open(folder / "prompts.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "content", "style", "steps"])
            writer.writeheader()
            writer.writerows(rows)
        library = folder / "lib" if library_inside else Path(tmp, "lib")
        if library_inside:  # a library holds images of its own (previews): never inputs
            (library / layout.ITEMS / ("0" * 24)).mkdir(parents=True)
            (library / layout.ITEMS / ("0" * 24) / PREVIEWS["style"]).write_bytes(png_bytes(99, 12, 12))
        images = sorted(str(folder / n) for n in kinds if n.endswith((".png", ".jpg", ".webp")))
        job = JobSpec(input=str(folder), output=str(library), fit={"steps": 1, "rank": 1, "recalibrations": 1},
                      tracking=Tracking(enabled=False), previews=Previews(steps=0))
        event(f"library inside the input: {library_inside}")
        event(f"a prompt cell that is not text: {any(not_text(r['content'] + r['image']) for r in rows)}")
        try:
            report = run_job(job, progress=False)
        except InputError as exc:  # the refusals allowed: no image at all; an image cell that is not text
            if any(not_text(r["image"]) for r in rows):
                assert "column image: not valid UTF-8" in str(exc) and "data row" in str(exc), exc
            else:
                assert not images and "no images found" in str(exc), exc
            return
        assert not any(not_text(r["image"]) for r in rows)
        manifest = read_manifest(job.output).to_pylist()
        event(f"rows: {sorted({r['status'] for r in manifest})}")
        assert sorted(r["source_uri"] for r in manifest) == images
        assert report["inputs"] == len(images) == report["ok"] + report["failed"] + report["skipped"]
        assert report["ignored_files"] == len(kinds) - len(images)
        assert report["library_files_skipped"] == (1 if library_inside else 0)
        named = {str(r["image"]).strip() for r in rows}
        for row in manifest:
            assert row["status"] in ("ok", "failed", "skipped")
            assert (row["status"] == "failed") == bool(row["error"]) or row["status"] == "skipped", row
            assert not any(str(row[k] or "").startswith("b'") or "\x00" in str(row[k] or "") for k in
                           ("content", "style", "prompt_combined", "prompt_content", "prompt_style")), row
            relative = row["source_uri"][len(str(folder)) + 1:]
            mine = [r for r in rows if str(r["image"]).strip() == relative]
            if len(mine) > 1:
                assert row["status"] == "failed" and "rows for" in row["error"], row
            elif mine and not_text(mine[0]["content"]):
                assert row["status"] == "failed" and "column content: " in row["error"] and (
                    "not valid UTF-8" in row["error"] or "NUL byte" in row["error"]), row
            if relative not in named:
                assert row["status"] == "failed" and "no prompt row" in row["error"], row


@pytest.fixture(scope="module")
def monkeypatch_module():
    """The property test runs fits in this process (FitWorker.process, as an actor would), not in a new
    actor pool per drawn case: the same code, without starting actors ten times."""
    from pipeline.run import job as job_module
    from pipeline.run.executors import manifest_row
    from pipeline.run.identify import plain_row
    from pipeline.run.worker import FitWorker

    def in_process(job, items, progress=True):
        worker = FitWorker(job, device="cpu")
        return {item["source_uri"]: manifest_row(worker.process(plain_row(item))) for item in items}

    saved = dict(job_module.EXECUTORS)
    job_module.EXECUTORS["actor-pool"] = in_process
    yield
    job_module.EXECUTORS.update(saved)


# ---------------------------------------------------------------------------------------------------------
# round 3, 1: a marker vouches for its fit's files, and is checked


def test_a_fit_whose_files_are_gone_is_not_ok(ray_cluster, monkeypatch_module, monkeypatch, tmp_path):
    """The library's items folder removed while a fit's files are uploaded: the item fails in one line and no
    marker claims it; fitted again, it is ok. A LoRA file deleted by hand afterwards: a plain re-run trusts the
    manifest, --recheck checks every file the marker vouches for and fits the image again."""
    import shutil

    folder = small_input(tmp_path / "in", n=1)
    library = tmp_path / "lib"
    job = JobSpec(input=str(folder), output=str(library), fit=dict(SMALL), tracking=Tracking(enabled=False),
                  previews=Previews(steps=0))
    upload = Store.upload_file

    def upload_then_lose_the_library(store, local_path, *parts):
        upload(store, local_path, *parts)
        if parts[-1] == FILES["style"]:  # the last file of a fit (sorted names)
            shutil.rmtree(library / layout.ITEMS)

    monkeypatch.setattr(Store, "upload_file", upload_then_lose_the_library)
    report = run_job(job, progress=False)
    assert report["failed"] == 1 and report["ok"] == 0, report
    row = read_manifest(job.output).to_pylist()[0]
    assert "lost the fit's files before its marker was written" in row["error"] and "is missing" in row["error"]
    assert "\n" not in row["error"] and not list(library.glob(layout.marker_key("*")))
    monkeypatch.setattr(Store, "upload_file", upload)
    assert run_job(job, progress=False)["fits_this_run"] == 1

    row = read_manifest(job.output).to_pylist()[0]
    lora = Path(json.loads(row["files"])[FILES["content"]]["uri"])
    lora.unlink()
    assert run_job(job, progress=False)["fits_this_run"] == 0  # the manifest is the index (documented)
    again = run_job(dataclasses.replace(job, recheck=True), progress=False)
    assert again["fits_this_run"] == 1 and again["ok"] == 1, again
    check_artifacts(read_manifest(job.output).to_pylist()[0], lambda uri: Path(uri).read_bytes())


# ---------------------------------------------------------------------------------------------------------
# round 3, 2 and 3: prompt cells are decoded as text; the library is never its own input


def test_prompt_cells_are_decoded_never_read_as_str_of_bytes(tmp_path):
    """pyarrow reads a CSV column holding one invalid UTF-8 cell as binary (and a Parquet column may be binary):
    every cell is decoded, the one that is not text (or holds a NUL byte) fails its own image naming the row and
    column, and an `image` cell that is not text refuses the table in one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = small_input(tmp_path / "in", n=3)
    (folder / "prompts.csv").write_bytes(b"image,content,style\nim0.png,sks a,ink\nim1.png,sks \xff b,ink\n"
                                         b"im2.png,sks\x00c,ink\n")
    items = {i["source_uri"].rsplit("/", 1)[-1]: i for i in read_inputs(str(folder)).items}
    assert items["im0.png"]["content"] == "sks a" and not items["im0.png"]["prompt_error"]
    assert "data row 2 (image im1.png): column content: not valid UTF-8 text (byte 0xff at offset 4" in \
        items["im1.png"]["prompt_error"]
    assert "data row 3 (image im2.png): column content: holds a NUL byte" in items["im2.png"]["prompt_error"]
    (folder / "prompts.csv").unlink()
    table = pa.table({"image": ["im0.png", "im1.png", "im2.png"], "content": pa.array([b"sks a", b"sks b", b"\xfe"]),
                      "style": ["ink", "ink", "ink"], "steps": pa.array([b"3", b"4", b"5"])})
    pq.write_table(table, folder / "prompts.parquet")
    items = {i["source_uri"].rsplit("/", 1)[-1]: i for i in read_inputs(str(folder)).items}
    assert (items["im1.png"]["content"], json.loads(items["im1.png"]["overrides"])) == ("sks b", {"steps": 4})
    assert "column content: not valid UTF-8" in items["im2.png"]["prompt_error"]
    pq.write_table(table.set_column(0, "image", pa.array([b"im0.png", b"im\xff.png", b"im2.png"])),
                   folder / "prompts.parquet")
    with pytest.raises(InputError, match=r"prompts.parquet, data row 2, column image: not valid UTF-8 text"):
        read_inputs(str(folder))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_library_inside_the_input_is_never_input(where, tmp_path, s3):
    """--output inside --input: the library's files (previews, plots) are skipped and counted, under any
    spelling of either (a symlink locally); --output equal to --input is refused in one line."""
    names = {"im0.png": png_bytes(1, 12, 12), "prompts.csv": b"image,content,style\nim0.png,sks a,ink\n",
             "lib/" + "/".join(layout.item("0" * 24, PREVIEWS["style"])): png_bytes(2, 12, 12), "lib/plot.png": b"x"}
    if where == "local":
        for name, data in names.items():
            (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "in" / name).write_bytes(data)
        (tmp_path / "link").symlink_to(tmp_path / "in")
        root, library, options = str(tmp_path / "in"), str(tmp_path / "link" / "lib"), {}
    else:
        prefix = f"in-{time.time_ns()}"
        for name, data in names.items():
            s3.client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{name}", Body=data)
        root, options = f"s3://{s3.bucket}/{prefix}", s3.storage_options
        library = root + "/lib/"
    inputs = read_inputs(root, storage_options=options, library=library)
    assert [i["source_uri"].rsplit("/", 1)[-1] for i in inputs.items] == ["im0.png"]
    assert inputs.library_files == 2 and inputs.ignored == []
    with pytest.raises(InputError, match="is the --input folder itself"):
        read_inputs(root, storage_options=options, library=root + "/")


# ---------------------------------------------------------------------------------------------------------
# round 3, 4: one line, not a traceback


NUMERIC_FLAGS = [("decompose", "--workers", "0"), ("decompose", "--workers", "-1"),
                 ("decompose", "--max-attempts", "0"), ("decompose", "--cpus-per-worker", "0"),
                 ("decompose", "--preview-steps", "-5"), ("decompose", "--fits-per-worker", "0"),
                 ("decompose", "--gpus-per-worker", "-1"), ("decompose", "--train-start-timeout", "0"),
                 ("decompose", "--wait-for-library", "-1"), ("decompose", "--cpus-per-worker", "nan"),
                 ("generate", "--steps", "0"), ("generate", "--num-images", "-2"), ("fit", "--threads", "0"),
                 ("registry", "--limit", "0"), ("forget", "--wait-for-library", "-3"), ("bank", "--top", "0")]


def test_every_numeric_flag_is_checked_before_anything_starts(tmp_path, capsys):
    """A bad number is one line naming its flag, exit status 2, and nothing started: no library folder, no
    lease, no MLflow store (the job checks its numbers before Ray, the lease and the parent run)."""
    from jobs.cli import main

    folder = small_input(tmp_path / "in", n=1)
    (tmp_path / "lib").mkdir()
    commands = {"decompose": ["decompose", "--input", str(folder), "--output", str(tmp_path / "out")],
                "generate": ["generate", str(tmp_path / "fit"), "--out", str(tmp_path / "x.png")],
                "fit": ["fit", str(folder / "im0.png"), "--content", "sks a", "--style", "ink", "--out",
                        str(tmp_path / "fit")],
                "registry": ["registry", "search", "ink", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
                "forget": ["forget", str(tmp_path / "lib"), str(folder)],
                "bank": ["bank", "search", str(tmp_path / "lib"), "ink"]}
    for command, flag, value in NUMERIC_FLAGS:
        assert main(commands[command] + [flag, value]) == 2, (flag, value)
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} must be ") and ", got " in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "lib"] and not list((tmp_path / "lib").iterdir())


def test_a_truncated_manifest_part_is_named_and_repaired(tmp_path, capsys):
    """A manifest part cut in half: the job refuses in one line naming the part and `unziplora repair`, which
    rebuilds it from sources/ (a row whose fit lost a file comes back failed, so the next run fits it again)."""
    from benchmarks.control_plane import build_library
    from jobs.cli import main
    from pipeline.run.job import check_job_settings, pin_base_model, plan_items
    
    inp, lib = tmp_path / "in", tmp_path / "lib"
    job = build_library(str(inp), str(lib), 6)
    rows = {r["source_uri"]: r for r in read_manifest(str(lib)).to_pylist()}
    lost = rows[str(inp / "img000002.png")]
    (lib / layout.ITEMS / lost["item_id"] / FILES["style"]).unlink()
    [part] = (lib / layout.MANIFEST).iterdir()
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    for argv in (["decompose", "--input", str(inp), "--output", str(lib), "--no-tracking", "--quiet"],
                 ["forget", str(lib), str(inp / "img000001.png")], ["bank", "build", str(lib)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"manifest part {part} cannot be read" in err and \
            f"run `unziplora repair {lib}`" in err and "Traceback" not in err, err
    assert main(["repair", str(lib), "--dry-run"]) == 0 and part.exists()
    assert main(["repair", str(lib)]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert (summary["unreadable_parts"], summary["rows_recovered"], summary["recovered_as_failed"]) == \
        ([str(part)], 6, 1) and summary["repaired"], summary
    assert not part.exists()
    repaired = {r["source_uri"]: r for r in read_manifest(str(lib)).to_pylist()}
    assert set(repaired) == set(rows) and repaired[lost["source_uri"]]["status"] == "failed"
    assert "style_lora.safetensors is missing" in repaired[lost["source_uri"]]["error"]
    assert all(r["status"] == "ok" and r["files"] == rows[u]["files"] for u, r in repaired.items() if r is not
               repaired[lost["source_uri"]])
    pinned = pin_base_model(job, check_job_settings(job.fit))
    plan = plan_items(pinned, read_inputs(str(inp)).items, Store(str(lib)), repaired)
    assert [i["source_uri"] for i in plan.to_fit] == [lost["source_uri"]] and plan.complete == 5


def test_generate_names_each_base_and_the_lora_file_that_does_not_fit(tiny_base, sample_image, tmp_path, capsys):
    """A content and a style LoRA of different base models: refused before any weights load, naming each base;
    a LoRA file whose keys name no layer of the base, or whose factors have other widths: one line naming it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from jobs.cli import main
    from unziplora import FitConfig, fit

    fit(sample_image, FitConfig(content="sks dog", style="ink", steps=3, rank=2), base=tiny_base,
        out_dir=tmp_path / "a", progress=False)
    for name in ("toy", "foreign", "wide"):
        shutil.copytree(tmp_path / "a", tmp_path / name)
    record = json.loads((tmp_path / "toy" / RECORD).read_text())
    (tmp_path / "toy" / RECORD).write_text(json.dumps(record | {"base_model": "toy",
                                                                    "base_model_fingerprint": "preset:toy"}))
    save_file({"unet.foo.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "foreign" / FILES["content"])
    tensors = load_file(tmp_path / "a" / FILES["style"])
    key = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0]  # a kohya file: lora_down is A
    save_file(tensors | {key: torch.zeros(2, tensors[key].shape[1] + 1)}, tmp_path / "wide" / FILES["style"])
    run = ["--out", str(tmp_path / "x.png"), "--steps", "1", "--device", "cpu"]
    cases = {("--content-from", "a", "--style-from", "toy"): [f"({tmp_path / 'a'}) was fitted on tiny (preset:tiny)",
                                                                f"({tmp_path / 'toy'}) on toy (preset:toy)"],
             ("--content-from", "foreign"): [f"{tmp_path / 'foreign' / 'content_lora.safetensors'}: not a LoRA of",
                                             "1 of its 1 keys name no layer of it, e.g. 'unet.foo.lora_A.weight'"],
             ("--style-from", "wide"): [f"{tmp_path / 'wide' / 'style_lora.safetensors'}: a LoRA of another base",
                                        f"{key} has the shape [2, {tensors[key].shape[1] + 1}]"]}
    for args, says in cases.items():
        argv = ["generate"] + [a if a.startswith("--") else str(tmp_path / a) for a in args] + run
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(s in err for s in says), err
    assert not (tmp_path / "x.png").exists()


def test_the_tracking_store_vanishing_mid_job_is_one_line(ray_cluster, monkeypatch_module, monkeypatch, tmp_path, capfd):
    """The library's SQLite MLflow store deleted after the job opened its parent run: every fit is ok, each
    row says in one line that the store is gone (no worker makes a new empty one), the report says so, and no
    SQLAlchemy traceback reaches the terminal."""
    import pipeline.run.job

    folder = small_input(tmp_path / "in", n=2)
    library = tmp_path / "lib"
    started = pipeline.run.job.start_job

    def start_then_delete_the_store(*args, **kwargs):
        job = started(*args, **kwargs)
        (library / "mlflow.db").unlink()
        return job

    monkeypatch.setattr(pipeline.run.job, "start_job", start_then_delete_the_store)
    report = run_job(JobSpec(input=str(folder), output=str(library), fit=dict(SMALL), previews=Previews(steps=0)),
                     progress=True)
    err = capfd.readouterr().err
    assert report["ok"] == 2 and report["tracking_errors"] == 2, report
    assert "Traceback" not in err and "[SQL:" not in err, err
    assert not (library / "mlflow.db").exists()  # no empty store made in its place
    for row in read_manifest(str(library)).to_pylist():
        assert "\n" not in row["tracking_error"] and f"the MLflow store sqlite:///{library}/mlflow.db is gone" in \
            row["tracking_error"], row["tracking_error"]
    assert "is gone" in report["tracking"]["error"] and "\n" not in report["tracking"]["error"], report["tracking"]


def test_a_full_library_disk_names_the_library_file(tmp_path, monkeypatch):
    """The library's disk fills up while a fit's files are copied into it: shutil names the local scratch file
    it was reading (sendfile's error carries the source first); the row names the library file instead."""
    from pipeline.run.worker import FitWorker

    folder = small_input(tmp_path / "in", n=1)
    job = JobSpec(input=str(folder), output=str(tmp_path / "lib"), fit=dict(SMALL), tracking=Tracking(enabled=False),
                  previews=Previews(steps=0), state=RunState(run_id="run-full"))
    worker = FitWorker(job, device="cpu")

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", full)  # what copying a file onto a full local disk meets
    row = worker.process(read_inputs(job.input).items[0])
    assert row["status"] == "failed" and "No space left on device" in row["error"], row["error"]
    assert f"could not write {tmp_path / 'lib' / 'items' / row['item_id']}/" in row["error"], row["error"]
    assert tempfile.gettempdir() + "/unziplora-item-" not in row["error"] and "\n" not in row["error"]
    assert not list((tmp_path / "lib").glob(layout.marker_key("*")))


# ---------------------------------------------------------------------------------------------------------
# round 3, 7: the job's MLflow run is closed on every exit path


def test_the_parent_run_is_closed_on_every_exit_path(ray_cluster, monkeypatch_module, monkeypatch, tmp_path, capfd):
    """An uncaught error: the job's run is FAILED (with the error); an interruption: KILLED; MLflow away at the
    job's end: the run stays RUNNING, the job says so, and the next job (here one with nothing to fit) closes it
    FINISHED with the stored report's metrics."""
    from mlflow import MlflowClient

    import pipeline.registry.tracking
    from pipeline.run import job as job_module

    folder = small_input(tmp_path / "in", n=1)
    job = JobSpec(input=str(folder), output=str(tmp_path / "lib"), fit=dict(SMALL), previews=Previews(steps=0))
    client = MlflowClient(f"sqlite:///{tmp_path}/lib/mlflow.db")

    def job_runs() -> list:
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, "tags.`unziplora.kind` = 'job'", order_by=["attributes.start_time"])

    in_process = job_module.EXECUTORS["actor-pool"]
    for exc, status in ((RuntimeError("a bug in the executor"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        def failing(job, items, progress=True, exc=exc):
            raise exc

        monkeypatch.setitem(job_module.EXECUTORS, "actor-pool", failing)
        with pytest.raises(type(exc)):
            run_job(job, progress=False)
        run = job_runs()[-1]
        assert run.info.status == status and type(exc).__name__ in run.data.tags["unziplora.error"], run
    assert [r.info.status for r in job_runs()] == ["FAILED", "KILLED"]

    monkeypatch.setitem(job_module.EXECUTORS, "actor-pool", in_process)
    monkeypatch.setattr(pipeline.registry.tracking, "SETUP_ATTEMPTS", 1)
    end_job = pipeline.registry.tracking.Tracker.end_job

    def away(*args, **kwargs):
        raise ConnectionError("the tracking server is away")

    monkeypatch.setattr(pipeline.registry.tracking.Tracker, "end_job", away)
    ended = run_job(job, progress=True)
    assert ended["ok"] == 1 and not ended["tracking"]["closed"] and "is away" in ended["tracking"]["error"]
    assert "the job's MLflow run could not be closed (ConnectionError: the tracking server is away)" in \
        capfd.readouterr().err
    assert client.get_run(ended["tracking"]["parent_run_id"]).info.status == "RUNNING"
    monkeypatch.setattr(pipeline.registry.tracking.Tracker, "end_job", end_job)  # the server is back
    noop = run_job(job, progress=False)
    assert noop["fits_this_run"] == 0 and noop["tracking"]["parent_run_id"] is None
    run = client.get_run(ended["tracking"]["parent_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["ok"] == 1 and run.data.metrics["exit_code"] == 0
    assert len(job_runs()) == 3
