"""moe_compile::route / ::route_eplb on the CPU: equal to the eager routers (the spec), to the
independent float64 references, to SPEC §3's worked examples; opcheck; fake shapes; bad input."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from moe_reference import (
    eplb_reference,
    grid_logits,
    grouped_topk_reference,
    random_replica_layout,
    topk_reference,
)
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_compile.custom_ops as custom_ops
from moe_compile import EplbLayerState, create_fused_moe_router
from moe_compile.custom_ops.routing import check_eplb_map

POLICIES = ("token_hash", "modulo")


@dataclass(frozen=True)
class Config:
    name: str
    num_experts: int  # routed experts
    top_k: int
    scoring_func: str = "softmax"
    renormalize: bool = True
    bias: bool = False
    scale: float = 1.0
    groups: int = 0
    topk_group: int = 0
    shared: int = 0

    def op_args(self, logits, bias, indices_dtype=torch.int32):
        return (
            logits,
            bias,
            self.top_k,
            self.scoring_func,
            self.renormalize,
            self.scale,
            self.groups,
            self.topk_group,
            self.shared,
            indices_dtype,
        )

    def make_bias(self, generator):
        if not self.bias:
            return None
        return torch.randn(self.num_experts, generator=generator) * 0.1

    def eager_router(
        self, bias, indices_dtype, eplb_state=None, num_physical=None, policy="modulo"
    ):
        return create_fused_moe_router(
            top_k=self.top_k,
            global_num_experts=num_physical or self.num_experts + self.shared,
            eplb_state=eplb_state,
            renormalize=self.renormalize,
            scoring_func=self.scoring_func,
            e_score_correction_bias=bias,
            routed_scaling_factor=self.scale,
            use_grouped_topk=self.groups > 1,
            num_expert_group=self.groups or None,
            topk_group=self.topk_group or None,
            num_fused_shared_experts=self.shared,
            num_logical_experts=self.num_experts,
            indices_dtype=indices_dtype,
            eplb_replica_policy=policy,
        )


CONFIGS = [
    Config("topk_softmax_E8_k2", 8, 2),
    Config("topk_sigmoid_raw_E60_k6", 60, 6, "sigmoid", renormalize=False),
    Config("topk_softmax_E256_k8", 256, 8),
    Config("bias_sqrtsoftplus_E128_k1", 128, 1, "sqrtsoftplus", bias=True, scale=2.5),
    Config("bias_sigmoid_raw_E60_k6", 60, 6, "sigmoid", renormalize=False, bias=True, scale=1.5),
    Config("grouped_sigmoid_bias_E256_k8", 256, 8, "sigmoid", True, True, 2.5, 8, 4),
    Config("grouped_softmax_E128_k6", 128, 6, scale=0.5, groups=4, topk_group=2),
    Config("shared_E60_k2_n2", 60, 2, shared=2),
]
TOKENS = (0, 1, 7, 300)


def make_logits(config, num_tokens, generator, ties):
    width = config.num_experts + config.shared
    if ties:  # few distinct values: equal scores at every rank
        return grid_logits(num_tokens, width, generator).to(torch.bfloat16)
    return torch.randn(num_tokens, width, generator=generator).to(torch.bfloat16)


def make_state(config, generator, load_dtype=torch.int32, max_replicas=None, record=True):
    l2p, counts, num_physical = random_replica_layout(
        config.num_experts, config.num_experts // 4 + 1, generator, max_replicas
    )
    state = EplbLayerState(
        expert_load_view=torch.zeros(num_physical, dtype=load_dtype),
        logical_to_physical_map=l2p,
        logical_replica_count=counts,
        should_record_tensor=torch.tensor(record),
    )
    return state, num_physical


def clone_state(state):
    return EplbLayerState(
        expert_load_view=state.expert_load_view.clone(),
        logical_to_physical_map=state.logical_to_physical_map,
        logical_replica_count=state.logical_replica_count,
        should_record_tensor=state.should_record_tensor,
        num_unpadded_tokens=state.num_unpadded_tokens,
    )


def eplb_op_args(state, policy):
    return (
        state.logical_to_physical_map,
        state.logical_replica_count,
        state.expert_load_view,
        state.should_record_tensor,
        state.num_unpadded_tokens,
        policy,
    )


# ---------------------------------------------------------------- equal to the eager routers
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_route_equals_eager_router(config, num_tokens, ties):
    generator = torch.Generator().manual_seed(num_tokens * 31 + len(config.name))
    logits = make_logits(config, num_tokens, generator, ties)
    bias = config.make_bias(generator)
    indices_dtype = torch.int64 if num_tokens % 2 else torch.int32
    weights, ids = torch.ops.moe_compile.route(*config.op_args(logits, bias, indices_dtype))
    router = config.eager_router(bias, indices_dtype)
    ref_weights, ref_ids = router.select_experts(torch.empty(num_tokens, 1), logits)
    assert ids.dtype == indices_dtype and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (num_tokens, config.top_k + config.shared)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=0)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_route_eplb_equals_eager_router(config, num_tokens, policy):
    generator = torch.Generator().manual_seed(7 * num_tokens + len(config.name))
    logits = make_logits(config, num_tokens, generator, ties=num_tokens == 7)
    bias = config.make_bias(generator)
    state, num_physical = make_state(config, generator)
    eager_state = clone_state(state)
    num_physical += config.shared  # shared experts count as physical experts of the layer
    state.expert_load_view = torch.zeros(num_physical, dtype=torch.int32)
    eager_state.expert_load_view = torch.zeros(num_physical, dtype=torch.int32)

    weights, ids = torch.ops.moe_compile.route_eplb(
        *config.op_args(logits, bias), *eplb_op_args(state, policy)
    )
    router = config.eager_router(bias, torch.int32, eager_state, num_physical, policy)
    ref_weights, ref_ids = router.select_experts(torch.empty(num_tokens, 1), logits)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=0)
    assert torch.equal(state.expert_load_view, eager_state.expert_load_view)
    assert int(state.expert_load_view.sum()) == num_tokens * config.top_k


# ---------------------------------------------------------------- independent references
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_float64_reference_with_ties(scoring_func, with_bias):
    generator = torch.Generator().manual_seed(3)
    logits = grid_logits(64, 40, generator)
    bias = (torch.randint(0, 3, (40,), generator=generator) * 2).float() if with_bias else None
    weights, ids = custom_ops.route(
        logits,
        5,
        e_score_correction_bias=bias,
        scoring_func=scoring_func,
        routed_scaling_factor=2.0 if with_bias else 1.0,
    )
    ref_weights, ref_ids = topk_reference(
        logits, 5, True, scoring_func, bias, 2.0 if with_bias else 1.0
    )
    assert np.array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(weights.numpy(), ref_weights, rtol=1e-6)


@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_route_matches_float64_reference(with_bias):
    generator = torch.Generator().manual_seed(5)
    logits = grid_logits(48, 64, generator)
    bias = (torch.randint(0, 3, (64,), generator=generator) * 2).float() if with_bias else None
    weights, ids = custom_ops.route(
        logits,
        6,
        e_score_correction_bias=bias,
        scoring_func="sigmoid",
        num_expert_group=8,
        topk_group=3,
        routed_scaling_factor=2.5,
    )
    ref_weights, ref_ids = grouped_topk_reference(logits, 6, 8, 3, True, "sigmoid", bias, 2.5)
    assert np.array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(weights.numpy(), ref_weights, rtol=1e-6)


def test_shared_experts_columns_follow_the_routed_ones():
    logits = torch.tensor([[3.0, 2.0, 0.0, 1.0, -1.0, 0.5]])  # 4 routed + 2 shared
    weights, ids = custom_ops.route(logits, 2, num_fused_shared_experts=2)
    routed = torch.softmax(logits[:, :4], dim=-1)[:, :2]
    expected = torch.cat([routed / routed.sum(), torch.sigmoid(logits[:, 4:])], dim=-1)
    assert ids.tolist() == [[0, 1, 4, 5]]
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- SPEC §3 worked examples
PAIR_LOGITS = {
    (0, 1): [3.0, 2.0, 0.0, 0.0],
    (2, 3): [0.0, 0.0, 3.0, 2.0],
    (0, 2): [3.0, 0.0, 2.0, 0.0],
}


def spec_route_eplb(ids, l2p, num_physical, record=True, unpadded=None, policy="token_hash"):
    logits = torch.tensor([PAIR_LOGITS[tuple(row)] for row in ids])
    l2p = torch.tensor(l2p)
    state = EplbLayerState(
        expert_load_view=torch.zeros(num_physical, dtype=torch.int32),
        logical_to_physical_map=l2p,
        logical_replica_count=(l2p >= 0).sum(dim=1),
        should_record_tensor=torch.tensor(record),
        num_unpadded_tokens=None if unpadded is None else torch.tensor(unpadded),
    )
    _, physical = custom_ops.route_eplb(logits, 2, state, replica_policy=policy)
    return physical.tolist(), state.expert_load_view.tolist()


@pytest.mark.parametrize(
    "l2p, num_physical, expected_ids, expected_load",
    [
        ([[0], [1], [2], [3]], 4, [[0, 1], [2, 3], [0, 2]], [2, 1, 2, 1]),
        ([[3], [0], [1], [2]], 4, [[3, 0], [1, 2], [3, 1]], [1, 2, 1, 2]),
        ([[0, 4], [1, 5], [2, -1], [3, -1]], 6, [[0, 1], [2, 3], [0, 2]], [2, 1, 2, 1, 0, 0]),
        ([[0, 4], [1, 5], [2, 6], [3, 7]], 8, [[0, 1], [6, 7], [0, 2]], [2, 1, 1, 0, 0, 0, 1, 1]),
    ],
)
def test_spec_worked_examples(l2p, num_physical, expected_ids, expected_load):
    ids, load = spec_route_eplb([[0, 1], [2, 3], [0, 2]], l2p, num_physical)
    assert ids == expected_ids
    assert load == expected_load


def test_spec_record_off_and_padding():
    identity = [[0], [1], [2], [3]]
    _, load = spec_route_eplb([[0, 1], [2, 3], [0, 2]], identity, 4, record=False)
    assert load == [0, 0, 0, 0]
    padded_ids = [[0, 1], [2, 3], [0, 1], [2, 3]]
    ids, load = spec_route_eplb(padded_ids, identity, 4, unpadded=2)
    assert ids == padded_ids
    assert load == [1, 1, 1, 1]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("unpadded", [None, 0, 5, 40])
def test_route_eplb_matches_slot_by_slot_reference(policy, unpadded):
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(33, 24, generator=generator)
    l2p, counts, num_physical = random_replica_layout(24, 13, generator, max_replicas=4)
    state = EplbLayerState(
        expert_load_view=torch.zeros(num_physical, dtype=torch.int64),
        logical_to_physical_map=l2p,
        logical_replica_count=counts,
        should_record_tensor=torch.tensor(True),
        num_unpadded_tokens=None if unpadded is None else torch.tensor(unpadded),
    )
    _, logical = custom_ops.route(logits, 3)
    _, physical = custom_ops.route_eplb(logits, 3, state, replica_policy=policy)
    ref_ids, ref_load = eplb_reference(logical, l2p, counts, num_physical, policy, True, unpadded)
    assert physical.tolist() == ref_ids
    assert state.expert_load_view.tolist() == ref_load


@pytest.mark.parametrize("load_dtype", [torch.int32, torch.int64, torch.float32])
def test_load_counter_dtypes_accumulate(load_dtype):
    generator = torch.Generator().manual_seed(2)
    config = Config("acc", 16, 4)
    state, _ = make_state(config, generator, load_dtype=load_dtype)
    logits = torch.randn(20, 16, generator=generator)
    for _ in range(3):
        custom_ops.route_eplb(logits, 4, state)
    assert state.expert_load_view.dtype == load_dtype
    assert float(state.expert_load_view.sum()) == 3 * 20 * 4


def test_corrupt_map_is_never_counted_out_of_range_and_check_reports_it():
    logits = torch.tensor([PAIR_LOGITS[(0, 1)], PAIR_LOGITS[(2, 3)]])
    # Expert 1 maps to physical 9 (P = 4); expert 3 claims 5 replicas in a 2-slot map.
    l2p = torch.tensor([[0, -1], [9, -1], [2, -1], [3, 1]])
    counts = torch.tensor([1, 1, 1, 5])
    backing = torch.zeros(8, dtype=torch.int32)
    state = EplbLayerState(
        expert_load_view=backing[2:6],
        logical_to_physical_map=l2p,
        logical_replica_count=counts,
        should_record_tensor=torch.tensor(True),
    )
    _, physical = custom_ops.route_eplb(logits, 2, state, replica_policy="modulo", debug=False)
    # Slot o uses replica o % clamp(count, 1, 2): expert 3 at slot 3 -> replica 1 -> physical 1.
    assert physical.tolist() == [[0, 9], [2, 1]]
    assert backing.tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match=r"logical_replica_count\[3\] = 5"):
        check_eplb_map(l2p, counts, 4)
    counts[3] = 2
    with pytest.raises(ValueError, match=r"logical_to_physical_map\[1, 0\] = 9"):
        custom_ops.route_eplb(logits, 2, state, debug=True)
    check_eplb_map(torch.tensor([[0, -1], [1, 2]]), torch.tensor([1, 2]), 3)  # a sound map passes


def test_debug_maps_env_var(monkeypatch):
    logits = torch.tensor([PAIR_LOGITS[(0, 1)]])
    state = EplbLayerState(
        expert_load_view=torch.zeros(4, dtype=torch.int32),
        logical_to_physical_map=torch.tensor([[0], [1], [2], [-1]]),
        logical_replica_count=torch.tensor([1, 1, 1, 1]),
        should_record_tensor=torch.tensor(True),
    )
    custom_ops.route_eplb(logits, 2, state)  # off by default: no host check
    monkeypatch.setenv("MOE_COMPILE_DEBUG_MAPS", "1")
    with pytest.raises(ValueError, match=r"logical_to_physical_map\[3, 0\] = -1"):
        custom_ops.route_eplb(logits, 2, state)


# ---------------------------------------------------------------- counts and offsets
def _loop_counts(ids, num_bins):
    """Per-bin counts and exclusive offsets by a Python loop over every id."""
    counts = [0] * num_bins
    for value in ids.reshape(-1).tolist():
        if 0 <= value < num_bins:
            counts[value] += 1
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    return counts, offsets


@pytest.mark.parametrize("num_tokens", [0, 1, 37])
@pytest.mark.parametrize("eplb", [False, True])
@pytest.mark.parametrize("config", [CONFIGS[2], CONFIGS[5], CONFIGS[7]], ids=lambda c: c.name)
def test_route_counted_counts_the_returned_ids(config, eplb, num_tokens):
    generator = torch.Generator().manual_seed(5)
    logits = make_logits(config, num_tokens, generator, ties=True)
    bias = config.make_bias(generator)
    state = eager_state = None
    num_bins = config.num_experts + config.shared
    if eplb:
        state, num_physical = make_state(config, generator)
        eager_state = clone_state(state)
        num_bins = num_physical + config.shared
    weights, ids, counts, offsets = custom_ops.route_counted(
        logits, config.top_k, num_bins, state,
        e_score_correction_bias=bias, scoring_func=config.scoring_func,
        renormalize=config.renormalize, routed_scaling_factor=config.scale,
        num_expert_group=config.groups, topk_group=config.topk_group,
        num_fused_shared_experts=config.shared,
    )  # fmt: skip
    args = config.op_args(logits, bias)
    if eplb:
        ref_weights, ref_ids = torch.ops.moe_compile.route_eplb(
            *args, *eplb_op_args(eager_state, "token_hash")
        )
        assert torch.equal(state.expert_load_view, eager_state.expert_load_view)
    else:
        ref_weights, ref_ids = torch.ops.moe_compile.route(*args)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
    expected_counts, expected_offsets = _loop_counts(ids, num_bins)
    assert counts.dtype == offsets.dtype == torch.int32
    assert counts.tolist() == expected_counts
    assert offsets.tolist() == expected_offsets
    assert offsets[-1] == num_tokens * (config.top_k + config.shared)


def test_route_counted_skips_ids_outside_the_bins():
    """Fewer bins than experts (a rank's local slice): other ids are not counted."""
    generator = torch.Generator().manual_seed(6)
    config = CONFIGS[0]
    logits = make_logits(config, 50, generator, ties=False)
    _, ids, counts, offsets = custom_ops.route_counted(logits, config.top_k, 3)
    expected_counts, expected_offsets = _loop_counts(ids, 3)
    assert counts.tolist() == expected_counts and offsets.tolist() == expected_offsets
    assert int(offsets[-1]) < ids.numel()


@pytest.mark.parametrize("eplb", [False, True])
def test_opcheck_route_counted(eplb):
    generator = torch.Generator().manual_seed(1)
    config = CONFIGS[5]
    logits = make_logits(config, 9, generator, ties=False)
    eplb_args = (None,) * 5
    if eplb:
        state, _ = make_state(config, generator)
        eplb_args = eplb_op_args(state, "modulo")[:5]
    args = config.op_args(logits, config.make_bias(generator)) + eplb_args + ("modulo", 300)
    torch.library.opcheck(torch.ops.moe_compile.route_counted.default, args)


def test_compiled_route_counted_equals_eager_and_updates_the_load():
    generator = torch.Generator().manual_seed(8)
    config = CONFIGS[5]
    state, num_physical = make_state(config, generator)
    eager_state = clone_state(state)
    bias = config.make_bias(generator)

    def step(logits, state):
        return custom_ops.route_counted(
            logits, config.top_k, num_physical, state, e_score_correction_bias=bias,
            scoring_func=config.scoring_func, routed_scaling_factor=config.scale,
            num_expert_group=config.groups, topk_group=config.topk_group,
        )  # fmt: skip

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for num_tokens in (5, 11):
        logits = make_logits(config, num_tokens, generator, ties=True)
        got, expected = compiled(logits, state), step(logits, eager_state)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
    assert torch.equal(state.expert_load_view, eager_state.expert_load_view)
    assert int(state.expert_load_view.sum()) == 16 * config.top_k


def test_route_counted_bad_arguments_raise():
    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match="num_count_bins must be a positive int"):
        custom_ops.route_counted(logits, 2, 0)
    state, _ = make_state(Config("bad", 8, 2), torch.Generator().manual_seed(0))
    args = Config("bad", 8, 2).op_args(logits, None)
    partial = (state.logical_to_physical_map, None, state.expert_load_view, None, None)
    before = state.expert_load_view.clone()
    with pytest.raises(ValueError, match="either no EPLB tensors or all of"):
        torch.ops.moe_compile.route_counted(*args, *partial, "modulo", 8)
    assert torch.equal(state.expert_load_view, before)


