"""Writes to the library: on S3 each file is written once, straight to its final key (no temporary key, no
server-side copy), and an upload killed mid-way leaves no partial object under that key; on local disk a
temporary name and a rename, and a killed write leaves no partial file under the final name."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.store import layout
from pipeline_fixtures import local_s3
from unziplora.fit_files import FILES

ROOT = Path(__file__).resolve().parent.parent

# A child process that uploads a 12 MiB file through Store.upload_file in 5 MiB parts (a multipart upload, as
# every SDXL LoRA file is) and kills itself with SIGKILL as the second part starts: no cleanup code runs.
KILLED_UPLOAD = """
import os, signal, sys
import s3fs.core
from pipeline.store import layout
from pipeline.store.storage import Store
from unziplora.fit_files import FILES

s3fs.core.calculate_chunksize = lambda size, chunksize=None, **kw: 5 * 2**20
call = s3fs.core.S3FileSystem._call_s3

async def dies_at_part_2(self, method, *args, **kwargs):
    if method == "upload_part" and kwargs.get("PartNumber") == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return await call(self, method, *args, **kwargs)

s3fs.core.S3FileSystem._call_s3 = dies_at_part_2
root, local = sys.argv[1], sys.argv[2]
Store(root, {"endpoint_url": os.environ["ENDPOINT"]} if root.startswith("s3://") else {}).upload_file(
    local, *layout.item("abc", FILES["content"]))
"""


def _run_killed_upload(root: str, local: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLED_UPLOAD, root, str(local)], capture_output=True, text=True,
                          env=os.environ | env | {"PYTHONPATH": str(ROOT)}, timeout=120)


@pytest.mark.parametrize("earlier", [None, b"the fit's earlier file"])
def test_an_upload_killed_mid_way_leaves_no_partial_object_on_s3(tmp_path, earlier):
    """The process dies (SIGKILL) between the parts of its multipart upload: the final key holds nothing, or the
    earlier complete object it was replacing; no temporary key anywhere; the upload is left incomplete (S3 keeps
    such parts out of sight; a lifecycle rule aborts them)."""
    data = os.urandom(12 * 2**20)
    (tmp_path / "lora").write_bytes(data)
    with local_s3() as s3:
        library = f"lib-{tmp_path.name}"  # moto's state is per process: each case its own library
        key = f"{library}/" + "/".join(layout.item("abc", FILES["content"]))
        if earlier is not None:
            s3.client.put_object(Bucket=s3.bucket, Key=key, Body=earlier)
        done = _run_killed_upload(f"s3://{s3.bucket}/{library}", tmp_path / "lora", {"ENDPOINT": s3.endpoint})
        assert done.returncode == -9, done.stderr
        objects = s3.objects(f"{library}/")
        if earlier is None:
            assert objects == {}  # nothing under the final key, and no temporary key beside it
        else:
            assert list(objects) == [key] and s3.get(f"s3://{s3.bucket}/{key}") == earlier
        uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=library).get("Uploads", [])
        assert [u["Key"] for u in uploads] == [key]  # it was killed mid-way: an upload begun, never completed
        parts = s3.client.list_parts(Bucket=s3.bucket, Key=key, UploadId=uploads[0]["UploadId"]).get("Parts", [])
        assert len(parts) <= 1


def test_a_write_killed_mid_way_leaves_no_partial_file_on_local_disk(tmp_path):
    """Local disk keeps the temporary name and the rename: killed mid-copy, the final name does not exist."""
    data = os.urandom(12 * 2**20)
    (tmp_path / "lora").write_bytes(data)
    kill_mid_copy = KILLED_UPLOAD.replace("s3fs.core.S3FileSystem._call_s3 = dies_at_part_2", """
import shutil
def half_then_die(src, dst, *a, **k):
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(5 * 2**20))
        g.flush()
        os.kill(os.getpid(), signal.SIGKILL)
shutil.copyfile = half_then_die
""")
    done = subprocess.run([sys.executable, "-c", kill_mid_copy, str(tmp_path / "lib"), str(tmp_path / "lora")],
                          capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == -9, done.stderr
    folder = tmp_path / "lib" / layout.ITEMS / "abc"
    left = [p.name for p in folder.iterdir()]
    assert FILES["content"] not in left
    assert len(left) == 1 and left[0].startswith(".content_lora.safetensors.tmp-")  # the half-written temporary


def test_one_fit_export_on_s3_writes_each_file_once():
    """benchmarks/s3_writes.py at 1/1000 of SDXL's sizes: the export of one fit makes no server-side copy, no
    delete, no temporary key; its requests fall by more than a third, its bytes by about half."""
    spec = importlib.util.spec_from_file_location("s3_writes", ROOT / "benchmarks" / "s3_writes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(1e-3)
    before, after = result["before"], result["after"]
    assert before["copies"] > 0 and before["bytes_copied"] > 0  # the old path, measured by the same counter
    assert after["copies"] == 0 and after["bytes_copied"] == 0
    assert set(after["by_operation"]) <= {"PutObject", "CreateMultipartUpload", "UploadPart",
                                          "CompleteMultipartUpload", "ListObjectsV2"}, after
    assert after["by_operation"]["PutObject"] == len(bench.fit_files(("kohya",), 1e-3)) + 1  # the files + marker
    assert result["requests_ratio"] <= 2 / 3 and result["bytes_sent_ratio"] < 0.55, result
