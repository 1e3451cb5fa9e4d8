"""`unziplora ui LIBRARY`: `mlflow ui` on the library's own store, and the page that shows its runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from jobs.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tracked_library(folder: Path) -> str:
    """A library folder with what a tracked job leaves for the UI: an MLflow SQLite store holding the library's
    experiment, and registry.json naming it."""
    from mlflow import MlflowClient

    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    experiment_id = MlflowClient(tracking_uri=uri).create_experiment("lib")
    (folder / "registry.json").write_text(json.dumps({
        "format": "unziplora-registry/1", "tracking_uri": uri, "library": "lib", "experiment": "lib",
        "experiment_id": experiment_id, "models": {"content": "lib-content", "style": "lib-style"}}))
    return experiment_id


def test_ui_print_names_the_store_and_the_runs_page(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment_id = tracked_library(tmp_path / "lib")
    assert main(["ui", str(tmp_path / "lib"), "--print", "--port", "5077"]) == 0
    out = capsys.readouterr().out
    command, page = out.splitlines()[:2]
    assert command.endswith(f"ui --backend-store-uri sqlite:///{tmp_path / 'lib' / 'mlflow.db'} --host 127.0.0.1 "
                            "--port 5077 --workers 1")
    assert Path(command.split()[0]).name in ("mlflow", Path(sys.executable).name)
    assert page == f"open http://127.0.0.1:5077/#/experiments/{experiment_id}?workflowType=machine_learning"
    assert "experiment 'lib'" in out and "lib-content and lib-style" in out and "'Model training'" in out

    # moved: registry.json names the old place; the library's own store is used
    (tmp_path / "lib").rename(tmp_path / "moved")
    assert main(["ui", str(tmp_path / "moved"), "--print"]) == 0
    assert f"--backend-store-uri sqlite:///{tmp_path / 'moved' / 'mlflow.db'} " in capsys.readouterr().out

    # a server: nothing to start, its page (the recorded experiment id is another store's, so not used)
    assert main(["ui", str(tmp_path / "moved"), "--tracking-uri", "http://mlflow:5000"]) == 0
    out = capsys.readouterr().out
    assert "on the MLflow server http://mlflow:5000: nothing to start" in out
    assert "open http://mlflow:5000/#/experiments?workflowType=machine_learning" in out


def test_ui_without_a_store_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "lib").mkdir()
    assert main(["ui", str(tmp_path / "lib")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: no MLflow store at {tmp_path / 'lib' / 'mlflow.db'}: the library was made with " \
                  "--no-tracking, or tracked elsewhere (give --tracking-uri)\n"
    assert main(["ui", str(tmp_path / "lib"), "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --port must be an integer >= 1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_ui_starts_mlflow_on_the_librarys_store(tmp_path):
    """The real thing: `unziplora ui` becomes `mlflow ui` (exec), which serves the library's experiment."""
    tracked_library(tmp_path / "lib")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "jobs.cli", "ui", str(tmp_path / "lib"), "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline, found = time.monotonic() + 240, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search",
                                                 data=b'{"max_results": 10}',
                                                 headers={"Content-Type": "application/json"})
                found = json.loads(urllib.request.urlopen(request, timeout=30).read())
                break
            except OSError:
                time.sleep(1)
        assert found is not None, server.stdout.read1().decode() if server.poll() is not None else "no answer"
        assert "lib" in {e["name"] for e in found["experiments"]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: a session of their own
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
