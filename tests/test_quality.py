"""Issue 16: previews that show the split (each LoRA away from its source) and quality scores from them; the
settings of that issue's experiments, retired since (issue 33)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.run.identify import check_job_settings, hashed_settings, identify, legacy_settings_sha256
from pipeline.run.job import run_job
from pipeline.quality.previews import preview_prompts, write_previews
from pipeline.quality.scoring import EmbeddingScorer, load_scorer, scorer_spec
from pipeline.run.spec import JobSpec, Previews, Tracking
from pipeline.store.storage import sha256_hex
from toyworld import world
from unziplora import FitConfig, fit
from unziplora.config import RETIRED
from unziplora.errors import InputError
from unziplora.fit_files import CARD, PREVIEWS, PREVIEW_PROMPTS, SCORES
from unziplora.roles import KINDS


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def toy_image(shape: str, style: str, seed: int = 0) -> Image.Image:
    rendered, _ = world.render(world.sample_factors(np.random.default_rng(seed), shape, style))
    return world.to_pil(world.to_tensor(rendered))


def test_preview_prompts_leave_out_the_sources_own_subject_and_style():
    config = FitConfig(content="sks star", style="dotted")
    prompts = preview_prompts(config, world.SHAPES.values(), world.STYLES.values())
    assert prompts["style"] == ["A circle in dotted style", "A square in dotted style", "A triangle in dotted style"]
    assert prompts["content"] == ["A sks star in flat style", "A sks star in striped style",
                                  "A sks star in outlined style"]
    few = preview_prompts(config.replace(class_word="House"), ["house", " ", "cat"], ["pencil sketch"], panels=5)
    assert few == {"style": ["A cat in dotted style"], "content": ["A sks star in pencil sketch style"]}


def test_retired_settings_keep_item_ids_and_are_refused_when_asked_for(tmp_path):
    """The experiments' settings taken out of the fit code (config.RETIRED): item ids are what the code that still
    had them gave (pinned below), so a library fitted then is not fitted again; at the value that did nothing they
    are dropped wherever they come from; any other value is refused by name, except in a fit's own record."""
    config = FitConfig(content="sks dog", style="watercolor painting", base_model="toy", steps=300)
    # computed at commit 69d22e6, before the settings were retired
    assert sha256_hex(json.dumps(hashed_settings(config), sort_keys=True).encode()) == \
        "42e8007e310344aeb8b16d98615c684ccb4f117bebe09457762b2514e84d7880"
    assert legacy_settings_sha256(config) == "e04f574d5cc215937ad5b6d2df0582bfa9fe2180726242bf1d7b1a012a2107c5"
    (tmp_path / "a.png").write_bytes(b"identify only hashes it")
    item = {"source_uri": str(tmp_path / "a.png"), "content": "sks dog", "style": "ink", "overrides": "{}"}
    ids = [identify(item, JobSpec(input="", output="", fit=fit))[0]["item_id"] for fit in ({}, dict(RETIRED))]
    assert ids[0] == ids[1]
    saved_yaml = tmp_path / "config.yaml"  # an older fit's settings file, given back as --config
    saved_yaml.write_text("content: sks dog\nstyle: ink\ncolumn_picks: cumulative\nstyle_lr: null\n")
    assert FitConfig.from_file(saved_yaml) == FitConfig(content="sks dog", style="ink")
    asked = {"content": "a", "style": "b", "style_alone": 0.25}
    asking_yaml = tmp_path / "asking.yaml"
    asking_yaml.write_text("content: a\nstyle: b\nstyle_alone: 0.25\n")
    for attempt in (lambda: FitConfig.from_dict(asked), lambda: check_job_settings({"style_alone": 0.25}),
                    lambda: FitConfig.from_file(asking_yaml)):
        with pytest.raises(InputError, match=r"style_alone \(0\.25\) was an experiment .* no longer a fit setting"):
            attempt()
    assert FitConfig.from_dict(asked, saved=True) == FitConfig(content="a", style="b")  # a fit made with it loads


@pytest.mark.parametrize("spec", ["toy", "base"])
def test_toy_scorers_score_previews_against_the_source(spec, toy_base):
    """The toy world's judges, and the scorer made of the `toy` base model alone (its UNet as a zero-shot
    classifier over its shapes and styles): kept, carried and leaked, both ways."""
    scorer = load_scorer(spec, toy_base)
    source = toy_image("star", "dotted")
    kept = [toy_image("star", s, seed=i) for i, s in enumerate(("flat", "striped", "outlined"))]
    carried = [toy_image(s, "dotted", seed=i) for i, s in enumerate(("circle", "square", "heart"))]
    assert scorer.score(source, kept, carried) == {"content": 1.0, "content_style_leak": 0.0, "style": 1.0,
                                                   "style_shape_leak": 0.0}
    # the reverse: a content LoRA that redraws the source style, a style LoRA that redraws the source shape
    leaked = scorer.score(source, carried, kept)
    assert leaked == {"content": 0.0, "content_style_leak": 1.0, "style": 0.0, "style_shape_leak": 1.0}


