"""EplbState on one process, with a tiny duck-typed MoE layer (no FusedMoE, no distributed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_compile.eplb import (
    EplbLayerState,
    EplbState,
    EplbTransferError,
    balancedness,
    eplb_map_to_physical_and_record,
    find_moe_layers,
    plan_layer_transfer,
)


class TinyMoE(nn.Module):
    """Just enough of FusedMoE's EPLB interface: maps + counting + per-expert weights.

    Two per-expert tensors of different dtypes (a weight and an int "scale"), so a
    move must carry every tensor ``get_expert_weights`` returns.
    """

    def __init__(self, num_experts, num_physical, *, ep_size=1, ep_rank=0, eplb=True, hidden=3):
        super().__init__()
        self.num_experts = num_experts
        self.global_num_experts = num_physical
        self.num_redundant_experts = num_physical - num_experts
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.local_num_experts = num_physical // ep_size
        self.eplb_state = EplbLayerState() if eplb else None
        self.weight = nn.Parameter(
            torch.zeros(self.local_num_experts, 2, hidden), requires_grad=False
        )
        self.scale = nn.Parameter(
            torch.zeros(self.local_num_experts, dtype=torch.int32), requires_grad=False
        )

    def set_eplb_state(self, moe_layer_idx, load, l2p, counts):
        self.eplb_state.set_layer_state(moe_layer_idx, load, l2p, counts)

    def get_expert_weights(self):
        n = self.local_num_experts
        return [self.weight.detach().view(n, -1), self.scale.detach().view(n, -1)]

    def load_logical(self, logical_weight, logical_scale, physical_to_logical):
        base = self.ep_rank * self.local_num_experts
        ids = physical_to_logical[base : base + self.local_num_experts]
        self.weight.data.copy_(logical_weight[ids])
        self.scale.data.copy_(logical_scale[ids])

    def route(self, topk_ids):
        return eplb_map_to_physical_and_record(topk_ids, self.eplb_state, policy="modulo")


class TinyModel(nn.Module):
    def __init__(self, num_layers, num_experts, num_physical, **kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"norm": nn.LayerNorm(3), "moe": TinyMoE(num_experts, num_physical, **kwargs)}
            )
            for _ in range(num_layers)
        )
        self.dense = TinyMoE(num_experts, num_physical, eplb=False)  # EPLB off: not managed

    def moe_layers(self):
        return [block["moe"] for block in self.blocks]


def _logical_weights(num_layers, num_experts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_layers, num_experts, 2, 3, generator=gen)
    scales = torch.randint(-1000, 1000, (num_layers, num_experts), generator=gen, dtype=torch.int32)
    return weights, scales


def _model_with_weights(num_layers=2, num_experts=4, num_physical=6, **state_kwargs):
    model = TinyModel(num_layers, num_experts, num_physical)
    weights, scales = _logical_weights(num_layers, num_experts)
    layout = torch.arange(num_physical) % num_experts
    for index, layer in enumerate(model.moe_layers()):
        layer.load_logical(weights[index], scales[index], layout)
    state = EplbState.from_model(model, num_physical - num_experts, **state_kwargs)
    return model, state, weights, scales


def _assert_slots_hold_their_experts(model, state, weights, scales):
    p2l = state.physical_to_logical_map
    for index, layer in enumerate(model.moe_layers()):
        assert layer.weight.equal(weights[index][p2l[index]])
        assert layer.scale.equal(scales[index][p2l[index]])


# --- wiring and initial maps ----------------------------------------------------------


def test_from_model_wires_views_of_the_model_wide_tensors():
    model, state, _, _ = _model_with_weights(num_layers=3)
    assert [name for name, _ in find_moe_layers(model)] == [f"blocks.{i}.moe" for i in range(3)]
    assert state.layers == model.moe_layers()
    assert state.physical_to_logical_map.shape == (3, 6)
    assert state.logical_to_physical_map.shape == (3, 4, 3)  # S = P - E + 1
    assert state.expert_load_pass.dtype == state.expert_load_window.dtype == torch.int32
    assert state.expert_load_window.shape == (1000, 3, 6)
    assert state.should_record_tensor.dim() == 0 and state.should_record_tensor.dtype == torch.bool
    for index, layer in enumerate(model.moe_layers()):
        layer_state = layer.eplb_state
        # Views, not copies: same storage, row `index`.
        assert layer_state.expert_load_view.data_ptr() == state.expert_load_pass[index].data_ptr()
        assert layer_state.expert_load_view._base is state.expert_load_pass
        assert layer_state.logical_to_physical_map._base is state.logical_to_physical_map
        assert layer_state.logical_replica_count._base is state.logical_replica_count
        assert layer_state.should_record_tensor is state.should_record_tensor
        assert layer_state.logical_to_physical_map.data_ptr() == (
            state.logical_to_physical_map[index].data_ptr()
        )
    assert model.dense.eplb_state is None


def test_initial_layout_and_its_inverse_follow_spec():
    _, state, _, _ = _model_with_weights()
    assert state.physical_to_logical_map.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert state.logical_to_physical_map[0].tolist() == [
        [0, 4, -1],
        [1, 5, -1],
        [2, -1, -1],
        [3, -1, -1],
    ]
    assert state.logical_replica_count.tolist() == [[2, 2, 1, 1]] * 2


def test_spec_map_example_through_the_state():
    model = TinyModel(2, 4, 6)
    state = EplbState.from_model(
        model, initial_physical_to_logical=torch.tensor([[0, 1, 2, 3, 0, 1], [0, 2, 0, 1, 0, 3]])
    )
    assert state.logical_to_physical_map.tolist() == [
        [[0, 4, -1], [1, 5, -1], [2, -1, -1], [3, -1, -1]],
        [[0, 2, 4], [3, -1, -1], [1, -1, -1], [5, -1, -1]],
    ]
    assert state.logical_replica_count.tolist() == [[2, 2, 1, 1], [3, 1, 1, 1]]


# --- window, recording gate, balancedness ---------------------------------------------


def _route_all(model, topk_ids):
    for layer in model.moe_layers():
        layer.route(topk_ids)


def test_window_ring_holds_the_last_passes_and_counts_sum_to_t_times_k():
    model, state, _, _ = _model_with_weights(window_size=3, step_interval=100)
    gen = torch.Generator().manual_seed(1)
    passes = [torch.randint(0, 4, (5 + i, 2), generator=gen) for i in range(5)]
    for topk_ids in passes:
        _route_all(model, topk_ids)
        result = state.step()
        assert result.recorded and not result.rearranged
        assert state.expert_load_pass.eq(0).all()

    def expected(topk_ids):
        # modulo policy with the initial map: slot o of expert e uses replica o % count[e].
        load = torch.zeros(6, dtype=torch.int32)
        counts = torch.tensor([2, 2, 1, 1])
        l2p = torch.tensor([[0, 4], [1, 5], [2, -1], [3, -1]])
        for slot, expert in enumerate(topk_ids.flatten().tolist()):
            load[l2p[expert, slot % counts[expert]]] += 1
        return load

    # Pass i lives in window slot i % 3: slots hold passes 3, 4, 2.
    for window_slot, pass_index in enumerate([3, 4, 2]):
        for layer in range(2):
            assert state.expert_load_window[window_slot, layer].equal(expected(passes[pass_index]))
            assert (
                int(state.expert_load_window[window_slot, layer].sum())
                == passes[pass_index].numel()
            )
    assert state.recorded_passes == 3 and state.window_index == 2


def test_recording_gate_and_dummy_passes_leave_the_window_alone():
    model, state, _, _ = _model_with_weights(window_size=4, step_interval=2)
    ids = torch.tensor([[0, 1], [2, 3]])
    with state.recording_paused():
        assert not bool(state.should_record_tensor)
        _route_all(model, ids)
        assert state.expert_load_pass.eq(0).all()  # the layers saw the flag flip in place
        assert not state.step().recorded
    assert state.recording and bool(state.should_record_tensor)
    _route_all(model, ids)
    assert not state.step(is_dummy=True).recorded
    assert state.expert_load_pass.eq(0).all() and state.expert_load_window.eq(0).all()
    assert state.steps_since_rearrangement == 0
    state.recording = False
    assert not bool(state.should_record_tensor)
    state.recording = True
    _route_all(model, ids)
    assert state.step().recorded and state.steps_since_rearrangement == 1


def test_balancedness_spec_example():
    assert balancedness(torch.tensor([[100, 0, 0, 0], [100, 0, 0, 0]])).tolist() == [0.25, 0.25]
    assert balancedness(torch.tensor([[5, 5], [0, 0], [1, 3]])).tolist() == [1.0, 1.0, 2 / 3]
    # Through the state: 4 layers' worth of slots on 4 ranks, one slot per rank.
    model = TinyModel(2, 4, 4, ep_size=4)
    state = EplbState.from_model(model, 0)
    load = torch.tensor([[100, 0, 0, 0], [30, 10, 10, 30]])
    assert state.rank_load(load).tolist() == load.tolist()
    assert state.balancedness(load).tolist() == [0.25, 20 / 30]


# --- rearrangement --------------------------------------------------------------------


def _tensor_identities(state, model):
    tensors = [
        state.physical_to_logical_map,
        state.logical_to_physical_map,
        state.logical_replica_count,
        state.expert_load_pass,
        state.expert_load_window,
        state.should_record_tensor,
    ]
    layer_views = [
        (s.expert_load_view, s.logical_to_physical_map, s.logical_replica_count)
        for s in (layer.eplb_state for layer in model.moe_layers())
    ]
    return [(id(t), t.data_ptr()) for t in tensors] + [
        tuple((id(t), t.data_ptr()) for t in views) for views in layer_views
    ]


def test_step_interval_triggers_a_policy_rearrangement_in_place():
    model, state, weights, scales = _model_with_weights(window_size=8, step_interval=3)
    identities = _tensor_identities(state, model)
    hot = torch.tensor([[3, 0], [3, 1], [3, 2]] * 2)  # expert 3 in every token
    for step in range(3):
        _route_all(model, hot)
        result = state.step()
        assert result.rearranged == (step == 2)
    # The hot expert got the two redundant slots (largest load per replica first).
    assert state.logical_replica_count.tolist() == [[1, 1, 1, 3]] * 2
    assert sorted(state.physical_to_logical_map[0].tolist()) == [0, 1, 2, 3, 3, 3]
    _assert_slots_hold_their_experts(model, state, weights, scales)
    for layer in range(2):
        p2l = state.physical_to_logical_map[layer].tolist()
        assert state.logical_to_physical_map[layer, 3].tolist() == [
            p for p in range(6) if p2l[p] == 3
        ]
    assert state.expert_load_window.eq(0).all() and state.steps_since_rearrangement == 0
    assert _tensor_identities(state, model) == identities
    # Routing now reaches the replicas of expert 3 through the layers' (same) views.
    state.expert_load_pass.zero_()
    model.moe_layers()[0].route(torch.tensor([[3, 3], [3, 3], [3, 3]]))
    assert sorted(state.expert_load_pass[0].nonzero().flatten().tolist()) == (
        state.logical_to_physical_map[0, 3].tolist()
    )
    assert state.expert_load_pass[0].sum() == 6


def test_explicit_rearrangements_move_every_per_expert_tensor():
    model, state, weights, scales = _model_with_weights(num_layers=3, num_physical=8)
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        new = torch.stack(
            [
                torch.cat(
                    [torch.randperm(4, generator=gen), torch.randint(0, 4, (4,), generator=gen)]
                )[torch.randperm(8, generator=gen)]
                for _ in range(3)
            ]
        )
        state.rearrange(new)
        assert state.physical_to_logical_map.equal(new)
        _assert_slots_hold_their_experts(model, state, weights, scales)


@pytest.mark.parametrize("transaction", ["layer", "model"])
def test_a_failed_move_keeps_the_old_maps_and_weights(transaction):
    model, state, weights, scales = _model_with_weights(num_layers=3, transaction=transaction)
    old_maps = [
        t.clone()
        for t in (
            state.physical_to_logical_map,
            state.logical_to_physical_map,
            state.logical_replica_count,
        )
    ]
    new = torch.tensor([[3, 2, 1, 0, 3, 3]] * 3)

    def fail_at_layer_one(stage, layer):
        if stage == "received" and layer == 1:
            raise RuntimeError("injected fault")

    with pytest.raises(EplbTransferError, match="injected fault"):
        state.rearrange(new, fault_hook=fail_at_layer_one)
    _assert_slots_hold_their_experts(model, state, weights, scales)
    committed = 1 if transaction == "layer" else 0  # layer mode keeps layer 0's finished move
    for layer in range(3):
        expected = new[layer] if layer < committed else old_maps[0][layer]
        assert state.physical_to_logical_map[layer].equal(expected)
    for layer in range(committed, 3):
        assert state.logical_to_physical_map[layer].equal(old_maps[1][layer])
        assert state.logical_replica_count[layer].equal(old_maps[2][layer])


def test_plan_layer_transfer_pairs_sends_and_receives():
    # 2 ranks x 3 slots. Rank 0 {0,1,2} -> {3,3,0}; rank 1 {3,0,1} -> {1,2,3}.
    old, new = [0, 1, 2, 3, 0, 1], [3, 3, 0, 1, 2, 3]
    plan0 = plan_layer_transfer(old, new, 2, 0)
    plan1 = plan_layer_transfer(old, new, 2, 1)
    assert plan0.recvs == [(1, 3, 0)] and plan0.fan_out == [(1, 0)]
    assert plan0.local_copies == [(2, 0)] and plan0.changed_slots == [0, 1, 2]
    assert plan1.recvs == [(0, 2, 1)] and plan1.sends == [(0, 3, 0)]
    assert plan0.sends == [(1, 2, 2)]
    assert plan1.local_copies == [(0, 2), (2, 0)] and plan1.changed_slots == [0, 1, 2]


@pytest.mark.parametrize("ep_size,slots_per_rank,num_experts", [(2, 6, 8), (4, 3, 8), (8, 5, 24)])
def test_transfer_plans_of_all_ranks_pair_up_and_deliver_every_expert(
    ep_size, slots_per_rank, num_experts
):
    """Simulate the network in-process: every receive meets the matching send, and
    after the plans run each slot holds the value of its new logical expert."""
    gen = torch.Generator().manual_seed(ep_size * 100 + num_experts)
    num_physical = ep_size * slots_per_rank

    def random_map():
        extra = torch.randint(0, num_experts, (num_physical - num_experts,), generator=gen)
        row = torch.cat([torch.randperm(num_experts, generator=gen), extra])
        return row[torch.randperm(num_physical, generator=gen)].tolist()

    for _ in range(5):
        old, new = random_map(), random_map()
        plans = [plan_layer_transfer(old, new, ep_size, rank) for rank in range(ep_size)]
        # Old weights: slot value = 10 * logical expert + 0.5 (any injective function).
        weights = [
            [10.0 * old[r * slots_per_rank + j] + 0.5 for j in range(slots_per_rank)]
            for r in range(ep_size)
        ]
        sent = {
            (src, dst): [
                (expert, weights[src][slot])
                for peer, expert, slot in plans[src].sends
                if peer == dst
            ]
            for src in range(ep_size)
            for dst in range(ep_size)
        }
        for rank, plan in enumerate(plans):
            buffer = [None] * slots_per_rank
            for peer in range(ep_size):
                receives = [(expert, slot) for p, expert, slot in plan.recvs if p == peer]
                assert [e for e, _ in receives] == [e for e, _ in sent[(peer, rank)]]
                for (_, slot), (_, value) in zip(receives, sent[(peer, rank)], strict=True):
                    buffer[slot] = value
            for dst, src in plan.local_copies:
                buffer[dst] = weights[rank][src]
            for dst, src in plan.fan_out:
                buffer[dst] = buffer[src]
            final = list(weights[rank])
            for slot in plan.changed_slots:
                final[slot] = buffer[slot]
            base = rank * slots_per_rank
            assert final == [10.0 * new[base + j] + 0.5 for j in range(slots_per_rank)]
            assert plan.changed_slots == [
                j for j in range(slots_per_rank) if old[base + j] != new[base + j]
            ]
        # One message per (rank, expert) pair that is new on the rank.
        pairs = sum(
            len(
                set(new[r * slots_per_rank : (r + 1) * slots_per_rank])
                - set(old[r * slots_per_rank : (r + 1) * slots_per_rank])
            )
            for r in range(ep_size)
        )
        assert sum(len(plan.recvs) for plan in plans) == pairs


def test_transfer_plan_refuses_to_lose_an_expert():
    with pytest.raises(ValueError, match="logical expert 3 is needed"):
        plan_layer_transfer([0, 1, 2, 2], [0, 1, 2, 3], 2, 0)


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(policy="nope"), "unknown EPLB policy 'nope'"),
        (dict(window_size=0), "window_size must be a positive int"),
        (dict(step_interval=-3), "step_interval must be a positive int"),
        (dict(num_nodes=2), r"num_nodes \(2\) must divide num_gpus \(1\)"),
        (dict(num_groups=3), r"num_groups \(3\) must divide the 4"),
        (dict(transaction="half"), "unknown transaction"),
        (dict(num_redundant_experts=3), "num_redundant_experts=3 but MoE layer 0 was built with 2"),
        (
            dict(initial_physical_to_logical=torch.zeros(2, 6, dtype=torch.long)),
            "without a physical slot",
        ),
    ],
)
def test_bad_configuration_raises_value_error(kwargs, message):
    model = TinyModel(2, 4, 6)
    with pytest.raises(ValueError, match=message):
        EplbState.from_model(model, **kwargs)


def test_model_without_eplb_layers_and_mismatched_layers_raise():
    with pytest.raises(ValueError, match="no MoE layer with EPLB"):
        EplbState.from_model(TinyModel(2, 4, 6, eplb=False))
    with pytest.raises(ValueError, match="disagree on global_num_experts"):
        EplbState([TinyMoE(4, 6), TinyMoE(4, 8)])
    with pytest.raises(ValueError, match="split evenly"):
        EplbState([TinyMoE(4, 6, ep_size=4)])


def test_rearrange_rejects_maps_that_would_lose_an_expert():
    model, state, weights, scales = _model_with_weights()
    with pytest.raises(ValueError, match="expert 3 of layer 1 without a physical slot"):
        state.rearrange(torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 2, 0, 1]]))
    with pytest.raises(ValueError, match=r"must be \[2, 6\]"):
        state.rearrange(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        state.rearrange(torch.full((2, 6), 4))
    assert state.physical_to_logical_map.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    _assert_slots_hold_their_experts(model, state, weights, scales)
