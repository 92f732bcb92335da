"""``torch.library`` operators in the ``moe_compile`` namespace.

Importing this package registers them: ``moe_compile::route``,
``moe_compile::route_eplb`` (routing [+ EPLB remap + load count], one Triton
kernel on CUDA), ``moe_compile::route_counted`` (either, plus per-expert counts
and offsets for a grouped GEMM), ``moe_compile::route_zero_experts`` (routing
with LongCat-style zero experts [+ EPLB]) and ``moe_compile::eplb_remap``.
"""

from . import eplb_remap
from .routing import (
    check_eplb_map,
    expert_counts_reference,
    route,
    route_counted,
    route_eplb,
    route_reference,
    route_zero_experts,
    route_zero_experts_reference,
    use_triton_kernel,
)

__all__ = [
    "check_eplb_map",
    "eplb_remap",
    "expert_counts_reference",
    "route",
    "route_counted",
    "route_eplb",
    "route_reference",
    "route_zero_experts",
    "route_zero_experts_reference",
    "use_triton_kernel",
]
