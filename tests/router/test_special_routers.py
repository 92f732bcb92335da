"""Custom, shared-routed, zero-expert and simulator routers."""

import numpy as np
import pytest
import torch
from moe_reference import (
    SCORING_FUNCS,
    coarse_bias,
    grid_logits,
    rank_desc_lower_index_first,
    topk_reference,
)
from test_topk_routers import NUM_EXPERTS, NUM_TOKENS, TOP_K, assert_routing_equal

from moe_compile.router import (
    CustomRoutingRouter,
    RoutingSimulatorRouter,
    SharedRoutedRouter,
    ZeroExpertRouter,
    register_routing_strategy,
    routing_strategies,
)


# ---------------------------------------------------------------- custom
def llama4_routing(hidden_states, gating_output, topk, renormalize):
    """Llama-4: top-k on the raw logits, then sigmoid of the chosen values (in bf16)."""
    values, ids = torch.sort(gating_output, dim=-1, descending=True, stable=True)
    return torch.sigmoid(values[:, :topk].bfloat16()), ids[:, :topk]


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_custom_routing_function_llama4(num_tokens):
    generator = torch.Generator().manual_seed(num_tokens)
    logits = grid_logits(num_tokens, 16, generator)
    router = CustomRoutingRouter(1, 16, custom_routing_function=llama4_routing, renormalize=False)
    weights, ids = router.select_experts(torch.zeros(num_tokens, 4), logits)
    ref_ids = rank_desc_lower_index_first(logits.double().numpy())[:, :1]
    chosen = np.take_along_axis(logits.double().numpy(), ref_ids, axis=-1)
    # The user function rounds to bf16; the router only casts to float32.
    ref_weights = torch.sigmoid(torch.from_numpy(chosen).float().bfloat16()).double().numpy()
    assert_routing_equal(weights, ids, ref_weights, ref_ids)


def test_custom_routing_function_receives_the_documented_keywords():
    seen = {}

    def routing(**kwargs):
        seen.update(kwargs)
        num_tokens = kwargs["gating_output"].shape[0]
        return torch.ones(num_tokens, 2, dtype=torch.float64), torch.tensor([[3, 1]] * num_tokens)

    hidden, logits = torch.randn(5, 4), torch.randn(5, 8)
    router = CustomRoutingRouter(
        2, 8, custom_routing_function=routing, renormalize=False, indices_dtype=torch.int64
    )
    weights, ids = router.select_experts(hidden, logits)
    assert set(seen) == {"hidden_states", "gating_output", "topk", "renormalize"}
    assert seen["hidden_states"] is hidden and seen["gating_output"] is logits
    assert seen["topk"] == 2 and seen["renormalize"] is False
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert ids.tolist() == [[3, 1]] * 5


def test_custom_routing_function_must_be_callable():
    with pytest.raises(ValueError, match="custom_routing_function must be callable"):
        CustomRoutingRouter(2, 8, custom_routing_function=None)


# ---------------------------------------------------------------- shared-routed
def shared_routed_reference(logits, num_routed, top_k, renormalize):
    ref_weights, ref_ids = topk_reference(logits[:, :num_routed], top_k, renormalize, "softmax")
    shared = 1 / (1 + np.exp(-logits[:, num_routed:].double().numpy()))
    num_shared = logits.shape[1] - num_routed
    shared_ids = np.broadcast_to(np.arange(num_routed, num_routed + num_shared), shared.shape)
    return (
        np.concatenate([ref_weights, shared], axis=1),
        np.concatenate([ref_ids, shared_ids], axis=1),
    )


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("num_shared", [1, 2])
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("num_routed", NUM_EXPERTS)
def test_shared_routed_matches_reference(num_routed, top_k, num_shared, renormalize):
    generator = torch.Generator().manual_seed(num_routed + top_k)
    router = SharedRoutedRouter(
        top_k, num_routed + num_shared, num_fused_shared_experts=num_shared, renormalize=renormalize
    )
    for num_tokens in NUM_TOKENS:
        logits = grid_logits(num_tokens, num_routed + num_shared, generator)
        weights, ids = router.select_experts(torch.zeros(num_tokens, 2), logits)
        ref_weights, ref_ids = shared_routed_reference(logits, num_routed, top_k, renormalize)
        assert_routing_equal(weights, ids, ref_weights, ref_ids)


