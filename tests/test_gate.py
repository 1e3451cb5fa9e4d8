"""Issue 29: quality control. Several candidate fits of each image, each scored on the gate's own panels, the
best kept; more candidates while the best is below the bar; the choice recorded in fit.json, the row, MLflow."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.store import layout
from pipeline.quality.gate import GATE_IMAGES, GATE_PANELS, GATE_SEED, GateError, fit_gated, split_score
from pipeline.run.identify import identify
from pipeline.run.job import run_job
from pipeline.quality.previews import SEED as PREVIEW_SEED, preview_prompts
from pipeline.run.spec import Gate, JobSpec, Previews, RunState, Tracking
from toyworld import world
from unziplora import FitConfig, load_fit
from unziplora.errors import InputError
from unziplora.fit_files import CARD, FILES, PREVIEW_PROMPTS, RECORD, SCORES


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def toy_png(shape: str, style: str, seed: int = 0) -> bytes:
    rendered, _ = world.render(world.sample_factors(np.random.default_rng(seed), shape, style))
    return png(world.to_pil(world.to_tensor(rendered)))


class QueueScorer:
    """Gives the split scores it is handed, one per candidate, in the order they are judged."""

    name = "queue"

    def __init__(self, splits):
        self.splits, self.calls = list(splits), []

    def score(self, source, content, style):
        self.calls.append((len(content), len(style)))
        s = self.splits.pop(0)
        if s is None:
            raise RuntimeError("scorer down")
        return {"content": s, "style": s}


def test_split_score_and_the_gates_settings():
    assert split_score({"content": 1.0, "style": 0.5, "content_style_leak": 0.5, "style_shape_leak": 0.0}) == 0.75
    assert split_score({"content": 0.2}) == pytest.approx(0.2) and split_score({}) is None
    assert not Gate().active and Gate(candidates=3).active and Gate(max_candidates=2).active
    assert Gate().identity() == {} and Gate(3, 5, 0.8).identity() == {"gate": {"candidates": 3, "max_candidates": 5,
                                                                              "min_split_score": 0.8}}
    assert Gate(3, select_after=0.25).identity()["gate"]["select_after"] == 0.25  # another choice, another fit
    assert Gate(3, images_per_prompt=4).identity()["gate"]["images_per_prompt"] == 4
    assert Gate(3, images_per_prompt=GATE_IMAGES).identity() == Gate(3).identity()  # a job's default: ids kept
    assert GATE_SEED != PREVIEW_SEED  # the gate never judges on the panels users see (or the benchmark draws)
    for bad, message in [(dict(candidates=0), "--candidates"), (dict(candidates=2.5), "--candidates"),
                         (dict(max_candidates=-1), "--max-candidates"), (dict(min_split_score=1.5), "score in"),
                         (dict(candidates=3, max_candidates=2), "below --candidates"),
                         (dict(select_after=0), "--select-after"), (dict(select_after=1.5), "--select-after"),
                         (dict(images_per_prompt=0), "--gate-images"), (dict(images_per_prompt=1.5), "--gate-images")]:
        with pytest.raises(InputError, match=message):
            JobSpec(input="in", output="out", gate=Gate(**bad)).check()


def test_a_gated_item_has_its_own_id_and_an_ungated_one_keeps_its_id(tmp_path):
    (tmp_path / "a.png").write_bytes(toy_png("star", "dotted"))
    item = {"source_uri": str(tmp_path / "a.png"), "content": "sks star", "style": "dotted"}
    plain = JobSpec(input=str(tmp_path), output=str(tmp_path / "lib"), fit={"steps": 3})
    ids = {identify(item, plain)[0]["item_id"], identify(item, plain.replace(gate={"candidates": 1}))[0]["item_id"]}
    assert len(ids) == 1  # --candidates 1 is no gate: the library's ids stay
    gated = identify(item, JobSpec(**plain.to_dict() | {"gate": {"candidates": 3}}))[0]["item_id"]  # as Ray ships it
    stricter = identify(item, plain.replace(gate={"candidates": 3, "min_split_score": 0.9}))[0]["item_id"]
    assert len(ids | {gated, stricter}) == 3


def test_a_job_with_candidates_and_no_scorer_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(toy_png("star", "dotted"))
    for previews in (Previews(scorer="none"), Previews(steps=0)):
        job = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "lib"), fit={"steps": 3},
                      tracking=Tracking(enabled=False), previews=previews, gate=Gate(candidates=2))
        with pytest.raises(InputError, match="needs a scorer"):
            run_job(job, progress=False)
    assert not (tmp_path / "lib").exists()


FAST = dict(base_model="tiny", steps=3, rank=4, recalibrations=1)


def test_the_best_candidate_is_kept_and_more_are_fitted_below_the_bar(tiny_base, tmp_path):
    images = [toy_png("star", "dotted"), toy_png("heart", "flat", seed=1)]
    configs = [FitConfig(content="sks star", style="dotted", seed=10, **FAST),
               FitConfig(content="sks heart", style="flat", seed=20, **FAST)]
    # round 1 (2 each): image 0 gets 0.2, 0.6 (below 0.7: 2 more), image 1 gets 0.9 and an unscorable one;
    # round 2: image 0 gets 0.5 and 0.55, and stops at 4 (the limit) without passing
    scorer = QueueScorer([0.2, 0.6, 0.9, None, 0.5, 0.55])
    out = [tmp_path / "fit-0", tmp_path / "fit-1"]
    results = fit_gated(images, configs, base=tiny_base, gate=Gate(2, 4, 0.7), scorer=scorer, out_dirs=out,
                        workdir=tmp_path / "work", steps=1)
    # every candidate judged on the same panels: GATE_IMAGES per prompt, up to GATE_PANELS prompts per LoRA
    assert scorer.splits == [] and len(set(scorer.calls)) == 1 and scorer.calls[0][0] % GATE_IMAGES == 0
    assert 0 < scorer.calls[0][0] <= GATE_PANELS * GATE_IMAGES
    first, second = results
    assert first.out_dir == out[0] and first.config.seed == 11  # the 0.6 one: seed 10 + 1
    gate = load_fit(out[0]).record["gate"]
    assert [c["seed"] for c in gate["candidates"]] == [10, 11, 12, 13]
    assert [c["split_score"] for c in gate["candidates"]] == [0.2, 0.6, 0.5, 0.55]
    assert gate["chosen_seed"] == 11 and gate["split_score"] == 0.6 and gate["passed"] is False
    assert gate["scorer"] == "queue" and gate["min_split_score"] == 0.7
    assert load_fit(out[0]).config.seed == 11  # the kept files are that candidate's
    gate = load_fit(out[1]).record["gate"]
    assert gate["passed"] is True and gate["chosen_seed"] == 20
    assert [c.get("split_score") for c in gate["candidates"]] == [0.9, None]
    assert "not scored: scorer down" in gate["candidates"][1]["error"]
    assert second.record["gate"] == gate


def test_the_staged_gate_scores_candidates_mid_training_and_trains_only_the_best_on(tiny_base, tmp_path):
    """--select-after 0.5: candidates scored after 2 of their 3 steps, each image's best trained on and scored
    again finished; the bar is judged on finished fits only (image 0 gets a second pass)."""
    images = [toy_png("star", "dotted"), toy_png("heart", "flat", seed=1)]
    configs = [FitConfig(content="sks star", style="dotted", seed=10, **FAST),
               FitConfig(content="sks heart", style="flat", seed=20, **FAST)]
    # pass 1 mid-way: 10, 11 | 20 (unscorable), 21; finished: 11 (below the bar), 21; pass 2: 12, 13; finished: 12
    scorer = QueueScorer([0.3, 0.8, None, 0.6, 0.5, 0.75, 0.9, 0.1, 0.8])
    out = [tmp_path / "fit-0", tmp_path / "fit-1"]
    first, second = fit_gated(images, configs, base=tiny_base, gate=Gate(2, 4, 0.7, select_after=0.5),
                              scorer=scorer, out_dirs=out, workdir=tmp_path / "work", steps=1)
    assert scorer.splits == []
    gate = load_fit(out[0]).record["gate"]
    assert [(c["seed"], c.get("split_score"), c.get("early_split_score"), c.get("stopped_at_step"),
             c.get("selected_at_step")) for c in gate["candidates"]] == [
        (10, None, 0.3, 2, None), (11, 0.5, 0.8, None, 2), (12, 0.8, 0.9, None, 2), (13, None, 0.1, 2, None)]
    assert gate["chosen_seed"] == 12 == first.config.seed and gate["passed"] is True
    assert load_fit(out[0]).record["timings"]["batch_size"] == 2  # trained with its mate to the selection
    gate = load_fit(out[1]).record["gate"]
    assert gate["chosen_seed"] == 21 == second.config.seed and gate["split_score"] == 0.75
    assert "scorer down" in gate["candidates"][0]["early_error"] and gate["candidates"][0]["stopped_at_step"] == 2
    work = tmp_path / "work"  # a stopped candidate writes nothing; a finished one not kept stays in the workdir
    assert sorted(p.name for p in work.iterdir()) == ["0-seed-11"]


def test_the_gate_draws_as_many_images_per_prompt_as_asked(tiny_base, tmp_path):
    config = FitConfig(content="sks star", style="dotted", seed=10, **FAST)
    scorer = QueueScorer([0.4, 0.6])
    fit_gated([toy_png("star", "dotted")], [config], base=tiny_base, gate=Gate(2, images_per_prompt=3),
              scorer=scorer, out_dirs=[tmp_path / "fit"], workdir=tmp_path / "work", steps=1)
    prompts = preview_prompts(config, tiny_base.preview_subjects, tiny_base.preview_styles, panels=GATE_PANELS)
    assert prompts["content"] and prompts["style"]
    assert scorer.calls == [(3 * len(prompts["content"]), 3 * len(prompts["style"]))] * 2
    assert load_fit(tmp_path / "fit").record["gate"]["images_per_prompt"] == 3


def test_an_image_whose_candidates_cannot_be_scored_fails_rather_than_keep_an_unscored_fit(tiny_base, tmp_path):
    config = FitConfig(content="sks star", style="dotted", **FAST)
    [result] = fit_gated([toy_png("star", "dotted")], [config], base=tiny_base, gate=Gate(2), out_dirs=[tmp_path / "fit"],
                         scorer=QueueScorer([None, None]), workdir=tmp_path / "work", steps=1)
    assert isinstance(result, GateError) and "none of its 2 candidate fits could be scored" in str(result)
    assert not (tmp_path / "fit").exists()
    [failed] = fit_gated([b"not an image"], [config], base=tiny_base, gate=Gate(2), out_dirs=[tmp_path / "x"],
                         scorer=QueueScorer([]), workdir=tmp_path / "work2", steps=1)
    assert isinstance(failed, Exception) and "none of its" not in str(failed)  # the fit's own error


def test_candidates_an_earlier_attempt_scored_are_taken_up_and_its_best_fitted_again(tiny_base, tmp_path):
    """A run after a crash: the candidates the dead attempt had scored count as tried; the best of them is fitted
    and judged again (its files died with it), beside the next candidates, never kept on its stored score."""
    earlier = [{"seed": 10, "split_score": 0.2, "scores": {}}, {"seed": 11, "split_score": 0.6, "scores": {}}]
    noted = []
    scorer = QueueScorer([0.58, 0.5, 0.55])  # seed 11 again, then 12 and 13
    [result] = fit_gated([toy_png("star", "dotted")], [FitConfig(content="sks star", style="dotted", seed=10, **FAST)],
                         base=tiny_base, gate=Gate(2, 4, 0.7), scorer=scorer, out_dirs=[tmp_path / "fit"],
                         workdir=tmp_path / "work", steps=1, earlier=[earlier],
                         on_pass=lambda i, tried: noted.append(tried))
    assert scorer.splits == [] and noted == []  # one pass; the limit (4) reached: nothing more to note
    gate = load_fit(tmp_path / "fit").record["gate"]
    assert [(c["seed"], c["split_score"], c.get("earlier_run", False)) for c in gate["candidates"]] == [
        (10, 0.2, True), (11, 0.58, False), (12, 0.5, False), (13, 0.55, False)]
    assert gate["chosen_seed"] == 11 == result.config.seed and gate["split_score"] == 0.58  # its new score


def test_the_gate_notes_a_pass_only_when_another_follows(tiny_base, tmp_path):
    noted = []
    fit_gated([toy_png("star", "dotted"), toy_png("heart", "flat", seed=1)],
              [FitConfig(content="sks star", style="dotted", **FAST), FitConfig(content="sks heart", style="flat", **FAST)],
              base=tiny_base, gate=Gate(1, 2, 0.7), scorer=QueueScorer([0.3, 0.9, 0.4]), workdir=tmp_path / "work",
              out_dirs=[tmp_path / "a", tmp_path / "b"], steps=1, on_pass=lambda i, tried: noted.append((i, tried)))
    assert [(i, [t["split_score"] for t in tried]) for i, tried in noted] == [(0, [0.3])]


class Died(BaseException):
    """A worker process dying (os._exit) inside a test: nothing of the worker's own clean-up runs."""


