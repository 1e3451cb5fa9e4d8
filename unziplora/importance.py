"""Column importance ("cone" saliency) and the recalibration of the column masks (SPEC sections 4-5).

Run only at recalibration steps, right after the backward pass of a step taken with masks off, one
layer at a time under no_grad: this is the only place a dense (out x in) matrix is ever built.
"""

from __future__ import annotations

import torch

from .layers import DualLoRALinear, UnZipLoRA
from .roles import KINDS

CONE_THRESHOLD = 1e-5


@torch.no_grad()
def cone_scores(layer: DualLoRALinear, kind: str, merger: torch.Tensor) -> torch.Tensor:
    """score_j = mean_i 1[|dW_ij * G_ij| > 1e-5], dW = B A, G = (B gradA + gradB A) * m[:, None]."""
    A, B = layer.factors(kind)
    i = KINDS.index(kind)
    grad_A = layer.lora_A.grad[i * layer.rank:(i + 1) * layer.rank]
    grad_B = layer.lora_B.grad[:, i]
    delta_w = B @ A
    grad_w = (B @ grad_A + grad_B @ A) * merger[:, None]
    return ((delta_w * grad_w).abs() > CONE_THRESHOLD).float().mean(dim=1)


def top_k_columns(scores: torch.Tensor, k: int, forbidden: torch.Tensor | None = None) -> torch.Tensor:
    """A 0/1 vector with exactly min(k, allowed) ones at the highest scores, ties broken by index.

    (The reference code thresholds with a strict '>' on the k-th value, which can pick fewer columns, even
    none, on ties; exact top-k by index is a deliberate deviation.)
    """
    scores = scores.float().clone()
    if forbidden is not None:
        scores[forbidden.bool()] = float("-inf")
    k = min(k, int(torch.isfinite(scores).sum()))
    picked = torch.zeros_like(scores)
    if k > 0:
        # stable sort: equal scores keep index order, so the choice is deterministic
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        picked[order] = 1.0
    return picked


@torch.no_grad()
def recalibrate(adapter: UnZipLoRA, ratio: float, fresh: bool = False, owner: bool = False) -> None:
    """OR the top `ratio` columns of every sparse LoRA into its mask; with `fresh`, only among the columns
    it does not hold yet (so every recalibration adds `ratio` of the columns).

    The paper's rule: in shared (exclusive) blocks content picks first and neither LoRA may take a column the
    other holds, so the two masks stay strictly disjoint there; in a LoRA's own blocks it holds every column and
    the other's sparse picks overlap it (the mergers and the orthogonality loss are to separate them).
    With `owner`, no column is ever held by both: a sparse LoRA picks only among columns where its importance
    beats the other LoRA's, and a column it takes is taken from the other (full or sparse). "Off" LoRAs hold none.
    """
    masks, mergers = adapter.gates.masks, adapter.gates.mergers
    for _, layer in adapter.named_layers():
        cols = layer.columns()
        k = int(ratio * layer.out_features)
        sparse = [i for i, kind in enumerate(KINDS) if layer.role.is_sparse(kind)]
        if not sparse:
            continue
        scores = {i: cone_scores(layer, kind, mergers[i, cols]) for i, kind in enumerate(KINDS)
                  if i in sparse or (owner and layer.role.is_full(kind))}
        for i in sparse:  # content first
            other = 1 - i
            if owner:
                forbidden = (scores[other] >= scores[i]) if other in scores else torch.zeros_like(masks[i, cols])
            else:
                forbidden = masks[other, cols] if layer.role.exclusive else torch.zeros_like(masks[i, cols])
            if fresh:
                forbidden = torch.maximum(forbidden.float(), masks[i, cols])
            picked = top_k_columns(scores[i], k, forbidden)
            masks[i, cols] = torch.maximum(masks[i, cols], picked)
            if owner:  # what this LoRA won, the other no longer holds
                masks[other, cols] = masks[other, cols] * (1 - picked)


def mask_stats(adapter: UnZipLoRA) -> dict[str, dict[str, float]]:
    """Fraction of columns each LoRA holds, per block role, and their overlap."""
    masks = adapter.gates.masks
    by_role: dict[str, list[slice]] = {}
    for _, layer in adapter.named_layers():
        by_role.setdefault(layer.role.name, []).append(layer.columns())
    stats = {}
    for role, slices in sorted(by_role.items()):
        idx = torch.cat([torch.arange(s.start, s.stop) for s in slices])
        m = masks[:, idx]
        stats[role] = {"content": float(m[0].mean()), "style": float(m[1].mean()),
                       "overlap": float((m[0] * m[1]).mean()), "layers": len(slices)}
    return stats
