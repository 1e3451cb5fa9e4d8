"""Quality scores of a fit, from its previews: does the content LoRA keep the subject away from the source's
style, and does the style LoRA carry the style to other subjects?

A scorer is any object with
    name    a stable id, recorded with the scores
    score(source, content, style) -> {score name: float}
where `source` is the source image and `content` / `style` are the preview panels of each LoRA alone (RGB PIL
images). Score names (SCORES; a scorer gives those it can): content, style (higher is better),
content_style_leak, style_shape_leak (lower is better).

Specs: `toy` (the toy world's judges: all four), `base` (the base model's own UNet as a zero-shot classifier over
its preview vocabulary, pipeline/quality/base_scorer.py: all four, for any SDXL with no extra weights), any
image-embedder spec of the style bank (`clip:/local/dir`, `tiny[:seed]`, `package.module:factory` returning an
embedder): cosine similarity of each panel to the source
in that embedder's space (CLIP-I, DINO or CSD as in the paper; content and style only), or
`package.module:factory` returning a scorer.
"""

from __future__ import annotations

import numpy as np

from unziplora.errors import InputError

from ..bank.embedders import load_embedder

SCORES = ("content", "style", "content_style_leak", "style_shape_leak")
ALIASES = {"toy": "toyworld.judges:PreviewScorer"}
BASE = "base"  # the scorer made of the base model itself


def scorer_spec(spec: str | None, base_model: str) -> str | None:
    """The scorer a job uses: as given; "auto" (the default): the toy world's judges for the toy model, none
    otherwise (real models need weights the user names); "none": no scores."""
    if spec in (None, "none", ""):
        return None
    if spec == "auto":
        return ALIASES["toy"] if base_model == "toy" else None
    return ALIASES.get(spec, spec)


def load_scorer(spec: str, base=None):
    """The scorer `spec` names. `base`: the loaded base model, which the `base` scorer is made of; without it
    that one is only checked (None), so a job can refuse a bad spec before any model loads."""
    if spec == BASE:
        from .base_scorer import BaseModelScorer

        return None if base is None else BaseModelScorer(base)
    try:
        found = load_embedder(ALIASES.get(spec, spec))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot load the scorer {spec!r}: {type(exc).__name__}: {exc}") from exc
    if hasattr(found, "score"):
        return found
    if getattr(found, "kind", None) == "image" and hasattr(found, "embed"):
        return EmbeddingScorer(found)
    raise InputError(f"scorer {spec!r} is neither a scorer (score) nor an image embedder (embed)")


class EmbeddingScorer:
    """Mean cosine similarity between the source and each panel in an image embedder's space."""

    def __init__(self, embedder):
        self.embedder, self.name = embedder, embedder.name

    def score(self, source, content: list, style: list) -> dict[str, float]:
        vectors = self.embedder.embed([source, *content, *style])
        similarity = vectors[1:] @ vectors[0]
        out = {}
        if content:
            out["content"] = float(np.mean(similarity[:len(content)]))
        if style:
            out["style"] = float(np.mean(similarity[len(content):]))
        return out


def checked(scores: dict) -> dict[str, float]:
    """Only known, finite scores (a third-party scorer's extra keys or NaNs never reach the manifest)."""
    return {k: float(v) for k, v in scores.items() if k in SCORES and np.isfinite(v)}
