"""The contract every router follows: validate, route, capture, remap, cast."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from moe_compile.eplb import REPLICA_POLICIES, EplbLayerState, eplb_map_to_physical_and_record


class BaseRouter(ABC):
    """Chooses ``top_k`` experts per token and, when EPLB is on, their replicas.

    EPLB is on exactly when ``eplb_state is not None``; there is no flag.
    ``global_num_experts`` counts physical experts (logical plus redundant),
    as the expert-load counter does.
    """

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        eplb_state: EplbLayerState | None = None,
        indices_dtype: torch.dtype | None = None,
        eplb_replica_policy: str = "token_hash",
    ):
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if top_k > global_num_experts:
            raise ValueError(
                f"top_k={top_k} is larger than the number of experts ({global_num_experts})"
            )
        if eplb_replica_policy not in REPLICA_POLICIES:
            raise ValueError(
                f"unknown eplb_replica_policy {eplb_replica_policy!r}; "
                f"expected one of {REPLICA_POLICIES}"
            )
        if indices_dtype is not None and (
            indices_dtype.is_floating_point or indices_dtype == torch.bool
        ):
            raise ValueError(f"indices_dtype must be an integer dtype, got {indices_dtype}")
        self.top_k = top_k
        self.global_num_experts = global_num_experts
        self.eplb_state = eplb_state
        self.indices_dtype = indices_dtype
        self.eplb_replica_policy = eplb_replica_policy
        self.capture_fn: Callable[[torch.Tensor], None] | None = None

    def set_capture_fn(self, capture_fn: Callable[[torch.Tensor], None] | None) -> None:
        """Call ``capture_fn(logical_ids)`` on every routing, before EPLB remaps them."""
        self.capture_fn = capture_fn

    def num_routable_experts(self, router_logits: torch.Tensor) -> int:
        """How many logical experts the returned ids may name (before EPLB)."""
        return router_logits.shape[-1]

    def select_experts(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route a batch: float32 weights ``[T, k']`` and ids ``[T, k']``.

        Ids are physical when EPLB is on, logical otherwise, in
        ``indices_dtype`` (int32 unless asked otherwise).
        """
        self._validate_inputs(hidden_states, router_logits)
        self._validate_eplb_state(router_logits)
        topk_weights, topk_ids = self._compute_routing(hidden_states, router_logits)
        if self.capture_fn is not None:
            self.capture_fn(topk_ids)
        topk_ids = self._apply_eplb_mapping(topk_ids)
        return topk_weights, topk_ids.to(self.indices_dtype or torch.int32)

    @abstractmethod
    def _compute_routing(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 weights and logical ids (any integer dtype) of one batch."""

    def _validate_inputs(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> None:
        if router_logits.dim() != 2:
            raise ValueError(
                f"router_logits must be 2-D [num_tokens, num_experts], got shape "
                f"{tuple(router_logits.shape)}"
            )
        if not router_logits.is_floating_point():
            raise ValueError(f"router_logits must be floating point, got {router_logits.dtype}")
        if hidden_states.shape[0] != router_logits.shape[0]:
            raise ValueError(
                f"hidden_states has {hidden_states.shape[0]} tokens but router_logits has "
                f"{router_logits.shape[0]}"
            )
        if self.top_k > self.num_routable_experts(router_logits):
            raise ValueError(
                f"top_k={self.top_k} is larger than the number of routable experts "
                f"({self.num_routable_experts(router_logits)}) in router_logits of shape "
                f"{tuple(router_logits.shape)}"
            )

    def _validate_eplb_state(self, router_logits: torch.Tensor | None = None) -> None:
        """Raise ``ValueError`` if EPLB is on and its state is incomplete or inconsistent."""
        if self.eplb_state is None:
            return
        self.eplb_state.validate(num_physical_experts=self.global_num_experts)
        if router_logits is not None:
            num_logical = self.eplb_state.logical_to_physical_map.shape[0]
            if num_logical != self.num_routable_experts(router_logits):
                raise ValueError(
                    f"EPLB logical_to_physical_map has {num_logical} logical experts but the "
                    f"router chooses among {self.num_routable_experts(router_logits)}"
                )
            if self.eplb_state.expert_load_view.device != router_logits.device:
                raise ValueError(
                    f"EPLB state is on {self.eplb_state.expert_load_view.device} but "
                    f"router_logits are on {router_logits.device}"
                )
        if not torch.compiler.is_compiling():
            self.eplb_state.validate_values()

    def _apply_eplb_mapping(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Logical -> physical ids, counting the load; identity when EPLB is off."""
        if self.eplb_state is None:
            return topk_ids
        return eplb_map_to_physical_and_record(
            topk_ids, self.eplb_state, policy=self.eplb_replica_policy
        )