# ---------------------------------------------------------------- zero experts
NUM_REAL, NUM_ZERO = 24, 4


def _zero_expert_setup(num_tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = grid_logits(num_tokens, NUM_REAL + NUM_ZERO, generator)
    bias = (torch.randint(0, 3, (NUM_REAL + NUM_ZERO,), generator=generator) * 2).float()
    bias[0] = bias[NUM_REAL] = 4.0  # a real and a zero expert at the top bias level
    return logits, bias, generator


@pytest.mark.parametrize("policy", [None, *POLICIES])
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_route_zero_experts_equals_eager_router(scoring_func, num_tokens, policy):
    """The op against ``ZeroExpertRouter`` (the spec): ids, weights, load, and the
    zero-expert weight as the router's side output for ``hidden_states = 1``."""
    logits, bias, generator = _zero_expert_setup(num_tokens, num_tokens + 3)
    state = eager_state = None
    num_physical = NUM_REAL
    if policy is not None:
        state, num_physical = make_state(Config("zero", NUM_REAL, 3), generator)
        eager_state = clone_state(state)
    router = create_fused_moe_router(
        top_k=3, global_num_experts=num_physical, eplb_state=eager_state,
        scoring_func=scoring_func, e_score_correction_bias=bias, routed_scaling_factor=1.5,
        zero_expert_type="identity", num_logical_experts=NUM_REAL,
        eplb_replica_policy=policy or "token_hash",
    )  # fmt: skip
    ref_weights, ref_ids = router.select_experts(torch.ones(num_tokens, 1), logits)
    weights, ids, zero_weight = custom_ops.route_zero_experts(
        logits, 3, NUM_REAL, state, e_score_correction_bias=bias, scoring_func=scoring_func,
        routed_scaling_factor=1.5, replica_policy=policy or "token_hash",
    )  # fmt: skip
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=0)
    assert zero_weight.shape == (num_tokens, 1)
    torch.testing.assert_close(zero_weight, router.zero_expert_output, rtol=0, atol=0)
    if state is not None:
        assert torch.equal(state.expert_load_view, eager_state.expert_load_view)
        assert int(state.expert_load_view.sum()) == num_tokens * 3


