"""Eager routers: the specification the compiled path must equal."""

from .base import BaseRouter
from .custom import CustomRoutingRouter, SharedRoutedRouter, ZeroExpertRouter
from .factory import create_fused_moe_router
from .grouped import GroupedTopKRouter, grouped_topk
from .scoring import SCORING_FUNCS, compute_scores, topk_lowest_index_on_ties
from .simulator import RoutingSimulatorRouter, register_routing_strategy, routing_strategies
from .topk import FusedTopKBiasRouter, FusedTopKRouter, fused_topk, fused_topk_bias

__all__ = [
    "SCORING_FUNCS",
    "BaseRouter",
    "CustomRoutingRouter",
    "FusedTopKBiasRouter",
    "FusedTopKRouter",
    "GroupedTopKRouter",
    "RoutingSimulatorRouter",
    "SharedRoutedRouter",
    "ZeroExpertRouter",
    "compute_scores",
    "create_fused_moe_router",
    "fused_topk",
    "fused_topk_bias",
    "grouped_topk",
    "register_routing_strategy",
    "routing_strategies",
    "topk_lowest_index_on_ties",
]
