"""The `unziplora` command answers `--help` and bad arguments before any heavy import (torch, diffusers, Ray,
MLflow: seconds each), so a newcomer's first commands answer at once. Checked by what a fresh interpreter
has imported, never by timing; benchmarks/cli_startup.py prints the times beside `ray --help`."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "ray", "mlflow", "pyarrow", "matplotlib", "numpy", "pandas")

# Runs `unziplora ARGS` for each ARGS in a fresh interpreter; prints each one's exit status, stderr, and the
# heavy modules imported by then (sys.modules only grows, so a late entry names the command that imported it).
PROBE = """
import argparse, contextlib, io, json, sys
from jobs.cli import build_parser, main
heavy = {heavy!r}
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(heavy))
    out.append(dict(argv=argv, code=code, err=err.getvalue(), heavy=loaded))
if sys.argv[2:] == ["--commands"]:  # every command path of the parser, for the test to run --help on
    def paths(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield prefix + [name]
                    yield from paths(sub, prefix + [name])
    out = list(paths(build_parser(), []))
print(json.dumps(out))
"""


def probe(argvs, *extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(argvs), *extra],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


COMMANDS = [tuple(c) for c in probe([], "--commands")]


def test_every_command_is_listed():
    assert {("fit",), ("generate",), ("decompose",), ("registry", "search"), ("bank", "gallery"), ("forget",),
            ("repair",), ("rescore",), ("export",)} <= set(COMMANDS)


def test_help_of_the_command_and_every_subcommand_imports_nothing_heavy():
    results = probe([["--help"]] + [[*c, "--help"] for c in COMMANDS])
    for r in results:
        assert r["code"] == 0 and not r["heavy"], r


@pytest.mark.parametrize("argv, says", [
    (["registry", "search", "watercolor"], "error: give --tracking-uri (or set MLFLOW_TRACKING_URI)"),
    (["registry", "get", "lib-style@x", "--dest", "d"], "error: give --tracking-uri"),
    (["registry", "sync", "lib", "--wait-for-library", "-1"], "error: --wait-for-library must be"),
    (["fit", "x.png", "--out", "o", "--threads", "0"], "error: --threads must be an integer >= 1"),
    (["fit", "x.png", "--out", "o", "--content", "sks dog", "--style", "ink", "--steps", "0"], "steps must be"),
    (["fit", "x.png", "--out", "o"], "give --content and --style"),
    (["fit", "x.png", "--out", "o", "--content", "sks dog", "--style", "ink", "--formats", "ckpt"],
     "LoRA formats must be one or more of"),
    (["generate", "--out", "x.png"], "give FIT_DIR"),
    (["generate", "fit", "--out", "x.png", "--steps", "0"], "error: --steps must be"),
    (["generate", "--content-from", "fit", "--out", "x.png", "--content-blocks", "own"], "--content-blocks own"),
    (["decompose", "--input", "in", "--output", "lib", "--workers", "0"], "error: --workers must be"),
    (["decompose", "--input", "in", "--output", "lib", "--rank", "0"], "rank must be"),
    (["bank", "search", "lib", "x", "--top", "0"], "error: --top must be"),
    (["forget", "lib"], "error: name the sources to forget"),
    (["repair", "lib", "--wait-for-library", "-1"], "error: --wait-for-library must be"),
    (["decompose", "--input", "in"], "the following arguments are required: --output"),
    (["ui", "no-such-library"], "error: no MLflow store at"),
    (["ui", "lib", "--port", "0"], "error: --port must be"),
])
def test_bad_arguments_are_refused_before_any_heavy_import(argv, says):
    [r] = probe([argv])
    assert r["code"] not in (0, None) and says in r["err"] and not r["heavy"], r


def commands_with(flag: str) -> list[list[str]]:
    """Every command path of `unziplora` that takes `flag`."""
    from jobs.cli import build_parser

    def walk(parser, prefix):
        for action in parser._actions:
            if flag in action.option_strings:
                yield prefix
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, prefix + [name])
    return list(walk(build_parser(), []))


def test_storage_options_that_are_not_a_json_object_are_refused_alike_without_echoing_them():
    commands = commands_with("--storage-options")
    assert len(commands) >= 8 and ["decompose"] in commands and ["generate"] in commands, commands
    bad = {'{"key": "SECRET-1"': "not valid JSON", '["SECRET-2"]': "a JSON object is expected"}
    results = probe([[*c, "--storage-options", text] for c in commands for text in bad])
    for r, says in zip(results, [s for _ in commands for s in bad.values()]):
        assert r["code"] == 2 and f"--storage-options: {says}" in r["err"] and "SECRET" not in r["err"], r
        assert not r["heavy"], r
