"""The disentanglement benchmark's statistics: means with 95 % intervals, and paired comparisons.

A benchmark unit is one (image, fit seed): one fit, judged on a fixed set of prompts and sampling seeds. Units
are not exchangeable: images differ far more than fit seeds do, and the fit seeds of one image share it. So the
intervals come from a two-level bootstrap: images drawn with replacement, then, within each drawn image, its fit
seeds drawn with replacement. A method's score is the mean over units; a paired comparison is the same bootstrap
over the per-unit differences B - A (same images, fit seeds and sampling seeds), so what the images share cancels.
"""

from __future__ import annotations

import warnings

import numpy as np

REPS = 4000  # bootstrap resamples: the interval's ends move by well under a point between runs at this count
LEVEL = 0.95
# a percentile bootstrap over a handful of images is far too sure of itself: below this, no verdict
MIN_IMAGES = 5


def bootstrap(values: np.ndarray, reps: int = REPS, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of `values` (images x fit seeds; NaN where a unit has no score, e.g. an image without a
    recombination partner): the mean and its two-level bootstrap interval."""
    values = np.asarray(values, dtype=float)
    if not np.isfinite(values).any():
        return float("nan"), float("nan"), float("nan")
    n, m = values.shape
    rng = np.random.default_rng(seed)
    images = rng.integers(n, size=(reps, n))
    seeds = rng.integers(m, size=(reps, n, m))
    draws = values[images[..., None], seeds].reshape(reps, -1)
    with warnings.catch_warnings():  # a resample made only of NaN units has no mean; it is dropped
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(draws, axis=1)
    means = means[np.isfinite(means)]
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(np.nanmean(values)), float(low), float(high)


def verdict(low: float, high: float, higher_is_better: bool, images: int = MIN_IMAGES) -> str:
    """What a paired interval of B - A over `images` images says about B."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "not measured"
    if images < MIN_IMAGES:
        return f"too few images to tell (< {MIN_IMAGES})"
    if low > 0:
        return "better" if higher_is_better else "worse"
    if high < 0:
        return "worse" if higher_is_better else "better"
    return "no measurable difference"


def grid(units: dict[tuple[int, int], dict[str, float]], metric: str, images: list[int], seeds: list[int]
         ) -> np.ndarray:
    """images x seeds array of one metric (NaN where a unit lacks it)."""
    return np.array([[units.get((i, s), {}).get(metric, np.nan) for s in seeds] for i in images],
                    dtype=float).reshape(len(images), len(seeds))


def summarize(units: dict[tuple[int, int], dict[str, float]], metrics: list[str], images: list[int],
              seeds: list[int]) -> dict[str, tuple[float, float, float] | None]:
    """metric -> (mean, low, high) over the given images and fit seeds; None where no unit has a score."""
    out = {}
    for m in metrics:
        stat = bootstrap(grid(units, m, images, seeds))
        out[m] = stat if np.isfinite(stat[0]) else None
    return out


def compare(a: dict, b: dict, metrics: dict[str, bool], images: list[int], seeds: list[int]) -> dict[str, dict]:
    """Per metric (name -> higher is better): B - A over the units both have, its interval and the verdict."""
    out = {}
    for metric, higher in metrics.items():
        diff = grid(b, metric, images, seeds) - grid(a, metric, images, seeds)
        mean, low, high = bootstrap(diff)
        measured = int(np.isfinite(diff).any(axis=1).sum())  # images with at least one unit both have
        out[metric] = dict(diff=mean, low=low, high=high, verdict=verdict(low, high, higher, measured),
                           units=int(np.isfinite(diff).sum()))
        if not np.isfinite(mean):  # nothing to compare: no NaN in the JSON
            out[metric].update(diff=None, low=None, high=None)
    return out