def test_a_job_killed_between_passes_of_candidates_resumes_without_fitting_them_again(tmp_path, monkeypatch):
    import os

    import pipeline.quality.gate as gate_module
    from pipeline.run.source import read_inputs
    from pipeline.run.spec import Faults
    from pipeline.run.worker import FitWorker

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(toy_png("star", "dotted", seed=3))
    job = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "lib"), default_content="sks star",
                  default_style="dotted", fit=FAST, tracking=Tracking(enabled=False), previews=Previews(steps=1),
                  gate=Gate(candidates=2, max_candidates=4, min_split_score=0.7), state=RunState(run_id="run-1"),
                  faults=Faults(crash_between_candidates_on=["a.png"]))
    [item] = read_inputs(job.input, default_content="sks star", default_style="dotted").items
    fitted = []
    fit_many = gate_module.fit_many
    monkeypatch.setattr(gate_module, "fit_many", lambda images, configs, **kw: (
        fitted.append([c.seed for c in configs]), fit_many(images, configs, **kw))[1])

    def die(code):
        raise Died(code)

    monkeypatch.setattr(os, "_exit", die)
    first = FitWorker(job, device="cpu")
    first.scorer = QueueScorer([0.2, 0.6])
    with pytest.raises(Died):  # after the first pass, its scores noted, before the second
        first.process(item)
    [record] = (tmp_path / "lib" / layout.ATTEMPTS).glob("*/*.json")
    assert [c["seed"] for c in json.loads(record.read_text())["candidates"]] == [0, 1]

    second = FitWorker(job.replace(state={"run_id": "run-2"}), device="cpu")
    second.scorer = QueueScorer([0.61, 0.5, 0.8, 0.5])  # seed 1 again, seeds 2 and 3; then the previews' scores
    row = second.process(item)
    assert row["status"] == "ok", row.get("error")
    assert fitted == [[0, 1], [1, 2, 3]]  # seed 0 is not fitted again: it could not win
    tried = json.loads(row["candidate_scores"])
    assert [(t["seed"], t["split_score"]) for t in tried] == [(0, 0.2), (1, 0.61), (2, 0.5), (3, 0.8)]
    assert row["seed"] == 3 and row["split_score"] == 0.8 and row["gate_passed"] is True
    assert not list((tmp_path / "lib" / layout.ATTEMPTS).glob("*/*"))  # complete: the records went


