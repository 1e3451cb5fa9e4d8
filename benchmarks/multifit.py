"""Fits per hour of one device when K fits train together (`unziplora.fit_many`), against one at a time.

For each model and each K, interleaved over rounds in one process: K independent fits (the sample set's
images, each its own prompts and seed) trained in one batch; fits_per_hour(K) = 3600 K / (wall time of the
batch, encoding and export included). Prints each round, the medians of per-round ratios, and

    fits_per_hour(K=4)/fits_per_hour(K=1) = R      (goal on CPU, tiny: R >= 2.0)

    .venv/bin/python benchmarks/multifit.py [--models tiny toy] [--ks 1 2 4 8] [--steps 150] [--rounds 3]
        [--json docs/results/multifit.json]

The committed runs the pages quote are docs/results/multifit*.json; docs/img/multifit.png is drawn from them
(`python -m benchmarks.figures`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

try:
    from benchmarks import results as result_files
except ImportError:  # run as a file: benchmarks/ is sys.path[0]
    import results as result_files
from unziplora import FitConfig, fit_many
from unziplora.models import load_base_model

SAMPLES = Path(__file__).resolve().parent.parent / "examples" / "sample_set"
KINDS = [("sks star", "striped pattern"), ("sks circle", "dotted pattern"), ("sks square", "striped pattern"),
         ("sks star", "dotted pattern")]


def batch_seconds(base, k: int, steps: int, rank: int) -> float:
    images = sorted(SAMPLES.glob("*.png"))
    configs = [FitConfig(content=KINDS[i % 4][0], style=KINDS[i % 4][1], base_model=base.name, steps=steps,
                         rank=rank, seed=i) for i in range(k)]
    start = time.perf_counter()
    results = fit_many([images[i % len(images)] for i in range(k)], configs, base=base, progress=False)
    seconds = time.perf_counter() - start
    failed = [r for r in results if isinstance(r, Exception)]
    assert not failed, failed
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "toy"])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=150, help="steps per fit (a real fit has 600: set-up and export "
                        "are per fit and do not batch, so short fits understate the speed-up)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--plot", help="also draw the speed-up against K into this PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for model in args.models:
        base = load_base_model(model, device="cpu")
        batch_seconds(base, 1, 3, args.rank)  # warm-up
        per_k = {k: [] for k in args.ks}
        for round_ in range(args.rounds):
            for k in args.ks:
                per_k[k].append(3600 * k / batch_seconds(base, k, args.steps, args.rank))
            print(f"{model} round {round_}: " + ", ".join(f"K={k} {per_k[k][-1]:.0f} fits/h" for k in args.ks),
                  flush=True)
        medians = {k: statistics.median(v) for k, v in per_k.items()}
        # the speed-up: the median of each round's own ratio (rounds interleave K, so a slow spell of this
        # machine hits every K of a round alike)
        ratios = {k: [a / b for a, b in zip(per_k[k], per_k[args.ks[0]])] for k in args.ks}
        results[model] = {"fits_per_hour": medians, "speedup": {k: statistics.median(r) for k, r in ratios.items()},
                          "speedup_range": {k: [min(r), max(r)] for k, r in ratios.items()},
                          "rounds": args.rounds, "steps": args.steps, "rank": args.rank, "threads": args.threads}
        print(f"{model}: " + ", ".join(f"fits_per_hour(K={k})/fits_per_hour(K={args.ks[0]}) = "
                                       f"{results[model]['speedup'][k]:.2f}" for k in args.ks[1:]), flush=True)
    print(f"(CPU, {args.threads} thread(s), {args.steps} steps, rank {args.rank}, medians of {args.rounds} rounds)")
    if "tiny" in results and 4 in results["tiny"]["speedup"] and 1 in args.ks:
        print(f"fits_per_hour(K=4)/fits_per_hour(K=1) = {results['tiny']['speedup'][4]:.2f}")
    if args.json:
        result_files.save(args.json, results)
    if args.plot:
        plot([("", json.loads(json.dumps(results)))], args.plot)


def plot(runs: list[tuple[str, dict]], path: str) -> None:
    """The speed-up against K of each run's models (`runs`: (label, the results --json writes)); a model
    measured at one K besides K=1 is a point, the range of its rounds an error bar (runs drawn a little apart
    along K, so that their bars do not hide each other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.4), dpi=100)
    every_k = set()
    series = [(label, model, result) for label, results in runs for model, result in results.items()]
    for j, (label, model, result) in enumerate(series):
        ks = sorted(int(k) for k in result["speedup"])
        every_k |= set(ks)
        speedup = [result["speedup"][str(k)] for k in ks]
        ranges = result.get("speedup_range", {})
        low = [speedup[i] - ranges[str(k)][0] if str(k) in ranges else 0 for i, k in enumerate(ks)]
        high = [ranges[str(k)][1] - speedup[i] if str(k) in ranges else 0 for i, k in enumerate(ks)]
        apart = 1.04 ** (j - (len(series) - 1) / 2)
        axes.errorbar([k * apart for k in ks], speedup, yerr=[low, high], marker="o", markersize=4, capsize=3,
                      linestyle="-" if len(ks) > 2 else "none", label=f"{model}{label}")
    ks = sorted(every_k)
    axes.plot(ks, [k / ks[0] for k in ks], linestyle=":", color="grey", label="ideal")
    axes.set(xscale="log", xlabel="fits trained together (K)", ylabel="fits per hour vs K=1",
             title="Several fits per device (CPU)")
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.minorticks_off()
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
