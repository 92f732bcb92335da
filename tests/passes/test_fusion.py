"""The pass fuses every router (x EPLB) into one op and never changes results."""

import functools
import itertools

import pytest
import torch
from pass_helpers import make_eplb_state, tied_logits

import moe_compile as mc
from moe_compile.passes import FusionConfig, MoEFusionPass
from moe_compile.passes.testing import PassTestBackend

NUM_EXPERTS, TOP_K, NUM_TOKENS = 16, 3, 9
BIAS = torch.linspace(-0.3, 0.3, NUM_EXPERTS)

ROUTER_CONFIGS = {
    "topk_softmax": dict(scoring_func="softmax"),
    "topk_sigmoid_raw": dict(scoring_func="sigmoid", renormalize=False),
    "topk_sqrtsoftplus": dict(scoring_func="sqrtsoftplus"),
    "bias_sigmoid": dict(
        scoring_func="sigmoid", e_score_correction_bias=BIAS, routed_scaling_factor=2.5
    ),
    "bias_softmax_raw": dict(renormalize=False, e_score_correction_bias=BIAS),
    "grouped_softmax": dict(use_grouped_topk=True, num_expert_group=4, topk_group=2),
    "grouped_sigmoid_bias": dict(
        scoring_func="sigmoid",
        use_grouped_topk=True,
        num_expert_group=4,
        topk_group=2,
        e_score_correction_bias=BIAS,
        routed_scaling_factor=2.5,
    ),
    "shared_routed": dict(num_fused_shared_experts=2),
    # Every group kept: Inductor drops the group slice as a no-op (its own pattern).
    "grouped_all_groups_softmax": dict(use_grouped_topk=True, num_expert_group=4, topk_group=4),
}
EPLB_FUSES = set(ROUTER_CONFIGS)


def run_both(router, state, logits, strategy="kernel"):
    """Eager and compiled results with their load counts, from the same start."""
    hidden = torch.randn(logits.shape[0], 4)
    backend = PassTestBackend(MoEFusionPass(FusionConfig(strategy=strategy)))
    compiled = torch.compile(router.select_experts, backend=backend, fullgraph=True)
    results = []
    for fn in (router.select_experts, compiled):
        if state is not None:
            state.expert_load_view.zero_()
        weights, ids = fn(hidden, logits)
        load = None if state is None else state.expert_load_view.clone()
        results.append((weights, ids, load))
    return results, backend.graphs[0]


def assert_same(eager, compiled):
    (w_e, ids_e, load_e), (w_c, ids_c, load_c) = eager, compiled
    assert ids_c.dtype == ids_e.dtype
    torch.testing.assert_close(ids_c, ids_e, rtol=0, atol=0)
    torch.testing.assert_close(w_c, w_e, rtol=1e-6, atol=1e-7)
    if load_e is not None:
        torch.testing.assert_close(load_c, load_e, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,eplb,logits_dtype",
    list(itertools.product(ROUTER_CONFIGS, (False, True), (torch.float32, torch.bfloat16))),
)
def test_every_router_fuses_and_matches_eager(name, eplb, logits_dtype):
    check_router_fusion(name, eplb, logits_dtype, "kernel")


@pytest.mark.parametrize("name,eplb", list(itertools.product(ROUTER_CONFIGS, (False, True))))
def test_inductor_strategy_decomposition_matches_eager(name, eplb):
    check_router_fusion(name, eplb, torch.bfloat16, "inductor")