def test_shared_columns_never_compete_for_routed_slots():
    # The shared column has the largest logit; it still only appears as the extra column.
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0]])
    weights, ids = SharedRoutedRouter(2, 4, 1, renormalize=False).select_experts(
        torch.zeros(1, 1), logits
    )
    assert ids.tolist() == [[2, 1, 3]]
    assert weights[0, 2].item() == pytest.approx(1 / (1 + np.exp(-9.0)), rel=1e-6)


def test_shared_routed_needs_at_least_one_shared_expert():
    with pytest.raises(ValueError, match="num_fused_shared_experts must be >= 1, got 0"):
        SharedRoutedRouter(2, 8, num_fused_shared_experts=0)


# ---------------------------------------------------------------- zero experts
def zero_expert_reference(logits, hidden, num_real, top_k, renormalize, scoring_func, bias, scale):
    weights, ids = topk_reference(logits, top_k, renormalize, scoring_func, bias, scale)
    is_zero = ids >= num_real
    zero_output = hidden.double().numpy() * (weights * is_zero).sum(axis=1, keepdims=True)
    return np.where(is_zero, 0.0, weights), np.where(is_zero, 0, ids), zero_output, is_zero


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("scoring_func", SCORING_FUNCS)
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("num_real", NUM_EXPERTS)
def test_zero_expert_router_matches_reference(num_real, top_k, scoring_func, renormalize):
    generator = torch.Generator().manual_seed(num_real * 3 + top_k)
    num_zero = max(2, num_real // 4)
    bias = coarse_bias(num_real + num_zero, generator)
    # One real and one zero expert at the top bias level, so both kinds win some slots.
    bias[0] = bias[num_real] = 4.0
    router = ZeroExpertRouter(
        top_k,
        num_real,
        e_score_correction_bias=bias,
        num_logical_experts=num_real,
        renormalize=renormalize,
        scoring_func=scoring_func,
        routed_scaling_factor=1.5,
    )
    for num_tokens in NUM_TOKENS:
        logits = grid_logits(num_tokens, num_real + num_zero, generator)
        hidden = torch.randn(num_tokens, 24, generator=generator)
        weights, ids = router.select_experts(hidden, logits)
        ref_weights, ref_ids, ref_output, is_zero = zero_expert_reference(
            logits, hidden, num_real, top_k, renormalize, scoring_func, bias, 1.5
        )
        assert_routing_equal(weights, ids, ref_weights, ref_ids)
        assert router.zero_expert_output.dtype == hidden.dtype
        np.testing.assert_allclose(
            router.zero_expert_output.double().numpy(), ref_output, rtol=1e-6, atol=1e-6
        )
        if num_tokens == 300:
            assert is_zero.any() and not is_zero.all(), "data should mix real and zero experts"


def test_zero_expert_output_keeps_the_hidden_dtype_and_scales_each_token():
    hidden = torch.tensor([[1.0, -2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    # Token 0 picks zero expert 2 (and real expert 0); token 1 picks only real experts.
    logits = torch.tensor([[1.0, -5.0, 1.0], [1.0, 1.0, -5.0]])
    router = ZeroExpertRouter(
        2, 2, torch.tensor([0.0, 0.0, 0.3]), num_logical_experts=2, renormalize=False
    )
    weights, ids = router.select_experts(hidden, logits)
    assert ids.tolist() == [[0, 0], [0, 1]]
    softmax0 = np.exp([1.0, -5.0, 1.0]) / np.exp([1.0, -5.0, 1.0]).sum()
    assert weights[0].tolist() == pytest.approx([0.0, softmax0[0]], rel=1e-6)
    assert router.zero_expert_output.dtype == torch.bfloat16
    expected = np.array([[1.0, -2.0], [0.0, 0.0]]) * np.array([[softmax0[2]], [0.0]])
    np.testing.assert_allclose(router.zero_expert_output.double().numpy(), expected, rtol=1e-2)


def test_zero_expert_router_rejects_logits_without_zero_experts():
    router = ZeroExpertRouter(2, 8, torch.zeros(8), num_logical_experts=8)
    with pytest.raises(ValueError, match="8 columns; ZeroExpertRouter needs the 8 real experts"):
        router.select_experts(torch.zeros(3, 2), torch.zeros(3, 8))


def test_zero_expert_router_rejects_unknown_type():
    with pytest.raises(ValueError, match="unknown zero_expert_type 'scale'"):
        ZeroExpertRouter(2, 8, torch.zeros(10), num_logical_experts=8, zero_expert_type="scale")


# ---------------------------------------------------------------- simulator
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_uniform_random_routing(num_tokens):
    router = RoutingSimulatorRouter(6, 60, strategy="uniform_random", seed=1)
    weights, ids = router.select_experts(torch.zeros(num_tokens, 2), torch.zeros(num_tokens, 60))
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert tuple(ids.shape) == (num_tokens, 6)
    assert torch.equal(weights, torch.ones(num_tokens, 6))
    for row in ids.tolist():
        assert len(set(row)) == 6 and all(0 <= i < 60 for i in row)
    again = RoutingSimulatorRouter(6, 60, strategy="uniform_random", seed=1)
    assert torch.equal(
        again.select_experts(torch.zeros(num_tokens, 2), torch.zeros(num_tokens, 60))[1], ids
    )


def test_uniform_random_spreads_over_all_experts():
    router = RoutingSimulatorRouter(2, 8, strategy="uniform_random", seed=0)
    _, ids = router.select_experts(torch.zeros(4000, 1), torch.zeros(4000, 8))
    counts = np.bincount(ids.flatten().numpy(), minlength=8)
    # 1000 expected per expert; 6 standard deviations of a binomial is about 175.
    assert np.abs(counts - 1000).max() < 175


def test_normal_routing_matches_its_definition():
    num_tokens, num_experts, top_k, seed = 300, 60, 4, 7
    router = RoutingSimulatorRouter(top_k, num_experts, strategy="normal_routing", seed=seed)
    weights, ids = router.select_experts(
        torch.zeros(num_tokens, 1), torch.zeros(num_tokens, num_experts)
    )
    generator = torch.Generator().manual_seed(seed)
    position = torch.randn(num_tokens, top_k, generator=generator).double().numpy()
    magnitude = np.abs(torch.randn(num_tokens, top_k, generator=generator).double().numpy())
    ref_ids = np.clip((num_experts / (1 + np.exp(-position))).astype(np.int64), 0, num_experts - 1)
    ref_weights = magnitude / magnitude.sum(axis=1, keepdims=True)
    assert_routing_equal(weights, ids, ref_weights, ref_ids)
    # Bunched around the middle experts.
    assert abs(ids.double().mean().item() - num_experts / 2) < 2


def test_simulator_advances_between_calls_and_is_seeded():
    first = RoutingSimulatorRouter(2, 16, seed=3)
    second = RoutingSimulatorRouter(2, 16, seed=3)
    other_seed = RoutingSimulatorRouter(2, 16, seed=4)
    inputs = (torch.zeros(50, 1), torch.zeros(50, 16))
    a1, a2 = first.select_experts(*inputs)[1], first.select_experts(*inputs)[1]
    b1, b2 = second.select_experts(*inputs)[1], second.select_experts(*inputs)[1]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    assert not torch.equal(a1, other_seed.select_experts(*inputs)[1])


def test_simulator_strategies_are_registrable():
    @register_routing_strategy("test_first_k")
    def first_k(router_logits, top_k, generator):
        num_tokens = router_logits.shape[0]
        return torch.full((num_tokens, top_k), 0.5), torch.arange(top_k).expand(num_tokens, -1)

    assert "test_first_k" in routing_strategies()
    assert {"uniform_random", "normal_routing"} <= set(routing_strategies())
    weights, ids = RoutingSimulatorRouter(3, 8, strategy="test_first_k").select_experts(
        torch.zeros(2, 1), torch.zeros(2, 8)
    )
    assert ids.tolist() == [[0, 1, 2]] * 2 and weights.tolist() == [[0.5] * 3] * 2


def test_simulator_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown routing simulation strategy 'zipf'"):
        RoutingSimulatorRouter(2, 8, strategy="zipf")
