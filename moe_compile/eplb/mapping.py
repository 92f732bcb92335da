"""Logical -> physical expert remapping and load counting, in plain PyTorch.

This is the reference the fused kernel and the graph passes must equal. It is
written so that ``torch.compile(fullgraph=True)`` traces it whole: no host
syncs, no data-dependent shapes, no ``bincount``.
"""

from __future__ import annotations

import torch

from .layer_state import EplbLayerState

REPLICA_POLICIES = ("modulo", "token_hash")
TOKEN_HASH_MULTIPLIER = 2654435769  # Knuth's multiplicative hash, 2**32 / golden ratio
# The same multiplier modulo 2**32, as a signed 32-bit value: the product's low
# 32 bits are unchanged, and Inductor, which folds ``arange * constant`` into
# an int32 index expression, can then compile it (2654435769 itself is out of
# int32 range, and Triton refuses the kernel for any batch of 16 or more tokens).
_TOKEN_HASH_MULTIPLIER_INT32 = TOKEN_HASH_MULTIPLIER - (1 << 32)


def replica_index(
    slot: torch.Tensor, top_k: int, replica_count: torch.Tensor, policy: str
) -> torch.Tensor:
    """Which of an expert's ``replica_count`` replicas flattened slot ``slot`` uses."""
    if policy == "modulo":
        return slot % replica_count
    if policy == "token_hash":
        token = slot // top_k
        return ((token * _TOKEN_HASH_MULTIPLIER_INT32) & 0xFFFFFFFF) % replica_count
    raise ValueError(f"unknown EPLB replica policy {policy!r}; expected one of {REPLICA_POLICIES}")


def map_to_physical(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    num_physical_experts: int,
    should_record: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None = None,
    policy: str = "token_hash",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The functional core of :func:`eplb_map_to_physical_and_record`.

    Returns ``(physical_ids, counted_ids, increments)``, all ``[T, k]`` (int64,
    int64, bool): accumulating ``increments`` at ``counted_ids`` into the load
    counter records the batch.
    """
    if policy not in REPLICA_POLICIES:
        raise ValueError(
            f"unknown EPLB replica policy {policy!r}; expected one of {REPLICA_POLICIES}"
        )
    if topk_ids.dim() != 2:
        raise ValueError(
            f"topk_ids must be 2-D [num_tokens, top_k], got shape {tuple(topk_ids.shape)}"
        )
    num_logical = logical_to_physical_map.shape[0]
    num_tokens, top_k = topk_ids.shape

    # Everything stays 2-D and the slot index is built from two aranges: no
    # flatten of the ids and no ``T * k`` size. A traced graph then has no
    # symbolic-size arithmetic that several layers would share, so the passes
    # can match each layer's chain on its own.
    ids = topk_ids.long()
    is_logical = (ids >= 0) & (ids < num_logical)
    safe_ids = torch.where(is_logical, ids, 0)
    token = torch.arange(num_tokens, device=ids.device).unsqueeze(-1)
    slot = token * top_k + torch.arange(top_k, device=ids.device)
    replica_count = logical_replica_count.long()[safe_ids].clamp(min=1)
    replica = replica_index(slot, top_k, replica_count, policy)
    physical = torch.where(is_logical, logical_to_physical_map.long()[safe_ids, replica], -1)

    record = (physical >= 0) & (physical < num_physical_experts) & should_record
    if num_unpadded_tokens is not None:
        record = record & (slot < num_unpadded_tokens * top_k)
    return physical, torch.where(record, physical, 0), record


def eplb_map_to_physical_and_record(
    topk_ids: torch.Tensor,
    eplb_state: EplbLayerState,
    policy: str = "token_hash",
) -> torch.Tensor:
    """Map logical expert ids ``[T, k]`` to physical ids and count the load.

    Returns physical ids with the dtype and shape of ``topk_ids``; ids outside
    ``[0, E)`` become -1. Adds one to ``eplb_state.expert_load_view[phys]`` for
    every routed slot while ``should_record_tensor`` is true, skipping padding
    rows (``num_unpadded_tokens``) and map entries outside ``[0, P)``.
    """
    load = eplb_state.expert_load_view
    physical, counted_ids, increments = map_to_physical(
        topk_ids,
        eplb_state.logical_to_physical_map,
        eplb_state.logical_replica_count,
        load.shape[0],
        eplb_state.should_record_tensor,
        eplb_state.num_unpadded_tokens,
        policy,
    )
    load.index_put_((counted_ids,), increments.to(load.dtype), accumulate=True)
    return physical.to(topk_ids.dtype)
