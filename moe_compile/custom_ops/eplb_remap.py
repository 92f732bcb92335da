"""``moe_compile::eplb_remap``: EPLB remapping + load counting as one functional op.

The graph passes put this op where they find the eager mapping chain, so a
later pass can fold it into the routing kernel (``route_eplb``). Where that
fold is not possible it still runs, as the same plain PyTorch math.
"""

from __future__ import annotations

import torch

from moe_compile.eplb.mapping import map_to_physical


@torch.library.custom_op("moe_compile::eplb_remap", mutates_args=())
def eplb_remap(
    topk_ids: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    should_record: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None,
    replica_policy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(physical_ids int64 [T, k], updated expert_load_view)``; inputs are not written."""
    physical, counted_ids, increments = map_to_physical(
        topk_ids,
        logical_to_physical_map,
        logical_replica_count,
        expert_load_view.shape[0],
        should_record,
        num_unpadded_tokens,
        replica_policy,
    )
    new_load = expert_load_view.index_put(
        (counted_ids,), increments.to(expert_load_view.dtype), accumulate=True
    )
    return physical, new_load


@eplb_remap.register_fake
def _(
    topk_ids,
    logical_to_physical_map,
    logical_replica_count,
    expert_load_view,
    should_record,
    num_unpadded_tokens,
    replica_policy,
):
    return topk_ids.new_empty(topk_ids.shape, dtype=torch.int64), torch.empty_like(expert_load_view)
