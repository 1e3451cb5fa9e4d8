"""Benchmark results as committed files, the one source of the figures the pages quote and draw.

A result file is docs/results/NAME.json (or a path in the repository, e.g. benchmarks/sdxl_budget.json):

    {"benchmark": "benchmarks/multifit.py", "command": "...", "measured": "2026-12-01",
     "machine": "...", "provenance": "...", "results": <what the benchmark's --json writes>}

A benchmark's `--json PATH` writes one (`save`): the command as run, the date, this machine, "written by the
benchmark". Results measured before these files existed were transcribed from the run's printed output as the
pages and git history recorded it; their `provenance` says so and names the commit.

A page ties a number to its file with a marker right after it (rendered as nothing):

    K=4 gives 2.19<!-- multifit.json: tiny.speedup.4 -->x the fits per hour

KEY is a dotted path into `results`; a list step is `[field=value,...]` (the one element whose fields have
those values, values read as JSON, else as text: `[resolution=1024,checkpointing=true]`, `[store=local]`) or an
index; a key with dots in it is quoted: `now["masks.safetensors"]`; `*F` or `/F` at the
end scales the value (ms from s: `*1000`). `tests/test_doc_results.py` checks every marker of README.md and
docs/*.md: the page's number must be the file's value rounded to as many decimals as the page writes.
Figures drawn from these files: `python -m benchmarks.figures` (benchmarks/figures.py).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
FIELDS = ("benchmark", "command", "measured", "machine", "provenance", "results")
# a number of a page and the marker after it (an optional closing ** between them)
# a sign belongs to the number after a space or "(" ("+6 (+0 to +11)", "-7"), never in a range ("39-74")
MARKER = re.compile(r"(?<![\d.,])((?:(?<![^\s(])[+-])?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?))(\**)"
                    r"<!-- ([\w./-]+\.json): ([^<>]+?) -->")


def machine() -> str:
    """This machine in one line: what a reader needs to weigh the figures."""
    try:
        load = "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "load unknown"
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, {load} at the start"


def save(path: str | os.PathLike, results, **fields) -> None:
    """Write a benchmark's `results` with the command that made them, the date and the machine."""
    script = Path(sys.argv[0]).resolve()
    name = f"benchmarks/{script.name}" if script.parent == REPO / "benchmarks" else sys.argv[0]
    record = {"benchmark": name, "command": " ".join(shlex.quote(a) for a in ["python", name, *sys.argv[1:]]),
              "measured": datetime.date.today().isoformat(), "machine": machine(),
              "provenance": "written by the benchmark"} | fields | {"results": results}
    Path(path).write_text(json.dumps(record, indent=1) + "\n")


def path_of(name: str) -> Path:
    """A marker's file: NAME.json under docs/results/, or a repository path (one with a slash)."""
    return REPO / name if "/" in name else RESULTS / name


def load(name: str):
    """The results of a file (`results` of a record; a file without the record, e.g. sdxl_budget.json's
    list of rows, is its own results)."""
    data = json.loads(path_of(name).read_text())
    return data["results"] if isinstance(data, dict) and "results" in data else data


def lookup(results, key: str):
    """The value at KEY (module docstring) in `results`."""
    scale = re.search(r"([*/])([\d.]+)$", key)
    if scale:
        key = key[:scale.start()]
    value = results
    for step in re.findall(r"\[[^\]]*\]|[^.\[\]]+", key):
        if step.startswith("["):
            inner = step[1:-1]
            if inner.startswith('"'):  # a key with dots in it: ["content_lora.safetensors"]
                value = value[json.loads(inner)]
                continue
            if inner.lstrip("-").isdigit():
                value = value[int(inner)]
                continue
            wanted = {}
            for pair in inner.split(","):
                field, _, text = pair.partition("=")
                try:
                    wanted[field] = json.loads(text)
                except ValueError:
                    wanted[field] = text
            found = [v for v in value if isinstance(v, dict) and all(v.get(f) == w for f, w in wanted.items())]
            if len(found) != 1:
                raise KeyError(f"{step} selects {len(found)} elements, not one")
            value = found[0]
        elif isinstance(value, list):
            value = value[int(step)]
        else:
            value = value[step]
    if scale:
        factor = float(scale.group(2))
        value = value * factor if scale.group(1) == "*" else value / factor
    return value


def markers(text: str):
    """(number as written, file, key, line number) of every marker in a page's text."""
    for found in MARKER.finditer(text):
        yield found.group(1), found.group(3), found.group(4), text.count("\n", 0, found.start()) + 1


def agrees(written: str, value) -> bool:
    """The page's number is the value rounded to the decimals the page writes (1,473 is 1473)."""
    number = written.replace(",", "")
    decimals = len(number.split(".")[1]) if "." in number else 0
    # a value exactly halfway rounds either way (2.185 may be written 2.18 or 2.19)
    return abs(float(value) - float(number)) <= 0.5 * 10 ** -decimals + 1e-9
