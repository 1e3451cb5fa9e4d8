"""Which vector index the style bank should use: single-query top-10 latency and memory at 1k, 100k and 1M
synthetic 384-d unit vectors (MiniLM's width), for exact brute force in NumPy (float32, float16 storage) and,
when installed, FAISS (flat = exact; fp16 = exact scan of float16 storage; IVF = approximate) and LanceDB
(flat scan over a Lance table on disk).

    .venv/bin/python benchmarks/bank_search.py [--sizes 1000 100000 1000000] [--backends all|...] [--threads 1]
        [--plot latency.png] [--json results.json]

Each (backend, size) runs in its own child process so that its memory is its own: `index MB` is the child's
resident memory once the index is built (the float32 source vectors freed unless they are the index), above
its resident memory before the vectors were made; `build s` the time to make the index from the vectors,
`recall@10` top-10 recall against exact float32 search. Random Gaussian vectors have no cluster structure:
the worst case for IVF recall. `bank` is the style bank's own code (pipeline/bank): the vectors as one
Parquet part (written by another process, counted in `build s`) loaded and scanned in float32; `load s` is
the loading alone, what every `unziplora bank search` pays before its first query.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM, K, QUERIES = 384, 10, 30
BACKENDS = ("bank", "numpy-f32", "numpy-f16", "faiss-flat", "faiss-fp16", "faiss-ivf", "lancedb-flat")
DEFAULT = BACKENDS[:5]  # IVF training and LanceDB's table write take minutes at 1M: `--backends all`


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    return best[np.argsort(-scores[best])]


def make_search(backend: str, x: np.ndarray, workdir: str, timings: dict):
    """Build the index; return a function query -> top-K row numbers."""
    if backend == "numpy-f32":
        return lambda q: top_k(x @ q, K)
    if backend == "bank":
        from pipeline.bank.index import read_vectors
        from pipeline.store.storage import Store

        # written by another process, so that this one's memory is only what loading costs
        subprocess.run([sys.executable, __file__, "--write", str(len(x)), workdir], check=True)
        store = Store(workdir)
        start = time.perf_counter()
        keys, loaded = read_vectors(store, "bench")
        timings["load_s"] = round(time.perf_counter() - start, 2)
        rows = np.asarray(keys.to_pylist(), dtype=np.int64)  # parts come back in name order, not row order
        return lambda q: rows[top_k(loaded @ q, K)]
    if backend == "numpy-f16":
        # NumPy has no float16 BLAS: cast blocks to float32 on the fly.
        half = x.astype(np.float16)

        def search(q):
            scores = np.concatenate([half[i:i + 65536].astype(np.float32) @ q for i in range(0, len(half), 65536)])
            return top_k(scores, K)
        return search
    if backend.startswith("faiss"):
        import faiss

        if backend == "faiss-flat":
            index = faiss.IndexFlatIP(DIM)
        elif backend == "faiss-fp16":  # exact scan over float16 storage (SIMD decode)
            index = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            nlist = max(1, int(np.sqrt(len(x))))  # small training (10 k-means rounds) keeps the default run short
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.niter = 10
            index.train(x[:min(len(x), 32 * nlist)])
            index.nprobe = max(1, nlist // 16)
        index.add(x)
        return lambda q: index.search(q[None], K)[1][0]
    if backend == "lancedb-flat":
        import lancedb
        import pyarrow as pa

        table = pa.table({"id": np.arange(len(x)), "vector": pa.FixedSizeListArray.from_arrays(x.ravel(), DIM)})
        tbl = lancedb.connect(workdir).create_table("bank", table)
        return lambda q: tbl.search(q).metric("dot").limit(K).to_arrow()["id"].to_numpy()
    raise SystemExit(f"unknown backend {backend}")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(backend: str, n: int, threads: int) -> dict:
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    if backend == "bank":  # imported before measuring: the project's imports (torch) are not the index's cost
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        importlib.import_module("pipeline.bank.index")
    queries = vectors(QUERIES, seed=1)
    before = rss_mb()
    x = vectors(n)
    exact = [top_k(x @ q, K) for q in queries]
    timings = {}
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        search = make_search(backend, x, workdir, timings)
        build_s = time.perf_counter() - start
        if backend != "numpy-f32":
            del x  # every other backend holds its own copy
        resident = rss_mb() - before
        search(queries[0])  # warm-up
        times, found = [], []
        for q in queries:
            start = time.perf_counter()
            found.append(search(q))
            times.append(time.perf_counter() - start)
            if len(times) >= 5 and sum(times) > 10:  # a slow backend: enough queries to tell
                break
    recall = np.mean([len(set(map(int, f)) & set(map(int, e))) / K for f, e in zip(found, exact)])
    times.sort()
    return {"backend": backend, "n": n, "build_s": round(build_s, 2),
            "median_ms": round(1000 * statistics.median(times), 2),
            "p95_ms": round(1000 * times[max(0, int(0.95 * len(times)) - 1)], 2),
            "rss_mb": round(resident, 1), "recall": round(float(recall), 3), **timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--backends", nargs="+", default=list(DEFAULT), help=f"of {BACKENDS}, or all")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (1: a shared 2-core box)")
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--write", nargs=2, metavar=("N", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--plot", help="also draw the median latency against entries (log-log) into this PNG")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    args = parser.parse_args()
    if args.backends == ["all"]:
        args.backends = list(BACKENDS)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from pipeline.bank.index import PART_SIZE, write_part
        from pipeline.store.storage import Store

        n, x = int(args.write[0]), vectors(int(args.write[0]))
        for start in range(0, n, PART_SIZE):  # parts as `bank build` writes them
            write_part(Store(args.write[1]), "bench", [str(i) for i in range(start, min(n, start + PART_SIZE))],
                       x[start:start + PART_SIZE])
        return
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.threads)), flush=True)
        # the measurement is out: skip the interpreter's teardown, where a native thread pool once aborted the
        # child ("terminate called without an active exception", SIGABRT) after a complete run
        os._exit(0)
    env_threads = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    print(f"{'backend':<14}{'entries':>10}{'build s':>10}{'median ms':>11}{'p95 ms':>9}{'index MB':>10}"
          f"{'recall@10':>10}{'load s':>8}")
    results = []
    for n in args.sizes:
        for backend in args.backends:
            proc = subprocess.run([sys.executable, __file__, "--one", backend, str(n), "--threads", str(args.threads)],
                                  capture_output=True, text=True, env={**os.environ, **env_threads})
            if proc.returncode:
                print(f"{backend:<14}{n:>10}  failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-5:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{backend:<14}{n:>10}{r['build_s']:>10}{r['median_ms']:>11}{r['p95_ms']:>9}{r['rss_mb']:>10}"
                  f"{r['recall']:>10}{r.get('load_s', ''):>8}", flush=True)
    if args.json:
        try:
            from benchmarks import results as result_files
        except ImportError:  # run as a file: benchmarks/ is sys.path[0]
            import results as result_files
        result_files.save(args.json, results)
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.4), dpi=100)
    for backend in dict.fromkeys(r["backend"] for r in results):  # in measured order
        points = sorted((r["n"], r["median_ms"]) for r in results if r["backend"] == backend)
        axes.plot(*zip(*points), marker="o", label=backend, linewidth=2.5 if backend == "bank" else 1)
    axes.set(xscale="log", yscale="log", xlabel="entries in the bank", ylabel="median query (ms, top-10)",
             title=f"Style bank search ({DIM}-d, one query at a time)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
