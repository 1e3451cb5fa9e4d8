"""Quality control: several candidate fits of one image, each scored on what its LoRAs do alone; the best is kept.

The fit seed alone moves a split from good to useless, so with `--candidates N` each image is fitted with N
seeds (the item's own seed, then the next ones), trained together in one multi-fit pass. Each candidate draws
the gate's own preview panels (its own sampling seed and prompts, never the benchmark's or the stored
previews') and the job's scorer (pipeline/quality/scoring.py) scores them. The split score is the mean of what the
scorer gives of: content kept by the content LoRA alone, style carried by the style LoRA alone, one minus
each leak. While an image's best is below `--min-split-score` and fewer than `--max-candidates` were tried,
N more are fitted. The best scored candidate becomes the item's fit; one that never passes is kept as the
best found and marked (`gate_passed` false). A candidate that could not be scored is never the item's fit.

With `--select-after F` (< 1) the gate is staged: an image's candidates train together for a fraction F of their
steps, each is scored as it stands then, and only the best trains on (unziplora.training.Selection); the others
stop there, their early scores kept. The kept one is scored again finished: the bar and the choice among passes
see finished fits only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from unziplora import FitArtifacts, FitConfig, fit_files, fit_many, load_fit
from unziplora.errors import InputError, NotChosen, UnZipLoRAError, first_line
from unziplora.generate import generate_each
from unziplora.training import Selection, pause_step

from .previews import preview_prompts
from .scoring import checked
from ..run.spec import Gate

GATE_SEED = 1_000_003  # the gate's sampling seed: previews draw with 0, the benchmark with 0 too
GATE_PANELS = 6  # subjects (styles) each candidate is judged on, at most
GATE_IMAGES = Gate().images_per_prompt  # a job's default (--gate-images); at 1, one bad sample moved a score a lot
LEAKS = ("content_style_leak", "style_shape_leak")


def split_score(scores: dict) -> float | None:
    """The mean of content, style and one minus each leak, of those the scorer gives (None: none)."""
    parts = [scores[k] for k in ("content", "style") if k in scores] + [1 - scores[k] for k in LEAKS if k in scores]
    return float(np.mean(parts)) if parts else None


def fit_gated(images: list[bytes], configs: list[FitConfig], *, base, gate: Gate, scorer, out_dirs: list[Path],
              workdir: Path, steps: int, subjects=None, styles=None, formats=None, progress: bool = False,
              earlier: list[list[dict]] | None = None, on_pass=None) -> list:
    """Per image, the chosen candidate's FitResult (its files in `out_dirs[i]`, its fit.json's "gate" saying what
    was tried) or the exception that failed every candidate. Candidates are fitted in `workdir`.

    Resuming: `earlier[i]` are the candidates an attempt that never came back had scored (as `on_pass` was given
    them). They count as tried, and their files died with that attempt, so the best scored one is fitted again
    (beside the next candidates, in the same pass) and judged again: no stored score is ever the kept fit's.
    `on_pass(i, tried)`: called after a pass with image i's candidates so far, when it needs another pass."""
    if scorer is None:
        raise InputError("--candidates needs a scorer (--scorer) to choose among them")
    # per image: {"seed", "split_score", "scores"} or {"seed", "error"}; "earlier_run" where its files are gone
    tried: list[list[dict]] = [[c | {"earlier_run": True} for c in e] for e in earlier] if earlier else \
        [[] for _ in images]
    again = {i: best["seed"] for i, best in enumerate(map(_best, tried)) if best is not None}
    results: dict[tuple[int, int], object] = {}
    while True:
        wanted = [(i, again.pop(i)) for i in sorted(again)] + [
            (i, configs[i].seed + len(tried[i]) + j) for i in range(len(images)) for j in range(_more(gate, tried[i]))]
        if not wanted:
            break
        dirs = [workdir / f"{i}-seed-{seed}" for i, seed in wanted]
        early: dict[int, dict] = {}  # pass index -> what the selection mid-training saw
        select = None
        if gate.select_after < 1:
            def judge(k, fit):
                return _judge_fit(fit, images[wanted[k][0]], base, scorer, gate, steps, subjects, styles)

            refits = {k for k, (i, seed) in enumerate(wanted) if any(t["seed"] == seed for t in tried[i])}
            select = Selection(gate.select_after, lambda paused: _choose_early(paused, wanted, refits, judge, early,
                                                                               gate.select_after))
        fitted = fit_many([io.BytesIO(images[i]) for i, _ in wanted],
                          [dataclasses.replace(configs[i], seed=seed) for i, seed in wanted],
                          base=base, out_dirs=dirs, progress=progress, formats=formats, select=select)
        for k, ((i, seed), folder, result) in enumerate(zip(wanted, dirs, fitted)):
            results[i, seed] = result
            if isinstance(result, NotChosen):
                judged = {"seed": seed, "stopped_at_step": result.step} | _early_record(early[k])
            else:
                judged = {"seed": seed} | _judge(result, folder, images[i], base, scorer, gate, steps, subjects,
                                                 styles)
                if k in early:
                    judged |= {"selected_at_step": early[k]["step"]} | _early_record(early[k])
            tried[i] = sorted([t for t in tried[i] if t["seed"] != seed] + [judged], key=lambda t: t["seed"])
        for i in sorted({i for i, _ in wanted}):
            if on_pass is not None and _more(gate, tried[i]):
                on_pass(i, tried[i])
    return [_choose(i, tried[i], results, gate, out_dirs[i], scorer) for i in range(len(images))]