@pytest.mark.parametrize("select_after", [1.0, 0.5])
def test_a_job_through_the_gate_records_every_candidate(tmp_path, select_after):
    """The worker path on `toy` with its judges: the row, the marker and fit.json say what was tried (with
    --select-after 0.5: one candidate scored after 3 of its 6 steps and stopped)."""
    from pipeline.run.source import read_inputs
    from pipeline.run.worker import FitWorker

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(toy_png("star", "dotted", seed=3))
    job = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "lib"), default_content="sks star",
                  default_style="dotted", fit={"base_model": "toy", "steps": 6, "rank": 4, "recalibrations": 2},
                  tracking=Tracking(enabled=False), previews=Previews(steps=1),
                  gate=Gate(candidates=2, select_after=select_after, images_per_prompt=1),
                  state=RunState(run_id="run-gate"))
    worker = FitWorker(job, device="cpu")
    row = worker.process(read_inputs(job.input, default_content="sks star", default_style="dotted").items[0])
    assert row["status"] == "ok", row.get("error")
    tried = json.loads(row["candidate_scores"])
    assert row["candidates"] == 2 == len(tried) and [t["seed"] for t in tried] == [0, 1]
    finished = [t for t in tried if "split_score" in t]
    best = max(t["split_score"] for t in finished)
    assert row["split_score"] == best and row["gate_passed"] is True  # no bar: the best passes
    assert set(finished[0]["scores"]) == {"content", "style", "content_style_leak", "style_shape_leak"}
    stopped = [t for t in tried if "stopped_at_step" in t]
    assert len(finished) == 2 - len(stopped) and len(stopped) == (select_after < 1)
    if stopped:
        assert stopped[0]["stopped_at_step"] == 3 and set(stopped[0]["early_scores"]) == set(finished[0]["scores"])
        assert finished[0]["selected_at_step"] == 3 and finished[0]["early_split_score"] >= stopped[0]["early_split_score"]
    marker = json.loads((tmp_path / "lib" / layout.ITEMS / row["item_id"] / layout.MARKER).read_text())
    assert marker["candidate_scores"] == row["candidate_scores"] and marker["seed"] in (0, 1)
    fit_record = json.loads((tmp_path / "lib" / layout.ITEMS / row["item_id"] / RECORD).read_text())
    assert fit_record["gate"]["chosen_seed"] == marker["seed"] == fit_record["settings"]["seed"]
    assert fit_record["gate"]["images_per_prompt"] == 1  # the job's --gate-images reached the gate
    card = (tmp_path / "lib" / layout.ITEMS / row["item_id"] / CARD).read_text()
    assert "Quality gate (toy-judges, on panels of its own): 2 candidate fits" in card
    assert ("1 of them scored after 3 steps and not trained on" in card) == bool(stopped)
    assert f"kept seed {marker['seed']}" in card
    # the stored previews are still the users' (preview seed), besides the gate's choice
    assert json.loads((tmp_path / "lib" / layout.ITEMS / row["item_id"] / PREVIEW_PROMPTS).read_text())["seed"] == PREVIEW_SEED


