"""Quantization methods for the expert weights of a FusedMoE layer."""

from .base import FusedMoEMethodBase
from .int4_pair_packed import (
    Int4PairPackedFusedMoEMethod,
    pack_expert_pairs,
    quantize_int4_per_channel,
    unpack_expert_pairs,
)
from .int8 import Int8WeightOnlyFusedMoEMethod, quantize_int8_per_channel
from .unquantized import UnquantizedFusedMoEMethod

__all__ = [
    "FusedMoEMethodBase",
    "Int4PairPackedFusedMoEMethod",
    "Int8WeightOnlyFusedMoEMethod",
    "UnquantizedFusedMoEMethod",
    "pack_expert_pairs",
    "quantize_int4_per_channel",
    "quantize_int8_per_channel",
    "unpack_expert_pairs",
]
