"""Int8 weight-only quantization: symmetric, one float32 scale per output channel."""

from __future__ import annotations

import torch

from .base import FusedMoEMethodBase, check_full_precision_weights, register_frozen_parameter

INT8_MAX = 127


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [..., out, in]`` -> ``(int8 [..., out, in], float32 scale [..., out])``.

    ``scale = max|row| / 127`` and ``q = round(w / scale)``, so ``q * scale``
    is within ``scale / 2`` of ``w``. All-zero rows get a tiny scale and zero codes.
    """
    weight = weight.float()
    scale = (weight.abs().amax(dim=-1) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(weight / scale.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8), scale


class Int8WeightOnlyFusedMoEMethod(FusedMoEMethodBase):
    """int8 ``w13_weight`` / ``w2_weight`` with float32 ``w13_weight_scale [E, 2I]`` and
    ``w2_weight_scale [E, H]``; activations stay in their dtype and the weights
    are dequantized inside the expert computation.
    """

    name = "int8_weight_only"
    supports_eplb = True

    def create_weights(
        self, layer, num_experts, hidden_size, intermediate_size, params_dtype, device
    ):
        shapes = {
            "w13_weight": (num_experts, 2 * intermediate_size, hidden_size),
            "w2_weight": (num_experts, hidden_size, intermediate_size),
        }
        for name, shape in shapes.items():
            register_frozen_parameter(
                layer, name, torch.zeros(shape, dtype=torch.int8, device=device)
            )
            register_frozen_parameter(
                layer, f"{name}_scale", torch.ones(shape[:2], dtype=torch.float32, device=device)
            )

    def expert_weight_names(self):
        return ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale")

    @torch.no_grad()
    def load_weights(self, layer, w13, w2):
        check_full_precision_weights(layer, w13, w2, layer.w13_weight.shape[0])
        for name, weight in (("w13_weight", w13), ("w2_weight", w2)):
            codes, scale = quantize_int8_per_channel(weight)
            getattr(layer, name).copy_(codes)
            getattr(layer, f"{name}_scale").copy_(scale)

    def expert_tensors(self, layer):
        return layer.w13_weight, layer.w2_weight, layer.w13_weight_scale, layer.w2_weight_scale
