"""Inside a whole model of FusedMoE layers with model-wide EPLB, the routing still fuses."""

import torch

import moe_compile as mc
from moe_compile.passes.testing import PassTestBackend

NUM_EXPERTS, TOP_K, HIDDEN = 8, 2, 16


class TinyMoEModel(torch.nn.Module):
    def __init__(self, num_layers=2):
        super().__init__()
        self.gates = torch.nn.ModuleList(
            torch.nn.Linear(HIDDEN, NUM_EXPERTS, bias=False) for _ in range(num_layers)
        )
        self.moes = torch.nn.ModuleList(
            mc.FusedMoE(
                NUM_EXPERTS,
                TOP_K,
                HIDDEN,
                32,
                scoring_func="sigmoid",
                e_score_correction_bias=torch.zeros(NUM_EXPERTS),
                eplb_state=mc.EplbLayerState(),
                num_redundant_experts=2,
            )
            for _ in range(num_layers)
        )
        generator = torch.Generator().manual_seed(0)
        for moe in self.moes:
            moe.load_logical_weights(
                torch.randn(NUM_EXPERTS, 64, HIDDEN, generator=generator) / 4,
                torch.randn(NUM_EXPERTS, HIDDEN, 32, generator=generator) / 4,
            )

    def forward(self, hidden_states):
        for gate, moe in zip(self.gates, self.moes, strict=True):
            hidden_states = hidden_states + moe(hidden_states, gate(hidden_states))
        return hidden_states


@torch.no_grad()  # serving: an inference graph (training keeps routing unfused, see README)
def test_whole_model_fuses_every_layer_and_matches_eager():
    torch._dynamo.reset()
    model = TinyMoEModel()
    eplb = mc.EplbState.from_model(model, num_redundant_experts=2)
    backend = PassTestBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    hidden = torch.randn(13, HIDDEN)
    mc.mark_dynamic_tokens(hidden)

    eplb.expert_load_pass.zero_()
    expected = model(hidden)
    expected_load = eplb.expert_load_pass.clone()
    eplb.expert_load_pass.zero_()
    got = compiled(hidden)

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eplb.expert_load_pass, expected_load, rtol=0, atol=0)
    assert int(expected_load.sum()) == 2 * 13 * TOP_K
    (graph,) = backend.graphs
    assert graph.applied["route_eplb"] == 2
    assert graph.ops_after["auto_functionalized(moe_compile.route_eplb)"] == 2
    assert "aten.sort" not in graph.after


@torch.no_grad()
def test_identical_layers_share_their_pattern_traces(monkeypatch):
    """The pass traces each candidate pattern once per argument metadata: a model of
    four identical layers costs the pass no more traces than a model of two."""
    from moe_compile.passes import pattern_store

    traced = []
    original = pattern_store._StoredFirstTrace.__call__

    def counting(self, fn, args, **kwargs):
        traced.append(fn)
        return original(self, fn, args, **kwargs)

    monkeypatch.setattr(pattern_store._StoredFirstTrace, "__call__", counting)
    counts = {}
    for num_layers in (1, 2, 4):  # the first registers the patterns, if no test did
        torch._dynamo.reset()
        traced.clear()
        model = TinyMoEModel(num_layers)
        mc.EplbState.from_model(model, num_redundant_experts=2)
        backend = PassTestBackend()
        hidden = torch.randn(13, HIDDEN)
        mc.mark_dynamic_tokens(hidden)
        torch.compile(model, backend=backend, fullgraph=True)(hidden)
        assert backend.graphs[0].applied["route_eplb"] == num_layers
        counts[num_layers] = len(traced)
    assert counts[2] > 0 and counts[4] == counts[2]
