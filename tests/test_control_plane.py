"""The job around the fits: a re-run costs in proportion to what is new (issue 15, section 2).

No Ray and no fits here: a synthetic complete library, laid out exactly as the job lays one out, with the job's
own item ids (benchmarks/control_plane.py builds it), is re-run and planned.
"""

from __future__ import annotations

import os

import pytest

import pipeline.run.identify
import pipeline.run.job
import pipeline.store.manifest
from benchmarks.control_plane import FIT, SYNTHETIC_FILE_BYTES, build_library, image_bytes
from pipeline.store import layout
from pipeline.run.job import plan_items, run_job
from pipeline.store.manifest import read_manifest, write_manifest
from pipeline.run.source import read_inputs
from pipeline.run.spec import JobSpec, Tracking
from pipeline.store.storage import Store
from unziplora.fit_files import FILES


def _pinned(job: JobSpec) -> JobSpec:
    return pipeline.run.job.pin_base_model(job, pipeline.run.job.check_job_settings(job.fit))


def _parts(library) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (library / layout.MANIFEST).iterdir()}


@pytest.fixture
def reads(monkeypatch):
    """The URLs of every image the job reads and every small file it reads in bulk (markers, rows)."""
    seen = {"images": [], "files": []}
    open_url, cat_many = pipeline.run.identify.open_url, Store.cat_many

    def counting_open(url, options=None):
        seen["images"].append(url)
        return open_url(url, options)

    def counting_cat(store, paths):
        seen["files"] += paths
        return cat_many(store, paths)

    monkeypatch.setattr(pipeline.run.identify, "open_url", counting_open)
    monkeypatch.setattr(Store, "cat_many", counting_cat)
    return seen


def test_a_complete_library_reruns_reading_nothing_per_item(tmp_path, reads, monkeypatch):
    """No image read, no marker or source row read or written, no manifest part rewritten, no Ray started."""
    build_library(str(tmp_path / "in"), str(tmp_path / "lib"), 40)
    parts, sources = _parts(tmp_path / "lib"), sorted((tmp_path / "lib" / layout.SOURCES).iterdir())
    times = [p.stat().st_mtime_ns for p in sources]

    def no_ray(*_):
        raise AssertionError("a re-run with nothing to do started Ray")

    monkeypatch.setattr(pipeline.run.job, "_init_ray", no_ray)
    report = run_job(JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "lib"), fit=dict(FIT),
                             tracking=Tracking(enabled=False)), progress=False)
    assert (report["ok"], report["fits_this_run"], report["library_rows"]) == (40, 0, 40), report
    assert reads["images"] == [] and reads["files"] == [], reads
    assert _parts(tmp_path / "lib") == parts
    assert [p.stat().st_mtime_ns for p in sources] == times


def test_only_new_and_changed_images_are_read(tmp_path, reads, monkeypatch):
    """A changed image (new size/time) and a new one are read and planned; the rest stand on the manifest,
    even an item whose marker went missing behind the library's back, or whose LoRA file was deleted or
    truncated - until --recheck reads everything and checks every file a marker vouches for."""
    inp, lib = tmp_path / "in", tmp_path / "lib"
    build_library(str(inp), str(lib), 12)
    (inp / "img000003.png").write_bytes(image_bytes(1003))  # changed bytes
    (inp / "new.png").write_bytes(image_bytes(2000))
    with open(inp / "prompts.csv", "a") as f:
        f.write("new.png,sks new,new style\n")
    rows = {r["source_uri"]: r for r in read_manifest(str(lib)).to_pylist()}
    (lib / layout.ITEMS / rows[str(inp / "img000007.png")]["item_id"] / layout.MARKER).unlink()
    deleted, truncated = (lib / layout.ITEMS / rows[str(inp / f"img00000{n}.png")]["item_id"] for n in (5, 6))
    (deleted / FILES["content"]).unlink()
    with open(truncated / FILES["style"], "r+b") as f:
        f.truncate(10)

    def plan(**options):
        job = _pinned(JobSpec(input=str(inp), output=str(lib), fit=dict(FIT), **options,
                              tracking=Tracking(enabled=False)))
        items = read_inputs(job.input).items
        reads["images"].clear()
        return plan_items(job, items, Store(str(lib)), {r["source_uri"]: r for r in read_manifest(str(lib)).to_pylist()})

    planned = plan()
    changed = [str(inp / "img000003.png"), str(inp / "new.png")]
    assert sorted(i["source_uri"] for i in planned.to_fit) == changed
    assert sorted(reads["images"]) == changed
    assert planned.complete == 11 and len(planned.unchanged) == 11
    assert not any(f.endswith(layout.marker_key(rows[str(inp / "img000000.png")]["item_id"])) for f in reads["files"])

    monkeypatch.setattr(pipeline.run.job, "INLINE_IDENTIFY", 100)  # no Ray Data pass in this test
    rechecked = plan(recheck=True)
    assert sorted(i["source_uri"] for i in rechecked.to_fit) == sorted(changed + [str(inp / f"img00000{n}.png")
                                                                                 for n in (5, 6, 7)])
    assert len(reads["images"]) == 13 and rechecked.complete == 8 and not rechecked.unchanged
    assert sorted(rechecked.refit) == sorted([deleted.name, truncated.name])
    assert "content_lora.safetensors is missing" in rechecked.refit[deleted.name]
    assert f"has 10 bytes, not the {SYNTHETIC_FILE_BYTES} its marker vouches for" in rechecked.refit[truncated.name]
    # a marker that no longer holds is removed: no later run, with or without --recheck, trusts it
    assert not (deleted / layout.MARKER).exists() and not (truncated / layout.MARKER).exists()
    assert (lib / layout.ITEMS / rows[str(inp / "img000004.png")]["item_id"] / layout.MARKER).exists()


