"""Plain and biased top-k routers (Mixtral, Qwen-MoE, DeepSeek-style bias)."""

from __future__ import annotations

import torch

from moe_compile.eplb import EplbLayerState

from .base import BaseRouter
from .scoring import (
    check_scoring_func,
    compute_scores,
    renormalize_weights,
    topk_lowest_index_on_ties,
)


def fused_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring_func: str = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score, take the top k (lower index wins ties), optionally renormalize."""
    scores = compute_scores(router_logits, scoring_func)
    topk_weights, topk_ids = topk_lowest_index_on_ties(scores, top_k)
    if renormalize:
        topk_weights = renormalize_weights(topk_weights, scoring_func)
    return topk_weights, topk_ids


def fused_topk_bias(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scoring_func: str = "softmax",
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select with ``scores + bias``, weigh with the unbiased scores."""
    scores = compute_scores(router_logits, scoring_func)
    choice = scores + e_score_correction_bias.float()
    _, topk_ids = topk_lowest_index_on_ties(choice, top_k)
    topk_weights = scores.gather(-1, topk_ids)
    if renormalize:
        topk_weights = renormalize_weights(topk_weights, scoring_func)
    return topk_weights * routed_scaling_factor, topk_ids


def check_bias(e_score_correction_bias: torch.Tensor, num_experts: int | None = None) -> None:
    if not isinstance(e_score_correction_bias, torch.Tensor) or e_score_correction_bias.dim() != 1:
        raise ValueError("e_score_correction_bias must be a 1-D tensor [num_experts]")
    if num_experts is not None and e_score_correction_bias.shape[0] != num_experts:
        raise ValueError(
            f"e_score_correction_bias has {e_score_correction_bias.shape[0]} entries but "
            f"router_logits have {num_experts} experts"
        )


class FusedTopKRouter(BaseRouter):
    """``softmax|sigmoid(logits)`` -> top-k -> optional renormalization."""

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        eplb_state: EplbLayerState | None = None,
        renormalize: bool = True,
        scoring_func: str = "softmax",
        indices_dtype: torch.dtype | None = None,
        eplb_replica_policy: str = "token_hash",
    ):
        super().__init__(top_k, global_num_experts, eplb_state, indices_dtype, eplb_replica_policy)
        check_scoring_func(scoring_func)
        self.renormalize = renormalize
        self.scoring_func = scoring_func

    def _compute_routing(self, hidden_states, router_logits):
        return fused_topk(router_logits, self.top_k, self.renormalize, self.scoring_func)


class FusedTopKBiasRouter(BaseRouter):
    """Top-k selected on ``scores + e_score_correction_bias``, weighted by ``scores``."""

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        e_score_correction_bias: torch.Tensor,
        eplb_state: EplbLayerState | None = None,
        renormalize: bool = True,
        scoring_func: str = "softmax",
        routed_scaling_factor: float = 1.0,
        indices_dtype: torch.dtype | None = None,
        eplb_replica_policy: str = "token_hash",
    ):
        super().__init__(top_k, global_num_experts, eplb_state, indices_dtype, eplb_replica_policy)
        check_scoring_func(scoring_func)
        check_bias(e_score_correction_bias)
        self.e_score_correction_bias = e_score_correction_bias
        self.renormalize = renormalize
        self.scoring_func = scoring_func
        self.routed_scaling_factor = routed_scaling_factor

    def _validate_inputs(self, hidden_states, router_logits):
        super()._validate_inputs(hidden_states, router_logits)
        check_bias(self.e_score_correction_bias, router_logits.shape[-1])

    def _compute_routing(self, hidden_states, router_logits):
        return fused_topk_bias(
            router_logits,
            self.e_score_correction_bias,
            self.top_k,
            self.renormalize,
            self.scoring_func,
            self.routed_scaling_factor,
        )
