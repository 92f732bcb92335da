"""The ``moe-compile`` command: ``demo``, ``bench`` and ``explain``.

- ``moe-compile demo [--device cpu|cuda] [--steps N] ...`` runs :mod:`moe_compile.demo`.
- ``moe-compile bench NAME [ARGS...]`` runs the benchmark script ``bench/NAME.py``
  of a source checkout with ``ARGS`` (``moe-compile bench --list`` lists them).
- ``moe-compile explain [router options]`` prints one router's post-grad graph
  before and after the fusion pass. It uses the light AOTAutograd backend, so
  it takes seconds and generates no code.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

BENCH_ALIASES = {"routing": "routing_kernel"}
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
}


# ----------------------------------------------------------------- bench


def bench_dir() -> Path:
    """``bench/`` of the source checkout this package was installed from (editable install)."""
    return Path(__file__).resolve().parent.parent / "bench"


def available_benches(folder: Path | None = None) -> list[str]:
    folder = folder or bench_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def run_bench(name: str, args: Sequence[str], folder: Path | None = None) -> int:
    """Run ``bench/<name>.py`` as ``__main__`` with ``args``; returns its exit status."""
    folder = folder or bench_dir()
    names = available_benches(folder)
    if not names:
        raise SystemExit(
            f"no benchmark scripts in {folder}: `moe-compile bench` needs a source checkout "
            "installed in editable mode (pip install -e .)"
        )
    script = BENCH_ALIASES.get(name, name)
    if script not in names:
        raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(names)}")
    path = folder / f"{script}.py"
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(folder))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        code = stop.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


# --------------------------------------------------------------- explain


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    router = parser.add_argument_group("router")
    router.add_argument("--num-experts", type=int, default=16, help="logical experts E")
    router.add_argument("--top-k", type=int, default=4)
    router.add_argument(
        "--scoring-func", choices=("softmax", "sigmoid", "sqrtsoftplus"), default="softmax"
    )
    router.add_argument(
        "--renormalize", action=argparse.BooleanOptionalAction, default=True, help="(default on)"
    )
    router.add_argument(
        "--bias", action="store_true", help="add an e_score_correction_bias (selects only)"
    )
    router.add_argument("--routed-scaling-factor", type=float, default=1.0)
    router.add_argument(
        "--grouped", action="store_true", help="DeepSeek grouped top-k (needs groups)"
    )
    router.add_argument("--num-expert-group", type=int, default=None)
    router.add_argument("--topk-group", type=int, default=None)
    router.add_argument(
        "--num-shared-experts", type=int, default=0, help="num_fused_shared_experts"
    )
    router.add_argument(
        "--zero-experts",
        type=int,
        default=0,
        help="LongCat-style zero experts after the real ones (ZeroExpertRouter; implies a bias)",
    )
    router.add_argument("--logits-dtype", choices=("float32", "bfloat16"), default="float32")
    router.add_argument("--indices-dtype", choices=("int32", "int64"), default=None)
    eplb = parser.add_argument_group("EPLB (on when --redundant-experts is given)")
    eplb.add_argument(
        "--redundant-experts",
        type=int,
        default=None,
        help="turn EPLB on with this many redundant experts (0 allowed)",
    )
    eplb.add_argument("--replica-policy", choices=("token_hash", "modulo"), default="token_hash")
    fusion = parser.add_argument_group("fusion pass")
    fusion.add_argument("--no-fuse-routing", action="store_true")
    fusion.add_argument("--no-fuse-eplb", action="store_true")
    fusion.add_argument("--no-fold-index-casts", action="store_true")
    parser.add_argument("--tokens", type=int, default=7, help="tokens in the example batch")
    parser.add_argument(
        "--ops-only", action="store_true", help="op counts only, not the whole graphs"
    )


def _eplb_state(num_logical: int, num_redundant: int, device: str = "cpu"):
    """One layer's EPLB state in SPEC's initial layout (replica p of expert p % E)."""
    from moe_compile.eplb import (
        EplbLayerState,
        initial_physical_to_logical_map,
        physical_to_logical_to_logical_to_physical,
    )

    num_physical = num_logical + num_redundant
    physical_to_logical = initial_physical_to_logical_map(1, num_logical, num_physical)
    l2p, counts = physical_to_logical_to_logical_to_physical(
        physical_to_logical, num_logical, num_redundant + 1
    )
    state = EplbLayerState(should_record_tensor=torch.ones((), dtype=torch.bool, device=device))
    state.set_layer_state(
        0,
        torch.zeros(1, num_physical, dtype=torch.int32, device=device),
        l2p.to(device),
        counts.to(device),
    )
    return state


def explain(args: argparse.Namespace) -> str:
    """The explanation text for parsed ``explain`` arguments."""
    from moe_compile import create_fused_moe_router, mark_dynamic_tokens
    from moe_compile.passes import FusionConfig, MoEFusionPass
    from moe_compile.passes.testing import PassTestBackend

    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    if args.grouped and (args.num_expert_group is None or args.topk_group is None):
        raise ValueError("--grouped needs --num-expert-group and --topk-group")
    if args.zero_experts < 0:
        raise ValueError(f"--zero-experts must be >= 0, got {args.zero_experts}")
    if args.redundant_experts is not None and args.redundant_experts < 0:
        raise ValueError(f"--redundant-experts must be >= 0, got {args.redundant_experts}")
    num_experts = args.num_experts
    num_redundant = args.redundant_experts or 0
    state = None if args.redundant_experts is None else _eplb_state(num_experts, num_redundant)
    generator = torch.Generator().manual_seed(0)
    num_columns = num_experts + args.num_shared_experts + args.zero_experts
    bias = None
    if args.bias or args.zero_experts:
        bias = torch.randn(num_experts + args.zero_experts, generator=generator) * 0.1
    router = create_fused_moe_router(
        top_k=args.top_k,
        global_num_experts=num_experts + num_redundant,
        eplb_state=state,
        renormalize=args.renormalize,
        scoring_func=args.scoring_func,
        e_score_correction_bias=bias,
        routed_scaling_factor=args.routed_scaling_factor,
        use_grouped_topk=args.grouped,
        num_expert_group=args.num_expert_group,
        topk_group=args.topk_group,
        num_fused_shared_experts=args.num_shared_experts,
        zero_expert_type="identity" if args.zero_experts else None,
        num_logical_experts=num_experts,
        indices_dtype=_DTYPES[args.indices_dtype] if args.indices_dtype else None,
        eplb_replica_policy=args.replica_policy,
    )
    config = FusionConfig(
        fuse_routing=not args.no_fuse_routing,
        fuse_eplb=not args.no_fuse_eplb,
        fold_index_casts=not args.no_fold_index_casts,
    )
    recorder = PassTestBackend(MoEFusionPass(config))
    hidden_states = torch.randn(args.tokens, 8, generator=generator)
    logits = torch.randn(args.tokens, num_columns, generator=generator).to(
        _DTYPES[args.logits_dtype]
    )
    mark_dynamic_tokens(hidden_states, logits)
    compiled = torch.compile(router.select_experts, backend=recorder, fullgraph=True)
    with torch.no_grad():
        compiled(hidden_states, logits)
    torch._dynamo.reset()  # the next explain in this process starts from scratch
    graph = recorder.graphs[-1]

    from moe_compile.demo import GraphView, format_ops

    view = GraphView(graph.before, graph.after, graph.ops_before, graph.ops_after, graph.applied)
    eplb_text = (
        "off"
        if state is None
        else f"on, {num_redundant} redundant experts, {args.replica_policy} replica policy"
    )
    fused_any = any(view.applied.values())
    lines = [
        f"router: {type(router).__name__}; EPLB {eplb_text}",
        f"fusion: {config}",
        f"graph nodes: {graph.before.count(chr(10)) + 1} before, "
        f"{graph.after.count(chr(10)) + 1} after",
        f"fused away : {format_ops(view.fused_ops)}",
        f"put in     : {format_ops(view.new_ops)}",
        f"rewrites   : {format_ops({k: v for k, v in view.applied.items() if v})}",
    ]
    if not fused_any:
        lines.append("nothing was fused: no pattern of the pass matches this configuration")
    if not args.ops_only:
        lines += ["", "--- before ---", graph.before, "", "--- after ---", graph.after]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-compile",
        description="torch.compile passes that fuse MoE routing, EPLB remapping and load counting",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    from moe_compile import demo

    demo.build_parser(
        commands.add_parser(
            "demo", help="compile a small DeepSeek-style MoE model with EPLB and report"
        )
    )
    bench = commands.add_parser(
        "bench",
        help="run a benchmark script from bench/ (arguments after the name go to it)",
    )
    bench.add_argument("name", nargs="?", help="benchmark: routing, compile_time, layer, ...")
    bench.add_argument("--list", action="store_true", help="list the benchmarks")
    explain_parser = commands.add_parser(
        "explain", help="print a router's graph before and after the fusion pass"
    )
    add_explain_arguments(explain_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Everything after `bench NAME` belongs to the benchmark, even its --help.
    if len(argv) >= 2 and argv[0] == "bench" and not argv[1].startswith("-"):
        return run_bench(argv[1], argv[2:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        from moe_compile import demo

        return demo.main(argv[1:])
    if args.command == "bench":
        if args.list or args.name is None:
            names = available_benches()
            print("\n".join(names) if names else f"no benchmark scripts in {bench_dir()}")
            return 0
        return run_bench(args.name, [])
    if args.command == "explain":
        try:
            print(explain(args))
        except ValueError as error:
            parser.error(str(error))
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