def check_router_fusion(name, eplb, logits_dtype, strategy):
    config = ROUTER_CONFIGS[name]
    num_logits = NUM_EXPERTS + config.get("num_fused_shared_experts", 0)
    state = make_eplb_state(NUM_EXPERTS, NUM_EXPERTS + 4) if eplb else None
    router = mc.create_fused_moe_router(
        top_k=TOP_K,
        global_num_experts=NUM_EXPERTS + (4 if eplb else 0),
        eplb_state=state,
        **config,
    )
    logits = tied_logits(NUM_TOKENS, num_logits, logits_dtype)
    (eager, compiled), graph = run_both(router, state, logits, strategy)
    assert_same(eager, compiled)
    assert graph.applied["routing"] == 1
    if strategy == "inductor":
        assert graph.applied["inductor_lowering"] == 1
        assert "moe_compile" not in graph.after and "aten.sort" not in graph.after
        return

    fused_op = "moe_compile.route"
    if eplb and name in EPLB_FUSES:
        assert graph.applied["route_eplb"] == 1
        fused_op = "auto_functionalized(moe_compile.route_eplb)"
        # Everything but the in-place write-back of the counter is gone.
        assert graph.ops_after.get("aten.scatter_add", 0) == 0
        assert graph.ops_after.get("aten.index", 0) == 0
    assert graph.ops_after[fused_op] == 1
    # 16-bit logits go into the op as they are (not through a float32 copy).
    assert "convert_element_type" not in graph.after
    assert graph.ops_after.get("aten.sort", 0) == 0
    assert graph.ops_before.get("aten.sort", 0) >= 1
    if not eplb:
        assert "scatter" not in graph.after and "eplb" not in graph.after


@pytest.mark.parametrize(
    "policy,map_dtype,load_dtype,padded",
    [
        ("token_hash", torch.int64, torch.int32, False),
        ("modulo", torch.int32, torch.int32, True),
        ("token_hash", torch.int32, torch.int64, True),
        ("modulo", torch.int64, torch.int64, False),
    ],
)
def test_eplb_variants_fuse(policy, map_dtype, load_dtype, padded):
    state = make_eplb_state(
        NUM_EXPERTS,
        NUM_EXPERTS + 6,
        map_dtype=map_dtype,
        load_dtype=load_dtype,
        num_unpadded_tokens=5 if padded else None,
    )
    router = mc.create_fused_moe_router(
        top_k=TOP_K,
        global_num_experts=NUM_EXPERTS + 6,
        eplb_state=state,
        eplb_replica_policy=policy,
    )
    (eager, compiled), graph = run_both(router, state, tied_logits(NUM_TOKENS, NUM_EXPERTS))
    assert_same(eager, compiled)
    assert graph.applied["route_eplb"] == 1
    assert eager[2].sum() == (5 if padded else NUM_TOKENS) * TOP_K


@pytest.mark.parametrize("indices_dtype", [torch.int32, torch.int64])
def test_index_dtype_is_written_by_the_op(indices_dtype):
    state = make_eplb_state(NUM_EXPERTS, NUM_EXPERTS + 4)
    router = mc.create_fused_moe_router(
        top_k=TOP_K,
        global_num_experts=NUM_EXPERTS + 4,
        eplb_state=state,
        indices_dtype=indices_dtype,
    )
    (eager, compiled), graph = run_both(router, state, tied_logits(NUM_TOKENS, NUM_EXPERTS))
    assert_same(eager, compiled)
    assert "convert_element_type" not in graph.after


def test_ids_used_twice_block_the_fold_but_stay_correct():
    """Logical ids captured before EPLB are a second use: no route_eplb, same results."""
    state = make_eplb_state(NUM_EXPERTS, NUM_EXPERTS + 4)
    router = mc.create_fused_moe_router(
        top_k=TOP_K, global_num_experts=NUM_EXPERTS + 4, eplb_state=state
    )
    captured = []

    def capture(logical_ids):  # a function: torch 2.11 cannot trace a bound list.append
        captured.append(logical_ids)

    router.set_capture_fn(capture)
    (eager, compiled), graph = run_both(router, state, tied_logits(NUM_TOKENS, NUM_EXPERTS))
    assert_same(eager, compiled)
    assert len(captured) == 2
    torch.testing.assert_close(captured[1], captured[0], rtol=0, atol=0)
    assert graph.applied["routing"] == 1
    assert graph.applied["route_eplb"] == 0


def test_unmatched_graph_is_left_untouched():
    def not_routing(x):
        return torch.sort(x, dim=-1, stable=True, descending=True)[0][:, :3] * 2

    backend = PassTestBackend()
    x = torch.randn(5, 8)
    out = torch.compile(not_routing, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, not_routing(x))
    graph = backend.graphs[0]
    assert graph.before == graph.after
    assert sum(graph.applied.values()) == 0


