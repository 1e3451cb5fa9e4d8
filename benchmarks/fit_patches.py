"""Changes to the fit that the disentanglement benchmark measures but the fit code does not carry.

Each patch is a context manager: the fits trained inside it are made the changed way (it patches unziplora's
classes for that time only). A benchmark method names its patch (`Method.patch`); its fits are kept in its own
folder with the patch's name beside them, so they are never mistaken for plain fits. A patch that measures as a
gain on every image set moves into the fit code as a setting; one that does not stays here, or goes.
"""

from __future__ import annotations

import contextlib

import torch

from unziplora.layers import ColumnGates


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
    from unziplora import training

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


PATCHES = {"complementary": complementary_gates, "random-subject": random_subject_word}
