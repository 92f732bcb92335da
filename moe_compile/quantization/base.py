"""How a MoE layer stores its expert weights and runs its experts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from moe_compile.experts import fused_experts


class FusedMoEMethodBase(ABC):
    """A quantization method for the expert weights of a :class:`~moe_compile.FusedMoE`.

    A method creates the layer's expert parameters, fills them from full
    precision weights, and runs the experts (dequantizing inside the expert
    computation). It keeps no state of its own, so one instance can serve many
    layers.

    ``supports_eplb`` says whether every per-expert tensor is a separable slice
    along dim 0, which EPLB needs to move single experts between ranks; a
    layer with EPLB on refuses a method without it.
    """

    name: ClassVar[str] = "base"
    supports_eplb: ClassVar[bool] = False

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        params_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        """Register the expert parameters (``requires_grad=False``) on ``layer``."""

    @abstractmethod
    def expert_weight_names(self) -> tuple[str, ...]:
        """Names of the layer's parameters whose dim 0 is the expert; EPLB moves these."""

    @abstractmethod
    def load_weights(self, layer: nn.Module, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Fill every expert slot of ``layer`` from full precision
        ``w13 [num_experts, 2 * I, H]`` and ``w2 [num_experts, H, I]``."""

    @abstractmethod
    def expert_tensors(
        self, layer: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(w13, w2, w13_scale, w2_scale)`` as the expert computation takes them."""

    def apply(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Run the experts on ``hidden_states``; ``topk_ids`` are local slots (-1: not here)."""
        w13, w2, w13_scale, w2_scale = self.expert_tensors(layer)
        return fused_experts(
            hidden_states,
            w13,
            w2,
            topk_weights,
            topk_ids,
            activation=layer.activation,
            w13_scale=w13_scale,
            w2_scale=w2_scale,
            impl=layer.experts_impl,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(supports_eplb={self.supports_eplb})"


def register_frozen_parameter(layer: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Register an inference-only parameter (integer weights cannot require grad anyway)."""
    layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def check_full_precision_weights(
    layer: nn.Module, w13: torch.Tensor, w2: torch.Tensor, num_experts: int
) -> None:
    hidden, intermediate = layer.hidden_size, layer.intermediate_size
    expected_w13 = (num_experts, 2 * intermediate, hidden)
    expected_w2 = (num_experts, hidden, intermediate)
    if tuple(w13.shape) != expected_w13 or tuple(w2.shape) != expected_w2:
        raise ValueError(
            f"expected w13 {expected_w13} and w2 {expected_w2}, got {tuple(w13.shape)} and "
            f"{tuple(w2.shape)}"
        )
    if not (w13.is_floating_point() and w2.is_floating_point()):
        raise ValueError(f"weights to load must be floating point, got {w13.dtype} and {w2.dtype}")
