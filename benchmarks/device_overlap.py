"""Device time never spent waiting for the CPU (issue 31 §4): how much of each item's time the next fit does not
hide, with one batch in flight (every step of an item in turn, as the worker did before) and with two or more
(one batch fits while another is exported, uploaded and tracked, and the next is read and identified).

The device is a stand-in: a fit whose training is a fixed sleep of D seconds (the device busy, the worker's
Python free, as while CUDA kernels run). Everything around it is the worker's own code and runs for real: the
export of SDXL-size LoRAs (rank 64, fp16: kohya conversion, hashes, safetensors; sizes from
benchmarks/sdxl_budget.py), uploads to a moto S3 server, the attempt records and markers, and MLflow tracking on
an `mlflow server` (one run per fit, both LoRAs registered). Previews are device work: off, or with
`--previews-s P` a stand-in that holds the device P seconds per item.

    .venv/bin/python benchmarks/device_overlap.py                       # D = 30 s, 5 items per mode: ~6 min
    .venv/bin/python benchmarks/device_overlap.py --previews-s 2 --in-flight 1 2 3     # previews on: ~9 min
    .venv/bin/python benchmarks/device_overlap.py --device-s 3 --items 3 --scale tiny   # plumbing: ~1 min

Printed: per mode, the device's idle time between one piece of device work's end and the next one's start (the
time an item costs beyond its device work), its mean per item as a share of D, and the wall time. Goal: <= 2 % of D with two in flight.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class StandInDevice:
    """`fit_many` for the worker: sleeps D seconds per batch, then hands back FitResults whose LoRAs have the
    size of real ones, so that the export that follows costs what a real one does. Notes each fit's span."""

    def __init__(self, template, device_s: float, lora_bytes: int):
        self.template, self.device_s = template, device_s
        self.tensors = _sized_like(template.tensors, lora_bytes)
        self.spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()

    def __call__(self, images, configs, **_kwargs):
        start = time.perf_counter()
        time.sleep(self.device_s)
        with self.lock:
            self.spans.append((start, time.perf_counter()))
        results = []
        for config in configs:
            record = copy.deepcopy(self.template.record)
            record["timings"]["total_s"] = self.device_s
            results.append(dataclasses.replace(self.template, config=config, record=record, tensors=self.tensors,
                                               out_dir=None))
        return results

    def previews(self, previews_s: float):
        """`draw_previews` for the worker: device work of `previews_s` seconds (the worker holds the lock); it
        draws nothing, so no preview files are written."""
        def draw(*_args, **_kwargs) -> None:
            start = time.perf_counter()
            time.sleep(previews_s)
            with self.lock:
                self.spans.append((start, time.perf_counter()))
        return draw

    def idle_between_device_work(self) -> list[float]:
        spans = sorted(self.spans)
        return [max(0.0, nxt[0] - end) for (_, end), nxt in zip(spans, spans[1:])]


