"""Expert weights kept in ``params_dtype``."""

from __future__ import annotations

import torch

from .base import FusedMoEMethodBase, check_full_precision_weights, register_frozen_parameter


class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    """``w13_weight [E, 2I, H]`` and ``w2_weight [E, H, I]`` in ``params_dtype``."""

    name = "unquantized"
    supports_eplb = True

    def create_weights(
        self, layer, num_experts, hidden_size, intermediate_size, params_dtype, device
    ):
        register_frozen_parameter(
            layer,
            "w13_weight",
            torch.zeros(
                num_experts, 2 * intermediate_size, hidden_size, dtype=params_dtype, device=device
            ),
        )
        register_frozen_parameter(
            layer,
            "w2_weight",
            torch.zeros(
                num_experts, hidden_size, intermediate_size, dtype=params_dtype, device=device
            ),
        )

    def expert_weight_names(self):
        return ("w13_weight", "w2_weight")

    @torch.no_grad()
    def load_weights(self, layer, w13, w2):
        check_full_precision_weights(layer, w13, w2, layer.w13_weight.shape[0])
        layer.w13_weight.copy_(w13)
        layer.w2_weight.copy_(w2)

    def expert_tensors(self, layer):
        return layer.w13_weight, layer.w2_weight, None, None
