"""moe_compile: torch.compile passes that fuse MoE routing, EPLB remapping and load counting."""

from .compile import compile, inductor_options, mark_dynamic_tokens
from .eplb import (
    EplbLayerState,
    EplbState,
    EplbTransferError,
    available_policies,
    eplb_map_to_physical_and_record,
    rebalance,
    register_policy,
)
from .expert_map import ExpertMapManager
from .layer import FusedMoE
from .quantization import (
    FusedMoEMethodBase,
    Int4PairPackedFusedMoEMethod,
    Int8WeightOnlyFusedMoEMethod,
    UnquantizedFusedMoEMethod,
)
from .router import (
    BaseRouter,
    CustomRoutingRouter,
    FusedTopKBiasRouter,
    FusedTopKRouter,
    GroupedTopKRouter,
    RoutingSimulatorRouter,
    SharedRoutedRouter,
    ZeroExpertRouter,
    create_fused_moe_router,
)

__all__ = [
    "compile",
    "inductor_options",
    "mark_dynamic_tokens",
    "BaseRouter",
    "CustomRoutingRouter",
    "EplbLayerState",
    "EplbState",
    "EplbTransferError",
    "available_policies",
    "rebalance",
    "register_policy",
    "ExpertMapManager",
    "FusedMoE",
    "FusedMoEMethodBase",
    "Int4PairPackedFusedMoEMethod",
    "Int8WeightOnlyFusedMoEMethod",
    "UnquantizedFusedMoEMethod",
    "FusedTopKBiasRouter",
    "FusedTopKRouter",
    "GroupedTopKRouter",
    "RoutingSimulatorRouter",
    "SharedRoutedRouter",
    "ZeroExpertRouter",
    "create_fused_moe_router",
    "eplb_map_to_physical_and_record",
]
