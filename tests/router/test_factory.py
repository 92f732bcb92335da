"""create_fused_moe_router: SPEC §2's selection order, one test per branch.

Each branch test turns on every option of the branches after it, so the test
fails if the order is wrong, not only if the branch is missing.
"""

import inspect

import pytest
import torch
from moe_reference import grid_logits, grouped_topk_reference, topk_reference
from test_topk_routers import assert_routing_equal

from moe_compile import EplbLayerState
from moe_compile.router import (
    CustomRoutingRouter,
    FusedTopKBiasRouter,
    FusedTopKRouter,
    GroupedTopKRouter,
    RoutingSimulatorRouter,
    SharedRoutedRouter,
    ZeroExpertRouter,
    create_fused_moe_router,
)

NUM_EXPERTS = 16


def custom_fn(hidden_states, gating_output, topk, renormalize):
    ids = torch.sort(gating_output, dim=-1, descending=True, stable=True).indices[:, :topk]
    return torch.ones(ids.shape), ids


def options(**overrides):
    """Every option switched on; a test switches off the branches before its own."""
    base = dict(
        top_k=2,
        global_num_experts=NUM_EXPERTS,
        routing_simulation_strategy="uniform_random",
        zero_expert_type="identity",
        num_logical_experts=12,
        use_grouped_topk=True,
        num_expert_group=4,
        topk_group=2,
        custom_routing_function=custom_fn,
        e_score_correction_bias=torch.zeros(NUM_EXPERTS),
        num_fused_shared_experts=1,
    )
    base.update(overrides)
    return base


def test_simulator_comes_first():
    router = create_fused_moe_router(**options())
    assert type(router) is RoutingSimulatorRouter
    assert router.strategy == "uniform_random"


def test_zero_expert_comes_second():
    router = create_fused_moe_router(**options(routing_simulation_strategy=None))
    assert type(router) is ZeroExpertRouter
    assert router.num_logical_experts == 12


def test_grouped_comes_third():
    router = create_fused_moe_router(
        **options(routing_simulation_strategy=None, zero_expert_type=None)
    )
    assert type(router) is GroupedTopKRouter
    assert (router.num_expert_group, router.topk_group) == (4, 2)


def test_custom_comes_fourth():
    router = create_fused_moe_router(
        **options(routing_simulation_strategy=None, zero_expert_type=None, use_grouped_topk=False)
    )
    assert type(router) is CustomRoutingRouter
    assert router.custom_routing_function is custom_fn


def test_bias_comes_fifth():
    router = create_fused_moe_router(
        **options(
            routing_simulation_strategy=None,
            zero_expert_type=None,
            use_grouped_topk=False,
            custom_routing_function=None,
        )
    )
    assert type(router) is FusedTopKBiasRouter


def test_shared_routed_comes_sixth():
    router = create_fused_moe_router(
        **options(
            routing_simulation_strategy=None,
            zero_expert_type=None,
            use_grouped_topk=False,
            custom_routing_function=None,
            e_score_correction_bias=None,
        )
    )
    assert type(router) is SharedRoutedRouter
    assert router.num_fused_shared_experts == 1


def test_plain_top_k_is_the_default():
    router = create_fused_moe_router(top_k=2, global_num_experts=NUM_EXPERTS)
    assert type(router) is FusedTopKRouter
    assert router.renormalize is True and router.scoring_func == "softmax"
    assert router.eplb_state is None and router.indices_dtype is None


def test_empty_simulation_strategy_does_not_select_the_simulator():
    router = create_fused_moe_router(top_k=2, global_num_experts=8, routing_simulation_strategy="")
    assert type(router) is FusedTopKRouter


