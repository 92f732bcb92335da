"""Every router with EPLB off and on: SPEC §3's worked examples, both replica policies,
recording off, padding, capture order and in-place state updates."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from moe_reference import eplb_reference, grid_logits, random_replica_layout

from moe_compile import EplbLayerState
from moe_compile.router import (
    CustomRoutingRouter,
    FusedTopKBiasRouter,
    FusedTopKRouter,
    GroupedTopKRouter,
    RoutingSimulatorRouter,
    SharedRoutedRouter,
    ZeroExpertRouter,
    register_routing_strategy,
)

POLICIES = ("token_hash", "modulo")
EXAMPLE_IDS = [[0, 1], [2, 3], [0, 2]]
PADDING_IDS = [[0, 1], [2, 3], [0, 1], [2, 3]]
# Logits over 4 experts whose top-2 (lower index on ties) is the given pair.
PAIR_LOGITS = {
    (0, 1): [3.0, 2.0, 0.0, 0.0],
    (2, 3): [0.0, 0.0, 3.0, 2.0],
    (0, 2): [3.0, 0.0, 2.0, 0.0],
}


def logits_for(ids) -> torch.Tensor:
    return torch.tensor([PAIR_LOGITS[tuple(row)] for row in ids])


@register_routing_strategy("test_replay_logits_argmax")
def replay_top2(router_logits, top_k, generator):
    """A simulator strategy that reads the logits, so the worked examples apply to it too."""
    ids = torch.sort(router_logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
    return torch.ones(ids.shape), ids


def fixed_pair_routing(hidden_states, gating_output, topk, renormalize):
    ids = torch.sort(gating_output, dim=-1, descending=True, stable=True).indices[:, :topk]
    return torch.full(ids.shape, 0.5, dtype=torch.float64), ids.int()


@dataclass
class RouterCase:
    name: str
    build: Callable[..., object]  # (top_k, num_logical, num_physical, **eplb kwargs) -> router
    extra_columns: int = 0  # logit columns past the logical experts (shared / zero experts)
    appends_shared_id: bool = False  # output column 2 is shared expert 4, never remapped

    def logits(self, routed_logits: torch.Tensor) -> torch.Tensor:
        if not self.extra_columns:
            return routed_logits
        extra = torch.full((routed_logits.shape[0], self.extra_columns), -30.0)
        return torch.cat([routed_logits, extra], dim=1)


def _grouped(top_k, num_logical, num_physical, **kw):
    # Two groups, both kept: grouped routing then equals plain top-k.
    return GroupedTopKRouter(top_k, num_physical, 2, 2, **kw)


def _zero(top_k, num_logical, num_physical, **kw):
    bias = torch.zeros(num_logical + 1)
    return ZeroExpertRouter(top_k, num_physical, bias, num_logical_experts=num_logical, **kw)


ROUTER_CASES = [
    RouterCase("fused_topk", lambda k, e, p, **kw: FusedTopKRouter(k, p, **kw)),
    RouterCase(
        "fused_topk_bias", lambda k, e, p, **kw: FusedTopKBiasRouter(k, p, torch.zeros(e), **kw)
    ),
    RouterCase("grouped_topk", _grouped),
    RouterCase(
        "custom",
        lambda k, e, p, **kw: CustomRoutingRouter(
            k, p, custom_routing_function=fixed_pair_routing, **kw
        ),
    ),
    RouterCase(
        "shared_routed",
        lambda k, e, p, **kw: SharedRoutedRouter(k, p, num_fused_shared_experts=1, **kw),
        extra_columns=1,
        appends_shared_id=True,
    ),
    RouterCase("zero_expert", _zero, extra_columns=1),
    RouterCase(
        "simulator",
        lambda k, e, p, **kw: RoutingSimulatorRouter(
            k, p, strategy="test_replay_logits_argmax", **kw
        ),
    ),
]
CASE_IDS = [case.name for case in ROUTER_CASES]


def make_state(l2p, counts, num_physical, record=True, unpadded=None, load_dtype=torch.int32):
    return EplbLayerState(
        expert_load_view=torch.zeros(num_physical, dtype=load_dtype),
        logical_to_physical_map=torch.tensor(l2p),
        logical_replica_count=torch.tensor(counts),
        should_record_tensor=torch.tensor(record),
        num_unpadded_tokens=None if unpadded is None else torch.tensor(unpadded),
    )


def route(case, ids, state=None, policy="token_hash", num_physical=4, **kw):
    router = case.build(2, 4, num_physical, eplb_state=state, eplb_replica_policy=policy, **kw)
    logits = case.logits(logits_for(ids))
    weights, physical = router.select_experts(torch.zeros(len(ids), 3), logits)
    return weights, physical


def routed_columns(physical: torch.Tensor) -> list:
    return physical[:, :2].tolist()


# SPEC §3 worked examples: (map, replica counts, P, ids per policy, load per policy).
WORKED_EXAMPLES = {
    "identity": (
        [[0], [1], [2], [3]],
        [1, 1, 1, 1],
        4,
        {"token_hash": EXAMPLE_IDS, "modulo": EXAMPLE_IDS},
        {"token_hash": [2, 1, 2, 1], "modulo": [2, 1, 2, 1]},
    ),
    "permutation": (
        [[3], [0], [1], [2]],
        [1, 1, 1, 1],
        4,
        {"token_hash": [[3, 0], [1, 2], [3, 1]], "modulo": [[3, 0], [1, 2], [3, 1]]},
        {"token_hash": [1, 2, 1, 2], "modulo": [1, 2, 1, 2]},
    ),
    "two_replicated_padded_map": (
        [[0, 4], [1, 5], [2, -1], [3, -1]],
        [2, 2, 1, 1],
        6,
        # modulo uses the flattened slot 0..5: replicas 0,1 | -,- | 0,- for experts 0,1 | 2,3 | 0,2.
        {"token_hash": [[0, 1], [2, 3], [0, 2]], "modulo": [[0, 5], [2, 3], [0, 2]]},
        {"token_hash": [2, 1, 2, 1, 0, 0], "modulo": [2, 0, 2, 1, 0, 1]},
    ),
    "all_replicated": (
        [[0, 4], [1, 5], [2, 6], [3, 7]],
        [2, 2, 2, 2],
        8,
        {"token_hash": [[0, 1], [6, 7], [0, 2]], "modulo": [[0, 5], [2, 7], [0, 6]]},
        {"token_hash": [2, 1, 1, 0, 0, 0, 1, 1], "modulo": [2, 0, 1, 0, 0, 1, 1, 1]},
    ),
}


@pytest.mark.parametrize("case", ROUTER_CASES, ids=CASE_IDS)
def test_eplb_off_returns_logical_ids(case):
    _, ids = route(case, EXAMPLE_IDS)
    assert routed_columns(ids) == EXAMPLE_IDS
    if case.appends_shared_id:
        assert ids[:, 2].tolist() == [4, 4, 4]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("example", list(WORKED_EXAMPLES))
@pytest.mark.parametrize("case", ROUTER_CASES, ids=CASE_IDS)
def test_worked_examples(case, example, policy):
    l2p, counts, num_physical, expected_ids, expected_load = WORKED_EXAMPLES[example]
    state = make_state(l2p, counts, num_physical)
    weights_off, _ = route(case, EXAMPLE_IDS, num_physical=num_physical)
    weights, ids = route(case, EXAMPLE_IDS, state, policy, num_physical)
    assert routed_columns(ids) == expected_ids[policy]
    assert state.expert_load_view.tolist() == expected_load[policy]
    assert state.expert_load_view.dtype == torch.int32
    assert torch.equal(weights, weights_off), "EPLB must not touch the weights"
    if case.appends_shared_id:
        assert ids[:, 2].tolist() == [4, 4, 4], "shared experts are not remapped"
    # The reference agrees with the literal SPEC numbers.
    ref_ids, ref_load = eplb_reference(EXAMPLE_IDS, l2p, counts, num_physical, policy)
    assert ref_ids == expected_ids[policy] and ref_load == expected_load[policy]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", ROUTER_CASES, ids=CASE_IDS)
def test_record_off_maps_but_does_not_count(case, policy):
    l2p, counts, num_physical, expected_ids, _ = WORKED_EXAMPLES["all_replicated"]
    state = make_state(l2p, counts, num_physical, record=False)
    _, ids = route(case, EXAMPLE_IDS, state, policy, num_physical)
    assert routed_columns(ids) == expected_ids[policy]
    assert state.expert_load_view.tolist() == [0] * num_physical


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", ROUTER_CASES, ids=CASE_IDS)
def test_padding_rows_are_not_counted(case, policy):
    state = make_state([[0], [1], [2], [3]], [1, 1, 1, 1], 4, unpadded=2)
    _, ids = route(case, PADDING_IDS, state, policy)
    assert routed_columns(ids) == PADDING_IDS
    assert state.expert_load_view.tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("case", ROUTER_CASES, ids=CASE_IDS)
def test_recording_flag_and_map_are_read_in_place(case):
    """The router keeps the state's tensors, so in-place updates reach the next call."""
    state = make_state([[0, 4], [1, 5], [2, 6], [3, 7]], [1, 1, 1, 1], 8, record=False)
    router = case.build(2, 4, 8, eplb_state=state)
    logits = case.logits(logits_for(EXAMPLE_IDS))
    hidden = torch.zeros(3, 3)
    assert routed_columns(router.select_experts(hidden, logits)[1]) == EXAMPLE_IDS
    state.should_record_tensor.fill_(True)
    state.logical_replica_count.fill_(2)
    assert routed_columns(router.select_experts(hidden, logits)[1]) == [[0, 1], [6, 7], [0, 2]]
    router.select_experts(hidden, logits)
    assert state.expert_load_view.tolist() == [4, 2, 2, 0, 0, 0, 2, 2], "load accumulates"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", ROUTER_CASES, ids=CASE_IDS)