@pytest.mark.parametrize(
    "num_experts,groups,topk_group,top_k,scale",
    [
        (256, 8, 4, 8, 2.5),  # DeepSeek-V3
        (160, 8, 3, 6, 16.0),  # DeepSeek-V2
        (64, 8, 3, 6, 2.5),
        (16, 2, 1, 2, 1.0),
    ],
)
def test_real_model_grouped_configs_fuse(num_experts, groups, topk_group, top_k, scale):
    """Real option values must not be mistaken for the traced examples' scalars."""
    state = make_eplb_state(num_experts, num_experts + 8)
    router = mc.create_fused_moe_router(
        top_k=top_k,
        global_num_experts=num_experts + 8,
        eplb_state=state,
        scoring_func="sigmoid",
        use_grouped_topk=True,
        num_expert_group=groups,
        topk_group=topk_group,
        e_score_correction_bias=torch.linspace(-0.1, 0.1, num_experts),
        routed_scaling_factor=scale,
    )
    logits = tied_logits(NUM_TOKENS, num_experts, torch.bfloat16)
    (eager, compiled), graph = run_both(router, state, logits)
    assert_same(eager, compiled)
    assert graph.applied["route_eplb"] == 1


@pytest.mark.parametrize(
    "scoring_func,with_bias,renormalize,groups",
    [
        ("softmax", False, True, 4),
        ("sigmoid", True, True, 8),  # group size 2: the top-2 group score is the whole group
        ("sqrtsoftplus", True, False, 2),
        ("sigmoid", False, False, 2),
        ("softmax", True, True, 4),
    ],
)
def test_grouped_routing_keeping_every_group_fuses(scoring_func, with_bias, renormalize, groups):
    """topk_group == num_expert_group: one route_eplb, ids exact (ties included)."""
    state = make_eplb_state(NUM_EXPERTS, NUM_EXPERTS + 4)
    router = mc.GroupedTopKRouter(
        TOP_K,
        NUM_EXPERTS + 4,
        num_expert_group=groups,
        topk_group=groups,
        eplb_state=state,
        scoring_func=scoring_func,
        renormalize=renormalize,
        e_score_correction_bias=BIAS.to(torch.bfloat16) if with_bias else None,
        routed_scaling_factor=1.5,
    )
    for seed in range(3):
        logits = tied_logits(NUM_TOKENS, NUM_EXPERTS, torch.bfloat16, seed=seed)
        torch._dynamo.reset()
        (eager, compiled), graph = run_both(router, state, logits)
        assert_same(eager, compiled)
    expected = {"routing": 1, "eplb_remap": 1, "route_eplb": 1, "zero_experts": 0, "index_cast": 1}
    assert graph.applied == expected
    assert graph.ops_after["auto_functionalized(moe_compile.route_eplb)"] == 1
    assert graph.ops_after.get("aten.sort", 0) == 0 and graph.ops_after.get("aten.topk", 0) == 0
    # The op keeps every group: it is told topk_group = num_expert_group.
    assert f"num_expert_group={groups}, topk_group={groups}," in graph.after


@pytest.mark.parametrize("with_bias", [False, True])
def test_one_group_grouped_router_is_left_unfused_and_correct(with_bias):
    """A GroupedTopKRouter built directly with one group (the factory routes
    that config to the plain routers, which fuse) traces its group mask without
    the copy every other grouping has; no pattern covers it, so it stays as
    traced and still equals eager."""
    state = make_eplb_state(NUM_EXPERTS, NUM_EXPERTS + 4)
    router = mc.GroupedTopKRouter(
        TOP_K,
        NUM_EXPERTS + 4,
        num_expert_group=1,
        topk_group=1,
        eplb_state=state,
        scoring_func="sigmoid",
        e_score_correction_bias=BIAS if with_bias else None,
        routed_scaling_factor=2.5,
    )
    logits = tied_logits(NUM_TOKENS, NUM_EXPERTS)
    (eager, compiled), graph = run_both(router, state, logits)
    assert_same(eager, compiled)
    assert graph.applied["routing"] == 0
    assert graph.ops_after.get("aten.sort", 0) == 2


