"""EplbLayerState: fields, set_layer_state storing views, validation."""

import dataclasses

import pytest
import torch

from moe_compile import EplbLayerState, eplb_map_to_physical_and_record

NUM_LAYERS, NUM_LOGICAL, NUM_PHYSICAL, MAX_REPLICAS = 3, 4, 6, 2


def model_tensors():
    """Model-wide tensors of SPEC §4's shape: [L, P], [L, E, S], [L, E]."""
    load = torch.zeros(NUM_LAYERS, NUM_PHYSICAL, dtype=torch.int32)
    l2p = torch.tensor([[[0, 4], [1, 5], [2, -1], [3, -1]]] * NUM_LAYERS)
    counts = torch.tensor([[2, 2, 1, 1]] * NUM_LAYERS)
    return load, l2p, counts


def test_every_field_defaults_to_none():
    state = EplbLayerState()
    names = [f.name for f in dataclasses.fields(state)]
    assert names == [
        "expert_load_view",
        "logical_to_physical_map",
        "logical_replica_count",
        "should_record_tensor",
        "num_unpadded_tokens",
    ]
    assert all(getattr(state, name) is None for name in names)


def test_set_layer_state_stores_views_of_the_given_layer():
    load, l2p, counts = model_tensors()
    state = EplbLayerState()
    state.set_layer_state(1, load, l2p, counts)
    for field, model_tensor in (
        (state.expert_load_view, load),
        (state.logical_to_physical_map, l2p),
        (state.logical_replica_count, counts),
    ):
        assert field._base is model_tensor, "a view of the model-wide tensor, not a copy"
        assert field.data_ptr() == model_tensor[1].data_ptr()
        assert field.shape == model_tensor.shape[1:]


def test_in_place_updates_flow_both_ways():
    load, l2p, counts = model_tensors()
    state = EplbLayerState(should_record_tensor=torch.tensor(True))
    state.set_layer_state(2, load, l2p, counts)

    # A rebalance writes the model-wide tensors in place ...
    l2p.copy_(torch.tensor([[[4, 0], [5, 1], [3, -1], [2, -1]]] * NUM_LAYERS))
    counts.fill_(1)
    ids = eplb_map_to_physical_and_record(torch.tensor([[0, 1], [2, 3]]), state)
    assert ids.tolist() == [[4, 5], [3, 2]]

    # ... and the layer's counting lands in row 2 of the model-wide load only.
    assert load[2].tolist() == [0, 0, 1, 1, 1, 1]
    assert load[0].tolist() == load[1].tolist() == [0] * NUM_PHYSICAL


def test_one_record_flag_shared_by_all_layers():
    load, l2p, counts = model_tensors()
    record = torch.tensor(False)
    layers = [EplbLayerState(should_record_tensor=record) for _ in range(NUM_LAYERS)]
    for index, layer in enumerate(layers):
        layer.set_layer_state(index, load, l2p, counts)
    ids = torch.tensor([[0, 1]])
    for layer in layers:
        eplb_map_to_physical_and_record(ids, layer)
    assert int(load.sum()) == 0
    record.fill_(True)
    for layer in layers:
        eplb_map_to_physical_and_record(ids, layer)
    assert load.tolist() == [[1, 1, 0, 0, 0, 0]] * NUM_LAYERS


def test_set_layer_state_keeps_the_other_fields():
    load, l2p, counts = model_tensors()
    record, unpadded = torch.tensor(True), torch.tensor(5)
    state = EplbLayerState(should_record_tensor=record, num_unpadded_tokens=unpadded)
    state.set_layer_state(0, load, l2p, counts)
    assert state.should_record_tensor is record and state.num_unpadded_tokens is unpadded


def complete_state():
    load, l2p, counts = model_tensors()
    state = EplbLayerState(should_record_tensor=torch.tensor(True))
    state.set_layer_state(0, load, l2p, counts)
    return state


def test_validate_accepts_a_complete_state():
    state = complete_state()
    state.validate(num_physical_experts=NUM_PHYSICAL)
    state.validate()
    state.validate_values()


def test_validate_names_the_missing_field():
    state = complete_state()
    state.logical_replica_count = None
    with pytest.raises(ValueError, match=r"^EPLB requires logical_replica_count != None$"):
        state.validate()


def test_validate_checks_the_physical_expert_count():
    with pytest.raises(
        ValueError, match="expert_load_view has 6 entries but the layer has 8 physical experts"
    ):
        complete_state().validate(num_physical_experts=8)


def test_validate_values_catches_a_map_narrower_than_the_counts():
    state = complete_state()
    state.logical_replica_count[3] = 3
    with pytest.raises(
        ValueError,
        match="an expert with 3 replicas but logical_to_physical_map holds only 2 per expert",
    ):
        state.validate_values()
    state.validate()  # shape-only validation cannot see it, and must not sync to try


def test_validate_values_accepts_zero_replicas():
    # An expert with no replica is legal: its ids map to the (padded) first slot.
    state = complete_state()
    state.logical_replica_count[2] = 0
    state.validate_values()
