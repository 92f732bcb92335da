"""The grouped expert computation: static shapes, no host syncs, traceable whole.

Every ``(token, slot)`` pair is a row. Rows are sorted by expert and the two
matmuls run as grouped GEMMs (``torch._grouped_mm`` with cumulative row
offsets) where the device and dtype allow it. Elsewhere a portable dense
formulation gives the same result with the same static shapes.
"""

from __future__ import annotations

import functools

import torch

from .common import check_expert_inputs, dequantize, gated_activation

# torch._grouped_mm wants 16-byte aligned row strides; its fake (tracing)
# implementation accepts bfloat16 only, so that is the one dtype used with it.
_GROUPED_MM_DTYPES = (torch.bfloat16,)
_GROUPED_MM_ALIGN_BYTES = 16


@functools.cache
def _cuda_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def grouped_mm_supported(
    hidden_states: torch.Tensor, hidden_size: int, intermediate_size: int
) -> bool:
    """Whether ``torch._grouped_mm`` can run this problem: bf16 on CPU or on CUDA sm90+,
    with hidden and intermediate sizes that keep rows 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm") or hidden_states.dtype not in _GROUPED_MM_DTYPES:
        return False
    align = _GROUPED_MM_ALIGN_BYTES // hidden_states.element_size()
    if hidden_size % align or intermediate_size % align:
        return False
    device = hidden_states.device
    if device.type == "cpu":
        return True
    if device.type == "cuda" and torch.version.hip is None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_capability(index) >= (9, 0)
    return False


def grouped_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    use_grouped_mm: bool | None = None,
) -> torch.Tensor:
    """Same contract and result as :func:`~moe_compile.experts.reference_experts`.

    ``use_grouped_mm=None`` picks ``torch._grouped_mm`` when
    :func:`grouped_mm_supported`; ``False`` forces the portable path (``True``
    forces the grouped GEMM and fails where it cannot run).
    """
    check_expert_inputs(
        hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, activation
    )
    hidden_size, intermediate_size = w13.shape[2], w2.shape[2]
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(hidden_states, hidden_size, intermediate_size)
    if use_grouped_mm:
        return _sorted_grouped_mm_experts(
            hidden_states, w13, w2, topk_weights, topk_ids, activation, w13_scale, w2_scale
        )
    return _dense_masked_experts(
        hidden_states, w13, w2, topk_weights, topk_ids, activation, w13_scale, w2_scale
    )


def _valid_slots(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened ids as int64 and whether each names a local expert."""
    ids = topk_ids.reshape(-1).long()
    return ids, (ids >= 0) & (ids < num_experts)


def _sorted_grouped_mm_experts(
    hidden_states, w13, w2, topk_weights, topk_ids, activation, w13_scale, w2_scale
):
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    dtype = hidden_states.dtype
    ids, valid = _valid_slots(topk_ids, num_experts)
    # Slots for other ranks' experts sort after every local expert and fall
    # outside all groups; their rows are masked out below.
    sort_key = torch.where(valid, ids, num_experts)
    order = torch.argsort(sort_key, stable=True)
    sorted_expert = sort_key[order]
    sorted_valid = valid[order]
    sorted_token = order // top_k
    sorted_weight = topk_weights.reshape(-1)[order].float()

    rows_per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    rows_per_expert.scatter_add_(0, sort_key, torch.ones_like(sort_key))
    group_end = torch.cumsum(rows_per_expert[:num_experts], dim=0).to(torch.int32)

    tokens = hidden_states[sorted_token]
    gate_up = torch._grouped_mm(tokens, w13.to(dtype).transpose(1, 2), offs=group_end)
    expert_of_row = sorted_expert.clamp(max=num_experts - 1)
    if w13_scale is not None:
        gate_up = (gate_up.float() * w13_scale.float()[expert_of_row]).to(dtype)
    intermediate = gated_activation(gate_up, activation).contiguous()
    down = torch._grouped_mm(intermediate, w2.to(dtype).transpose(1, 2), offs=group_end)
    down = down.float()
    if w2_scale is not None:
        down = down * w2_scale.float()[expert_of_row]
    # Rows past the last group are never written by the grouped GEMM and may
    # hold anything (even NaN), so they are selected away rather than scaled by 0.
    contribution = torch.where(sorted_valid.unsqueeze(-1), down * sorted_weight.unsqueeze(-1), 0.0)
    output = torch.zeros(
        num_tokens, hidden_states.shape[1], dtype=torch.float32, device=hidden_states.device
    )
    output.index_add_(0, sorted_token, contribution)
    return output.to(dtype)


def _dense_masked_experts(
    hidden_states, w13, w2, topk_weights, topk_ids, activation, w13_scale, w2_scale
):
    """Portable fallback: each local expert runs on every token, weighted by how much
    of the token's routing weight it received (0 for tokens that did not choose it).

    Costs ``num_experts / top_k`` times the grouped GEMM's FLOPs, but needs
    only static shapes and plain matmuls, so it runs on any device and dtype.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    dtype = hidden_states.dtype
    ids, valid = _valid_slots(topk_ids, num_experts)
    routing_weight = torch.where(valid, topk_weights.reshape(-1).float(), 0.0)
    # A token that names one expert in several slots gets the sum of those weights.
    weight_per_expert = torch.zeros(
        num_tokens, num_experts, dtype=torch.float32, device=hidden_states.device
    )
    weight_per_expert.scatter_add_(
        1,
        torch.where(valid, ids, 0).view(num_tokens, top_k),
        routing_weight.view(num_tokens, top_k),
    )
    output = torch.zeros(
        num_tokens, hidden_states.shape[1], dtype=torch.float32, device=hidden_states.device
    )
    for expert in range(num_experts):
        gate_up_weight = dequantize(
            w13[expert], None if w13_scale is None else w13_scale[expert], dtype
        )
        down_weight = dequantize(w2[expert], None if w2_scale is None else w2_scale[expert], dtype)
        expert_output = (
            gated_activation(hidden_states @ gate_up_weight.t(), activation) @ down_weight.t()
        )
        output = output + expert_output.float() * weight_per_expert[:, expert : expert + 1]
    return output.to(dtype)
