"""FusedMoE against a float64 MoE written here, for every router kind; EPLB; construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from moe_reference import (
    coarse_bias,
    eplb_reference,
    grid_logits,
    grouped_topk_reference,
    random_replica_layout,
    rank_desc_lower_index_first,
    topk_reference,
)

from moe_compile import (
    EplbLayerState,
    FusedMoE,
    Int4PairPackedFusedMoEMethod,
    Int8WeightOnlyFusedMoEMethod,
)
from moe_compile.router import RoutingSimulatorRouter

E, K, H, INTER = 16, 3, 16, 8
NUM_SHARED, NUM_ZERO = 2, 4


def moe_float64(x, w13, w2, weights, ids, activation="silu", zero_from=None):
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]); ids >= zero_from are identity experts."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    act = F.silu if activation == "silu" else F.gelu
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e, weight = int(ids[t, j]), float(weights[t, j])
            if zero_from is not None and e >= zero_from:
                out[t] += weight * x[t]
                continue
            h = w13[e] @ x[t]
            out[t] += weight * (w2[e] @ (act(h[: w2.shape[2]]) * h[w2.shape[2] :]))
    return out


def llama4_routing(hidden_states, gating_output, topk, renormalize):
    # A stable sort, so tied logits go to the lower expert index as in the reference.
    values, ids = torch.sort(gating_output, dim=-1, descending=True, stable=True)
    return torch.sigmoid(values[:, :topk].float()), ids[:, :topk].to(torch.int32)


def sigmoid64(values):
    return 1.0 / (1.0 + np.exp(-values))


class RouterCase:
    """One router configuration: layer keywords, logit width, and its float64 routing."""

    def __init__(self, name, kwargs, num_logits, expected_routing, num_sources=E, zero_from=None):
        self.name, self.kwargs, self.num_logits = name, kwargs, num_logits
        self.expected_routing, self.num_sources, self.zero_from = (
            expected_routing,
            num_sources,
            zero_from,
        )


def _bias(num):
    return coarse_bias(num, torch.Generator().manual_seed(7))


def _zero_expert_bias():
    """Two zero experts share the real experts' top bias level, so both kinds get chosen."""
    return torch.cat([_bias(E), torch.tensor([4.0, 4.0, 2.0, 0.0])])


def _simulated(logits):
    router = RoutingSimulatorRouter(K, E, strategy="normal_routing", seed=0)
    weights, ids = router.select_experts(torch.zeros(logits.shape[0], 1), logits)
    return weights.double().numpy(), ids.numpy()


def _custom_expected(logits):
    ids = rank_desc_lower_index_first(logits.double().numpy())[:, :K]
    return sigmoid64(np.take_along_axis(logits.double().numpy(), ids, axis=-1)), ids


def _shared_expected(logits):
    weights, ids = topk_reference(logits[:, :E], K, True, "softmax")
    shared_ids = np.broadcast_to(np.arange(E, E + NUM_SHARED), (logits.shape[0], NUM_SHARED))
    shared_weights = sigmoid64(logits[:, E:].double().numpy())
    return np.concatenate([weights, shared_weights], 1), np.concatenate([ids, shared_ids], 1)


ROUTER_CASES = {
    case.name: case
    for case in [
        RouterCase(
            "topk_softmax",
            {},
            E,
            lambda logits: topk_reference(logits, K, True, "softmax"),
        ),
        RouterCase(
            "topk_sigmoid_no_renorm",
            {"scoring_func": "sigmoid", "renormalize": False},
            E,
            lambda logits: topk_reference(logits, K, False, "sigmoid"),
        ),
        RouterCase(
            "topk_bias",
            {
                "scoring_func": "sqrtsoftplus",
                "e_score_correction_bias": _bias(E),
                "routed_scaling_factor": 2.5,
            },
            E,
            lambda logits: topk_reference(logits, K, True, "sqrtsoftplus", _bias(E), 2.5),
        ),
        RouterCase(
            "grouped_bias",
            {
                "use_grouped_topk": True,
                "num_expert_group": 4,
                "topk_group": 2,
                "scoring_func": "sigmoid",
                "e_score_correction_bias": _bias(E),
                "routed_scaling_factor": 2.5,
            },
            E,
            lambda logits: grouped_topk_reference(logits, K, 4, 2, True, "sigmoid", _bias(E), 2.5),
        ),
        RouterCase(
            "grouped_softmax",
            {"use_grouped_topk": True, "num_expert_group": 4, "topk_group": 2},
            E,
            lambda logits: grouped_topk_reference(logits, K, 4, 2, True, "softmax"),
        ),
        RouterCase(
            "custom",
            {"custom_routing_function": llama4_routing},
            E,
            _custom_expected,
        ),
        RouterCase(
            "shared_routed",
            {"num_fused_shared_experts": NUM_SHARED},
            E + NUM_SHARED,
            _shared_expected,
            num_sources=E + NUM_SHARED,
        ),
        RouterCase(
            "zero_expert",
            {
                "zero_expert_type": "identity",
                "e_score_correction_bias": _zero_expert_bias(),
                "renormalize": False,
                "routed_scaling_factor": 1.5,
            },
            E + NUM_ZERO,
            lambda logits: topk_reference(
                logits, K, False, "softmax", _zero_expert_bias(), routed_scaling_factor=1.5
            ),
            zero_from=E,
        ),
        RouterCase(
            "simulator",
            {"routing_simulation_strategy": "normal_routing"},
            E,
            _simulated,
        ),
    ]
}