def test_embedding_and_custom_scorers(monkeypatch):
    scorer = load_scorer("tiny:0")
    assert isinstance(scorer, EmbeddingScorer) and scorer.name == "tiny-style-0"
    source = toy_image("star", "dotted")
    same = scorer.score(source, [source], [source, source])
    assert same["content"] == pytest.approx(1.0, abs=1e-5) and same["style"] == pytest.approx(1.0, abs=1e-5)
    other = scorer.score(source, [toy_image("heart", "flat", seed=3)], [])
    assert other["content"] < 0.999 and "style" not in other
    # a third-party factory returning a scorer is used as it is
    monkeypatch.setattr(world, "MyScorer", lambda: type("S", (), {"name": "mine", "score": lambda *a: {}})(),
                        raising=False)
    assert load_scorer("toyworld.world:MyScorer").name == "mine"
    for bad in ("no.such.module:thing", "toyworld.world:SHAPES", "nonsense"):
        with pytest.raises(InputError):
            load_scorer(bad)
    assert scorer_spec("auto", "toy") == "toyworld.judges:PreviewScorer" and scorer_spec("auto", "tiny") is None
    assert scorer_spec("none", "toy") is None and scorer_spec("clip:/m", "tiny") == "clip:/m"


def test_a_job_refuses_a_scorer_that_cannot_load(tmp_path):
    (tmp_path / "in").mkdir()
    job = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "lib"), fit={"steps": 3},
                  tracking=Tracking(enabled=False), previews=Previews(scorer="no_such_package.scorers:Clip"))
    with pytest.raises(InputError, match="no_such_package"):
        run_job(job, progress=False)
    assert not (tmp_path / "lib").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def toy_fit(tmp_path_factory, toy_base):
    base = toy_base
    folder = tmp_path_factory.mktemp("toy") / "fit"
    source = png(toy_image("star", "dotted", seed=7))
    config = FitConfig(content="sks star", style="dotted", base_model="toy", steps=6, rank=4, recalibrations=2)
    fit(io.BytesIO(source), config, base=base, out_dir=folder, progress=False)
    return base, folder, source


def test_toy_previews_show_each_lora_away_from_its_source(toy_fit):
    base, folder, source = toy_fit
    out = write_previews(base, folder, steps=2, scorer=load_scorer("toy"), source=source)
    assert set(out["files"]) == {PREVIEWS["content"], PREVIEWS["style"], PREVIEW_PROMPTS, SCORES}
    for kind in KINDS:  # a strip of three 32 px panels, stored 8x (256 px) so that one sees them
        shown = Image.open(folder / f"preview_{kind}.png")
        assert shown.size == (3 * 256, 256)
        panel = shown.crop((0, 0, 256, 256))  # each sampled pixel an 8x8 block: nothing made up
        assert panel.resize((32, 32), Image.NEAREST).resize((256, 256), Image.NEAREST).tobytes() == panel.tobytes()
    shown = json.loads((folder / PREVIEW_PROMPTS).read_text())["prompts"]
    assert shown["style"] == ["A circle in dotted style", "A square in dotted style", "A triangle in dotted style"]
    assert all("sks star" in p and "dotted" not in p for p in shown["content"])
    scores = json.loads((folder / SCORES).read_text())
    assert scores["scorer"] == "toy-judges" and set(scores["scores"]) == {
        "content", "style", "content_style_leak", "style_shape_leak"}
    assert out["scores"] == scores["scores"]
    assert all(min(abs(v - n / 3) for n in range(4)) < 1e-6 for v in out["scores"].values())  # 3 panels each
    card = (folder / CARD).read_text()
    assert "`A circle in dotted style`" in card and "Quality scores (toy-judges" in card
    assert "text: A sks star in flat style" in card  # the Hub widget shows the content preview's first prompt


def test_previews_with_own_subjects_and_styles(toy_fit):
    base, folder, _ = toy_fit
    write_previews(base, folder, steps=1, subjects=["heart"], styles=["flat", "dotted"])
    assert json.loads((folder / PREVIEW_PROMPTS).read_text())["prompts"] == {
        "content": ["A sks star in flat style"], "style": ["A heart in dotted style"]}
    assert Image.open(folder / PREVIEWS["style"]).size == (256, 256)


def test_routed_generation_takes_one_prompt(toy_fit):
    from unziplora import load_fit
    from unziplora.generate import generate

    base, folder, _ = toy_fit
    with pytest.raises(InputError, match="one prompt"):
        generate(base, content=load_fit(folder), style=load_fit(folder), prompt=["a", "b"], steps=1)
    assert len(generate(base, style=load_fit(folder), prompt=["A heart in dotted style"] * 2, steps=1)) == 2