def test_random_layout_matches_reference(case, policy):
    """Awkward sizes: 60 logical experts, 4 redundant, 300 tokens, k=6."""
    generator = torch.Generator().manual_seed(17)
    num_logical, top_k = 60, 6
    l2p, counts, num_physical = random_replica_layout(num_logical, 4, generator, max_replicas=3)
    logits = case.logits(grid_logits(300, num_logical, generator))
    hidden = torch.randn(300, 5, generator=generator)

    def run(state):
        router = case.build(
            top_k, num_logical, num_physical, eplb_state=state, eplb_replica_policy=policy
        )
        if isinstance(router, RoutingSimulatorRouter):
            router.strategy = "uniform_random"
        return router.select_experts(hidden, logits)

    weights_off, logical = run(None)
    state = EplbLayerState(
        expert_load_view=torch.zeros(num_physical, dtype=torch.int32),
        logical_to_physical_map=l2p,
        logical_replica_count=counts,
        should_record_tensor=torch.tensor(True),
    )
    weights_on, physical = run(state)
    ref_ids, ref_load = eplb_reference(logical[:, :top_k], l2p, counts, num_physical, policy)
    assert torch.equal(weights_on, weights_off)
    assert physical[:, :top_k].tolist() == ref_ids
    assert torch.equal(physical[:, top_k:], logical[:, top_k:])
    assert state.expert_load_view.tolist() == ref_load
    assert sum(ref_load) == 300 * top_k
    assert physical.dtype == torch.int32


