"""The documented `ray job submit` example (docs/collection.md, the bash block under
`<!-- tested: tests/test_submit_doc.py -->`), run as written: its text is read from the page and run by bash,
line for line. What differs is only the world around it:
- a fresh HOME (no ~/.ray/auth_token from earlier runs: the block must set auth up itself) and RAY_TMPDIR;
- its own user, network and PID namespaces (`unshare -rn --pid`): the block's default ports (6379, 8265,
  52365, 10001) are free there whatever else runs on this machine (other tests' Rays), and its `ray stop`,
  which stops every Ray process it can see, sees only this block's;
- the repository root it runs in is a copy of the code (jobs, pipeline, unziplora, toyworld) with `.venv`
  linked to this virtual environment, a git repository of its own (for the block's `git describe`), and an
  `examples/sample_set` of 2 of the sample images whose prompt table asks for 20-step fits (a prompt-table
  column the job documents), so that the test costs about a minute rather than the sample job's 4-5.
The job's outputs are checked, not only the exit status: every row ok, sources recorded at their real paths
(not Ray's temporary copy of the working dir), the code version the block's `git describe` named.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.store.manifest import read_manifest

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "collection.md"
MARKER = "<!-- tested: tests/test_submit_doc.py -->"
pytestmark = pytest.mark.timeout(600)


def documented_block() -> str:
    """The fenced bash block right under the marker, as the page shows it."""
    text = PAGE.read_text()
    assert text.count(MARKER) == 1, f"{PAGE} must mark exactly one block with {MARKER}"
    found = re.match(r"\s*```bash\n(.*?)\n```", text[text.index(MARKER) + len(MARKER):], re.S)
    assert found, f"no ```bash block right under {MARKER} in {PAGE}"
    return found.group(1) + "\n"


def _namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "-rn", "--pid", "--fork", "--mount-proc", "sh", "-c", "ip link set lo up"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_the_documented_block_gives_every_local_path_absolute():
    """What a newcomer copies: the venv's Ray and Python, the auth mode, absolute input and output."""
    block = documented_block()
    assert block.startswith("source .venv/bin/activate")
    assert "export RAY_AUTH_MODE=token" in block and "ray get-auth-token --generate" in block
    assert '--input "$PWD/' in block and '--output "$PWD/' in block
    assert block.rstrip().splitlines()[-1].startswith("ray stop")


def test_a_relative_path_is_refused_under_ray_job_submit(monkeypatch, capsys):
    """Under `ray job submit --working-dir` the driver runs in Ray's copy of the working dir: a relative
    --input/--output/--prompts is refused in one line (exit 2) before anything starts; absolute paths and URLs
    pass, and outside a submitted job (no working dir) a relative path means what it always did."""
    from jobs import decompose

    def args(**paths) -> argparse.Namespace:
        return argparse.Namespace(**({"input": "/abs/in", "output": "s3://b/lib", "prompts": None} | paths))

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    decompose.check_paths_under_ray_job(args(input="examples/sample_set"))  # not a submitted job
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {}}))
    decompose.check_paths_under_ray_job(args(input="examples/sample_set"))  # submitted without a working dir
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}))
    decompose.check_paths_under_ray_job(args())
    decompose.check_paths_under_ray_job(args(input="file:///abs/in", prompts="/abs/p.csv"))
    for flag in ("input", "output", "prompts"):
        code = decompose.main([
            "--input", "in" if flag == "input" else "/abs/in", "--output", "lib" if flag == "output" else "/abs/lib",
            *(["--prompts", "p.csv"] if flag == "prompts" else [])])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"--{flag} " in err and "relative path" in err and "$PWD/" in err and os.getcwd() in err, err
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(not _namespaces_work(), reason="needs unprivileged user namespaces (`unshare -rn --pid`) "
                    "and `ip`: the block's `ray stop` would stop every Ray on this machine, its ports may be taken")
def test_the_documented_ray_job_submit_runs_as_written(tmp_path):
    block = documented_block()
    root, home = tmp_path / "checkout", tmp_path / "home"
    home.mkdir()
    for name in ("jobs", "pipeline", "unziplora", "toyworld"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    (root / ".venv").symlink_to(sys.prefix)
    images = root / "examples" / "sample_set"
    images.mkdir(parents=True)
    names = ("striped_star.png", "dotted_circle.png")
    for name in names:
        shutil.copy(REPO / "examples" / "sample_set" / name, images / name)
    (images / "prompts.csv").write_text("image,content,style,steps\nstriped_star.png,sks star,striped,20\n"
                                        "dotted_circle.png,sks circle,dotted,20\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "the code the block submits"]):
        subprocess.run(git + command, cwd=root, check=True, capture_output=True)
    version = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, check=True, capture_output=True,
                             text=True).stdout.strip()
    (tmp_path / "block.sh").write_text(block)

    # short: Ray puts unix sockets under it (108-byte limit)
    ray_tmp = tempfile.mkdtemp(prefix="urs-", dir="/tmp")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "PYTHON", "VIRTUAL_ENV", "AWS_", "MLFLOW_"))}
    env |= {"HOME": str(home), "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    try:
        result = subprocess.run(
            ["unshare", "-rn", "--pid", "--fork", "--mount-proc", "bash", "-c",
             f"ip link set lo up && exec bash -e {tmp_path / 'block.sh'}"],
            cwd=root, env=env, capture_output=True, text=True, timeout=540)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert re.search(r"Job '\S+' succeeded", out), out[-6000:]
    assert "Stopped all" in out, out[-3000:]  # the block's `ray stop` found its head's processes
    assert (home / ".ray" / "auth_token").stat().st_size > 0  # the block made the token it then used

    library = root / "out" / "library-ray"
    reports = sorted((library / "reports").glob("*.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    assert (report["ok"], report["failed"], report["exit_code"]) == (2, 0, 0), report
    assert report["output"] == str(library)
    rows = read_manifest(str(library)).to_pylist()
    assert sorted(Path(r["source_uri"]).name for r in rows) == sorted(names)
    for row in rows:
        assert row["status"] == "ok", row
        assert Path(row["source_uri"]).parent == images, row["source_uri"]  # not Ray's copy of the working dir
        assert row["code_version"] == version, row
        assert row["steps"] == 20, row
        item = library / "items" / row["item_id"]
        assert (item / "_SUCCESS").is_file() and (item / "content_lora.safetensors").is_file(), sorted(item.iterdir())
