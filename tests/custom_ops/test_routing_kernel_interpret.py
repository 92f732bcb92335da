"""The Triton routing kernel itself, on the CPU, under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before Triton compiles (decorates) the
kernel, so the cases run in one subprocess (this file run as a script) with
the environment set; each pytest case then checks its recorded outcome. Every
case compares the kernel with ``route_reference`` (the eager routers + EPLB
mapping): ids and loads exactly, weights to 1e-6 relative; and no program may add
to one expert's load twice (the interpreter's atomics are recorded per program).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULT_MARKER = "INTERPRET_RESULTS="


def _cases():
    """name -> keyword arguments of :func:`_run_case` (small sizes: the interpreter is slow)."""
    cases = {
        "softmax_E8_k2_T0": dict(num_experts=8, top_k=2, num_tokens=0),
        "softmax_E8_k2_T1": dict(num_experts=8, top_k=2, num_tokens=1),
        "softmax_E8_k2_T37_fp16": dict(num_experts=8, top_k=2, num_tokens=37, dtype="float16"),
        "softmax_raw_E60_k6_fp32": dict(
            num_experts=60, top_k=6, num_tokens=7, dtype="float32", renormalize=False
        ),
        "sigmoid_raw_E60_k6_ties": dict(
            num_experts=60, top_k=6, num_tokens=9, scoring="sigmoid", renormalize=False, ties=True
        ),
        "sqrtsoftplus_bias_E128_k1": dict(
            num_experts=128, top_k=1, num_tokens=5, scoring="sqrtsoftplus", bias=True, scale=2.5
        ),
        "sqrtsoftplus_raw_E16_k4_ties": dict(
            num_experts=16,
            top_k=4,
            num_tokens=9,
            scoring="sqrtsoftplus",
            renormalize=False,
            ties=True,
        ),
        "softmax_bias_E32_k3_ties": dict(
            num_experts=32, top_k=3, num_tokens=9, bias=True, ties=True, scale=0.5
        ),
        "grouped_sigmoid_bias_E64_g8_k6": dict(
            num_experts=64,
            top_k=6,
            num_tokens=11,
            scoring="sigmoid",
            bias=True,
            scale=2.5,
            groups=8,
            topk_group=3,
            ties=True,
        ),
        "grouped_softmax_E48_g6_k4_fp32": dict(
            num_experts=48, top_k=4, num_tokens=6, groups=6, topk_group=2, dtype="float32"
        ),
        "grouped_softmax_E256_g8_k8": dict(
            num_experts=256, top_k=8, num_tokens=3, groups=8, topk_group=4
        ),
        "shared_E12_n2_k2": dict(num_experts=12, top_k=2, num_tokens=7, shared=2),
        "shared_E12_n3_k2_eplb": dict(num_experts=12, top_k=2, num_tokens=7, shared=3, eplb=True),
        "softmax_E256_k8_eplb_token_hash": dict(
            num_experts=256, top_k=8, num_tokens=4, eplb=True, policy="token_hash"
        ),
        # The default EPLB launches past the decode one (from 17 tokens on).
        "softmax_E128_k8_eplb_middle_launch": dict(
            num_experts=128, top_k=8, num_tokens=21, eplb=True, ties=True, unpadded=19
        ),
        "softmax_E40_k5_noncontiguous": dict(
            num_experts=40, top_k=5, num_tokens=6, strided=True, indices="int16"
        ),
        "softmax_raw_E24_k3_bf16": dict(
            num_experts=24, top_k=3, num_tokens=9, renormalize=False, ties=True
        ),
        # Packed bf16 top-k, then its exact fallback: distinct logits near zero whose
        # float32 scores are equal, scores that underflow, and -0.0 tying with +0.0.
        "packed_fallback_colliding_tiny_logits": dict(
            num_experts=16, top_k=3, num_tokens=6, special="collide"
        ),
        "packed_fallback_underflow": dict(
            num_experts=16, top_k=4, num_tokens=5, special="underflow", renormalize=False
        ),
        # A 128-row tile redone in sub-tiles (one row per warp), 70 rows holding tokens.
        "packed_fallback_sub_tiles": dict(
            num_experts=64, top_k=3, num_tokens=70, special="collide", eplb=True
        ),
        "packed_signed_zero_ties": dict(num_experts=16, top_k=3, num_tokens=4, special="zeros"),
        # Chosen logits at the near-zero bound (not redone), their neighbours one step
        # toward zero at lower indices: were their scores equal, eager would pick those.
        "packed_at_the_near_zero_bound": dict(
            num_experts=16, top_k=4, num_tokens=14, special="bound"
        ),
        "packed_fp16_at_the_near_zero_bound": dict(
            num_experts=16, top_k=4, num_tokens=14, special="bound", dtype="float16"
        ),
        "packed_fp16_colliding_tiny_logits": dict(
            num_experts=16, top_k=3, num_tokens=6, special="collide", dtype="float16"
        ),
        "op_path_route": dict(num_experts=24, top_k=3, num_tokens=5, via_op=True),
        "op_path_route_eplb": dict(
            num_experts=24, top_k=3, num_tokens=5, via_op=True, eplb=True, indices="int64"
        ),
    }
    # Other lane layouts (threads per row, experts per thread) than the default:
    # one lane per row, one member of each group per lane, lanes holding fewer
    # keys than top_k (they run dry), groups split over many lanes.
    for lane_experts in (1, 2, 8, 256):
        cases[f"lanes{lane_experts}_softmax_E16_k8_ties"] = dict(
            num_experts=16, top_k=8, num_tokens=5, ties=True, lane_experts=lane_experts
        )
        cases[f"lanes{lane_experts}_grouped_sigmoid_bias_E256_g8_k8"] = dict(
            num_experts=256,
            top_k=8,
            num_tokens=3,
            scoring="sigmoid",
            bias=True,
            groups=8,
            topk_group=4,
            ties=True,
            lane_experts=lane_experts,
        )
        cases[f"lanes{lane_experts}_grouped_softmax_E96_g6_k10_fp32"] = dict(
            num_experts=96,
            top_k=10,
            num_tokens=4,
            groups=6,
            topk_group=3,
            dtype="float32",
            lane_experts=lane_experts,
            eplb=True,
        )
    # Per-expert counts and offsets: over several programs (small tiles), with EPLB
    # (physical ids) and shared columns, and with fewer bins than ids (a rank's slice).
    cases["counts_many_programs"] = dict(
        num_experts=20, top_k=3, num_tokens=37, small_tiles=True, count_bins=20, ties=True
    )
    cases["counts_eplb_shared"] = dict(
        num_experts=20, top_k=3, num_tokens=37, shared=1, eplb=True, small_tiles=True,
        count_bins=40,
    )  # fmt: skip
    cases["counts_partial_bins"] = dict(num_experts=20, top_k=3, num_tokens=9, count_bins=7)
    cases["counts_via_op"] = dict(
        num_experts=20, top_k=3, num_tokens=9, count_bins=20, eplb=True, via_op=True
    )
    cases["counts_empty_batch"] = dict(num_experts=20, top_k=3, num_tokens=0, count_bins=20)
    # The kernel's second (large-batch) layout, taken from a token count on: here
    # taken (37 >= 30) and not (37 < 40), with EPLB, counts, the packed redo, zero experts.
    for threshold in (30, 40):
        cases[f"two_layouts_eplb_from{threshold}"] = dict(
            num_experts=32, top_k=4, num_tokens=37, eplb=True, policy="modulo",
            small_tiles=True, large_from_tokens=threshold, ties=True,
        )  # fmt: skip
    # Decode sizes: one-token programs, each slot counted with its own atomic (the
    # launch before the small-tile one, up to 4 tokens); from 5 tokens the next launch.
    for load_dtype in ("int32", "int64", "float32"):
        cases[f"one_token_programs_{load_dtype}_padded"] = dict(
            num_experts=32, top_k=4, num_tokens=4, eplb=True, one_token_programs=True,
            load_dtype=load_dtype, unpadded=3, ties=True,
        )  # fmt: skip
    for policy in ("token_hash", "modulo"):
        cases[f"one_token_programs_{policy}_corrupt_map"] = dict(
            num_experts=20, top_k=3, num_tokens=4, eplb=True, policy=policy,
            one_token_programs=True, corrupt=True,
        )  # fmt: skip
    cases["one_token_programs_record_off"] = dict(
        num_experts=20, top_k=3, num_tokens=3, eplb=True, one_token_programs=True, record=False
    )
    cases["one_token_programs_next_launch"] = dict(
        num_experts=20, top_k=3, num_tokens=9, eplb=True, one_token_programs=True, ties=True
    )
    # No grid cap: a program per token, however many (the next launch from 40 tokens).
    cases["one_token_programs_uncapped_modulo_padded"] = dict(
        num_experts=32, top_k=4, num_tokens=37, eplb=True, policy="modulo",
        one_token_programs="uncapped", unpadded=30, ties=True,
    )  # fmt: skip
    # Counts and offsets from a program per token (the last of 37 tickets writes them).
    cases["one_token_programs_uncapped_counts_shared"] = dict(
        num_experts=20, top_k=3, num_tokens=37, shared=1, eplb=True,
        one_token_programs="uncapped", count_bins=40, ties=True,
    )  # fmt: skip
    # A zero expert's slots all become expert 0: one-token programs count in the histogram.
    for programs in ("capped", "uncapped"):
        cases[f"one_token_programs_zero_experts_{programs}"] = dict(
            num_experts=20, zero=4, top_k=3, num_tokens=4 if programs == "capped" else 17,
            bias=True, eplb=True, one_token_programs=programs,
        )  # fmt: skip
    # The load added with 64-bit atomics on pairs of int32 counters (from 32 bins here):
    # an odd number of physical experts (the last one alone), counters passing
    # 2**31 - 1. Counters already negative, a view 4 bytes off 8-byte alignment, other
    # dtypes and (by default) fewer than 512 bins take one atomic per expert.
    pairs = dict(num_experts=10, top_k=3, num_tokens=37, eplb=True, small_tiles=True)
    cases["load_pairs_odd_physical_past_int32_max"] = dict(
        pairs, ties=True, load_start="past_int32_max", paired_from_bins=32, paired_load=True
    )
    cases["load_wrapped_counters_one_atomic_each"] = dict(
        pairs, ties=True, load_start="wrapping", paired_from_bins=32, paired_load=False
    )
    cases["load_unaligned_view"] = dict(
        pairs, load_offset=9, load_start="past_int32_max", paired_from_bins=32, paired_load=False
    )
    cases["load_float32_histograms"] = dict(
        pairs, load_dtype="float32", paired_from_bins=32, paired_load=False
    )
    cases["load_int64_histograms"] = dict(pairs, load_dtype="int64", paired_from_bins=32)
    cases["load_below_paired_bins"] = dict(pairs, paired_load=False)
    cases["two_layouts_counts_shared"] = dict(
        num_experts=20, top_k=3, num_tokens=37, shared=1, eplb=True, small_tiles=True,
        count_bins=40, large_from_tokens=16,
    )  # fmt: skip
    cases["two_layouts_packed_redo"] = dict(
        num_experts=64, top_k=3, num_tokens=21, special="collide", eplb=True, small_tiles=True,
        large_from_tokens=16,
    )  # fmt: skip
    cases["two_layouts_grouped_zero_experts"] = dict(
        num_experts=32, zero=4, top_k=4, num_tokens=19, scoring="sigmoid", bias=True, ties=True,
        groups=4, topk_group=2, eplb=True, small_tiles=True, large_from_tokens=8,
    )  # fmt: skip
    # Zero experts (LongCat-Flash): the masking before the remap, and its per-token weight.
    cases["zero_experts_bias_ties"] = dict(
        num_experts=20, zero=4, top_k=3, num_tokens=17, bias=True, ties=True, scale=1.5
    )
    cases["zero_experts_packed_bf16"] = dict(num_experts=28, zero=4, top_k=4, num_tokens=9)
    cases["zero_experts_packed_bf16_eplb"] = dict(
        num_experts=28, zero=4, top_k=4, num_tokens=9, eplb=True, small_tiles=True
    )
    cases["zero_experts_sigmoid_raw_empty"] = dict(
        num_experts=20, zero=2, top_k=3, num_tokens=0, scoring="sigmoid", renormalize=False
    )
    cases["zero_experts_eplb_modulo_padded_many_tiles"] = dict(
        num_experts=20, zero=4, top_k=3, num_tokens=23, bias=True, eplb=True, policy="modulo",
        unpadded=13, small_tiles=True,
    )  # fmt: skip
    cases["zero_experts_via_op_eplb"] = dict(
        num_experts=20, zero=4, top_k=3, num_tokens=9, bias=True, ties=True, eplb=True, via_op=True
    )
    cases["zero_experts_via_op"] = dict(num_experts=20, zero=4, top_k=3, num_tokens=9, via_op=True)
    for policy in ("token_hash", "modulo"):
        for load_dtype in ("int32", "int64", "float32"):
            cases[f"eplb_{policy}_{load_dtype}_many_tiles"] = dict(
                num_experts=20,
                top_k=3,
                num_tokens=37,
                eplb=True,
                policy=policy,
                load_dtype=load_dtype,
                small_tiles=True,
                ties=load_dtype == "int64",
            )
        for unpadded in (0, 5, 60):
            cases[f"eplb_{policy}_unpadded_{unpadded}"] = dict(
                num_experts=20,
                top_k=3,
                num_tokens=23,
                eplb=True,
                policy=policy,
                unpadded=unpadded,
                small_tiles=True,
            )
        cases[f"eplb_{policy}_record_off"] = dict(
            num_experts=20, top_k=3, num_tokens=9, eplb=True, policy=policy, record=False
        )
        cases[f"eplb_{policy}_corrupt_map"] = dict(
            num_experts=20,
            top_k=3,
            num_tokens=31,
            eplb=True,
            policy=policy,
            corrupt=True,
            small_tiles=True,
        )
    # EPLB with the map too large for a per-program copy: two global reads per slot.
    for policy in ("token_hash", "modulo"):
        cases[f"eplb_{policy}_corrupt_map_read_per_slot"] = dict(
            num_experts=20, top_k=3, num_tokens=31, eplb=True, policy=policy, corrupt=True,
            small_tiles=True, table_entries=0,
        )  # fmt: skip
    cases["one_token_programs_map_read_per_slot"] = dict(
        num_experts=32, top_k=4, num_tokens=4, eplb=True, one_token_programs=True,
        unpadded=2, table_entries=0,
    )  # fmt: skip
    # Per-slot atomics asked of programs of several tokens: the histogram counts.
    cases["slot_atomics_refused_for_four_token_tiles"] = dict(
        num_experts=20, top_k=3, num_tokens=31, eplb=True, small_tiles=True, corrupt=True,
        slot_atomics=True, unpadded=23, ties=True,
    )  # fmt: skip
    # A second launch (other warps) for large batches: each launch's grid is empty
    # outside its token counts; taken (37 >= 30) and not (37 < 40).
    for threshold in (30, 40):
        cases[f"large_launch_from{threshold}_counts_padded"] = dict(
            num_experts=32, top_k=4, num_tokens=37, eplb=True, small_tiles=True, ties=True,
            large_launch_from_tokens=threshold, unpadded=29, count_bins=40,
        )  # fmt: skip
    # The load counted in per-program counters in a workspace (programs of several
    # tiles: 10 tiles, 4 programs), out-of-range map entries never counted; with one
    # tile per program (3 tiles), the histogram in registers.
    for load_dtype in ("int32", "int64", "float32"):
        cases[f"workspace_counts_{load_dtype}_corrupt_map_padded"] = dict(
            num_experts=20, top_k=3, num_tokens=37, eplb=True, small_tiles=True, corrupt=True,
            workspace=True, unpadded=29, ties=True, load_dtype=load_dtype,
        )  # fmt: skip
    cases["workspace_counts_grouped_int64_keys_modulo"] = dict(
        num_experts=32, top_k=4, num_tokens=37, scoring="sigmoid", bias=True, groups=4,
        topk_group=2, eplb=True, policy="modulo", small_tiles=True, workspace=True, ties=True,
    )  # fmt: skip
    # Tiles of four slots or more per expert of the table (8 tokens x 8 slots, 16
    # experts): the replica is a remainder from the program's reciprocals of the counts.
    for policy in ("token_hash", "modulo"):
        cases[f"reciprocals_{policy}_corrupt_map_workspace_padded"] = dict(
            num_experts=16, top_k=8, num_tokens=37, eplb=True, policy=policy, small_tiles=True,
            block_tokens=8, corrupt=True, workspace="deferred", unpadded=29, ties=True,
        )  # fmt: skip
    # Each tile's workspace atomics issued in the next iteration (programs of several
    # tiles; with one tile each, the kernel without the deferral runs).
    for policy in ("token_hash", "modulo"):
        cases[f"deferred_workspace_counts_{policy}_corrupt_map_padded"] = dict(
            num_experts=20, top_k=3, num_tokens=37, eplb=True, policy=policy, small_tiles=True,
            corrupt=True, workspace="deferred", unpadded=29, ties=True,
        )  # fmt: skip
    cases["deferred_workspace_counts_record_off_counts_shared"] = dict(
        num_experts=20, top_k=3, num_tokens=37, shared=1, eplb=True, small_tiles=True,
        count_bins=40, workspace="deferred", record=False,
    )  # fmt: skip
    cases["deferred_workspace_counts_one_tile_per_program"] = dict(
        num_experts=20, top_k=3, num_tokens=9, eplb=True, small_tiles=True, workspace="deferred"
    )
    cases["workspace_counts_one_tile_per_program"] = dict(
        num_experts=20, top_k=3, num_tokens=9, eplb=True, small_tiles=True, workspace=True
    )
    cases["workspace_counts_counts_shared_record_off"] = dict(
        num_experts=20, top_k=3, num_tokens=37, shared=1, eplb=True, small_tiles=True,
        count_bins=40, workspace=True, record=False,
    )  # fmt: skip
    # The lanes' merge (persistent launches, packed keys) for each list width, over 16
    # lanes of 4 keys (lists padded beyond 4), and the rounds beyond 16 keys. Random
    # logits, so that the merge rather than the exact redo decides most rows.
    for top_k in (1, 2, 8, 16, 20):
        cases[f"eplb_packed_E64_k{top_k}"] = dict(
            num_experts=64, top_k=top_k, num_tokens=9, eplb=True, lane_experts=4
        )
    return cases


CASES = _cases()


# ---------------------------------------------------------------- runs inside the subprocess
def _run_case(
    num_experts,
    top_k,
    num_tokens,
    dtype="bfloat16",
    scoring="softmax",
    renormalize=True,
    bias=False,
    scale=1.0,
    groups=0,
    topk_group=0,
    shared=0,
    ties=False,
    eplb=False,
    policy="token_hash",
    load_dtype="int32",
    load_offset=8,
    load_start=None,
    paired_load=None,
    paired_from_bins=None,
    unpadded=None,
    record=True,
    corrupt=False,
    small_tiles=False,
    block_tokens=4,
    strided=False,
    indices="int32",
    via_op=False,
    special=None,
    lane_experts=None,
    count_bins=None,
    zero=0,
    large_from_tokens=None,
    slot_atomics=False,
    table_entries=None,
    large_launch_from_tokens=None,
    workspace=False,
    one_token_programs=False,
):
    import numpy as np
    import torch
    from moe_reference import grid_logits, random_replica_layout
    from triton.runtime import interpreter

    from moe_compile.custom_ops import _routing_kernels, routing
    from moe_compile.eplb import EplbLayerState

    generator = torch.Generator().manual_seed(num_experts * 1000 + num_tokens + top_k)
    width = num_experts + shared + zero
    if ties:
        logits = grid_logits(num_tokens, width, generator)
    else:
        logits = torch.randn(num_tokens, width, generator=generator) * 2
    if special is not None:
        logits = _special_logits(special, num_tokens, width, generator, dtype)
    logits = logits.to(getattr(torch, dtype))
    if special in ("collide", "underflow"):
        # The data must defeat ranking by logit value, or the fallback is untested.
        by_value = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices
        reference = torch.sort(
            torch.softmax(logits.float(), dim=-1), dim=-1, descending=True, stable=True
        ).indices
        assert not torch.equal(by_value[:, :top_k], reference[:, :top_k]), "no collision"
    if strided:
        wide = torch.zeros(num_tokens, width + 9, dtype=logits.dtype)
        wide[:, 3 : 3 + width] = logits
        logits = wide[:, 3 : 3 + width]
        assert not logits.is_contiguous()
    bias_tensor = None
    if bias:
        bias_tensor = (torch.randint(0, 3, (num_experts + zero,), generator=generator) * 2).float()
        if not ties:
            bias_tensor = torch.randn(num_experts + zero, generator=generator) * 0.1
        if zero:  # a zero expert at the top bias level, so some slots choose one
            bias_tensor[num_experts] = bias_tensor.max()
    indices_dtype = getattr(torch, indices)
    args = (
        logits,
        bias_tensor,
        top_k,
        scoring,
        renormalize,
        scale,
        groups,
        topk_group,
        shared,
        indices_dtype,
    )

    def make_state():
        l2p, counts, num_physical = random_replica_layout(
            num_experts, num_experts // 2, generator, max_replicas=4
        )
        if corrupt:
            l2p[1, 0] = num_physical + 3  # outside [0, P): returned, never counted
            l2p[2, 0] = -5
            counts[3] = 9  # more replicas than map slots: clamped to 4
            counts[4] = 0  # fewer than one: clamped to 1
        backing = torch.full((num_physical + load_offset + 8,), 7, dtype=getattr(torch, load_dtype))
        state = EplbLayerState(
            expert_load_view=backing[load_offset : load_offset + num_physical],
            logical_to_physical_map=l2p,
            logical_replica_count=counts,
            should_record_tensor=torch.tensor(record),
            num_unpadded_tokens=None if unpadded is None else torch.tensor(unpadded),
        )
        state.expert_load_view.copy_(initial_load)
        return state, backing

    initial_load = torch.zeros(0)
    if eplb:
        initial_load = torch.zeros(num_experts + num_experts // 2, dtype=getattr(torch, load_dtype))
        if load_start is not None:
            # int32 counters about to pass 2**31 - 1 and, "wrapping", past -1 (where a
            # counter in the low half of a 64-bit atomic would carry into its neighbour).
            pattern = [2**31 - 1, 0, 2**31 - 3, 5]
            if load_start == "wrapping":
                pattern = [-1, -2, 2**31 - 1, 0, -7, 2**31 - 3]
            pattern = torch.tensor(pattern, dtype=torch.int32)
            repeats = initial_load.numel() // pattern.numel() + 1
            initial_load = pattern.repeat(repeats)[: initial_load.numel()]

    if small_tiles:
        # With large_from_tokens: a second layout of 8-token tiles, 4 experts per lane.
        shape = dict(
            slot_atomics=slot_atomics,
            workspace_from_bins=32 if workspace else 0,
            deferred_counts=workspace == "deferred",
        )
        if large_from_tokens is not None:
            shape |= dict(
                large_block_tokens=8,
                large_lane_experts=4,
                large_from_tokens=large_from_tokens,
            )
        if large_launch_from_tokens is not None:
            # its own layout: 8-token tiles of 4 experts per lane, over two warps
            shape |= dict(
                large_launch=_routing_kernels.RouteKernelConfig(
                    block_tokens=8, num_warps=2, programs_per_sm=1, lane_experts=4
                ),
                large_launch_from_tokens=large_launch_from_tokens,
            )
        if table_entries is not None:
            shape["table_entries"] = table_entries
        if paired_from_bins is not None:
            shape["paired_load_from_bins"] = paired_from_bins
        _routing_kernels.set_config_override(
            _routing_kernels.RouteKernelConfig(
                block_tokens=block_tokens, num_warps=1, programs_per_sm=1, **shape
            )
        )
    if one_token_programs:
        # Up to 4 tokens (the interpreter's grid cap: 4 programs), or with no cap up to
        # 39 tokens (a program each); then 4-token tiles.
        uncapped = one_token_programs == "uncapped"
        next_launch = _routing_kernels.RouteKernelConfig(
            block_tokens=4, num_warps=1, programs_per_sm=1
        )
        table = {} if table_entries is None else dict(table_entries=table_entries)
        _routing_kernels.set_config_override(
            _routing_kernels.RouteKernelConfig(
                block_tokens=1, num_warps=1, programs_per_sm=0 if uncapped else 1,
                slot_atomics=True, large_launch=dataclasses.replace(next_launch, **table),
                large_launch_from_tokens=40 if uncapped else 5, **table,
            )
        )  # fmt: skip
    if lane_experts is not None:
        _routing_kernels.set_config_override(
            _routing_kernels.RouteKernelConfig(
                block_tokens=2, num_warps=1, programs_per_sm=1, lane_experts=lane_experts
            )
        )
    launches = []
    real_launch = _routing_kernels.launch_route_kernel

    def counting_launch(*a, **kw):
        launches.append(1)
        return real_launch(*a, **kw)

    _routing_kernels.launch_route_kernel = counting_launch
    # Every program's atomics, (program, address), to check that none adds to one
    # expert's load twice (one atomic per touched expert per program).
    atomics = []
    wide_atomics = []  # addresses of 64-bit atomics
    real_atomic = interpreter.InterpreterBuilder.create_atomic_rmw

    def recording_atomic(builder, op, ptr, value, mask, *rest):
        active = np.broadcast_to(mask.data, ptr.data.shape)
        atomics.extend((builder.grid_idx[0], int(a)) for a in ptr.data[active].ravel())
        if ptr.dtype.element_ty.primitive_bitwidth == 64:
            wide_atomics.extend(int(a) for a in ptr.data[active].ravel())
        return real_atomic(builder, op, ptr, value, mask, *rest)

    interpreter.InterpreterBuilder.create_atomic_rmw = recording_atomic
    zero_weight = ref_zero_weight = None
    if zero:
        # route_zero_experts: the route arguments without the shared-expert count.
        zero_args = (*args[:8], indices_dtype, num_experts)

        def kernel(eplb=None):
            if via_op:
                state_args = _state_args(*eplb) if eplb else (None,) * 5 + ("token_hash",)
                return torch.ops.moe_compile.route_zero_experts(*zero_args, *state_args)
            return routing._route_triton(*args, eplb=eplb, num_real_experts=num_experts)

        def reference(eplb_state=None, replica_policy="token_hash"):
            return routing.route_zero_experts_reference(
                *zero_args, eplb_state=eplb_state, replica_policy=replica_policy
            )

    try:
        if eplb:
            state, backing = make_state()
            ref_state = EplbLayerState(
                expert_load_view=initial_load.clone(),
                logical_to_physical_map=state.logical_to_physical_map,
                logical_replica_count=state.logical_replica_count,
                should_record_tensor=state.should_record_tensor,
                num_unpadded_tokens=state.num_unpadded_tokens,
            )
            state_args = _state_args(state, policy)
            if zero:
                weights, ids, zero_weight = kernel((state, policy))
            elif via_op and count_bins:
                weights, ids, counts, offsets = torch.ops.moe_compile.route_counted(
                    *args, *state_args, count_bins
                )
            elif via_op:
                weights, ids = torch.ops.moe_compile.route_eplb(*args, *state_args)
            elif count_bins:
                weights, ids, counts, offsets = routing._route_triton(
                    *args, eplb=(state, policy), num_count_bins=count_bins
                )
            else:
                weights, ids = routing._route_triton(*args, eplb=(state, policy))
            if zero:
                ref_weights, ref_ids, ref_zero_weight = reference(ref_state, policy)
            else:
                ref_weights, ref_ids = routing.route_reference(
                    *args, eplb_state=ref_state, replica_policy=policy
                )
            load, ref_load = state.expert_load_view, ref_state.expert_load_view
            assert torch.equal(load, ref_load), f"load {load.tolist()} != {ref_load.tolist()}"
            guard = torch.cat([backing[:load_offset], backing[load_offset + load.numel() :]])
            assert bool((guard == 7).all()), f"wrote outside expert_load_view: {backing.tolist()}"
            expected_total = 0
            if record:
                physical = ref_ids[:, :top_k].long()
                in_range = (physical >= 0) & (physical < load.numel())
                rows = num_tokens if unpadded is None else min(unpadded, num_tokens)
                expected_total = int(in_range[:rows].sum())
            added = load - initial_load
            if load_start is not None:  # int32 counters that wrapped
                added = (load.long() - initial_load.long()) % 2**32
            assert float(added.sum()) == expected_total
            start = load.data_ptr()
            end = start + load.numel() * load.element_size()
            adds = collections.Counter(a for a in atomics if start <= a[1] < end)
            assert max(adds.values(), default=1) == 1, f"a program added twice: {adds}"
            assert bool(adds) == (expected_total > 0), "no atomic into the load"
            wide = [a for a in wide_atomics if start <= a < end]
            assert all(a % 8 == 0 for a in wide), "a misaligned 64-bit atomic"
            if paired_load is not None:
                assert bool(wide) == paired_load, f"64-bit atomics into the load: {len(wide)}"
            if corrupt:
                assert (
                    bool((ref_ids < 0).any() or (ref_ids >= load.numel()).any()) or num_tokens == 0
                )
        elif zero:
            (weights, ids, zero_weight), (ref_weights, ref_ids, ref_zero_weight) = (
                kernel(),
                reference(),
            )
        elif via_op:
            weights, ids = torch.ops.moe_compile.route(*args)
            ref_weights, ref_ids = routing.route_reference(*args)
        elif count_bins:
            weights, ids, counts, offsets = routing._route_triton(*args, num_count_bins=count_bins)
            ref_weights, ref_ids = routing.route_reference(*args)
        else:
            weights, ids = routing._route_triton(*args)
            ref_weights, ref_ids = routing.route_reference(*args)
    finally:
        _routing_kernels.launch_route_kernel = real_launch
        interpreter.InterpreterBuilder.create_atomic_rmw = real_atomic
        _routing_kernels.set_config_override(None)

    assert launches, "the Triton kernel was not launched"
    assert ids.dtype == indices_dtype and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (num_tokens, top_k + shared)
    assert torch.equal(ids, ref_ids), f"ids\n{ids.tolist()}\n!=\n{ref_ids.tolist()}"
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=0)
    if count_bins:
        ref_counts, ref_offsets = routing.expert_counts_reference(ref_ids, count_bins)
        assert torch.equal(counts, ref_counts), f"counts {counts.tolist()} != {ref_counts.tolist()}"
        assert torch.equal(offsets, ref_offsets), f"offsets {offsets.tolist()}"
    if zero:
        assert zero_weight.shape == (num_tokens, 1) and zero_weight.dtype == torch.float32
        torch.testing.assert_close(zero_weight, ref_zero_weight, rtol=1e-6, atol=0)
        if num_tokens:
            assert bool((ref_zero_weight > 0).any()), "no token chose a zero expert"


def _state_args(state, policy):
    return (
        state.logical_to_physical_map,
        state.logical_replica_count,
        state.expert_load_view,
        state.should_record_tensor,
        state.num_unpadded_tokens,
        policy,
    )


def _special_logits(kind, num_tokens, width, generator, dtype):
    import torch

    bf16 = dtype == "bfloat16"
    logits = torch.full((num_tokens, width), -1.0)
    if kind == "bound":
        # Rows of a first logit and four adjacent 16-bit values near zero (see
        # adjacent_rows), the highest of the four at the highest index.
        firsts = torch.tensor([0.75, 3.0, 6.0, 12.0, 24.0, 48.0, 72.0])[
            torch.arange(num_tokens) % 7
        ]
        negative = (torch.arange(num_tokens) // 7) % 2 == 1
        torch_dtype = getattr(torch, dtype)
        bound = near_zero_bound(firsts, torch_dtype).to(torch_dtype)
        adjacent = adjacent_rows(torch.where(negative, -bound, bound), steps=4)
        logits = torch.full((num_tokens, width), -20.0)
        for row in range(num_tokens):
            spots = torch.randperm(width, generator=generator)[:5].sort().values
            logits[row, spots[0]] = firsts[row]
            logits[row, spots[1:]] = adjacent[row].flip(0).float()
        return logits
    for row in range(num_tokens):
        spots = torch.randperm(width, generator=generator)[:4].sort().values.tolist()
        if kind == "collide":
            # Distinct 16-bit logits whose float32 scores are equal on every
            # device: x - 8 rounds them to one float32. The larger logit sits at
            # the higher index, so eager (lower index on ties) and logit order
            # disagree.
            step = 2.0**-27 if bf16 else 2.0**-24
            for j in range(3):
                logits[row, spots[j]] = 2.0**-20 + j * step
            logits[row, spots[3]] = 8.0
        elif kind == "underflow":
            # One dominant logit: every other score underflows to 0 and ties.
            logits[row] = torch.arange(width, dtype=torch.float32) - 60.0
            logits[row, spots[0]] = 100.0
        elif kind == "zeros":
            logits[row, spots[0]] = -0.0
            logits[row, spots[1]] = 0.0
            logits[row, spots[2]] = -0.0
            logits[row, spots[3]] = 0.5
    return logits


def near_zero_bound(span, dtype):
    """The smallest magnitude every chosen logit must have for the packed top-k to
    stand (``_packed_suspect``), for rows whose chosen logits span ``span``."""
    import torch

    mantissa = 7 if dtype == torch.bfloat16 else 10
    exponent = torch.floor(torch.log2(span.float())) + mantissa - 20
    return torch.exp2(torch.clamp(exponent, min=mantissa - 18))


def _next_magnitude(values, steps=1):
    """The 16-bit values ``steps`` apart in magnitude (negative: toward zero)."""
    import torch

    return (values.view(torch.int16) + steps).view(values.dtype)


def adjacent_rows(nearest, steps):
    """``[rows, steps]`` adjacent 16-bit values in descending order: ``nearest`` (per row,
    signed, not zero) and the ``steps - 2`` next ones away from zero, then the value
    just below them all."""
    import torch

    chosen = [_next_magnitude(nearest, away) for away in range(steps - 1)]
    chosen = torch.stack(chosen, 1).float().sort(1, descending=True).values.to(nearest.dtype)
    lowest = chosen[:, -1]
    below = torch.where(lowest > 0, _next_magnitude(lowest, -1), _next_magnitude(lowest))
    return torch.cat([chosen, below[:, None]], 1)


KEY_DTYPES = ("bfloat16", "float16")


def _packed_keys_kernel():
    """A kernel writing ``_packed_key`` of every logit (expert ``index % 256``), the
    value ``_ordered_to_float`` reads back from it and the logit converted. Defined
    once Triton runs interpreted; the kernel finds ``_routing_kernels`` among this
    module's globals, where Triton resolves its names."""
    global _routing_kernels
    import triton
    import triton.language as tl

    from moe_compile.custom_ops import _routing_kernels

    @triton.jit
    def keys_kernel(
        logits_ptr, keys_ptr, values_ptr, converted_ptr, N: tl.constexpr, DTYPE: tl.constexpr
    ):
        index = tl.arange(0, N)
        logits = tl.load(logits_ptr + index)
        key = _routing_kernels._packed_key(logits, index % 256, index >= 0, True)
        tl.store(keys_ptr + index, key)
        tl.store(values_ptr + index, _routing_kernels._ordered_to_float(key >> 16, DTYPE))
        tl.store(converted_ptr + index, logits.to(tl.float32))

    return keys_kernel


