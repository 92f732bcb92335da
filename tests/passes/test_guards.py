"""Guards: EPLB on/off is two graphs; rebalances, new states and batch sizes are none."""

import torch
from pass_helpers import make_eplb_state, tied_logits

import moe_compile as mc
from moe_compile.passes.testing import PassTestBackend

NUM_EXPERTS, NUM_PHYSICAL, TOP_K = 16, 20, 4


class Gate(torch.nn.Module):
    """The routing part of an MoE layer, as a model would hold it."""

    def __init__(self, eplb_state=None):
        super().__init__()
        self.router = mc.create_fused_moe_router(
            top_k=TOP_K,
            global_num_experts=NUM_PHYSICAL,
            eplb_state=eplb_state,
            scoring_func="sigmoid",
            use_grouped_topk=True,
            num_expert_group=4,
            topk_group=2,
            e_score_correction_bias=torch.linspace(-0.2, 0.2, NUM_EXPERTS),
        )

    def forward(self, hidden_states, router_logits):
        return self.router.select_experts(hidden_states, router_logits)


def compiled_gate(gate):
    backend = PassTestBackend()
    return torch.compile(gate, backend=backend, fullgraph=True), backend


def inputs(num_tokens, seed=0):
    hidden = torch.randn(num_tokens, 8)
    logits = tied_logits(num_tokens, NUM_EXPERTS, seed=seed)
    mc.mark_dynamic_tokens(hidden, logits)
    return hidden, logits


def test_state_presence_is_two_graphs_and_none_has_no_eplb_ops():
    state = make_eplb_state(NUM_EXPERTS, NUM_PHYSICAL)
    gate = Gate()
    compiled, backend = compiled_gate(gate)
    for _ in range(2):
        gate.router.eplb_state = None
        compiled(*inputs(7))
        gate.router.eplb_state = state
        compiled(*inputs(7))
    assert len(backend.graphs) == 2
    without_eplb, with_eplb = backend.graphs
    assert "route_eplb" not in without_eplb.after and "scatter" not in without_eplb.after
    assert "copy_" not in without_eplb.after
    assert with_eplb.ops_after["auto_functionalized(moe_compile.route_eplb)"] == 1


def test_rebalance_new_state_and_recording_toggle_do_not_recompile():
    state = make_eplb_state(NUM_EXPERTS, NUM_PHYSICAL)
    gate = Gate(state)
    compiled, backend = compiled_gate(gate)
    hidden, logits = inputs(11)

    def check():
        state_now = gate.router.eplb_state
        state_now.expert_load_view.zero_()
        weights, ids = gate(hidden, logits)
        expected_load = state_now.expert_load_view.clone()
        state_now.expert_load_view.zero_()
        got_weights, got_ids = compiled(hidden, logits)
        torch.testing.assert_close(got_ids, ids, rtol=0, atol=0)
        torch.testing.assert_close(got_weights, weights)
        torch.testing.assert_close(state_now.expert_load_view, expected_load, rtol=0, atol=0)

    check()
    # A rebalance: maps rewritten in place with a different placement.
    permutation = torch.randperm(NUM_PHYSICAL)
    state.logical_to_physical_map.copy_(
        torch.where(
            state.logical_to_physical_map >= 0, permutation[state.logical_to_physical_map], -1
        )
    )
    check()
    # Recording switched off and on, in place.
    state.should_record_tensor.fill_(False)
    check()
    state.should_record_tensor.fill_(True)
    # A brand-new state object with same-shaped tensors.
    gate.router.eplb_state = make_eplb_state(NUM_EXPERTS, NUM_PHYSICAL)
    check()
    assert len(backend.graphs) == 1


def test_one_graph_for_every_batch_size():
    state = make_eplb_state(NUM_EXPERTS, NUM_PHYSICAL)
    gate = Gate(state)
    compiled, backend = compiled_gate(gate)
    for num_tokens in (1, 2, 7, 300, 4096, 65536, 0):
        hidden, logits = inputs(num_tokens, seed=num_tokens)
        state.expert_load_view.zero_()
        weights, ids = compiled(hidden, logits)
        assert ids.shape == (num_tokens, TOP_K)
        assert int(state.expert_load_view.sum()) == num_tokens * TOP_K
    assert len(backend.graphs) == 1
    assert backend.graphs[0].applied["route_eplb"] == 1


def test_repeated_layers_compile_once():
    """Identical MoE layers reuse one compiled region, fused."""
    states = [make_eplb_state(NUM_EXPERTS, NUM_PHYSICAL) for _ in range(3)]
    gates = [Gate(state) for state in states]
    backend = PassTestBackend()
    for gate in gates:
        gate.compile(backend=backend, fullgraph=True)
    hidden, logits = inputs(5)
    for gate, state in zip(gates, states, strict=True):
        gate(hidden, logits)
        assert int(state.expert_load_view.sum()) == 5 * TOP_K
    assert len(backend.graphs) == 1
    assert backend.graphs[0].applied["route_eplb"] == 1