def test_route_zero_experts_matches_float64_reference():
    """Independent of the eager routers: top-k over real + zero experts in float64,
    zero-expert slots masked to (id 0, weight 0), their weights summed per token."""
    logits, bias, _ = _zero_expert_setup(300, 11)
    weights, ids, zero_weight = custom_ops.route_zero_experts(
        logits, 4, NUM_REAL, e_score_correction_bias=bias, routed_scaling_factor=2.0
    )
    ref_weights, ref_ids = topk_reference(logits, 4, True, "softmax", bias, 2.0)
    is_zero = ref_ids >= NUM_REAL
    assert is_zero.any() and not is_zero.all(), "data should mix real and zero experts"
    assert np.array_equal(ids.numpy(), np.where(is_zero, 0, ref_ids))
    np.testing.assert_allclose(weights.numpy(), np.where(is_zero, 0.0, ref_weights), rtol=1e-6)
    np.testing.assert_allclose(
        zero_weight.numpy()[:, 0], (ref_weights * is_zero).sum(axis=1), rtol=1e-6
    )


@pytest.mark.parametrize("eplb", [False, True])
def test_opcheck_route_zero_experts(eplb):
    logits, bias, generator = _zero_expert_setup(9, 2)
    eplb_args = (None,) * 5 + ("token_hash",)
    if eplb:
        state, _ = make_state(Config("zero", NUM_REAL, 3), generator)
        eplb_args = eplb_op_args(state, "modulo")
    args = (logits, bias, 3, "sigmoid", True, 2.5, 0, 0, torch.int64, NUM_REAL, *eplb_args)
    torch.library.opcheck(torch.ops.moe_compile.route_zero_experts.default, args)


