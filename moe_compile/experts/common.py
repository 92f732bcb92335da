"""What both expert implementations share: the activation, input checks, weight dequantization."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` where ``gate`` is the first half of the last dim and ``up`` the second."""
    intermediate_size = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :intermediate_size], gate_up[..., intermediate_size:]
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def check_expert_inputs(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    activation: str,
) -> None:
    """Shape checks only (no tensor reads), so they are free while tracing."""
    check_activation(activation)
    if hidden_states.dim() != 2:
        raise ValueError(
            f"hidden_states must be 2-D [num_tokens, hidden_size], got shape {tuple(hidden_states.shape)}"
        )
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            "w13 must be [num_experts, 2 * intermediate, hidden] and w2 [num_experts, hidden, "
            f"intermediate]; got shapes {tuple(w13.shape)} and {tuple(w2.shape)}"
        )
    num_experts, double_intermediate, hidden_size = w13.shape
    intermediate_size = double_intermediate // 2
    if (
        double_intermediate % 2
        or hidden_size != hidden_states.shape[1]
        or tuple(w2.shape) != (num_experts, hidden_size, intermediate_size)
    ):
        raise ValueError(
            f"inconsistent expert shapes: hidden_states {tuple(hidden_states.shape)}, "
            f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )
    if topk_weights.shape != topk_ids.shape or topk_ids.dim() != 2:
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} "
            "must both be [num_tokens, k]"
        )
    if topk_ids.shape[0] != hidden_states.shape[0]:
        raise ValueError(
            f"topk_ids has {topk_ids.shape[0]} tokens but hidden_states has {hidden_states.shape[0]}"
        )
    if topk_ids.is_floating_point():
        raise ValueError(f"topk_ids must be integer, got {topk_ids.dtype}")
    for name, scale, rows in (
        ("w13_scale", w13_scale, double_intermediate),
        ("w2_scale", w2_scale, hidden_size),
    ):
        if scale is not None and tuple(scale.shape) != (num_experts, rows):
            raise ValueError(
                f"{name} must be per output channel [{num_experts}, {rows}], got {tuple(scale.shape)}"
            )


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``weight * scale`` per output channel (the second-to-last dim), in ``dtype``."""
    if scale is None:
        return weight.to(dtype)
    return (weight.float() * scale.float().unsqueeze(-1)).to(dtype)