def make_weights(num_sources, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_sources, 2 * INTER, H, generator=g) / H**0.5
    w2 = torch.randn(num_sources, H, INTER, generator=g) / INTER**0.5
    return w13.to(dtype), w2.to(dtype)


def make_inputs(num_tokens, num_logits, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, H, generator=g), grid_logits(num_tokens, num_logits, g)


def attach_eplb(layer, l2p, counts, record=True):
    """Model-wide tensors for one layer, as the EPLB state owner would hold them."""
    load = torch.zeros(1, layer.global_num_experts, dtype=torch.int32)
    layer.set_eplb_state(0, load, l2p[None], counts[None])
    layer.eplb_state.should_record_tensor = torch.tensor(record)
    return load[0]


def physical_to_logical_of(l2p, counts, num_physical):
    p2l = torch.full((num_physical,), -1, dtype=torch.long)
    for logical in range(l2p.shape[0]):
        for replica in range(int(counts[logical])):
            p2l[l2p[logical, replica]] = logical
    assert (p2l >= 0).all()
    return p2l


@pytest.mark.parametrize("experts_impl", ["grouped", "reference"])
@pytest.mark.parametrize("case_name", list(ROUTER_CASES))
def test_layer_matches_float64_moe(case_name, experts_impl):
    case = ROUTER_CASES[case_name]
    layer = FusedMoE(E, K, H, INTER, experts_impl=experts_impl, **case.kwargs)
    w13, w2 = make_weights(case.num_sources)
    layer.load_logical_weights(w13, w2)
    x, logits = make_inputs(37, case.num_logits)
    out = layer(x, logits)
    weights, ids = case.expected_routing(logits)
    expected = moe_float64(x, w13, w2, weights, ids, zero_from=case.zero_from)
    if case.zero_from is not None:
        assert (ids >= case.zero_from).any() and (ids < case.zero_from).any()
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_gelu_activation_matches_float64_moe():
    layer = FusedMoE(E, K, H, INTER, activation="gelu")
    w13, w2 = make_weights(E)
    layer.load_logical_weights(w13, w2)
    x, logits = make_inputs(11, E)
    weights, ids = topk_reference(logits, K, True, "softmax")
    expected = moe_float64(x, w13, w2, weights, ids, activation="gelu")
    torch.testing.assert_close(layer(x, logits).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["token_hash", "modulo"])
@pytest.mark.parametrize("case_name", ["topk_bias", "grouped_bias", "shared_routed", "zero_expert"])
def test_eplb_with_replicas_equals_eplb_off(case_name, policy):
    case = ROUTER_CASES[case_name]
    w13, w2 = make_weights(case.num_sources, seed=2)
    x, logits = make_inputs(41, case.num_logits, seed=3)
    plain = FusedMoE(E, K, H, INTER, **case.kwargs)
    plain.load_logical_weights(w13, w2)
    expected = plain(x, logits)

    l2p, counts, num_physical = random_replica_layout(E, 6, torch.Generator().manual_seed(4))
    layer = FusedMoE(
        E,
        K,
        H,
        INTER,
        eplb_state=EplbLayerState(),
        num_redundant_experts=6,
        eplb_replica_policy=policy,
        **case.kwargs,
    )
    assert layer.global_num_experts == num_physical == 22
    layer.load_logical_weights(w13, w2, physical_to_logical_of(l2p, counts, num_physical))
    load = attach_eplb(layer, l2p, counts)
    captured = []
    layer.router.set_capture_fn(lambda logical_ids: captured.append(logical_ids.clone()))
    out = layer(x, logits)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)

    # The load is counted per physical expert, for the routed (not shared) columns.
    routed_logical = captured[0][:, :K]
    _, expected_load = eplb_reference(routed_logical, l2p, counts, num_physical, policy)
    assert load.tolist() == expected_load
    assert sum(expected_load) == 41 * K
    replicated = [e for e in range(E) if counts[e] > 1]
    assert any(sum(load[p] > 0 for p in l2p[e, : counts[e]].tolist()) > 1 for e in replicated)


