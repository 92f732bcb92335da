"""The first thing to run: a small DeepSeek-style MoE model, compiled with moe_compile.

What it does, in order (a text progress bar on stderr follows along):

1. builds a model of a few MoE blocks (RMSNorm, gate, ``FusedMoE`` with grouped
   sigmoid routing with a score-correction bias, redundant experts, EPLB on),
2. shows one block's routing graph before and after the fusion pass (the
   light AOTAutograd backend, no code generation) and which ops were fused,
3. compiles the repeated block once with ``moe_compile.compile`` (regional
   compilation: one graph serves every block and every batch size),
4. serves a skewed (Zipf) token stream with changing batch sizes, counting
   the experts' load, rebalances the experts halfway (the DeepSeek policy,
   planned for a few simulated expert-parallel ranks) and serves on,
5. checks compiled == eager, counts recompiles and times compiled vs eager.

Every number it prints is measured in this run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import moe_compile as mc
from moe_compile.eplb import EplbLayerState, balancedness, rebalance

BACKENDS = ("inductor", "passes")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DemoConfig:
    """Everything the demo's numbers depend on. Defaults finish in about a minute on 2 CPU cores."""

    num_layers: int = 4
    num_experts: int = 16
    num_redundant_experts: int = 4
    top_k: int = 4
    num_expert_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    hidden_size: int = 64
    intermediate_size: int = 32
    vocab_size: int = 4096
    zipf_exponent: float = 1.2
    simulated_ranks: int = 4
    steps: int = 24
    batch_sizes: tuple[int, ...] = (96, 1, 256, 17, 512, 64, 3, 128)
    timing_tokens: int = 512
    timing_repeats: int = 5
    seed: int = 0
    device: str = "cpu"
    backend: str = "inductor"
    dtype: str = "float32"

    def __post_init__(self):
        positive = (
            "num_layers",
            "num_experts",
            "top_k",
            "num_expert_group",
            "topk_group",
            "hidden_size",
            "intermediate_size",
            "vocab_size",
            "simulated_ranks",
            "timing_tokens",
            "timing_repeats",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.steps < 2:
            raise ValueError(
                f"steps must be at least 2 (serve, rebalance, serve), got {self.steps}"
            )
        if self.num_redundant_experts < 0:
            raise ValueError(
                f"num_redundant_experts must be >= 0, got {self.num_redundant_experts}"
            )
        num_physical = self.num_experts + self.num_redundant_experts
        if num_physical % self.simulated_ranks:
            raise ValueError(
                f"{num_physical} physical experts (num_experts={self.num_experts} + "
                f"num_redundant_experts={self.num_redundant_experts}) do not split evenly over "
                f"simulated_ranks={self.simulated_ranks}"
            )
        if self.num_experts % self.num_expert_group or self.topk_group > self.num_expert_group:
            raise ValueError(
                f"num_experts={self.num_experts} must split into num_expert_group="
                f"{self.num_expert_group} equal groups and topk_group={self.topk_group} "
                "may not exceed the group count"
            )
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be positive ints, got {self.batch_sizes}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")


# ------------------------------------------------------------------ the model


class MoEBlock(nn.Module):
    """A pre-norm residual MoE block: ``x + moe(norm(x), gate(norm(x)))``."""

    def __init__(self, config: DemoConfig, generator: torch.Generator):
        super().__init__()
        hidden, experts = config.hidden_size, config.num_experts
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.gate = nn.Linear(hidden, experts, bias=False)
        nn.init.normal_(self.gate.weight, std=hidden**-0.5, generator=generator)
        self.moe = mc.FusedMoE(
            experts,
            config.top_k,
            hidden,
            config.intermediate_size,
            scoring_func="sigmoid",
            e_score_correction_bias=torch.randn(experts, generator=generator) * 0.05,
            routed_scaling_factor=config.routed_scaling_factor,
            use_grouped_topk=True,
            num_expert_group=config.num_expert_group,
            topk_group=config.topk_group,
            eplb_state=EplbLayerState(),
            num_redundant_experts=config.num_redundant_experts,
            params_dtype=DTYPES[config.dtype],
        )
        intermediate = config.intermediate_size
        w13 = torch.randn(experts, 2 * intermediate, hidden, generator=generator) * hidden**-0.5
        w2 = torch.randn(experts, hidden, intermediate, generator=generator) * intermediate**-0.5
        self.moe.load_logical_weights(w13, w2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden_states)
        return hidden_states + self.moe(normed, self.gate(normed))


def call_block(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The region that gets compiled: one block. Compiling this function (not each
    block) gives one graph that every block, with its own weights and EPLB views, reuses."""
    return block(hidden_states)


class DemoModel(nn.Module):
    """Token embedding, ``num_layers`` MoE blocks, a final norm."""

    def __init__(self, config: DemoConfig):
        super().__init__()
        generator = torch.Generator().manual_seed(config.seed)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        nn.init.normal_(self.embed.weight, generator=generator)
        self.blocks = nn.ModuleList(MoEBlock(config, generator) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)

    def forward(self, token_ids: torch.Tensor, run_block: Callable | None = None) -> torch.Tensor:
        """``run_block(block, x)`` runs each block (default: eagerly)."""
        hidden_states = self.embed(token_ids)
        for block in self.blocks:
            hidden_states = (
                block(hidden_states) if run_block is None else run_block(block, hidden_states)
            )
        return self.norm(hidden_states)


def build_model(config: DemoConfig) -> DemoModel:
    """The demo model in inference mode (parameters without gradients: serving graphs)."""
    model = DemoModel(config).eval().requires_grad_(False)
    # Norms, gate and embedding in the model's dtype; FusedMoE made its experts so.
    return model.to(device=config.device, dtype=DTYPES[config.dtype])


def compile_blocks(backend: str = "inductor", **compile_kwargs) -> tuple[Callable, object]:
    """A compiled ``call_block`` and, for ``backend="passes"``, the recording backend.

    ``"inductor"`` is ``moe_compile.compile`` (the fusion pass inside Inductor);
    ``"passes"`` is AOTAutograd + the fusion pass with no code generation.
    Either way the token dimension is marked dynamic, so one graph serves all
    batch sizes.
    """
    if backend == "inductor":
        return mc.compile(call_block, fullgraph=True, **compile_kwargs), None
    if backend != "passes":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from moe_compile.passes.testing import PassTestBackend

    recorder = PassTestBackend()
    compiled = torch.compile(call_block, backend=recorder, fullgraph=True, **compile_kwargs)

    def run(block, hidden_states):
        mc.mark_dynamic_tokens(hidden_states)
        return compiled(block, hidden_states)

    return run, recorder


class ZipfTokens:
    """A skewed token stream: token ``i`` is drawn with probability ``~ 1 / (i + 1) ** s``."""

    def __init__(self, vocab_size: int, exponent: float, seed: int):
        ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
        self.probabilities = ranks.pow(-exponent)
        self.probabilities /= self.probabilities.sum()
        self.generator = torch.Generator().manual_seed(seed + 1)

    def batch(self, num_tokens: int) -> torch.Tensor:
        return torch.multinomial(
            self.probabilities, num_tokens, replacement=True, generator=self.generator
        )


# ------------------------------------------------------------ graph display


@dataclass
class GraphView:
    """One block's routing graph before and after the fusion pass."""

    before: str
    after: str
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    applied: dict[str, int]

    @property
    def fused_ops(self) -> dict[str, int]:
        """Ops the pass removed: how many of each."""
        return {
            op: count - self.ops_after.get(op, 0)
            for op, count in sorted(self.ops_before.items())
            if count > self.ops_after.get(op, 0)
        }

    @property
    def new_ops(self) -> dict[str, int]:
        return {
            op: count - self.ops_before.get(op, 0)
            for op, count in sorted(self.ops_after.items())
            if count > self.ops_before.get(op, 0)
        }


def routing_graph(block: MoEBlock, hidden_states: torch.Tensor) -> GraphView:
    """Compile the block's router with the recording backend; cheap (no Inductor)."""
    from moe_compile.passes.testing import PassTestBackend

    recorder = PassTestBackend()
    router = block.moe.router
    normed = block.norm(hidden_states)
    logits = block.gate(normed)
    mc.mark_dynamic_tokens(normed, logits)
    # Load counted here is not traffic: pause recording for this one call.
    record = router.eplb_state.should_record_tensor
    was_recording = bool(record)
    record.fill_(False)
    try:
        torch.compile(router.select_experts, backend=recorder, fullgraph=True)(normed, logits)
    finally:
        record.fill_(was_recording)
    graph = recorder.graphs[-1]
    return GraphView(graph.before, graph.after, graph.ops_before, graph.ops_after, graph.applied)


# ---------------------------------------------------------------- progress


class Progress:
    """A text progress bar on a stream (stderr). Redraws in place on a terminal;
    elsewhere writes one line per stage so logs stay readable."""

    def __init__(self, total: int, stream=None, width: int = 30, enabled: bool = True):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.stage = ""
        self.started = time.perf_counter()

    def update(self, advance: int = 0, stage: str | None = None) -> None:
        self.done = min(self.total, self.done + advance)
        new_stage = stage is not None and stage != self.stage
        if stage is not None:
            self.stage = stage
        if not self.enabled or (not self.interactive and not new_stage):
            return
        filled = round(self.width * self.done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.started
        line = f"[{bar}] {self.done:3d}/{self.total} {elapsed:5.1f}s {self.stage}"
        if self.interactive:
            self.stream.write("\r" + line[:120].ljust(120))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.interactive:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------- report


@dataclass
class DemoReport:
    """What the demo measured. Times are seconds unless named otherwise."""

    config: DemoConfig
    graph: GraphView
    model_summary: str
    first_call_s: float
    graphs_compiled: int
    recompiles: int
    fused_in_compiled_graphs: dict[str, int]
    fx_cache_hits: int
    max_abs_diff: float
    load_matches_eager: bool
    output_unchanged_by_rebalance: float
    balancedness_before: float
    balancedness_after: float
    balancedness_planned: float
    changed_slots: int
    eager_ms: float
    compiled_ms: float
    tokens_served: int
    serve_steps: int
    batch_sizes_seen: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.compiled_ms if self.compiled_ms > 0 else math.nan


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], object], repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def simulated_balancedness(physical_load: torch.Tensor, ranks: int) -> float:
    """Mean over layers of mean/max load of ``ranks`` contiguous blocks of physical slots."""
    rank_load = physical_load.unflatten(-1, (ranks, -1)).sum(-1)
    return float(balancedness(rank_load.cpu()).mean())


def _counter_total(group: str, name: str | None = None) -> int:
    from torch._dynamo.utils import counters

    values = counters[group]
    return int(values[name]) if name is not None else int(sum(values.values()))


def _fusion_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters["moe_compile"])


