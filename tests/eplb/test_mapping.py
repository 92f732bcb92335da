"""eplb_map_to_physical_and_record against SPEC §3 and a slot-by-slot Python reference."""

import pytest
import torch
from moe_reference import eplb_reference, random_replica_layout, token_hash_replica

from moe_compile import EplbLayerState, eplb_map_to_physical_and_record

POLICIES = ("token_hash", "modulo")
EXAMPLE_IDS = [[0, 1], [2, 3], [0, 2]]


def make_state(l2p, counts, num_physical, record=True, unpadded=None, load_dtype=torch.int32):
    return EplbLayerState(
        expert_load_view=torch.zeros(num_physical, dtype=load_dtype),
        logical_to_physical_map=torch.as_tensor(l2p),
        logical_replica_count=torch.as_tensor(counts),
        should_record_tensor=torch.tensor(record),
        num_unpadded_tokens=None if unpadded is None else torch.tensor(unpadded),
    )


# (map, counts, P, ids per policy, load per policy); token_hash values are SPEC §3's.
WORKED_EXAMPLES = [
    (
        [[0], [1], [2], [3]],
        [1, 1, 1, 1],
        4,
        {"token_hash": EXAMPLE_IDS, "modulo": EXAMPLE_IDS},
        {"token_hash": [2, 1, 2, 1], "modulo": [2, 1, 2, 1]},
    ),
    (
        [[3], [0], [1], [2]],
        [1, 1, 1, 1],
        4,
        {"token_hash": [[3, 0], [1, 2], [3, 1]], "modulo": [[3, 0], [1, 2], [3, 1]]},
        {"token_hash": [1, 2, 1, 2], "modulo": [1, 2, 1, 2]},
    ),
    (
        [[0, 4], [1, 5], [2, -1], [3, -1]],
        [2, 2, 1, 1],
        6,
        {"token_hash": [[0, 1], [2, 3], [0, 2]], "modulo": [[0, 5], [2, 3], [0, 2]]},
        {"token_hash": [2, 1, 2, 1, 0, 0], "modulo": [2, 0, 2, 1, 0, 1]},
    ),
    (
        [[0, 4], [1, 5], [2, 6], [3, 7]],
        [2, 2, 2, 2],
        8,
        {"token_hash": [[0, 1], [6, 7], [0, 2]], "modulo": [[0, 5], [2, 7], [0, 6]]},
        {"token_hash": [2, 1, 1, 0, 0, 0, 1, 1], "modulo": [2, 0, 1, 0, 0, 1, 1, 1]},
    ),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("example", range(len(WORKED_EXAMPLES)))
def test_worked_examples(example, policy):
    l2p, counts, num_physical, expected_ids, expected_load = WORKED_EXAMPLES[example]
    state = make_state(l2p, counts, num_physical)
    ids = eplb_map_to_physical_and_record(
        torch.tensor(EXAMPLE_IDS, dtype=torch.int32), state, policy=policy
    )
    assert ids.tolist() == expected_ids[policy] and ids.dtype == torch.int32
    assert state.expert_load_view.tolist() == expected_load[policy]


@pytest.mark.parametrize("policy", POLICIES)
def test_record_off_maps_but_counts_nothing(policy):
    l2p, counts, num_physical, expected_ids, _ = WORKED_EXAMPLES[3]
    state = make_state(l2p, counts, num_physical, record=False)
    ids = eplb_map_to_physical_and_record(torch.tensor(EXAMPLE_IDS), state, policy=policy)
    assert ids.tolist() == expected_ids[policy]
    assert state.expert_load_view.tolist() == [0] * num_physical


@pytest.mark.parametrize("policy", POLICIES)
def test_padding_rows_are_not_counted(policy):
    state = make_state([[0], [1], [2], [3]], [1, 1, 1, 1], 4, unpadded=2)
    ids = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert eplb_map_to_physical_and_record(ids, state, policy).tolist() == ids.tolist()
    assert state.expert_load_view.tolist() == [1, 1, 1, 1]


def test_token_hash_values_of_spec_section_3():
    assert [token_hash_replica(t, 2) for t in range(3)] == [0, 1, 0]
    assert [token_hash_replica(t, 4) for t in range(3)] == [0, 1, 2]
    # One expert with four replicas, two slots per token: the policies differ visibly.
    state = make_state([[10, 11, 12, 13]], [4], 14)
    ids = torch.zeros(3, 2, dtype=torch.int64)
    assert eplb_map_to_physical_and_record(ids, state, "token_hash").tolist() == [
        [10, 10],
        [11, 11],
        [12, 12],
    ]
    assert eplb_map_to_physical_and_record(ids, state, "modulo").tolist() == [
        [10, 11],
        [12, 13],
        [10, 11],
    ]
    assert state.expert_load_view[10:].tolist() == [4, 4, 3, 1]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("top_k", [1, 2, 6, 8])
@pytest.mark.parametrize("num_logical", [8, 60, 128, 256])
def test_random_layouts_match_reference(num_logical, top_k, policy):
    generator = torch.Generator().manual_seed(num_logical + top_k)
    num_redundant = num_logical // 4 + 3
    l2p, counts, num_physical = random_replica_layout(num_logical, num_redundant, generator)
    for num_tokens, ids_dtype, unpadded, record in [
        (0, torch.int32, None, True),
        (1, torch.int64, None, True),
        (7, torch.int32, 5, True),
        (300, torch.int64, 260, True),
        (300, torch.int32, None, False),
    ]:
        ids = torch.randint(0, num_logical, (num_tokens, top_k), generator=generator)
        ids = ids.to(ids_dtype)
        original = ids.clone()
        state = make_state(l2p, counts, num_physical, record=record, unpadded=unpadded)
        physical = eplb_map_to_physical_and_record(ids, state, policy)
        ref_ids, ref_load = eplb_reference(
            ids, l2p, counts, num_physical, policy, record=record, num_unpadded_tokens=unpadded
        )
        assert physical.dtype == ids_dtype and physical.shape == ids.shape
        assert physical.tolist() == ref_ids
        assert state.expert_load_view.tolist() == ref_load
        assert torch.equal(ids, original), "the logical ids must not be modified"


def test_token_hash_wraps_at_32_bits_for_large_batches():
    num_tokens = 70_000  # tokens past 2**32 / 2654435769 exercise the 32-bit mask
    state = make_state([[0, 1, 2, 3, 4, 5, 6]], [7], 7)
    ids = torch.zeros(num_tokens, 1, dtype=torch.int32)
    physical = eplb_map_to_physical_and_record(ids, state, "token_hash")
    ref_ids, ref_load = eplb_reference(ids, [[0, 1, 2, 3, 4, 5, 6]], [7], 7, "token_hash")
    assert physical.flatten().tolist() == [row[0] for row in ref_ids]
    assert state.expert_load_view.tolist() == ref_load


def test_token_hash_multiplies_the_token_index_by_an_int32_constant():
    # Inductor folds ``arange * constant`` into an index expression that Triton
    # types as int32; 2654435769 itself made every CUDA compile of 16+ tokens fail.
    from torch.fx.experimental.proxy_tensor import make_fx

    from moe_compile.eplb.mapping import replica_index

    def choose(slot, replica_count):
        return replica_index(slot, 2, replica_count, "token_hash")

    graph = make_fx(choose)(torch.arange(8).view(4, 2), torch.full((4, 2), 3)).graph
    multipliers = [
        arg
        for node in graph.nodes
        if node.target is torch.ops.aten.mul.Tensor
        for arg in node.args
        if isinstance(arg, int)
    ]
    assert multipliers, "the token hash must multiply the token index"
    assert all(-(2**31) <= m < 2**31 for m in multipliers), multipliers


def test_ids_outside_the_logical_range_map_to_minus_one_and_are_not_counted():
    state = make_state([[2], [0], [1]], [1, 1, 1], 3)
    ids = torch.tensor([[-1, 0], [3, 1], [7, 2]])
    assert eplb_map_to_physical_and_record(ids, state).tolist() == [[-1, 2], [-1, 0], [-1, 1]]
    assert state.expert_load_view.tolist() == [1, 1, 1]


def test_map_entries_outside_the_physical_range_are_returned_but_not_counted():
    # Expert 1's only replica lives on another rank's numbering (9 >= P).
    state = make_state([[0], [9], [-1]], [1, 1, 1], 4)
    ids = torch.tensor([[0, 1, 2]])
    assert eplb_map_to_physical_and_record(ids, state).tolist() == [[0, 9, -1]]
    assert state.expert_load_view.tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("policy", POLICIES)
def test_zero_replicas_count_as_one(policy):
    state = make_state([[3, 1], [2, -1]], [0, 1], 4)
    ids = torch.tensor([[0, 1], [0, 1]])
    assert eplb_map_to_physical_and_record(ids, state, policy).tolist() == [[3, 2], [3, 2]]
    assert state.expert_load_view.tolist() == [0, 0, 2, 2]


@pytest.mark.parametrize("load_dtype", [torch.int32, torch.int64, torch.float32])
def test_load_accumulates_in_its_own_dtype(load_dtype):
    state = make_state([[0], [1], [2], [3]], [1, 1, 1, 1], 4, load_dtype=load_dtype)
    state.expert_load_view += torch.tensor([10, 0, 0, 1]).to(load_dtype)
    load_before = state.expert_load_view
    eplb_map_to_physical_and_record(torch.tensor(EXAMPLE_IDS), state)
    eplb_map_to_physical_and_record(torch.tensor(EXAMPLE_IDS), state)
    assert state.expert_load_view is load_before, "counted in place"
    assert state.expert_load_view.dtype == load_dtype
    assert state.expert_load_view.tolist() == [14, 2, 4, 3]


def test_unknown_policy():
    state = make_state([[0]], [1], 1)
    with pytest.raises(ValueError, match="unknown EPLB replica policy 'round_robin'"):
        eplb_map_to_physical_and_record(torch.zeros(1, 1), state, policy="round_robin")
    assert state.expert_load_view.tolist() == [0]


@pytest.mark.slow
def test_compiled_fullgraph_matches_eager_and_reads_state_in_place():
    """One full Inductor compile: the function traces whole and sees in-place map updates."""
    generator = torch.Generator().manual_seed(0)
    num_logical, top_k, num_tokens = 60, 6, 37
    l2p, counts, num_physical = random_replica_layout(num_logical, 12, generator, max_replicas=4)
    eager_state = make_state(l2p.clone(), counts.clone(), num_physical, unpadded=30)
    compiled_state = make_state(l2p.clone(), counts.clone(), num_physical, unpadded=30)
    compiled = torch.compile(eplb_map_to_physical_and_record, fullgraph=True, dynamic=False)

    ids = torch.randint(0, num_logical, (num_tokens, top_k), generator=generator).int()
    expected = eplb_map_to_physical_and_record(ids, eager_state, "token_hash")
    actual = compiled(ids, compiled_state, "token_hash")
    assert torch.equal(actual, expected) and actual.dtype == torch.int32
    assert torch.equal(compiled_state.expert_load_view, eager_state.expert_load_view)

    # A rebalance rewrites the map in place; the compiled graph must follow it.
    new_l2p, new_counts, _ = random_replica_layout(num_logical, 12, generator, max_replicas=4)
    for state in (eager_state, compiled_state):
        state.logical_to_physical_map.copy_(new_l2p)
        state.logical_replica_count.copy_(new_counts)
        state.should_record_tensor.fill_(False)
    expected = eplb_map_to_physical_and_record(ids, eager_state, "token_hash")
    actual = compiled(ids, compiled_state, "token_hash")
    assert torch.equal(actual, expected)
    assert torch.equal(compiled_state.expert_load_view, eager_state.expert_load_view)
    ref_ids, _ = eplb_reference(ids, new_l2p, new_counts, num_physical, "token_hash")
    assert actual.tolist() == ref_ids