def _choose_early(paused: dict, wanted: list[tuple[int, int]], refits: set[int], judge, early: dict,
                  after: float) -> set[int]:
    """The staged gate's choice (`--select-after`): every paused candidate scored; per image the best trains on,
    beside a candidate fitted again only for its files (its score is known). An image none of whose candidates
    could be scored trains them all on."""
    by_image: dict[int, list[int]] = {}
    for k, fit in paused.items():
        early[k] = {"step": pause_step(after, fit.config.steps)} | judge(k, fit)
        by_image.setdefault(wanted[k][0], []).append(k)
    keep = set(refits) & set(paused)
    for image, ks in by_image.items():
        scored = [k for k in ks if k not in refits and early[k].get("split_score") is not None]
        keep |= {max(scored, key=lambda k: (early[k]["split_score"], -wanted[k][1]))} if scored else set(ks)
    return keep


def _early_record(seen: dict) -> dict:
    """A candidate's scores at the selection, as its `tried` entry keeps them (never as its split score)."""
    if "error" in seen:
        return {"early_error": seen["error"]}
    return {"early_split_score": seen["split_score"], "early_scores": seen["scores"]}


def _best(tried: list[dict]) -> dict | None:
    """The best scored candidate (first of equals: the lowest seed)."""
    return max((t for t in tried if t.get("split_score") is not None), key=lambda t: t["split_score"], default=None)


def _more(gate: Gate, tried: list[dict]) -> int:
    """How many candidates to fit next for an image (0: its choice is made)."""
    if not tried:
        return gate.candidates
    best = _best(tried)
    if best is not None and best["split_score"] >= gate.min_split_score:
        return 0
    return min(gate.candidates, gate.limit - len(tried))


def _judge(result, folder: Path, image: bytes, base, scorer, gate: Gate, steps: int, subjects, styles) -> dict:
    """A candidate's scores, or why it has none."""
    if isinstance(result, Exception):
        return {"error": first_line(result, 300)}
    return _judge_fit(folder, image, base, scorer, gate, steps, subjects, styles)


def _judge_fit(fit, image: bytes, base, scorer, gate: Gate, steps: int, subjects, styles) -> dict:
    """The scores of a fit (its folder, or a fit in memory), or why it has none."""
    try:
        judged = score_candidate(fit, image, base=base, scorer=scorer, steps=steps, subjects=subjects, styles=styles,
                                 images=gate.images_per_prompt)
    except Exception as exc:  # a candidate that cannot be scored is not chosen; its mates still can be
        return {"error": f"not scored: {first_line(exc, 300)}"}
    return judged if judged["split_score"] is not None else {"error": "the scorer gave no score"}


def gate_panels(base, fit, steps: int, subjects=None, styles=None, images: int = GATE_IMAGES
                ) -> dict[str, list[Image.Image]]:
    """The gate's own panels of a fit: up to GATE_PANELS prompts of each LoRA alone, `images` each (prompt by
    prompt), GATE_SEED (a kind without prompts has none)."""
    prompts = preview_prompts(fit.config, subjects or base.preview_subjects, styles or base.preview_styles,
                              panels=GATE_PANELS)
    kinds = [kind for kind in ("content", "style") if prompts[kind]]
    return generate_each(base, {kind: fit for kind in kinds}, prompts, steps=steps, seed=GATE_SEED,
                         num_images=images)


def score_candidate(fit, image: bytes, *, base, scorer, steps: int, subjects=None, styles=None,
                    images: int = GATE_IMAGES) -> dict:
    """A fit's (its folder, or FitArtifacts) scores on the gate's own panels (gate_panels, `images` per prompt) and
    its split score."""
    panels = gate_panels(base, fit if isinstance(fit, FitArtifacts) else load_fit(fit), steps, subjects, styles,
                         images)
    source = Image.open(io.BytesIO(image)).convert("RGB")
    scores = checked(scorer.score(source, panels.get("content", []), panels.get("style", [])))
    return {"split_score": split_score(scores), "scores": scores}


def _choose(i: int, tried: list[dict], results: dict, gate: Gate, out_dir: Path, scorer):
    mine = [t for t in tried if (i, t["seed"]) in results]  # fitted by this attempt: their files are here
    scored = [t for t in mine if t.get("split_score") is not None]
    if not scored:
        fitted = [results[i, t["seed"]] for t in mine if not isinstance(results[i, t["seed"]], Exception)]
        if mine and not fitted:  # every candidate failed: the first one's error is the item's
            errors = [results[i, t["seed"]] for t in mine]
            return next((e for e in errors if not isinstance(e, NotChosen)), errors[0])
        why = next((t["error"] for t in tried if "error" in t), "none was fitted again")
        return GateError(f"none of its {len(tried)} candidate fits could be scored ({why}); no unscored fit is "
                         "recorded")
    best = _best(scored)
    result = results[i, best["seed"]]
    shutil.move(result.out_dir, out_dir)
    result.out_dir = Path(out_dir)
    result.record["gate"] = {"scorer": scorer.name, "chosen_seed": best["seed"], "split_score": best["split_score"],
                             "passed": best["split_score"] >= gate.min_split_score,
                             "images_per_prompt": gate.images_per_prompt,
                             "min_split_score": gate.min_split_score, "candidates": tried}
    record_file = result.out_dir / fit_files.RECORD
    record_file.write_text(json.dumps(json.loads(record_file.read_text()) | {"gate": result.record["gate"]}, indent=2))
    return result


class GateError(UnZipLoRAError):
    """No candidate of an image could be scored."""
