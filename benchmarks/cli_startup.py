"""How long `unziplora --help` (and each command's --help, and a bad argument) takes to answer, beside `ray --help`
on the same machine: interleaved rounds, median wall time of each, and the ratio to `ray --help`.

    .venv/bin/python benchmarks/cli_startup.py [--rounds 5]

Goal (issue 32): `unziplora --help` and every command's --help no slower than `ray --help` (ratio <= 1).
What is imported is checked by tests/test_startup.py; this script only prints times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CASES = {
    "ray --help": [str(BIN / "ray"), "--help"],
    "unziplora --help": [str(BIN / "unziplora"), "--help"],
    "unziplora fit --help": [str(BIN / "unziplora"), "fit", "--help"],
    "unziplora decompose --help": [str(BIN / "unziplora"), "decompose", "--help"],
    "unziplora registry search --help": [str(BIN / "unziplora"), "registry", "search", "--help"],
    "unziplora bank search --help": [str(BIN / "unziplora"), "bank", "search", "--help"],
    "unziplora registry search x (no URI)": [str(BIN / "unziplora"), "registry", "search", "x"],
    "unziplora fit x.png --out o --threads 0": [str(BIN / "unziplora"), "fit", "x.png", "--out", "o", "--threads", "0"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the medians as a result file (docs/results/cli_startup.json)")
    args = parser.parse_args()
    missing = [c[0] for c in CASES.values() if not shutil.which(c[0])]
    if missing:
        sys.exit(f"not found: {missing} (run with the venv's python)")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, argv in CASES.items():
            start = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            times[name].append(time.perf_counter() - start)
    ray = statistics.median(times["ray --help"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:45s} {median:6.2f} s  ratio to ray --help {median / ray:5.2f}")
    if args.json:
        try:
            from benchmarks import results as result_files
        except ImportError:  # run as a file: benchmarks/ is sys.path[0]
            import results as result_files
        result_files.save(args.json, {"rounds": args.rounds, "median_s": {n: statistics.median(v) for n, v in times.items()},
                                     "ratio_to_ray_help": {n: statistics.median(v) / ray for n, v in times.items()}})


if __name__ == "__main__":
    main()
