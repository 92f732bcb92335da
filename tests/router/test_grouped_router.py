"""GroupedTopKRouter (DeepSeek-V2/V3) against a per-token float64 reference."""

import math

import numpy as np
import pytest
import torch
from moe_reference import SCORING_FUNCS, grid_logits, grouped_topk_reference
from test_topk_routers import NUM_EXPERTS, NUM_TOKENS, TOP_K, assert_routing_equal

from moe_compile.router import GroupedTopKRouter

GROUPS_FOR = {8: 4, 60: 4, 128: 8, 256: 8}


def topk_group_for(num_experts: int, num_groups: int, top_k: int) -> int:
    group_size = num_experts // num_groups
    return min(num_groups, max(math.ceil(top_k / group_size), num_groups // 2))


def group_constant_bias(num_experts: int, num_groups: int, generator) -> torch.Tensor:
    """One bias in {0, 2, 4} per group.

    Within a group every expert has the same bias, so two groups' top-2 sums are
    equal only when their two best logits are, which keeps ties exact and every
    other pair of group scores far apart.
    """
    per_group = (torch.randint(0, 3, (num_groups,), generator=generator) * 2).float()
    return per_group.repeat_interleave(num_experts // num_groups)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("scoring_func", SCORING_FUNCS)
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("num_experts", NUM_EXPERTS)
def test_grouped_topk_matches_reference(num_experts, top_k, scoring_func, renormalize, with_bias):
    generator = torch.Generator().manual_seed(num_experts * 10 + top_k)
    num_groups = GROUPS_FOR[num_experts]
    topk_group = topk_group_for(num_experts, num_groups, top_k)
    bias = group_constant_bias(num_experts, num_groups, generator) if with_bias else None
    scale = 2.5 if with_bias else 1.0
    router = GroupedTopKRouter(
        top_k,
        num_experts,
        num_expert_group=num_groups,
        topk_group=topk_group,
        renormalize=renormalize,
        scoring_func=scoring_func,
        e_score_correction_bias=bias,
        routed_scaling_factor=scale,
    )
    for num_tokens in NUM_TOKENS:
        logits = grid_logits(num_tokens, num_experts, generator)
        weights, ids = router.select_experts(torch.zeros(num_tokens, 8), logits)
        ref_weights, ref_ids = grouped_topk_reference(
            logits, top_k, num_groups, topk_group, renormalize, scoring_func, bias, scale
        )
        assert_routing_equal(weights, ids, ref_weights, ref_ids)


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
def test_grouped_topk_per_expert_continuous_bias(scoring_func):
    """DeepSeek-V3 shape: 256 experts, 8 groups, keep 4, top-8, small per-expert bias."""
    generator = torch.Generator().manual_seed(5)
    bias = torch.randn(256, generator=generator) * 0.05
    # Continuous values never tie; few tokens keep near-ties unlikely and the
    # reference's separation check proves there are none for this seed.
    logits = torch.randn(24, 256, generator=generator) * 2
    router = GroupedTopKRouter(
        8,
        256,
        8,
        4,
        scoring_func=scoring_func,
        e_score_correction_bias=bias,
        routed_scaling_factor=2.5,
    )
    weights, ids = router.select_experts(torch.zeros(24, 8), logits)
    ref_weights, ref_ids = grouped_topk_reference(logits, 8, 8, 4, True, scoring_func, bias, 2.5)
    assert_routing_equal(weights, ids, ref_weights, ref_ids)


def test_group_score_without_bias_is_the_group_max():
    # Group 0 holds the single best expert; group 1 has the larger sum but lower max.
    logits = torch.tensor([[5.0, -9.0, 4.0, 4.0, -9.0, -9.0]])
    _, ids = GroupedTopKRouter(1, 6, 3, 1, renormalize=False).select_experts(
        torch.zeros(1, 1), logits
    )
    assert ids.tolist() == [[0]]


def test_group_score_with_bias_is_the_sum_of_the_best_two():
    # Biased scores (sigmoid + 0): group 0 = {0.99, 0.0}, group 1 = {0.9, 0.9}.
    logits = torch.tensor([[5.0, -20.0, 2.2, 2.2]])
    bias = torch.zeros(4)
    _, ids = GroupedTopKRouter(
        1, 4, 2, 1, scoring_func="sigmoid", e_score_correction_bias=bias
    ).select_experts(torch.zeros(1, 1), logits)
    assert ids.tolist() == [[2]]


@pytest.mark.parametrize("with_bias", [False, True])
def test_tied_groups_keep_the_lower_group(with_bias):
    # Groups 1 and 3 are identical and best; only one group is kept.
    row = [0.0, 0.1, 2.0, 1.5, 0.0, 0.2, 2.0, 1.5]
    logits = torch.tensor([row, row[4:] + row[:4]])
    bias = torch.zeros(8) if with_bias else None
    _, ids = GroupedTopKRouter(
        2, 8, 4, 1, e_score_correction_bias=bias, scoring_func="sigmoid"
    ).select_experts(torch.zeros(2, 1), logits)
    assert ids.tolist() == [[2, 3], [2, 3]]


def test_tied_experts_across_kept_groups_go_to_the_lower_index():
    logits = torch.tensor([[1.0, 3.0, 0.0, 3.0, 3.0, 0.0]])
    _, ids = GroupedTopKRouter(2, 6, 3, 2).select_experts(torch.zeros(1, 1), logits)
    assert ids.tolist() == [[1, 3]]


def test_masked_groups_never_win_even_with_the_best_expert_outside():
    # Expert 7 is the best single expert but its group loses on the top-2 sum.
    logits = torch.tensor([[1.0, 1.0, 0.9, 0.9, -5.0, -5.0, -5.0, 1.2]])
    bias = torch.zeros(8)
    _, ids = GroupedTopKRouter(
        2, 8, 4, 2, scoring_func="sigmoid", e_score_correction_bias=bias
    ).select_experts(torch.zeros(1, 1), logits)
    assert ids.tolist() == [[0, 1]]
    assert 7 not in ids.tolist()[0]


def test_weights_are_unbiased_scores_scaled_after_renormalizing():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bias = torch.tensor([10.0, 10.0, 0.0, 0.0])
    weights, ids = GroupedTopKRouter(
        2,
        4,
        2,
        1,
        scoring_func="sigmoid",
        e_score_correction_bias=bias,
        routed_scaling_factor=2.0,
    ).select_experts(torch.zeros(1, 1), logits)
    assert ids.tolist() == [[1, 0]]
    sig = 1 / (1 + np.exp(-np.array([1.0, 0.0])))
    np.testing.assert_allclose(weights[0].double().numpy(), 2.0 * sig / sig.sum(), rtol=1e-6)