def test_route_zero_experts_bad_arguments_raise():
    logits, bias, generator = _zero_expert_setup(3, 0)
    state, _ = make_state(Config("zero", NUM_REAL, 3), generator)
    before = state.expert_load_view.clone()
    width = NUM_REAL + NUM_ZERO
    for num_real in (0, width):
        with pytest.raises(ValueError, match=rf"num_real_experts must be in \[1, {width}\)"):
            custom_ops.route_zero_experts(logits, 3, num_real, e_score_correction_bias=bias)
    wide_map = Config("zero", width, 3)
    wide_state, _ = make_state(wide_map, generator)
    with pytest.raises(ValueError, match=rf"logical_to_physical_map must be \[{NUM_REAL}, "):
        custom_ops.route_zero_experts(logits, 3, NUM_REAL, wide_state)
    args = (logits, bias, 3, "softmax", True, 1.0, 0, 0, torch.int32, NUM_REAL)
    partial = (state.logical_to_physical_map, None, state.expert_load_view, None, None)
    with pytest.raises(ValueError, match="route_zero_experts takes either no EPLB tensors"):
        torch.ops.moe_compile.route_zero_experts(*args, *partial, "modulo")
    assert torch.equal(state.expert_load_view, before)


# ---------------------------------------------------------------- opcheck, fake, compile
OPCHECK_CONFIGS = [CONFIGS[0], CONFIGS[3], CONFIGS[5], CONFIGS[7]]


