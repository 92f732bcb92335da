"""Synthetic routing for benchmarks: reproducible load patterns without a trained gate."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_compile.eplb import EplbLayerState

from .base import BaseRouter

RoutingStrategy = Callable[[torch.Tensor, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
"""``strategy(router_logits, top_k, generator) -> (weights, ids)``."""

_STRATEGIES: dict[str, RoutingStrategy] = {}


def register_routing_strategy(name: str) -> Callable[[RoutingStrategy], RoutingStrategy]:
    """Decorator that makes a strategy available to ``RoutingSimulatorRouter`` by name."""

    def register(strategy: RoutingStrategy) -> RoutingStrategy:
        _STRATEGIES[name] = strategy
        return strategy

    return register


def routing_strategies() -> tuple[str, ...]:
    return tuple(_STRATEGIES)


@register_routing_strategy("uniform_random")
def uniform_random(router_logits, top_k, generator):
    """k distinct experts per token, uniformly at random, weight 1."""
    num_tokens, num_experts = router_logits.shape
    noise = torch.rand(num_tokens, num_experts, generator=generator, device=generator.device)
    topk_ids = noise.argsort(dim=-1)[:, :top_k]
    return torch.ones(num_tokens, top_k, device=generator.device), topk_ids


@register_routing_strategy("normal_routing")
def normal_routing(router_logits, top_k, generator):
    """Ids bunched around the middle experts: ``sigmoid(N(0,1)) * E``; weights ``|N(0,1)|``."""
    num_tokens, num_experts = router_logits.shape
    shape = (num_tokens, top_k)
    position = torch.randn(shape, generator=generator, device=generator.device)
    topk_ids = (torch.sigmoid(position) * num_experts).long().clamp(0, num_experts - 1)
    magnitude = torch.randn(shape, generator=generator, device=generator.device).abs()
    topk_weights = magnitude / magnitude.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    return topk_weights, topk_ids


class RoutingSimulatorRouter(BaseRouter):
    """Ignores the logits' values and routes by a named, seeded strategy."""

    def __init__(
        self,
        top_k: int,
        global_num_experts: int,
        strategy: str = "uniform_random",
        seed: int = 0,
        eplb_state: EplbLayerState | None = None,
        indices_dtype: torch.dtype | None = None,
        eplb_replica_policy: str = "token_hash",
    ):
        super().__init__(top_k, global_num_experts, eplb_state, indices_dtype, eplb_replica_policy)
        if strategy not in _STRATEGIES:
            raise ValueError(
                f"unknown routing simulation strategy {strategy!r}; registered: {routing_strategies()}"
            )
        self.strategy = strategy
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _compute_routing(self, hidden_states, router_logits):
        topk_weights, topk_ids = _STRATEGIES[self.strategy](
            router_logits, self.top_k, self._generator(router_logits.device)
        )
        return topk_weights.float(), topk_ids
