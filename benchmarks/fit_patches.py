"""Changes to the fit that the disentanglement benchmark measures but the fit code does not carry.

Each patch is a context manager: the fits trained inside it are made the changed way (it patches unziplora's
classes for that time only). A benchmark method names its patch (`Method.patch`); its fits are kept in its own
folder with the patch's name beside them, so they are never mistaken for plain fits. A patch that measures as a
gain on every image set moves into the fit code as a setting; one that does not stays here, or goes.
"""

from __future__ import annotations

import contextlib

import torch

from unziplora import importance, training
from unziplora.layers import ColumnGates
from unziplora.roles import KINDS


def _tied(gates: ColumnGates) -> torch.Tensor:
    """Columns both LoRAs hold where mergers learn: there the style LoRA's merger is 1 - the content's."""
    return (gates.overlap() * gates.mergeable).bool()


def _complementary_mergers(gates: ColumnGates) -> torch.Tensor:
    content, style = gates.mergers
    return torch.stack([content, torch.where(_tied(gates), 1 - content, style)])


@contextlib.contextmanager
def complementary_gates():
    """Issue 28's "complementary gates": on a column both LoRAs hold, m_s = 1 - m_c. The paper's mergers there
    start at 1 and fall together (both to 0.01-0.12, a hole in the recombined model); tied, the column is shared
    out between the two, and the orthogonality loss m_c * m_s = m_c (1 - m_c) pushes it to one owner, which the
    denoising loss chooses. A column that becomes shared starts at 1/2 each (neither LoRA favoured). The mergers
    saved with a fit are the tied ones, so `generate` draws as the fit trained."""
    values_before, clamp_before = ColumnGates.merger_values, ColumnGates.clamp_

    @torch.no_grad()
    def clamp_(self):
        clamp_before(self)
        tied = _tied(self)
        before = getattr(self, "_tied_before", torch.zeros_like(tied))
        self.mergers[0][tied & ~before] = 0.5  # newly shared (a recalibration's picks): half each
        self.mergers[1].copy_(torch.where(tied, 1 - self.mergers[0], self.mergers[1]))
        self._tied_before = tied

    ColumnGates.merger_values, ColumnGates.clamp_ = _complementary_mergers, clamp_
    try:
        yield
    finally:
        ColumnGates.merger_values, ColumnGates.clamp_ = values_before, clamp_before


@contextlib.contextmanager
def random_subject_word():
    """Issue 28's "subject word randomised over other classes": in the joint fit the style LoRA reads "A {word} in
    {style} style" with the word drawn afresh each step from the toy world's shape words (from a stream of its own,
    so the fit's crops, noise and timesteps stay the plain fit's): the style it learns is tied to no subject word.
    The fit's saved prompts are the plain ones, so `generate` draws it as any fit."""
    from toyworld import world

    prepare_before, draw_before = training._prepare, training.FitState.draw

    def prepare(image, config, base, on_step, timings):
        state, prompts, timings = prepare_before(image, config, base, on_step, timings)
        state.style_choices = [training.encode_prompts(base, prompts._replace(style=f"A {word} in {config.style} style"))
                               ["style"] for word in world.SHAPES]
        state.word_rng = torch.Generator().manual_seed(config.seed + 1)
        return state, prompts, timings

    def draw(self, base):
        choices = getattr(self, "style_choices", None)
        if choices:
            self.embeds["style"] = choices[int(torch.randint(len(choices), (1,), generator=self.word_rng))]
        return draw_before(self, base)

    training._prepare, training.FitState.draw = prepare, draw
    try:
        yield
    finally:
        training._prepare, training.FitState.draw = prepare_before, draw_before


def _column_saliency(layer, kind: str) -> torch.Tensor:
    """(out,): a column's mean |dW * G| at this step, the quantity the cone score thresholds (0 where the LoRA
    has no gradient: not trained in this layer)."""
    if layer.grads(kind)[0] is None:
        return torch.zeros(layer.out_features, device=layer.merger(kind).device)
    return importance.saliency(layer, kind, layer.merger(kind)).mean(dim=1)


@contextlib.contextmanager
def importance_mergers():
    """Issue 28's "mergers initialised from the importance scores": a column that a recalibration makes shared
    (both LoRAs hold it where mergers learn) starts with each LoRA's merger at its saliency at that step over the
    larger of the two (the more important LoRA at 1, the other at the ratio) instead of 1 each, so the
    orthogonality loss starts from the importance's verdict rather than pushing both down together. The
    saliency, not its cone score: at the first recalibration every cone score of a toy fit is 0 (no entry above
    the threshold yet), which would leave most shared columns at 1 each."""
    recalibrate_before = training.recalibrate

    @torch.no_grad()
    def recalibrate(adapter, ratio):
        gates = adapter.gates
        tied_before = _tied(gates)
        scores = {name: torch.stack([_column_saliency(layer, kind) for kind in KINDS])
                  for name, layer in adapter.named_layers()}  # this step's, before the masks change
        recalibrate_before(adapter, ratio)
        fresh = _tied(gates) & ~tied_before
        for name, layer in adapter.named_layers():
            new, score = fresh[layer.columns()], scores[name]
            top = score.max(dim=0).values
            start = torch.where(top > 0, score / top.clamp_min(torch.finfo(score.dtype).tiny), torch.ones_like(score))
            for k, kind in enumerate(KINDS):
                merger = layer.merger(kind)
                merger.copy_(torch.where(new, start[k].to(merger.dtype), merger))

    training.recalibrate = recalibrate
    try:
        yield
    finally:
        training.recalibrate = recalibrate_before


@contextlib.contextmanager
def saliency_ties():
    """Column picks ranked by the cone score as the paper's, its ties broken by the saliency it thresholds instead
    of by column index. At the first recalibration of a toy fit every cone score is 0 (no entry above 1e-5 yet),
    so the paper's rule picks each layer's first 10 % of columns whatever the image (and the reference code, with
    its strict '>', picks none); ranked by saliency, the picks are the columns this image's gradient moves most.
    The tie-break adds less than one step of the cone score (1 / in_features), so it never reorders unequal
    scores."""
    scores_before = importance.cone_scores

    @torch.no_grad()
    def cone_scores(layer, kind, merger):
        cone = scores_before(layer, kind, merger)
        column = importance.saliency(layer, kind, merger).mean(dim=1)
        return cone + 0.5 / layer.in_features * column / column.max().clamp_min(torch.finfo(column.dtype).tiny)

    importance.cone_scores = cone_scores
    try:
        yield
    finally:
        importance.cone_scores = scores_before


PATCHES = {"complementary": complementary_gates, "random-subject": random_subject_word,
           "importance-mergers": importance_mergers, "saliency-ties": saliency_ties}
