"""benchmarks/bank_search.py end to end at small sizes: every backend asked for is measured in its own process,
exact search finds the exact top-10, and the plot and the result file it promises are written."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bank_search.py"


def test_bank_search_benchmark_measures_and_plots(tmp_path):
    png, out = tmp_path / "latency.png", tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "200", "2000", "--backends", "bank", "numpy-f32",
                           "--plot", str(png), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())  # a result file (benchmarks/results.py): what ran, when, where
    assert record["benchmark"] == "benchmarks/bank_search.py" and "--sizes 200 2000" in record["command"], record
    results = record["results"]
    assert sorted((r["backend"], r["n"]) for r in results) == [("bank", 200), ("bank", 2000),
                                                                 ("numpy-f32", 200), ("numpy-f32", 2000)], proc.stdout
    assert all(r["recall"] == 1.0 and r["median_ms"] > 0 for r in results)
    assert all("load_s" in r for r in results if r["backend"] == "bank")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "failed" not in proc.stdout
