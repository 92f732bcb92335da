"""``moe_compile::route`` and its variants: routing [+ EPLB remap + load count] as ops.

One call computes, from router logits ``[T, E]``: expert scores, plain or
grouped top-k (lower index wins ties), renormalization, routed scaling and the
shared-expert columns; ``route_eplb`` also maps the routed ids to physical
experts and counts the load into ``expert_load_view``, gated by
``should_record`` read on the device (no host sync).

Every op has
- a fake implementation (shapes and dtypes only, for tracing),
- a plain-PyTorch implementation built from the eager routers and the EPLB
  mapping (:func:`route_reference`), used on the CPU and as the reference,
- a Triton implementation (``_routing_kernels``) for CUDA, registered through
  ``torch.library.triton_op`` + ``wrap_triton`` so Inductor sees the kernel.

:func:`use_triton_kernel` is the one place that picks between the last two
(Triton on CUDA for rows of up to ``MAX_KERNEL_ROW`` padded experts).
``triton_op`` infers the schema from the annotations, so the integer options
appear as ``SymInt`` (Python ints are accepted as for ``int``).

Semantics are those of the eager routers (``moe_compile.router``) with these
additions, which the eager code leaves to the caller:
- ``num_fused_shared_experts = n > 0``: the last ``n`` logit columns are shared
  experts; the routed part is computed on the other columns with all the
  options given (``SharedRoutedRouter`` is the case softmax, no bias, no
  groups, scale 1.0); shared weights are ``sigmoid(logit)`` (not scaled),
  shared ids ``E_routed + i``; EPLB remaps only the routed columns.
- A replica count outside ``[1, S]`` is clamped into it, so the map is never
  read out of bounds; a map entry outside ``[0, P)`` is returned as it is and
  never counted. :func:`check_eplb_map` reports such maps on the host
  (``route_eplb(debug=True)`` or ``MOE_COMPILE_DEBUG_MAPS=1``).
- Zero experts (``ZeroExpertRouter``) have their own op, ``route_zero_experts``,
  whose EPLB tensors are optional: the masking sits between routing and remap
  and adds an output.
"""

from __future__ import annotations

import os

import torch

from moe_compile.eplb import REPLICA_POLICIES, EplbLayerState, eplb_map_to_physical_and_record
from moe_compile.router.custom import append_shared_experts, mask_zero_experts
from moe_compile.router.grouped import grouped_topk, is_degenerate_grouping
from moe_compile.router.scoring import SCORING_FUNCS
from moe_compile.router.topk import fused_topk, fused_topk_bias

LOAD_DTYPES = (torch.int32, torch.int64, torch.float32)
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEBUG_MAPS_ENV = "MOE_COMPILE_DEBUG_MAPS"
INTERPRET_ENV = "MOE_COMPILE_INTERPRET_KERNELS"


