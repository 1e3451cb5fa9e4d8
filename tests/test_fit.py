"""The training loop's contract: encoders run once per fit, outside the graph; the loss goes down."""

import pytest
import torch

from unziplora import FitConfig, fit


def test_prompts_and_image_are_encoded_once(tiny_base, sample_image):
    calls = {"text_encoder": 0, "text_encoder_2": 0, "vae": 0}
    hooks = [getattr(tiny_base, name).register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
             for name in ("text_encoder", "text_encoder_2")]
    original_encode = tiny_base.vae.encode

    def counting_encode(*a, **k):
        calls["vae"] += 1
        out = original_encode(*a, **k)
        assert not torch.is_grad_enabled()  # encoders never enter the training graph
        return out

    tiny_base.vae.encode = counting_encode
    try:
        fit(sample_image, FitConfig(content="sks dog", style="ink", steps=9, rank=2), base=tiny_base,
            progress=False)
    finally:
        del tiny_base.vae.encode
        for h in hooks:
            h.remove()
    assert calls == {"text_encoder": 3, "text_encoder_2": 3, "vae": 1}  # three prompts, one image, 9 steps


def test_frozen_base_gets_no_gradient(tiny_base, sample_image):
    before = {k: v.clone() for k, v in tiny_base.unet.state_dict().items()}
    fit(sample_image, FitConfig(content="sks dog", style="ink", steps=3, rank=2), base=tiny_base, progress=False)
    after = tiny_base.unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in tiny_base.unet.parameters())


def test_training_lowers_the_loss(tiny_base, sample_image):
    """Same seed, so the same noise, timesteps and crops: the trained run must predict the noise better
    over the last steps than a run whose learning rates are (almost) zero."""
    def last_mse(lr):
        config = FitConfig(content="sks dog", style="ink", steps=60, rank=8, lr=lr, merger_lr=lr, init="zeros")
        history = fit(sample_image, config, base=tiny_base, progress=False).history
        assert len(history) == 60 and "mask_stats" in history[0]
        return sum(h["mse"] for h in history[-20:])

    assert last_mse(1e-2) < 0.95 * last_mse(1e-12)  # measured: 20.9 vs 22.6 (a random base is hard to fit)


def test_gradient_checkpointing_gives_the_same_fit(tiny_base, sample_image):
    """Prompt routing survives checkpoint recomputation: same tensors with and without checkpointing."""
    config = FitConfig(content="sks dog", style="ink", steps=4, rank=4, save_precision="fp32")
    plain = fit(sample_image, config, base=tiny_base, progress=False)
    checkpointed = fit(sample_image, config.replace(gradient_checkpointing=True), base=tiny_base, progress=False)
    assert not tiny_base.unet.is_gradient_checkpointing  # put back as it was
    for kind in ("content", "style", "mergers"):
        for key, value in plain.tensors[kind].items():
            torch.testing.assert_close(checkpointed.tensors[kind][key], value, atol=1e-6, rtol=1e-5)


# ---- baselines and ablations expressed as role tables ----

def _columns_by_block(result, kind):
    """block name -> fraction of its columns the exported `kind` LoRA uses (nonzero lora_B rows)."""
    used = {}
    for key, B in result.tensors[kind].items():
        if key.endswith("lora_B.weight"):
            block = key.split(".transformer_blocks")[0]
            used.setdefault(block, []).append((B.float().abs().sum(1) > 0).float().mean().item())
    return {block: sum(v) / len(v) for block, v in used.items()}


def test_b_lora_table_trains_one_block_per_kind_and_nothing_else(tiny_base, sample_image):
    config = FitConfig(content="sks dog", style="ink", steps=6, recalibrations=3, rank=2,
                       role_table="sdxl-blora", ortho_lambda=0.0)
    result = fit(sample_image, config, base=tiny_base, progress=False)
    content, style = _columns_by_block(result, "content"), _columns_by_block(result, "style")
    assert content.pop("up_blocks.0.attentions.0") == 1.0 and set(content.values()) == {0.0}
    assert style.pop("up_blocks.0.attentions.1") == 1.0 and set(style.values()) == {0.0}
    # no sparse LoRA anywhere: the recalibrations picked nothing and the mergers never moved
    assert all(torch.all(m == 1) for m in result.tensors["mergers"].values())


def test_free_table_keeps_every_column_of_both_loras_and_mergers_at_one(tiny_base, sample_image):
    config = FitConfig(content="sks dog", style="ink", steps=4, recalibrations=2, rank=2, role_table="free",
                       ortho_lambda=0.5)
    result = fit(sample_image, config, base=tiny_base, progress=False)
    for kind in ("content", "style"):
        assert set(_columns_by_block(result, kind).values()) == {1.0}
    # every column overlaps, yet nothing is separated: the orthogonality loss must not shrink the mergers
    assert all(torch.all(m == 1) for m in result.tensors["mergers"].values())


def test_off_loras_stay_off_during_recalibration_steps(tiny_base):
    from unziplora.layers import UnZipLoRA

    adapter = UnZipLoRA(tiny_base.unet, rank=2, role_table="sdxl-blora")
    gates = adapter.gates
    gates.masks_enabled = False  # what a recalibration step does
    for name, layer in adapter.named_layers():
        open_ = gates.gates()[:, layer.columns()]
        expected = (torch.tensor([layer.role.content != "off", layer.role.style != "off"]).float()[:, None]
                    .expand_as(open_))
        assert torch.equal(open_, expected), name


def test_prediction_target_follows_the_scheduler_config():
    from diffusers import DDPMScheduler

    from unziplora.errors import InputError
    from unziplora.training import prediction_target

    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert prediction_target(DDPMScheduler(), x0, noise, t) is noise
    v_sched = DDPMScheduler(prediction_type="v_prediction")
    a = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose(prediction_target(v_sched, x0, noise, t), expected, atol=1e-6)
    with pytest.raises(InputError, match="prediction_type"):
        prediction_target(DDPMScheduler(prediction_type="sample"), x0, noise, t)
