"""Several fits on one device (issue 15): K fits train together in one batched UNet pass, and each ends as it
would have alone with the same seed; one that diverges leaves the batch without harming its mates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unziplora import FitConfig, FitDivergedError, fit, fit_many
from unziplora.errors import NotChosen
from unziplora.training import Selection, _prepare, snapshot, train_batch

SAMPLES = Path(__file__).resolve().parent.parent / "examples" / "sample_set"


def _config(n: int, **changes) -> FitConfig:
    kinds = [("sks star", "striped pattern"), ("sks circle", "dotted pattern"), ("sks square", "striped pattern")]
    content, style = kinds[n]
    return FitConfig(**{"content": content, "style": style, "base_model": "tiny", "steps": 6, "rank": 4,
                        "seed": 10 + n} | changes)


IMAGES = [SAMPLES / "striped_star.png", SAMPLES / "dotted_circle.png", SAMPLES / "striped_square.png"]


def _assert_same_fit(together, alone) -> None:
    for group in ("content", "style", "mergers", "masks"):
        assert together.tensors[group].keys() == alone.tensors[group].keys()
        for name, value in alone.tensors[group].items():
            torch.testing.assert_close(together.tensors[group][name].float(), value.float(), rtol=2e-3, atol=2e-4,
                                       msg=f"{group}/{name}")
    for a, b in zip(together.history, alone.history):
        assert a["timestep"] == b["timestep"]
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-3, abs=1e-6)
    assert len(together.history) == len(alone.history)


def test_fits_trained_together_equal_the_same_fits_alone(tiny_base):
    """Three fits, one of them shorter (it leaves the batch after 4 steps): each equals its fit alone,
    recalibration steps (masks) included; the batch took one pass per step for all of them."""
    configs = [_config(0), _config(1, steps=4), _config(2)]
    alone = [fit(image, config, base=tiny_base, progress=False) for image, config in zip(IMAGES, configs)]
    calls = []
    hook = tiny_base.unet.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(args[0].shape[0]),
                                                    with_kwargs=True)
    try:
        together = fit_many(IMAGES, configs, base=tiny_base, progress=False)
    finally:
        hook.remove()
    assert calls == [3] * 4 + [2] * 2  # batched passes: 3 fits, then the 2 longer ones
    for result, single in zip(together, alone):
        assert not isinstance(result, Exception), result
        _assert_same_fit(result, single)
        assert result.record["timings"]["batch_size"] == 3
    # the UNet is back as it was: no adapted layer left in it
    assert not any("lora" in name for name, _ in tiny_base.unet.named_parameters())


def test_fits_paused_and_resumed_equal_fits_trained_straight_through(tiny_base):
    """`until` pauses a batch (here after 3 of 6 steps, past the recalibration at step 2); a snapshot then is
    the fit as it stands; only some fits trained on end as they would have straight through."""
    configs = [_config(0), _config(1)]
    alone = fit(IMAGES[1], configs[1], base=tiny_base, progress=False)
    states = [_prepare(image, config, tiny_base, None, {})[0] for image, config in zip(IMAGES, configs)]
    train_batch(tiny_base, states, progress=False, until=3)
    assert [s.step for s in states] == [3, 3] and all(s.running for s in states)
    paused = snapshot(states[1], tiny_base)
    assert paused.path is None and len(paused.record["settings"]) and paused.config.steps == 6
    assert not any("lora" in name for name, _ in tiny_base.unet.named_parameters())  # the UNet is free between
    train_batch(tiny_base, states[1:], progress=False)
    assert [s.step for s in states] == [3, 6]
    resumed = snapshot(states[1], tiny_base)
    resumed.history = states[1].history
    _assert_same_fit(resumed, alone)
    changed = [name for name, value in paused.tensors["style"].items()
               if not torch.equal(value, resumed.tensors["style"][name])]
    assert changed  # the snapshot was taken mid-way, not at the end


def test_a_selection_mid_training_stops_the_fits_not_chosen(tiny_base):
    """fit_many's `select`: all three pause after half their steps, the choice sees each as it stands, the one
    chosen trains on alone and ends as it would have straight through; the others end NotChosen."""
    configs = [_config(0), _config(1), _config(2)]
    alone = fit(IMAGES[1], configs[1], base=tiny_base, progress=False)
    seen = {}
    calls = []
    hook = tiny_base.unet.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(args[0].shape[0]),
                                                    with_kwargs=True)
    try:
        results = fit_many(IMAGES, configs, base=tiny_base, progress=False,
                           select=Selection(0.5, lambda paused: seen.update(paused) or {1}))
    finally:
        hook.remove()
    assert calls == [3] * 3 + [1] * 3
    assert sorted(seen) == [0, 1, 2] and all(seen[k].path is None and seen[k].config.seed == configs[k].seed
                                             for k in seen)
    assert [(type(r), r.step) for r in (results[0], results[2])] == [(NotChosen, 3), (NotChosen, 3)]
    _assert_same_fit(results[1], alone)
    assert results[1].record["timings"]["batch_size"] == 3 and results[1].record["timings"]["train_s"] > 0

    def broken(paused):
        raise RuntimeError("scorer down")
    failed = fit_many(IMAGES[:2], configs[:2], base=tiny_base, progress=False, select=Selection(0.5, broken))
    assert [str(r) for r in failed] == ["scorer down"] * 2  # a choice that cannot be made keeps no fit


def test_a_diverging_fit_fails_alone(tiny_base):
    """Fit 1's latents hold a NaN: its first loss is NaN, it gets FitDivergedError and leaves the batch;
    fit 0 trains on as it would alone."""
    configs = [_config(0), _config(1)]
    alone = fit(IMAGES[0], configs[0], base=tiny_base, progress=False)
    states = [_prepare(image, config, tiny_base, None, {})[0] for image, config in zip(IMAGES, configs)]
    states[1].latents[0, 0, 0, 0] = float("nan")
    train_batch(tiny_base, states, progress=False)
    assert isinstance(states[1].error, FitDivergedError) and states[1].history == []
    assert states[0].error is None and len(states[0].history) == configs[0].steps
    for step, (a, b) in enumerate(zip(states[0].history, alone.history)):
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-3, abs=1e-6), step


def test_fit_many_reports_each_fits_own_error(tiny_base, tmp_path):
    """A bad image fails only its own fit; fits of other resolutions train in a batch of their own."""
    (tmp_path / "bad.png").write_bytes(b"not an image")
    results = fit_many([IMAGES[0], tmp_path / "bad.png", IMAGES[1]],
                       [_config(0), _config(1), _config(1, resolution=128)], base=tiny_base, progress=False)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    assert isinstance(results[1], Exception) and "image" in str(results[1]).lower()
    assert results[0].record["timings"]["batch_size"] == 1 and results[2].config.resolution == 128


def test_a_batch_out_of_memory_trains_again_in_halves(tiny_base, monkeypatch):
    """Simulated: every pass of more than one fit runs out of device memory at its third step. A batch of 3
    starts again as 1 + 2, the 2 again as 1 + 1, and each fit still ends as it would alone. A fit that runs out
    of memory alone fails with its own error, and its batch mate is fitted."""
    from unziplora import training

    configs = [_config(0), _config(1), _config(2)]
    alone = [fit(image, config, base=tiny_base, progress=False) for image, config in zip(IMAGES, configs)]
    real_step = training._batch_step

    def step(base, forward, live, *args):
        if len(live) > 1 and live[0].step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        real_step(base, forward, live, *args)

    monkeypatch.setattr(training, "_batch_step", step)
    with pytest.warns(RuntimeWarning) as caught:
        together = fit_many(IMAGES, configs, base=tiny_base, progress=False)
    assert [str(w.message).split(";")[1].split("(")[0].strip() for w in caught] == \
        ["training them again as 1 and 2", "training them again as 1 and 1"]
    for result, single in zip(together, alone):
        assert not isinstance(result, Exception), result
        _assert_same_fit(result, single)
        assert result.record["timings"]["batch_size"] == 1

    def step_without_room_for_fit_1(base, forward, live, *args):
        if any(s.config.seed == configs[1].seed for s in live) and live[0].step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        real_step(base, forward, live, *args)

    monkeypatch.setattr(training, "_batch_step", step_without_room_for_fit_1)
    with pytest.warns(RuntimeWarning, match="ran out of memory"):
        results = fit_many(IMAGES[:2], configs[:2], base=tiny_base, progress=False)
    assert isinstance(results[1], torch.OutOfMemoryError)
    _assert_same_fit(results[0], alone[0])
    assert not any("lora" in name for name, _ in tiny_base.unet.named_parameters())  # the UNet as it was
