"""The plain per-expert loop: the readable definition of the expert computation.

For each expert, gather the tokens that chose it, run its gated MLP and add
``weight * output`` back to those tokens. It reads how many tokens each expert
got (a host sync), so it is for eager checks, not for ``torch.compile``.
"""

from __future__ import annotations

import torch

from .common import check_expert_inputs, dequantize, gated_activation


def reference_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden_states[t])``.

    ``expert_e(x) = w2[e] @ (act(w13[e, :I] @ x) * (w13[e, I:] @ x))``, computed
    in the dtype of ``hidden_states``; the weighted sum is accumulated in float32.
    Ids outside ``[0, num_experts)`` (e.g. -1 for experts held by another rank)
    contribute nothing. Scales, when given, dequantize the weights per output
    channel.
    """
    check_expert_inputs(
        hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, activation
    )
    dtype = hidden_states.dtype
    output = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for expert in range(w13.shape[0]):
        token_index, slot_index = torch.nonzero(topk_ids == expert, as_tuple=True)
        if token_index.numel() == 0:
            continue
        gate_up_weight = dequantize(
            w13[expert], None if w13_scale is None else w13_scale[expert], dtype
        )
        down_weight = dequantize(w2[expert], None if w2_scale is None else w2_scale[expert], dtype)
        tokens = hidden_states[token_index]
        expert_output = gated_activation(tokens @ gate_up_weight.t(), activation) @ down_weight.t()
        routing_weight = topk_weights[token_index, slot_index].float().unsqueeze(-1)
        output.index_add_(0, token_index, expert_output.float() * routing_weight)
    return output.to(dtype)
