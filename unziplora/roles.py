"""Block separation as data: which transformer blocks favour content, which style (SPEC section 5).

A role table maps regular expressions over UNet module names to a role. Each role says, for each LoRA,
whether it uses all output columns ("full"), a recalibrated sparse subset ("sparse") or none ("off"), and
whether the two sparse LoRAs must stay on disjoint columns ("exclusive"). Other UNets get their own table.
The roles and tables below the method's own also express the baselines of SPEC section 10 (B-LoRA, no block
separation, no column separation); the benchmark's ablation tables are its own (benchmarks/disentangle.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("content", "style")


@dataclass(frozen=True)
class Role:
    name: str
    content: str  # "full" | "sparse" | "off"
    style: str  # "full" | "sparse" | "off"
    exclusive: bool = False  # sparse picks of the two LoRAs never share a column

    def is_full(self, kind: str) -> bool:
        return getattr(self, kind) == "full"

    def is_sparse(self, kind: str) -> bool:
        return getattr(self, kind) == "sparse"


ROLES = {
    "content": Role("content", content="full", style="sparse"),
    "style": Role("style", content="sparse", style="full"),
    "shared": Role("shared", content="sparse", style="sparse", exclusive=True),
    # not UnZipLoRA's: both LoRAs on every column (no column separation), or a LoRA on one kind only
    "both": Role("both", content="full", style="full"),
    "content-only": Role("content-only", content="full", style="off"),
    "style-only": Role("style-only", content="off", style="full"),
    "off": Role("off", content="off", style="off"),
}

# pattern (matched with re.match against the module name) -> role; the first match wins.
TABLES: dict[str, list[tuple[str, str]]] = {
    "sdxl": [
        (r"up_blocks\.0\.attentions\.[02]\.", "content"),
        (r"up_blocks\.0\.attentions\.1\.", "style"),
        (r"up_blocks\.1\.attentions\.\d+\.", "style"),
        (r"mid_block\.attentions\.0\.", "shared"),
        (r"down_blocks\.[12]\.attentions\.\d+\.", "shared"),
    ],
    # The toy world's mini-SDXL (toyworld/weights/toy-sdxl), from its block probe (`python -m toyworld.evaluate
    # toy --probe`; figures in docs/toy-world.md). Unlike SDXL, content sits in the lowest-resolution blocks here.
    # The highest-resolution output blocks (up_blocks.1) take nothing from the prompt, but their self-attention
    # draws the fine texture that IS the style (dots, stripes): as in SDXL's table they are the style LoRA's
    # (the probe's own suggestion, "toy-probe", leaves them shared: benchmarks/disentangle.py's probe-table row).
    "toy": [
        (r"down_blocks\.1\.attentions\.0\.", "shared"),
        (r"down_blocks\.2\.attentions\.0\.", "content"),
        (r"mid_block\.attentions\.0\.", "content"),
        (r"up_blocks\.[01]\.attentions\.\d+\.", "style"),
    ],
    "toy-blora": [
        (r"down_blocks\.2\.attentions\.0\.", "content-only"),
        (r"up_blocks\.0\.attentions\.0\.", "style-only"),
        (r".*", "off"),
    ],
    # No block separation at all (the "prompt + column separation" ablation): every block shared.
    "none": [(r".*", "shared")],
    # Neither block nor column separation (the "prompt separation only" ablation; with one prompt for all
    # three, a DreamBooth-LoRA of rank 2r): both LoRAs on every column of every block.
    "free": [(r".*", "both")],
    # B-LoRA (SPEC section 10): one LoRA on the content block and the style block only, split by block.
    "sdxl-blora": [
        (r"up_blocks\.0\.attentions\.0\.", "content-only"),
        (r"up_blocks\.0\.attentions\.1\.", "style-only"),
        (r".*", "off"),
    ],
}


def role_for(module_name: str, table: str | list[tuple[str, str]]) -> Role:
    rows = TABLES[table] if isinstance(table, str) else table
    for pattern, role in rows:
        if re.match(pattern, module_name):
            return ROLES[role]
    raise KeyError(f"no block role for {module_name}: add a row to the role table")
