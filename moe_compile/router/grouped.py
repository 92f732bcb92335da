"""Grouped top-k routing (DeepSeek-V2/V3): pick expert groups first, then experts."""

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
from .topk import check_bias


def is_degenerate_grouping(num_experts: int, num_expert_group: int) -> bool:
    """Groupings that cannot split the experts into equal groups of two or more."""
    return num_experts <= num_expert_group or num_experts % num_expert_group != 0


def grouped_topk(
    router_logits: torch.Tensor,
    top_k: int,
    num_expert_group: int,
    topk_group: int,
    renormalize: bool,
    scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the best ``topk_group`` of ``num_expert_group`` groups, then top-k inside them.

    A group scores the sum of its two best biased scores when there is a bias,
    else its best score. Weights are the unbiased scores at the chosen ids.
    """
    scores = compute_scores(router_logits, scoring_func)
    num_tokens, num_experts = scores.shape
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    grouped_choice = choice.view(num_tokens, num_expert_group, num_experts // num_expert_group)
    if e_score_correction_bias is None:
        group_scores = grouped_choice.amax(dim=-1)
    else:
        group_scores = grouped_choice.topk(2, dim=-1).values.sum(dim=-1)
    _, group_ids = topk_lowest_index_on_ties(group_scores, topk_group)
    # A comparison, not a scatter: Inductor rewrites a one-column scatter into
    # a comparison anyway, and the traced graph should not depend on topk_group.
    groups = torch.arange(num_expert_group, device=router_logits.device)
    group_mask = (group_ids.unsqueeze(-1) == groups).any(dim=1)
    expert_mask = (
        group_mask.unsqueeze(-1).expand_as(grouped_choice).reshape(num_tokens, num_experts)
    )
    masked_choice = choice.masked_fill(~expert_mask, float("-inf"))
    _, topk_ids = topk_lowest_index_on_ties(masked_choice, top_k)
    topk_weights = scores.gather(-1, topk_ids)
    if renormalize:
        topk_weights = renormalize_weights(topk_weights, scoring_func)
    return topk_weights * routed_scaling_factor, topk_ids


class GroupedTopKRouter(BaseRouter):
    """DeepSeek-style grouped top-k with optional correction bias and scaling."""

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        num_expert_group: int,
        topk_group: int,
        eplb_state: EplbLayerState | None = None,
        renormalize: bool = True,
        scoring_func: str = "softmax",
        e_score_correction_bias: torch.Tensor | None = None,
        routed_scaling_factor: float = 1.0,
        indices_dtype: torch.dtype | None = None,
        eplb_replica_policy: str = "token_hash",
    ):
        super().__init__(top_k, global_num_experts, eplb_state, indices_dtype, eplb_replica_policy)
        check_scoring_func(scoring_func)
        if num_expert_group < 1:
            raise ValueError(f"num_expert_group must be >= 1, got {num_expert_group}")
        if not 1 <= topk_group <= num_expert_group:
            raise ValueError(
                f"topk_group must be in [1, num_expert_group={num_expert_group}], got {topk_group}"
            )
        if e_score_correction_bias is not None:
            check_bias(e_score_correction_bias)
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.renormalize = renormalize
        self.scoring_func = scoring_func
        self.e_score_correction_bias = e_score_correction_bias
        self.routed_scaling_factor = routed_scaling_factor

    def _validate_inputs(self, hidden_states, router_logits):
        super()._validate_inputs(hidden_states, router_logits)
        num_experts = router_logits.shape[-1]
        if is_degenerate_grouping(num_experts, self.num_expert_group):
            raise ValueError(
                f"GroupedTopKRouter needs num_experts divisible into num_expert_group equal "
                f"groups of at least 2: {num_experts} experts, {self.num_expert_group} groups "
                "(create_fused_moe_router falls back to plain top-k for such configs)"
            )
        group_size = num_experts // self.num_expert_group
        if self.top_k > self.topk_group * group_size:
            raise ValueError(
                f"top_k={self.top_k} exceeds the {self.topk_group * group_size} experts in the "
                f"kept groups (topk_group={self.topk_group} x group size {group_size})"
            )
        if self.e_score_correction_bias is not None:
            check_bias(self.e_score_correction_bias, num_experts)

    def _compute_routing(self, hidden_states, router_logits):
        return grouped_topk(
            router_logits,
            self.top_k,
            self.num_expert_group,
            self.topk_group,
            self.renormalize,
            self.scoring_func,
            self.e_score_correction_bias,
            self.routed_scaling_factor,
        )