def _check_packed_keys(dtype: str) -> None:
    """Every 16-bit pattern through ``_packed_key`` and back through ``_ordered_to_float``:
    keys in the order of the values (``-0.0`` just below ``+0.0``), the inverted expert
    index in the low half, and the value read back as the logit itself converts."""
    import torch
    import triton.language as tl

    keys_kernel = _packed_keys_kernel()
    torch_dtype = getattr(torch, dtype)
    logits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch_dtype)
    keys = torch.empty(logits.shape, dtype=torch.int32)
    values = torch.empty(logits.shape, dtype=torch.float32)
    converted = torch.empty(logits.shape, dtype=torch.float32)
    keys_kernel[(1,)](logits, keys, values, converted, N=logits.numel(), DTYPE=getattr(tl, dtype))

    expert = torch.arange(logits.numel()) % 256
    torch.testing.assert_close(keys & 0xFFFF, 0xFFFF - expert.to(torch.int32), rtol=0, atol=0)
    value = logits.float()
    is_number = ~value.isnan()
    assert values[~is_number].isnan().all()
    # The kernel takes the chosen logits from their keys: as the logits themselves
    # convert. (The interpreter flushes subnormal bf16 to zero in that conversion, so
    # the comparison with torch's values leaves subnormals out.)
    normal = value.abs() >= torch.finfo(torch_dtype).tiny
    for expected, where in ((converted, is_number), (value, is_number & normal)):
        same = values[where] == expected[where]
        same_sign = values[where].signbit() == expected[where].signbit()
        assert (same & same_sign).all(), "the value read back from a key differs"
    # Sorted by key, the values never decrease, and -0.0 sorts just below +0.0.
    high = (keys[is_number] >> 16).to(torch.int64)
    order = torch.argsort(high)
    assert (high[order].diff() > 0).all(), "two values share a key"
    by_key = value[is_number][order]
    assert (by_key.diff() >= 0).all(), "keys out of value order"
    zeros = by_key == 0
    assert by_key[zeros].signbit().tolist() == [True, False]
    assert high[order][zeros].diff().tolist() == [1]