@pytest.mark.parametrize("strategy", ["kernel", "inductor"])
@pytest.mark.parametrize("eplb", [False, True])
def test_zero_expert_router_fuses_into_one_op(eplb, strategy):
    """Routing, the zero-expert masking (ids past the real experts -> id 0, weight 0,
    their weights summed into the side output) and, with EPLB, the remap and count
    become one ``route_zero_experts``; results, load and side output equal eager."""
    num_zero = 2
    state = make_eplb_state(NUM_EXPERTS, NUM_EXPERTS + 4) if eplb else None
    router = mc.create_fused_moe_router(
        top_k=TOP_K,
        global_num_experts=NUM_EXPERTS + 4,
        eplb_state=state,
        zero_expert_type="identity",
        num_logical_experts=NUM_EXPERTS,
        e_score_correction_bias=torch.linspace(-0.2, 0.2, NUM_EXPERTS + num_zero),
        routed_scaling_factor=1.5,
    )
    assert isinstance(router, mc.ZeroExpertRouter)
    logits = tied_logits(NUM_TOKENS, NUM_EXPERTS + num_zero)
    logits[::2, NUM_EXPERTS:] = 4.0  # every other token picks both zero experts
    hidden = torch.randn(NUM_TOKENS, 4)
    backend = PassTestBackend(MoEFusionPass(FusionConfig(strategy=strategy)))
    compiled = torch.compile(router.select_experts, backend=backend, fullgraph=True)
    results = []
    for fn in (router.select_experts, compiled):
        if eplb:
            state.expert_load_view.zero_()
        weights, ids = fn(hidden, logits)
        load = state.expert_load_view.clone() if eplb else None
        results.append((weights, ids, load, router.zero_expert_output))
    (w_e, ids_e, load_e, zero_e), (w_c, ids_c, load_c, zero_c) = results
    assert_same((w_e, ids_e, load_e), (w_c, ids_c, load_c))
    torch.testing.assert_close(zero_c, zero_e)
    assert zero_e[::2].abs().sum() > 0 and (w_e[::2] == 0).sum() == 2 * len(w_e[::2])
    graph = backend.graphs[0]
    assert graph.applied["routing"] == 1 and graph.applied["zero_experts"] == 1
    remaining = ("moe_compile.route", "moe_compile.eplb_remap", "aten.sort", "aten.topk")
    assert not any(graph.ops_after.get(op) for op in remaining)
    if strategy == "kernel":
        assert graph.ops_after["auto_functionalized(moe_compile.route_zero_experts)"] == 1


class _Gate(torch.nn.Module):
    """A router held by a module, so routers of one class share its forward's code."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    def forward(self, hidden_states, router_logits):
        return self.router.select_experts(hidden_states, router_logits)


def _grouped_bias_router(scale, state, top_k=TOP_K):
    return mc.create_fused_moe_router(
        top_k=top_k,
        global_num_experts=NUM_EXPERTS + 4,
        eplb_state=state,
        scoring_func="sigmoid",
        use_grouped_topk=True,
        num_expert_group=4,
        topk_group=2,
        e_score_correction_bias=BIAS,
        routed_scaling_factor=scale,
    )


def _compare_to_eager(fn, router, state, logits):
    hidden = torch.randn(logits.shape[0], 4)
    results = []
    for call in (router.select_experts, fn):
        state.expert_load_view.zero_()
        weights, ids = call(hidden, logits)
        results.append((weights, ids, state.expert_load_view.clone()))
    assert_same(*results)


@pytest.mark.parametrize("strategy", ["kernel", "inductor"])
def test_scaling_factor_made_a_graph_input_still_fuses(strategy):
    """A changed routed_scaling_factor recompiles with the factor as a graph input
    (Dynamo does that to a float that changed); the op routes with scale 1.0 and
    the graph's own multiply by the input stays after it."""
    backend = PassTestBackend(MoEFusionPass(FusionConfig(strategy=strategy)))
    logits = tied_logits(NUM_TOKENS, NUM_EXPERTS, torch.bfloat16)
    for scale in (2.5, 1.5, 0.75):
        state = make_eplb_state(NUM_EXPERTS, NUM_EXPERTS + 4)
        router = _grouped_bias_router(scale, state)
        compiled = torch.compile(_Gate(router), backend=backend, fullgraph=True)
        _compare_to_eager(compiled, router, state, logits)
    static, scale_input = backend.graphs  # the third scale reuses the second graph
    assert "f64[]" in scale_input.before
    for graph in (static, scale_input):
        assert graph.applied["routing"] == 1 and graph.applied["route_eplb"] == 1
        assert graph.ops_after.get("aten.sort", 0) == 0
    if strategy == "kernel":
        assert "routed_scaling_factor=2.5" in static.after
        assert "routed_scaling_factor=1.0" in scale_input.after
        assert scale_input.ops_after["aten.mul"] == 1
        assert scale_input.ops_after["auto_functionalized(moe_compile.route_eplb)"] == 1