def test_an_image_rewritten_in_place_is_read_again(tmp_path, reads):
    """Same name, same size, new bytes: the listing stamp (mtime here, ETag on S3) changes, so the image is
    hashed again and fitted as the new item it is."""
    inp, lib = tmp_path / "in", tmp_path / "lib"
    build_library(str(inp), str(lib), 3)
    path = inp / "img000001.png"
    old = path.read_bytes()
    new = old[:40] + bytes([old[40] ^ 1]) + old[41:]  # identify hashes bytes: any bytes do
    stat = path.stat()
    path.write_bytes(new)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))  # a 1 us newer time is enough
    job = _pinned(JobSpec(input=str(inp), output=str(lib), fit=dict(FIT), tracking=Tracking(enabled=False)))
    index = {r["source_uri"]: r for r in read_manifest(str(lib)).to_pylist()}
    planned = plan_items(job, read_inputs(str(inp)).items, Store(str(lib)), index)
    assert [i["source_uri"] for i in planned.to_fit] == [str(path)] and reads["images"] == [str(path)]


def test_the_manifest_rewrites_only_the_buckets_that_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.store.manifest, "ROWS_PER_PART", 10)
    store = Store(str(tmp_path))
    rows = [{"source_uri": f"/x/{i:03d}.png", "status": "failed", "error": "e", "attempts": 0} for i in range(35)]
    first = write_manifest(store, rows, "r1")
    assert len(first) == 4 and read_manifest(str(tmp_path)).num_rows == 35
    before = _parts(tmp_path)

    assert write_manifest(store, rows, "r2") == first and _parts(tmp_path) == before  # nothing changed

    rows[17] = rows[17] | {"error": "changed"}
    second = write_manifest(store, rows, "r3")
    after = _parts(tmp_path)
    assert len(after) == 4 and len(set(after) - set(before)) == 1 and len(set(before) - set(after)) == 1
    assert sorted(set(after) - set(before))[0].endswith("-r3.parquet") and sorted(second) == sorted(
        store.url(layout.MANIFEST, n) for n in after)
    table = read_manifest(str(tmp_path)).to_pylist()
    assert len(table) == 35 and {r["source_uri"]: r["error"] for r in table}["/x/017.png"] == "changed"

    grown = rows + [{"source_uri": f"/y/{i}.png", "status": "failed", "error": "e", "attempts": 0} for i in range(10)]
    assert len(write_manifest(store, grown, "r4")) == 8  # more buckets: one new layout, no old part left
    assert all("-r4." in name for name in _parts(tmp_path)) and read_manifest(str(tmp_path)).num_rows == 45
    write_manifest(store, rows[:3], "r5")
    assert list(_parts(tmp_path)) == ["part-00000of00001-r5.parquet"]
    assert sorted(r["source_uri"] for r in read_manifest(str(tmp_path)).to_pylist()) == [r["source_uri"] for r in rows[:3]]


def test_a_manifest_from_before_buckets_is_replaced_whole(tmp_path):
    store = Store(str(tmp_path))
    rows = [{"source_uri": f"/x/{i}.png", "status": "failed", "error": "e", "attempts": 0} for i in range(3)]
    write_manifest(store, rows, "r1")
    old = tmp_path / layout.MANIFEST / "part-20260101T000000-abcdef-00000.parquet"
    (tmp_path / layout.MANIFEST / "part-00000of00001-r1.parquet").rename(old)
    write_manifest(store, rows, "r2")
    assert list(_parts(tmp_path)) == ["part-00000of00001-r2.parquet"]
    assert read_manifest(str(tmp_path)).to_pylist() == read_manifest(str(tmp_path)).to_pylist()[:3]


def test_a_librarys_layout_is_the_documented_one():
    """pipeline/store/layout.py spells each name of a library's layout once; this pins them (libraries on disk and
    in buckets, repair and the docs know them by these names)."""
    assert layout.marker_key("ab12") == "items/ab12/_SUCCESS"
    assert layout.item("ab12", "fit.json") == ("items", "ab12", "fit.json")
    assert (layout.SOURCES, layout.ATTEMPTS, layout.CRASHED, layout.LEASE, layout.MANIFEST, layout.REPORTS) == \
        ("sources", "attempts", ".crashed", "lease", "manifest", "reports")