@pytest.mark.parametrize("config", OPCHECK_CONFIGS, ids=lambda c: c.name)
def test_opcheck_route(config):
    generator = torch.Generator().manual_seed(1)
    logits = make_logits(config, 9, generator, ties=True)
    args = config.op_args(logits, config.make_bias(generator), torch.int64)
    torch.library.opcheck(torch.ops.moe_compile.route.default, args)


@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("config", OPCHECK_CONFIGS, ids=lambda c: c.name)
def test_opcheck_route_eplb(config, with_padding):
    generator = torch.Generator().manual_seed(1)
    logits = make_logits(config, 9, generator, ties=False)
    state, _ = make_state(config, generator)
    state.num_unpadded_tokens = torch.tensor(6) if with_padding else None
    args = config.op_args(logits, config.make_bias(generator)) + eplb_op_args(state, "token_hash")
    torch.library.opcheck(torch.ops.moe_compile.route_eplb.default, args)


@pytest.mark.parametrize("device", ["fake", "meta"])
def test_fake_shapes_and_dtypes(device):
    config = CONFIGS[5]
    real_logits = torch.randn(13, 256)
    real_state, _ = make_state(config, torch.Generator().manual_seed(0))
    if device == "fake":
        mode = FakeTensorMode()
        to = mode.from_tensor
    else:
        mode = torch.device("meta")

        def to(t):
            return t.to("meta")

    with mode:
        logits = to(real_logits)
        bias = to(torch.zeros(256))
        state_args = [
            to(t) if isinstance(t, torch.Tensor) else t for t in eplb_op_args(real_state, "modulo")
        ]
        weights, ids = torch.ops.moe_compile.route(*config.op_args(logits, bias, torch.int16))
        eplb_weights, eplb_ids = torch.ops.moe_compile.route_eplb(
            *config.op_args(logits, bias), *state_args
        )
    assert weights.shape == ids.shape == eplb_ids.shape == (13, 8)
    assert weights.dtype == eplb_weights.dtype == torch.float32
    assert ids.dtype == torch.int16 and eplb_ids.dtype == torch.int32
    assert weights.is_contiguous() and ids.is_contiguous()


