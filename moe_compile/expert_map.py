"""Which global (physical) experts each expert-parallel rank holds, and in which local slot."""

from __future__ import annotations

import torch

EXPERT_PLACEMENTS = ("linear", "round_robin")


class ExpertMapManager:
    """Placement of ``global_num_experts`` experts over ``ep_size`` ranks.

    Every rank gets ``global_num_experts // ep_size`` experts and the first
    ``global_num_experts % ep_size`` ranks get one more. ``"linear"`` gives rank
    ``r`` the contiguous block starting at ``r * base + min(r, rem)``;
    ``"round_robin"`` gives it experts ``r, r + ep_size, r + 2 * ep_size, ...``.
    A rank's local slot ``s`` holds the ``s``-th of its experts in ascending
    global order.
    """

    def __init__(self, global_num_experts: int, ep_size: int, placement: str = "linear"):
        if not isinstance(global_num_experts, int) or global_num_experts < 1:
            raise ValueError(
                f"global_num_experts must be a positive int, got {global_num_experts!r}"
            )
        if not isinstance(ep_size, int) or ep_size < 1:
            raise ValueError(f"ep_size must be a positive int, got {ep_size!r}")
        if placement not in EXPERT_PLACEMENTS:
            raise ValueError(
                f"unknown expert placement {placement!r}; expected one of {EXPERT_PLACEMENTS}"
            )
        self.global_num_experts = global_num_experts
        self.ep_size = ep_size
        self.placement = placement

    def _check_rank(self, ep_rank: int) -> None:
        if not isinstance(ep_rank, int) or not 0 <= ep_rank < self.ep_size:
            raise ValueError(f"ep_rank must be in [0, {self.ep_size}), got {ep_rank!r}")

    def local_num_experts(self, ep_rank: int) -> int:
        """How many experts rank ``ep_rank`` holds."""
        self._check_rank(ep_rank)
        base, rem = divmod(self.global_num_experts, self.ep_size)
        return base + (1 if ep_rank < rem else 0)

    def local_expert_ids(self, ep_rank: int) -> list[int]:
        """Global ids of the experts on ``ep_rank``, in local slot order."""
        count = self.local_num_experts(ep_rank)
        if self.placement == "linear":
            base, rem = divmod(self.global_num_experts, self.ep_size)
            start = ep_rank * base + min(ep_rank, rem)
            return list(range(start, start + count))
        return list(range(ep_rank, self.global_num_experts, self.ep_size))

    def owner(self, global_expert_id: int) -> tuple[int, int]:
        """``(rank, local slot)`` that holds ``global_expert_id``."""
        if not 0 <= global_expert_id < self.global_num_experts:
            raise ValueError(
                f"global expert id must be in [0, {self.global_num_experts}), got {global_expert_id}"
            )
        if self.placement == "round_robin":
            return global_expert_id % self.ep_size, global_expert_id // self.ep_size
        base, rem = divmod(self.global_num_experts, self.ep_size)
        big_block_end = rem * (base + 1)
        if global_expert_id < big_block_end:
            return divmod(global_expert_id, base + 1)
        rank, slot = divmod(global_expert_id - big_block_end, base)
        return rem + rank, slot

    def expert_map(self, ep_rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """int32 ``[global_num_experts]``: local slot of each global expert on ``ep_rank``, -1 if absent."""
        mapping = torch.full((self.global_num_experts,), -1, dtype=torch.int32, device=device)
        local_ids = self.local_expert_ids(ep_rank)
        if local_ids:
            mapping[torch.tensor(local_ids, device=device)] = torch.arange(
                len(local_ids), dtype=torch.int32, device=device
            )
        return mapping

    def __repr__(self) -> str:
        return (
            f"ExpertMapManager(global_num_experts={self.global_num_experts}, "
            f"ep_size={self.ep_size}, placement={self.placement!r})"
        )