def _sized_like(tensors: dict, lora_bytes: int) -> dict:
    """The template fit's tensors with each LoRA grown (random values, same keys) to `lora_bytes` in fp16."""
    out = dict(tensors)
    for kind in ("content", "style"):
        state = tensors[kind]
        per_key = max(1, lora_bytes // (2 * len(state)))  # fp16 values per tensor
        rank = 64
        grown = {}
        for key, value in state.items():
            width = max(1, per_key // rank)
            shape = (rank, width) if "lora_A" in key else (width, rank)
            grown[key] = torch.randn(shape, dtype=torch.float16)
        out[kind] = grown
    return out


def write_images(folder: Path, count: int) -> list[Path]:
    """`count` distinct small PNGs (distinct bytes: distinct items)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = torch.Generator().manual_seed(i)
        values = (torch.rand(64, 64, 3, generator=pixels) * 255).to(torch.uint8).numpy()
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(values).save(paths[-1])
    return paths


def template_fit(image: Path):
    """One real fit on the tiny model (2 steps): the record, config and tensor layout the stand-in copies."""
    from unziplora import FitConfig, fit

    return fit(image, FitConfig(content="sks square", style="flat", base_model="tiny", steps=2, rank=4,
                         recalibrations=1),
               progress=False)


def run_mode(in_flight: int, args, tracking_uri: str, s3_endpoint: str, folder: Path, template,
             lora_bytes: int) -> dict:
    """Every image through one FitWorker, `in_flight` batches at a time, fed as the Train executor feeds it."""
    from unittest import mock

    from pipeline.run import worker as worker_mod
    from pipeline.run.executors import feed
    from pipeline.run.identify import batch_columns
    from pipeline.run.source import read_inputs
    from pipeline.run.spec import JobSpec, Previews, RunState, Scaling, Tracking
    from pipeline.store.storage import Store
    from pipeline.registry.tracking import start_job

    job = JobSpec(input=str(folder), output=f"s3://lib/overlap-{in_flight}",
                  storage_options={"endpoint_url": s3_endpoint, "skip_instance_cache": True},
                  default_content="sks square", default_style="flat",
                  fit={"base_model": "tiny", "steps": 2, "recalibrations": 1, "rank": 4},
                  scaling=Scaling(batches_in_flight=in_flight),
                  tracking=Tracking(uri=tracking_uri, library=f"overlap-{in_flight}"),
                  previews=Previews(steps=1 if args.previews_s else 0),
                  state=RunState(run_id=f"overlap-{in_flight}-{os.getpid()}"))
    store = Store(job.output, job.storage_options)
    job = start_job(job, store, progress=False)
    if job.state.tracking_error:
        raise RuntimeError(f"MLflow: {job.state.tracking_error}")
    items = read_inputs(job.input, default_content=job.default_content, default_style=job.default_style).items
    device = StandInDevice(template, args.device_s, lora_bytes)
    worker = worker_mod.FitWorker(job, device="cpu")
    with mock.patch.object(worker_mod, "fit_many", device), \
            mock.patch.object(worker_mod, "draw_previews", device.previews(args.previews_s)):
        start = time.perf_counter()
        done = feed(worker, (batch_columns([item]) for item in items), in_flight)
        wall = time.perf_counter() - start
    markers = [store.read_json("items", item, "_SUCCESS") for item in (p.rsplit("/", 1)[-1] for p in
                                                                       store.list("items"))
               if store.exists("items", item, "_SUCCESS")]
    complete = [m for m in markers if m["status"] == "ok"]
    tracked = [m.get("mlflow_run_id") for m in complete]
    idle = device.idle_between_device_work()
    per_item = sum(idle) / max(1, done - 1)  # the device's idle time from the first start to the last end
    busy = sum(end - start for start, end in device.spans)
    return {"in_flight": in_flight, "items": done, "complete": len(complete), "tracked": sum(map(bool, tracked)),
            "wall_s": wall, "idle_s": idle, "idle_per_item_s": per_item, "idle_share_of_d": per_item / args.device_s,
            "beyond_device_per_item_s": (wall - busy) / max(1, done)}


def measure(args) -> dict:
    os.environ.update({k: os.environ.get(k, v) for k, v in AWS.items()})
    import boto3

    from benchmarks.registry_scale import mlflow_server
    from benchmarks.s3_writes import LORA_BYTES, CountingMoto

    torch.set_num_threads(1)
    scale = {"sdxl": 1.0, "tiny": 1e-3}.get(args.scale) or float(args.scale)
    server = CountingMoto()
    try:
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket="lib")
        with tempfile.TemporaryDirectory(prefix="device-overlap-") as tmp:
            tmp = Path(tmp)
            images = write_images(tmp / "images", args.items)
            template = template_fit(images[0])
            out = {"device_s": args.device_s, "previews_s": args.previews_s, "items": args.items,
                   "lora_bytes": int(LORA_BYTES * scale)}
            (tmp / "mlflow").mkdir()
            with mlflow_server(f"sqlite:///{tmp}/mlflow.db", tmp / "mlflow") as url:
                for in_flight in args.in_flight:
                    out[f"in_flight_{in_flight}"] = run_mode(in_flight, args, url, server.endpoint, tmp / "images",
                                                             template, out["lora_bytes"])
            return out
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-s", type=float, default=30.0, help="the stand-in fit's device time D (seconds)")
    parser.add_argument("--items", type=int, default=5, help="items per mode")
    parser.add_argument("--previews-s", type=float, default=0.0,
                        help="stand-in previews: device work of this many seconds per item (0: previews off)")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 2], help="the modes: batches in flight")
    parser.add_argument("--scale", default="sdxl", help="LoRA sizes: sdxl (rank 64, fp16), tiny (1/1000), or a factor")
    parser.add_argument("--json", help="write the figures here, as a result file (docs/results/device_overlap.json)")
    args = parser.parse_args()
    result = measure(args)
    for in_flight in args.in_flight:
        r = result[f"in_flight_{in_flight}"]
        print(f"{in_flight} batch{'es' if in_flight > 1 else ''} in flight: device idle "
              f"{r['idle_per_item_s']:.2f} s per item = {100 * r['idle_share_of_d']:.1f} % of D (gaps "
              f"{', '.join(f'{x:.2f}' for x in r['idle_s'])} s); wall {r['wall_s']:.1f} s for {r['items']} items, "
              f"{r['complete']} complete, {r['tracked']} tracked")
    print(f"D = {result['device_s']:g} s, previews {result['previews_s']:g} s, LoRAs of {result['lora_bytes'] / 1e6:.1f} MB; goal: two in flight "
          f"<= 2 % of D")
    if args.json:
        from benchmarks import results as result_files

        result_files.save(args.json, result)


if __name__ == "__main__":
    main()
