"""Does a scorer choose among an image's candidate fits as the toy world's judges do (issue 29 §2)?

    python benchmarks/scorer_agreement.py [--set A|B] [--images 6] [--candidates 3] --scorer SPEC [SPEC ...]

The candidates are the disentanglement benchmark's `unziplora` fits at fit seeds 0 .. N-1 (benchmarks/
disentangle.py; reused from `out/disentangle-<set>`, fitted there if missing), and the truth is that benchmark's
judged units: per candidate, the split score of its own protocol (the mean of content kept, style carried and
one minus each leak, over its prompts and sampling seeds). Each scorer sees only what the quality gate gives it
in a job: the source image and the gate's own panels of each LoRA alone (pipeline/quality/gate.py: its sampling seed and
prompts), drawn once per candidate and kept beside the fit (`gate-panels/`), so scorers are compared on the
same pixels. Per scorer it prints:
- choice agreement: the share of images where its best candidate is the judges' best (ties in the truth count
  as agreement with any of the tied);
- Spearman within images: the rank correlation of its split scores with the truth over an image's candidates,
  averaged over images (an image whose candidates the truth cannot tell apart is left out);
- the truth's gain from its choice: mean truth of the chosen candidate minus that of seed 0, against the
  judges' own choice's gain (the most a choice among these candidates can give is the oracle's);
- its gain over a random choice: the chosen candidate's truth minus the mean truth of the image's candidates,
  with a 95 % bootstrap interval over images (a scorer that chooses no better than chance has 0 in it);
- with `toy` among the scorers, each other scorer against the judges' own scores of the same gate panels (the
  issue's test of a built-in scorer): how often it chooses the judges' candidate, and its Spearman within images;
- `--gate-images N`: the gate's panels drawn with N images per prompt instead of a job's default (kept apart
  from the default's, `gate-panels-<steps>-xN/`);
- `--compare FIRST SECOND` (scorer names as reported): SECOND minus FIRST image by image, with 95 % intervals:
  the Spearman within images against the truth (and the judges) and the gain over a random choice;
- with `--halves`, each scorer on each half of the panels apart (every prompt's even-numbered images, or its
  odd-numbered): the Spearman within images of each half against the truth beside that of all the panels, and
  between the halves (how much a ranking depends on the number of panels the gate draws).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import disentangle as bench  # noqa: E402  (beside this file)
from disentangle_stats import bootstrap  # noqa: E402
from quality_gate import cached_gate_panels, gate_scores  # noqa: E402

from pipeline.quality.gate import GATE_IMAGES, split_score  # noqa: E402
from pipeline.quality.base_scorer import TIMESTEPS, BaseModelScorer  # noqa: E402
from pipeline.quality.scoring import checked, load_scorer  # noqa: E402
from toyworld import judges as judges_mod  # noqa: E402
from unziplora.models import load_base_model  # noqa: E402


def scorer_of(spec: str, base, out: Path | None = None):
    """A scorer spec as a job reads it; or `base:N`: the base-model scorer at N timesteps spread evenly over the
    same 20-80 % of the schedule (`base` is `base:4`), to see whether its own noise limits how it chooses; or
    `base-soft[:N]`: the same with soft=True. A base scorer's UNet errors per image are kept in `out`, so its
    variants and halves of the panels are scored again without the UNet."""
    name, _, count = spec.partition(":")
    if name not in ("base", "base-soft") or (name == "base" and not count):
        scorer = load_scorer(spec, base)
    else:
        times = TIMESTEPS if not count else tuple(np.linspace(TIMESTEPS[0], TIMESTEPS[-1], int(count)).tolist())
        scorer = BaseModelScorer(base, timesteps=times, soft=name == "base-soft")
        if count:
            scorer.name = f"{scorer.name}-{int(count)}t"
    if isinstance(scorer, BaseModelScorer) and out is not None:
        keep_errors(scorer, out / f"base-errors-{len(scorer.timesteps)}t-{scorer.resolution}px.npz")
    return scorer


def keep_errors(scorer: BaseModelScorer, path: Path) -> None:
    """The scorer's UNet errors per image (by its pixels) read from and added to `path` as they are computed."""
    saved = dict(np.load(path)) if path.is_file() else {}
    compute = scorer._errors

    def errors(image: Image.Image) -> np.ndarray:
        key = hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()[:24]
        if key not in saved:
            saved[key] = compute(image)
            if len(saved) % 100 == 0:
                save()
        return saved[key]

    def save():
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, **saved)
        partial.replace(path)

    scorer._errors, scorer.save_errors = errors, save


