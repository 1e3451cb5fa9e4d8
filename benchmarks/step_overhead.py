"""Cost of one UnZipLoRA training step vs one step of a plain single peft LoRA (same targets, same rank,
one prompt), on the tiny model on CPU, in one process with interleaved rounds; and the peak memory of a
whole tiny fit (measured in a child process, so this script's own memory does not count).

    .venv/bin/python benchmarks/step_overhead.py [--rank 64] [--rounds 7] [--steps 20] [--threads 1]

Last lines: `unziplora_step/plain_lora_step = R` (median of per-round ratios; the plain LoRA with AdamW's
default, as a training script builds it; our loop uses the fused AdamW) and the same against a plain LoRA with
the fused AdamW too (the method's own cost). Goal (issue 15): R <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig

from gpu_check import step_durations
from unziplora.config import FitConfig
from unziplora.fit_files import RECORD
from unziplora.training import encode_image, encode_prompts, train
from unziplora.images import load_image
from unziplora.layers import UnZipLoRA
from unziplora.models import load_base_model

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "striped_star.png"


def unziplora_step_times(base, embeds, latents, config) -> list[float]:
    """Per-step wall times of the real training loop, recalibration steps left out (they are 3 in 600)."""
    stamps = []
    adapter = UnZipLoRA(base.unet, config.rank, config.role_table, seed=config.seed)
    train(base, adapter, embeds, latents, config, progress=False,
          on_step=lambda step, _: stamps.append((step, time.perf_counter())))
    return step_durations(stamps, set(config.calibration_steps))[0]


def plain_lora_step_times(base, embeds, latents, config, target_names, fused: bool = False) -> list[float]:
    """The same loop with one standard peft LoRA on the same linears, driven by the combined prompt only;
    AdamW as a plain training script builds it (the default: one tensor at a time), or fused as ours is."""
    unet = base.unet
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.rank, target_modules=target_names,
                                init_lora_weights="gaussian"), adapter_name="plain")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    rng = torch.Generator().manual_seed(0)
    res = config.resolution
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=base.dtype)
    times = []
    try:
        for _ in range(config.steps):
            t0 = time.perf_counter()
            noise = torch.randn(latents.shape, generator=rng)
            timestep = torch.randint(0, 1000, (1,), generator=rng)
            noisy = base.scheduler.add_noise(latents, noise, timestep)
            pred = unet(noisy, timestep, encoder_hidden_states=embeds["combined"],
                        added_cond_kwargs={"text_embeds": embeds["pooled_combined"], "time_ids": time_ids}).sample
            loss = F.mse_loss(pred, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            times.append(time.perf_counter() - t0)
    finally:
        unet.unload_lora()  # back to plain nn.Linear (delete_adapters would leave peft wrappers)
    return times[1:]


def fit_peak_memory_mb(threads: int) -> dict:
    """Peak RSS of a full default tiny fit in a fresh process, and of a process that only loads the model."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "unziplora.cli", "fit", str(SAMPLE), "--content", "sks star",
                        "--style", "striped pattern", "--out", f"{tmp}/fit", "--threads", str(threads), "--quiet"],
                       check=True, capture_output=True)
        record = json.loads(Path(tmp, "fit", RECORD).read_text())
    load_only = subprocess.run(
        [sys.executable, "-c", "import resource; from unziplora.models import load_base_model; "
         "load_base_model('tiny'); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
        check=True, capture_output=True, text=True)
    return {"fit_peak_rss_mb": round(record["timings"]["peak_memory_mb"], 1),
            "load_only_peak_rss_mb": round(float(load_only.stdout.split()[-1]), 1),
            "fit_train_s": round(record["timings"]["train_s"], 2), "fit_steps": record["settings"]["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps per round and method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", help="also write the figures as a result file (docs/results/step_overhead.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_base_model("tiny", device="cpu")
    config = FitConfig(content="sks star", style="striped pattern", steps=args.steps, rank=args.rank,
                       recalibrations=1, resolution=base.default_resolution, role_table=base.role_table)
    embeds = encode_prompts(base, config.prompts())
    latents = encode_image(base, load_image(SAMPLE, config.resolution))
    probe = UnZipLoRA(base.unet, rank=1)
    target_names = [name for name, _ in probe.named_layers()]
    print(f"tiny model, CPU, {args.threads} thread(s), rank {args.rank}, {len(target_names)} adapted linears, "
          f"{args.rounds} interleaved rounds of {args.steps} steps")

    unziplora_step_times(base, embeds, latents, config)  # warm-up round for all, not counted
    plain_lora_step_times(base, embeds, latents, config, target_names)
    plain_lora_step_times(base, embeds, latents, config, target_names, fused=True)
    ratios, fused_ratios, ours_all, plain_all, fused_all = [], [], [], [], []
    for round_ in range(args.rounds):
        ours = statistics.median(unziplora_step_times(base, embeds, latents, config))
        plain = statistics.median(plain_lora_step_times(base, embeds, latents, config, target_names))
        fused = statistics.median(plain_lora_step_times(base, embeds, latents, config, target_names, fused=True))
        ratios.append(ours / plain)
        fused_ratios.append(ours / fused)
        ours_all.append(ours)
        plain_all.append(plain)
        fused_all.append(fused)
        print(f"round {round_}: unziplora {ours * 1e3:.1f} ms/step, plain peft LoRA {plain * 1e3:.1f} ms/step "
              f"(fused AdamW {fused * 1e3:.1f}), ratio {ours / plain:.3f} ({ours / fused:.3f})")
    memory = None if args.skip_memory else fit_peak_memory_mb(args.threads)
    if memory is not None:
        print("memory:", json.dumps(memory))
    print(f"median ms/step: unziplora {statistics.median(ours_all) * 1e3:.1f}, "
          f"plain {statistics.median(plain_all) * 1e3:.1f}, plain with fused AdamW {statistics.median(fused_all) * 1e3:.1f}")
    # the method's own cost: the same optimizer on both sides
    print(f"unziplora_step/plain_lora_step_same_optimizer = {statistics.median(fused_ratios):.3f}")
    print(f"unziplora_step/plain_lora_step = {statistics.median(ratios):.3f}")
    if args.json:
        try:
            from benchmarks import results as result_files
        except ImportError:  # run as a file: benchmarks/ is sys.path[0]
            import results as result_files
        result_files.save(args.json, {
            "rounds": args.rounds, "steps": args.steps, "rank": args.rank, "threads": args.threads,
            "ratio": statistics.median(ratios), "ratio_same_optimizer": statistics.median(fused_ratios),
            "ratio_range": [min(ratios), max(ratios)], "ms_per_step": {
                "unziplora": statistics.median(ours_all) * 1e3, "plain": statistics.median(plain_all) * 1e3,
                "plain_fused": statistics.median(fused_all) * 1e3}, "memory": memory})


if __name__ == "__main__":
    main()
