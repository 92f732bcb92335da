"""Expert computation: the gated MLPs of the chosen experts, weighted and summed per token.

Two implementations behind one signature: ``"reference"`` (a per-expert loop,
eager only) and ``"grouped"`` (tokens sorted by expert, grouped GEMMs; the
default, traceable by ``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

import torch

from .common import ACTIVATIONS, gated_activation
from .grouped import grouped_experts, grouped_mm_supported
from .reference import reference_experts

EXPERT_IMPLS = {"grouped": grouped_experts, "reference": reference_experts}


def check_experts_impl(impl: str) -> None:
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"unknown experts_impl {impl!r}; expected one of {tuple(EXPERT_IMPLS)}")


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    impl: str = "grouped",
) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden_states[t])``.

    ``w13 [E, 2I, H]`` (gate rows, then up rows), ``w2 [E, H, I]``; ids outside
    ``[0, E)`` contribute nothing. Optional per-output-channel scales
    ``w13_scale [E, 2I]`` and ``w2_scale [E, H]`` dequantize integer weights.
    """
    check_experts_impl(impl)
    return EXPERT_IMPLS[impl](
        hidden_states,
        w13,
        w2,
        topk_weights,
        topk_ids,
        activation=activation,
        w13_scale=w13_scale,
        w2_scale=w2_scale,
    )


__all__ = [
    "ACTIVATIONS",
    "EXPERT_IMPLS",
    "check_experts_impl",
    "fused_experts",
    "gated_activation",
    "grouped_experts",
    "grouped_mm_supported",
    "reference_experts",
]
