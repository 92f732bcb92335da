"""Expert-parallel load balancing: layer state, id remapping and load counting."""

from .layer_state import EplbLayerState
from .mapping import REPLICA_POLICIES, eplb_map_to_physical_and_record, map_to_physical
from .policies import (
    available_policies,
    balancedness_of_plan,
    count_moved_experts,
    gpu_loads,
    physical_to_logical_to_logical_to_physical,
    rebalance,
    register_policy,
)
from .state import (
    EplbState,
    EplbStepResult,
    balancedness,
    find_moe_layers,
    initial_physical_to_logical_map,
)
from .weight_transfer import EplbTransferError, ExpertWeightMover, plan_layer_transfer

__all__ = [
    "REPLICA_POLICIES",
    "EplbLayerState",
    "EplbState",
    "EplbStepResult",
    "EplbTransferError",
    "ExpertWeightMover",
    "available_policies",
    "balancedness",
    "balancedness_of_plan",
    "count_moved_experts",
    "eplb_map_to_physical_and_record",
    "find_moe_layers",
    "gpu_loads",
    "initial_physical_to_logical_map",
    "map_to_physical",
    "physical_to_logical_to_logical_to_physical",
    "plan_layer_transfer",
    "rebalance",
    "register_policy",
]
