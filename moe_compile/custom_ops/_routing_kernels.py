"""The Triton kernel behind the ``moe_compile::route*`` ops (private).

Layout. A program routes ``BLOCK_T`` tokens per tile and loops over tiles. A
token's row of experts is spread over ``LANES`` threads; each lane holds
``CHUNK`` experts of the row as a tuple of ``SORT_WIDTH`` (``CHUNK`` rounded up
to a power of two) tensors ``[BLOCK_T, LANES]``. Entry ``j`` of lane ``l`` is expert ``g * GROUP_SIZE + m`` with group
``g = j // MEMBERS_PER_LANE`` and member ``m = (j % MEMBERS_PER_LANE) * LANES +
l``: a group's members are interleaved over the lanes, so loading one entry
reads neighbouring experts (coalesced) and every lane holds members of every
group (ungrouped routing is one group).

Keys. Selection compares one integer per expert: the selection score in value
order above the inverted expert index, so ``max`` takes the larger score and,
on equal scores, the lower index (as eager ``topk`` does):
- int64 keys: the bits of the float32 score (``-0.0`` as ``+0.0``). The scores
  are computed elementwise with the formulas and correctly rounded operations
  of PyTorch's CUDA kernels (libdevice exp/log1p, ``div_rn``, ``sqrt_rn``), so
  equal inputs give equal keys as in eager.
- int32 keys (``PACKED_TOP_K``), for softmax without bias or groups on 16-bit
  logits: the logit as a signed 16-bit integer in value order (a negative
  logit's magnitude bits inverted, so ``-0.0`` sorts just below ``+0.0``), made
  two per register with a byte permute. Softmax ranks like the logits except where
  float32 rounding makes distinct logits' scores equal, which needs logits
  within about 2e-5 of each other: only near zero (``-0.0`` and ``+0.0`` too), or
  where scores underflow. Tiles where a chosen logit is near zero (within 2**-11
  to 2**-7 for bf16, 2**-8 to 2**-4 for fp16, growing with the chosen logits'
  span: ``_packed_suspect``), not finite, or more than 80 below the first are redone
  with int64 keys (by ``TOP_K`` row maxima in a loop, in sub-tiles of one row per
  warp: little code and few registers for a rare path, so the common path keeps
  its occupancy); the redo writes the packed keys of its picks, so the chosen
  logits always come from keys.

Top-k. Each lane sorts its keys once: sorting networks over blocks of
``HEADS = next_pow2(min(CHUNK, TOP_K))`` keys (19 comparators for 8), then
pairwise bitonic merges that keep the best ``HEADS``. The lanes' lists are then
combined in one of two ways. In the persistent launches (EPLB, counts: few warps
per SM, latency exposed) they merge in a reduction over the lanes whose combine
keeps the best ``TOP_K_PAD`` of two sorted lists: ``log2(LANES)`` levels of
independent shuffles. Otherwise (and beyond 16 keys) ``TOP_K`` rounds take the
maximum of the lanes' first keys and the lane that held it drops its first key:
fewer instructions, ``TOP_K`` dependent reductions.

Grouped routing scores a group by its best key (plus the second best with a
correction bias, as DeepSeek-V3 does) over its members in all lanes, keeps the
``TOPK_GROUP`` best groups (lower group on ties) and clears the other groups'
keys before the sort.

After the selection, per chosen slot: the weight (from the chosen keys, which
hold the logit (packed) or the score (int64, no bias); otherwise from the logit
re-read), the zero-expert masking (``NUM_REAL_EXPERTS < E_ROUTED``), with EPLB
the physical id, then the shared-expert columns. With EPLB each program reads the
replica counts and the map once (``TABLE_REPLICAS``) and gathers each slot's
entries from that copy on chip, instead of two dependent global reads per slot;
where tiles are large, the counts sit beside their reciprocals, so a slot's
replica needs no division (``RECIPROCALS``).
The load is counted into a per-program histogram over the physical experts; each
program adds it with one atomic per touched expert after its last tile (with EPLB
the grid is a few programs per SM), or, for large histograms into an int32 view,
one 64-bit atomic per touched pair of experts (``PAIRED_LOAD``). Programs of
several tiles count into their own counters in a global workspace instead
(``WORKSPACE_COUNTS``), each tile's atomics issued behind the next tile's loads in
the large launch (``DEFERRED_COUNTS``). Programs of one token count each slot
with an atomic (``SLOT_ATOMICS``): a token's experts are distinct, and so are
their replicas, so that too is one atomic per touched expert.

Programs that route one tile (no grid cap: EPLB off) request its logits first
(``ONE_TILE``), ahead of the bias.

Two layouts (``LARGE_*``). The persistent grid (EPLB or counts) leaves few
warps per SM, so from ``large_from_tokens`` on, the kernel routes with a second
layout of fewer experts and more rows per thread, whose independent loads keep
more requests in flight; the choice is made in the kernel from the token count, so
one compiled graph serves every batch size.
A launch shape may also name a next launch (``large_launch``, other warps and
tiles) for larger batches, which may name its own: every launch is in the graph,
and each grid is computed as empty outside its token counts, so one kernel runs
per call. The default EPLB chain has three (decode sizes, middle, large).

float32 rounding of scores is device math: eager on the CPU and on the GPU can
already disagree on which distinct logits tie. Under the interpreter
(``TRITON_INTERPRET=1``, no libdevice) ``PRECISE_MATH=False`` uses numpy's
exp/log, which are also accurate, and the inline assembly gives way to the
Triton operations it stands for.
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
_INLINE_ASM = tl.constexpr(not _INTERPRETING)

_NO_KEY32 = tl.constexpr(-2147483648)
_NO_KEY64 = tl.constexpr(-9223372036854775808)
# A program's workspace counters: one per load bin, then (at LOAD_BINS) the counter
# that slots not counted add to, padded to 128 bytes.
_WORKSPACE_EXTRA = tl.constexpr(32)


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


# ---------------------------------------------------------------- keys
@triton.jit
def _float_key(score, expert, valid):
    """int64 key of a float32 score: its bits in value order, then the inverted expert index."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (0xFFFF - expert).to(tl.int64)
    return tl.where(valid, key, _NO_KEY64)


