"""Builders shared by the pass tests."""

import torch

import moe_compile as mc


def make_eplb_state(
    num_logical: int,
    num_physical: int,
    max_replicas: int = 2,
    map_dtype: torch.dtype = torch.int64,
    load_dtype: torch.dtype = torch.int32,
    num_unpadded_tokens: int | None = None,
) -> mc.EplbLayerState:
    """Physical expert p holds logical expert p % E (SPEC section 4's initial layout)."""
    l2p = torch.full((num_logical, max_replicas), -1, dtype=map_dtype)
    counts = torch.zeros(num_logical, dtype=map_dtype)
    for physical in range(num_physical):
        logical = physical % num_logical
        l2p[logical, counts[logical]] = physical
        counts[logical] += 1
    unpadded = None if num_unpadded_tokens is None else torch.tensor(num_unpadded_tokens)
    return mc.EplbLayerState(
        expert_load_view=torch.zeros(num_physical, dtype=load_dtype),
        logical_to_physical_map=l2p,
        logical_replica_count=counts,
        should_record_tensor=torch.tensor(True),
        num_unpadded_tokens=unpadded,
    )


def tied_logits(num_tokens: int, num_experts: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Logits on a coarse grid: many exact ties, so the lower-index rule is exercised."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randint(-6, 6, (num_tokens, num_experts), generator=generator)
    return (grid / 2).to(dtype)