def test_compiled_route_eplb_updates_the_load_in_place():
    generator = torch.Generator().manual_seed(4)
    config = Config("compiled", 32, 4)
    state, _ = make_state(config, generator)
    eager_state = clone_state(state)
    logits = torch.randn(10, 32, generator=generator)

    def step(logits, state):
        return torch.ops.moe_compile.route_eplb(
            *config.op_args(logits, None), *eplb_op_args(state, "token_hash")
        )

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        weights, ids = compiled(logits, state)
        ref_weights, ref_ids = step(logits, eager_state)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=0)
    assert torch.equal(state.expert_load_view, eager_state.expert_load_view)
    assert int(state.expert_load_view.sum()) == 2 * 10 * 4


# ---------------------------------------------------------------- bad input
BAD_ROUTE_ARGS = [
    (dict(top_k=0), r"top_k must be in \[1, 16\]"),
    (dict(top_k=17), r"top_k must be in \[1, 16\]"),
    (dict(scoring_func="tanh"), "unknown scoring_func 'tanh'"),
    (dict(num_expert_group=3, topk_group=1), "16 routed experts split into num_expert_group=3"),
    (dict(num_expert_group=4, topk_group=5), r"topk_group must be in \[1, num_expert_group=4\]"),
    (dict(num_expert_group=4, topk_group=1, top_k=5), "top_k=5 exceeds the 4 experts"),
    (dict(num_fused_shared_experts=16), r"num_fused_shared_experts must be in \[0, 16\)"),
    (dict(e_score_correction_bias=torch.zeros(15)), "e_score_correction_bias must be a 1-D"),
    (dict(indices_dtype=torch.float32), "indices_dtype must be one of"),
]


