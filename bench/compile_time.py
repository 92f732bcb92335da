"""Compile time and recompiles of a DeepSeek-style MoE model, with and without moe_compile.

    python bench/compile_time.py [--out bench/results] [--layers 4,16,61]
        [--modes whole,regional] [--compilers moe_compile,torch_compile_dynamic,torch_compile]
        [--max-batch 8192] [--whole-max-layers N] [--device cpu|cuda]

For every (MoE layers, mode, compiler) it starts a fresh Python process with a
fresh, empty ``TORCHINDUCTOR_CACHE_DIR`` and measures:

- cold: the first call (Dynamo + AOTAutograd + our pass + Inductor + the
  C++/Triton compiles, then one run) with an empty cache; ``compile_s`` is that
  minus a steady-state call of the same batch;
- pass: the time spent inside ``MoEFusionPass.__call__`` during the cold compile
  (pattern setup on first use included) and its share of ``compile_s``;
- warm: the same after ``torch._dynamo.reset()`` in the same process, so the
  FX graph cache (same folder) is warm;
- the serving trace: batch sizes 1, 2, 4, ... up to ``--max-batch`` (and a few
  odd ones), with EPLB switched off and on again (the routers' ``eplb_state``
  set to ``None`` and back, before any rebalance), load recording paused and
  resumed, and rebalances (the DeepSeek policy, weights moved); it counts the
  graphs Dynamo compiles during the trace.

Modes: ``whole`` compiles the model's forward; ``regional`` compiles one MoE
block function that all blocks reuse (see ``moe_compile.demo.call_block``).
Compilers: ``moe_compile`` (``moe_compile.compile``: the fusion pass and one
dynamic token dimension), ``torch_compile_dynamic`` (``torch.compile`` with the
same token marking, no pass: isolates the pass) and ``torch_compile`` (plain
``torch.compile``, its automatic dynamic shapes).

The model: DeepSeek-V3's router (256 experts in 8 groups, keep 4, top-8,
sigmoid + bias, scale 2.5) with 32 redundant experts, bf16 (so the experts run
as grouped GEMMs and the graph's size does not grow with the expert count),
and small hidden sizes (compile time depends on the graph, not on the sizes).
Writes ``compile_time_<label>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPILERS = ("moe_compile", "torch_compile_dynamic", "torch_compile")
MODES = ("whole", "regional")
ODD_SIZES = (3, 77, 1000)


def trace_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... max_batch with a few odd sizes mixed in, in serving order."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, size = [], 1
    while size <= max_batch:
        sizes.append(size)
        size *= 2
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    for odd in ODD_SIZES:
        if odd <= max_batch:
            sizes.insert(len(sizes) // 2, odd)
    return sizes


def trace_events(max_batch: int, rebalances: int = 2) -> list[tuple[str, int]]:
    """The serving trace as ``(event, batch)``: events are ``serve``, ``eplb_off``,
    ``eplb_on``, ``record_off``, ``record_on`` and ``rebalance`` (batch 0)."""
    sizes = trace_sizes(max_batch)
    events: list[tuple[str, int]] = [("serve", b) for b in sizes]
    events.append(("eplb_off", 0))
    events += [("serve", b) for b in sizes[: max(2, len(sizes) // 2)]]
    events.append(("eplb_on", 0))
    for round_index in range(rebalances):
        events.append(("rebalance", 0))
        events += [("serve", b) for b in reversed(sizes)]
        if round_index == 0:
            events.append(("record_off", 0))
            events += [("serve", b) for b in sizes[:3]]
            events.append(("record_on", 0))
    return events


# --------------------------------------------------------------------- worker


def _worker(spec: dict) -> dict:
    """Runs in a fresh process whose TORCHINDUCTOR_CACHE_DIR is a fresh folder."""
    sys.path.insert(0, str(REPO))
    import torch
    from torch._dynamo.utils import counters

    import moe_compile as mc
    from moe_compile.demo import DemoConfig, ZipfTokens, build_model, call_block
    from moe_compile.eplb import rebalance
    from moe_compile.passes.manager import MoEFusionPass

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)

    import moe_compile.passes.eplb as eplb_passes
    import moe_compile.passes.routing as routing_passes

    pass_seconds = [0.0]
    pass_calls = [0]
    pattern_seconds = [0.0]
    original_call = MoEFusionPass.__call__

    def timed_patterns(build):
        # Both take the graph: they register only the patterns a graph can contain.
        def timed_build(*args):
            start = time.perf_counter()
            try:
                return build(*args)
            finally:
                pattern_seconds[0] += time.perf_counter() - start

        return timed_build

    # The pass imports these at call time, so wrapping the module attributes times
    # the first-use pattern setup (cached afterwards) inside the pass's time.
    routing_passes.routing_patterns = timed_patterns(routing_passes.routing_patterns)
    eplb_passes.eplb_patterns = timed_patterns(eplb_passes.eplb_patterns)

    # A full garbage collection of the whole compile's objects often falls inside
    # the pass; it is counted in the pass's time and also reported on its own.
    gc_seconds = [0.0]
    in_pass = [False]
    gc_started = [0.0]

    def on_gc(phase, info):
        if not in_pass[0]:
            return
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_seconds[0] += time.perf_counter() - gc_started[0]

    gc.callbacks.append(on_gc)

    def timed_call(self, graph):
        start = time.perf_counter()
        in_pass[0] = True
        try:
            return original_call(self, graph)
        finally:
            in_pass[0] = False
            pass_seconds[0] += time.perf_counter() - start
            pass_calls[0] += 1

    MoEFusionPass.__call__ = timed_call

    device = spec["device"]
    config = DemoConfig(
        num_layers=spec["layers"],
        num_experts=spec["experts"],
        num_redundant_experts=spec["redundant"],
        top_k=spec["top_k"],
        num_expert_group=spec["groups"],
        topk_group=spec["topk_group"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        simulated_ranks=spec["ranks"],
        dtype=spec["dtype"],
        device=device,
    )
    model = build_model(config)
    eplb = mc.EplbState.from_model(
        model, window_size=4, step_interval=10**9, num_groups=config.num_expert_group
    )
    tokens = ZipfTokens(config.vocab_size, config.zipf_exponent, seed=0)
    mode, compiler = spec["mode"], spec["compiler"]

    def make_compiled():
        if mode == "whole":
            if compiler == "moe_compile":
                return mc.compile(model, fullgraph=True)
            compiled = torch.compile(model, fullgraph=True)
            if compiler == "torch_compile":
                return compiled
            return lambda ids: (mc.mark_dynamic_tokens(ids), compiled(ids))[1]
        if compiler == "moe_compile":
            block_fn = mc.compile(call_block, fullgraph=True)
        else:
            compiled_block = torch.compile(call_block, fullgraph=True)
            if compiler == "torch_compile":
                block_fn = compiled_block
            else:

                def block_fn(block, hidden):
                    mc.mark_dynamic_tokens(hidden)
                    return compiled_block(block, hidden)

        return lambda ids: model(ids, block_fn)

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, *args) -> float:
        sync()
        start = time.perf_counter()
        fn(*args)
        sync()
        return time.perf_counter() - start

    def graphs() -> int:
        return int(counters["stats"]["unique_graphs"])

    result: dict = {}
    first_batch = tokens.batch(spec["first_batch"]).to(device)
    with torch.no_grad():
        # cold
        forward = make_compiled()
        cold_first = timed(forward, first_batch)
        steady = min(timed(forward, first_batch) for _ in range(3))
        result.update(
            cold_first_call_s=cold_first,
            steady_call_s=steady,
            cold_compile_s=cold_first - steady,
            pass_s=pass_seconds[0],
            pattern_setup_s=pattern_seconds[0],
            gc_in_pass_s=gc_seconds[0],
            pass_calls=pass_calls[0],
            cold_graphs=graphs(),
            fused=dict(counters["moe_compile"]),
            fx_cache_misses_cold=int(counters["inductor"]["fxgraph_cache_miss"]),
        )
        result["pass_share_of_cold_compile"] = (
            pass_seconds[0] / result["cold_compile_s"] if result["cold_compile_s"] > 0 else None
        )
        # warm: same cache folder, Dynamo forgets everything
        torch._dynamo.reset()
        counters.clear()
        pass_seconds[0], pass_calls[0] = 0.0, 0
        forward = make_compiled()
        warm_first = timed(forward, first_batch)
        result.update(
            warm_first_call_s=warm_first,
            warm_compile_s=warm_first - steady,
            warm_pass_s=pass_seconds[0],
            fx_cache_hits_warm=int(counters["inductor"]["fxgraph_cache_hit"]),
            fx_cache_misses_warm=int(counters["inductor"]["fxgraph_cache_miss"]),
        )
        # serving trace, on the warm compiled model
        graphs_before = graphs()
        routers = [block.moe.router for block in model.blocks]
        states = [router.eplb_state for router in routers]
        generator = torch.Generator().manual_seed(0)
        events = trace_events(spec["max_batch"], spec["rebalances"])
        served, trace_start, recompile_at, eplb_on = 0, time.perf_counter(), [], True
        for event, batch in events:
            if event == "serve":
                before = graphs()
                forward(tokens.batch(batch).to(device))
                eplb.step()
                served += batch
                if graphs() > before:
                    recompile_at.append(f"{batch} (EPLB {'on' if eplb_on else 'off'})")
            elif event == "eplb_off":
                eplb_on = False
                for router in routers:
                    router.eplb_state = None
            elif event == "eplb_on":
                eplb_on = True
                for router, state in zip(routers, states, strict=True):
                    router.eplb_state = state
            elif event == "record_off":
                eplb.recording = False
            elif event == "record_on":
                eplb.recording = True
            elif event == "rebalance":
                load = torch.rand(
                    eplb.num_layers, eplb.num_logical_experts, generator=generator
                ) * torch.logspace(2, 0, eplb.num_logical_experts)
                new_map, _, _ = rebalance(
                    load,
                    eplb.num_physical_experts,
                    config.num_expert_group,
                    1,
                    config.simulated_ranks,
                    old_physical_to_logical=eplb.physical_to_logical_map.cpu(),
                )
                eplb.rearrange(new_map)
        sync()
        result.update(
            trace_events=len(events),
            trace_tokens=served,
            trace_s=time.perf_counter() - trace_start,
            trace_graphs_compiled=graphs() - graphs_before,
            trace_recompiled_at_batch=recompile_at,
            total_graphs=graphs() + result["cold_graphs"],
        )
    return result


# --------------------------------------------------------------------- parent


def environment(device: str) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.startswith("cuda") and torch.cuda.is_available():
        card = torch.cuda.get_device_name()
    else:
        card = f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"
    return {
        "card": card,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
    }


def run_one(spec: dict, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="moe_compile_cold_cache_") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        env.pop("TORCHINDUCTOR_FX_GRAPH_CACHE", None)
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=REPO
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
        wall = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)[-800:]}
    result = json.loads(lines[-1])
    result["process_wall_s"] = wall
    return result


def _fmt(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{suffix}"


def markdown(report: dict) -> str:
    env, args = report["environment"], report["args"]
    lines = [
        f"# Compile time: {report['label']}",
        "",
        f"{env['card']}; torch {env['torch']}; triton {env['triton']}; Python {env['python']}; "
        f"{env['date']}.",
        f"Command: `{report['command']}`",
        *([f"Note: {report['note']}"] if report.get("note") else []),
        "",
        f"Model: {args['experts']} experts + {args['redundant']} redundant in {args['groups']} "
        f"groups (keep {args['topk_group']}), top-{args['top_k']}, sigmoid + bias, hidden "
        f"{args['hidden']}, expert FFN {args['intermediate']}, {args['dtype']}, EPLB on. "
        f"Serving trace: batch sizes {report['trace_sizes']}, EPLB off and on, recording "
        f"paused, {args['rebalances']} rebalances ({report['trace_events']} events).",
        "",
        "Seconds. cold = first call with an empty Inductor cache minus a steady call; warm = "
        "the same after `torch._dynamo.reset()` with the cache kept; pass = time inside "
        "`MoEFusionPass` during the cold compile, in brackets the part spent setting up its "
        "patterns on first use (once per process); graphs = Dynamo graphs compiled "
        "(cold start / during the trace).",
        "",
        "| MoE layers | mode | compiler | cold | warm | pass (pattern setup) | pass share "
        "| graphs at start | graphs during trace | recompiled at batch | routing fused |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in report["results"]:
        if "error" in row or "skipped" in row:
            reason = row.get("skipped") or row.get("error")
            lines.append(
                f"| {row['layers']} | {row['mode']} | {row['compiler']} | "
                f"{'skipped' if 'skipped' in row else 'error'}: {reason} |||||||"
            )
            continue
        fused = row.get("fused", {}).get("route_eplb", 0)
        share = row.get("pass_share_of_cold_compile")
        lines.append(
            f"| {row['layers']} | {row['mode']} | {row['compiler']} | "
            f"{_fmt(row['cold_compile_s'])} | {_fmt(row['warm_compile_s'])} | "
            f"{_fmt(row['pass_s'], 2) + ' (' + _fmt(row.get('pattern_setup_s'), 2) + ')' if row['compiler'] == 'moe_compile' else '-'} | "
            f"{_fmt(100 * share, 1, '%') if share is not None and row['compiler'] == 'moe_compile' else '-'} | "
            f"{row['cold_graphs']} | {row['trace_graphs_compiled']} | "
            f"{', '.join(row['trace_recompiled_at_batch']) or '-'} | "
            f"{'yes (' + str(fused) + ')' if fused else 'no'} |"
        )
    overheads = report.get("pass_overhead", [])
    if overheads:
        lines += ["", "Pass overhead on the cold compile (target: under 5%):", ""]
        for entry in overheads:
            vs = entry.get("vs_torch_compile_dynamic")
            lines.append(
                f"- {entry['layers']} layers, {entry['mode']}: time in the pass is "
                f"{100 * entry['pass_share']:.1f}% of moe_compile's cold compile "
                f"({100 * entry['pass_share_without_pattern_setup']:.1f}% without the one-time "
                "pattern setup"
                + (
                    f"; {100 * entry['gc_share']:.1f}% is Python garbage collection that ran "
                    "inside the pass"
                    if entry.get("gc_share") is not None
                    else ""
                )
                + ")"
                + (
                    f"; moe_compile's cold compile is {100 * vs:+.1f}% vs torch.compile with "
                    "the same dynamic tokens and no pass (includes run-to-run noise and the "
                    "effect of the smaller fused graph)"
                    if vs is not None
                    else ""
                )
                + ("  **MET**" if entry["pass_share"] < 0.05 else "  **MISSED**")
            )
    return "\n".join(lines) + "\n"


def pass_overhead(results: list[dict]) -> list[dict]:
    by_key = {(r["layers"], r["mode"], r["compiler"]): r for r in results if "cold_compile_s" in r}
    entries = []
    for (layers, mode, compiler), row in by_key.items():
        if compiler != "moe_compile" or not row.get("pass_share_of_cold_compile"):
            continue
        entry = {"layers": layers, "mode": mode, "pass_share": row["pass_share_of_cold_compile"]}
        if row.get("gc_in_pass_s") is not None:
            entry["gc_share"] = row["gc_in_pass_s"] / row["cold_compile_s"]
        setup = row.get("pattern_setup_s") or 0.0
        entry["pass_share_without_pattern_setup"] = (row["pass_s"] - setup) / (
            row["cold_compile_s"] - setup
        )
        plain = by_key.get((layers, mode, "torch_compile_dynamic"))
        if plain and plain["cold_compile_s"] > 0:
            entry["vs_torch_compile_dynamic"] = (
                row["cold_compile_s"] / plain["cold_compile_s"] - 1.0
            )
        entries.append(entry)
    return entries


def parse_list(text: str, allowed: tuple[str, ...] | None = None, kind=str) -> list:
    items = [kind(part) for part in text.split(",") if part.strip()]
    if allowed is not None:
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {allowed}")
    if not items:
        raise argparse.ArgumentTypeError("empty list")
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--label", default=None, help="file name suffix (default: device)")
    parser.add_argument("--layers", type=lambda t: parse_list(t, kind=int), default=[4, 16, 61])
    parser.add_argument("--modes", type=lambda t: parse_list(t, MODES), default=list(MODES))
    parser.add_argument(
        "--compilers", type=lambda t: parse_list(t, COMPILERS), default=list(COMPILERS)
    )
    parser.add_argument("--max-batch", type=int, default=8192, help="largest trace batch")
    parser.add_argument("--first-batch", type=int, default=64, help="batch of the first call")
    parser.add_argument("--rebalances", type=int, default=2)
    parser.add_argument(
        "--whole-max-layers",
        type=int,
        default=None,
        help="skip whole-model compiles of more layers (record them as skipped)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--redundant", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--topk-group", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--ranks", type=int, default=8, help="simulated EP ranks (rebalancing)")
    parser.add_argument("--timeout-s", type=float, default=1800, help="per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in workers")
    parser.add_argument("--note", default=None, help="a line for the report (machine, load)")
    parser.add_argument(
        "--render", type=Path, default=None, help="only rewrite the .md of an existing JSON"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if args.render is not None:
        report = json.loads(args.render.read_text())
        report["pass_overhead"] = pass_overhead(report["results"])
        args.render.with_suffix(".md").write_text(markdown(report))
        print(f"wrote {args.render.with_suffix('.md')}")
        return 0
    if args.max_batch < 1 or args.first_batch < 1:
        raise SystemExit("--max-batch and --first-batch must be >= 1")
    sys.path.insert(0, str(REPO))
    env = environment(args.device)
    label = args.label or ("cuda" if args.device.startswith("cuda") else "cpu")
    common = {
        key: getattr(args, key)
        for key in (
            "device", "experts", "redundant", "top_k", "groups", "topk_group", "hidden",
            "intermediate", "dtype", "ranks", "max_batch", "first_batch", "rebalances", "threads",
        )
    }  # fmt: skip
    results = []
    start = time.perf_counter()
    for layers in args.layers:
        for mode in args.modes:
            for compiler in args.compilers:
                row = {"layers": layers, "mode": mode, "compiler": compiler}
                if (
                    mode == "whole"
                    and args.whole_max_layers is not None
                    and layers > args.whole_max_layers
                ):
                    row["skipped"] = f"--whole-max-layers {args.whole_max_layers}"
                else:
                    print(f"{layers:3d} layers {mode:8s} {compiler:22s} ...", end=" ", flush=True)
                    row.update(run_one({**common, **row}, args.timeout_s))
                    print(
                        row.get("error")
                        or f"cold {row['cold_compile_s']:.1f} s, warm {row['warm_compile_s']:.1f} s,"
                        f" pass {row['pass_s']:.2f} s, graphs {row['cold_graphs']} + "
                        f"{row['trace_graphs_compiled']} in the trace",
                        flush=True,
                    )
                results.append(row)
    report = {
        "label": label,
        "note": args.note,
        "environment": env,
        "command": "python bench/compile_time.py " + " ".join(argv),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "render")},
        "trace_sizes": trace_sizes(args.max_batch),
        "trace_events": len(trace_events(args.max_batch, args.rebalances)),
        "results": results,
        "pass_overhead": pass_overhead(results),
        "elapsed_s": time.perf_counter() - start,
    }
    report["args"]["layers"] = args.layers
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"compile_time_{label}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