def test_eplb_state_is_the_only_switch():
    off = FusedMoE(E, K, H, INTER)
    state = EplbLayerState()
    on = FusedMoE(E, K, H, INTER, eplb_state=state)
    assert off.eplb_state is None and off.router.eplb_state is None
    assert on.eplb_state is state and on.router.eplb_state is state
    assert not hasattr(off, "enable_eplb") and not hasattr(on, "enable_eplb")
    with pytest.raises(ValueError, match=r"eplb_state=EplbLayerState\(\)"):
        off.set_eplb_state(0, torch.zeros(1, E), torch.zeros(1, E, 1), torch.ones(1, E))


def test_set_eplb_state_keeps_views_of_the_model_wide_tensors():
    layer = FusedMoE(E, K, H, INTER, eplb_state=EplbLayerState())
    load = torch.zeros(3, E, dtype=torch.int32)
    l2p = torch.arange(E).repeat(3, 1)[:, :, None]
    counts = torch.ones(3, E, dtype=torch.long)
    layer.set_eplb_state(2, load, l2p, counts)
    layer.eplb_state.should_record_tensor = torch.tensor(True)
    x, logits = make_inputs(5, E)
    layer(x, logits)
    assert int(load[2].sum()) == 5 * K and int(load[:2].sum()) == 0
    l2p[2].copy_(l2p[2].roll(1, dims=0))  # an in-place rebalance reaches the layer
    assert layer.eplb_state.logical_to_physical_map[0, 0] == E - 1


@pytest.mark.parametrize("with_eplb", [False, True])
@pytest.mark.parametrize("case_name", ["topk_softmax", "shared_routed", "zero_expert"])
def test_empty_batch(case_name, with_eplb):
    case = ROUTER_CASES[case_name]
    eplb_state = EplbLayerState() if with_eplb else None
    layer = FusedMoE(E, K, H, INTER, eplb_state=eplb_state, **case.kwargs)
    if with_eplb:
        load = attach_eplb(layer, torch.arange(E)[:, None], torch.ones(E, dtype=torch.long))
    x, logits = make_inputs(0, case.num_logits)
    out = layer(x, logits)
    assert out.shape == (0, H)
    if with_eplb:
        assert int(load.sum()) == 0


def test_get_expert_weights_are_writable_views():
    layer = FusedMoE(E, K, H, INTER, eplb_state=EplbLayerState(), num_redundant_experts=2)
    views = layer.get_expert_weights()
    assert [tuple(v.shape) for v in views] == [(E + 2, 2 * INTER * H), (E + 2, H * INTER)]
    views[0][3].fill_(1.5)
    views[1][E + 1].fill_(-2.0)
    assert (layer.w13_weight[3] == 1.5).all() and (layer.w2_weight[E + 1] == -2.0).all()
    assert int((layer.w13_weight != 0).sum()) == 2 * INTER * H


def test_shared_experts_are_extra_slots_not_moved_by_eplb():
    layer = FusedMoE(
        E, K, H, INTER, eplb_state=EplbLayerState(), num_fused_shared_experts=NUM_SHARED
    )
    assert layer.w13_weight.shape[0] == E + NUM_SHARED
    assert [v.shape[0] for v in layer.get_expert_weights()] == [E, E]
    w13, w2 = make_weights(E + NUM_SHARED)
    layer.load_logical_weights(w13, w2)
    torch.testing.assert_close(layer.w13_weight[E:], w13[E:], rtol=0, atol=0)


