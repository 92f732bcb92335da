"""Static sm_90 SASS of the routing kernel, compiled on the CPU (no GPU needed).

    python bench/kernel_sass.py [--experts 256] [--top-k 8] [--eplb] [--tokens 65536]
        [--launch BLOCK_TOKENS,NUM_WARPS,LANE_EXPERTS] [--dump FILE]

The launch arguments come from ``launch_route_kernel`` itself (its kernel call is
captured, not run). Each launch whose grid is not empty is compiled for sm_90 with
Triton's bundled ptxas, specialized as the JIT would (integers equal to 1 become
constants; pointers and multiples of 16 are marked 16-byte aligned), and disassembled
with Triton's bundled cuobjdump. Printed per launch: registers, the instructions in
the tile loop (the longest backward branch, so the exact redo's block counts too)
per key a thread holds in one tile, and the most frequent opcodes. A launch holding
two layouts (``LARGE_BLOCK_T``) is reported by its large layout, whose loop is longer.

Counts are static, a proxy for issue cost and not a timing: in the 2026-12-06 A/B
(``bench/results/routing_kernel_ab_lanes_2026-12-06.json``) a launch shape with 21%
fewer instructions per key ran 20% slower.

The layouts, and so the counts, are the installed Triton's: versions lay the same
kernel out differently (E=256 EPLB large launch at 17e319c, its kernel for programs
of several tiles: Triton 3.9 gives 184 registers, 71 barriers in the tile loop and
30.5 instructions per key, 3.6 gives 255, 20 and 22.0). To see what the device
compiles, run this under its Triton (``triton==3.6.0``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_compile.custom_ops import _routing_kernels  # noqa: E402
from moe_compile.eplb import EplbLayerState  # noqa: E402

KERNEL = _routing_kernels._route_kernel
_POINTER_TYPES = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.int16: "*i16",
    torch.bool: "*i1",
}


def capture_launches(
    logits, bias, top_k, *, eplb_policy=None, config=None, keep_empty=False, **options
):
    """``[(grid, kwargs)]`` of every kernel launch ``launch_route_kernel`` makes (none runs)
    whose grid is not empty, or, with ``keep_empty``, of every launch.

    With ``eplb_policy`` the EPLB state has ``num_routed + 8`` physical experts, two
    replica slots per expert."""
    launches = []

    class Capture:
        def __getitem__(self, grid):
            return lambda **kwargs: launches.append((grid, kwargs))

    saved = _routing_kernels._route_kernel, torch.library.wrap_triton
    _routing_kernels._route_kernel = Capture()
    torch.library.wrap_triton = lambda kernel: kernel
    try:
        num_tokens, width = logits.shape
        shared = options.get("num_fused_shared_experts", 0)
        eplb = None
        if eplb_policy is not None:
            num_routed = width - shared
            state = EplbLayerState(
                expert_load_view=torch.zeros(num_routed + 8, dtype=torch.int32),
                logical_to_physical_map=torch.zeros(num_routed, 2, dtype=torch.int64),
                logical_replica_count=torch.ones(num_routed, dtype=torch.int64),
                should_record_tensor=torch.tensor(True),
            )
            eplb = (state, eplb_policy)
        _routing_kernels.launch_route_kernel(
            logits,
            bias,
            torch.empty(num_tokens, top_k + shared),
            torch.empty(num_tokens, top_k + shared, dtype=torch.int32),
            top_k=top_k,
            eplb=eplb,
            config=config,
            **options,
        )
    finally:
        _routing_kernels._route_kernel, torch.library.wrap_triton = saved
    return [(grid, kwargs) for grid, kwargs in launches if keep_empty or int(grid[0]) > 0]


def compile_sm90(arguments: dict):
    """The kernel compiled for sm_90 with one launch's arguments, specialized as the JIT would."""
    arguments = dict(arguments)
    num_warps = arguments.pop("num_warps", 4)
    constexpr_names = {p.name for p in KERNEL.params if p.is_constexpr}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(KERNEL.arg_names):
        value = arguments[name]
        specialized = name not in KERNEL.do_not_specialize
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if name in constexpr_names or (specialized and is_int and value == 1):
            signature[name], constexprs[name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i1" if isinstance(value, bool) else "i32"
        if isinstance(value, torch.Tensor) or (specialized and is_int and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=KERNEL, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )


def _nvidia_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(compiled) -> tuple[str, str]:
    """``(sass, resource usage)`` of a compiled kernel."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = _nvidia_tool("cuobjdump")
        sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True).stdout
        usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True)
    return sass, " ".join(re.findall(r"(REG:\d+|STACK:\d+|SHARED:\d+|LOCAL:\d+)", usage.stdout))


def tile_loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes from the target to the source of the longest backward branch (cuobjdump
    writes each instruction as ``/*address*/ [@predicate] OPCODE operands ;``)."""
    instructions = []  # (address, opcode, operands)
    for line in sass.splitlines():
        match = re.match(
            r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)\S*\s*([^;]*);", line
        )
        if match:
            instructions.append((int(match.group(1), 16), match.group(2), match.group(3)))
    index_of = {address: i for i, (address, _, _) in enumerate(instructions)}
    loops = []
    for i, (_, opcode, operands) in enumerate(instructions):
        target = re.match(r"(?:!?U?P\w+,\s*)?0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and index_of.get(int(target.group(1), 16), i + 1) <= i:
            loops.append((index_of[int(target.group(1), 16)], i))
    start, end = max(loops, key=lambda span: span[1] - span[0], default=(0, len(instructions)))
    return collections.Counter(opcode for _, opcode, _ in instructions[start:end])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--eplb", action="store_true", help="token-hash EPLB state")
    parser.add_argument("--tokens", type=int, default=65536, help="picks the launch")
    parser.add_argument("--launch", default="", help="BLOCK_TOKENS,NUM_WARPS,LANE_EXPERTS")
    parser.add_argument("--dump", type=Path, default=None, help="write the SASS here")
    args = parser.parse_args(argv)

    config = None
    if args.launch:
        block_tokens, num_warps, lane_experts = (int(v) for v in args.launch.split(","))
        config = _routing_kernels.RouteKernelConfig(
            block_tokens, num_warps, programs_per_sm=1, lane_experts=lane_experts
        )
    logits = torch.zeros(args.tokens, args.experts, dtype=torch.bfloat16)
    launches = capture_launches(
        logits, None, args.top_k, eplb_policy="token_hash" if args.eplb else None,
        config=config, scoring_func="softmax", renormalize=True, routed_scaling_factor=1.0,
        num_expert_group=0, topk_group=0, num_fused_shared_experts=0,
    )  # fmt: skip
    print(f"triton {triton.__version__}, sm_90")
    for grid, arguments in launches:
        sass, usage = disassemble(compile_sm90(arguments))
        if args.dump:
            args.dump.write_text(sass)
        opcodes = tile_loop_opcodes(sass)
        loop = sum(opcodes.values())
        threads = 32 * arguments["num_warps"]
        # A launch holding two layouts: the large one's loop is the longer.
        prefix = "LARGE_" if arguments["LARGE_BLOCK_T"] else ""
        block = arguments[f"{prefix}BLOCK_T"]
        keys = block * triton.next_power_of_2(args.experts) // threads
        print(f"grid {tuple(int(g) for g in grid)}  warps {arguments['num_warps']}  "
              f"{prefix}BLOCK_T {block}  {prefix}LANES {arguments[prefix + 'LANES']}  {usage}")  # fmt: skip
        print(
            f"  tile loop: {loop} instructions / {keys} keys per thread = {loop / keys:.1f} per key"
        )
        print("  " + ", ".join(f"{op} {n}" for op, n in opcodes.most_common(12)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
