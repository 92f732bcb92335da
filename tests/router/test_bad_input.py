"""Bad input raises a ValueError that names the problem, and leaves the EPLB state untouched."""

import dataclasses

import pytest
import torch

from moe_compile import EplbLayerState
from moe_compile.router import (
    FusedTopKBiasRouter,
    FusedTopKRouter,
    GroupedTopKRouter,
)

NUM_LOGICAL, NUM_PHYSICAL = 4, 6


def valid_state() -> EplbLayerState:
    return EplbLayerState(
        expert_load_view=torch.tensor([5, 0, 1, 0, 2, 0], dtype=torch.int32),
        logical_to_physical_map=torch.tensor([[0, 4], [1, 5], [2, -1], [3, -1]]),
        logical_replica_count=torch.tensor([2, 2, 1, 1]),
        should_record_tensor=torch.tensor(True),
        num_unpadded_tokens=torch.tensor(3),
    )


def logits(num_tokens=3, num_experts=NUM_LOGICAL):
    return torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(0))


class StateSnapshot:
    """Remembers each field's tensor object and contents."""

    def __init__(self, state: EplbLayerState):
        self.state = state
        self.fields = {
            f.name: (getattr(state, f.name), _clone(getattr(state, f.name)))
            for f in dataclasses.fields(state)
        }

    def assert_unchanged(self):
        for name, (tensor, contents) in self.fields.items():
            current = getattr(self.state, name)
            assert current is tensor, f"{name} was rebound"
            if tensor is not None and tensor.device.type != "meta":
                assert torch.equal(current, contents), f"{name} was modified"


def _clone(tensor):
    return None if tensor is None else tensor.clone()


def expect_rejected(state, message, router_logits=None, **router_kwargs):
    snapshot = StateSnapshot(state)
    router = FusedTopKRouter(2, NUM_PHYSICAL, eplb_state=state, **router_kwargs)
    router_logits = logits() if router_logits is None else router_logits
    with pytest.raises(ValueError, match=message):
        router.select_experts(torch.zeros(router_logits.shape[0], 2), router_logits)
    snapshot.assert_unchanged()


def test_valid_state_is_accepted_and_counts():
    state = valid_state()
    FusedTopKRouter(2, NUM_PHYSICAL, eplb_state=state).select_experts(torch.zeros(3, 2), logits())
    assert int(state.expert_load_view.sum()) == 8 + 6


@pytest.mark.parametrize(
    "field",
    [
        "expert_load_view",
        "logical_to_physical_map",
        "logical_replica_count",
        "should_record_tensor",
    ],
)
def test_missing_field(field):
    state = valid_state()
    setattr(state, field, None)
    expect_rejected(state, f"EPLB requires {field} != None")


def test_empty_state_names_the_first_missing_field():
    expect_rejected(EplbLayerState(), "EPLB requires expert_load_view != None")