@triton.jit
def _key_score(key):
    """The float32 score an int64 key holds."""
    ordered = (key >> 32).to(tl.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _ordered_high_half(x_raw):
    """A 16-bit float's bits as a signed integer in value order, in the high half of an
    int32 (low half zero): a negative value's magnitude bits are inverted, so ``-0.0``
    is -1, just below ``+0.0`` (a chosen logit that close to zero is redone anyway)."""
    if _INLINE_ASM:
        # Two values per 32-bit register: the sign of each half replicated over it by
        # one byte permute, one xor, then a shift or a mask per value. The integer
        # operations below compile to 171 more instructions per thread and tile (E=256
        # EPLB large launch, sm_90 under Triton 3.6: 3078 against 2907).
        high = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 sign, ordered;
            prmt.b32 sign, $2, 0, 0xBB99;
            lop3.b32 ordered, $2, sign, 0x7FFF7FFF, 0x78;
            shl.b32 $0, ordered, 16;
            and.b32 $1, ordered, 0xFFFF0000;
            }""",
            constraints="=r,=r,r",
            args=[x_raw],
            dtype=tl.int32,
            is_pure=True,
            pack=2,
        )
    else:
        high = x_raw.to(tl.int16, bitcast=True).to(tl.int32) << 16
        high = high ^ ((high >> 31) & 0x7FFF0000)
    return high


@triton.jit
def _packed_key(x_raw, expert, valid, ALL_VALID: tl.constexpr):
    """int32 key of a 16-bit logit: its value in order (:func:`_ordered_high_half`)
    above the inverted expert index."""
    key = _ordered_high_half(x_raw) + (0xFFFF - expert)
    if not ALL_VALID:
        key = tl.where(valid, key, _NO_KEY32)
    return key


@triton.jit
def _key_expert(key):
    return 0xFFFF - (key & 0xFFFF).to(tl.int32)


# ---------------------------------------------------------------- per-lane sorting
# Sorting networks of fewer comparators than bitonic sort's (4 keys: 5 instead of
# 6; 8 keys: 19 instead of 24), as pairs (i, j): the larger key goes to i.
_SORTING_NETWORKS = {
    4: ((0, 1), (2, 3), (0, 2), (1, 3), (1, 2)),
    8: (
        (0, 2), (1, 3), (4, 6), (5, 7),
        (0, 4), (1, 5), (2, 6), (3, 7),
        (0, 1), (2, 3), (4, 5), (6, 7),
        (2, 4), (3, 5),
        (1, 4), (3, 6),
        (1, 2), (3, 4), (5, 6),
    ),
}  # fmt: skip


@triton.constexpr_function
def _heads_network(width, heads):
    """Steps ``(high, low, exchange)`` that leave the best ``heads`` of ``width`` keys
    in ``keys[:heads]``, descending. A step sets ``keys[high] = max`` of the pair and,
    if ``exchange``, ``keys[low] = min``.

    First each block of ``heads`` keys is sorted descending. Then neighbouring sorted
    blocks merge: the larger of ``a[i]`` and ``b[heads - 1 - i]`` is a bitonic
    sequence holding the best ``heads`` of both, which one bitonic merge sorts.
    """
    steps = []
    for block in range(0, width, heads):
        if heads in _SORTING_NETWORKS:
            steps += [(block + i, block + j, True) for i, j in _SORTING_NETWORKS[heads]]
            continue
        size = 2  # bitonic sort
        while size <= heads:
            stride = size // 2
            while stride > 0:
                for i in range(heads):
                    j = i ^ stride
                    if j > i:
                        high, low = (i, j) if (i & size) == 0 else (j, i)
                        steps.append((block + high, block + low, True))
                stride //= 2
            size *= 2
    span = heads
    while span < width:
        for block in range(0, width, 2 * span):
            for i in range(heads):
                steps.append((block + i, block + span + heads - 1 - i, False))
            steps += [
                (block + high, block + low, True) for high, low, _ in _bitonic_merge_network(heads)
            ]
        span *= 2
    return tuple(steps)


@triton.constexpr_function
def _bitonic_merge_network(width):
    """Steps that sort a bitonic sequence of ``width`` (a power of two) keys descending."""
    steps = []
    stride = width // 2
    while stride > 0:
        steps += [(i, i + stride, True) for i in range(width) if (i & stride) == 0]
        stride //= 2
    return tuple(steps)


@triton.jit
def _apply_network(keys, STEPS: tl.constexpr):
    """Run a compare-exchange network over a tuple of keys.

    Written out on the tuple (no helper calls per compare-exchange), which keeps
    compile time low.
    """
    for p in tl.static_range(len(STEPS)):
        high = tl.maximum(keys[STEPS[p][0]], keys[STEPS[p][1]])
        low = tl.minimum(keys[STEPS[p][0]], keys[STEPS[p][1]])
        exchanged = ()
        for n in tl.static_range(len(keys)):
            if n == STEPS[p][0]:
                exchanged = exchanged + (high,)
            elif n == STEPS[p][1] and STEPS[p][2]:
                exchanged = exchanged + (low,)
            else:
                exchanged = exchanged + (keys[n],)
        keys = exchanged
    return keys


@triton.jit
def _merged(a, b):
    """The best ``len(a)`` keys of two descending tuples, descending: the larger of
    ``a[i]`` and ``b[n-1-i]`` is a bitonic sequence holding them, which one bitonic
    merge sorts."""
    WIDTH: tl.constexpr = len(a)
    larger = ()
    for i in tl.static_range(WIDTH):
        larger = larger + (tl.maximum(a[i], b[WIDTH - 1 - i]),)
    return _apply_network(larger, _bitonic_merge_network(WIDTH))


# Combine functions of the lanes' merge (tl.reduce passes the two sides' keys as
# separate arguments), one per list width.
@triton.jit
def _merge2(a0, a1, b0, b1):
    return _merged((a0, a1), (b0, b1))


@triton.jit
def _merge4(a0, a1, a2, a3, b0, b1, b2, b3):
    return _merged((a0, a1, a2, a3), (b0, b1, b2, b3))


@triton.jit
def _merge8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    return _merged((a0, a1, a2, a3, a4, a5, a6, a7), (b0, b1, b2, b3, b4, b5, b6, b7))


@triton.jit
def _merge16(
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
    b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15,
):  # fmt: skip
    return _merged(
        (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15),
        (b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15),
    )


@triton.jit
def _take_top_k(
    keys,
    TOP_K: tl.constexpr,
    TOP_K_PAD: tl.constexpr,
    HEADS: tl.constexpr,
    NO_KEY: tl.constexpr,
    MERGE_LANES: tl.constexpr,
):
    """The ``TOP_K`` largest keys of each row, descending (``[BLOCK_T, TOP_K_PAD]``, in
    registers; ``NO_KEY`` in the padding), the last of them and the first
    (``[BLOCK_T]`` each). A lane holds a power-of-two number of keys.

    Each lane sorts its best ``HEADS`` keys. With ``MERGE_LANES`` (and ``TOP_K`` up to
    16) the lanes' lists, padded to ``TOP_K_PAD``, then merge in a reduction over the
    lanes: ``log2(LANES)`` levels of one shuffle per key (independent of each other)
    and one merge network; short latency, for launches of few warps. Otherwise
    ``TOP_K`` rounds each take the maximum of the lanes' first keys, and the lane
    that held it drops its first key: fewer instructions, for launches whose many
    warps hide the latency.
    """
    sorted_keys = _apply_network(keys, _heads_network(len(keys), HEADS))
    heads = ()
    for i in tl.static_range(HEADS):
        heads = heads + (sorted_keys[i],)
    slot = tl.arange(0, TOP_K_PAD)[None, :]
    chosen = tl.full([keys[0].shape[0], TOP_K_PAD], NO_KEY, keys[0].dtype)
    if MERGE_LANES and TOP_K_PAD <= 16:
        for _ in tl.static_range(HEADS, TOP_K_PAD):
            heads = heads + (tl.full(keys[0].shape, NO_KEY, keys[0].dtype),)
        if TOP_K_PAD == 1:
            best = (tl.max(heads[0], axis=1),)
        elif TOP_K_PAD == 2:
            best = tl.reduce(heads, 1, _merge2)
        elif TOP_K_PAD == 4:
            best = tl.reduce(heads, 1, _merge4)
        elif TOP_K_PAD == 8:
            best = tl.reduce(heads, 1, _merge8)
        else:
            best = tl.reduce(heads, 1, _merge16)
        for r in tl.static_range(TOP_K):
            chosen = tl.where(slot == r, best[r][:, None], chosen)
        last = best[TOP_K - 1]
        first = best[0]
    else:
        first = tl.max(heads[0], axis=1)
        last = first
        for r in tl.static_range(TOP_K):
            if r > 0:
                last = tl.max(heads[0], axis=1)
            chosen = tl.where(slot == r, last[:, None], chosen)
            if r + 1 < TOP_K:
                popped = heads[0] == last[:, None]
                shifted = ()
                for j in tl.static_range(HEADS):
                    if j + 1 < TOP_K - r:
                        if j + 1 < HEADS:
                            shifted = shifted + (tl.where(popped, heads[j + 1], heads[j]),)
                        else:
                            shifted = shifted + (tl.where(popped, NO_KEY, heads[j]),)
                    else:
                        shifted = shifted + (heads[j],)
                heads = shifted
    return chosen, last, first


@triton.jit
def _exact_softmax_top_k(
    logits_ptr,
    row_offsets,
    is_row,
    stride_e,
    pick_ptrs,
    LANES: tl.constexpr,
    MEMBERS_PER_LANE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TOP_K: tl.constexpr,
    PRECISE_MATH: tl.constexpr,
):
    """Store the packed keys (:func:`_packed_key`) of the experts of the ``TOP_K``
    largest float32 softmax scores of each row, the scores divided as eager divides
    them, in that order. For the rare exact redo: ``TOP_K`` rounds
    that each re-read the logits (cache hits) and recompute every key. Registers are
    allocated for the kernel's worst path, so holding the keys here would cost the
    common path occupancy; the re-read (ordered after the previous round's store)
    also keeps the compiler from hoisting the keys out of the loop. Rows are one
    group here, laid out over ``LANES`` threads of their own (up to a warp), so each
    thread holds few keys."""
    experts = ()
    valid = ()
    for j in tl.static_range(MEMBERS_PER_LANE):
        experts = experts + (j * LANES + tl.arange(0, LANES)[None, :],)
        valid = valid + (experts[j] < GROUP_SIZE,)
    x = _to_float32(
        _load_lanes(
            logits_ptr, row_offsets, is_row, stride_e,
            LANES, MEMBERS_PER_LANE, 1, GROUP_SIZE, MEMBERS_PER_LANE,
        )
    )  # fmt: skip
    row_max = tl.where(valid[0], x[0], float("-inf"))
    for j in tl.static_range(1, len(x)):
        row_max = tl.maximum(row_max, tl.where(valid[j], x[j], float("-inf")))
    row_max = tl.max(row_max, axis=1)[:, None]
    row_sum = tl.zeros_like(x[0])
    for j in tl.static_range(len(x)):
        row_sum += tl.where(valid[j], _exp(x[j] - row_max, PRECISE_MATH), 0.0)
    row_sum = tl.sum(row_sum, axis=1)[:, None]
    # Keys are unique, so the keys below the last one taken are the ones still free.
    taken = tl.full([row_max.shape[0]], 9223372036854775807, tl.int64)
    for r in range(TOP_K):
        x_raw = _load_lanes(
            logits_ptr, row_offsets, is_row, stride_e,
            LANES, MEMBERS_PER_LANE, 1, GROUP_SIZE, MEMBERS_PER_LANE,
        )  # fmt: skip
        x = _to_float32(x_raw)
        lane_best = tl.full(x[0].shape, _NO_KEY64, tl.int64)
        for j in tl.static_range(len(x)):
            score = tl.math.div_rn(_exp(x[j] - row_max, PRECISE_MATH), row_sum)
            key = _float_key(score, experts[j], valid[j])
            lane_best = tl.maximum(lane_best, tl.where(key < taken[:, None], key, _NO_KEY64))
        taken = tl.max(lane_best, axis=1)
        picked = _key_expert(taken)[:, None]
        pick = tl.full(x[0].shape, _NO_KEY32, tl.int32)
        for j in tl.static_range(len(x)):
            key = _packed_key(x_raw[j], experts[j], valid[j], False)
            pick = tl.maximum(pick, tl.where(experts[j] == picked, key, _NO_KEY32))
        tl.store(pick_ptrs + r, tl.max(pick, axis=1), mask=is_row)


# ---------------------------------------------------------------- scores
@triton.jit
def _row_softmax_stats(x, valid, PRECISE_MATH: tl.constexpr):
    """Per entry ``exp(x - row max)`` (0 off the row), and the row's max and sum (``[BLOCK_T]``)."""
    row_max = tl.where(valid[0], x[0], float("-inf"))
    for j in tl.static_range(1, len(x)):
        row_max = tl.maximum(row_max, tl.where(valid[j], x[j], float("-inf")))
    row_max = tl.max(row_max, axis=1)
    numerators = ()
    total = tl.zeros_like(x[0])
    for j in tl.static_range(len(x)):
        numerator = tl.where(valid[j], _exp(x[j] - row_max[:, None], PRECISE_MATH), 0.0)
        numerators = numerators + (numerator,)
        total = total + numerator
    return numerators, row_max, tl.sum(total, axis=1)


@triton.jit
def _keep_best_groups(
    keys,
    MEMBERS_PER_LANE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP2_SCORE: tl.constexpr,
):
    """Clear the keys of all but the ``TOPK_GROUP`` best groups (lower group on ties).

    A group scores its best key's score, plus its second best with ``TOP2_SCORE``.
    """
    scores = ()
    for g in tl.static_range(NUM_GROUPS):
        best = keys[g * MEMBERS_PER_LANE]
        second = tl.full(best.shape, _NO_KEY64, tl.int64)
        for i in tl.static_range(1, MEMBERS_PER_LANE):
            key = keys[g * MEMBERS_PER_LANE + i]
            second = tl.maximum(second, tl.minimum(best, key))
            best = tl.maximum(best, key)
        top1 = tl.max(best, axis=1)
        score = _key_score(top1)
        if TOP2_SCORE:
            # Keys are unique, so only the lane holding top1 offers its second best.
            top2 = tl.max(tl.where(best == top1[:, None], second, best), axis=1)
            score = score + _key_score(top2)
        scores = scores + (score,)
    kept = ()
    for _ in tl.static_range(NUM_GROUPS):
        kept = kept + (tl.zeros(scores[0].shape, tl.int1),)
    for _ in tl.static_range(TOPK_GROUP):
        best_score = tl.where(kept[0], float("-inf"), scores[0])
        for g in tl.static_range(1, NUM_GROUPS):
            best_score = tl.maximum(best_score, tl.where(kept[g], float("-inf"), scores[g]))
        taken = tl.zeros(scores[0].shape, tl.int1)
        new_kept = ()
        for g in tl.static_range(NUM_GROUPS):
            take = (scores[g] == best_score) & ~(kept[g] | taken)
            new_kept = new_kept + (kept[g] | take,)
            taken = taken | take
        kept = new_kept
    out = ()
    for j in tl.static_range(len(keys)):
        if j // MEMBERS_PER_LANE < NUM_GROUPS:
            out = out + (tl.where(kept[j // MEMBERS_PER_LANE][:, None], keys[j], _NO_KEY64),)
        else:
            out = out + (keys[j],)
    return out


@triton.jit
def _selection_keys(
    x,
    numerators,
    row_sum,
    valid,
    experts,
    bias,
    MEMBERS_PER_LANE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    SCORING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISE_MATH: tl.constexpr,
):
    """int64 selection keys: scores (+ bias), grouped routing applied. Softmax
    scores come from the row's ``numerators`` and ``row_sum``, the others from ``x``."""
    keys = ()
    for j in tl.static_range(len(x)):
        if SCORING == 0:
            # Divided even where only the order matters: distinct numerators can
            # round to equal scores, which eager then orders by index.
            score = tl.math.div_rn(numerators[j], row_sum[:, None])
        else:
            score = _elementwise_score(x[j], SCORING, PRECISE_MATH)
        if HAS_BIAS:
            score = score + bias[j]
        keys = keys + (_float_key(score, experts[j], valid[j]),)
    if NUM_GROUPS > 1:
        keys = _keep_best_groups(keys, MEMBERS_PER_LANE, NUM_GROUPS, TOPK_GROUP, HAS_BIAS)
    return keys


@triton.jit
def _packed_suspect(chosen, last, first, LOGITS_DTYPE: tl.constexpr):
    """Rows whose packed choice may differ from the float32 one (see the module doc): a
    chosen logit too near zero for the row's span, a non-finite one (those sort to the
    ends: ``first`` or ``last``), or chosen scores far enough apart to underflow.
    Padding keys hold the largest magnitude, so they never look near zero.

    Eager computes ``exp(x - max)``, and the subtraction rounds to the float32 ulp of
    ``x - max``, which the span bounds. With a span in ``[2**s, 2**(s + 1))`` and every
    chosen logit at least ``2**max(s + MANTISSA - 20, MANTISSA - 18)`` from zero, a
    chosen logit and any other distinct logit are at least twice that ulp and at least
    ``2**-19`` apart, which leaves more than ``2**-20`` after the subtraction rounds:
    more than exp's error (2 ulps) and the division's rounding can close, so their
    scores stay distinct and in order. Spans from 64 give ``2**-7`` (bf16) and ``2**-4``
    (fp16), and spans below 8 a bound 16 times lower. (On the CPU, eager's first ties
    lie 8 times below the bound.)"""
    if LOGITS_DTYPE == tl.bfloat16:
        MANTISSA: tl.constexpr = 7
        EXPONENT_BIAS: tl.constexpr = 127
        HUGE: tl.constexpr = 0x7F80  # inf
    else:
        MANTISSA: tl.constexpr = 10
        EXPONENT_BIAS: tl.constexpr = 15
        HUGE: tl.constexpr = 0x7C00
    high = first >> 16
    low = last >> 16
    not_finite = (_magnitude_bits(high) >= HUGE) | (_magnitude_bits(low) >= HUGE)
    span = _ordered_to_float(high, LOGITS_DTYPE) - _ordered_to_float(low, LOGITS_DTYPE)
    # floor(log2(span)) from its float32 exponent field (a span of 0 gives -127)
    span_exponent = ((span.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    tiny_exponent = tl.maximum(span_exponent + MANTISSA - 20, MANTISSA - 18)
    tiny = (tiny_exponent + EXPONENT_BIAS) << MANTISSA
    near_zero = tl.min(_magnitude_bits(chosen >> 16), axis=1) < tiny
    return near_zero | not_finite | (span > 80.0)


@triton.jit
def _magnitude_bits(ordered):
    """A 16-bit float's magnitude bits from its ordered form (:func:`_ordered_high_half`,
    shifted down), where a negative value's are inverted."""
    return ordered ^ (ordered >> 31)


@triton.jit
def _ordered_to_float(ordered, LOGITS_DTYPE: tl.constexpr):
    """Inverse of :func:`_packed_key`'s map of 16-bit float bits to ordered integers."""
    bits = ordered ^ ((ordered >> 15) & 0x7FFF)
    return bits.to(tl.int16).to(LOGITS_DTYPE, bitcast=True).to(tl.float32)


@triton.constexpr_function
def _bit_reversed(index, width):
    bits = width.bit_length() - 1
    return int(format(index, f"0{bits}b")[::-1], 2) if bits else 0


@triton.jit
def _load_lanes(
    ptr,
    row_offsets,
    is_row,
    stride_e,
    LANES: tl.constexpr,
    MEMBERS_PER_LANE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    WIDTH: tl.constexpr,
):
    """Rows of experts in the lane layout: a tuple of ``WIDTH`` tensors ``[rows, LANES]``.

    One load of the whole tile, split into the tuple: one memory operation instead
    of ``WIDTH`` keeps Triton's coalescing analysis (quadratic in the kernel's
    memory operations) from dominating compile time.
    """
    entry = tl.arange(0, WIDTH)[None, :, None]
    lane = tl.arange(0, LANES)[None, None, :]
    member = (entry % MEMBERS_PER_LANE) * LANES + lane
    group = entry // MEMBERS_PER_LANE
    valid = (group < NUM_GROUPS) & (member < GROUP_SIZE)
    tile = tl.load(
        ptr + row_offsets[:, :, None] + (group * GROUP_SIZE + member) * stride_e,
        mask=is_row[:, None, None] & valid,
        other=0.0,
    )
    ROWS: tl.constexpr = tile.shape[0]
    parts = (tl.permute(tile, (0, 2, 1)),)
    for _ in tl.static_range(10):
        if len(parts) < WIDTH:
            halves = ()
            for p in tl.static_range(len(parts)):
                even, odd = tl.split(tl.reshape(parts[p], [ROWS, LANES, parts[p].shape[2] // 2, 2]))
                halves = halves + (even, odd)
            parts = halves
    # Halving by parity leaves entry j at the bit-reversed position.
    out = ()
    for j in tl.static_range(WIDTH):
        out = out + (tl.reshape(parts[_bit_reversed(j, WIDTH)], [ROWS, LANES]),)
    return out


@triton.jit
def _to_float32(x_raw):
    x = ()
    for j in tl.static_range(len(x_raw)):
        x = x + (x_raw[j].to(tl.float32),)
    return x


# ---------------------------------------------------------------- expert counts
@triton.jit
def _bin_counts(ids, mask, num_bins, BINS: tl.constexpr):
    """Histogram of the ids in ``[0, num_bins)`` (others go to the spare bin ``num_bins``)."""
    inside = mask & (ids >= 0) & (ids < num_bins)
    bins = tl.where(inside, ids, num_bins).to(tl.int32)
    return tl.histogram(tl.reshape(bins, [bins.shape[0] * bins.shape[1]]), BINS)


@triton.jit
def _add_counts_then_offsets(
    counts_ptr, offsets_ptr, expert_counts, num_bins, num_programs, BINS: tl.constexpr
):
    """Add this program's counts; the last program to finish writes the offsets.

    ``offsets[0]`` starts at zero and serves as the ticket counter: each program
    takes a ticket after its counts are added (release), so the one holding the
    last ticket sees every count (acquire) and writes the exclusive prefix sums,
    ``offsets[0] = 0`` last. One launch, no host sync, no second pass over the ids.
    """
    bins = tl.arange(0, BINS)
    tl.atomic_add(
        counts_ptr + bins,
        expert_counts,
        mask=(bins < num_bins) & (expert_counts > 0),
        sem="relaxed",
    )
    tl.debug_barrier()  # every thread's counts are added before the ticket
    ticket = tl.atomic_add(offsets_ptr, 1, sem="acq_rel")
    if ticket == num_programs - 1:
        # Read at the L2 (an atomic that adds nothing): the other programs' counts.
        totals = tl.atomic_add(counts_ptr + bins, 0, mask=bins < num_bins, sem="relaxed")
        totals = tl.where(bins < num_bins, totals, 0)
        tl.store(offsets_ptr + 1 + bins, tl.cumsum(totals, axis=0), mask=bins < num_bins)
        tl.store(offsets_ptr, 0)


@triton.jit
def _add_load(
    load_ptr,
    stride_load,
    load_counts,
    num_physical,
    counters_before,
    LOAD_BINS: tl.constexpr,
    PAIRED: tl.constexpr,
):
    """Add a program's load histogram to the int32 (or int64, float32) load view: one
    atomic per touched expert, or, ``PAIRED`` and into a contiguous, 8-byte aligned
    int32 view, one 64-bit atomic per touched pair of experts (see
    ``RouteKernelConfig.paired_load_from_bins``).

    A pair's low count would carry into its high one where the low counter passed
    2**32 - 1. ``counters_before``, the view as the program read it before routing,
    rules that out: counters only grow while the kernel runs, by at most one per
    routed slot, so from non-negative int32 values and fewer than 2**31 slots none
    passes 2**32 - 1. Otherwise (a counter already wrapped) every expert gets its own
    atomic, so each counter ends as int32 addition leaves it."""
    bin_ids = tl.arange(0, LOAD_BINS)
    singles_from = 0
    if PAIRED:
        no_carry = tl.min(counters_before, axis=0) >= 0
        if no_carry & (stride_load == 1) & (load_ptr.to(tl.int64) % 8 == 0):
            low, high = tl.split(tl.reshape(load_counts, [LOAD_BINS // 2, 2]))
            pair = tl.arange(0, LOAD_BINS // 2)
            tl.atomic_add(
                load_ptr.to(tl.pointer_type(tl.int64)) + pair,
                (high.to(tl.int64) << 32) | low.to(tl.int64),
                mask=(2 * pair + 1 < num_physical) & ((low | high) != 0),
                sem="relaxed",
            )
            singles_from = num_physical - num_physical % 2  # an odd count's last expert
    tl.atomic_add(
        load_ptr + bin_ids * stride_load,
        load_counts.to(load_ptr.dtype.element_ty),
        mask=(bin_ids >= singles_from) & (bin_ids < num_physical) & (load_counts > 0),
        sem="relaxed",
    )


@triton.jit
def _remainder(n, divisor, reciprocal, RECIPROCALS: tl.constexpr):
    """``n % divisor`` for uint32 operands. With ``RECIPROCALS``, from ``reciprocal =
    (2**32 - 1) // divisor``: the quotient it gives is short by at most one, which one
    compare fixes, where a remainder is a long subroutine."""
    if not RECIPROCALS:
        return n % divisor
    remainder = n - tl.umulhi(n, reciprocal) * divisor
    return tl.where(remainder >= divisor, remainder - divisor, remainder)


@triton.jit
def _add_one_each(counters, index):
    """``counters[index] += 1`` for every element: a program's own workspace counters,
    whose atomics nothing waits for."""
    tl.atomic_add(counters + index, tl.full(index.shape, 1, tl.int32), sem="relaxed")


@triton.jit
def _gather_slots(table, index):
    """``table[index]`` for a 1-D on-chip table and a 2-D index (``tl.gather`` wants
    equal ranks)."""
    flat = tl.reshape(index, [index.shape[0] * index.shape[1]])
    return tl.reshape(tl.gather(table, flat, 0), [index.shape[0], index.shape[1]])


# ---------------------------------------------------------------- the kernel
@triton.jit
def _route_tiles(
    logits_ptr,
    stride_logits_t,
    stride_logits_e,
    bias_ptr,
    stride_bias,
    weights_ptr,
    ids_ptr,
    l2p_ptr,
    stride_l2p_e,
    stride_l2p_s,
    replica_count_ptr,
    stride_replica_count,
    load_ptr,
    stride_load,
    record_ptr,
    unpadded_ptr,
    counts_ptr,
    offsets_ptr,
    zero_weight_ptr,
    workspace_ptr,
    num_tokens,
    num_physical,
    num_count_bins,
    max_replicas,
    routed_scaling_factor,
    E_ROUTED: tl.constexpr,
    NUM_REAL_EXPERTS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    LANES: tl.constexpr,
    MEMBERS_PER_LANE: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_K_PAD: tl.constexpr,
    OUT_WIDTH: tl.constexpr,
    HEADS: tl.constexpr,
    SORT_WIDTH: tl.constexpr,
    N_SHARED: tl.constexpr,
    N_SHARED_PAD: tl.constexpr,
    SCORING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_EPLB: tl.constexpr,
    TOKEN_HASH: tl.constexpr,
    HAS_UNPADDED: tl.constexpr,
    LOAD_BINS: tl.constexpr,
    COUNT_BINS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    REDO_T: tl.constexpr,
    REDO_LANES: tl.constexpr,
    REDO_MEMBERS_PER_LANE: tl.constexpr,
    PACKED_TOP_K: tl.constexpr,
    PRECISE_MATH: tl.constexpr,
    SLOT_ATOMICS: tl.constexpr,
    TABLE_EXPERTS: tl.constexpr,
    TABLE_REPLICAS: tl.constexpr,
    WORKSPACE_COUNTS: tl.constexpr,
    DEFERRED_COUNTS: tl.constexpr,
    ONE_TILE: tl.constexpr,
    load_counts,
    expert_counts,
):
    """Route this program's tiles of ``BLOCK_T`` tokens, adding to its load and expert
    histograms; the launch shape's layout constexprs are parameters so that one
    kernel can hold two layouts."""
    CHUNK: tl.constexpr = NUM_GROUPS * MEMBERS_PER_LANE
    # Every entry of the lane layout is an expert (power-of-two groups filling it):
    # the keys need no mask.
    ALL_VALID: tl.constexpr = LANES * MEMBERS_PER_LANE == GROUP_SIZE and CHUNK == SORT_WIDTH
    # Packed keys: softmax weights renormalized over the chosen experts need neither
    # the row's sum (it cancels) nor its max (the first chosen logit is the max).
    CHOSEN_ONLY_WEIGHTS: tl.constexpr = (
        SCORING == 0 and RENORMALIZE and not HAS_BIAS and NUM_GROUPS == 1
    )
    # Per-slot remainders by the replica counts from reciprocals kept in the table: a
    # division per expert per program, which pays where a tile has several slots per
    # expert (H100, E=256, with the spare counter below: 31.7 -> 30.8 and 31.8 -> 31.1
    # us at 65536 tokens on two boxes; the one-token programs, whose table costs eight
    # divisions per thread, lost 0.2 us).
    RECIPROCALS: tl.constexpr = TABLE_REPLICAS > 0 and BLOCK_T * TOP_K >= 4 * TABLE_EXPERTS
    # When it counts (EPLB, counts) the launcher caps the grid at a few programs per SM
    # or gives each token a one-warp program: latency rather than issue limits either.
    PERSISTENT: tl.constexpr = HAS_EPLB or COUNT_BINS > 0
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(num_tokens, BLOCK_T)
    picks_ptr = weights_ptr.to(tl.pointer_type(tl.int32))
    if ONE_TILE:
        # The program's only tile's logits, requested before the bias (and any other
        # read the tile waits for). H100, same run, EPLB off: E=256 26.56 -> 25.11 us
        # at 65536 tokens, 9.26 -> 9.07 at 16384; in the capped EPLB launches it lost
        # (10.72 -> 10.86 at 12288), and the one-token EPLB programs lost 0.02 us at
        # one token (2.82 -> 2.84) for as little gained from 128 tokens on, so those
        # launches load in the loop.
        first_token = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        first_x_raw = _load_lanes(
            logits_ptr, first_token.to(tl.int64)[:, None] * stride_logits_t,
            first_token < num_tokens, stride_logits_e,
            LANES, MEMBERS_PER_LANE, NUM_GROUPS, GROUP_SIZE, SORT_WIDTH,
        )  # fmt: skip

    lane = tl.arange(0, LANES)[None, :]
    experts = ()
    valid = ()
    for j in tl.static_range(SORT_WIDTH):
        member = (j % MEMBERS_PER_LANE) * LANES + lane
        experts = experts + ((j // MEMBERS_PER_LANE) * GROUP_SIZE + member,)
        valid = valid + ((member < GROUP_SIZE) & (j < CHUNK),)
    bias = valid  # never read without HAS_BIAS
    if HAS_BIAS:
        bias = _to_float32(
            _load_lanes(
                bias_ptr, tl.zeros([1, 1], tl.int64), tl.full([1], True, tl.int1), stride_bias,
                LANES, MEMBERS_PER_LANE, NUM_GROUPS, GROUP_SIZE, SORT_WIDTH,
            )
        )  # fmt: skip
    slot = tl.arange(0, TOP_K_PAD)[None, :]
    is_slot = slot < TOP_K
    if HAS_EPLB:
        record_on = tl.load(record_ptr) != 0
        if HAS_UNPADDED:
            counted_slots = tl.load(unpadded_ptr).to(tl.int64) * TOP_K
        if TABLE_REPLICAS > 0:
            # The replica counts and the map, read once per program: each slot then
            # gathers from them on chip instead of two dependent global reads. The
            # map has a row per real expert (zero experts are never remapped).
            table_expert = tl.arange(0, TABLE_EXPERTS)
            replica_table = tl.load(
                replica_count_ptr + table_expert * stride_replica_count,
                mask=table_expert < NUM_REAL_EXPERTS,
                other=1,
            ).to(tl.int32)
            if RECIPROCALS:
                # Each count, clamped, beside its reciprocal in one entry: one gather per slot.
                replica_table = tl.minimum(tl.maximum(replica_table, 1), max_replicas).to(tl.uint32)
                count_reciprocal = (
                    tl.full(replica_table.shape, 0xFFFFFFFF, tl.uint32) // replica_table
                )
                replica_table = (count_reciprocal.to(tl.uint64) << 32) | replica_table.to(tl.uint64)
            entry = tl.arange(0, TABLE_EXPERTS * TABLE_REPLICAS)
            entry_expert = entry // TABLE_REPLICAS
            entry_replica = entry % TABLE_REPLICAS
            map_table = tl.load(
                l2p_ptr + entry_expert * stride_l2p_e + entry_replica * stride_l2p_s,
                mask=(entry_expert < NUM_REAL_EXPERTS) & (entry_replica < max_replicas),
                other=-1,
            )

    if WORKSPACE_COUNTS and HAS_EPLB:
        # Only programs of several tiles count in the workspace: zeroing the counters
        # and reading them back cost more than one tile's histogram.
        use_workspace = num_tiles > num_programs
        own_counters = workspace_ptr + pid * (LOAD_BINS + _WORKSPACE_EXTRA)
        if use_workspace:
            tl.store(own_counters + tl.arange(0, LOAD_BINS), tl.zeros_like(load_counts))
            tl.debug_barrier()  # zeroed before any thread of the program adds to them
        if DEFERRED_COUNTS:
            pending = tl.full([BLOCK_T, TOP_K_PAD], LOAD_BINS, tl.int32)

    for tile in range(pid, num_tiles, num_programs):
        token = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        is_token = token < num_tokens
        token2 = token.to(tl.int64)[:, None]
        out_mask = is_token[:, None] & is_slot
        if ONE_TILE:
            x_raw = first_x_raw
        else:
            x_raw = _load_lanes(
                logits_ptr, token2 * stride_logits_t, is_token, stride_logits_e,
                LANES, MEMBERS_PER_LANE, NUM_GROUPS, GROUP_SIZE, SORT_WIDTH,
            )  # fmt: skip
        if WORKSPACE_COUNTS and HAS_EPLB and DEFERRED_COUNTS:
            if use_workspace and record_on and tile != pid:
                # The previous tile's counts, behind this tile's loads (see
                # RouteKernelConfig.deferred_counts).
                _add_one_each(own_counters, pending)

        # ---- selection
        if PACKED_TOP_K:
            keys = ()
            for j in tl.static_range(SORT_WIDTH):
                keys = keys + (_packed_key(x_raw[j], experts[j], valid[j], ALL_VALID),)
            chosen, last, first = _take_top_k(keys, TOP_K, TOP_K_PAD, HEADS, _NO_KEY32, PERSISTENT)
            suspect = _packed_suspect(chosen, last, first, logits_ptr.dtype.element_ty)
            if not CHOSEN_ONLY_WEIGHTS:
                x = _to_float32(x_raw)
                numerators, row_max, row_sum = _row_softmax_stats(x, valid, PRECISE_MATH)
            suspect_rows = tl.sum((suspect & is_token).to(tl.int32), axis=0)
            if suspect_rows > 0:
                # Redo in sub-tiles of one row per warp, re-reading the logits (cache
                # hits): fewer live registers. The exact picks' keys pass through the
                # weights buffer, which the weights overwrite only after a barrier.
                # They are merged by a select rather than rebound here: a value bound
                # in one branch of a runtime if makes Triton pick one layout for both,
                # which doubled the common path's code.
                for first_row in range(0, BLOCK_T, REDO_T):
                    row = tile * BLOCK_T + first_row + tl.arange(0, REDO_T)
                    is_row = row < num_tokens
                    _exact_softmax_top_k(
                        logits_ptr, row.to(tl.int64)[:, None] * stride_logits_t, is_row,
                        stride_logits_e, picks_ptr + row.to(tl.int64) * OUT_WIDTH,
                        REDO_LANES, REDO_MEMBERS_PER_LANE, GROUP_SIZE, TOP_K, PRECISE_MATH,
                    )  # fmt: skip
                tl.debug_barrier()
            # (broadcast: the interpreter rejects a mask combined with a scalar)
            redone = out_mask & (tl.broadcast_to(suspect_rows, out_mask.shape) > 0)
            exact = tl.load(picks_ptr + token2 * OUT_WIDTH + slot, mask=redone, other=0)
            chosen = tl.where(redone, exact, chosen)
            logical = _key_expert(chosen)
            if suspect_rows > 0:
                tl.debug_barrier()
        else:
            x = _to_float32(x_raw)
            numerators, row_sum = x, token  # read only for softmax
            if SCORING == 0:
                numerators, row_max, row_sum = _row_softmax_stats(x, valid, PRECISE_MATH)
            keys = _selection_keys(
                x, numerators, row_sum, valid, experts, bias, MEMBERS_PER_LANE,
                NUM_GROUPS, TOPK_GROUP, SCORING, HAS_BIAS, PRECISE_MATH,
            )  # fmt: skip
            chosen, _, _ = _take_top_k(keys, TOP_K, TOP_K_PAD, HEADS, _NO_KEY64, False)
            logical = _key_expert(chosen)

        # A pick of a cleared key (never with valid options) must still name a real expert.
        logical = tl.minimum(tl.maximum(logical, 0), E_ROUTED - 1)

        # ---- weights: the unbiased scores at the chosen ids
        if PACKED_TOP_K:
            # The packed keys hold the chosen logits (the exact redo's keys too).
            x_chosen = _ordered_to_float(chosen >> 16, logits_ptr.dtype.element_ty)
        elif HAS_BIAS:
            # The keys hold biased scores: the weights come from the logits re-read.
            chosen_logits = logits_ptr + token2 * stride_logits_t + logical * stride_logits_e
            x_chosen = tl.load(chosen_logits, mask=out_mask, other=0.0).to(tl.float32)
        if not (PACKED_TOP_K or HAS_BIAS):
            # int64 keys without a bias hold the scores themselves, rounded as eager's.
            weight = _key_score(chosen)
        elif PACKED_TOP_K and CHOSEN_ONLY_WEIGHTS:
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
        if NUM_REAL_EXPERTS < E_ROUTED:
            # Zero experts: their weight goes to a per-token output, the slot to
            # expert 0 with weight 0, before the remap (ZeroExpertRouter's order).
            is_zero_expert = logical >= NUM_REAL_EXPERTS
            zero_weight = tl.sum(tl.where(is_zero_expert, weight, 0.0), axis=1)
            tl.store(zero_weight_ptr + token, zero_weight, mask=is_token)
            weight = tl.where(is_zero_expert, 0.0, weight)
            logical = tl.where(is_zero_expert, 0, logical)
        tl.store(weights_ptr + token2 * OUT_WIDTH + slot, weight, mask=out_mask)

        # ---- EPLB: logical -> physical, and the per-program load histogram
        if HAS_EPLB:
            # 32-bit replica arithmetic: 64-bit division is a long subroutine.
            if RECIPROCALS:
                replica_entry = _gather_slots(replica_table, logical)
                replicas = (replica_entry & 0xFFFFFFFF).to(tl.uint32)
                reciprocal = (replica_entry >> 32).to(tl.uint32)
            else:
                if TABLE_REPLICAS > 0:
                    replicas = _gather_slots(replica_table, logical)
                else:
                    replicas = tl.load(
                        replica_count_ptr + logical * stride_replica_count, mask=out_mask, other=1
                    ).to(tl.int32)
                replicas = tl.minimum(tl.maximum(replicas, 1), max_replicas).to(tl.uint32)
                reciprocal = replicas  # not read
            flat_slot = token2 * TOP_K + slot
            if TOKEN_HASH:
                # (token * 2654435769) mod 2**32, as an unsigned 32-bit product wraps.
                hashed = token2.to(tl.uint32) * 2654435769
                replica = _remainder(hashed, replicas, reciprocal, RECIPROCALS).to(tl.int32)
            elif tile < 2147483647 // (BLOCK_T * TOP_K):  # flat_slot fits in int32
                flat_slot32 = flat_slot.to(tl.uint32)
                replica = _remainder(flat_slot32, replicas, reciprocal, RECIPROCALS).to(tl.int32)
            else:
                replica = (flat_slot % replicas.to(tl.int64)).to(tl.int32)
            if TABLE_REPLICAS > 0:
                slot_entry = logical * TABLE_REPLICAS + replica
                physical = _gather_slots(map_table, slot_entry).to(tl.int64)
            else:
                physical = tl.load(
                    l2p_ptr + logical * stride_l2p_e + replica * stride_l2p_s,
                    mask=out_mask,
                    other=-1,
                ).to(tl.int64)
            counted = out_mask & record_on & (physical >= 0) & (physical < num_physical)
            if HAS_UNPADDED:
                counted = counted & (flat_slot < counted_slots)
            if SLOT_ATOMICS:
                # One token per program (decode sizes): its slots name distinct
                # experts, so an atomic each is the histogram's flush without the
                # histogram.
                tl.atomic_add(
                    load_ptr + physical * stride_load,
                    tl.full(physical.shape, 1, load_ptr.dtype.element_ty),
                    mask=counted.to(tl.int32) != 0,  # (the interpreter rejects a broadcast mask)
                    sem="relaxed",
                )
            elif WORKSPACE_COUNTS and use_workspace:
                # The program's own counters in global memory: an atomic per slot that
                # waits for nothing and contends with no other program, instead of the
                # histogram's ballots (19% of the large launch's stall samples, H200).
                # Slots not counted add to a spare counter rather than being masked:
                # the mask's layout change cost two barriers per tile (H100, E=256,
                # 65536 tokens: 31.3 -> 30.8 us with the reciprocals, but 31.7 -> 33.0
                # without them, same run: ptxas schedules the two differently).
                counter = tl.where(counted, physical, LOAD_BINS).to(tl.int32)
                if DEFERRED_COUNTS:
                    pending = counter  # added in the next iteration
                elif record_on:  # (else every slot would add to the spare counter)
                    _add_one_each(own_counters, counter)
            else:
                load_counts += tl.histogram(
                    tl.reshape(tl.where(counted, physical, 0).to(tl.int32), [BLOCK_T * TOP_K_PAD]),
                    LOAD_BINS,
                    mask=tl.reshape(counted, [BLOCK_T * TOP_K_PAD]),
                )
            out_ids = physical
        else:
            out_ids = logical
        tl.store(
            ids_ptr + token2 * OUT_WIDTH + slot,
            out_ids.to(ids_ptr.dtype.element_ty),
            mask=out_mask,
        )
        if COUNT_BINS > 0:
            expert_counts += _bin_counts(out_ids, out_mask, num_count_bins, COUNT_BINS)

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
                weights_ptr + token2 * OUT_WIDTH + TOP_K + shared,
                _elementwise_score(x_shared, 1, PRECISE_MATH),
                mask=shared_mask,
            )
            shared_ids = tl.broadcast_to(E_ROUTED + shared, [BLOCK_T, N_SHARED_PAD])
            tl.store(
                ids_ptr + token2 * OUT_WIDTH + TOP_K + shared,
                shared_ids.to(ids_ptr.dtype.element_ty),
                mask=shared_mask,
            )
            if COUNT_BINS > 0:
                expert_counts += _bin_counts(shared_ids, shared_mask, num_count_bins, COUNT_BINS)
    if WORKSPACE_COUNTS and HAS_EPLB:
        if use_workspace:
            if DEFERRED_COUNTS and record_on:  # the last tile's counts
                _add_one_each(own_counters, pending)
            tl.debug_barrier()  # every thread's additions are done
            load_counts += tl.load(own_counters + tl.arange(0, LOAD_BINS), volatile=True)
    return load_counts, expert_counts


@triton.jit(do_not_specialize=["num_tokens", "large_from_tokens"])
def _route_kernel(
    logits_ptr,
    stride_logits_t,
    stride_logits_e,
    bias_ptr,
    stride_bias,
    weights_ptr,
    ids_ptr,
    l2p_ptr,
    stride_l2p_e,
    stride_l2p_s,
    replica_count_ptr,
    stride_replica_count,
    load_ptr,
    stride_load,
    record_ptr,
    unpadded_ptr,
    counts_ptr,
    offsets_ptr,
    zero_weight_ptr,
    workspace_ptr,
    num_tokens,
    num_physical,
    num_count_bins,
    max_replicas,
    routed_scaling_factor,
    E_ROUTED: tl.constexpr,
    NUM_REAL_EXPERTS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    LANES: tl.constexpr,
    MEMBERS_PER_LANE: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_K_PAD: tl.constexpr,
    OUT_WIDTH: tl.constexpr,
    HEADS: tl.constexpr,
    SORT_WIDTH: tl.constexpr,
    N_SHARED: tl.constexpr,
    N_SHARED_PAD: tl.constexpr,
    SCORING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_EPLB: tl.constexpr,
    TOKEN_HASH: tl.constexpr,
    HAS_UNPADDED: tl.constexpr,
    LOAD_BINS: tl.constexpr,
    COUNT_BINS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    REDO_T: tl.constexpr,
    REDO_LANES: tl.constexpr,
    REDO_MEMBERS_PER_LANE: tl.constexpr,
    PACKED_TOP_K: tl.constexpr,
    PRECISE_MATH: tl.constexpr,
    large_from_tokens,
    LARGE_BLOCK_T: tl.constexpr,
    LARGE_LANES: tl.constexpr,
    LARGE_MEMBERS_PER_LANE: tl.constexpr,
    LARGE_HEADS: tl.constexpr,
    LARGE_SORT_WIDTH: tl.constexpr,
    LARGE_REDO_T: tl.constexpr,
    SLOT_ATOMICS: tl.constexpr,
    TABLE_EXPERTS: tl.constexpr,
    TABLE_REPLICAS: tl.constexpr,
    WORKSPACE_COUNTS: tl.constexpr,
    DEFERRED_COUNTS: tl.constexpr,
    ONE_TILE: tl.constexpr,
    PAIRED_LOAD: tl.constexpr,
):
    load_counts = tl.zeros([LOAD_BINS], dtype=tl.int32)
    expert_counts = tl.zeros([COUNT_BINS if COUNT_BINS > 0 else 1], dtype=tl.int32)
    counters_before = load_counts  # (read only with PAIRED_LOAD)
    if HAS_EPLB and PAIRED_LOAD:
        # Read now, used after routing (see _add_load): the read's latency is hidden.
        bins = tl.arange(0, LOAD_BINS)
        counters_before = tl.load(load_ptr + bins * stride_load, mask=bins < num_physical, other=0)
        if num_tokens.to(tl.int64) * TOP_K >= 2**31:
            counters_before = tl.full([LOAD_BINS], -1, tl.int32)
    if LARGE_BLOCK_T > 0:
        # Large batches take the large-tile layout (more rows per thread, so more
        # loads in flight per warp); decode-sized ones keep the small-tile one.
        if num_tokens >= large_from_tokens:
            load_counts, expert_counts = _route_tiles(
                logits_ptr, stride_logits_t, stride_logits_e, bias_ptr, stride_bias, weights_ptr,
                ids_ptr, l2p_ptr, stride_l2p_e, stride_l2p_s, replica_count_ptr,
                stride_replica_count, load_ptr, stride_load, record_ptr, unpadded_ptr, counts_ptr,
                offsets_ptr, zero_weight_ptr, workspace_ptr, num_tokens, num_physical,
                num_count_bins, max_replicas, routed_scaling_factor, E_ROUTED, NUM_REAL_EXPERTS,
                NUM_GROUPS, GROUP_SIZE, LARGE_LANES, LARGE_MEMBERS_PER_LANE, TOPK_GROUP, TOP_K,
                TOP_K_PAD, OUT_WIDTH, LARGE_HEADS, LARGE_SORT_WIDTH, N_SHARED, N_SHARED_PAD,
                SCORING, HAS_BIAS, RENORMALIZE, HAS_EPLB, TOKEN_HASH, HAS_UNPADDED, LOAD_BINS,
                COUNT_BINS, LARGE_BLOCK_T, LARGE_REDO_T, REDO_LANES, REDO_MEMBERS_PER_LANE,
                PACKED_TOP_K, PRECISE_MATH, False, TABLE_EXPERTS, TABLE_REPLICAS, WORKSPACE_COUNTS,
                DEFERRED_COUNTS, ONE_TILE, load_counts, expert_counts
            )  # fmt: skip
        else:
            load_counts, expert_counts = _route_tiles(
                logits_ptr, stride_logits_t, stride_logits_e, bias_ptr, stride_bias, weights_ptr,
                ids_ptr, l2p_ptr, stride_l2p_e, stride_l2p_s, replica_count_ptr,
                stride_replica_count, load_ptr, stride_load, record_ptr, unpadded_ptr, counts_ptr,
                offsets_ptr, zero_weight_ptr, workspace_ptr, num_tokens, num_physical,
                num_count_bins, max_replicas, routed_scaling_factor, E_ROUTED, NUM_REAL_EXPERTS,
                NUM_GROUPS, GROUP_SIZE, LANES, MEMBERS_PER_LANE, TOPK_GROUP, TOP_K, TOP_K_PAD,
                OUT_WIDTH, HEADS, SORT_WIDTH, N_SHARED, N_SHARED_PAD, SCORING, HAS_BIAS,
                RENORMALIZE, HAS_EPLB, TOKEN_HASH, HAS_UNPADDED, LOAD_BINS, COUNT_BINS, BLOCK_T,
                REDO_T, REDO_LANES, REDO_MEMBERS_PER_LANE, PACKED_TOP_K, PRECISE_MATH, SLOT_ATOMICS,
                TABLE_EXPERTS, TABLE_REPLICAS, WORKSPACE_COUNTS, DEFERRED_COUNTS, ONE_TILE,
                load_counts, expert_counts
            )  # fmt: skip
    else:
        load_counts, expert_counts = _route_tiles(
            logits_ptr, stride_logits_t, stride_logits_e, bias_ptr, stride_bias, weights_ptr,
            ids_ptr, l2p_ptr, stride_l2p_e, stride_l2p_s, replica_count_ptr, stride_replica_count,
            load_ptr, stride_load, record_ptr, unpadded_ptr, counts_ptr, offsets_ptr,
            zero_weight_ptr, workspace_ptr, num_tokens, num_physical, num_count_bins, max_replicas,
            routed_scaling_factor, E_ROUTED, NUM_REAL_EXPERTS, NUM_GROUPS, GROUP_SIZE, LANES,
            MEMBERS_PER_LANE, TOPK_GROUP, TOP_K, TOP_K_PAD, OUT_WIDTH, HEADS, SORT_WIDTH, N_SHARED,
            N_SHARED_PAD, SCORING, HAS_BIAS, RENORMALIZE, HAS_EPLB, TOKEN_HASH, HAS_UNPADDED,
            LOAD_BINS, COUNT_BINS, BLOCK_T, REDO_T, REDO_LANES, REDO_MEMBERS_PER_LANE,
            PACKED_TOP_K, PRECISE_MATH, SLOT_ATOMICS, TABLE_EXPERTS, TABLE_REPLICAS,
            WORKSPACE_COUNTS, DEFERRED_COUNTS, ONE_TILE, load_counts, expert_counts
        )  # fmt: skip
    num_programs = tl.num_programs(0)
    if HAS_EPLB and not SLOT_ATOMICS:  # (the launcher gives per-slot atomics one layout)
        _add_load(
            load_ptr,
            stride_load,
            load_counts,
            num_physical,
            counters_before,
            LOAD_BINS,
            PAIRED_LOAD,
        )
    if COUNT_BINS > 0:
        _add_counts_then_offsets(
            counts_ptr, offsets_ptr, expert_counts, num_count_bins, num_programs, COUNT_BINS
        )


# ---------------------------------------------------------------- launch
@dataclass(frozen=True)
class RouteKernelConfig:
    """Launch shape: tokens per tile, warps, experts per lane, and (persistent grid: EPLB
    or counts) programs per SM, with an optional second layout and second launch for
    large batches."""

    block_tokens: int
    num_warps: int
    programs_per_sm: int = 2
    """With EPLB or counts, the grid's cap: each program flushes its histograms once
    (a program per tile took 130 us at 65536 tokens, E=256, with the flushes contending).
    0: no cap, a program per tile."""
    packed_top_k: bool = True
    """Allow the packed-key top-k for 16-bit softmax logits (exact fallback per tile)."""
    lane_experts: int = 32
    """Experts each thread holds of a row (fewer if a group is narrower than a warp)."""
    large_block_tokens: int = 0
    """A second layout for batches of ``large_from_tokens`` or more (0: none), chosen
    in the kernel from the token count, so one compiled graph serves every batch size."""
    large_lane_experts: int = 16
    large_from_tokens: int = 3072
    large_launch: RouteKernelConfig | None = None
    """A second launch (its own warps and grid) for batches of ``large_launch_from_tokens``
    or more. Each launch's grid is empty outside its token counts, so one of the two
    runs, and the choice is arithmetic on the token count (no guard, one graph)."""
    large_launch_from_tokens: int = 8192
    slot_atomics: bool = False
    """Count the load with an atomic per slot rather than a histogram, where each
    program routes one token, whose slots name distinct experts: one-token tiles, one
    layout, no zero experts (their slots all become expert 0), and no grid cap or a
    next launch from at most as many tokens as the cap. Elsewhere the histogram counts."""
    table_entries: int = 1024
    """EPLB: each program gathers the replica counts and the map from its own copy when
    the map (padded to powers of two) has at most this many entries (0: never)."""
    workspace_from_bins: int = 0
    """EPLB, with a load histogram of at least this many bins (0: never): programs of
    several tiles count the load in their own counters in a global workspace rather than
    in a histogram in registers (either is added to the load view at the end, one atomic
    per touched expert or pair of experts)."""
    paired_load_from_bins: int = 512
    """With EPLB, a load histogram of at least this many bins (0: never) into an int32
    view is added with 64-bit atomics on pairs of counters, half the atomics: every
    program adds its histogram at the end, all at once, and they contend. H100, same
    runs (``routing_kernel_ab_paired_load_h100_2026-12-06.json``), with the carry
    checked from the value each atomic returns: E=256 EPLB 12.02 -> 11.18 us at 16384
    tokens, 8.46 -> 7.95 at 4096, 30.47 -> 29.96 at 65536, grouped 33.56 -> 30.11 at
    16384; E=128 (256 bins) lost, 9.77 -> 10.11 at 16384, and E=8 (16 bins) 3.56 ->
    3.81 at 1024. The carry ruled out from the counters read before routing instead
    (atomics that return nothing, see ``_add_load``): 11.18 -> 11.04 at 16384, 7.92 ->
    7.25 at 4096, grouped 107.9 -> 108.8 at 65536."""
    deferred_counts: bool = False
    """With the workspace and one layout: where the tiles outnumber the programs, a
    kernel that issues each tile's workspace atomics in the next iteration, behind
    that tile's loads (issued at the end of their own tile, they delayed them); with
    one tile per program, the kernel without it. E=256 large launch, H100 same runs:
    31.23 -> 30.05 and 31.30 -> 30.24 us at 65536 tokens; in one kernel for both, the
    histogram path at 16384 lost 11.98 -> 12.13 (ptxas schedules it differently), and
    two kernels each without the other's path lost both (12.51, 31.88). The grouped
    launch lost with it (107.98 -> 109.37, 105.37 -> 109.20 at 65536), so it is off there."""


_config_override: RouteKernelConfig | None = None


def set_config_override(config: RouteKernelConfig | None) -> None:
    """Force a launch shape for every later launch (benchmarks); ``None`` restores the default.

    The shape is read when a launch is made or traced and is in no compile cache key:
    a graph compiled (or loaded from the FX graph cache) keeps the shape it was first
    traced with, so A/Bs of compiled code must run with caches off."""
    global _config_override
    _config_override = config


def default_config(
    row_width: int, packed_top_k: bool = True, eplb: bool = True
) -> RouteKernelConfig:
    """Launch shape from H100 and H200 sweeps (``--sweep`` in bench/routing_kernel.py, and
    the A/B runs in bench/results/routing_kernel_ab_*2026-11-28.json).

    int32 keys: 32 experts per lane, one row per thread (many programs, so many warps
    per SM hide the latency and fewer instructions win). With EPLB, three launches, one
    of which runs per call (H100 A/Bs of 2026-12-06 in
    routing_kernel_ab_counting_h100_2026-12-06.json):
    - below 3072 tokens for 256 experts or more, 512 for fewer, a one-warp program per
      token, a row over 8 lanes, counting with an atomic per slot (one per touched
      expert: a token's experts are distinct). E=256: 3.10 us against 3.92 at 64
      tokens, 4.68 against 5.19 at 1024, 8.20 against 8.52 at 3000 for the middle
      launch below, which counts in a histogram; E=128: 3.32 against 3.60 at 384,
      even at 512, 4.26 against 3.76 at 768. At one token, 2.90 us against 2.95 for
      4-token tiles; E=128 with 16 experts per lane, 2.54 against 3.10 with 32;
    - then up to 8192, a persistent grid of 4-warp programs (few programs, so few
      load atomics, and latency exposed): 16 experts per lane, 8-token tiles below
      3072 tokens (E=128 only) and from 3072 on eight rows per thread, whose
      independent loads hide the latency the few programs leave exposed (E=256:
      64-token tiles);
    - from 8192 on, one 8-warp program per SM with 128-token tiles (E=256, H200:
      11.8 us instead of 15.4 at 16384 tokens; below 8192 its few programs lose).
      32 experts per lane there compile to fewer instructions per key (26.4 against
      33.4 under Triton 3.9) but ran slower (H100, same run: 45.9 us against 38.3 at
      65536 tokens). Programs of several tiles (above 16896 tokens on 132 SMs) count in
      workspace counters when the load histogram has 512 bins or more (H100, same run:
      36.2 us against 39.0 at 65536 tokens for E=256; E=128's 256 bins lost, 22.6
      against 20.4; programs of one tile lost, 13.7 against 13.5 at 16384).
    int64 keys: 8 experts per lane and eight rows per thread, EPLB map read per slot,
    workspace counters for programs of several tiles (E=256 grouped, H100, same run:
    107.6 us against 115.0 at 65536 tokens).
    """
    num_warps = 4
    if not packed_top_k:
        # No per-program EPLB tables: int64 keys already hold every register (E=256
        # grouped, EPLB on, 65536 tokens: 128 us with them, 120 without).
        lanes = max(1, min(32, row_width // 8))
        return RouteKernelConfig(
            min(256, 8 * 32 * num_warps // lanes),
            num_warps,
            lane_experts=8,
            table_entries=0,
            workspace_from_bins=512,
        )
    lanes = max(1, min(32, row_width // 32))
    config = RouteKernelConfig(min(256, 32 * num_warps // lanes), num_warps, lane_experts=32)
    if eplb and row_width >= 128:
        eight_rows_from = 3072  # the middle launch's layout of eight rows per thread
        one_token_below = eight_rows_from if row_width >= 256 else 512
        middle_lanes = max(1, min(32, row_width // 16))
        large_tile = min(256, 8 * 32 * num_warps // middle_lanes)
        large_launch = RouteKernelConfig(
            min(256, 2 * large_tile),
            2 * num_warps,
            programs_per_sm=1,
            lane_experts=16,
            workspace_from_bins=512,
            deferred_counts=True,
        )
        if one_token_below >= eight_rows_from:  # a small-tile layout would never run
            config = RouteKernelConfig(
                large_tile, num_warps, lane_experts=16, large_launch=large_launch
            )
        else:
            config = RouteKernelConfig(
                min(256, 32 * num_warps // middle_lanes),
                num_warps,
                lane_experts=16,
                large_block_tokens=large_tile,
                large_lane_experts=16,
                large_from_tokens=eight_rows_from,
                large_launch=large_launch,
            )
        # One-warp programs of one token, a row over 8 lanes (up to 32 experts each),
        # whose reductions and layout changes stay within the warp; a program per
        # token (no cap), each counting with an atomic per slot.
        config = RouteKernelConfig(
            1,
            1,
            programs_per_sm=0,
            lane_experts=min(32, row_width // 8),
            slot_atomics=True,
            large_launch=config,
            large_launch_from_tokens=one_token_below,
        )
    return config


def lane_layout(num_groups: int, group_size: int, lane_experts: int) -> tuple[int, int]:
    """``(LANES, MEMBERS_PER_LANE)``: threads per row and members of each group per thread."""
    group_pad = triton.next_power_of_2(group_size)
    row = triton.next_power_of_2(num_groups) * group_pad
    lanes = max(1, min(group_pad, 32, row // lane_experts))
    return lanes, group_pad // lanes


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
    count_outputs=None,
    zero_experts=None,
    config: RouteKernelConfig | None = None,
) -> None:
    """Fill ``weights`` / ``ids`` (contiguous ``[T, top_k + n_shared]``).

    With ``eplb = (state, policy)`` also add the load into ``state.expert_load_view``;
    with ``count_outputs = (counts, offsets)`` (zeroed int32 ``[B]`` and ``[B + 1]``)
    add the per-id counts and write their exclusive prefix sums; with
    ``zero_experts = (num_real_experts, zero_weight)`` mask the zero experts'
    slots and write their weight per token into ``zero_weight`` (float32 ``[T, 1]``).
    Arguments are checked by the caller."""
    # Sizes that become constexprs are made concrete (under dynamic shapes this
    # specializes them, as the kernel must); the token count stays symbolic.
    num_tokens = router_logits.shape[0]
    if isinstance(num_tokens, int) and num_tokens == 0:
        return  # nothing to write; CUDA rejects the null pointers of empty tensors
    num_routed = int(router_logits.shape[1]) - num_fused_shared_experts
    groups = num_expert_group if num_expert_group > 1 else 1
    group_size = num_routed // groups
    row_width = triton.next_power_of_2(groups) * triton.next_power_of_2(group_size)
    packed_top_k = (
        scoring_func == "softmax"
        and e_score_correction_bias is None
        and groups == 1
        and router_logits.dtype in (torch.bfloat16, torch.float16)
    )
    config = config or _config_override or default_config(row_width, packed_top_k, eplb is not None)
    # The exact redo of the packed top-k (one group) spreads a row over up to a warp.
    redo_lanes, redo_members_per_lane = lane_layout(1, group_size, 1)

    dummy = router_logits  # stands in for absent pointers; never read under its flag
    num_real_experts, zero_weight = zero_experts or (num_routed, dummy)
    bias = e_score_correction_bias
    if eplb is not None:
        state, policy = eplb
        l2p, counts = state.logical_to_physical_map, state.logical_replica_count
        load, record, unpadded = (
            state.expert_load_view,
            state.should_record_tensor,
            state.num_unpadded_tokens,
        )
        num_physical, max_replicas = load.shape[0], int(l2p.shape[1])
        eplb_strides = (l2p.stride(0), l2p.stride(1), counts.stride(0), load.stride(0))
        load_bins = max(32, triton.next_power_of_2(int(num_physical)))
        table_experts = triton.next_power_of_2(num_real_experts)
        table_replicas = triton.next_power_of_2(max_replicas)
    else:
        policy, l2p, counts, load, record, unpadded = "modulo", dummy, dummy, dummy, dummy, None
        num_physical, max_replicas, eplb_strides, load_bins = 0, 1, (0, 0, 0, 0), 32
        table_experts, table_replicas = 1, 0

    if count_outputs is not None:
        expert_counts, expert_offsets = count_outputs
        num_count_bins = expert_counts.shape[0]
        count_bins = triton.next_power_of_2(int(num_count_bins) + 1)
    else:
        expert_counts = expert_offsets = dummy
        num_count_bins, count_bins = 0, 0

    kernel = _route_kernel
    if not _INTERPRETING:
        kernel = torch.library.wrap_triton(_route_kernel)
    arguments = dict(
        logits_ptr=router_logits,
        stride_logits_t=router_logits.stride(0),
        stride_logits_e=router_logits.stride(1),
        bias_ptr=bias if bias is not None else dummy,
        stride_bias=bias.stride(0) if bias is not None else 0,
        weights_ptr=weights,
        ids_ptr=ids,
        l2p_ptr=l2p,
        stride_l2p_e=eplb_strides[0],
        stride_l2p_s=eplb_strides[1],
        replica_count_ptr=counts,
        stride_replica_count=eplb_strides[2],
        load_ptr=load,
        stride_load=eplb_strides[3],
        record_ptr=record,
        unpadded_ptr=unpadded if unpadded is not None else dummy,
        counts_ptr=expert_counts,
        offsets_ptr=expert_offsets,
        zero_weight_ptr=zero_weight,
        workspace_ptr=dummy,
        num_tokens=num_tokens,
        num_physical=num_physical,
        num_count_bins=num_count_bins,
        max_replicas=max_replicas,
        routed_scaling_factor=float(routed_scaling_factor),
        E_ROUTED=num_routed,
        NUM_REAL_EXPERTS=num_real_experts,
        NUM_GROUPS=groups,
        GROUP_SIZE=group_size,
        TOPK_GROUP=topk_group if groups > 1 else 1,
        TOP_K=top_k,
        TOP_K_PAD=triton.next_power_of_2(top_k),
        OUT_WIDTH=top_k + num_fused_shared_experts,
        N_SHARED=num_fused_shared_experts,
        N_SHARED_PAD=triton.next_power_of_2(max(num_fused_shared_experts, 1)),
        SCORING=SCORING_CODES[scoring_func],
        HAS_BIAS=bias is not None,
        RENORMALIZE=renormalize,
        HAS_EPLB=eplb is not None,
        TOKEN_HASH=policy == "token_hash",
        HAS_UNPADDED=unpadded is not None,
        LOAD_BINS=load_bins,
        COUNT_BINS=count_bins,
        REDO_LANES=redo_lanes,
        REDO_MEMBERS_PER_LANE=redo_members_per_lane,
        PRECISE_MATH=not _INTERPRETING,
        TABLE_EXPERTS=table_experts,
    )
    # EPLB and counts add per-program histograms: a grid capped at a few programs
    # per SM flushes few of them.
    persistent = eplb is not None or count_outputs is not None

    def tile_layout(block_tokens, lane_experts, num_warps, prefix=""):
        lanes, members_per_lane = lane_layout(groups, group_size, lane_experts)
        lane_keys = groups * members_per_lane
        return {
            f"{prefix}BLOCK_T": block_tokens,
            f"{prefix}LANES": lanes,
            f"{prefix}MEMBERS_PER_LANE": members_per_lane,
            f"{prefix}HEADS": triton.next_power_of_2(min(lane_keys, top_k)),
            f"{prefix}SORT_WIDTH": triton.next_power_of_2(lane_keys),
            f"{prefix}REDO_T": max(1, min(block_tokens, 32 * num_warps // redo_lanes)),
        }

    def launch(config: RouteKernelConfig, runs) -> None:
        """``config``'s launch, then its large launch; ``runs`` (0 or 1, symbolic) gates
        the grids."""
        if config.large_launch is not None:
            # 1 from large_launch_from_tokens on, else 0: arithmetic, so no guard on the count
            large = torch.sym_min(
                1, torch.sym_max(0, num_tokens - config.large_launch_from_tokens + 1)
            )
            launch(config.large_launch, runs * large)
            runs = runs * (1 - large)
        layouts = tile_layout(config.block_tokens, config.lane_experts, config.num_warps)
        if config.large_block_tokens:
            layouts |= tile_layout(
                config.large_block_tokens, config.large_lane_experts, config.num_warps, "LARGE_"
            )
        else:  # LARGE_BLOCK_T = 0 compiles the second layout out
            layouts |= {f"LARGE_{name}": 0 for name in layouts}
        all_tiles = (num_tokens + config.block_tokens - 1) // config.block_tokens
        capped = persistent and config.programs_per_sm > 0
        cap = _multiprocessor_count(router_logits.device) * config.programs_per_sm
        num_tiles = torch.sym_min(all_tiles, cap) if capped else all_tiles
        one_token_programs = (
            config.block_tokens == 1
            and not config.large_block_tokens
            and (
                not capped
                or (config.large_launch is not None and config.large_launch_from_tokens - 1 <= cap)
            )
        )
        slot_atomics = config.slot_atomics and one_token_programs and num_real_experts == num_routed
        grid = torch.sym_max(num_tiles, 1) * runs
        if isinstance(grid, int) and grid == 0:
            # A known token count (eager, or a graph specialized on it) that another
            # launch serves: neither compile nor launch this one.
            return
        workspace_counts = (
            capped and eplb is not None and 0 < config.workspace_from_bins <= load_bins
        )
        paired_load = (
            eplb is not None
            and load.dtype == torch.int32
            and 0 < config.paired_load_from_bins <= load_bins
        )
        workspace = {}
        if workspace_counts:
            workspace["workspace_ptr"] = router_logits.new_empty(
                cap * (load_bins + _WORKSPACE_EXTRA.value), dtype=torch.int32
            )

        def launch_kernel(grid, deferred_counts: bool, one_tile: bool) -> None:
            if isinstance(grid, int) and grid == 0:  # (as above)
                return
            kernel[(grid,)](
                **(arguments | workspace),
                **layouts,
                PACKED_TOP_K=packed_top_k and config.packed_top_k,
                large_from_tokens=config.large_from_tokens,
                SLOT_ATOMICS=slot_atomics,
                WORKSPACE_COUNTS=workspace_counts,
                DEFERRED_COUNTS=deferred_counts,
                ONE_TILE=one_tile,
                PAIRED_LOAD=paired_load,
                # otherwise two dependent global reads per slot
                TABLE_REPLICAS=table_replicas
                if table_experts * table_replicas <= config.table_entries
                else 0,
                num_warps=config.num_warps,
            )

        if workspace_counts and config.deferred_counts and not config.large_block_tokens:
            # Programs of several tiles issue each tile's workspace atomics in the next
            # iteration; one tile per program, the kernel compiled without that (see
            # RouteKernelConfig.deferred_counts). Two kernels, one launched: 1 when the
            # tiles outnumber the programs, else 0 (arithmetic: no guard on the count).
            several = torch.sym_min(1, torch.sym_max(0, all_tiles - cap))
            launch_kernel(grid * (1 - several), False, False)
            launch_kernel(grid * several, True, False)
        else:
            launch_kernel(grid, False, not capped and not slot_atomics)

    launch(config, 1)