def test_fit_with_candidates_on_one_image(tmp_path, capsys):
    """`unziplora fit --candidates 2`: both seeds fitted, the better split kept in --out, the summary says so."""
    from unziplora.cli import main

    image = tmp_path / "a.png"
    image.write_bytes(toy_png("star", "dotted"))
    flags = ["--content", "sks star", "--style", "dotted", "--base-model", "tiny", "--steps", "3", "--rank", "4",
             "--recalibrations", "1", "--gate-steps", "1", "--quiet", "--threads", "1"]
    assert main(["fit", str(image), "--out", str(tmp_path / "none"), "--candidates", "2", "--scorer", "none",
                 *flags]) == 2
    assert "needs a scorer" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert main(["fit", str(image), "--out", str(tmp_path / "fit"), "--candidates", "2", "--seed", "5",
                 "--scorer", "tiny:0", "--gate-images", "1", *flags]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(summary["candidates"]) == {"5", "6"} and summary["seed"] in (5, 6)
    assert summary["split_score"] == max(summary["candidates"].values()) and summary["gate_passed"] is True
    kept = load_fit(tmp_path / "fit")
    assert kept.record["gate"]["images_per_prompt"] == 1
    assert main(["fit", str(image), "--out", str(tmp_path / "staged"), "--candidates", "2", "--select-after", "0.5",
                 "--scorer", "tiny:0", *flags]) == 0
    staged = json.loads(capsys.readouterr().out.splitlines()[-1])["candidates"]
    assert sorted(map(type, staged.values()), key=str) == [dict, float]  # one stopped after step 2, one finished
    assert next(v for v in staged.values() if isinstance(v, dict))["stopped_at_step"] == 2
    assert kept.config.seed == summary["seed"] and kept.record["gate"]["scorer"] == "tiny-style-0"


def test_the_bank_filters_on_the_gate(tmp_path):
    from pipeline.bank import Bank
    from pipeline.store.manifest import empty_row, write_manifest
    from pipeline.store.storage import Store

    gates = {"passed": (0.9, True), "never-passed": (0.4, False), "ungated": (None, None)}
    rows = [empty_row(f"/in/{name}.png") | {"item_id": f"{n:024x}", "status": "ok", "content": "sks dog",
                                           "style": name, "split_score": split, "gate_passed": passed}
            for n, (name, (split, passed)) in enumerate(gates.items())]
    write_manifest(Store(str(tmp_path / "lib")), rows, "run-1")
    bank = Bank(str(tmp_path / "lib"))

    def styles(**filters):
        return sorted(bank.rows["style"].filter(bank.mask(**filters)).to_pylist())

    assert styles() == ["never-passed", "passed", "ungated"]
    assert styles(skip_gate_failures=True) == ["passed", "ungated"]
    assert styles(min_split_score=0.5) == ["passed"]


def test_rescore_redraws_previews_and_scores_without_fitting(tmp_path, capsys):
    """`unziplora rescore`: an unscored library gets today's previews and scores; its LoRA files stay, its
    markers and manifest vouch for the new files; an item whose LoRA is gone is named, not rescored."""
    from jobs.cli import main
    from pipeline.run.executors import manifest_row
    from pipeline.store.manifest import marker_problems, read_manifest, write_manifest
    from pipeline.run.source import read_inputs
    from pipeline.store.storage import Store
    from pipeline.run.worker import FitWorker

    (tmp_path / "in").mkdir()
    for name, (shape, style) in {"a": ("star", "dotted"), "b": ("heart", "flat")}.items():
        (tmp_path / "in" / f"{name}.png").write_bytes(toy_png(shape, style, seed=4))
    job = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "lib"), default_content="sks shape",
                  default_style="zwx", fit={"base_model": "toy", "steps": 4, "rank": 4, "recalibrations": 1},
                  tracking=Tracking(enabled=False), previews=Previews(steps=1, scorer="none"),
                  state=RunState(run_id="run-1"))
    worker = FitWorker(job, device="cpu")
    rows = [manifest_row(worker.process(item)) for item in
            read_inputs(job.input, default_content="sks shape", default_style="zwx").items]
    progress = capsys.readouterr().err  # each fit's sign of life in the job's output, a line per tenth of it
    assert f"fit {tmp_path / 'in' / 'a.png'}: step 4/4 (" in progress and "s/step)" in progress
    store = Store(job.output)
    write_manifest(store, rows, "run-1")
    assert all(r["status"] == "ok" and r["score_style"] is None for r in rows)
    loras = {r["item_id"]: store.read_bytes(layout.ITEMS, r["item_id"], FILES["style"]) for r in rows}
    broken = rows[1]["item_id"]
    store.fs.rm(store.path(layout.ITEMS, broken, FILES["content"]))

    assert main(["rescore", job.output, "--scorer", "toy", "--preview-steps", "2", "--quiet"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["rescored"] == 1 and report["scorer"] == "toy-judges"
    assert len(report["failed"]) == 1 and broken in report["failed"][0] and "missing" in report["failed"][0]
    after = {r["item_id"]: r for r in read_manifest(job.output).to_pylist()}
    good = rows[0]["item_id"]
    assert 0 <= after[good]["score_style"] <= 1 and after[good]["score_content_style_leak"] is not None
    assert after[broken]["score_style"] is None  # left as it was
    assert json.loads(store.read_bytes(layout.ITEMS, good, PREVIEW_PROMPTS))["steps"] == 2
    marker = store.read_json(layout.ITEMS, good, layout.MARKER)
    assert marker["score_style"] == after[good]["score_style"] and not marker_problems(store, {good: marker})
    assert store.read_bytes(layout.ITEMS, good, FILES["style"]) == loras[good]  # never refitted
    assert store.read_json(layout.ITEMS, good, SCORES)["scorer"] == "toy-judges"


def test_the_report_counts_what_the_gate_did():
    """Passed, refitted (more candidates than the first round), never passed: in the report and its last lines."""
    from jobs.decompose import next_steps
    from pipeline.run.job import summarize

    job = JobSpec(input="in", output="lib", tracking=Tracking(enabled=False),
                  gate=Gate(candidates=2, max_candidates=4, min_split_score=0.6), state=RunState(run_id="r"))
    base = {"status": "ok", "run_id": "r", "total_s": 1.0, "attempts": 1, "source_uri": "x"}
    rows = [base | {"candidates": 2, "gate_passed": True}, base | {"candidates": 4, "gate_passed": True},
            base | {"candidates": 4, "gate_passed": False}, base | {"status": "failed", "error": "bad image"}]
    report = summarize(job, rows, wall_s=10.0, parts=[])
    assert report["gate"] == {"passed": 2, "never_passed": 1, "refitted": 2, "candidates_fitted": 10}
    text = next_steps(report | {"skipped": 0, "already_complete": 0, "tracking": {}})
    assert "quality gate: 2 passed, 2 needed more candidates, 1 never passed" in text
    assert "gate" not in summarize(JobSpec(input="in", output="lib", tracking=Tracking(enabled=False),
                                           state=RunState(run_id="r")), rows, 10.0, [])
    staged = [base | {"candidates": 2, "gate_passed": True, "candidate_scores": json.dumps(
        [{"seed": 0, "stopped_at_step": 300, "early_split_score": 0.4}, {"seed": 1, "split_score": 0.7}])}]
    report = summarize(job.replace(gate={"candidates": 2, "select_after": 0.5}), staged, wall_s=10.0, parts=[])
    assert report["gate"]["stopped_early"] == 1
    assert "(1 stopped at the early choice" in next_steps(report | {"skipped": 0, "already_complete": 0, "tracking": {}})
