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


def deepseek_hf_gate(hidden_states, router_logits, bias, n_group=4, topk_group=2, scale=2.5):
    """DeepSeek-V3's Hugging Face gate ("noaux_tc"): groups masked with 0.0, unsorted top-k."""
    num_tokens = router_logits.shape[0]
    scores = router_logits.float().sigmoid()
    choice = scores + bias.unsqueeze(0)
    group_scores = choice.view(num_tokens, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    group_size = router_logits.shape[1] // n_group
    score_mask = group_mask.unsqueeze(-1).expand(num_tokens, n_group, group_size)
    score_mask = score_mask.reshape(num_tokens, -1)
    masked = choice.masked_fill(~score_mask.bool(), 0.0)
    topk_idx = torch.topk(masked, k=TOP_K, dim=-1, sorted=False)[1]
    weights = scores.gather(1, topk_idx)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, topk_idx


def test_deepseek_hf_gate_is_left_unfused_and_correct():
    """Not the op's routing, so never replaced: a kept expert whose biased score
    is below 0.0 loses to a masked one (the op masks with -inf), the unsorted
    top-k's order and ties are the implementation's, and 1e-20 joins the sum."""
    logits = torch.stack([torch.randperm(NUM_EXPERTS) for _ in range(11)]).div(4).sub(1)
    bias = torch.linspace(-0.5, 0.1, NUM_EXPERTS)
    hidden = torch.randn(11, 16)
    backend = PassTestBackend()
    compiled = torch.compile(deepseek_hf_gate, backend=backend, fullgraph=True)
    weights, ids = compiled(hidden, logits, bias)
    ref_weights, ref_ids = deepseek_hf_gate(hidden, logits, bias)
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_weights)
    graph = backend.graphs[0]
    assert sum(graph.applied.values()) == 0
    assert graph.before == graph.after
