"""Routing written the way open-source model code writes it is fused without changes."""

import pytest
import torch
import torch.nn.functional as F

from moe_compile.passes.testing import PassTestBackend

TOP_K, NUM_EXPERTS = 2, 8


def qwen_moe_gate(hidden_states, router_logits, norm_topk_prob=True):
    """Mixtral/Qwen-MoE (HF): softmax in float, top-k, in-place renormalize, cast back."""
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, TOP_K, dim=-1)
    if norm_topk_prob:
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    return routing_weights, selected_experts


def mixtral_topk_then_softmax(hidden_states, router_logits):
    """Original Mixtral: top-k on the logits, softmax over the k chosen."""
    weights, selected_experts = torch.topk(router_logits, TOP_K, dim=-1)
    weights = F.softmax(weights, dim=1, dtype=torch.float).to(hidden_states.dtype)
    return weights, selected_experts


def llama4_topk_then_sigmoid(hidden_states, router_logits):
    """Llama-4: top-k on raw logits, sigmoid of the chosen values."""
    router_top_value, router_indices = torch.topk(router_logits, TOP_K, dim=1)
    router_scores = torch.sigmoid(router_top_value.float()).to(hidden_states.dtype)
    return router_scores, router_indices


@pytest.mark.parametrize(
    "gate", [qwen_moe_gate, mixtral_topk_then_softmax, llama4_topk_then_sigmoid]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_code_routing_is_fused(gate, dtype):
    # Distinct logits (exact in bf16): torch.topk leaves the order of ties unspecified.
    logits = torch.stack([torch.randperm(NUM_EXPERTS) for _ in range(11)]).div(4).sub(1).to(dtype)
    hidden = torch.randn(11, 16).to(dtype)
    backend = PassTestBackend()
    compiled = torch.compile(gate, backend=backend, fullgraph=True)
    weights, ids = compiled(hidden, logits)
    ref_weights, ref_ids = gate(hidden, logits)
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)
    tolerance = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else {}
    torch.testing.assert_close(weights, ref_weights, **tolerance)
    graph = backend.graphs[0]
    assert graph.applied["routing"] == 1, graph.after
    assert graph.ops_after["moe_compile.route"] == 1
    assert "aten.topk" not in graph.after
