"""``create_fused_moe_router``: one entry point that picks the router for a config."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_compile.eplb import EplbLayerState

from .base import BaseRouter
from .custom import CustomRoutingRouter, SharedRoutedRouter, ZeroExpertRouter
from .grouped import GroupedTopKRouter, is_degenerate_grouping
from .simulator import RoutingSimulatorRouter
from .topk import FusedTopKBiasRouter, FusedTopKRouter


def create_fused_moe_router(
    top_k: int,
    global_num_experts: int,
    eplb_state: EplbLayerState | None = None,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    use_grouped_topk: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    custom_routing_function: Callable | None = None,
    num_fused_shared_experts: int = 0,
    zero_expert_type: str | None = None,
    num_logical_experts: int | None = None,
    routing_simulation_strategy: str | None = None,
    indices_dtype: torch.dtype | None = None,
    eplb_replica_policy: str = "token_hash",
) -> BaseRouter:
    """Pick a router, first match wins: simulator, zero-expert, grouped, custom,
    top-k with bias, shared-routed, plain top-k.

    A grouped config that cannot split ``num_logical_experts`` (or
    ``global_num_experts`` when not given) into equal groups of two or more
    falls through to the plain routers, as does a single group.
    """
    common = dict(
        top_k=top_k,
        global_num_experts=global_num_experts,
        eplb_state=eplb_state,
        indices_dtype=indices_dtype,
        eplb_replica_policy=eplb_replica_policy,
    )
    if routing_simulation_strategy:
        return RoutingSimulatorRouter(strategy=routing_simulation_strategy, **common)

    if zero_expert_type is not None:
        if num_logical_experts is None or e_score_correction_bias is None:
            raise ValueError(
                "zero_expert_type needs num_logical_experts and e_score_correction_bias"
            )
        return ZeroExpertRouter(
            e_score_correction_bias=e_score_correction_bias,
            num_logical_experts=num_logical_experts,
            zero_expert_type=zero_expert_type,
            renormalize=renormalize,
            scoring_func=scoring_func,
            routed_scaling_factor=routed_scaling_factor,
            **common,
        )

    if use_grouped_topk:
        if num_expert_group is None or topk_group is None:
            raise ValueError("use_grouped_topk needs num_expert_group and topk_group")
        num_experts = num_logical_experts or global_num_experts
        if num_expert_group > 1 and not is_degenerate_grouping(num_experts, num_expert_group):
            return GroupedTopKRouter(
                num_expert_group=num_expert_group,
                topk_group=topk_group,
                renormalize=renormalize,
                scoring_func=scoring_func,
                e_score_correction_bias=e_score_correction_bias,
                routed_scaling_factor=routed_scaling_factor,
                **common,
            )

    if custom_routing_function is not None:
        return CustomRoutingRouter(
            custom_routing_function=custom_routing_function, renormalize=renormalize, **common
        )

    if e_score_correction_bias is not None:
        return FusedTopKBiasRouter(
            e_score_correction_bias=e_score_correction_bias,
            renormalize=renormalize,
            scoring_func=scoring_func,
            routed_scaling_factor=routed_scaling_factor,
            **common,
        )

    if num_fused_shared_experts > 0:
        return SharedRoutedRouter(
            num_fused_shared_experts=num_fused_shared_experts, renormalize=renormalize, **common
        )

    return FusedTopKRouter(renormalize=renormalize, scoring_func=scoring_func, **common)
