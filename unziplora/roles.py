"""Block separation as data: which transformer blocks favour content, which style (SPEC section 5).

A role table maps regular expressions over UNet module names to a role. Each role says, for each LoRA,
whether it uses all output columns ("full") or a recalibrated sparse subset ("sparse"), and whether the
two sparse LoRAs must stay on disjoint columns ("exclusive"). Other UNets get their own table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("content", "style")


@dataclass(frozen=True)
class Role:
    name: str
    content: str  # "full" | "sparse"
    style: str  # "full" | "sparse"
    exclusive: bool = False  # sparse picks of the two LoRAs never share a column

    def is_full(self, kind: str) -> bool:
        return getattr(self, kind) == "full"


ROLES = {
    "content": Role("content", content="full", style="sparse"),
    "style": Role("style", content="sparse", style="full"),
    "shared": Role("shared", content="sparse", style="sparse", exclusive=True),
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
    # No block separation at all (the "prompt + column separation" ablation): every block shared.
    "none": [(r".*", "shared")],
}


def role_for(module_name: str, table: str | list[tuple[str, str]]) -> Role:
    rows = TABLES[table] if isinstance(table, str) else table
    for pattern, role in rows:
        if re.match(pattern, module_name):
            return ROLES[role]
    raise KeyError(f"no block role for {module_name}: add a row to the role table")
