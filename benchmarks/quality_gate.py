"""Does the quality gate (pipeline/quality/gate.py) give more images a split that holds, and at what device time?

    python benchmarks/quality_gate.py [--set A|B|C] [--images 12] [--candidates 3] [--scorer toy] [--threads 1]
                                      [--gate-images N]

Every held-out toy image of the disentanglement benchmark (benchmarks/disentangle.py) is fitted with the paper's
recipe at fit seeds 0 .. N-1: exactly that benchmark's `unziplora` fits, reused from (and saved to) its folder
`out/disentangle-<set>`. Then:
- the single run keeps seed 0 (what a job without the gate keeps);
- the gated run keeps the seed the gate chooses: each candidate scored by `--scorer` on the gate's own panels
  (its sampling seed and prompts), never on the benchmark's;
- both are judged by the benchmark's own protocol (its prompts, sampling seeds and judges). An image "passes"
  when, on it, content kept >= 80 %, style carried >= 80 % and both leaks <= 10 %.
Prints `split_ok_single`, `split_ok_gated` (fractions of images that pass), `split_ok_oracle` (any candidate
passes: the most a choice among these candidates can give) and `device_time_ratio`: the time of the gated run's
fits (N trained together in one pass, plus the gate's sampling) over one fit alone, measured side by side in
this run on image 0 (`--no-timing` skips it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import disentangle as bench  # noqa: E402  (beside this file)

from pipeline.quality.gate import (GATE_IMAGES, GATE_PANELS, GATE_SEED, fit_gated, gate_panels,  # noqa: E402
                                   split_score)
from pipeline.run.spec import Gate  # noqa: E402
from pipeline.quality.previews import preview_prompts  # noqa: E402
from pipeline.quality.scoring import checked, load_scorer  # noqa: E402
from toyworld import judges as judges_mod  # noqa: E402
from unziplora import fit_many  # noqa: E402
from unziplora.fit_files import RECORD  # noqa: E402
from unziplora.models import load_base_model  # noqa: E402
from unziplora.quiet import quiet_libraries  # noqa: E402
from unziplora.training import _prepare, snapshot, train_batch  # noqa: E402

PASS = {"content_acc": (">=", 0.8), "style_acc": (">=", 0.8), "content_style_leak": ("<=", 0.1),
        "style_shape_leak": ("<=", 0.1)}


def passes(unit: dict) -> bool:
    return all(unit[k] >= v if op == ">=" else unit[k] <= v for k, (op, v) in PASS.items())


def images_suffix(images: int) -> str:
    """What a candidate's cached gate panels and scores add to their names for `images` per prompt: nothing at the
    gate's default (so the default's caches stay valid beside the others)."""
    return "" if images == GATE_IMAGES else f"-x{images}"


def cached_gate_panels(base, fit, folder: Path, steps: int, config=None, images: int = GATE_IMAGES
                       ) -> dict[str, list[Image.Image]]:
    """The gate's panels of one candidate (pipeline/quality/gate.py's gate_panels), drawn once and kept in its
    folder, so that every scorer is shown the same pixels (`fit` None: only read back, for `config`'s fit)."""
    keep = folder / f"gate-panels-{steps}{images_suffix(images)}"
    prompts = preview_prompts(config or fit.config, base.preview_subjects, base.preview_styles, panels=GATE_PANELS)
    names = {kind: [keep / f"{kind}-{k:02d}.png" for k in range(len(p) * images)] for kind, p in prompts.items()}
    if not all(path.is_file() for paths in names.values() for path in paths):
        if fit is None:
            return None
        keep.mkdir(exist_ok=True)
        for kind, drawn in gate_panels(base, fit, steps, images=images).items():
            for image, path in zip(drawn, names[kind]):
                image.save(path)
    return {kind: [Image.open(path).convert("RGB") for path in paths] for kind, paths in names.items()}


def gate_scores(base, scorer, fits: dict, paths: list[Path], steps: int, out: Path, method,
                images: int = GATE_IMAGES) -> dict:
    """(image, seed) -> the gate's split score of that fit by `scorer`, cached beside it (one file per scorer and
    number of images per prompt)."""
    scores = {}
    for (i, seed), fit in sorted(fits.items()):
        key = dict(scorer=scorer.name, steps=steps, seed=GATE_SEED, panels=GATE_PANELS, images=images,
                   fit=hashlib.sha256((fit.path / RECORD).read_bytes()).hexdigest()[:16])
        folder = bench.unit_folder(out, method, i, seed)
        cache = folder / f"gate-{scorer.name}{images_suffix(images)}.json"
        saved = json.loads(cache.read_text()) if cache.is_file() else {}
        if saved.get("key") != key:
            panels = cached_gate_panels(base, fit, folder, steps, images=images)
            judged = checked(scorer.score(Image.open(paths[i]).convert("RGB"), panels["content"], panels["style"]))
            saved = dict(key=key, split_score=split_score(judged), scores=judged)
            cache.write_text(json.dumps(saved))
        scores[i, seed] = saved["split_score"]
    return scores


def early_gate_scores(base, scorer, method, batch, paths: list[Path], a, out: Path, seeds: list[int],
                      at_steps: list[int], steps: int) -> dict:
    """(step, image, seed) -> the gate's split score by `scorer` of that candidate as it stood after `step` of its
    training steps (the same fit as the benchmark's, paused: unziplora.training.train_batch's `until`). Panels
    and scores are kept in the unit's folder under `early-<step>/`; only candidates with a panel missing are trained
    again (an image's together, up to the last step asked)."""
    scores = {}
    for i in range(len(paths)):
        configs = {seed: bench.fit_config(method, base.role_table, a, batch.factors[i], seed) for seed in seeds}
        image = hashlib.sha256(paths[i].read_bytes()).hexdigest()
        keys = {seed: hashlib.sha256(json.dumps([c.to_dict(), steps, GATE_SEED, GATE_PANELS, GATE_IMAGES, image],
                                                sort_keys=True).encode()).hexdigest()[:16]
                for seed, c in configs.items()}
        folders = {(step, seed): bench.unit_folder(out, method, i, seed) / f"early-{step}"
                   for step in at_steps for seed in seeds}
        panels = {}
        for (step, seed), folder in folders.items():
            if json.loads((folder / "key").read_text() if (folder / "key").is_file() else "null") == keys[seed]:
                drawn = cached_gate_panels(base, None, folder, steps, configs[seed])
                if drawn is not None:
                    panels[step, seed] = drawn
        missing = [seed for seed in seeds if any((step, seed) not in panels for step in at_steps)]
        if missing:  # train those of this image's candidates together, pausing at each step asked
            states = [_prepare(str(paths[i]), configs[seed], base, None, {})[0] for seed in missing]
            for step in sorted(at_steps):
                train_batch(base, states, progress=False, until=step)
                for seed, state in zip(missing, states):
                    folder = folders[step, seed]
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                    panels[step, seed] = cached_gate_panels(base, snapshot(state, base), folder, steps)
                    (folder / "key").write_text(json.dumps(keys[seed]))
        source = Image.open(paths[i]).convert("RGB")
        for (step, seed), folder in folders.items():
            cache = folder / f"gate-{scorer.name}.json"
            if not cache.is_file():
                judged = checked(scorer.score(source, panels[step, seed]["content"], panels[step, seed]["style"]))
                cache.write_text(json.dumps(dict(split_score=split_score(judged), scores=judged)))
            scores[step, i, seed] = json.loads(cache.read_text())["split_score"]
        print(f"  early scores: image {i + 1}/{len(paths)}", flush=True)
    return scores


def staged_gate(base, scorer, method, batch, paths, a, out: Path, seeds: list[int], own, full: dict, units: dict,
                picked_full: list[int]) -> tuple[dict, dict]:
    """Per step S of `--select-at`: the staged gate's choice (best early score) judged by the chosen seed's
    finished fit, with how its early scores agree with the truth (scorer_agreement's figures); and the full
    gate's gain over a random candidate (`full`: its scores, `picked_full`: its choice per image)."""
    from scorer_agreement import agreement, truth_score  # beside this file (it imports this one)

    early = early_gate_scores(base, scorer, method, batch, paths, a, out, seeds, own.select_at, own.gate_steps)
    truth = {key: truth_score(unit) for key, unit in units.items()}
    images = list(range(len(paths)))
    report = {}
    for step in own.select_at:
        scored = {(i, seed): early[step, i, seed] for i in images for seed in seeds}
        chosen = [max(seeds, key=lambda s: (scored[i, s], -s)) for i in images]
        report[step] = agreement(scored, truth, images, seeds) | {
            "split_ok_staged": float(np.mean([passes(units[i, c]) for i, c in zip(images, chosen)])),
            "same_choice_as_full": float(np.mean([c == f for c, f in zip(chosen, picked_full)])),
            "chosen_seeds": chosen, "early_split_scores": [[scored[i, s] for s in seeds] for i in images]}
    full_gain = agreement({k: -1 if v is None else v for k, v in full.items()}, truth, images, seeds)
    return report, full_gain["gain_over_random"]


def device_time_ratio(base, scorer, a, batch, path: Path, out: Path, method, candidates: int, steps: int,
                      select_at: list[int] = (), images: int = GATE_IMAGES) -> dict:
    """One fit alone vs the gate's run on the same image (pipeline/quality/gate.py fit_gated, as a job runs it:
    `candidates` fits trained together, each scored, the best kept): wall time side by side on this machine (fresh
    fits, not the cached ones). With `select_at`, per step S also the staged gate (`--select-after S/steps`): the
    candidates trained together to step S, each scored, only the best trained on and scored again."""
    configs = [bench.fit_config(method, base.role_table, a, batch.factors[0], seed) for seed in range(candidates)]
    with tempfile.TemporaryDirectory(dir=out, prefix="gate-timing-") as folder:  # runs at once each have their own
        work = Path(folder)
        t = time.perf_counter()
        fit_many([str(path)], configs[:1], base=base, out_dirs=[work / "single"], progress=False)
        single = time.perf_counter() - t
        timing = {"single_s": single}
        for step in [a.steps, *select_at]:
            gate = Gate(candidates=candidates, select_after=step / a.steps, images_per_prompt=images)
            t = time.perf_counter()
            [kept] = fit_gated([path.read_bytes()], configs[:1], base=base, gate=gate, scorer=scorer,
                               out_dirs=[work / f"kept-{step}"], workdir=work / f"candidates-{step}", steps=steps)
            if isinstance(kept, Exception):
                raise kept
            ratio = (time.perf_counter() - t) / single
            if step == a.steps:  # every candidate trained to the end
                timing["device_time_ratio"] = ratio
            else:
                timing[f"staged_{step}"] = {"device_time_ratio": ratio}
    return timing


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument("--scorer", default="toy", help="what the gate scores with (pipeline/quality/scoring.py)")
    p.add_argument("--gate-steps", type=int, default=8, help="sampling steps of the gate's panels (a job's "
                   "--preview-steps)")
    p.add_argument("--gate-images", type=int, default=GATE_IMAGES, metavar="N",
                   help=f"images per prompt in the gate's panels (a job's --gate-images, default {GATE_IMAGES})")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--select-at", type=int, nargs="*", default=[], metavar="STEP",
                   help="also the staged gate: candidates scored after STEP training steps, only the best trained on "
                        "(its final fit is the benchmark's own fit of that seed)")
    p.add_argument("--json", help="also write the report as a result file (docs/results/quality_gate-SET.json)")
    own, rest = p.parse_known_args(argv)
    quiet_libraries()
    if own.candidates < 2:
        raise SystemExit("--candidates must be at least 2")
    if own.select_at and own.gate_images != GATE_IMAGES:
        raise SystemExit(f"--select-at scores early panels of {GATE_IMAGES} images per prompt only")
    a = bench.parse_args(rest + ["--fit-seeds", *map(str, range(own.candidates)), "--methods", "unziplora"])
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        print("QUICK MODE: a plumbing check; NOT a measurement", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    method = next(m for m in bench.METHODS if m.key == "unziplora")
    base = load_base_model(a.model, device="cpu" if not torch.cuda.is_available() else "auto")
    a.guidance = base.guidance if a.guidance is None else a.guidance
    judges, scorer = judges_mod.load_judges(), load_scorer(own.scorer, base)
    batch = bench.held_out_images(a.images, a.held_out_seed)
    paths = [bench.write_image(image, out / "images" / f"{i:03d}.png") for i, image in enumerate(batch.images)]
    fits = bench.fit_units(base, method, batch, paths, a, out)
    units = bench.score_units(base, judges, method, batch, fits, a, out)
    gated = gate_scores(base, scorer, fits, paths, own.gate_steps, out, method, own.gate_images)
    seeds = list(range(own.candidates))
    per_image = []
    for i in range(a.images):
        chosen = max(seeds, key=lambda s: (gated[i, s] if gated[i, s] is not None else -1, -s))
        per_image.append(dict(image=batch.factors[i].prompt, gate_split_scores=[gated[i, s] for s in seeds],
                              chosen_seed=chosen, single_passes=passes(units[i, 0]),
                              gated_passes=passes(units[i, chosen]),
                              any_passes=any(passes(units[i, s]) for s in seeds)))
    result = {k: float(np.mean([r[f"{w}_passes"] for r in per_image]))
              for k, w in (("split_ok_single", "single"), ("split_ok_gated", "gated"), ("split_ok_oracle", "any"))}
    if own.select_at:
        result["staged"], result["full_gain_over_random"] = staged_gate(
            base, scorer, method, batch, paths, a, out, seeds, own, gated, units, [r["chosen_seed"] for r in per_image])
    if not own.no_timing:
        result |= device_time_ratio(base, scorer, a, batch, paths[0], out, method, own.candidates, own.gate_steps,
                                    own.select_at, own.gate_images)
    print(f"\n{base.name} base, {a.images} images (seed {a.held_out_seed}), {own.candidates} candidates, "
          f"scorer {scorer.name}; an image passes: content >= 80 %, style >= 80 %, both leaks <= 10 %")
    print("| image | gate's split scores (seeds " + ", ".join(map(str, seeds)) + ") | kept | seed 0 passes | kept passes |")
    print("|---|---|---|---|---|")
    for r in per_image:
        print(f"| {r['image']} | " + ", ".join("-" if s is None else f"{s:.2f}" for s in r["gate_split_scores"])
              + f" | {r['chosen_seed']} | {'yes' if r['single_passes'] else 'no'} | {'yes' if r['gated_passes'] else 'no'} |")
    for k in ("split_ok_single", "split_ok_gated", "split_ok_oracle", "device_time_ratio"):
        if k in result:
            print(f"{k} = {result[k]:.3f}")
    for step, r in result.get("staged", {}).items():
        g = r["gain_over_random"]
        print(f"staged at step {step}: split_ok_staged = {r['split_ok_staged']:.3f}, same choice as the full gate "
              f"{r['same_choice_as_full']:.2f}, Spearman within images {r['spearman_within']}, gain over a random "
              f"candidate {g['mean']:+.3f} ({g['low']:+.3f} to {g['high']:+.3f}); full gate's gain "
              f"{result['full_gain_over_random']['mean']:+.3f}" + (f", device_time_ratio = "
              f"{result[f'staged_{step}']['device_time_ratio']:.3f}" if f"staged_{step}" in result else ""))
    report = dict(settings=vars(a) | vars(own), per_image=per_image, **result)
    (out / "quality_gate.json").write_text(json.dumps(report, indent=1))
    if own.json:
        import results as result_files  # beside this file, as disentangle is

        result_files.save(own.json, report)
    return report


def plot(by_candidates: dict, path: str) -> None:
    """Images whose split passes against candidates per image (quality_gate-candidates.json's results: set ->
    scorer -> "nN" -> this benchmark's split_ok_* fractions), per set: single fit, each scorer's gate, oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, all_axes = plt.subplots(1, len(by_candidates), figsize=(4.2 * len(by_candidates), 3.4), dpi=100,
                                    sharey=True)
    for axes, (image_set, scorers) in zip(all_axes, sorted(by_candidates.items())):
        first = next(iter(scorers.values()))
        n = sorted(int(k[1:]) for k in first)
        line = lambda runs, key: [100 * runs[f"n{k}"][key] for k in n]  # noqa: E731
        axes.plot(n, line(first, "split_ok_single"), color="grey", linestyle=":", label="single fit (seed 0)")
        for scorer, runs in sorted(scorers.items(), reverse=True):
            axes.plot(n, line(runs, "split_ok_gated"), marker="o", label=f"gate, scorer {scorer}")
        axes.plot(n, line(first, "split_ok_oracle"), color="black", linestyle="--", label="oracle's choice")
        axes.set(xticks=n, xlabel="candidate fits per image", title=f"set {image_set}")
        axes.grid(True, alpha=0.3)
    all_axes[0].set(ylabel="images whose split passes (%)")
    all_axes[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def plot_staged(by_set: dict, path: str) -> None:
    """Images whose split passes against device time (quality_gate-staged.json's results: set -> scorer -> this
    benchmark's report with --select-at), per set: the single fit, the full gate and the staged gate at each step,
    per scorer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, all_axes = plt.subplots(1, len(by_set), figsize=(4.6 * len(by_set), 3.6), dpi=100, sharey=True)
    for axes, (image_set, scorers) in zip(all_axes, sorted(by_set.items())):
        first = next(iter(scorers.values()))
        images = len(first["per_image"])
        axes.scatter([1.0], [images * first["split_ok_single"]], color="grey", marker="s", label="single fit (seed 0)")
        for (scorer, r), colour in zip(sorted(scorers.items(), reverse=True), ("tab:blue", "tab:orange")):
            steps = sorted(r["staged"], key=int)
            xs = [r[f"staged_{s}"]["device_time_ratio"] for s in steps] + [r["device_time_ratio"]]
            ys = [images * r["staged"][s]["split_ok_staged"] for s in steps] + [images * r["split_ok_gated"]]
            axes.plot(xs, ys, marker="o", color=colour, label=f"gate, scorer {scorer}")
            for x, y, s in zip(xs, ys, [*steps, r["settings"]["steps"]]):
                axes.annotate(f"{s}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
        axes.axhline(images * first["split_ok_oracle"], color="black", linestyle="--", label="oracle's choice")
        axes.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axes.set(xlabel="device time / one fit (this CPU)", title=f"set {image_set}: {images} images, "
                 f"{len(first['per_image'][0]['gate_split_scores'])} candidates")
        axes.grid(True, alpha=0.3)
    all_axes[0].set(ylabel="images whose split passes")
    all_axes[-1].legend(fontsize=7, title="labels: step of the choice", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
