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
def saliency(layer: DualLoRALinear, kind: str, merger: torch.Tensor) -> torch.Tensor:
    """(out, in): |dW * G|, dW = B A, G = (B gradA + gradB A) * m[:, None] (the LoRA's weight change times its
    gradient, entry by entry)."""
    A, B = layer.factors(kind)
    grad_A, grad_B = layer.grads(kind)
    return (B @ A * ((B @ grad_A + grad_B @ A) * merger[:, None])).abs()


@torch.no_grad()
def cone_scores(layer: DualLoRALinear, kind: str, merger: torch.Tensor) -> torch.Tensor:
    """score_j = mean_i 1[|dW_ij * G_ij| > 1e-5] (j an output column): the share of its saliency above 1e-5."""
    return (saliency(layer, kind, merger) > CONE_THRESHOLD).float().mean(dim=1)


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
def recalibrate(adapter: UnZipLoRA, ratio: float) -> None:
    """OR the top `ratio` columns of every sparse LoRA, by this step's cone scores, into its mask.

    The paper's rule: in shared (exclusive) blocks content picks first and neither LoRA may take a column the
    other holds, so the two masks stay strictly disjoint there; in a LoRA's own blocks it holds every column and
    the other's sparse picks overlap it (the mergers and the orthogonality loss are to separate them).
    """
    for _, layer in adapter.named_layers():
        k = int(ratio * layer.out_features)
        for kind in [kind for kind in KINDS if layer.role.is_sparse(kind)]:  # content first
            other = KINDS[1 - KINDS.index(kind)]
            mask = layer.mask(kind)  # a view: writing it writes the gates
            forbidden = layer.mask(other) if layer.role.exclusive else None
            picked = top_k_columns(cone_scores(layer, kind, layer.merger(kind)), k, forbidden)
            mask.copy_(torch.maximum(mask, picked))


def mask_stats(adapter: UnZipLoRA) -> dict[str, dict[str, float]]:
    """Fraction of columns each LoRA holds, per block role, and their overlap."""
    by_role: dict[str, list[DualLoRALinear]] = {}
    for _, layer in adapter.named_layers():
        by_role.setdefault(layer.role.name, []).append(layer)
    stats = {}
    for role, layers in sorted(by_role.items()):
        content, style = (torch.cat([layer.mask(kind) for layer in layers]) for kind in KINDS)
        stats[role] = {"content": float(content.mean()), "style": float(style.mean()),
                       "overlap": float((content * style).mean()), "layers": len(layers)}
    return stats
