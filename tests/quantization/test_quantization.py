"""Quantization methods: round-trip bounds, layer output against float64, EPLB weight movement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_compile import (
    EplbLayerState,
    FusedMoE,
    FusedMoEMethodBase,
    Int4PairPackedFusedMoEMethod,
    Int8WeightOnlyFusedMoEMethod,
    UnquantizedFusedMoEMethod,
)
from moe_compile.quantization import (
    pack_expert_pairs,
    quantize_int4_per_channel,
    quantize_int8_per_channel,
    unpack_expert_pairs,
)

E, K, H, INTER = 8, 2, 16, 8


def make_weights(num_experts=E, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_experts, 2 * INTER, H, generator=g) / H**0.5,
        torch.randn(num_experts, H, INTER, generator=g) / INTER**0.5,
    )


def make_inputs(num_tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, H, generator=g), torch.randn(num_tokens, E, generator=g)


def moe_float64(x, w13, w2, logits):
    """Softmax top-k (renormalized) MoE in float64, from the dequantized weights."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    probs = torch.softmax(logits.double(), dim=-1)
    weights, ids = probs.topk(K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(K):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            out[t] += weights[t, j] * (w2[e] @ (F.silu(h[:INTER]) * h[INTER:]))
    return out


@pytest.mark.parametrize(
    ("quantize", "max_code"), [(quantize_int8_per_channel, 127), (quantize_int4_per_channel, 7)]
)
def test_per_channel_quantization_error_is_within_half_a_step(quantize, max_code):
    weight = torch.randn(3, 10, 12, generator=torch.Generator().manual_seed(0))
    weight[1, 4] = 0.0  # an all-zero row must stay zero
    codes, scale = quantize(weight)
    assert codes.dtype == torch.int8 and scale.shape == (3, 10)
    assert int(codes.abs().max()) == max_code  # every non-zero row reaches the top code
    assert (codes[1, 4] == 0).all()
    torch.testing.assert_close(scale, weight.abs().amax(-1) / max_code, rtol=1e-6, atol=1e-30)
    error = (codes.double() * scale.double()[..., None] - weight.double()).abs()
    assert (error <= scale.double()[..., None] / 2 + 1e-7).all()


def test_expert_pair_packing_round_trips_odd_counts():
    codes = torch.randint(-7, 8, (5, 3, 4), generator=torch.Generator().manual_seed(1)).to(
        torch.int8
    )
    packed = pack_expert_pairs(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 3, 4)
    # expert 2 is in the low nibble and expert 3 in the high nibble of pair 1
    assert ((packed[1] & 0xF).to(torch.int8) - 8 == codes[2]).all()
    assert ((packed[1] >> 4).to(torch.int8) - 8 == codes[3]).all()
    assert torch.equal(unpack_expert_pairs(packed, 5), codes)


@pytest.mark.parametrize("experts_impl", ["grouped", "reference"])
@pytest.mark.parametrize(
    ("method", "weight_attr"),
    [
        (Int8WeightOnlyFusedMoEMethod(), "w13_weight"),
        (Int4PairPackedFusedMoEMethod(), "w13_weight_packed"),
    ],
)
def test_quantized_layer_matches_float64_of_dequantized_weights(method, weight_attr, experts_impl):
    layer = FusedMoE(E, K, H, INTER, quant_method=method, experts_impl=experts_impl)
    w13, w2 = make_weights()
    layer.load_logical_weights(w13, w2)
    assert getattr(layer, weight_attr).dtype in (torch.int8, torch.uint8)
    if isinstance(method, Int8WeightOnlyFusedMoEMethod):
        q13, q2 = layer.w13_weight, layer.w2_weight
        assert int(q13.abs().max()) <= 127
    else:
        q13 = unpack_expert_pairs(layer.w13_weight_packed, E)
        q2 = unpack_expert_pairs(layer.w2_weight_packed, E)
        assert int(q13.abs().max()) <= 7
    deq13 = q13.double() * layer.w13_weight_scale.double()[..., None]
    deq2 = q2.double() * layer.w2_weight_scale.double()[..., None]
    # dequantized weights are close to the originals: the method really quantized them
    step = 1 / 127 if isinstance(method, Int8WeightOnlyFusedMoEMethod) else 1 / 7
    assert (deq13 - w13.double()).abs().max() <= step * w13.abs().max()
    x, logits = make_inputs(21)
    out = layer(x, logits)
    torch.testing.assert_close(
        out.double(), moe_float64(x, deq13, deq2, logits), rtol=1e-5, atol=1e-5
    )


def test_int8_output_is_close_to_unquantized():
    w13, w2 = make_weights(seed=3)
    x, logits = make_inputs(17, seed=4)
    full = FusedMoE(E, K, H, INTER)
    full.load_logical_weights(w13, w2)
    int8 = FusedMoE(E, K, H, INTER, quant_method=Int8WeightOnlyFusedMoEMethod())
    int8.load_logical_weights(w13, w2)
    reference = full(x, logits)
    relative = (int8(x, logits) - reference).norm() / reference.norm()
    assert 0 < relative < 0.02


def test_supports_eplb_flags():
    assert issubclass(Int8WeightOnlyFusedMoEMethod, FusedMoEMethodBase)
    assert UnquantizedFusedMoEMethod.supports_eplb is True
    assert Int8WeightOnlyFusedMoEMethod.supports_eplb is True
    assert Int4PairPackedFusedMoEMethod.supports_eplb is False


def test_method_without_eplb_support_is_refused_with_eplb_and_cannot_expose_experts():
    with pytest.raises(ValueError, match="Int4PairPackedFusedMoEMethod.*int4_pair_packed"):
        FusedMoE(
            E, K, H, INTER, eplb_state=EplbLayerState(), quant_method=Int4PairPackedFusedMoEMethod()
        )
    layer = FusedMoE(E, K, H, INTER, quant_method=Int4PairPackedFusedMoEMethod())
    with pytest.raises(ValueError, match="cannot be moved one at a time"):
        layer.get_expert_weights()


def test_int8_expert_weights_include_scales_as_writable_views():
    layer = FusedMoE(
        E,
        K,
        H,
        INTER,
        eplb_state=EplbLayerState(),
        num_redundant_experts=2,
        quant_method=Int8WeightOnlyFusedMoEMethod(),
    )
    views = layer.get_expert_weights()
    assert [(tuple(v.shape), v.dtype) for v in views] == [
        ((E + 2, 2 * INTER * H), torch.int8),
        ((E + 2, H * INTER), torch.int8),
        ((E + 2, 2 * INTER), torch.float32),
        ((E + 2, H), torch.float32),
    ]
    views[2][5].fill_(0.25)
    assert (layer.w13_weight_scale[5] == 0.25).all()


def test_quantized_weights_move_with_eplb_like_any_other():
    """Swap two physical slots through get_expert_weights and swap them in the map:
    the output must not change (scales travel with their weights)."""
    w13, w2 = make_weights(seed=5)
    x, logits = make_inputs(33, seed=6)
    layer = FusedMoE(
        E,
        K,
        H,
        INTER,
        eplb_state=EplbLayerState(),
        num_redundant_experts=2,
        quant_method=Int8WeightOnlyFusedMoEMethod(),
    )
    layer.load_logical_weights(w13, w2)  # physical 8, 9 replicate logical 0, 1
    l2p = torch.tensor([[0, 8], [1, 9]] + [[e, -1] for e in range(2, E)])
    counts = torch.tensor([2, 2] + [1] * (E - 2))
    layer.set_eplb_state(0, torch.zeros(1, E + 2, dtype=torch.int32), l2p[None], counts[None])
    layer.eplb_state.should_record_tensor = torch.tensor(False)
    before = layer(x, logits)

    # physical 3 <-> 9: logical 3 moves to slot 9 and logical 1's replica to slot 3
    for view in layer.get_expert_weights():
        view[[3, 9]] = view[[9, 3]].clone()
    l2p[3, 0], l2p[1, 1] = 9, 3
    layer.set_eplb_state(0, torch.zeros(1, E + 2, dtype=torch.int32), l2p[None], counts[None])
    after = layer(x, logits)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    # and a move that forgets the scales would change it
    layer.get_expert_weights()[2][3].mul_(2)
    assert not torch.allclose(layer(x, logits), before)
