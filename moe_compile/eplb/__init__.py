"""Expert-parallel load balancing: layer state, id remapping and load counting."""

from .layer_state import EplbLayerState
from .mapping import REPLICA_POLICIES, eplb_map_to_physical_and_record, map_to_physical

__all__ = [
    "REPLICA_POLICIES",
    "EplbLayerState",
    "eplb_map_to_physical_and_record",
    "map_to_physical",
]