def rho(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def rho_ci(row: dict) -> str:
    """A Spearman within images with its 95 % interval over images, and how many images it ranked."""
    spread = row.get("spearman_within_ci")
    within = f" ({spread[0]:.2f} to {spread[1]:.2f})" if spread else ""
    return f"{rho(row['spearman_within'])}{within}, {row['images_ranked']} images"


def half_scores(base, scorer, fits: dict, paths: list[Path], steps: int, out: Path, method, images: int
                ) -> list[dict]:
    """Per half of the gate's panels, (image, seed) -> the split score by `scorer` of that half of the fit's panels:
    each prompt's even-numbered images (half 0: with two per prompt, its first) or its odd-numbered ones (half 1);
    the panels are the cached ones `gate_scores` scored."""
    scores = [{}, {}]
    for (i, seed), fit in sorted(fits.items()):
        panels = cached_gate_panels(base, fit, bench.unit_folder(out, method, i, seed), steps, images=images)
        source = Image.open(paths[i]).convert("RGB")
        for half, scored in enumerate(scores):  # the panels are prompt by prompt, each prompt's images together
            judged = checked(scorer.score(source, panels["content"][half::2], panels["style"][half::2]))
            scored[i, seed] = split_score(judged)
    return scores


def truth_score(unit: dict) -> float:
    """The gate's split score (the same formula) of a unit as the benchmark judged it."""
    return split_score({"content": unit["content_acc"], "style": unit["style_acc"],
                        "content_style_leak": unit["content_style_leak"], "style_shape_leak": unit["style_shape_leak"]})


def spearman(x, y) -> float | None:
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rx, ry = (np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float) for v in (x, y))
    # average ranks of ties
    for r, v in ((rx, np.asarray(x)), (ry, np.asarray(y))):
        for value in set(v.tolist()):
            r[v == value] = r[v == value].mean()
    return float(np.corrcoef(rx, ry)[0, 1])


def agreement(scored: dict, truth: dict, images: list[int], seeds: list[int]) -> dict:
    chosen, by_image, gains, over_random = [], [], [], []
    for i in images:
        s = [scored[i, k] for k in seeds]
        t = [truth[i, k] for k in seeds]
        pick = seeds[int(np.argmax(s))]  # first of equals: the lowest seed, as the gate
        chosen.append(truth[i, pick] == max(t))
        gains.append(truth[i, pick] - truth[i, seeds[0]])
        over_random.append(truth[i, pick] - np.mean(t))  # what a choice adds to a candidate drawn by chance
        by_image.append(spearman(s, t))
    within = [rho for rho in by_image if rho is not None]
    mean, low, high = bootstrap(np.array(over_random)[:, None])
    spread = list(bootstrap(np.array(within)[:, None])[1:]) if within else None  # 95 % over images
    return {"choice_agreement": float(np.mean(chosen)), "spearman_within": float(np.mean(within)) if within else None,
            "spearman_within_ci": spread, "images_ranked": len(within), "spearman_by_image": by_image,
            "truth_gain": float(np.mean(gains)), "gain_over_random": {"mean": mean, "low": low, "high": high},
            "over_random_by_image": [float(v) for v in over_random]}


def paired(first: dict, second: dict, keys: tuple[str, ...] = ("spearman_by_image", "over_random_by_image")) -> dict:
    """Second minus first, image by image, with 95 % bootstrap intervals over images, per key of agreement()'s
    per-image figures (an image either scorer leaves unranked is left out)."""
    out = {}
    for key in keys:
        values = [np.nan if a is None or b is None else b - a for a, b in zip(first[key], second[key])]
        mean, low, high = bootstrap(np.array(values, dtype=float)[:, None])
        out[key.removesuffix("_by_image")] = {"mean": mean, "low": low, "high": high}
    return out


def paired_scorers(first: dict, second: dict) -> dict:
    """paired() of two scorers' rows of a report, and of their rows against the judges where both have one."""
    both = "vs_judges" in first and "vs_judges" in second
    return paired(first, second) | (
        {"vs_judges": paired(first["vs_judges"], second["vs_judges"], ("spearman_by_image",))} if both else {})


