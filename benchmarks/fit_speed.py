"""Seconds per UnZipLoRA training step and peak memory, for any base model and resolution.

    # real-size check on a GPU (full SDXL-base architecture, random weights, built offline):
    .venv/bin/python benchmarks/fit_speed.py --base-model sdxl-random --resolution 1024 --precision bf16
    .venv/bin/python benchmarks/fit_speed.py --base-model sdxl-random --resolution 1024 --gradient-checkpointing
    # CPU smoke test:
    .venv/bin/python benchmarks/fit_speed.py --base-model sdxl-random --resolution 128 --steps 3 --rank 4

Runs the real `fit()` (prompt and image encoding, masks, recalibration) and times every step through its
step callback. Reports s/step of ordinary steps, the cost of a recalibration step, the projected time of
a 600-step fit (597 ordinary + 3 recalibration steps), and peak memory (GPU: max allocated; CPU: RSS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

from unziplora.config import FitConfig
from unziplora.training import fit, peak_memory_mb
from unziplora.models import load_base_model


def step_durations(stamps: list[tuple[int, float]], calibration: set[int]) -> tuple[list[float], list[float]]:
    """Split the gaps between consecutive step callbacks into ordinary and recalibration steps."""
    ordinary, recal = [], []
    for (_, t0), (step, t1) in zip(stamps, stamps[1:]):
        (recal if step in calibration else ordinary).append(t1 - t0)
    return ordinary, recal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="tiny")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--steps", type=int, default=12, help="ordinary steps to time")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    base = load_base_model(args.base_model, device=args.device, precision=args.precision)
    load_s = time.perf_counter() - t
    res = args.resolution or base.default_resolution
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (res, res, 3), dtype=np.uint8))
    config = FitConfig(content="sks dog", style="watercolor painting", base_model=args.base_model,
                       steps=args.steps + 1, recalibrations=1, rank=args.rank, resolution=res,
                       precision=args.precision, device=args.device,
                       gradient_checkpointing=args.gradient_checkpointing)
    stamps = []
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(base.device)
    # step 0 is both warm-up and the (only) recalibration step: it is reported separately
    result = fit(_to_bytes(image), config, base=base, progress=False,
                 on_step=lambda step, _: stamps.append((step, time.perf_counter())))
    ordinary, _ = step_durations(stamps, set(config.calibration_steps))
    s_per_step = statistics.median(ordinary)
    recal_s = result.record["timings"]["train_s"] - (stamps[-1][1] - stamps[0][1])  # step 0 and set-up
    report = {
        "device": torch.cuda.get_device_name(base.device) if base.device.type == "cuda" else "cpu",
        "base_model": args.base_model, "resolution": res, "rank": args.rank, "dtype": str(base.dtype),
        "gradient_checkpointing": args.gradient_checkpointing,
        "adapted_linears": result.record["adapted_layers"],
        "load_base_model_s": round(load_s, 1),
        "s_per_step": round(s_per_step, 4),
        "first_step_incl_recalibration_s": round(recal_s, 3),
        "projected_600_step_fit_s": round(597 * s_per_step + 3 * max(recal_s, s_per_step), 1),
        "peak_memory_mb": round(peak_memory_mb(base.device), 1),
    }
    print(json.dumps(report, indent=1))


def _to_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


if __name__ == "__main__":
    main()