def run_demo(config: DemoConfig | None = None, progress: Progress | None = None) -> DemoReport:
    """Run the whole demo and return what it measured (prints nothing)."""
    config = config or DemoConfig()
    wall_start = time.perf_counter()
    num_serve = config.steps
    progress = progress or Progress(num_serve + 5, enabled=False)
    device = config.device
    torch.manual_seed(config.seed)

    progress.update(stage="building the model")
    model = build_model(config)
    eplb = mc.EplbState.from_model(
        model,
        num_redundant_experts=config.num_redundant_experts,
        window_size=num_serve,
        step_interval=10**9,  # the demo rebalances by hand, halfway
        policy="deepseek",
        num_groups=config.num_expert_group,
    )
    tokens = ZipfTokens(config.vocab_size, config.zipf_exponent, config.seed)
    probe = tokens.batch(config.batch_sizes[0]).to(device)
    progress.update(1, "fusion pass on one block's router (no code generation)")

    with torch.no_grad():
        graph = routing_graph(model.blocks[0], model.embed(probe))
        progress.update(1, f"compiling the MoE block ({config.backend})")

        graphs_at_start = _counter_total("stats", "unique_graphs")
        fused_at_start = _fusion_counts()
        cache_hits_at_start = _counter_total("inductor", "fxgraph_cache_hit")
        run_block, _ = compile_blocks(config.backend)

        # First call compiles. Compare it with eager on the same batch: outputs and
        # the load each path counted.
        eplb.expert_load_pass.zero_()
        expected = model(probe)
        expected_load = eplb.expert_load_pass.clone()
        eplb.expert_load_pass.zero_()
        start = time.perf_counter()
        got = model(probe, run_block)
        _sync(device)
        first_call_s = time.perf_counter() - start
        graphs_after_first = _counter_total("stats", "unique_graphs")
        max_abs_diff = float((got - expected).abs().max())
        load_matches = bool(torch.equal(eplb.expert_load_pass, expected_load))
        eplb.expert_load_pass.zero_()
        progress.update(1, "serving a skewed token stream")

        half = num_serve // 2
        served, sizes_seen, planned, changed = 0, [], math.nan, 0
        before = after = unchanged = math.nan
        for step in range(num_serve):
            if step == half:
                window = eplb.window_load()
                before = simulated_balancedness(window, config.simulated_ranks)
                progress.update(0, "rebalancing (DeepSeek policy)")
                with eplb.recording_paused():
                    output_before = model(probe, run_block)
                new_map, _, _ = rebalance(
                    eplb.logical_load().cpu(),
                    eplb.num_physical_experts,
                    config.num_expert_group,
                    1,
                    config.simulated_ranks,
                    policy="deepseek",
                    old_physical_to_logical=eplb.physical_to_logical_map.cpu(),
                )
                planned_load = planned_physical_load(eplb.logical_load().cpu(), new_map)
                planned = simulated_balancedness(planned_load, config.simulated_ranks)
                changed = int((eplb.physical_to_logical_map.cpu() != new_map).sum())
                eplb.rearrange(new_map)
                with eplb.recording_paused():
                    unchanged = float((model(probe, run_block) - output_before).abs().max())
                progress.update(0, "serving after the rebalance")
            num_tokens = config.batch_sizes[step % len(config.batch_sizes)]
            batch = tokens.batch(num_tokens).to(device)
            model(batch, run_block)
            eplb.step()
            served += num_tokens
            sizes_seen.append(num_tokens)
            progress.update(1)
        after = simulated_balancedness(eplb.window_load(), config.simulated_ranks)

        # After the rebalance the compiled model must still equal eager, load included.
        eplb.expert_load_pass.zero_()
        expected = model(probe)
        expected_load = eplb.expert_load_pass.clone()
        eplb.expert_load_pass.zero_()
        got = model(probe, run_block)
        max_abs_diff = max(max_abs_diff, float((got - expected).abs().max()))
        load_matches = load_matches and bool(torch.equal(eplb.expert_load_pass, expected_load))
        eplb.expert_load_pass.zero_()
        progress.update(1, f"timing eager vs compiled ({config.timing_tokens} tokens)")

        timing_batch = tokens.batch(config.timing_tokens).to(device)
        with eplb.recording_paused():
            model(timing_batch)
            model(timing_batch, run_block)
            eager_ms = _median_ms(lambda: model(timing_batch), config.timing_repeats, device)
            compiled_ms = _median_ms(
                lambda: model(timing_batch, run_block), config.timing_repeats, device
            )
        progress.update(1, "done")
        graphs_total = _counter_total("stats", "unique_graphs")

    fused_now = _fusion_counts()
    fused = {k: v - fused_at_start.get(k, 0) for k, v in fused_now.items()}
    progress.update(1)
    progress.close()
    return DemoReport(
        config=config,
        graph=graph,
        model_summary=_model_summary(config),
        first_call_s=first_call_s,
        graphs_compiled=graphs_total - graphs_at_start,
        recompiles=graphs_total - graphs_after_first,
        fused_in_compiled_graphs={k: v for k, v in fused.items() if v},
        fx_cache_hits=_counter_total("inductor", "fxgraph_cache_hit") - cache_hits_at_start,
        max_abs_diff=max_abs_diff,
        load_matches_eager=load_matches,
        output_unchanged_by_rebalance=unchanged,
        balancedness_before=before,
        balancedness_after=after,
        balancedness_planned=planned,
        changed_slots=changed,
        eager_ms=eager_ms,
        compiled_ms=compiled_ms,
        tokens_served=served,
        serve_steps=num_serve,
        batch_sizes_seen=sorted(set(sizes_seen)),
        wall_s=time.perf_counter() - wall_start,
    )


