"""Routers whose selection is not plain top-k over all experts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_compile.eplb import EplbLayerState

from .base import BaseRouter
from .scoring import compute_scores, renormalize_weights, topk_lowest_index_on_ties
from .topk import check_bias, fused_topk_bias

ZERO_EXPERT_TYPES = ("identity",)


class CustomRoutingRouter(BaseRouter):
    """Routes with a user function ``fn(hidden_states=, gating_output=, topk=, renormalize=)``.

    The function returns ``(weights, ids)``; they are cast to float32 and the
    index dtype. Example (Llama-4): top-k on the raw logits, then sigmoid.
    """

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        custom_routing_function: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        eplb_state: EplbLayerState | None = None,
        renormalize: bool = True,
        indices_dtype: torch.dtype | None = None,
        eplb_replica_policy: str = "token_hash",
    ):
        super().__init__(top_k, global_num_experts, eplb_state, indices_dtype, eplb_replica_policy)
        if not callable(custom_routing_function):
            raise ValueError("custom_routing_function must be callable")
        self.custom_routing_function = custom_routing_function
        self.renormalize = renormalize

    def _compute_routing(self, hidden_states, router_logits):
        topk_weights, topk_ids = self.custom_routing_function(
            hidden_states=hidden_states,
            gating_output=router_logits,
            topk=self.top_k,
            renormalize=self.renormalize,
        )
        return topk_weights.float(), topk_ids


def append_shared_experts(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    router_logits: torch.Tensor,
    num_fused_shared_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the shared experts (the last logit columns) after the routed ones:
    weight ``sigmoid(logit)``, id ``E_routed + i``."""
    num_routed = router_logits.shape[-1] - num_fused_shared_experts
    shared_weights = torch.sigmoid(router_logits[:, num_routed:].float())
    shared_ids = torch.arange(
        num_routed, num_routed + num_fused_shared_experts, device=router_logits.device
    ).expand(router_logits.shape[0], -1)
    return (
        torch.cat([topk_weights, shared_weights], dim=-1),
        torch.cat([topk_ids, shared_ids], dim=-1),
    )


