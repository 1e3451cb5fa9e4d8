"""What the job costs around the fits: re-running a complete library, as it grows (issue 15, section 2).

For each store (local disk, a local moto S3) and each N: build a synthetic complete library of N items
exactly as the job lays one out (images and prompts.csv; per item a `_SUCCESS` marker and a `sources/` row;
the manifest), with the job's own item ids, but no fits; then re-run the job on it, in this process, and print
the re-run's wall time (run_job, in a driver process of its own), ms per item and that driver's peak memory
(its RSS high-water mark, Python and the job's imports included).

    python -m benchmarks.control_plane --items 1000 10000 100000
    python -m benchmarks.control_plane --items 1000 --stores local --recheck   # also time `--recheck`

The committed run the pages quote is docs/results/control_plane.json (`--json` writes that form);
docs/img/control_plane.png is drawn from it (`python -m benchmarks.figures`).

Goals (issue 15): 100k items re-run in <= 30 s on local disk, <= 120 s on local moto S3; driver <= 2 GB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from PIL import Image

try:
    from benchmarks import results as result_files
except ImportError:  # run as a file: benchmarks/ is sys.path[0]
    import results as result_files

from pipeline.store import layout
from pipeline.run.identify import check_job_settings, identify, ids_of
from pipeline.run.job import pin_base_model, run_job
from pipeline.store.manifest import ok_row, source_key, write_manifest
from pipeline.run.source import read_inputs
from pipeline.run.spec import JobSpec, Tracking
from pipeline.store.storage import Store, sha256_hex
from unziplora import fit_files
from unziplora.export import lora_file_name
from unziplora.roles import KINDS

FIT = {"base_model": "toy", "steps": 600, "rank": 4}


def image_bytes(n: int) -> bytes:
    """A distinct 8x8 PNG per n (distinct bytes: no two inputs are duplicates)."""
    picture = Image.new("RGB", (8, 8))
    picture.putdata([((n >> (8 * (i % 3))) & 255, i, (n * 7 + i) & 255) for i in range(64)])
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def put_many(store: Store, files: dict[str, bytes], put=None) -> None:
    """Plain writes (a builder, not the job: no temporary keys); `put(url, data)` writes one where given."""
    if put is not None:
        for key, data in files.items():
            put(store.url(key), data)
        return
    if store.url_prefix == "":
        for key, data in files.items():
            path = store.path(key)
            os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        return
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: store.fs.pipe_file(store.path(kv[0]), kv[1]), files.items()))


def build_library(input_url: str, output_url: str, n: int, storage_options: dict | None = None,
                  put=None, fit_files: bool = True) -> JobSpec:
    """A complete library of `n` items under `output_url` for the images it writes under `input_url`. With
    `fit_files`, each item's files are there too, of the sizes its marker vouches for (what `--recheck` checks);
    without, markers alone (enough for a plain re-run, which trusts the manifest, and 13x fewer objects)."""
    options = storage_options or {}
    images = {f"img{i:06d}.png": image_bytes(i) for i in range(n)}
    table = "image,content,style\n" + "".join(f"{name},sks thing{i},style{i % 50} painting\n"
                                              for i, name in enumerate(images))
    put_many(Store(input_url, options), images | {"prompts.csv": table.encode()}, put)
    job = JobSpec(input=input_url, output=output_url, fit=dict(FIT), storage_options=options,
                  tracking=Tracking(enabled=False))
    job = pin_base_model(job, check_job_settings(job.fit))
    out = Store(output_url, options)
    rows, files = [], {}
    for item in read_inputs(input_url, storage_options=options).items:
        name = item["source_uri"].rsplit("/", 1)[-1]
        identity, _ = identify(item, job, image_sha256=sha256_hex(images[name]))
        row = synthetic_row(item, identity, job, out)
        rows.append(row)
        files[layout.marker_key(row["item_id"])] = json.dumps(row).encode()
        files["/".join(source_key(item["source_uri"]))] = json.dumps(row).encode()
        if fit_files:
            for name, info in json.loads(row["files"]).items():
                files["/".join(layout.item(row["item_id"], name))] = b"\0" * info["bytes"]
    put_many(out, files, put)
    write_manifest(out, rows, "built")
    return job


SYNTHETIC_FILE_BYTES = 16  # the fits' files of a synthetic library: only their names and sizes are ever checked


def synthetic_row(item: dict, identity: dict, job: JobSpec, out: Store) -> dict:
    """An ok row as a fit's would be (manifest.ok_row of a stand-in fit result), with its files' URIs and
    hashes (the sizes of real rows)."""
    folder = out.url(*layout.item(identity["item_id"]))
    names = (*fit_files.FILES.values(), *(lora_file_name(kind, "kohya") for kind in KINDS), fit_files.MERGERS,
             fit_files.MASKS, fit_files.RECORD, fit_files.CONFIG, fit_files.CARD, *fit_files.PREVIEWS.values())
    files = {name: {"uri": f"{folder}/{name}", "sha256": sha256_hex(name.encode() + identity["item_id"].encode()),
                    "bytes": SYNTHETIC_FILE_BYTES} for name in names}
    config = SimpleNamespace(content=item["content"], style=item["style"], resolved_class_word="thing",
                             rank=FIT["rank"], steps=FIT["steps"], resolution=64, seed=0)
    record = {"prompts": {"combined": f"{item['content']} in {item['style']}", "content": item["content"],
                          "style": item["style"]},
              "final": {"loss": 0.1, "mse": 0.1, "ortho": 0.0}, "mask_stats": {"content": 0.3, "style": 0.3},
              "timings": {"train_s": 60.0, "total_s": 62.0}, "base_model": "toy",
              "base_model_fingerprint": job.state.base_fingerprint}
    return ok_row(item, ids_of(identity), SimpleNamespace(config=config, record=record), files, attempts=1,
                  worker="builder", code_version="builder", run_id="built", source_stat=item["source_stat"])


def rerun(job: JobSpec, recheck: bool = False) -> dict:
    """The job on the library again, as a driver of its own (a fresh process, so its peak memory is the
    driver's alone): {"seconds", "report", "peak_rss_mb"}."""
    spec = {"input": job.input, "output": job.output, "fit": dict(FIT), "storage_options": job.storage_options,
            "tracking": {"enabled": False}, "recheck": recheck}
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.control_plane", "--driver", json.dumps(spec)],
                             stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    out = child.stdout.read()
    assert child.wait() == 0, f"the re-run failed ({child.returncode}): {out[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


def driver(spec: str) -> None:
    start = time.perf_counter()
    report = run_job(JobSpec(**json.loads(spec)), progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start, "report": report, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's RSS high-water mark since it started (VmHWM: unlike getrusage's ru_maxrss, it does not
    carry over the memory of the process this one was forked from)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


class MotoS3:
    """A moto S3 server in a thread of this process (the benchmark's object store)."""

    def __init__(self):
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ.setdefault(key, value)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.options = {"endpoint_url": f"http://{host}:{port}"}
        self.client = boto3.client("s3", endpoint_url=self.options["endpoint_url"])
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        self.backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]

    def bucket(self, name: str) -> str:
        """A new bucket: the images and each library in buckets of their own, as a real deployment would have
        them (moto lists a prefix by scanning its whole bucket, which real S3 does not)."""
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def put(self, url: str, data: bytes) -> None:
        """Straight into the server's store: building 100k items over HTTP would take an hour. The job itself
        goes over HTTP, as it would to any S3."""
        bucket, key = url.removeprefix("s3://").split("/", 1)
        self.backend.put_object(bucket, key, data)

    def stop(self) -> None:
        self.server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--stores", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument("--recheck", action="store_true", help="also time a --recheck re-run (reads everything)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--plot", help="also draw re-run time against items (log-log) into this PNG")
    parser.add_argument("--driver", help=argparse.SUPPRESS)  # one re-run, in a process of its own
    args = parser.parse_args()
    if args.driver:
        return driver(args.driver)
    results = []
    print(f"{'store':6} {'items':>7} {'build_s':>8} {'rerun_complete_s':>17} {'ms/item':>8} {'peak_rss_mb':>12}"
          + (f" {'recheck_s':>10}" if args.recheck else ""), flush=True)
    for store in args.stores:
        s3 = MotoS3() if store == "s3" else None
        try:
            for n in args.items:
                folder = tempfile.mkdtemp(prefix="cp-")
                inputs, library = (s3.bucket(f"images-{n}"), s3.bucket(f"library-{n}")) if s3 else \
                    (f"{folder}/in", f"{folder}/lib")
                start = time.perf_counter()
                job = build_library(inputs, library, n, s3.options if s3 else None, s3.put if s3 else None,
                                    fit_files=args.recheck)
                build_s = time.perf_counter() - start
                again = rerun(job)
                report, seconds = again["report"], again["seconds"]
                assert (report["ok"], report["fits_this_run"]) == (n, 0), report
                result = {"store": store, "items": n, "build_s": round(build_s, 1),
                          "rerun_complete_s": round(seconds, 2), "ms_per_item": round(1000 * seconds / n, 3),
                          "peak_rss_mb": round(again["peak_rss_mb"])}
                if args.recheck:
                    result["recheck_s"] = round(rerun(job, recheck=True)["seconds"], 2)
                results.append(result)
                print(f"{store:6} {n:7d} {build_s:8.1f} {seconds:17.2f} {result['ms_per_item']:8.3f} "
                      f"{result['peak_rss_mb']:12d}" + (f" {result['recheck_s']:10.2f}" if args.recheck else ""),
                      flush=True)
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            if s3:
                s3.stop()
    if args.json:
        result_files.save(args.json, results)
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.4), dpi=100)
    for store in sorted({r["store"] for r in results}):
        points = sorted((r["items"], r["rerun_complete_s"]) for r in results if r["store"] == store)
        axes.plot(*zip(*points), marker="o", label="local disk" if store == "local" else "local moto S3")
    axes.set(xscale="log", yscale="log", xlabel="items in the library", ylabel="re-run of a complete library (s)",
             title="The job around the fits")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