# ---------------------------------------------------------------- validation
def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def check_route_args(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    scoring_func: str,
    num_expert_group: int,
    topk_group: int,
    num_fused_shared_experts: int,
    indices_dtype: torch.dtype,
) -> int:
    """Raise ``ValueError`` for options the routing ops cannot honour; return E_routed.

    Reads only shapes and dtypes, so it is free of host syncs and safe while tracing.
    """
    if router_logits.dim() != 2:
        raise ValueError(
            f"router_logits must be 2-D [num_tokens, num_experts], got shape "
            f"{tuple(router_logits.shape)}"
        )
    if router_logits.dtype not in LOGIT_DTYPES:
        raise ValueError(
            f"router_logits must be float16, bfloat16, float32 or float64, got {router_logits.dtype}"
        )
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"unknown scoring_func {scoring_func!r}; expected one of {SCORING_FUNCS}")
    if indices_dtype not in INDEX_DTYPES:
        raise ValueError(f"indices_dtype must be one of {INDEX_DTYPES}, got {indices_dtype}")
    num_experts = router_logits.shape[1]
    if not 0 <= num_fused_shared_experts < num_experts:
        raise ValueError(
            f"num_fused_shared_experts must be in [0, {num_experts}) for router_logits with "
            f"{num_experts} columns, got {num_fused_shared_experts}"
        )
    num_routed = num_experts - num_fused_shared_experts
    if not 1 <= top_k <= num_routed:
        raise ValueError(f"top_k must be in [1, {num_routed}] (the routed experts), got {top_k}")
    if num_expert_group > 1:
        if is_degenerate_grouping(num_routed, num_expert_group):
            raise ValueError(
                f"grouped routing needs the {num_routed} routed experts split into "
                f"num_expert_group={num_expert_group} equal groups of at least 2"
            )
        if not 1 <= topk_group <= num_expert_group:
            raise ValueError(
                f"topk_group must be in [1, num_expert_group={num_expert_group}], got {topk_group}"
            )
        kept = topk_group * (num_routed // num_expert_group)
        if top_k > kept:
            raise ValueError(
                f"top_k={top_k} exceeds the {kept} experts in the kept groups "
                f"(topk_group={topk_group} x group size {num_routed // num_expert_group})"
            )
    if e_score_correction_bias is not None:
        bias = e_score_correction_bias
        if bias.dim() != 1 or bias.shape[0] != num_routed or not bias.is_floating_point():
            raise ValueError(
                f"e_score_correction_bias must be a 1-D float tensor of the {num_routed} routed "
                f"experts, got shape {tuple(bias.shape)} dtype {bias.dtype}"
            )
        if bias.device != router_logits.device:
            raise ValueError(
                f"e_score_correction_bias is on {bias.device} but router_logits on "
                f"{router_logits.device}"
            )
    return num_routed


def check_eplb_args(
    router_logits: torch.Tensor,
    num_routed: int,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    should_record: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None,
    replica_policy: str,
) -> EplbLayerState:
    """Shape / dtype / device checks of the EPLB arguments (no host sync); the
    ``EplbLayerState`` they make."""
    if replica_policy not in REPLICA_POLICIES:
        raise ValueError(
            f"unknown EPLB replica policy {replica_policy!r}; expected one of {REPLICA_POLICIES}"
        )
    l2p, counts, load = logical_to_physical_map, logical_replica_count, expert_load_view
    if l2p.dim() != 2 or l2p.shape[0] != num_routed or l2p.shape[1] < 1:
        raise ValueError(
            f"logical_to_physical_map must be [{num_routed}, max_replicas >= 1] (one row per "
            f"routed expert), got shape {tuple(l2p.shape)}"
        )
    if not _is_integer(l2p.dtype):
        raise ValueError(f"logical_to_physical_map must be integer, got {l2p.dtype}")
    if counts.dim() != 1 or counts.shape[0] != num_routed or not _is_integer(counts.dtype):
        raise ValueError(
            f"logical_replica_count must be a 1-D integer tensor [{num_routed}], got shape "
            f"{tuple(counts.shape)} dtype {counts.dtype}"
        )
    if load.dim() != 1 or load.dtype not in LOAD_DTYPES:
        raise ValueError(
            f"expert_load_view must be 1-D int32, int64 or float32, got shape "
            f"{tuple(load.shape)} dtype {load.dtype}"
        )
    if should_record.dim() != 0 or should_record.dtype != torch.bool:
        raise ValueError(
            f"should_record must be a 0-d bool tensor, got shape {tuple(should_record.shape)} "
            f"dtype {should_record.dtype}"
        )
    if num_unpadded_tokens is not None and (
        num_unpadded_tokens.dim() != 0 or not _is_integer(num_unpadded_tokens.dtype)
    ):
        raise ValueError(
            f"num_unpadded_tokens must be a 0-d integer tensor, got shape "
            f"{tuple(num_unpadded_tokens.shape)} dtype {num_unpadded_tokens.dtype}"
        )
    tensors = {
        "logical_to_physical_map": l2p,
        "logical_replica_count": counts,
        "expert_load_view": load,
        "should_record": should_record,
    }
    if num_unpadded_tokens is not None:
        tensors["num_unpadded_tokens"] = num_unpadded_tokens
    for name, tensor in tensors.items():
        if tensor.device != router_logits.device:
            raise ValueError(
                f"{name} is on {tensor.device} but router_logits on {router_logits.device}"
            )
    return EplbLayerState(
        expert_load_view=load,
        logical_to_physical_map=l2p,
        logical_replica_count=counts,
        should_record_tensor=should_record,
        num_unpadded_tokens=num_unpadded_tokens,
    )


def check_eplb_map(
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    num_physical_experts: int,
) -> None:
    """Raise ``ValueError`` naming the first map entry the kernel would read and find bad.

    For each logical expert ``e`` the kernel reads slots ``[0, clamp(count[e], 1, S))``
    of row ``e``; each must be a physical expert in ``[0, num_physical_experts)``,
    and ``count[e]`` must be within ``[1, S]``. This reads the tensors (a host
    sync): use it in eager debugging, not inside captured graphs.
    """
    l2p = logical_to_physical_map.detach().to("cpu", torch.int64)
    counts = logical_replica_count.detach().to("cpu", torch.int64)
    if l2p.dim() != 2 or counts.shape != (l2p.shape[0],):
        raise ValueError(
            f"logical_to_physical_map {tuple(l2p.shape)} and logical_replica_count "
            f"{tuple(counts.shape)} do not describe the same experts"
        )
    max_replicas = l2p.shape[1]
    bad_count = (counts < 1) | (counts > max_replicas)
    if bool(bad_count.any()):
        expert = int(bad_count.nonzero()[0, 0])
        raise ValueError(
            f"EPLB map is corrupt: logical_replica_count[{expert}] = {int(counts[expert])}, "
            f"expected 1..{max_replicas} (the map's replica slots)"
        )
    used = torch.arange(max_replicas) < counts[:, None]
    bad_entry = used & ((l2p < 0) | (l2p >= num_physical_experts))
    if bool(bad_entry.any()):
        expert, slot = (int(i) for i in bad_entry.nonzero()[0])
        raise ValueError(
            f"EPLB map is corrupt: logical_to_physical_map[{expert}, {slot}] = "
            f"{int(l2p[expert, slot])} is not a physical expert in [0, {num_physical_experts})"
        )


def debug_maps_enabled() -> bool:
    return os.environ.get(DEBUG_MAPS_ENV, "0") not in ("", "0")


# ---------------------------------------------------------------- plain PyTorch
def _logical_routing(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_expert_group: int,
    topk_group: int,
    num_fused_shared_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 weights and int64 logical ids ``[T, k + n_shared]`` from the eager routers."""
    num_routed = router_logits.shape[1] - num_fused_shared_experts
    routed_logits = router_logits[:, :num_routed]
    if num_expert_group > 1:
        weights, ids = grouped_topk(
            routed_logits,
            top_k,
            num_expert_group,
            topk_group,
            renormalize,
            scoring_func,
            e_score_correction_bias,
            routed_scaling_factor,
        )
    elif e_score_correction_bias is not None:
        weights, ids = fused_topk_bias(
            routed_logits,
            e_score_correction_bias,
            top_k,
            renormalize,
            scoring_func,
            routed_scaling_factor,
        )
    else:
        weights, ids = fused_topk(routed_logits, top_k, renormalize, scoring_func)
        weights = weights * routed_scaling_factor
    ids = ids.long()
    if num_fused_shared_experts:
        weights, ids = append_shared_experts(weights, ids, router_logits, num_fused_shared_experts)
    return weights, ids


def route_reference(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_expert_group: int,
    topk_group: int,
    num_fused_shared_experts: int,
    indices_dtype: torch.dtype,
    eplb_state: EplbLayerState | None = None,
    replica_policy: str = "token_hash",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch routing [+ EPLB], built from the eager routers: the ops' reference.

    With ``eplb_state`` it adds the load into ``eplb_state.expert_load_view``
    in place, exactly as ``route_eplb`` does. Replica counts are clamped into
    ``[1, S]`` first, as the kernel does, so a corrupt count is never an
    out-of-bounds read.
    """
    weights, ids = _logical_routing(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        renormalize,
        routed_scaling_factor,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
    )
    return _remap_and_count(weights, ids, top_k, indices_dtype, eplb_state, replica_policy)


def route_zero_experts_reference(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_expert_group: int,
    topk_group: int,
    indices_dtype: torch.dtype,
    num_real_experts: int,
    eplb_state: EplbLayerState | None = None,
    replica_policy: str = "token_hash",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`route_reference` with the zero-expert masking of ``ZeroExpertRouter``
    before the remap; also returns each token's weight on zero experts ``[T, 1]``."""
    weights, ids = _logical_routing(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        renormalize,
        routed_scaling_factor,
        num_expert_group,
        topk_group,
        0,
    )
    weights, ids, zero_weight = mask_zero_experts(weights, ids, num_real_experts)
    weights, ids = _remap_and_count(weights, ids, top_k, indices_dtype, eplb_state, replica_policy)
    return weights, ids, zero_weight.contiguous()


def _remap_and_count(weights, ids, top_k, indices_dtype, eplb_state, replica_policy):
    """The routed columns' EPLB remap and load count (replica counts clamped into
    ``[1, S]`` first, as the kernel does), then the final index dtype."""
    if eplb_state is not None:
        l2p = eplb_state.logical_to_physical_map
        clamped = EplbLayerState(
            expert_load_view=eplb_state.expert_load_view,
            logical_to_physical_map=l2p,
            logical_replica_count=eplb_state.logical_replica_count.clamp(1, l2p.shape[1]),
            should_record_tensor=eplb_state.should_record_tensor,
            num_unpadded_tokens=eplb_state.num_unpadded_tokens,
        )
        physical = eplb_map_to_physical_and_record(ids[:, :top_k], clamped, replica_policy)
        ids = torch.cat([physical, ids[:, top_k:]], dim=-1)
    return weights.contiguous(), ids.to(indices_dtype).contiguous()


def expert_counts_reference(
    ids: torch.Tensor, num_count_bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``counts[b]``: entries of ``ids`` equal to ``b`` (ids outside ``[0, B)``,
    another rank's experts, are not counted); ``offsets``: their exclusive prefix
    sums, ``B + 1`` long, ``offsets[b]`` the first row of bin ``b`` in a grouped GEMM."""
    flat = ids.reshape(-1).long()
    inside = (flat >= 0) & (flat < num_count_bins)
    counts = torch.zeros(num_count_bins + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, torch.where(inside, flat, num_count_bins), inside.int())
    counts = counts[:num_count_bins]
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0, dtype=torch.int32)])
    return counts, offsets


# ---------------------------------------------------------------- device choice
MAX_KERNEL_ROW = 1024
"""Widest padded expert row (groups x group size, each padded to a power of 2) the kernel holds."""


def _next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def use_triton_kernel(device: torch.device, num_routed: int = 0, num_expert_group: int = 0) -> bool:
    """The one place that picks the implementation: Triton on CUDA, plain PyTorch elsewhere.

    Rows wider than the kernel holds (more than ``MAX_KERNEL_ROW`` padded
    routed experts) also take the plain-PyTorch path. On the CPU the Triton
    kernel runs only under the Triton interpreter (``TRITON_INTERPRET=1``)
    when ``MOE_COMPILE_INTERPRET_KERNELS=1`` asks for it, eagerly: it is for
    testing the kernel without a GPU.
    """
    groups = max(num_expert_group, 1)
    row = _next_power_of_2(groups) * _next_power_of_2(num_routed // groups)
    if row > MAX_KERNEL_ROW:
        return False
    if device.type == "cuda":
        return True
    return (
        device.type == "cpu"
        and os.environ.get("TRITON_INTERPRET", "0") == "1"
        and os.environ.get(INTERPRET_ENV, "0") == "1"
    )


def _route_triton(
    router_logits,
    e_score_correction_bias,
    top_k,
    scoring_func,
    renormalize,
    routed_scaling_factor,
    num_expert_group,
    topk_group,
    num_fused_shared_experts,
    indices_dtype,
    eplb=None,
    num_count_bins=0,
    num_real_experts=None,
):
    from . import _routing_kernels

    num_tokens = router_logits.shape[0]
    width = top_k + num_fused_shared_experts
    weights = torch.empty((num_tokens, width), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((num_tokens, width), dtype=indices_dtype, device=router_logits.device)
    zero_experts = None
    if num_real_experts is not None:
        zero_weight = torch.empty((num_tokens, 1), dtype=torch.float32, device=ids.device)
        zero_experts = (num_real_experts, zero_weight)
    counts = offsets = None
    if num_count_bins:
        # Zeroed: the kernel adds into the counts and takes tickets in offsets[0].
        # Two tensors, not views of one: an op's outputs must not alias each other.
        counts = torch.zeros(num_count_bins, dtype=torch.int32, device=ids.device)
        offsets = torch.zeros(num_count_bins + 1, dtype=torch.int32, device=ids.device)
    _routing_kernels.launch_route_kernel(
        router_logits,
        e_score_correction_bias,
        weights,
        ids,
        top_k=top_k,
        scoring_func=scoring_func,
        renormalize=renormalize,
        routed_scaling_factor=routed_scaling_factor,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        num_fused_shared_experts=num_fused_shared_experts,
        eplb=eplb,
        count_outputs=(counts, offsets) if num_count_bins else None,
        zero_experts=zero_experts,
    )
    if num_count_bins:
        return weights, ids, counts, offsets
    if zero_experts is not None:
        return weights, ids, zero_experts[1]
    return weights, ids


# ---------------------------------------------------------------- the ops
@torch.library.triton_op("moe_compile::route", mutates_args=())
def _route_op(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_expert_group: int,
    topk_group: int,
    num_fused_shared_experts: int,
    indices_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        renormalize,
        routed_scaling_factor,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
        indices_dtype,
    )
    num_routed = check_route_args(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
        indices_dtype,
    )
    if use_triton_kernel(router_logits.device, num_routed, num_expert_group):
        return _route_triton(*args)
    return route_reference(*args)


@torch.library.triton_op("moe_compile::route_eplb", mutates_args=("expert_load_view",))
def _route_eplb_op(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_expert_group: int,
    topk_group: int,
    num_fused_shared_experts: int,
    indices_dtype: torch.dtype,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    expert_load_view: torch.Tensor,
    should_record: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None,
    replica_policy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        renormalize,
        routed_scaling_factor,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
        indices_dtype,
    )
    num_routed = check_route_args(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
        indices_dtype,
    )
    state = check_eplb_args(
        router_logits,
        num_routed,
        logical_to_physical_map,
        logical_replica_count,
        expert_load_view,
        should_record,
        num_unpadded_tokens,
        replica_policy,
    )
    if use_triton_kernel(router_logits.device, num_routed, num_expert_group):
        return _route_triton(*args, eplb=(state, replica_policy))
    return route_reference(*args, eplb_state=state, replica_policy=replica_policy)


@torch.library.triton_op("moe_compile::route_counted", mutates_args=("expert_load_view",))
def _route_counted_op(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_expert_group: int,
    topk_group: int,
    num_fused_shared_experts: int,
    indices_dtype: torch.dtype,
    logical_to_physical_map: torch.Tensor | None,
    logical_replica_count: torch.Tensor | None,
    expert_load_view: torch.Tensor | None,
    should_record: torch.Tensor | None,
    num_unpadded_tokens: torch.Tensor | None,
    replica_policy: str,
    num_count_bins: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``route`` (EPLB tensors None) or ``route_eplb``, plus the per-expert counts and
    offsets of the ids it returns, from the same launch."""
    args = (
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        renormalize,
        routed_scaling_factor,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
        indices_dtype,
    )
    state = _check_counted_args(*args, logical_to_physical_map, logical_replica_count,
                                expert_load_view, should_record, num_unpadded_tokens,
                                replica_policy, num_count_bins)  # fmt: skip
    num_routed = router_logits.shape[1] - num_fused_shared_experts
    if use_triton_kernel(router_logits.device, num_routed, num_expert_group):
        eplb = None if state is None else (state, replica_policy)
        return _route_triton(*args, eplb=eplb, num_count_bins=num_count_bins)
    weights, ids = route_reference(*args, eplb_state=state, replica_policy=replica_policy)
    return weights, ids, *expert_counts_reference(ids, num_count_bins)


@torch.library.triton_op("moe_compile::route_zero_experts", mutates_args=("expert_load_view",))
def _route_zero_experts_op(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_expert_group: int,
    topk_group: int,
    indices_dtype: torch.dtype,
    num_real_experts: int,
    logical_to_physical_map: torch.Tensor | None,
    logical_replica_count: torch.Tensor | None,
    expert_load_view: torch.Tensor | None,
    should_record: torch.Tensor | None,
    num_unpadded_tokens: torch.Tensor | None,
    replica_policy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``route`` over real and zero experts (no shared experts), then the
    ``ZeroExpertRouter`` masking, then the EPLB remap of the real experts when
    its tensors are given. Returns ``(weights, ids, zero_expert_weight [T, 1])``."""
    args = (
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        renormalize,
        routed_scaling_factor,
        num_expert_group,
        topk_group,
    )
    state = _check_zero_expert_args(*args, indices_dtype, num_real_experts,
                                    logical_to_physical_map, logical_replica_count,
                                    expert_load_view, should_record, num_unpadded_tokens,
                                    replica_policy)  # fmt: skip
    if use_triton_kernel(router_logits.device, router_logits.shape[1], num_expert_group):
        eplb = None if state is None else (state, replica_policy)
        return _route_triton(*args, 0, indices_dtype, eplb=eplb, num_real_experts=num_real_experts)
    return route_zero_experts_reference(
        *args, indices_dtype, num_real_experts, eplb_state=state, replica_policy=replica_policy
    )


def _check_counted_args(
    router_logits,
    e_score_correction_bias,
    top_k,
    scoring_func,
    renormalize,
    routed_scaling_factor,
    num_expert_group,
    topk_group,
    num_fused_shared_experts,
    indices_dtype,
    logical_to_physical_map,
    logical_replica_count,
    expert_load_view,
    should_record,
    num_unpadded_tokens,
    replica_policy,
    num_count_bins,
) -> EplbLayerState | None:
    """Checks of ``route_counted``; the EPLB state its tensors make, or None without them."""
    num_routed = check_route_args(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
        indices_dtype,
    )
    if num_count_bins < 1:
        raise ValueError(f"num_count_bins must be a positive int, got {num_count_bins!r}")
    return _check_optional_eplb_args(
        "route_counted",
        router_logits,
        num_routed,
        logical_to_physical_map,
        logical_replica_count,
        expert_load_view,
        should_record,
        num_unpadded_tokens,
        replica_policy,
    )


def _check_optional_eplb_args(
    op_name,
    router_logits,
    num_logical,
    logical_to_physical_map,
    logical_replica_count,
    expert_load_view,
    should_record,
    num_unpadded_tokens,
    replica_policy,
) -> EplbLayerState | None:
    """:func:`check_eplb_args` for ops whose EPLB tensors are all given or all None."""
    eplb_tensors = (logical_to_physical_map, logical_replica_count, expert_load_view, should_record)
    if all(t is None for t in eplb_tensors) and num_unpadded_tokens is None:
        return None
    if any(t is None for t in eplb_tensors):
        raise ValueError(
            f"{op_name} takes either no EPLB tensors or all of logical_to_physical_map, "
            "logical_replica_count, expert_load_view and should_record"
        )
    return check_eplb_args(
        router_logits,
        num_logical,
        logical_to_physical_map,
        logical_replica_count,
        expert_load_view,
        should_record,
        num_unpadded_tokens,
        replica_policy,
    )


def _check_zero_expert_args(
    router_logits,
    e_score_correction_bias,
    top_k,
    scoring_func,
    renormalize,
    routed_scaling_factor,
    num_expert_group,
    topk_group,
    indices_dtype,
    num_real_experts,
    logical_to_physical_map,
    logical_replica_count,
    expert_load_view,
    should_record,
    num_unpadded_tokens,
    replica_policy,
) -> EplbLayerState | None:
    """Checks of ``route_zero_experts``; the EPLB state its tensors make, or None.
    The EPLB map has a row per real expert: zero experts are never remapped."""
    num_experts = check_route_args(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        num_expert_group,
        topk_group,
        0,
        indices_dtype,
    )
    if not 1 <= num_real_experts < num_experts:
        raise ValueError(
            f"num_real_experts must be in [1, {num_experts}) for router_logits with "
            f"{num_experts} columns (the real experts, then at least one zero expert), "
            f"got {num_real_experts}"
        )
    return _check_optional_eplb_args(
        "route_zero_experts",
        router_logits,
        num_real_experts,
        logical_to_physical_map,
        logical_replica_count,
        expert_load_view,
        should_record,
        num_unpadded_tokens,
        replica_policy,
    )


def _fake_outputs(router_logits, top_k, num_fused_shared_experts, indices_dtype):
    shape = (router_logits.shape[0], top_k + num_fused_shared_experts)
    return (
        router_logits.new_empty(shape, dtype=torch.float32),
        router_logits.new_empty(shape, dtype=indices_dtype),
    )


@_route_op.register_fake
def _route_fake(
    router_logits,
    e_score_correction_bias,
    top_k,
    scoring_func,
    renormalize,
    routed_scaling_factor,
    num_expert_group,
    topk_group,
    num_fused_shared_experts,
    indices_dtype,
):
    check_route_args(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
        indices_dtype,
    )
    return _fake_outputs(router_logits, top_k, num_fused_shared_experts, indices_dtype)


@_route_eplb_op.register_fake
def _route_eplb_fake(
    router_logits,
    e_score_correction_bias,
    top_k,
    scoring_func,
    renormalize,
    routed_scaling_factor,
    num_expert_group,
    topk_group,
    num_fused_shared_experts,
    indices_dtype,
    logical_to_physical_map,
    logical_replica_count,
    expert_load_view,
    should_record,
    num_unpadded_tokens,
    replica_policy,
):
    num_routed = check_route_args(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
        indices_dtype,
    )
    check_eplb_args(
        router_logits,
        num_routed,
        logical_to_physical_map,
        logical_replica_count,
        expert_load_view,
        should_record,
        num_unpadded_tokens,
        replica_policy,
    )
    return _fake_outputs(router_logits, top_k, num_fused_shared_experts, indices_dtype)


@_route_counted_op.register_fake
def _route_counted_fake(*args):
    _check_counted_args(*args)
    router_logits, top_k, num_shared, indices_dtype = args[0], args[2], args[8], args[9]
    num_count_bins = args[16]
    return (
        *_fake_outputs(router_logits, top_k, num_shared, indices_dtype),
        router_logits.new_empty((num_count_bins,), dtype=torch.int32),
        router_logits.new_empty((num_count_bins + 1,), dtype=torch.int32),
    )


@_route_zero_experts_op.register_fake
def _route_zero_experts_fake(*args):
    _check_zero_expert_args(*args)
    router_logits, top_k, indices_dtype = args[0], args[2], args[8]
    return (
        *_fake_outputs(router_logits, top_k, 0, indices_dtype),
        router_logits.new_empty((router_logits.shape[0], 1), dtype=torch.float32),
    )


# ---------------------------------------------------------------- Python entry points
def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    e_score_correction_bias: torch.Tensor | None = None,
    scoring_func: str = "softmax",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_expert_group: int = 0,
    topk_group: int = 0,
    num_fused_shared_experts: int = 0,
    indices_dtype: torch.dtype = torch.int32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.moe_compile.route`` with keyword defaults."""
    return torch.ops.moe_compile.route(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        renormalize,
        routed_scaling_factor,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
        indices_dtype,
    )


def route_eplb(
    router_logits: torch.Tensor,
    top_k: int,
    eplb_state: EplbLayerState,
    *,
    e_score_correction_bias: torch.Tensor | None = None,
    scoring_func: str = "softmax",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_expert_group: int = 0,
    topk_group: int = 0,
    num_fused_shared_experts: int = 0,
    indices_dtype: torch.dtype = torch.int32,
    replica_policy: str = "token_hash",
    debug: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.moe_compile.route_eplb`` taking an :class:`EplbLayerState`.

    ``debug`` (default: environment ``MOE_COMPILE_DEBUG_MAPS=1``) checks the
    map on the host first (:func:`check_eplb_map`); skipped while compiling.
    """
    eplb_state.validate()
    if debug is None:
        debug = debug_maps_enabled()
    if debug and not torch.compiler.is_compiling():
        check_eplb_map(
            eplb_state.logical_to_physical_map,
            eplb_state.logical_replica_count,
            eplb_state.expert_load_view.shape[0],
        )
    return torch.ops.moe_compile.route_eplb(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        renormalize,
        routed_scaling_factor,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
        indices_dtype,
        eplb_state.logical_to_physical_map,
        eplb_state.logical_replica_count,
        eplb_state.expert_load_view,
        eplb_state.should_record_tensor,
        eplb_state.num_unpadded_tokens,
        replica_policy,
    )


def _optional_eplb_tensors(eplb_state: EplbLayerState | None) -> tuple:
    """The five EPLB arguments of the ops whose EPLB is optional (all None without a state)."""
    if eplb_state is None:
        return (None,) * 5
    eplb_state.validate()
    return (
        eplb_state.logical_to_physical_map,
        eplb_state.logical_replica_count,
        eplb_state.expert_load_view,
        eplb_state.should_record_tensor,
        eplb_state.num_unpadded_tokens,
    )


def route_counted(
    router_logits: torch.Tensor,
    top_k: int,
    num_count_bins: int,
    eplb_state: EplbLayerState | None = None,
    *,
    e_score_correction_bias: torch.Tensor | None = None,
    scoring_func: str = "softmax",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_expert_group: int = 0,
    topk_group: int = 0,
    num_fused_shared_experts: int = 0,
    indices_dtype: torch.dtype = torch.int32,
    replica_policy: str = "token_hash",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`route` (``eplb_state`` None) or :func:`route_eplb`, plus what a grouped expert
    GEMM needs from the same launch, with no second pass over the ids: ``counts``
    ``[num_count_bins]`` (int32, ids in ``[0, num_count_bins)`` only, all rows, shared
    columns included) and ``offsets`` ``[num_count_bins + 1]``, their exclusive prefix
    sums. Returns ``(weights, ids, counts, offsets)``."""
    eplb = _optional_eplb_tensors(eplb_state)
    return torch.ops.moe_compile.route_counted(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        renormalize,
        routed_scaling_factor,
        num_expert_group,
        topk_group,
        num_fused_shared_experts,
        indices_dtype,
        *eplb,
        replica_policy,
        num_count_bins,
    )


def route_zero_experts(
    router_logits: torch.Tensor,
    top_k: int,
    num_real_experts: int,
    eplb_state: EplbLayerState | None = None,
    *,
    e_score_correction_bias: torch.Tensor | None = None,
    scoring_func: str = "softmax",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_expert_group: int = 0,
    topk_group: int = 0,
    indices_dtype: torch.dtype = torch.int32,
    replica_policy: str = "token_hash",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing over ``num_real_experts`` real experts followed by zero experts
    (LongCat-Flash), as ``ZeroExpertRouter`` does it, in one launch: a slot that
    chose a zero expert gets id 0 and weight 0, and its weight goes to
    ``zero_expert_weight [T, 1]`` (the caller adds ``hidden_states *
    zero_expert_weight``); then, with ``eplb_state``, the ids are remapped to
    physical experts and counted. Returns ``(weights, ids, zero_expert_weight)``."""
    eplb = _optional_eplb_tensors(eplb_state)
    return torch.ops.moe_compile.route_zero_experts(
        router_logits,
        e_score_correction_bias,
        top_k,
        scoring_func,
        renormalize,
        routed_scaling_factor,
        num_expert_group,
        topk_group,
        indices_dtype,
        num_real_experts,
        *eplb,
        replica_policy,
    )
