"""Both expert implementations against a float64 loop written here, and against each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_compile.experts import (
    fused_experts,
    grouped_experts,
    grouped_mm_supported,
    reference_experts,
)


def experts_float64(x, w13, w2, weights, ids, activation="silu", w13_scale=None, w2_scale=None):
    """out[t] = sum_j weights[t, j] * w2[e] @ (act(gate) * up), e = ids[t, j], one slot at a time."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    if w13_scale is not None:
        w13 = w13 * w13_scale.double()[:, :, None]
        w2 = w2 * w2_scale.double()[:, :, None]
    num_experts, intermediate = w13.shape[0], w2.shape[2]
    act = F.silu if activation == "silu" else F.gelu
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < num_experts:
                continue
            h = w13[e] @ x[t]
            out[t] += float(weights[t, j]) * (w2[e] @ (act(h[:intermediate]) * h[intermediate:]))
    return out


def make_problem(num_tokens, hidden, intermediate, num_experts, top_k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * intermediate, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, intermediate, generator=g) / intermediate**0.5).to(dtype)
    # ids include -1 (another rank's expert) and num_experts (out of range): both contribute nothing
    ids = torch.randint(-1, num_experts + 1, (num_tokens, top_k), generator=g, dtype=torch.int32)
    weights = torch.rand(num_tokens, top_k, generator=g)
    return x, w13, w2, weights, ids


IMPLS = [
    pytest.param(reference_experts, id="reference"),
    pytest.param(lambda *a, **kw: grouped_experts(*a, use_grouped_mm=False, **kw), id="portable"),
    pytest.param(grouped_experts, id="grouped-auto"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_float32_matches_float64_loop(impl, activation):
    x, w13, w2, weights, ids = make_problem(23, 16, 24, 6, 3, torch.float32)
    out = impl(x, w13, w2, weights, ids, activation=activation)
    assert out.dtype == torch.float32 and out.shape == x.shape
    expected = experts_float64(x, w13, w2, weights, ids, activation)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_grouped_mm", [False, True])
def test_bfloat16_grouped_matches_float64_loop(use_grouped_mm):
    x, w13, w2, weights, ids = make_problem(31, 16, 32, 5, 2, torch.bfloat16, seed=1)
    out = grouped_experts(x, w13, w2, weights, ids, use_grouped_mm=use_grouped_mm)
    assert out.dtype == torch.bfloat16
    expected = experts_float64(x, w13, w2, weights, ids)
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(
        out, reference_experts(x, w13, w2, weights, ids), rtol=2e-2, atol=2e-2
    )


def test_duplicate_ids_in_one_token_add_their_weights():
    x, w13, w2, _, _ = make_problem(4, 8, 8, 3, 3, torch.float32, seed=2)
    ids = torch.tensor([[1, 1, 2], [0, 0, 0], [2, -1, 2], [-1, -1, -1]])
    weights = torch.tensor([[0.5, 0.25, 1.0], [1.0, 2.0, 3.0], [0.5, 9.0, 0.5], [1.0, 1.0, 1.0]])
    expected = experts_float64(x, w13, w2, weights, ids)
    assert expected[3].abs().max() == 0  # a token whose experts are all elsewhere gets zeros
    for impl in ("reference", "grouped"):
        out = fused_experts(x, w13, w2, weights, ids, impl=impl)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    out = grouped_experts(x, w13, w2, weights, ids, use_grouped_mm=False)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_per_channel_scales_dequantize_integer_weights(impl):
    g = torch.Generator().manual_seed(3)
    x, _, _, weights, ids = make_problem(9, 16, 8, 4, 2, torch.float32, seed=3)
    w13 = torch.randint(-127, 128, (4, 16, 16), generator=g, dtype=torch.int8)
    w2 = torch.randint(-127, 128, (4, 16, 8), generator=g, dtype=torch.int8)
    w13_scale = torch.rand(4, 16, generator=g) / 500
    w2_scale = torch.rand(4, 16, generator=g) / 500
    out = impl(x, w13, w2, weights, ids, w13_scale=w13_scale, w2_scale=w2_scale)
    expected = experts_float64(x, w13, w2, weights, ids, "silu", w13_scale, w2_scale)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    x, w13, w2, weights, ids = make_problem(0, 16, 8, 4, 2, torch.float32)
    out = impl(x, w13, w2, weights, ids)
    assert out.shape == (0, 16)


def test_grouped_mm_is_chosen_only_where_it_can_run():
    bf16 = torch.zeros(2, 16, dtype=torch.bfloat16)
    assert grouped_mm_supported(bf16, 16, 32)
    assert not grouped_mm_supported(bf16, 16, 12)  # 12 bf16 values = 24 bytes: unaligned rows
    assert not grouped_mm_supported(bf16.float(), 16, 32)  # its tracing rule accepts bf16 only
    assert not grouped_mm_supported(bf16.double(), 16, 32)


def test_bad_inputs_raise():
    x, w13, w2, weights, ids = make_problem(3, 8, 8, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        fused_experts(x, w13, w2, weights, ids, activation="relu")
    with pytest.raises(ValueError, match="experts_impl"):
        fused_experts(x, w13, w2, weights, ids, impl="triton")
    with pytest.raises(ValueError, match="inconsistent expert shapes"):
        fused_experts(x, w13, w2[:, :, :4], weights, ids)
    with pytest.raises(ValueError, match="w13_scale"):
        fused_experts(
            x, w13, w2, weights, ids, w13_scale=torch.ones(2, 8), w2_scale=torch.ones(2, 8)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_compiles_whole_with_dynamic_token_counts(dtype):
    torch._dynamo.reset()
    _, w13, w2, _, _ = make_problem(1, 16, 16, 4, 2, dtype)
    compiled = torch.compile(grouped_experts, fullgraph=True, backend="aot_eager", dynamic=True)
    for num_tokens in (7, 12, 0):
        x, _, _, weights, ids = make_problem(num_tokens, 16, 16, 4, 2, dtype, seed=num_tokens)
        expected = reference_experts(x, w13, w2, weights, ids)
        torch.testing.assert_close(
            compiled(x, w13, w2, weights, ids), expected, rtol=2e-2, atol=2e-2
        )
    x, _, _, weights, ids = make_problem(9, 16, 16, 4, 2, dtype)
    explanation = torch._dynamo.explain(grouped_experts)(x, w13, w2, weights, ids)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
