"""Issue 16: previews that show the split (each LoRA away from its source), quality scores from them, and the
column-pick option of the recalibration."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.run.identify import hashed_settings, identify
from pipeline.run.job import run_job
from pipeline.quality.previews import preview_prompts, write_previews
from pipeline.quality.scoring import EmbeddingScorer, load_scorer, scorer_spec
from pipeline.run.spec import JobSpec, Previews, Tracking
from toyworld import world
from unziplora import FitConfig, fit
from unziplora.errors import InputError
from unziplora.fit_files import CARD, PREVIEWS, PREVIEW_PROMPTS, SCORES
from unziplora.importance import recalibrate
from unziplora.layers import UnZipLoRA
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


def test_fresh_column_picks_add_new_columns_each_time(tiny_base, unet_inputs, make_states):
    """'cumulative' (the paper's OR) may re-pick held columns; 'fresh' adds exactly k new ones per pick, so the
    masks reach recalibrations x ratio of the columns, and shared blocks stay disjoint."""
    from test_importance import RATIO, unmasked_backward

    with UnZipLoRA(tiny_base.unet, rank=4) as adapter:
        masks = adapter.gates.masks
        for round_ in range(1, 4):
            unmasked_backward(tiny_base, adapter, unet_inputs, make_states, seed=round_)
            recalibrate(adapter, RATIO, fresh=True)
            for name, layer in adapter.named_layers():
                cols = masks[:, layer.columns()]
                k = int(RATIO * layer.out_features)
                for i, kind in enumerate(KINDS):
                    if layer.role.is_sparse(kind):
                        assert int(cols[i].sum()) == round_ * k, (name, kind, round_)
                if layer.role.exclusive:
                    assert (cols[0] * cols[1]).sum() == 0, name


def test_column_picks_in_item_ids(tmp_path):
    """The paper's 'cumulative' picks are what every fit did before the setting existed: at that value it is
    left out of the settings hash (a library made before is not fitted again); 'fresh' is another item."""
    (tmp_path / "a.png").write_bytes(b"identify only hashes it")
    item = {"source_uri": str(tmp_path / "a.png"), "content": "sks dog", "style": "ink", "overrides": "{}"}
    ids = [identify(item, JobSpec(input="", output="", fit=fit_settings))[0]
           for fit_settings in ({}, {"column_picks": "cumulative"}, {"column_picks": "fresh"})]
    assert ids[0]["item_id"] == ids[1]["item_id"] != ids[2]["item_id"]
    assert "column_picks" not in hashed_settings(FitConfig(content="a", style="b"))
    assert ids[2]["legacy_item_id"] is None  # no fit of an older library can have used it
    with pytest.raises(InputError, match="column_picks"):
        FitConfig(content="a", style="b", column_picks="sometimes")


def test_settings_added_later_keep_old_item_ids_at_their_old_value(tmp_path):
    """Every fit before these settings existed was a paper-recipe fit: at those values the settings are left
    out of the hash, so a library made before is not fitted again; any other value is another item."""
    assert not {"content_alone", "style_alone", "style_lr", "column_picks"} & set(
        hashed_settings(FitConfig(content="a", style="b")))
    (tmp_path / "a.png").write_bytes(b"identify only hashes it")
    item = {"source_uri": str(tmp_path / "a.png"), "content": "sks dog", "style": "ink", "overrides": "{}"}
    ids = [identify(item, JobSpec(input="", output="", fit=settings))[0]["item_id"] for settings in (
        {}, {"content_alone": 0.0, "style_alone": 0.0, "style_lr": None}, {"style_alone": 0.25}, {"style_lr": 1e-2})]
    assert ids[0] == ids[1] and len({ids[0], ids[2], ids[3]}) == 3
    with pytest.raises(InputError, match="style_alone"):
        FitConfig(content="a", style="b", style_alone=0.75)


def test_toy_judges_score_previews_against_the_source():
    scorer = load_scorer("toy")
    source = toy_image("star", "dotted")
    kept = [toy_image("star", s, seed=i) for i, s in enumerate(("flat", "striped", "outlined"))]
    carried = [toy_image(s, "dotted", seed=i) for i, s in enumerate(("circle", "square", "heart"))]
    assert scorer.score(source, kept, carried) == {"content": 1.0, "content_style_leak": 0.0, "style": 1.0,
                                                   "style_shape_leak": 0.0}
    # the reverse: a content LoRA that redraws the source style, a style LoRA that redraws the source shape
    leaked = scorer.score(source, carried, kept)
    assert leaked["content"] == 0.0 and leaked["content_style_leak"] == 1.0
    assert leaked["style"] == 0.0 and leaked["style_shape_leak"] == 1.0


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