def planned_physical_load(logical_load: torch.Tensor, physical_to_logical: torch.Tensor):
    """Load each physical slot gets if a logical expert's load splits evenly over its replicas."""
    counts = torch.zeros_like(logical_load, dtype=torch.float64)
    counts.scatter_add_(
        1, physical_to_logical, torch.ones_like(physical_to_logical, dtype=torch.float64)
    )
    per_replica = logical_load.double() / counts.clamp(min=1)
    return per_replica.gather(1, physical_to_logical)


def _model_summary(config: DemoConfig) -> str:
    physical = config.num_experts + config.num_redundant_experts
    return (
        f"{config.num_layers} MoE blocks, hidden {config.hidden_size}, expert FFN "
        f"{config.intermediate_size}; {config.num_experts} experts in "
        f"{config.num_expert_group} groups (keep {config.topk_group}), top-{config.top_k}, "
        f"sigmoid + score-correction bias, scale {config.routed_scaling_factor}; "
        f"EPLB on with {config.num_redundant_experts} redundant experts ({physical} physical, "
        f"{config.simulated_ranks} simulated ranks of {physical // config.simulated_ranks})"
    )


def format_ops(ops: dict[str, int]) -> str:
    return ", ".join(f"{op} x{n}" if n > 1 else op for op, n in ops.items()) or "none"