BAD_FIELDS = {
    "load_2d": (
        "expert_load_view",
        torch.zeros(1, NUM_PHYSICAL, dtype=torch.int32),
        r"expert_load_view must be 1-D \[num_physical_experts\], got shape \(1, 6\)",
    ),
    "load_float64": (
        "expert_load_view",
        torch.zeros(NUM_PHYSICAL, dtype=torch.float64),
        "expert_load_view must be int32, int64 or float32, got torch.float64",
    ),
    "load_wrong_length": (
        "expert_load_view",
        torch.zeros(5, dtype=torch.int32),
        "expert_load_view has 5 entries but the layer has 6 physical experts",
    ),
    "map_1d": (
        "logical_to_physical_map",
        torch.arange(4),
        r"logical_to_physical_map must be 2-D .* got shape \(4,\)",
    ),
    "map_without_slots": (
        "logical_to_physical_map",
        torch.zeros(4, 0, dtype=torch.int64),
        r"max_replicas >= 1, got shape \(4, 0\)",
    ),
    "map_float": (
        "logical_to_physical_map",
        torch.zeros(4, 2),
        "logical_to_physical_map must be integer, got torch.float32",
    ),
    "map_rows_differ_from_counts": (
        "logical_to_physical_map",
        torch.zeros(5, 2, dtype=torch.int64),
        r"logical_replica_count must be \[5\] to match logical_to_physical_map \(5, 2\), "
        r"got shape \(4,\)",
    ),
    "counts_wrong_length": (
        "logical_replica_count",
        torch.ones(3, dtype=torch.int64),
        r"logical_replica_count must be \[4\] to match logical_to_physical_map \(4, 2\), "
        r"got shape \(3,\)",
    ),
    "counts_float": (
        "logical_replica_count",
        torch.ones(4),
        "logical_replica_count must be integer, got torch.float32",
    ),
    "record_int": (
        "should_record_tensor",
        torch.tensor(1),
        "should_record_tensor must be a 0-d bool tensor, got shape \\(\\) dtype torch.int64",
    ),
    "record_1d": (
        "should_record_tensor",
        torch.tensor([True]),
        r"should_record_tensor must be a 0-d bool tensor, got shape \(1,\)",
    ),
    "unpadded_float": (
        "num_unpadded_tokens",
        torch.tensor(2.0),
        "num_unpadded_tokens must be a 0-d integer tensor",
    ),
    "unpadded_1d": (
        "num_unpadded_tokens",
        torch.tensor([2]),
        r"num_unpadded_tokens must be a 0-d integer tensor, got shape \(1,\)",
    ),
    "map_narrower_than_counts": (
        "logical_replica_count",
        torch.tensor([3, 1, 1, 1]),
        "logical_replica_count has an expert with 3 replicas but logical_to_physical_map "
        "holds only 2 per expert",
    ),
    "negative_count": (
        "logical_replica_count",
        torch.tensor([1, -1, 1, 1]),
        "logical_replica_count must not be negative",
    ),
    "counts_on_another_device": (
        "logical_replica_count",
        torch.ones(4, dtype=torch.int64, device="meta"),
        r"EPLB state tensors must share one device, got \['cpu', 'meta'\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_state_field(case):
    field, value, message = BAD_FIELDS[case]
    state = valid_state()
    setattr(state, field, value)
    expect_rejected(state, message)


def test_map_rows_must_match_the_logits_width():
    state = valid_state()
    state.logical_to_physical_map = torch.zeros(5, 2, dtype=torch.int64)
    state.logical_replica_count = torch.ones(5, dtype=torch.int64)
    expect_rejected(
        state,
        "logical_to_physical_map has 5 logical experts but the router chooses among 4",
    )


def test_state_and_logits_on_different_devices():
    state = valid_state()
    for field in dataclasses.fields(state):
        setattr(state, field.name, getattr(state, field.name).to("meta"))
    expect_rejected(state, "EPLB state is on meta but router_logits are on cpu")


# ---------------------------------------------------------------- router arguments
def test_top_k_larger_than_the_experts_at_construction():
    with pytest.raises(ValueError, match=r"top_k=9 is larger than the number of experts \(8\)"):
        FusedTopKRouter(9, 8)


@pytest.mark.parametrize("top_k", [0, -1, 2.0])
def test_top_k_must_be_a_positive_int(top_k):
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        FusedTopKRouter(top_k, 8)


def test_top_k_larger_than_the_logits_width():
    # global_num_experts counts replicas, so the logits may be narrower than it.
    state = valid_state()
    snapshot = StateSnapshot(state)
    router = FusedTopKRouter(5, NUM_PHYSICAL, eplb_state=state)
    with pytest.raises(
        ValueError, match=r"top_k=5 is larger than the number of routable experts \(4\)"
    ):
        router.select_experts(torch.zeros(3, 2), logits())
    snapshot.assert_unchanged()


@pytest.mark.parametrize(
    "num_experts, num_groups",
    [(60, 7), (8, 8), (8, 16)],
    ids=["non_divisible", "one_each", "more_groups"],
)
def test_grouped_router_rejects_degenerate_groupings(num_experts, num_groups):
    state = valid_state()
    state.logical_to_physical_map = torch.arange(num_experts)[:, None]
    state.logical_replica_count = torch.ones(num_experts, dtype=torch.int64)
    state.expert_load_view = torch.zeros(num_experts, dtype=torch.int32)
    snapshot = StateSnapshot(state)
    router = GroupedTopKRouter(1, num_experts, num_groups, 1, eplb_state=state)
    with pytest.raises(ValueError, match=f"{num_experts} experts, {num_groups} groups"):
        router.select_experts(torch.zeros(3, 2), logits(num_experts=num_experts))
    snapshot.assert_unchanged()


def test_grouped_top_k_beyond_the_kept_groups():
    router = GroupedTopKRouter(5, 8, num_expert_group=4, topk_group=2)
    with pytest.raises(ValueError, match="top_k=5 exceeds the 4 experts in the kept groups"):
        router.select_experts(torch.zeros(3, 2), logits(num_experts=8))


@pytest.mark.parametrize(
    "num_groups, topk_group, message",
    [
        (0, 1, "num_expert_group must be >= 1, got 0"),
        (4, 5, r"topk_group must be in \[1, num_expert_group=4\], got 5"),
        (4, 0, r"topk_group must be in \[1, num_expert_group=4\], got 0"),
    ],
)
def test_grouped_router_arguments(num_groups, topk_group, message):
    with pytest.raises(ValueError, match=message):
        GroupedTopKRouter(2, 8, num_groups, topk_group)


def test_bias_of_the_wrong_length():
    state = valid_state()
    snapshot = StateSnapshot(state)
    router = FusedTopKBiasRouter(2, NUM_PHYSICAL, torch.zeros(3), eplb_state=state)
    with pytest.raises(
        ValueError, match="e_score_correction_bias has 3 entries but router_logits have 4 experts"
    ):
        router.select_experts(torch.zeros(3, 2), logits())
    snapshot.assert_unchanged()


def test_bias_must_be_one_dimensional():
    with pytest.raises(ValueError, match="e_score_correction_bias must be a 1-D tensor"):
        FusedTopKBiasRouter(2, 8, torch.zeros(1, 8))


@pytest.mark.parametrize("router_cls", [FusedTopKRouter, GroupedTopKRouter])
def test_unknown_scoring_func(router_cls):
    extra = (2, 1) if router_cls is GroupedTopKRouter else ()
    with pytest.raises(ValueError, match="unknown scoring_func 'relu'"):
        router_cls(2, 8, *extra, scoring_func="relu")


def test_unknown_replica_policy():
    with pytest.raises(ValueError, match="unknown eplb_replica_policy 'random'"):
        FusedTopKRouter(2, 8, eplb_replica_policy="random")


def test_float_indices_dtype():
    with pytest.raises(ValueError, match="indices_dtype must be an integer dtype"):
        FusedTopKRouter(2, 8, indices_dtype=torch.float32)


@pytest.mark.parametrize(
    "hidden, router_logits, message",
    [
        (torch.zeros(3, 2), torch.zeros(3, 4, 1), r"router_logits must be 2-D .* \(3, 4, 1\)"),
        (torch.zeros(3, 2), torch.zeros(3, 4, dtype=torch.int64), "must be floating point"),
        (
            torch.zeros(2, 2),
            torch.zeros(3, 4),
            "hidden_states has 2 tokens but router_logits has 3",
        ),
    ],
    ids=["logits_3d", "logits_int", "token_mismatch"],
)
def test_bad_routing_inputs(hidden, router_logits, message):
    state = valid_state()
    snapshot = StateSnapshot(state)
    router = FusedTopKRouter(2, NUM_PHYSICAL, eplb_state=state)
    with pytest.raises(ValueError, match=message):
        router.select_experts(hidden, router_logits)
    snapshot.assert_unchanged()