def shared_routed_topk(
    router_logits: torch.Tensor, top_k: int, num_fused_shared_experts: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k over the routed columns, then the shared columns appended."""
    num_routed = router_logits.shape[-1] - num_fused_shared_experts
    scores = compute_scores(router_logits[:, :num_routed], "softmax")
    routed_weights, routed_ids = topk_lowest_index_on_ties(scores, top_k)
    if renormalize:
        routed_weights = renormalize_weights(routed_weights, "softmax")
    return append_shared_experts(
        routed_weights, routed_ids, router_logits, num_fused_shared_experts
    )


class SharedRoutedRouter(BaseRouter):
    """Routed experts plus ``num_fused_shared_experts`` shared experts fused into one MoE call.

    The last ``num_fused_shared_experts`` logit columns belong to the shared
    experts. Routed experts: softmax top-k over the other columns. Shared
    experts are appended as columns ``[k, k + n_shared)`` with weight
    ``sigmoid(logit)`` and id ``E_routed + i``. Shared experts live on every
    rank, so EPLB remaps only the routed columns.
    """

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        num_fused_shared_experts: int,
        eplb_state: EplbLayerState | None = None,
        renormalize: bool = True,
        indices_dtype: torch.dtype | None = None,
        eplb_replica_policy: str = "token_hash",
    ):
        super().__init__(top_k, global_num_experts, eplb_state, indices_dtype, eplb_replica_policy)
        if num_fused_shared_experts < 1:
            raise ValueError(
                f"num_fused_shared_experts must be >= 1, got {num_fused_shared_experts}"
            )
        self.num_fused_shared_experts = num_fused_shared_experts
        self.renormalize = renormalize

    def num_routable_experts(self, router_logits):
        return router_logits.shape[-1] - self.num_fused_shared_experts

    def _compute_routing(self, hidden_states, router_logits):
        return shared_routed_topk(
            router_logits, self.top_k, self.num_fused_shared_experts, self.renormalize
        )

    def _apply_eplb_mapping(self, topk_ids):
        if self.eplb_state is None:
            return topk_ids
        routed_ids = super()._apply_eplb_mapping(topk_ids[:, : self.top_k])
        return torch.cat([routed_ids, topk_ids[:, self.top_k :]], dim=-1)


class ZeroExpertRouter(BaseRouter):
    """LongCat-Flash zero-computation experts.

    Biased top-k over ``num_logical_experts`` real experts followed by zero
    experts (logit columns at and past ``num_logical_experts``). A slot that
    chose a zero expert adds ``hidden_states * weight`` ("identity") to
    :attr:`zero_expert_output`, computed from the ids before EPLB; then it gets
    id 0 and weight 0 so the expert computation ignores it.
    """

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        e_score_correction_bias: torch.Tensor,
        num_logical_experts: int,
        zero_expert_type: str = "identity",
        eplb_state: EplbLayerState | None = None,
        renormalize: bool = False,
        scoring_func: str = "softmax",
        routed_scaling_factor: float = 1.0,
        indices_dtype: torch.dtype | None = None,
        eplb_replica_policy: str = "token_hash",
    ):
        super().__init__(top_k, global_num_experts, eplb_state, indices_dtype, eplb_replica_policy)
        if zero_expert_type not in ZERO_EXPERT_TYPES:
            raise ValueError(
                f"unknown zero_expert_type {zero_expert_type!r}; expected one of {ZERO_EXPERT_TYPES}"
            )
        if num_logical_experts is None or num_logical_experts < 1:
            raise ValueError("ZeroExpertRouter needs num_logical_experts >= 1 (the real experts)")
        check_bias(e_score_correction_bias)
        self.e_score_correction_bias = e_score_correction_bias
        self.num_logical_experts = num_logical_experts
        self.zero_expert_type = zero_expert_type
        self.renormalize = renormalize
        self.scoring_func = scoring_func
        self.routed_scaling_factor = routed_scaling_factor
        self.zero_expert_output: torch.Tensor | None = None

    def num_routable_experts(self, router_logits):
        return self.num_logical_experts

    def _validate_inputs(self, hidden_states, router_logits):
        if router_logits.dim() == 2 and router_logits.shape[-1] <= self.num_logical_experts:
            raise ValueError(
                f"router_logits have {router_logits.shape[-1]} columns; ZeroExpertRouter needs "
                f"the {self.num_logical_experts} real experts followed by at least one zero expert"
            )
        super()._validate_inputs(hidden_states, router_logits)
        check_bias(self.e_score_correction_bias, router_logits.shape[-1])

    def _compute_routing(self, hidden_states, router_logits):
        topk_weights, topk_ids = fused_topk_bias(
            router_logits,
            self.e_score_correction_bias,
            self.top_k,
            self.renormalize,
            self.scoring_func,
            self.routed_scaling_factor,
        )
        topk_weights, topk_ids, zero_weight = mask_zero_experts(
            topk_weights, topk_ids, self.num_logical_experts
        )
        self.zero_expert_output = (hidden_states.float() * zero_weight).to(hidden_states.dtype)
        return topk_weights, topk_ids


def mask_zero_experts(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_real_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots that chose a zero expert (id ``>= num_real_experts``) get id 0 and weight 0;
    also returns each token's total weight on zero experts, ``[T, 1]``."""
    is_zero_expert = topk_ids >= num_real_experts
    zero_weight = torch.where(is_zero_expert, topk_weights, 0.0).sum(dim=-1, keepdim=True)
    return (
        torch.where(is_zero_expert, 0.0, topk_weights),
        torch.where(is_zero_expert, 0, topk_ids),
        zero_weight,
    )