def format_report(report: DemoReport, show_graphs: bool = True) -> str:
    config, graph = report.config, report.graph
    before_lines = graph.before.count("\n") + 1
    after_lines = graph.after.count("\n") + 1
    lines = [
        "moe_compile demo",
        f"  model   : {report.model_summary}",
        f"  device  : {config.device}, torch {torch.__version__}, backend {config.backend}",
        "",
        f"1. One block's routing graph: {before_lines} nodes before the fusion pass, "
        f"{after_lines} after.",
        f"   fused away : {format_ops(graph.fused_ops)}",
        f"   put in     : {format_ops(graph.new_ops)}",
        f"   rewrites   : {format_ops({k: v for k, v in graph.applied.items() if v})}",
    ]
    if show_graphs:
        lines += ["", "   --- before ---"]
        lines += ["   " + line for line in graph.before.splitlines()]
        lines += ["", "   --- after ---"]
        lines += ["   " + line for line in graph.after.splitlines()]
    cache_note = (
        f", {report.fx_cache_hits} graph(s) from the FX graph cache" if report.fx_cache_hits else ""
    )
    fused = report.fused_in_compiled_graphs
    lines += [
        "",
        f"2. Compiled the MoE block once for all {config.num_layers} blocks: first call "
        f"{report.first_call_s:.1f} s (compile included{cache_note}).",
        f"   fusion pass rewrites in the compiled graphs: {format_ops(fused)}"
        + ("" if fused or not report.fx_cache_hits else " (cached graphs skip the pass)"),
        f"   graphs compiled: {report.graphs_compiled}; recompiles while serving "
        f"{report.serve_steps} batches of sizes {report.batch_sizes_seen}, a rebalance and "
        f"recording pauses: {report.recompiles}",
        f"   compiled vs eager: max |difference| {report.max_abs_diff:.2e}, "
        f"expert load counted identically: {'yes' if report.load_matches_eager else 'NO'}",
        "",
        f"3. EPLB over {report.tokens_served} skewed (Zipf {config.zipf_exponent}) tokens, "
        f"{config.simulated_ranks} simulated ranks:",
        f"   balancedness before rebalancing: {report.balancedness_before:.3f}",
        f"   balancedness after rebalancing : {report.balancedness_after:.3f}  "
        f"(the plan predicted {report.balancedness_planned:.3f}; 1.0 is perfect)",
        f"   {report.changed_slots} of {config.num_layers * (config.num_experts + config.num_redundant_experts)}"
        f" expert slots changed; model output after vs before: max |difference| "
        f"{report.output_unchanged_by_rebalance:.2e}",
        "",
        f"4. {config.timing_tokens} tokens through the model (median of {config.timing_repeats}):",
        f"   eager   : {report.eager_ms:8.2f} ms",
        f"   compiled: {report.compiled_ms:8.2f} ms   ({report.speedup:.2f}x)",
        "",
        f"Finished in {report.wall_s:.1f} s.",
    ]
    return "\n".join(lines)


def _parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from error
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="moe-compile demo")
    parser.description = __doc__.splitlines()[0]
    defaults = DemoConfig()
    parser.add_argument("--device", default=defaults.device, help="cpu (default) or cuda")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="batches to serve")
    parser.add_argument("--layers", type=int, default=defaults.num_layers, help="MoE blocks")
    parser.add_argument(
        "--batch-sizes",
        type=_parse_sizes,
        default=defaults.batch_sizes,
        help="comma-separated batch sizes, cycled while serving",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=defaults.backend,
        help="inductor (default, generates code) or passes (fusion pass only, no codegen)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-graphs", action="store_true", help="print op counts, not graphs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available())")
    config = DemoConfig(
        num_layers=args.layers,
        steps=args.steps,
        batch_sizes=args.batch_sizes,
        seed=args.seed,
        device=args.device,
        backend=args.backend,
    )
    progress = Progress(config.steps + 5, enabled=not args.quiet)
    report = run_demo(config, progress)
    print(format_report(report, show_graphs=not args.no_graphs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