def test_load_logical_weights_default_layout_and_rank_slice():
    w13, w2 = make_weights(E)
    layer = FusedMoE(
        E, K, H, INTER, eplb_state=EplbLayerState(), num_redundant_experts=4, ep_size=4, ep_rank=3
    )
    assert layer.local_expert_ids == [15, 16, 17, 18, 19]
    assert layer.expert_map.tolist() == [-1] * 15 + [0, 1, 2, 3, 4]
    layer.load_logical_weights(w13, w2)
    # physical 15 is logical 15; replicas 16..19 are logical 0..3 (SPEC §4 initial layout)
    for slot, logical in enumerate([15, 0, 1, 2, 3]):
        torch.testing.assert_close(layer.w13_weight[slot], w13[logical], rtol=0, atol=0)
        torch.testing.assert_close(layer.w2_weight[slot], w2[logical], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"physical_to_logical must be \[20\]"):
        layer.load_logical_weights(w13, w2, torch.zeros(19, dtype=torch.long))
    with pytest.raises(ValueError, match=r"in \[0, 16\)"):
        layer.load_logical_weights(w13, w2, torch.full((20,), 16))
    with pytest.raises(ValueError, match="expects 16 experts"):
        layer.load_logical_weights(w13[:-1], w2[:-1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_redundant_experts": 2}, r"num_redundant_experts=2 needs an eplb_state"),
        (
            {"eplb_state": EplbLayerState(), "num_redundant_experts": 3, "ep_size": 2},
            r"19 physical experts .*num_experts=16.*num_redundant_experts=3.*ep_size=2",
        ),
        (
            {"eplb_state": EplbLayerState(), "quant_method": Int4PairPackedFusedMoEMethod()},
            r"Int4PairPackedFusedMoEMethod.*does not support EPLB",
        ),
        ({"ep_size": 2, "ep_rank": 2}, r"ep_rank must be in \[0, ep_size=2\), got 2"),
        ({"ep_size": 0}, "ep_size must be a positive int"),
        ({"num_redundant_experts": -1, "eplb_state": EplbLayerState()}, "num_redundant_experts"),
        ({"activation": "relu"}, "unknown activation 'relu'"),
        ({"expert_placement": "blocked", "ep_size": 2}, "unknown expert placement 'blocked'"),
        (
            {"eplb_state": EplbLayerState(), "ep_size": 2, "expert_placement": "round_robin"},
            "round_robin",
        ),
        ({"experts_impl": "triton"}, "unknown experts_impl 'triton'"),
        ({"quant_method": "int8"}, "quant_method must be a FusedMoEMethodBase"),
        ({"num_logical_experts": 12}, "num_logical_experts=12 must equal num_experts=16"),
        (
            {"num_fused_shared_experts": 2, "e_score_correction_bias": torch.zeros(E)},
            "num_fused_shared_experts=2 needs the shared-routed router.*FusedTopKBiasRouter",
        ),
        ({"scoring_func": "tanh"}, "tanh"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedMoE(E, K, H, INTER, **kwargs)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="top_k=17 is larger than num_experts=16"):
        FusedMoE(E, 17, H, INTER)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        FusedMoE(E, K, 0, INTER)


def test_eplb_accepts_quant_methods_that_support_it():
    layer = FusedMoE(
        E, K, H, INTER, eplb_state=EplbLayerState(), quant_method=Int8WeightOnlyFusedMoEMethod()
    )
    assert layer.eplb_state is not None


@pytest.mark.parametrize("case_name", ["topk_bias", "shared_routed", "zero_expert"])
def test_compiles_whole_with_eplb_and_dynamic_token_counts(case_name):
    torch._dynamo.reset()
    case = ROUTER_CASES[case_name]
    l2p, counts, num_physical = random_replica_layout(E, 4, torch.Generator().manual_seed(5))
    layers, loads = [], []
    for _ in range(2):
        layer = FusedMoE(
            E, K, H, INTER, eplb_state=EplbLayerState(), num_redundant_experts=4, **case.kwargs
        )
        layer.load_logical_weights(*make_weights(case.num_sources))
        loads.append(attach_eplb(layer, l2p, counts))
        layers.append(layer)
    eager, traced = layers
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager", dynamic=True)
    for num_tokens in (9, 14, 3):
        x, logits = make_inputs(num_tokens, case.num_logits, seed=num_tokens)
        torch.testing.assert_close(compiled(x, logits), eager(x, logits), rtol=1e-6, atol=1e-6)
    assert loads[0].tolist() == loads[1].tolist() and int(loads[0].sum()) == 26 * K
    x, logits = make_inputs(6, case.num_logits)
    explanation = torch._dynamo.explain(traced)(x, logits)
    assert explanation.graph_break_count == 0


def test_bfloat16_layer_uses_grouped_mm_and_compiles():
    torch._dynamo.reset()
    layer = FusedMoE(E, K, H, INTER, params_dtype=torch.bfloat16)
    w13, w2 = make_weights(E)
    layer.load_logical_weights(w13, w2)
    assert layer.w13_weight.dtype == torch.bfloat16
    x, logits = make_inputs(19, E)
    x = x.bfloat16()
    out = layer(x, logits)
    weights, ids = topk_reference(logits, K, True, "softmax")
    expected = moe_float64(x, layer.w13_weight, layer.w2_weight, weights, ids)
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-2)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, logits), out, rtol=0, atol=0)
