"""The GPU path, checked on the CPU where it can be: half-precision UNets with fp32 LoRA math (bf16, and fp16
with its loss scaler), the VAE in fp32, every tensor of a step on the base model's device, and the compiled
UNet option.

The device check runs the whole fit (prompt and image encoding, a recalibration step, an ordinary step) on the
meta device as a stand-in accelerator (benchmarks/sdxl_budget.py's `Account`): a tensor left on the host and
mixed into a device op is caught as CUDA would refuse it, which the meta kernels alone do not all check.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from unziplora import FitConfig, fit
from unziplora import training
from unziplora.images import load_image
from unziplora.layers import UnZipLoRA
from unziplora.models import build_preset, place

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def budget():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("sdxl_budget", BENCHMARKS / "sdxl_budget.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sdxl_budget"] = module
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCHMARKS))


def test_every_tensor_of_a_fit_stays_on_the_device(budget):
    row = budget.account("tiny", 64, dtype=torch.bfloat16)
    assert row["mixed_devices"] == [], row["mixed_devices"]
    assert row["step_tflop"] > 0 and row["peak_gb"] > row["weights_gb"] > 0


def test_a_host_tensor_in_a_device_step_is_caught(budget, monkeypatch):
    """The check can fail: a prediction target built on the host (a forgotten device=) is found."""
    target = training.prediction_target
    monkeypatch.setattr(training, "prediction_target", lambda *args: torch.zeros(target(*args).shape))
    try:
        row = budget.account("tiny", 64, dtype=torch.bfloat16)
        found = row["mixed_devices"]
    except RuntimeError as exc:  # or torch itself refuses it
        found = [str(exc)]
    assert found and any("cpu" in f and "meta" in f for f in found), found


def _half_base(dtype):
    """tiny's fp32 weights, rounded to `dtype` (the VAE stays fp32, as load_base_model keeps it)."""
    base = place(build_preset("tiny"), torch.device("cpu"))
    for module in (base.unet, base.text_encoder, base.text_encoder_2):
        module.to(dtype)
    return base


def _train(base, sample_image, steps=3, **settings):
    """The real loop on a half-precision UNet on the CPU; per step: dtypes and devices of what it holds."""
    config = FitConfig(content="sks dog", style="ink", steps=steps, rank=4, resolution=64, recalibrations=1,
                       role_table="sdxl", **settings)
    embeds = training.encode_prompts(base, config.prompts())
    latents = training.encode_image(base, load_image(sample_image, 64))
    adapter = UnZipLoRA(base.unet, config.rank, config.role_table, config.init, config.seed)
    seen = []

    def on_step(step, metrics):
        lora = adapter.lora_parameters()
        seen.append({"lora": {p.dtype for p in lora}, "grads": {p.grad.dtype for p in lora if p.grad is not None},
                     "grad_norm": float(torch.stack([p.grad.float().norm() for p in lora]).norm()),
                     "mergers": adapter.gates.mergers.dtype, "loss": metrics["loss"]})

    training.train(base, adapter, embeds, latents, config, progress=False, on_step=on_step)
    return embeds, latents, adapter, seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_unet_trains_fp32_loras(dtype, sample_image):
    base = _half_base(dtype)
    embeds, latents, adapter, seen = _train(base, sample_image)
    assert {p.dtype for p in base.unet.parameters()} == {dtype} and not any(
        p.requires_grad for p in base.unet.parameters())
    assert {p.dtype for p in base.vae.parameters()} == {torch.float32}  # the VAE stays fp32
    assert latents.dtype == dtype and all(e.dtype == dtype for e in embeds.values())
    for step in seen:
        assert step["lora"] == {torch.float32} and step["grads"] == {torch.float32}
        assert step["mergers"] == torch.float32
        assert torch.isfinite(torch.tensor([step["loss"], step["grad_norm"]])).all()
    # the UNet is handed back as it was: its own linears, no adapter left behind
    assert not any(isinstance(m, type(next(iter(adapter.layers.values())))) for m in base.unet.modules())


def test_fp16_gradients_are_unscaled_before_the_cone_scores_and_the_clip(sample_image):
    """fp16 needs the loss scaler (65536x); the cone scores and the clip must see true gradients: the first
    step's gradient norm matches the fp32 run's (same seed, same data) within half-precision noise."""
    *_, half = _train(_half_base(torch.float16), sample_image, steps=2)
    *_, full = _train(_half_base(torch.float32), sample_image, steps=2)
    ratio = half[0]["grad_norm"] / full[0]["grad_norm"]
    assert 0.9 < ratio < 1.1, (half[0], full[0])  # scaled gradients would be 65536x


def test_compiled_unet_option_runs_the_steps_through_one_compiled_unet(tiny_base, sample_image, monkeypatch):
    """`compile=True` runs every step through torch.compile(unet), made once per base model and reused by later
    fits; the UNet module itself is left alone. (torch.compile's own work on this adapter was measured by hand,
    README "GPU check": slower on the CPU; its code generation takes minutes on 2 cores, too long for a test.)"""
    made = []

    class Compiled:  # stands in for what torch.compile returns: a callable around the module
        def __init__(self, module):
            self.module, self.calls = module, 0
            made.append(self)

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", Compiled)
    config = FitConfig(content="sks dog", style="ink", steps=2, recalibrations=1, rank=2)
    eager = fit(sample_image, config, base=tiny_base, progress=False)
    compiled = [fit(sample_image, config.replace(compile=True), base=tiny_base, progress=False) for _ in range(2)]
    try:
        assert len(made) == 1 and made[0].module is tiny_base.unet and made[0].calls == 2 * config.steps
        assert type(tiny_base.unet).__name__ == "UNet2DConditionModel"
        for kind in ("content", "style"):
            for key, value in eager.tensors[kind].items():
                assert torch.equal(compiled[1].tensors[kind][key], value)
    finally:
        tiny_base.extra.pop("compiled_unet", None)


def test_gpu_check_smoke_runs_the_same_code_path(tmp_path):
    """The GPU check's --smoke mode (tiny, CPU): the script a lent GPU runs, whole, with its predictions."""
    import json
    import subprocess

    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and [r["checkpointing"] for r in report["runs"]] == [True]
    run = report["runs"][0]
    assert 0 < run["s_per_step"] < run["fit_600_s"] and run["recalibration_s"] > 0 and run["setup_s"] > 0
    assert run["predicted_peak_gb"] > 0 and run["step_tflop"] > 0 and run["achieved_tflops"] > 0
    assert "| 64 | on |" in done.stdout
