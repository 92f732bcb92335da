"""End-to-end MoE layer throughput: eager vs torch.compile vs moe_compile.

    python bench/layer.py [--out bench/results] [--shapes deepseek_v3,qwen3_moe]
        [--tokens 1,16,128,1024,4096,16384] [--device cuda] [--compile-mode MODE]
    python bench/layer.py --device cpu --tiny      # a smoke test of the script on the CPU

The timed module is one MoE layer as a model holds it: the gate (a linear
layer to router logits) and ``FusedMoE`` (routing, EPLB remap and load
counting, grouped-GEMM experts), with EPLB on and load recording on, as in
serving. Modes:

- ``eager``: the module as written;
- ``torch_compile``: ``torch.compile(fullgraph=True)`` with the token dimension
  marked dynamic exactly as moe_compile marks it, so the only difference from
  the next mode is the fusion pass;
- ``moe_compile``: ``moe_compile.compile`` (the fusion pass installed).

Shapes (one layer, no expert parallelism):

- ``deepseek_v3``: hidden 7168, expert FFN 2048, 256 experts + 32 redundant,
  8 groups keep 4, top-8, sigmoid + score-correction bias, scale 2.5;
- ``qwen3_moe`` (Qwen3-235B-A22B): hidden 4096, expert FFN 1536, 128 experts
  + 16 redundant, softmax top-8, renormalized.

Time per call: median of ``--repeats`` timings of ``--iters`` back-to-back
calls (CUDA events on the GPU). Writes ``layer_<label>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import moe_compile as mc  # noqa: E402

MODES = ("eager", "torch_compile", "moe_compile")
SHAPES = {
    "deepseek_v3": dict(
        hidden=7168,
        intermediate=2048,
        experts=256,
        redundant=32,
        top_k=8,
        scoring_func="sigmoid",
        bias=True,
        scale=2.5,
        groups=8,
        topk_group=4,
    ),
    "qwen3_moe": dict(
        hidden=4096,
        intermediate=1536,
        experts=128,
        redundant=16,
        top_k=8,
        scoring_func="softmax",
        bias=False,
        scale=1.0,
        groups=None,
        topk_group=None,
    ),
}
TINY = {
    "deepseek_v3": dict(
        hidden=64, intermediate=32, experts=16, redundant=4, groups=4, topk_group=2
    ),
    "qwen3_moe": dict(hidden=64, intermediate=32, experts=16, redundant=4),
}
GPU_TOKENS = (1, 16, 128, 1024, 4096, 16384)
TINY_TOKENS = (1, 16, 64)


class MoELayer(nn.Module):
    """Gate + FusedMoE, as a transformer block holds them."""

    def __init__(self, shape: dict, dtype: torch.dtype, device: str, seed: int = 0):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        hidden, experts = shape["hidden"], shape["experts"]
        self.gate = nn.Linear(hidden, experts, bias=False, dtype=dtype, device=device)
        bias = torch.randn(experts, generator=generator) * 0.05 if shape["bias"] else None
        self.moe = mc.FusedMoE(
            experts,
            shape["top_k"],
            hidden,
            shape["intermediate"],
            scoring_func=shape["scoring_func"],
            e_score_correction_bias=bias,
            routed_scaling_factor=shape["scale"],
            use_grouped_topk=shape["groups"] is not None,
            num_expert_group=shape["groups"],
            topk_group=shape["topk_group"],
            eplb_state=mc.EplbLayerState(),
            num_redundant_experts=shape["redundant"],
            params_dtype=dtype,
            device=device,
        )
        with torch.no_grad():
            self.gate.weight.normal_(0, hidden**-0.5)
            # Random logical experts, replicas copied from them (the initial layout
            # p -> p % E), filled in place so no full-size temporary is needed.
            for name, std in (
                ("w13_weight", hidden**-0.5),
                ("w2_weight", shape["intermediate"] ** -0.5),
            ):
                weight = getattr(self.moe, name)
                weight[:experts].normal_(0, std)
                for physical in range(experts, weight.shape[0]):
                    weight[physical].copy_(weight[physical % experts])
        self.requires_grad_(False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden_states, self.gate(hidden_states))


def make_forward(layer: MoELayer, mode: str, compile_mode: str | None):
    if mode == "eager":
        return layer
    kwargs = {"fullgraph": True}
    if compile_mode:
        kwargs["mode"] = compile_mode
    if mode == "moe_compile":
        return mc.compile(layer, **kwargs)
    compiled = torch.compile(layer, **kwargs)

    def run(hidden_states):
        mc.mark_dynamic_tokens(hidden_states)
        return compiled(hidden_states)

    return run


def time_calls(fn, inputs: torch.Tensor, iters: int, repeats: int, device: str) -> float:
    """Median seconds per call over ``repeats`` runs of ``iters`` calls."""
    cuda = torch.device(device).type == "cuda"
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                fn(inputs)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            begin = time.perf_counter()
            for _ in range(iters):
                fn(inputs)
            samples.append((time.perf_counter() - begin) / iters)
    return statistics.median(samples)


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if torch.device(device).type == "cuda":
        card = torch.cuda.get_device_name(torch.device(device))
    else:
        import os

        card = f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"
    return {
        "card": card,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
    }


def bench_shape(name: str, shape: dict, args, report_rows: list[dict]) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    torch._dynamo.reset()  # a new configuration: nothing carried over from the last shape
    layer = MoELayer(shape, dtype, device, seed=args.seed)
    eplb = mc.EplbState.from_model(layer, window_size=8, step_interval=10**9)
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    summary = {"shape": name, **shape, "modes": {}}
    probe = torch.randn(max(args.tokens[0], 7), shape["hidden"], generator=generator)
    probe = probe.to(device=device, dtype=dtype)
    with torch.no_grad():
        expected = layer(probe)
        for mode in args.modes:
            from torch._dynamo.utils import counters

            fused_before = counters["moe_compile"]["route_eplb"]
            graphs_before = counters["stats"]["unique_graphs"]
            forward = make_forward(layer, mode, args.compile_mode)
            start = time.perf_counter()
            got = forward(probe)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            first_call_s = time.perf_counter() - start
            mode_info = {
                "first_call_s": first_call_s,
                "max_abs_diff_vs_eager": float((got.float() - expected.float()).abs().max()),
                "route_eplb_fused": int(counters["moe_compile"]["route_eplb"] - fused_before),
            }
            for num_tokens in args.tokens:
                hidden = torch.randn(num_tokens, shape["hidden"], generator=generator)
                hidden = hidden.to(device=device, dtype=dtype)
                for _ in range(args.warmup):
                    forward(hidden)
                eplb.expert_load_pass.zero_()
                seconds = time_calls(forward, hidden, args.iters, args.repeats, device)
                eplb.expert_load_pass.zero_()
                row = {
                    "shape": name,
                    "mode": mode,
                    "num_tokens": num_tokens,
                    "us_per_call": seconds * 1e6,
                    "tokens_per_s": num_tokens / seconds,
                }
                report_rows.append(row)
                print(
                    f"{name:12s} {mode:14s} T={num_tokens:6d} {seconds * 1e6:12.1f} us "
                    f"{num_tokens / seconds:14.0f} tok/s",
                    flush=True,
                )
            mode_info["graphs_compiled"] = int(counters["stats"]["unique_graphs"] - graphs_before)
            summary["modes"][mode] = mode_info
    del layer, eplb
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return summary


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# MoE layer throughput: {report['label']}",
        "",
        f"{env['card']}; torch {env['torch']}; triton {env['triton']}; Python {env['python']}; "
        f"{env['date']}; dtype {report['args']['dtype']}"
        + (
            f"; compile mode {report['args']['compile_mode']}"
            if report["args"]["compile_mode"]
            else ""
        )
        + ".",
        f"Command: `{report['command']}`",
        "",
        "Tokens per second through one MoE layer (gate + routing + EPLB + experts), EPLB on "
        "with load recording. torch_compile = torch.compile with the same dynamic token "
        "dimension but no fusion pass.",
        "",
    ]
    rows = report["rows"]
    for summary in report["shapes"]:
        name = summary["shape"]
        modes = [m for m in MODES if m in summary["modes"]]
        lines += [
            f"## {name}: hidden {summary['hidden']}, expert FFN {summary['intermediate']}, "
            f"{summary['experts']} experts + {summary['redundant']} redundant, top-{summary['top_k']}",
            "",
            "| tokens | " + " | ".join(f"{m} tok/s" for m in modes) + " | moe_compile vs eager "
            "| moe_compile vs torch_compile |",
            "|---:|" + "---:|" * (len(modes) + 2),
        ]
        by_tokens: dict[int, dict[str, dict]] = {}
        for row in rows:
            if row["shape"] == name:
                by_tokens.setdefault(row["num_tokens"], {})[row["mode"]] = row
        for num_tokens in sorted(by_tokens):
            cells = by_tokens[num_tokens]
            values = [f"{cells[m]['tokens_per_s']:,.0f}" if m in cells else "-" for m in modes]

            def ratio(a, b, cells=cells):
                if a in cells and b in cells:
                    return f"{cells[a]['tokens_per_s'] / cells[b]['tokens_per_s']:.2f}x"
                return "-"

            lines.append(
                f"| {num_tokens} | "
                + " | ".join(values)
                + f" | {ratio('moe_compile', 'eager')} | {ratio('moe_compile', 'torch_compile')} |"
            )
        checks = ", ".join(
            f"{m}: first call {info['first_call_s']:.1f} s, max |diff| vs eager "
            f"{info['max_abs_diff_vs_eager']:.2e}, graphs {info.get('graphs_compiled', '-')}"
            + (f", route_eplb fused {info['route_eplb_fused']}x" if m == "moe_compile" else "")
            for m, info in summary["modes"].items()
            if m != "eager"
        )
        lines += ["", checks or "(eager only)", ""]
    return "\n".join(lines)


def parse_list(text: str, kind=str, allowed=None) -> list:
    items = [kind(part) for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError("empty list")
    if allowed is not None and any(item not in allowed for item in items):
        raise argparse.ArgumentTypeError(f"choose from {tuple(allowed)}, got {items}")
    return items


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--label", default=None, help="file name suffix (default: device)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument(
        "--shapes", type=lambda t: parse_list(t, allowed=SHAPES), default=list(SHAPES)
    )
    parser.add_argument("--modes", type=lambda t: parse_list(t, allowed=MODES), default=list(MODES))
    parser.add_argument("--tokens", type=lambda t: parse_list(t, int), default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--compile-mode", default=None, help="e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # route_eplb_fused counts pass runs, which a cache hit skips.
    torch._inductor.config.fx_graph_cache = False
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "CUDA is not available: run with --device cpu --tiny for a smoke test", file=sys.stderr
        )
        return 2
    if args.tokens is None:
        args.tokens = list(TINY_TOKENS if args.tiny else GPU_TOKENS)
    if min(args.tokens) < 1:
        parser.error(f"--tokens must be positive, got {args.tokens}")
    if args.iters is None:
        args.iters = 3 if args.device == "cpu" else 20
    label = args.label or ("cpu_tiny" if args.tiny else args.device.split(":")[0])
    rows: list[dict] = []
    summaries = []
    for name in args.shapes:
        shape = dict(SHAPES[name], **(TINY[name] if args.tiny else {}))
        summaries.append(bench_shape(name, shape, args, rows))
    report = {
        "label": label,
        "environment": environment(args.device),
        "command": "python bench/layer.py " + " ".join(argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shapes": summaries,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"layer_{label}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