def test_capture_fn_sees_logical_ids_before_the_remap():
    captured = []
    state = make_state([[3], [0], [1], [2]], [1, 1, 1, 1], 4)
    router = FusedTopKRouter(2, 4, eplb_state=state, indices_dtype=torch.int64)
    router.set_capture_fn(lambda ids: captured.append(ids.clone()))
    _, ids = router.select_experts(torch.zeros(3, 1), logits_for(EXAMPLE_IDS))
    assert len(captured) == 1 and captured[0].tolist() == EXAMPLE_IDS
    assert ids.tolist() == [[3, 0], [1, 2], [3, 1]] and ids.dtype == torch.int64
    router.set_capture_fn(None)
    router.select_experts(torch.zeros(3, 1), logits_for(EXAMPLE_IDS))
    assert len(captured) == 1


def test_validation_runs_before_routing_and_capture():
    captured = []
    state = make_state([[0], [1], [2], [3]], [1, 1, 1, 1], 4)
    state.should_record_tensor = None
    router = FusedTopKRouter(2, 4, eplb_state=state)
    router.set_capture_fn(captured.append)
    with pytest.raises(ValueError, match="EPLB requires should_record_tensor != None"):
        router.select_experts(torch.zeros(3, 1), logits_for(EXAMPLE_IDS))
    assert captured == []


@pytest.mark.parametrize("load_dtype", [torch.int32, torch.int64, torch.float32])
def test_load_counter_dtypes(load_dtype):
    state = make_state([[0], [1], [2], [3]], [1, 1, 1, 1], 4, load_dtype=load_dtype)
    FusedTopKRouter(2, 4, eplb_state=state).select_experts(
        torch.zeros(3, 1), logits_for(EXAMPLE_IDS)
    )
    assert state.expert_load_view.dtype == load_dtype
    assert state.expert_load_view.tolist() == [2, 1, 2, 1]


def test_zero_expert_slots_are_computed_before_the_remap():
    """The side output uses the pre-EPLB ids; the zeroed slot then maps like expert 0."""
    # Token 0 picks zero expert 4 and expert 1; token 1 picks experts 2 and 3.
    logits = torch.tensor([[0.0, 2.0, 0.0, 0.0, 3.0], [0.0, 0.0, 3.0, 2.0, 0.0]])
    hidden = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    state = make_state([[3], [0], [1], [2]], [1, 1, 1, 1], 4)
    off = ZeroExpertRouter(2, 4, torch.zeros(5), num_logical_experts=4, renormalize=False)
    on = ZeroExpertRouter(
        2, 4, torch.zeros(5), num_logical_experts=4, renormalize=False, eplb_state=state
    )
    weights_off, ids_off = off.select_experts(hidden, logits)
    weights_on, ids_on = on.select_experts(hidden, logits)
    assert ids_off.tolist() == [[0, 1], [2, 3]]
    assert ids_on.tolist() == [[3, 0], [1, 2]]
    assert weights_on[0, 0].item() == 0.0 and torch.equal(weights_on, weights_off)
    torch.testing.assert_close(on.zero_expert_output, off.zero_expert_output)
    assert on.zero_expert_output[1].tolist() == [0.0, 0.0]
    assert on.zero_expert_output[0].abs().sum() > 0