def _check_remainder() -> None:
    """``_remainder`` from reciprocals against exact remainders, for the smallest and
    largest dividends and divisors and random ones between. (The kernel finds
    ``_routing_kernels`` among this module's globals, as in ``_packed_keys_kernel``.)"""
    global _routing_kernels
    import numpy as np
    import torch
    import triton
    import triton.language as tl

    from moe_compile.custom_ops import _routing_kernels

    @triton.jit
    def remainder_kernel(n_ptr, divisor_ptr, out_ptr, N: tl.constexpr):
        index = tl.arange(0, N)
        n = tl.load(n_ptr + index).to(tl.uint32, bitcast=True)
        divisor = tl.load(divisor_ptr + index).to(tl.uint32, bitcast=True)
        reciprocal = tl.full(divisor.shape, 0xFFFFFFFF, tl.uint32) // divisor
        remainder = _routing_kernels._remainder(n, divisor, reciprocal, True)
        tl.store(out_ptr + index, remainder.to(tl.int32, bitcast=True))

    edges = [0, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
    divisors = [*range(1, 65), 255, 256, 257, 2**16 + 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1]
    n, d = (np.array(a, dtype=np.uint64).ravel() for a in np.meshgrid(edges, divisors))
    rng = np.random.default_rng(5)
    size = 4096
    n = np.concatenate([n, rng.integers(0, 2**32, size - n.size)]).astype(np.uint32)
    d = np.concatenate([d, rng.integers(1, 300, size - d.size)]).astype(np.uint32)
    out = np.zeros_like(n)
    as_tensor = lambda a: torch.from_numpy(a.view(np.int32))  # noqa: E731
    remainder_kernel[(1,)](as_tensor(n), as_tensor(d), as_tensor(out), N=size)
    expected = n.astype(np.uint64) % d.astype(np.uint64)
    wrong = np.flatnonzero(out.astype(np.uint64) != expected)
    assert wrong.size == 0, f"{n[wrong[:3]]} % {d[wrong[:3]]}: {out[wrong[:3]]}"


def _check_near_zero_bound(dtype: str) -> None:
    """``_packed_suspect`` on chosen logits at the near-zero bound and one step nearer
    zero, over spans from 2**-2 to 80 and both signs: rows at the bound stand, rows
    past it are redone. Eager's float32 softmax orders the rows at the bound strictly
    (their neighbours, one step away, included), so not redoing them is safe; and
    rows that are not finite, or span more than 80, are redone."""
    global _routing_kernels
    import torch
    import triton
    import triton.language as tl

    from moe_compile.custom_ops import _routing_kernels

    @triton.jit
    def suspect_kernel(
        chosen_ptr, out_ptr, ROWS: tl.constexpr, K: tl.constexpr, DTYPE: tl.constexpr
    ):
        rows = tl.arange(0, ROWS)[:, None]
        slots = tl.arange(0, K)[None, :]
        keys = _routing_kernels._packed_key(
            tl.load(chosen_ptr + rows * K + slots), slots, slots >= 0, True
        )
        first, last = tl.max(keys, axis=1), tl.min(keys, axis=1)
        suspect = _routing_kernels._packed_suspect(keys, last, first, DTYPE)
        tl.store(out_ptr + tl.arange(0, ROWS), suspect.to(tl.int32))

    def suspect(chosen):
        out = torch.empty(chosen.shape[0], dtype=torch.int32)
        suspect_kernel[(1,)](
            chosen.contiguous(),
            out,
            ROWS=chosen.shape[0],
            K=chosen.shape[1],
            DTYPE=getattr(tl, dtype),
        )
        return out.bool()

    torch_dtype = getattr(torch, dtype)
    rows = 256
    generator = torch.Generator().manual_seed(3)
    firsts = torch.exp2(torch.rand(rows, generator=generator) * 8.3 - 2).to(
        torch_dtype
    )  # 0.25 .. 79
    negative = torch.arange(rows) % 2 == 1
    bound = near_zero_bound(firsts, torch_dtype).to(torch_dtype)
    at_bound = adjacent_rows(torch.where(negative, -bound, bound), steps=4)
    chosen = torch.cat([firsts[:, None], at_bound[:, :3]], 1)
    span = chosen[:, 0].float() - chosen[:, 3].float()
    assert torch.equal(near_zero_bound(span, torch_dtype).to(torch_dtype), bound), (
        "rows off the bound"
    )
    assert not suspect(chosen).any(), "rows at the bound redone"
    past = adjacent_rows(_next_magnitude(torch.where(negative, -bound, bound), -1), steps=4)
    assert suspect(torch.cat([firsts[:, None], past[:, :3]], 1)).all(), "rows past the bound kept"
    # Eager's scores for the first, the chosen and the next value below them.
    scores = torch.softmax(torch.cat([firsts[:, None], at_bound], 1).float(), dim=-1)
    assert (scores.diff(dim=1) < 0).all(), "eager scores tie or invert at the bound"
    inf = float("inf")
    ends = [
        [inf, 1.0, 0.5, 0.25],
        [90.0, 5.0, 4.0, 3.0],
        [1.0, 0.5, 0.25, -inf],
        [79.0, 5.0, 4.0, 3.0],
    ]
    assert suspect(torch.tensor(ends, dtype=torch_dtype)).tolist() == [True, True, True, False]


def _main() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from moe_compile.custom_ops import _routing_kernels

    if not _routing_kernels._INTERPRETING:
        raise SystemExit("run with TRITON_INTERPRET=1")
    results = {}
    checks = {name: lambda kwargs=kwargs: _run_case(**kwargs) for name, kwargs in CASES.items()}
    for dtype in KEY_DTYPES:
        checks[f"packed_keys_{dtype}"] = lambda dtype=dtype: _check_packed_keys(dtype)
    checks["remainder"] = _check_remainder
    for dtype in KEY_DTYPES:
        checks[f"near_zero_bound_{dtype}"] = lambda dtype=dtype: _check_near_zero_bound(dtype)
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    print(RESULT_MARKER + json.dumps(results))


# ---------------------------------------------------------------- pytest side
@pytest.fixture(scope="module")
def interpreted_results():
    env = dict(os.environ)
    env.update(
        TRITON_INTERPRET="1",
        MOE_COMPILE_INTERPRET_KERNELS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        PYTHONWARNINGS="ignore",
    )
    proc = subprocess.run(
        [sys.executable, __file__], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter run failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_MARKER) :])


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_under_interpreter(interpreted_results, name):
    outcome = interpreted_results[name]
    assert outcome == "ok", outcome


@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_packed_keys_order_every_16_bit_value(interpreted_results, dtype):
    outcome = interpreted_results[f"packed_keys_{dtype}"]
    assert outcome == "ok", outcome


def test_remainder_from_reciprocals(interpreted_results):
    assert interpreted_results["remainder"] == "ok", interpreted_results["remainder"]


@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_packed_top_k_stands_from_the_near_zero_bound(interpreted_results, dtype):
    outcome = interpreted_results[f"near_zero_bound_{dtype}"]
    assert outcome == "ok", outcome


if __name__ == "__main__":
    _main()
