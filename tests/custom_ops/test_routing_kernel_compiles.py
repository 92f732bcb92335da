"""The Triton kernel compiles for sm_90 (no GPU needed: Triton's bundled ptxas).

The interpreter tests run the kernel's Python, which accepts code that the
compiler rejects (for example a name bound to different types in the two
branches of a runtime ``if``), so a few representative launches are also
compiled. The launch arguments come from ``launch_route_kernel`` itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import kernel_sass  # noqa: E402  (the same capture and compile as the SASS tool)

from moe_compile.custom_ops import _routing_kernels  # noqa: E402

H100_MULTIPROCESSORS = 132

COMMON = dict(routed_scaling_factor=1.0, num_fused_shared_experts=0)
CASES = {
    "packed_softmax_E256_k8_eplb_token_hash": (
        torch.bfloat16, 256, 8, False,
        dict(scoring_func="softmax", renormalize=True, num_expert_group=0, topk_group=0),
        "token_hash",
    ),
    "packed_softmax_raw_E8_k2_eplb_modulo": (
        torch.float16, 8, 2, False,
        dict(scoring_func="softmax", renormalize=False, num_expert_group=0, topk_group=0),
        "modulo",
    ),
    "grouped_sigmoid_bias_E256_g8_k8": (
        torch.bfloat16, 256, 8, True,
        dict(scoring_func="sigmoid", renormalize=True, num_expert_group=8, topk_group=4),
        None,
    ),
    "grouped_sigmoid_bias_E256_g8_k8_eplb_modulo": (
        torch.bfloat16, 256, 8, True,
        dict(scoring_func="sigmoid", renormalize=True, num_expert_group=8, topk_group=4),
        "modulo",
    ),
    "sqrtsoftplus_fp32_E60_k6_shared2": (
        torch.float32, 62, 6, False,
        dict(scoring_func="sqrtsoftplus", renormalize=True, num_expert_group=0, topk_group=0,
             num_fused_shared_experts=2),
        None,
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_compiles_for_sm90(case):
    dtype, width, top_k, has_bias, options, policy = CASES[case]
    logits = torch.zeros(5, width, dtype=dtype)
    num_routed = width - options.get("num_fused_shared_experts", 0)
    bias = torch.zeros(num_routed) if has_bias else None
    launches = kernel_sass.capture_launches(
        logits, bias, top_k, eplb_policy=policy, **(COMMON | options)
    )
    assert len(launches) == 1, "one kernel runs per call"
    ((_, arguments),) = launches
    compiled = kernel_sass.compile_sm90(arguments)
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("num_tokens", "num_warps"), [(5, 1), (4000, 4), (8192, 8), (16896, 8), (16897, 8)]
)
def test_one_launch_runs_per_call_and_its_tile_loop_is_found(monkeypatch, num_tokens, num_warps):
    # The EPLB launches, shaped for an H100: one-token programs (atomics per slot), the
    # middle ones, from 8192 tokens on (one program per SM: a tile each up to 132 * 128
    # tokens, then several). Each one's tile loop reads the logits and sorts.
    monkeypatch.setattr(_routing_kernels, "_multiprocessor_count", lambda _: H100_MULTIPROCESSORS)
    dtype, width, top_k, _, options, policy = CASES["packed_softmax_E256_k8_eplb_token_hash"]
    logits = torch.zeros(num_tokens, width, dtype=dtype)
    launches = kernel_sass.capture_launches(
        logits, None, top_k, eplb_policy=policy, **(COMMON | options)
    )
    assert len(launches) == 1
    ((_, arguments),) = launches
    assert arguments["num_warps"] == num_warps
    sass, usage = kernel_sass.disassemble(kernel_sass.compile_sm90(arguments))
    loop = kernel_sass.tile_loop_opcodes(sass)
    total = sass.count(";")
    assert loop["LDG"] > 0 and loop["VIMNMX"] > 0 and sum(loop.values()) < total
    assert "REG:" in usage
    assert arguments["SLOT_ATOMICS"] is (num_tokens < 3072)
    if num_tokens >= 8192:
        # 264 physical experts, a 512-bin histogram: programs of several tiles count in
        # their workspace counters, with atomics whose result nothing waits for (the
        # launch has no per-slot atomics otherwise).
        assert loop["REDG"] > 0
    # Programs of several tiles issue each tile's workspace atomics in the next iteration.
    assert arguments["DEFERRED_COUNTS"] is (num_tokens > H100_MULTIPROCESSORS * 128)


@pytest.mark.parametrize("num_tokens", [5, 4000, 8192])
def test_launches_of_a_known_empty_grid_are_not_made(num_tokens):
    # Eager calls know the token count: of the three EPLB launches only the one that
    # routes it is compiled and made.
    dtype, width, top_k, _, options, policy = CASES["packed_softmax_E256_k8_eplb_token_hash"]
    logits = torch.zeros(num_tokens, width, dtype=dtype)
    launches = kernel_sass.capture_launches(
        logits, None, top_k, eplb_policy=policy, keep_empty=True, **(COMMON | options)
    )
    assert [int(grid[0]) > 0 for grid, _ in launches] == [True]


@pytest.mark.parametrize(
    ("num_tokens", "width", "zero_experts", "per_slot"),
    [
        (1, 256, False, True),
        (16, 256, False, True),
        (3071, 256, False, True),  # a program per token: the launch has no cap
        (16, 256, True, False),  # a zero expert's slots all become expert 0
        (3072, 256, False, False),
        (20000, 256, False, False),
        (511, 128, False, True),
        (512, 128, False, False),
    ],
)
@pytest.mark.parametrize("multiprocessors", [4, H100_MULTIPROCESSORS])
def test_the_load_is_counted_per_slot_only_by_one_token_programs(
    monkeypatch, num_tokens, width, zero_experts, per_slot, multiprocessors
):
    # One atomic per touched expert per program: per slot only where a program's slots
    # are one token's, whose experts (and so replicas) are distinct.
    monkeypatch.setattr(_routing_kernels, "_multiprocessor_count", lambda _: multiprocessors)
    dtype, _, top_k, _, options, policy = CASES["packed_softmax_E256_k8_eplb_token_hash"]
    logits = torch.zeros(num_tokens, width, dtype=dtype)
    if zero_experts:
        options = options | dict(zero_experts=(width - 4, torch.empty(num_tokens, 1)))
    launches = kernel_sass.capture_launches(
        logits, None, top_k, eplb_policy=policy, **(COMMON | options)
    )
    ((grid, arguments),) = launches
    assert arguments["SLOT_ATOMICS"] is per_slot
    if per_slot:
        assert arguments["BLOCK_T"] == 1 and int(grid[0]) == num_tokens


@pytest.mark.parametrize("num_tokens", [1, 5, 4000, 16384, 65536])
@pytest.mark.parametrize("eplb", [True, False])
@pytest.mark.parametrize(
    "case",
    [
        "packed_softmax_E256_k8_eplb_token_hash",
        "packed_softmax_raw_E8_k2_eplb_modulo",
        "grouped_sigmoid_bias_E256_g8_k8_eplb_modulo",
    ],
)
def test_one_tile_programs_and_paired_load_atomics_where_they_hold(
    monkeypatch, case, eplb, num_tokens
):
    # ONE_TILE (a program's tile loaded before the rest) only where the grid has a
    # program for every tile: no grid cap, so without EPLB (with it, the one-token
    # programs keep their own code). The load in pairs of int32 counters from 512 bins.
    monkeypatch.setattr(_routing_kernels, "_multiprocessor_count", lambda _: H100_MULTIPROCESSORS)
    dtype, width, top_k, has_bias, options, policy = CASES[case]
    bias = torch.zeros(width) if has_bias else None
    ((grid, arguments),) = kernel_sass.capture_launches(
        torch.zeros(num_tokens, width, dtype=dtype), bias, top_k,
        eplb_policy=policy if eplb else None, **(COMMON | options),
    )  # fmt: skip
    block = arguments["BLOCK_T"]
    if arguments["LARGE_BLOCK_T"] and num_tokens >= arguments["large_from_tokens"]:
        block = arguments["LARGE_BLOCK_T"]
    tiles = -(-num_tokens // block)
    assert arguments["ONE_TILE"] is (not eplb)
    assert int(grid[0]) >= tiles or not arguments["ONE_TILE"]
    physical = width + 8  # capture_launches's EPLB state: 512 bins from 257 experts
    assert arguments["PAIRED_LOAD"] is (eplb and physical > 256)


def _symbolic_launches(case: str):
    """Every launch made for a token count that is a symbol (as under ``torch.compile``
    with dynamic tokens), the symbol, and the guards the launcher added on it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    dtype, width, top_k, has_bias, options, policy = CASES[case]
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    logits = mode.from_tensor(
        torch.zeros(64, width, dtype=dtype),
        symbolic_context=StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC]
        ),
    )
    with mode:
        bias = torch.zeros(width) if has_bias else None
        launches = kernel_sass.capture_launches(
            logits, bias, top_k, eplb_policy=policy, keep_empty=True, **(COMMON | options)
        )
    return launches, logits.shape[0].node.expr, shape_env.guards