def test_top_k_made_a_graph_input_is_left_unfused_and_correct():
    """Routers passed to one compiled function are not module attributes, so a
    changed top_k becomes a SymInt graph input on the recompile: the op and its
    kernels need it constant, so that graph stays as traced (and correct).
    ``dynamic=False`` keeps router options constant: every graph fuses."""

    def route(router, hidden_states, router_logits):
        return router.select_experts(hidden_states, router_logits)

    logits = tied_logits(NUM_TOKENS, NUM_EXPERTS)
    for dynamic, fused in ((None, [1, 0]), (False, [1, 1])):
        torch._dynamo.reset()
        backend = PassTestBackend()
        compiled = torch.compile(route, backend=backend, fullgraph=True, dynamic=dynamic)
        for top_k in (3, 4):
            state = make_eplb_state(NUM_EXPERTS, NUM_EXPERTS + 4)
            router = _grouped_bias_router(2.5, state, top_k=top_k)
            _compare_to_eager(functools.partial(compiled, router), router, state, logits)
        assert [graph.applied["routing"] for graph in backend.graphs] == fused
        if dynamic is None:
            assert "SymInt" in backend.graphs[1].after


def test_simulator_router_eplb_chain_fuses_into_one_remap():
    """The simulator's random routing graph-breaks on its generator (nothing to fuse);
    the EPLB remap and count after it still become one ``eplb_remap``, equal to eager."""
    options = dict(top_k=TOP_K, global_num_experts=NUM_EXPERTS + 4)
    options["routing_simulation_strategy"] = "normal_routing"
    results = []
    for compiled in (False, True):
        state = make_eplb_state(NUM_EXPERTS, NUM_EXPERTS + 4)
        router = mc.create_fused_moe_router(eplb_state=state, **options)
        backend = PassTestBackend()
        fn = (
            torch.compile(router.select_experts, backend=backend)
            if compiled
            else router.select_experts
        )
        weights, ids = fn(torch.randn(NUM_TOKENS, 4), torch.randn(NUM_TOKENS, NUM_EXPERTS))
        results.append((weights, ids, state.expert_load_view.clone()))
    assert_same(*results)
    assert int(results[1][2].sum()) == NUM_TOKENS * TOP_K
    remaps = [g.ops_after.get("moe_compile.eplb_remap", 0) for g in backend.graphs]
    assert sum(remaps) == 1
    assert not any(g.ops_after.get("aten.index_put", 0) for g in backend.graphs)


def test_zero_expert_masking_with_another_use_of_the_unmasked_ids_is_not_folded():
    """The fold replaces the masking only when nothing else reads the unmasked ids or
    weights; here the raw ids are also returned, so routing fuses alone and the
    masking stays in the graph, with results equal to eager."""
    from moe_compile.router.custom import mask_zero_experts
    from moe_compile.router.topk import fused_topk_bias

    bias = torch.linspace(-0.2, 0.2, NUM_EXPERTS + 2)

    def route(logits):
        weights, ids = fused_topk_bias(logits, bias, TOP_K, True, "softmax", 1.5)
        masked_weights, masked_ids, zero_weight = mask_zero_experts(weights, ids, NUM_EXPERTS)
        return masked_weights, masked_ids, zero_weight, ids

    logits = tied_logits(NUM_TOKENS, NUM_EXPERTS + 2)
    logits[::2, NUM_EXPERTS:] = 4.0
    backend = PassTestBackend()
    got = torch.compile(route, backend=backend, fullgraph=True)(logits)
    for a, b in zip(got, route(logits), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    graph = backend.graphs[0]
    assert graph.applied["routing"] == 1 and graph.applied["zero_experts"] == 0
    assert graph.ops_after["moe_compile.route"] == 1 and graph.ops_after["aten.ge"] == 1
