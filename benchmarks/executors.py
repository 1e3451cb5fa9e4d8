"""Actor pool vs Ray Train on the same job: 20 tiny images with uneven fit lengths and one worker crash.

    .venv/bin/python benchmarks/executors.py [--images 20] [--workers 2] [--min-steps 40] [--max-steps 200]
        [--executors actor-pool train] [--no-crash] [--fits-per-worker K] [--orders longest-first as-listed]

For each executor (and order of handing out the fits), prints efficiency = summed fit time / (executor wall
time x workers) and the number of fits that were done again (a fit interrupted by the crash counts once; a
Train group restart that re-runs fits other workers had in progress counts each of those).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from PIL import Image

try:
    from benchmarks import results as result_files
except ImportError:  # run as a file: benchmarks/ is sys.path[0]
    import results as result_files

import pipeline.run.job
from pipeline.run.executors import longest_first
from pipeline.run.job import run_job
from pipeline.run.spec import Faults, JobSpec, Scaling


def make_dataset(folder: Path, n: int, min_steps: int, max_steps: int) -> None:
    rng = np.random.default_rng(0)
    lines = ["image,content,style,steps"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
        steps = int(rng.integers(min_steps, max_steps + 1))  # uneven fit lengths
        lines.append(f"img{i:02d}.png,sks thing{i},style {i},{steps}")
    (folder / "prompts.csv").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--min-steps", type=int, default=40)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--executors", nargs="+", default=["actor-pool", "train"], choices=["actor-pool", "train"])
    parser.add_argument("--no-crash", dest="crash", action="store_false", help="no injected worker crash")
    parser.add_argument("--fits-per-worker", type=int, default=1)
    parser.add_argument("--orders", nargs="+", default=["longest-first"], choices=["longest-first", "as-listed"],
                        help="the job's order (costliest fits first), or the input order it had before")
    parser.add_argument("--json", help="also write each run's figures here (docs/results/executors*.json)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="unziplora-bench-"))
    (root / "in").mkdir()
    make_dataset(root / "in", args.images, args.min_steps, args.max_steps)
    ray.init(num_cpus=args.workers + 4, include_dashboard=False, log_to_driver=False)
    results = {}
    for order in args.orders:
        pipeline.run.job.longest_first = longest_first if order == "longest-first" else lambda items, job: items
        for executor in args.executors:
            name = executor if len(args.orders) == 1 else f"{executor}/{order}"
            job = JobSpec(input=str(root / "in"), output=str(root / f"out-{executor}-{order}"), fit={"rank": 8},
                          scaling=Scaling(executor=executor, workers=args.workers,
                                          fits_per_worker=args.fits_per_worker),
                          faults=Faults(crash_once_on=["img05"] if args.crash else []))
            t = time.perf_counter()
            report = run_job(job, progress=False)
            report["job_wall_s"] = round(time.perf_counter() - t, 2)
            results[name] = {k: report[k] for k in ("ok", "failed", "fits_this_run", "redone_fits", "fit_s", "wall_s",
                                                    "job_wall_s", "efficiency")}
            print(json.dumps({"run": name} | results[name]))
    ray.shutdown()
    if args.json:
        result_files.save(args.json, results)
    print(f"{'run':<26} {'efficiency':>10} {'redone fits':>12} {'wall s':>8} {'fit s':>8}")
    for name, r in results.items():
        print(f"{name:<26} {r['efficiency']:>10.3f} {r['redone_fits']:>12d} {r['wall_s']:>8.1f} {r['fit_s']:>8.1f}")


if __name__ == "__main__":
    main()