@pytest.mark.parametrize(
    "num_experts, num_groups",
    [(60, 7), (8, 8), (6, 12), (16, 1)],
    ids=["non_divisible", "one_expert_per_group", "more_groups_than_experts", "single_group"],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_degenerate_grouping_falls_back_to_plain_routers(num_experts, num_groups, with_bias):
    bias = torch.zeros(num_experts) if with_bias else None
    router = create_fused_moe_router(
        top_k=1,
        global_num_experts=num_experts,
        use_grouped_topk=True,
        num_expert_group=num_groups,
        topk_group=1,
        e_score_correction_bias=bias,
    )
    assert type(router) is (FusedTopKBiasRouter if with_bias else FusedTopKRouter)


def test_grouping_is_checked_on_the_logical_experts():
    # 60 logical experts + 4 redundant: 64 would split into 8 groups, 60 does not.
    router = create_fused_moe_router(
        top_k=2,
        global_num_experts=64,
        use_grouped_topk=True,
        num_expert_group=8,
        topk_group=2,
        num_logical_experts=60,
    )
    assert type(router) is FusedTopKRouter


def test_grouped_routing_through_the_factory_matches_the_reference():
    generator = torch.Generator().manual_seed(0)
    bias = (torch.randint(0, 3, (8,), generator=generator) * 2.0).repeat_interleave(32)
    router = create_fused_moe_router(
        top_k=8,
        global_num_experts=256,
        scoring_func="sigmoid",
        e_score_correction_bias=bias,
        routed_scaling_factor=2.5,
        use_grouped_topk=True,
        num_expert_group=8,
        topk_group=4,
    )
    logits = grid_logits(64, 256, generator)
    weights, ids = router.select_experts(torch.zeros(64, 4), logits)
    ref = grouped_topk_reference(logits, 8, 8, 4, True, "sigmoid", bias, 2.5)
    assert_routing_equal(weights, ids, *ref)


def test_options_reach_the_router():
    state = EplbLayerState(
        expert_load_view=torch.zeros(10, dtype=torch.int32),
        logical_to_physical_map=torch.tensor([[i, -1] for i in range(8)]),
        logical_replica_count=torch.ones(8, dtype=torch.int64),
        should_record_tensor=torch.tensor(True),
    )
    bias = torch.zeros(8)
    router = create_fused_moe_router(
        top_k=3,
        global_num_experts=10,
        eplb_state=state,
        renormalize=False,
        scoring_func="sqrtsoftplus",
        e_score_correction_bias=bias,
        routed_scaling_factor=1.5,
        indices_dtype=torch.int64,
        eplb_replica_policy="modulo",
    )
    assert type(router) is FusedTopKBiasRouter
    assert router.eplb_state is state and router.e_score_correction_bias is bias
    assert router.eplb_replica_policy == "modulo"
    logits = grid_logits(7, 8, torch.Generator().manual_seed(1))
    weights, ids = router.select_experts(torch.zeros(7, 2), logits)
    ref = topk_reference(logits, 3, False, "sqrtsoftplus", bias, 1.5)
    assert_routing_equal(weights, ids, *ref, index_dtype=torch.int64)
    assert int(state.expert_load_view.sum()) == 21


def test_zero_expert_branch_needs_its_arguments():
    with pytest.raises(ValueError, match="zero_expert_type needs num_logical_experts"):
        create_fused_moe_router(top_k=2, global_num_experts=8, zero_expert_type="identity")


def test_grouped_branch_needs_its_arguments():
    with pytest.raises(ValueError, match="use_grouped_topk needs num_expert_group and topk_group"):
        create_fused_moe_router(top_k=2, global_num_experts=8, use_grouped_topk=True)


def test_factory_keywords_are_spec_section_2():
    spec_keywords = [
        "top_k",
        "global_num_experts",
        "eplb_state",
        "renormalize",
        "scoring_func",
        "e_score_correction_bias",
        "routed_scaling_factor",
        "use_grouped_topk",
        "num_expert_group",
        "topk_group",
        "custom_routing_function",
        "num_fused_shared_experts",
        "zero_expert_type",
        "num_logical_experts",
        "routing_simulation_strategy",
        "indices_dtype",
    ]
    parameters = inspect.signature(create_fused_moe_router).parameters
    assert list(parameters)[: len(spec_keywords)] == spec_keywords
    assert list(parameters)[len(spec_keywords) :] == ["eplb_replica_policy"]
    defaults = {name: p.default for name, p in parameters.items() if name not in spec_keywords[:2]}
    assert defaults == {
        "eplb_state": None,
        "renormalize": True,
        "scoring_func": "softmax",
        "e_score_correction_bias": None,
        "routed_scaling_factor": 1.0,
        "use_grouped_topk": False,
        "num_expert_group": None,
        "topk_group": None,
        "custom_routing_function": None,
        "num_fused_shared_experts": 0,
        "zero_expert_type": None,
        "num_logical_experts": None,
        "routing_simulation_strategy": None,
        "indices_dtype": None,
        "eplb_replica_policy": "token_hash",
    }
    with pytest.raises(TypeError):
        create_fused_moe_router(top_k=2, global_num_experts=8, enable_eplb=True)