def paired_line(d: dict) -> str:
    line = lambda f: f"{f['mean']:+.2f} ({f['low']:+.2f} to {f['high']:+.2f})"  # noqa: E731
    return (f"Spearman within images against the truth {line(d['spearman'])}"
            + (f", against the judges {line(d['vs_judges']['spearman'])}" if "vs_judges" in d else "")
            + f"; gain over a random choice {line(d['over_random'])}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scorer", nargs="+", default=["toy"],
                   help="scorer specs (pipeline/quality/scoring.py), or base:N (the base scorer at N timesteps)")
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument("--gate-steps", type=int, default=8)
    p.add_argument("--gate-images", type=int, default=GATE_IMAGES, metavar="N",
                   help=f"images per prompt in the gate's panels (a job's default: {GATE_IMAGES})")
    p.add_argument("--compare", nargs=2, action="append", default=[], metavar=("FIRST", "SECOND"),
                   help="scorer names as reported (e.g. base-unet base-unet-soft): SECOND minus FIRST image by image")
    p.add_argument("--halves", action="store_true", help="also score each half of the gate's panels apart: how "
                   "much the ranking depends on the number of panels")
    p.add_argument("--json", help="also write the figures as a result file (docs/results/scorer_agreement-SET.json)")
    own, rest = p.parse_known_args(argv)
    if own.halves and own.gate_images % 2:
        raise SystemExit("--halves needs an even --gate-images")
    a = bench.parse_args(rest + ["--fit-seeds", *map(str, range(own.candidates)), "--methods", "unziplora"])
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    method = next(m for m in bench.METHODS if m.key == "unziplora")
    base = load_base_model(a.model, device="cpu" if not torch.cuda.is_available() else "auto")
    a.guidance = base.guidance if a.guidance is None else a.guidance
    batch = bench.held_out_images(a.images, a.held_out_seed)
    paths = [bench.write_image(image, out / "images" / f"{i:03d}.png") for i, image in enumerate(batch.images)]
    fits = bench.fit_units(base, method, batch, paths, a, out)
    units = bench.score_units(base, judges_mod.load_judges(), method, batch, fits, a, out)
    truth = {key: truth_score(unit) for key, unit in units.items()}
    images, seeds = list(range(a.images)), list(range(own.candidates))
    report = {"images": a.images, "candidates": own.candidates, "gate_images": own.gate_images,
              "oracle_gain": float(np.mean(
        [max(truth[i, k] for k in seeds) - truth[i, 0] for i in images])), "random_gain": float(np.mean(
        [np.mean([truth[i, k] for k in seeds]) - truth[i, 0] for i in images])), "scorers": {}}
    every = {}
    for spec in own.scorer:
        scorer = scorer_of(spec, base, out)
        scored = every[scorer.name] = gate_scores(base, scorer, fits, paths, own.gate_steps, out, method,
                                                    own.gate_images)
        pooled = spearman([scored[key] for key in sorted(scored)], [truth[key] for key in sorted(scored)])
        report["scorers"][scorer.name] = agreement(scored, truth, images, seeds) | {"spearman_pooled": pooled}
        if own.halves:
            half = half_scores(base, scorer, fits, paths, own.gate_steps, out, method, own.gate_images)
            report["scorers"][scorer.name]["halves"] = {
                "spearman_between": agreement(half[0], half[1], images, seeds)["spearman_within"],
                "spearman_within_each": [agreement(h, truth, images, seeds)["spearman_within"] for h in half]}
        if hasattr(scorer, "save_errors"):
            scorer.save_errors()
    judges = judges_mod.PreviewScorer.name
    if judges in every:  # issue 29's own test of a scorer: against the judges' scores of the same panels
        for name, scored in every.items():
            if name != judges:
                versus = agreement(scored, every[judges], images, seeds)
                report["scorers"][name]["vs_judges"] = {key: versus[key] for key in (
                    "choice_agreement", "spearman_within", "spearman_within_ci", "images_ranked", "spearman_by_image")}
    for first, second in own.compare:  # paired, image by image: does one scorer rank better than another?
        if not {first, second} <= set(report["scorers"]):
            raise SystemExit(f"--compare {first} {second}: the scorers measured are {sorted(report['scorers'])}")
        report.setdefault("paired", {})[f"{second} - {first}"] = paired_scorers(report["scorers"][first],
                                                                                report["scorers"][second])
    print(f"\n{base.name} base, set seed {a.held_out_seed}, {a.images} images x {own.candidates} candidates, gate "
          f"panels of {own.gate_images} images per prompt; truth: "
          f"the benchmark's judged split score; oracle gain {report['oracle_gain']:+.3f}, a random choice's "
          f"{report['random_gain']:+.3f}")
    print("| scorer | choice agreement | Spearman within images (95 %, images) | Spearman pooled "
          "| truth gain of its choice | gain over a random choice (95 %) |")
    print("|---|---|---|---|---|---|")
    for name, r in report["scorers"].items():
        g = r["gain_over_random"]
        print(f"| {name} | {r['choice_agreement']:.2f} | {rho_ci(r)} | "
              f"{rho(r['spearman_pooled'])} | "
              f"{r['truth_gain']:+.3f} | {g['mean']:+.3f} ({g['low']:+.3f} to {g['high']:+.3f}) |")
    for name, r in report["scorers"].items():
        if "halves" in r:
            h = r["halves"]
            each = " and ".join(rho(v) for v in h["spearman_within_each"])
            print(f"{name} on half the panels (each prompt's even- or odd-numbered images): Spearman within images "
                  f"against the truth {each} (all the panels: {rho(r['spearman_within'])}), between the two halves "
                  f"{rho(h['spearman_between'])}")
        if "vs_judges" in r:
            v = r["vs_judges"]
            print(f"{name} against the judges on the same gate panels: the same choice on {v['choice_agreement']:.2f} "
                  f"of the images, Spearman within images {rho_ci(v)}")
    for pair, d in report.get("paired", {}).items():
        print(f"paired, {pair}, image by image (95 %): {paired_line(d)}")
    if own.json:
        import results as result_files  # beside this file

        result_files.save(own.json, report)
    return report


if __name__ == "__main__":
    main()
