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

__all__ = [
    "REPLICA_POLICIES",
    "EplbLayerState",
    "available_policies",
    "balancedness_of_plan",
    "count_moved_experts",
    "eplb_map_to_physical_and_record",
    "gpu_loads",
    "map_to_physical",
    "physical_to_logical_to_logical_to_physical",
    "rebalance",
    "register_policy",
]
