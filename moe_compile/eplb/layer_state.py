"""Per-layer EPLB state: the views of the model-wide tensors one MoE layer uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_LOAD_DTYPES = (torch.int32, torch.int64, torch.float32)


@dataclass
class EplbLayerState:
    """EPLB state of one MoE layer.

    EPLB is on for a router exactly when it holds an ``EplbLayerState`` (not
    ``None``). Every field is a tensor that is created once and then updated in
    place, so compiled graphs and captured CUDA graphs keep seeing the current
    values after a rebalance.
    """

    expert_load_view: torch.Tensor | None = None
    """``[P]`` per-physical-expert token counts of the current pass (int32)."""
    logical_to_physical_map: torch.Tensor | None = None
    """``[E, S]`` physical replicas of each logical expert, padded with -1."""
    logical_replica_count: torch.Tensor | None = None
    """``[E]`` number of valid entries in each row of the map."""
    should_record_tensor: torch.Tensor | None = None
    """0-d bool shared by all layers; counting happens only while it is true."""
    num_unpadded_tokens: torch.Tensor | None = None
    """Optional 0-d int: rows at or past it are padding and are not counted."""

    def set_layer_state(
        self,
        moe_layer_idx: int,
        expert_load_view: torch.Tensor,
        logical_to_physical_map: torch.Tensor,
        logical_replica_count: torch.Tensor,
    ) -> None:
        """Point this layer at row ``moe_layer_idx`` of the model-wide tensors.

        The fields become views (never copies), so an in-place update of the
        model-wide tensors reaches this layer and every graph that captured it.
        """
        self.expert_load_view = expert_load_view[moe_layer_idx]
        self.logical_to_physical_map = logical_to_physical_map[moe_layer_idx]
        self.logical_replica_count = logical_replica_count[moe_layer_idx]

    def validate(self, num_physical_experts: int | None = None) -> None:
        """Raise ``ValueError`` naming the first field that is missing or inconsistent.

        Only shapes, dtypes and devices are checked, so this is free of host
        syncs and safe to call while tracing. :meth:`validate_values` adds the
        checks that need to read the tensors.
        """
        for name in (
            "expert_load_view",
            "logical_to_physical_map",
            "logical_replica_count",
            "should_record_tensor",
        ):
            if getattr(self, name) is None:
                raise ValueError(f"EPLB requires {name} != None")
        load, l2p = self.expert_load_view, self.logical_to_physical_map
        counts, record = self.logical_replica_count, self.should_record_tensor
        if load.dim() != 1:
            raise ValueError(
                f"EPLB expert_load_view must be 1-D [num_physical_experts], got shape {tuple(load.shape)}"
            )
        if load.dtype not in _LOAD_DTYPES:
            raise ValueError(
                f"EPLB expert_load_view must be int32, int64 or float32, got {load.dtype}"
            )
        if num_physical_experts is not None and load.shape[0] != num_physical_experts:
            raise ValueError(
                f"EPLB expert_load_view has {load.shape[0]} entries but the layer has "
                f"{num_physical_experts} physical experts"
            )
        if l2p.dim() != 2 or l2p.shape[1] < 1:
            raise ValueError(
                "EPLB logical_to_physical_map must be 2-D [num_logical_experts, max_replicas] "
                f"with max_replicas >= 1, got shape {tuple(l2p.shape)}"
            )
        if l2p.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"EPLB logical_to_physical_map must be integer, got {l2p.dtype}")
        if counts.dim() != 1 or counts.shape[0] != l2p.shape[0]:
            raise ValueError(
                f"EPLB logical_replica_count must be [{l2p.shape[0]}] to match "
                f"logical_to_physical_map {tuple(l2p.shape)}, got shape {tuple(counts.shape)}"
            )
        if counts.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"EPLB logical_replica_count must be integer, got {counts.dtype}")
        if record.dim() != 0 or record.dtype != torch.bool:
            raise ValueError(
                "EPLB should_record_tensor must be a 0-d bool tensor, got "
                f"shape {tuple(record.shape)} dtype {record.dtype}"
            )
        unpadded = self.num_unpadded_tokens
        if unpadded is not None and (unpadded.dim() != 0 or unpadded.dtype not in _INTEGER_DTYPES):
            raise ValueError(
                "EPLB num_unpadded_tokens must be a 0-d integer tensor, got "
                f"shape {tuple(unpadded.shape)} dtype {unpadded.dtype}"
            )
        devices = {t.device for t in (load, l2p, counts, record)}
        if len(devices) != 1:
            raise ValueError(
                f"EPLB state tensors must share one device, got {sorted(map(str, devices))}"
            )

    def validate_values(self) -> None:
        """Check what needs the tensors' contents: replica counts within the map.

        This reads device memory (a host sync), so routers call it only in eager mode.
        """
        l2p, counts = self.logical_to_physical_map, self.logical_replica_count
        max_replicas = l2p.shape[1]
        if counts.numel() and bool((counts > max_replicas).any()):
            worst = int(counts.max())
            raise ValueError(
                f"EPLB logical_replica_count has an expert with {worst} replicas but "
                f"logical_to_physical_map holds only {max_replicas} per expert"
            )
        if counts.numel() and bool((counts < 0).any()):
            raise ValueError("EPLB logical_replica_count must not be negative")
