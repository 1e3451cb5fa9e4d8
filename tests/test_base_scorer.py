"""Issue 29: a scorer made of the base model itself (`--scorer base`): its UNet as a zero-shot classifier over the
base's preview vocabulary, for any SDXL with no extra weights (on `toy`: tests/test_quality.py); and a user's
own scorer from local weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.quality.base_scorer import BaseModelScorer
from pipeline.quality.scoring import load_scorer
from pipeline.run.spec import Gate, JobSpec, Previews, RunState, Tracking
from toyworld import world
from unziplora import load_fit
from unziplora.models import build_preset


def toy_image(shape: str, style: str, seed: int = 0) -> Image.Image:
    rendered, _ = world.render(world.sample_factors(np.random.default_rng(seed), shape, style))
    return world.to_pil(world.to_tensor(rendered))


def test_the_base_scorer_on_sdxls_architecture(tiny_base):
    """On `tiny` (SDXL's layout, random weights): any source size, batches that do not change the errors, the
    scores it can give, and a spec that is only checked until the base model is there."""
    assert load_scorer("base") is None  # a job's driver checks the spec before any model loads
    scorer = load_scorer("base", tiny_base)
    assert isinstance(scorer, BaseModelScorer) and scorer.name == "base-unet"
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 72, 3), dtype=np.uint8))
    one = BaseModelScorer(tiny_base, batch_size=1)._errors(wide)
    assert one.shape == (len(tiny_base.preview_subjects) + len(tiny_base.preview_styles),)
    assert np.allclose(one, scorer._errors(wide), rtol=1e-4, atol=1e-6)
    # SDXL on a GPU runs in half precision: the same errors, within its rounding
    half = BaseModelScorer(build_preset("tiny", dtype=torch.bfloat16))._errors(wide)
    assert half.dtype == np.float32 and np.allclose(half, one, rtol=5e-2)
    scores = scorer.score(wide, [wide.convert("L")], [wide, wide])
    assert set(scores) == {"content", "content_style_leak", "style", "style_shape_leak"}
    assert scores["content"] == 1.0 and scores["style"] == 1.0  # the same picture reads the same
    assert set(scorer.score(wide, [], [wide])) == {"style", "style_shape_leak"}


def test_the_soft_base_scorer_counts_panels_by_probability(tiny_base):
    """soft=True: each panel counts by the probability of the source's subject (style) under a softmax of the
    standardised errors; the same errors as the hard scorer's, whose choice is that softmax's most likely."""
    hard, soft = BaseModelScorer(tiny_base), BaseModelScorer(tiny_base, soft=True)
    assert soft.name == "base-unet-soft" != hard.name  # cached and reported apart
    images = [toy_image("star", "dotted"), toy_image("heart", "flat", seed=1)]
    soft_subjects, soft_styles = soft.classify(images)
    hard_subjects, hard_styles = hard.classify(images)
    assert np.allclose(soft_subjects.sum(1), 1) and np.allclose(soft_styles.sum(1), 1)
    assert ((0 < soft_subjects) & (soft_subjects < 1)).all()  # spread, not one-hot
    assert set(np.unique(hard_subjects)) == {0.0, 1.0} and (hard_subjects.sum(1) == 1).all()
    assert (soft_subjects.argmax(1) == hard_subjects.argmax(1)).all() and (
        soft_styles.argmax(1) == hard_styles.argmax(1)).all()
    scores = soft.score(images[0], [images[1]], [images[0]])
    # a panel that is the source counts by the source's own most likely subject and style, not by 1
    assert scores["style_shape_leak"] == pytest.approx(soft_subjects[0].max())
    assert scores["style"] == pytest.approx(soft_styles[0].max())
    assert scores["content"] == pytest.approx(soft_subjects[1, soft_subjects[0].argmax()])
    assert scores["content_style_leak"] == pytest.approx(soft_styles[1, soft_styles[0].argmax()])


def test_fit_candidates_chosen_by_the_base_scorer(tmp_path, capsys):
    """`unziplora fit --candidates 2 --scorer base`: the gate made of the base model, on SDXL's layout."""
    from unziplora.cli import main

    image = tmp_path / "a.png"
    toy_image("star", "dotted").save(image)
    assert main(["fit", str(image), "--out", str(tmp_path / "fit"), "--candidates", "2", "--scorer", "base",
                 "--content", "sks star", "--style", "dotted", "--base-model", "tiny", "--steps", "3", "--rank",
                 "4", "--recalibrations", "1", "--gate-steps", "1", "--quiet", "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(summary["candidates"]) == {"0", "1"}
    assert load_fit(tmp_path / "fit").record["gate"]["scorer"] == "base-unet"


def test_a_jobs_workers_make_the_base_scorer_of_their_own_base_model(tmp_path):
    from pipeline.run.worker import FitWorker

    job = JobSpec(input=str(tmp_path), output=str(tmp_path / "lib"), fit={"base_model": "tiny"},
                  tracking=Tracking(enabled=False), previews=Previews(steps=1, scorer="base"), gate=Gate(candidates=2),
                  state=RunState(run_id="run-base"))
    worker = FitWorker(job, device="cpu")
    assert isinstance(worker.scorer, BaseModelScorer) and worker.scorer.base is worker.base


def test_a_users_own_scorer_from_local_weights(tmp_path, monkeypatch):
    """examples/dino_scorer.py, the documented way to plug in your own scorer, on a tiny random DINOv2 saved
    as a local checkpoint (offline, as a user's would be)."""
    from transformers import Dinov2Config, Dinov2Model

    from pipeline.quality.scoring import checked
    from unziplora.errors import InputError

    spec = "examples.dino_scorer:scorer"
    monkeypatch.delenv("DINO_SCORER_DIR", raising=False)
    with pytest.raises(InputError, match="DINO_SCORER_DIR"):
        load_scorer(spec)
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(tmp_path / "dinov2-tiny")
    monkeypatch.setenv("DINO_SCORER_DIR", str(tmp_path / "dinov2-tiny"))
    scorer = load_scorer(spec)
    assert scorer.name == "dino-dinov2-tiny"
    source, other = toy_image("star", "dotted"), toy_image("heart", "flat", seed=3)
    same = checked(scorer.score(source, [source], [source]))
    assert same == pytest.approx({"content": 1.0, "content_style_leak": 1.0, "style": 1.0, "style_shape_leak": 1.0})
    apart = scorer.score(source, [other], [other])
    assert apart["content"] < 0.999 and apart["style"] < 0.999