@pytest.mark.parametrize("overrides, message", BAD_ROUTE_ARGS)
def test_bad_route_arguments_raise(overrides, message):
    kwargs = dict(top_k=2) | overrides
    top_k = kwargs.pop("top_k")
    with pytest.raises(ValueError, match=message):
        custom_ops.route(torch.randn(3, 16), top_k, **kwargs)


def test_bad_eplb_arguments_raise():
    logits = torch.randn(3, 8)
    state = EplbLayerState(
        expert_load_view=torch.zeros(8, dtype=torch.int32),
        logical_to_physical_map=torch.arange(8)[:, None],
        logical_replica_count=torch.ones(8, dtype=torch.int64),
        should_record_tensor=torch.tensor(True),
    )
    args = Config("bad", 8, 2).op_args(logits, None)
    good = eplb_op_args(state, "modulo")
    cases = [
        ((good[0][:7], *good[1:]), r"logical_to_physical_map must be \[8, max_replicas"),
        ((good[0].float(), *good[1:]), "logical_to_physical_map must be integer"),
        ((good[0], good[1][:4], *good[2:]), "logical_replica_count must be a 1-D integer"),
        ((*good[:2], good[2].to(torch.int16), *good[3:]), "expert_load_view must be 1-D int32"),
        ((*good[:3], torch.tensor(1), *good[4:]), "should_record must be a 0-d bool"),
        ((*good[:4], torch.tensor([2]), good[5]), "num_unpadded_tokens must be a 0-d integer"),
        ((*good[:5], "random"), "unknown EPLB replica policy 'random'"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            torch.ops.moe_compile.route_eplb(*args, *bad)
