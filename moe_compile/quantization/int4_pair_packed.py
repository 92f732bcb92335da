"""Int4 weight-only quantization that packs two experts into each byte.

Expert ``2j`` lives in the low nibble and expert ``2j + 1`` in the high nibble
of ``w*_weight_packed[j]``. Pairing experts halves the memory without
reordering any matrix, but no expert is a slice of its own: moving one expert
would rewrite its neighbour's half of every byte. So this method does not
support EPLB (``supports_eplb = False``) and a layer with EPLB on refuses it.
"""

from __future__ import annotations

import torch

from .base import FusedMoEMethodBase, check_full_precision_weights, register_frozen_parameter

INT4_MAX = 7
_NIBBLE_OFFSET = 8  # codes in [-7, 7] are stored as unsigned nibbles in [1, 15]


def quantize_int4_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [..., out, in]`` -> ``(int8 codes in [-7, 7], float32 scale [..., out])``."""
    weight = weight.float()
    scale = (weight.abs().amax(dim=-1) / INT4_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(weight / scale.unsqueeze(-1)).clamp(-INT4_MAX, INT4_MAX)
    return codes.to(torch.int8), scale


def pack_expert_pairs(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes ``[E, ...]`` -> uint8 ``[ceil(E / 2), ...]``, even experts in the low nibble."""
    if codes.shape[0] % 2:
        codes = torch.cat([codes, torch.zeros_like(codes[:1])])
    nibbles = (codes.to(torch.int16) + _NIBBLE_OFFSET).to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_expert_pairs(packed: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Inverse of :func:`pack_expert_pairs`: int8 codes ``[num_experts, ...]``."""
    low = (packed & 0xF).to(torch.int8) - _NIBBLE_OFFSET
    high = (packed >> 4).to(torch.int8) - _NIBBLE_OFFSET
    return torch.stack([low, high], dim=1).flatten(0, 1)[:num_experts]


class Int4PairPackedFusedMoEMethod(FusedMoEMethodBase):
    """uint8 ``w13_weight_packed [ceil(E/2), 2I, H]`` / ``w2_weight_packed [ceil(E/2), H, I]``
    with float32 per-output-channel ``w13_weight_scale [E, 2I]`` / ``w2_weight_scale [E, H]``."""

    name = "int4_pair_packed"
    supports_eplb = False

    def create_weights(
        self, layer, num_experts, hidden_size, intermediate_size, params_dtype, device
    ):
        num_pairs = (num_experts + 1) // 2
        shapes = {
            "w13_weight": (num_experts, 2 * intermediate_size, hidden_size),
            "w2_weight": (num_experts, hidden_size, intermediate_size),
        }
        for name, shape in shapes.items():
            register_frozen_parameter(
                layer,
                f"{name}_packed",
                torch.full(
                    (num_pairs, *shape[1:]),
                    _NIBBLE_OFFSET | (_NIBBLE_OFFSET << 4),
                    dtype=torch.uint8,
                    device=device,
                ),
            )
            register_frozen_parameter(
                layer, f"{name}_scale", torch.ones(shape[:2], dtype=torch.float32, device=device)
            )

    def expert_weight_names(self):
        raise ValueError(
            f"{type(self).__name__} packs two experts into each byte, so its experts cannot be "
            "moved one at a time (supports_eplb=False)"
        )

    @torch.no_grad()
    def load_weights(self, layer, w13, w2):
        check_full_precision_weights(layer, w13, w2, layer.w13_weight_scale.shape[0])
        for name, weight in (("w13_weight", w13), ("w2_weight", w2)):
            codes, scale = quantize_int4_per_channel(weight)
            getattr(layer, f"{name}_packed").copy_(pack_expert_pairs(codes))
            getattr(layer, f"{name}_scale").copy_(scale)

    def expert_tensors(self, layer):
        num_experts = layer.w13_weight_scale.shape[0]
        return (
            unpack_expert_pairs(layer.w13_weight_packed, num_experts),
            unpack_expert_pairs(layer.w2_weight_packed, num_experts),
            layer.w13_weight_scale,
            layer.w2_weight_scale,
        )
