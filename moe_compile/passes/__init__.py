"""Graph passes that find MoE routing (+ EPLB) in post-grad graphs and fuse it."""

from .manager import FusionConfig, MoEFusionPass
from .printer import canonical_graph, count_ops

__all__ = ["FusionConfig", "MoEFusionPass", "canonical_graph", "count_ops"]