@pytest.mark.parametrize(
    "case",
    [
        "packed_softmax_E256_k8_eplb_token_hash",
        "packed_softmax_raw_E8_k2_eplb_modulo",
        "grouped_sigmoid_bias_E256_g8_k8_eplb_modulo",
    ],
)
def test_symbolic_token_count_runs_the_launch_a_known_count_runs(monkeypatch, case):
    # One graph serves every batch size: under a symbolic token count every launch is
    # in it, each grid arithmetic on the count with no guard, and for each count
    # exactly one grid is not empty: the launch a known count makes, same grid and
    # same constexprs (H100: decode, middle, then the large launch's kernels for one
    # tile and for several tiles per program).
    monkeypatch.setattr(_routing_kernels, "_multiprocessor_count", lambda _: H100_MULTIPROCESSORS)
    launches, symbol, guards = _symbolic_launches(case)
    assert not guards
    constexprs = {p.name for p in kernel_sass.KERNEL.params if p.is_constexpr}
    dtype, width, top_k, has_bias, options, policy = CASES[case]
    for num_tokens in (1, 2, 511, 512, 3071, 3072, 8191, 8192, 16896, 16897, 65536):
        grids = [
            int(grid[0].node.expr.subs(symbol, num_tokens))
            if isinstance(grid[0], torch.SymInt)
            else int(grid[0])
            for grid, _ in launches
        ]
        running = [index for index, grid in enumerate(grids) if grid > 0]
        assert len(running) == 1, (num_tokens, grids)
        bias = torch.zeros(width) if has_bias else None
        ((known_grid, known_arguments),) = kernel_sass.capture_launches(
            torch.zeros(num_tokens, width, dtype=dtype), bias, top_k, eplb_policy=policy,
            **(COMMON | options),
        )  # fmt: skip
        arguments = launches[running[0]][1]
        assert grids[running[0]] == int(known_grid[0])
        assert {n: arguments[n] for n in constexprs} == {n: known_arguments[n] for n in constexprs}
