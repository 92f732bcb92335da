"""The Triton kernel behind ``moe_compile::route`` and ``moe_compile::route_eplb`` (private).

One program owns ``BLOCK_T`` tokens at a time with all their experts in
registers, as a ``[BLOCK_T, GROUPS_PAD, GROUP_PAD]`` tile: expert ``g *
GROUP_SIZE + m`` sits at group ``g``, member ``m`` (ungrouped routing is one
group). Per tile: selection keys, the group choice, the top-k, then (after the
chosen positions are spread over the threads through the weights buffer) the
weights from the logits re-read at the chosen ids, the shared-expert columns
and, with EPLB, the physical ids. The load is counted into a per-program
histogram over the physical experts; each program adds it with one atomic per
touched expert after its last tile (programs loop over tiles, so with EPLB
there are only a few programs per SM).

Two top-k implementations, both giving equal keys to the lower index:
- float32 keys (``_top_k_exact``): TOP_K rounds of row max, lowest position
  holding it, mask it. Keys are computed elementwise with the formulas and
  correctly rounded operations of PyTorch's CUDA kernels (libdevice exp/log1p,
  ``div_rn``, ``sqrt_rn``), so equal inputs give equal keys as in eager.
- packed int32 keys (``_top_k_packed``), for softmax without bias or groups on
  bf16/fp16 logits: the logit's bits in value order above the inverted
  position, one integer max per round. Softmax ranks like the logits except
  where float32 rounding makes distinct logits' scores equal; tiles where that
  can happen (chosen logits within 2**-7 (bf16) / 2**-4 (fp16) of zero, or
  spanning more than 80) are redone with float32 keys.

float32 rounding of scores is device math: eager on the CPU and on the GPU can
already disagree on which distinct logits tie. Under the interpreter
(``TRITON_INTERPRET=1``, no libdevice) ``PRECISE_MATH=False`` uses numpy's
exp/log, which are also accurate.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

SCORING_CODES = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _exp(x, PRECISE_MATH: tl.constexpr):
    if PRECISE_MATH:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _log1p(y, PRECISE_MATH: tl.constexpr):
    if PRECISE_MATH:
        r = libdevice.log1p(y)
    else:
        # log(1 + y) * y / ((1 + y) - 1) cancels the rounding of 1 + y (Goldberg).
        u = 1.0 + y
        r = tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))
    return r


@triton.jit
def _elementwise_score(x, SCORING: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """sigmoid or sqrt(softplus) of float32 logits, as PyTorch's CUDA kernels round them."""
    if SCORING == 1:
        s = tl.math.div_rn(1.0, 1.0 + _exp(-x, PRECISE_MATH))
    else:
        # softplus(x) = x above the threshold 20, else log1p(exp(x)).
        soft = tl.where(x > 20.0, x, _log1p(_exp(tl.minimum(x, 20.0), PRECISE_MATH), PRECISE_MATH))
        s = tl.sqrt_rn(soft)
    return s


_INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _top_k_exact(
    key, position, slot, TOP_K: tl.constexpr, NO_POSITION: tl.constexpr, BLOCK_T: tl.constexpr
):
    """``[BLOCK_T, TOP_K_PAD]`` positions: TOP_K rounds of row max, the lowest
    position holding it, then masking it (so equal keys go to the lower position)."""
    chosen = tl.zeros([BLOCK_T, slot.shape[1]], dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        best = tl.max(tl.max(key, axis=2), axis=1)
        at_best = tl.where(key == best[:, None, None], position, NO_POSITION)
        pick = tl.min(tl.min(at_best, axis=2), axis=1)
        key = tl.where(position == pick[:, None, None], float("-inf"), key)
        chosen = tl.where(slot == i, pick[:, None], chosen)
    return chosen


@triton.jit
def _top_k_packed(x_raw, position, is_expert, slot, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """Top-k of 16-bit softmax logits on one int32 key per expert: the logit's bits
    in value order, then the inverted position (so the lower index wins ties).

    Softmax orders experts like their logits, except where float32 rounds two
    distinct logits to equal scores (eager then takes the lower index). That
    needs two logits closer than about 2e-5, which distinct 16-bit values only
    are near zero, or scores that underflow. Returns the positions and, per row,
    whether a chosen logit, or the best one below the last chosen, is that
    close to zero (or not finite), or the chosen span more than 80: such tiles
    are redone exactly.
    """
    if x_raw.dtype == tl.bfloat16:
        TINY: tl.constexpr = 0x3C00  # 2**-7: bf16 neighbours there are 2**-15 apart
        HUGE: tl.constexpr = 0x7F80  # inf
    else:
        TINY: tl.constexpr = 0x2C00  # 2**-4 in float16
        HUGE: tl.constexpr = 0x7C00
    bits = x_raw.to(tl.int16, bitcast=True).to(tl.int32)
    bits = tl.where(bits == -32768, 0, bits)  # -0.0 ties with +0.0
    ordered = bits ^ ((bits >> 15) & 0x7FFF)
    key = tl.where(is_expert, (ordered << 16) | (0xFFFF - position), _INT32_MIN)
    chosen = tl.zeros([BLOCK_T, slot.shape[1]], dtype=tl.int32)
    first = tl.max(tl.max(key, axis=2), axis=1)
    best = first
    suspect = first != first
    for i in tl.static_range(TOP_K):
        if i > 0:
            best = tl.max(tl.max(key, axis=2), axis=1)
        chosen = tl.where(slot == i, (0xFFFF - (best & 0xFFFF))[:, None], chosen)
        key = tl.where(key == best[:, None, None], _INT32_MIN, key)
        value = best >> 16
        magnitude = value ^ (value >> 31)
        suspect = suspect | ((magnitude != 0) & (magnitude < TINY)) | (magnitude >= HUGE)
    below = tl.where(key < ((best >> 16) << 16)[:, None, None], key, _INT32_MIN)
    next_key = tl.max(tl.max(below, axis=2), axis=1)
    value = next_key >> 16
    magnitude = value ^ (value >> 31)
    tiny_next = (magnitude != 0) & (magnitude < TINY) & (next_key != _INT32_MIN)
    span = _ordered_to_float(first >> 16, x_raw.dtype) - _ordered_to_float(best >> 16, x_raw.dtype)
    return chosen, suspect | tiny_next | (span > 80.0)


@triton.jit
def _ordered_to_float(ordered, LOGITS_DTYPE: tl.constexpr):
    """Inverse of the order-preserving map of 16-bit float bits the packed keys use."""
    bits = ordered ^ ((ordered >> 15) & 0x7FFF)
    return bits.to(tl.int16).to(LOGITS_DTYPE, bitcast=True).to(tl.float32)


@triton.jit
def _softmax_numerator(x_raw, is_expert, PRECISE_MATH: tl.constexpr):
    """``exp(x - row max)`` over the tile (padding 0) and the row max."""
    x = tl.where(is_expert, x_raw.to(tl.float32), float("-inf"))
    row_max = tl.max(tl.max(x, axis=2), axis=1)
    return _exp(x - row_max[:, None, None], PRECISE_MATH), row_max


@triton.jit(do_not_specialize=["num_tokens"])
def _route_kernel(
    logits_ptr,
    stride_logits_t,
    stride_logits_e,
    bias_ptr,
    stride_bias,
    weights_ptr,
    stride_weights_t,
    ids_ptr,
    stride_ids_t,
    l2p_ptr,
    stride_l2p_e,
    stride_l2p_s,
    replica_count_ptr,
    stride_replica_count,
    load_ptr,
    stride_load,
    record_ptr,
    unpadded_ptr,
    num_tokens,
    num_physical,
    max_replicas,
    routed_scaling_factor,
    E_ROUTED: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_K_PAD: tl.constexpr,
    N_SHARED: tl.constexpr,
    N_SHARED_PAD: tl.constexpr,
    SCORING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_EPLB: tl.constexpr,
    TOKEN_HASH: tl.constexpr,
    HAS_UNPADDED: tl.constexpr,
    LOAD_BINS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PACKED_TOP_K: tl.constexpr,
    PRECISE_MATH: tl.constexpr,
):
    NO_POSITION: tl.constexpr = GROUPS_PAD * GROUP_PAD
    # Softmax weights renormalized over the chosen experts need neither the row's
    # sum (it cancels) nor its max (the first chosen logit is the max) when the
    # choice is on the plain scores.
    CHOSEN_ONLY_WEIGHTS: tl.constexpr = (
        SCORING == 0 and RENORMALIZE and not HAS_BIAS and NUM_GROUPS == 1
    )
    ROW_STATS: tl.constexpr = SCORING == 0 and not CHOSEN_ONLY_WEIGHTS
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(num_tokens, BLOCK_T)
    # The chosen positions pass through the weights buffer, which spreads a
    # row's k slots over the threads for the per-slot work.
    picks_ptr = weights_ptr.to(tl.pointer_type(tl.int32))

    group = tl.arange(0, GROUPS_PAD)[None, :, None]
    member = tl.arange(0, GROUP_PAD)[None, None, :]
    expert = group * GROUP_SIZE + member
    # Unique per tile cell (padding included) and ordered like `expert` on real experts.
    position = group * GROUP_PAD + member
    is_expert = (group < NUM_GROUPS) & (member < GROUP_SIZE)
    slot = tl.arange(0, TOP_K_PAD)[None, :]
    is_slot = slot < TOP_K

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_bias, mask=is_expert, other=0.0).to(tl.float32)
    if HAS_EPLB:
        record_on = tl.load(record_ptr) != 0
        if HAS_UNPADDED:
            counted_slots = tl.load(unpadded_ptr).to(tl.int64) * TOP_K
        load_counts = tl.zeros([LOAD_BINS], dtype=tl.int32)

    for tile in range(pid, num_tiles, num_programs):
        token = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        is_token = token < num_tokens
        token2 = token.to(tl.int64)[:, None]
        x_raw = tl.load(
            logits_ptr + token2[:, :, None] * stride_logits_t + expert * stride_logits_e,
            mask=is_token[:, None, None] & is_expert,
            other=0.0,
        )
        if ROW_STATS:
            numerator, row_max = _softmax_numerator(x_raw, is_expert, PRECISE_MATH)
            row_sum = tl.sum(tl.sum(numerator, axis=2), axis=1)

        if PACKED_TOP_K:
            chosen, suspect = _top_k_packed(x_raw, position, is_expert, slot, TOP_K, BLOCK_T)
            if tl.max((suspect & is_token).to(tl.int32), axis=0) > 0:
                # Exact choice on the float32 scores, divided as eager divides them.
                exact, _ = _softmax_numerator(x_raw, is_expert, PRECISE_MATH)
                exact_sum = tl.sum(tl.sum(exact, axis=2), axis=1)
                key = tl.where(
                    is_expert, tl.math.div_rn(exact, exact_sum[:, None, None]), float("-inf")
                )
                chosen = _top_k_exact(key, position, slot, TOP_K, NO_POSITION, BLOCK_T)
        else:
            # ---- selection keys: scores (+ bias); -inf on padding
            if SCORING == 0:
                if not ROW_STATS:
                    numerator, row_max = _softmax_numerator(x_raw, is_expert, PRECISE_MATH)
                if HAS_BIAS:
                    key = tl.math.div_rn(numerator, row_sum[:, None, None]) + bias
                else:
                    key = numerator  # orders like numerator / row_sum
            else:
                key = _elementwise_score(x_raw.to(tl.float32), SCORING, PRECISE_MATH)
                if HAS_BIAS:
                    key = key + bias
            key = tl.where(is_expert, key, float("-inf"))

            # ---- grouped routing: keep the TOPK_GROUP best groups (lower group on ties)
            if NUM_GROUPS > 1:
                top1 = tl.max(key, axis=2)
                if HAS_BIAS:
                    is_top1 = key == top1[:, :, None]
                    num_top1 = tl.sum(is_top1.to(tl.int32), axis=2)
                    runner_up = tl.max(tl.where(is_top1, float("-inf"), key), axis=2)
                    group_score = top1 + tl.where(num_top1 > 1, top1, runner_up)
                else:
                    group_score = top1
                group2 = tl.arange(0, GROUPS_PAD)[None, :]
                is_open = tl.broadcast_to(group2 < NUM_GROUPS, [BLOCK_T, GROUPS_PAD])
                kept = tl.zeros([BLOCK_T, GROUPS_PAD], dtype=tl.int32)
                for _ in tl.static_range(TOPK_GROUP):
                    best = tl.max(tl.where(is_open, group_score, float("-inf")), axis=1)
                    pick = tl.min(
                        tl.where(is_open & (group_score == best[:, None]), group2, GROUPS_PAD),
                        axis=1,
                    )
                    kept = tl.where(group2 == pick[:, None], 1, kept)
                    is_open = is_open & (group2 != pick[:, None])
                key = tl.where(kept[:, :, None] != 0, key, float("-inf"))

            chosen = _top_k_exact(key, position, slot, TOP_K, NO_POSITION, BLOCK_T)

        out_mask = is_token[:, None] & is_slot
        pick_ptrs = picks_ptr + token2 * stride_weights_t + slot
        tl.store(pick_ptrs, chosen, mask=out_mask)
        tl.debug_barrier()
        chosen = tl.load(pick_ptrs, mask=out_mask, other=0)
        tl.debug_barrier()  # every pick is read before the weights overwrite them
        logical = (chosen // GROUP_PAD) * GROUP_SIZE + chosen % GROUP_PAD
        # A row of NaNs matches no maximum; it must still name a real expert.
        logical = tl.minimum(logical, E_ROUTED - 1)

        # ---- weights: the unbiased scores at the chosen ids, from the logits re-read
        x_chosen = tl.load(
            logits_ptr + token2 * stride_logits_t + logical * stride_logits_e,
            mask=out_mask,
            other=0.0,
        ).to(tl.float32)
        if CHOSEN_ONLY_WEIGHTS:
            top = tl.max(tl.where(is_slot, x_chosen, float("-inf")), axis=1)
            weight = _exp(x_chosen - top[:, None], PRECISE_MATH)
        elif SCORING == 0:
            weight = tl.math.div_rn(
                _exp(x_chosen - row_max[:, None], PRECISE_MATH), row_sum[:, None]
            )
        else:
            weight = _elementwise_score(x_chosen, SCORING, PRECISE_MATH)
        weight = tl.where(is_slot, weight, 0.0)
        if RENORMALIZE:
            total = tl.sum(weight, axis=1)
            if SCORING == 2:
                total = tl.maximum(total, 1e-20)
            weight = tl.math.div_rn(weight, total[:, None])
        weight = weight * routed_scaling_factor
        tl.store(weights_ptr + token2 * stride_weights_t + slot, weight, mask=out_mask)

        # ---- EPLB: logical -> physical, and the per-program load histogram
        if HAS_EPLB:
            replicas = tl.load(
                replica_count_ptr + logical * stride_replica_count, mask=out_mask, other=1
            ).to(tl.int64)
            replicas = tl.minimum(tl.maximum(replicas, 1), max_replicas)
            flat_slot = token2 * TOP_K + slot
            if TOKEN_HASH:
                hashed = (token2 * 2654435769) & 0xFFFFFFFF
                replica = hashed % replicas
            else:
                replica = flat_slot % replicas
            physical = tl.load(
                l2p_ptr + logical * stride_l2p_e + replica * stride_l2p_s,
                mask=out_mask,
                other=-1,
            ).to(tl.int64)
            counted = out_mask & record_on & (physical >= 0) & (physical < num_physical)
            if HAS_UNPADDED:
                counted = counted & (flat_slot < counted_slots)
            # Slots not counted go to the spare bin `num_physical` (< LOAD_BINS).
            bins = tl.where(counted, physical, num_physical).to(tl.int32)
            load_counts += tl.histogram(tl.reshape(bins, [BLOCK_T * TOP_K_PAD]), LOAD_BINS)
            out_ids = physical
        else:
            out_ids = logical
        tl.store(
            ids_ptr + token2 * stride_ids_t + slot,
            out_ids.to(ids_ptr.dtype.element_ty),
            mask=out_mask,
        )

        # ---- shared experts: sigmoid weights, fixed ids, after the routed columns
        if N_SHARED > 0:
            shared = tl.arange(0, N_SHARED_PAD)[None, :]
            shared_mask = is_token[:, None] & (shared < N_SHARED)
            x_shared = tl.load(
                logits_ptr + token2 * stride_logits_t + (E_ROUTED + shared) * stride_logits_e,
                mask=shared_mask,
                other=0.0,
            ).to(tl.float32)
            tl.store(
                weights_ptr + token2 * stride_weights_t + TOP_K + shared,
                _elementwise_score(x_shared, 1, PRECISE_MATH),
                mask=shared_mask,
            )
            shared_ids = tl.broadcast_to(E_ROUTED + shared, [BLOCK_T, N_SHARED_PAD])
            tl.store(
                ids_ptr + token2 * stride_ids_t + TOP_K + shared,
                shared_ids.to(ids_ptr.dtype.element_ty),
                mask=shared_mask,
            )

    if HAS_EPLB:
        bin_ids = tl.arange(0, LOAD_BINS)
        tl.atomic_add(
            load_ptr + bin_ids * stride_load,
            load_counts.to(load_ptr.dtype.element_ty),
            mask=(bin_ids < num_physical) & (load_counts > 0),
            sem="relaxed",
        )


# ---------------------------------------------------------------- launch
@dataclass(frozen=True)
class RouteKernelConfig:
    """Launch shape: tokens per tile, warps, and (EPLB only) programs per SM."""

    block_tokens: int
    num_warps: int
    programs_per_sm: int = 4
    packed_top_k: bool = True
    """Allow the packed-key top-k for 16-bit softmax logits (exact fallback per tile)."""


_config_override: RouteKernelConfig | None = None


def set_config_override(config: RouteKernelConfig | None) -> None:
    """Force a launch shape for every later launch (benchmarks); ``None`` restores the default."""
    global _config_override
    _config_override = config


def default_config(row_width: int, packed_top_k: bool = True) -> RouteKernelConfig:
    """Tokens per tile from the padded row width: 4096 tile cells with the packed
    top-k, 2048 with the float32 one (more live registers per cell). Chosen from
    the sm_90 instruction counts and register use per token of offline
    compiles; ``--sweep`` in bench/routing_kernel.py measures alternatives."""
    cells = 4096 if packed_top_k else 2048
    block_tokens = max(1, min(128, cells // row_width))
    return RouteKernelConfig(block_tokens=block_tokens, num_warps=4 if row_width <= 256 else 8)


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_route_kernel(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_expert_group: int,
    topk_group: int,
    num_fused_shared_experts: int,
    eplb=None,
    config: RouteKernelConfig | None = None,
) -> None:
    """Fill ``weights`` / ``ids`` ``[T, top_k + n_shared]``; with ``eplb = (state, policy)``
    also add the load into ``state.expert_load_view``. Arguments are checked by the caller."""
    # Sizes that become constexprs are made concrete (under dynamic shapes this
    # specializes them, as the kernel must); the token count stays symbolic.
    num_tokens = router_logits.shape[0]
    if isinstance(num_tokens, int) and num_tokens == 0:
        return  # nothing to write; CUDA rejects the null pointers of empty tensors
    num_routed = int(router_logits.shape[1]) - num_fused_shared_experts
    groups = num_expert_group if num_expert_group > 1 else 1
    group_size = num_routed // groups
    groups_pad, group_pad = triton.next_power_of_2(groups), triton.next_power_of_2(group_size)
    packed_top_k = (
        scoring_func == "softmax"
        and e_score_correction_bias is None
        and groups == 1
        and router_logits.dtype in (torch.bfloat16, torch.float16)
    )
    config = config or _config_override or default_config(groups_pad * group_pad, packed_top_k)

    dummy = router_logits  # stands in for absent pointers; never read under its flag
    bias = e_score_correction_bias
    if eplb is not None:
        state, policy = eplb
        l2p, counts = state.logical_to_physical_map, state.logical_replica_count
        load, record, unpadded = (
            state.expert_load_view,
            state.should_record_tensor,
            state.num_unpadded_tokens,
        )
        num_physical, max_replicas = load.shape[0], l2p.shape[1]
        eplb_strides = (l2p.stride(0), l2p.stride(1), counts.stride(0), load.stride(0))
        load_bins = max(32, triton.next_power_of_2(int(num_physical) + 1))
    else:
        policy, l2p, counts, load, record, unpadded = "modulo", dummy, dummy, dummy, dummy, None
        num_physical, max_replicas, eplb_strides, load_bins = 0, 1, (0, 0, 0, 0), 32

    num_tiles = (num_tokens + config.block_tokens - 1) // config.block_tokens
    if eplb is not None:
        cap = _multiprocessor_count(router_logits.device) * config.programs_per_sm
        num_tiles = torch.sym_min(num_tiles, cap)
    grid = (torch.sym_max(num_tiles, 1),)

    kernel = _route_kernel
    if not _INTERPRETING:
        kernel = torch.library.wrap_triton(_route_kernel)
    kernel[grid](
        logits_ptr=router_logits,
        stride_logits_t=router_logits.stride(0),
        stride_logits_e=router_logits.stride(1),
        bias_ptr=bias if bias is not None else dummy,
        stride_bias=bias.stride(0) if bias is not None else 0,
        weights_ptr=weights,
        stride_weights_t=weights.stride(0),
        ids_ptr=ids,
        stride_ids_t=ids.stride(0),
        l2p_ptr=l2p,
        stride_l2p_e=eplb_strides[0],
        stride_l2p_s=eplb_strides[1],
        replica_count_ptr=counts,
        stride_replica_count=eplb_strides[2],
        load_ptr=load,
        stride_load=eplb_strides[3],
        record_ptr=record,
        unpadded_ptr=unpadded if unpadded is not None else dummy,
        num_tokens=num_tokens,
        num_physical=num_physical,
        max_replicas=max_replicas,
        routed_scaling_factor=float(routed_scaling_factor),
        E_ROUTED=num_routed,
        NUM_GROUPS=groups,
        GROUP_SIZE=group_size,
        GROUPS_PAD=groups_pad,
        GROUP_PAD=group_pad,
        TOPK_GROUP=topk_group if groups > 1 else 1,
        TOP_K=top_k,
        TOP_K_PAD=triton.next_power_of_2(top_k),
        N_SHARED=num_fused_shared_experts,
        N_SHARED_PAD=triton.next_power_of_2(max(num_fused_shared_experts, 1)),
        SCORING=SCORING_CODES[scoring_func],
        HAS_BIAS=bias is not None,
        RENORMALIZE=renormalize,
        HAS_EPLB=eplb is not None,
        TOKEN_HASH=policy == "token_hash",
        HAS_UNPADDED=unpadded is not None,
        LOAD_BINS=load_bins,
        BLOCK_T=config.block_tokens,
        PACKED_TOP_K=packed_top_k and config.packed_top_k,
        PRECISE_MATH=not _INTERPRETING,
        num_warps=config.num_warps,
    )
