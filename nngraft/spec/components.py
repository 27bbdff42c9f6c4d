"""The component names a spec may use: per-layer components, global ones, and the groups that
stand for several (which modules they are on a given architecture is :mod:`nngraft.arch`'s job).

Example:
    >>> COMPONENT_GROUPS["mlp"]
    ('gate', 'up', 'down')
"""

from __future__ import annotations

from typing import Literal

LAYER_COMPONENTS: tuple[str, ...] = (
    "ln_attn", "q", "k", "v", "q_norm", "k_norm", "o", "ln_mlp", "gate", "up", "down",
)
"""Components that live inside every transformer block (one per layer)."""

GLOBAL_COMPONENTS: tuple[str, ...] = ("embed", "pos_embed", "ln_final", "lm_head")
"""Components outside the blocks. A rule's ``layers`` does not apply to them."""

COMPONENT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q", "k", "v", "q_norm", "k_norm", "o"),
    "mlp": ("gate", "up", "down"),
    "mlp_in": ("gate", "up"),
    "all": LAYER_COMPONENTS,
    "everything": LAYER_COMPONENTS + GLOBAL_COMPONENTS,
}
"""Names that stand for several components. A group expands to the members the architecture
has (``mlp`` on GPT-2 is ``up`` + ``down``); naming a single component it lacks is an error."""

COMPONENTS: tuple[str, ...] = GLOBAL_COMPONENTS + LAYER_COMPONENTS
ComponentName = Literal[
    "embed", "pos_embed", "ln_final", "lm_head",
    "ln_attn", "q", "k", "v", "q_norm", "k_norm", "o", "ln_mlp", "gate", "up", "down",
    "attn", "mlp", "mlp_in", "all", "everything",
]
