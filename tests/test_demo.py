"""The demo's claims, checked on a small run: fusion, compiled == eager, no recompiles,
better balance after rebalancing."""

import io

import pytest
import torch

from moe_compile import demo
from moe_compile.eplb import rebalance

ROUTE_EPLB = "auto_functionalized(moe_compile.route_eplb)"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_config(**overrides) -> demo.DemoConfig:
    settings = dict(
        num_layers=2,
        steps=8,
        batch_sizes=(48, 1, 96, 5),
        timing_tokens=32,
        timing_repeats=1,
        backend="passes",
    )
    settings.update(overrides)
    return demo.DemoConfig(**settings)


@pytest.fixture(scope="module")
def report():
    torch._dynamo.reset()
    return demo.run_demo(small_config())


def test_routing_graph_is_fused_into_one_op(report):
    graph = report.graph
    assert graph.ops_after.get(ROUTE_EPLB) == 1
    assert ROUTE_EPLB not in graph.ops_before
    # The eager routing math (top-k, group sort, the load scatter) is gone after the pass.
    for op in ("aten.topk", "aten.sigmoid", "aten.sort", "aten.index_put"):
        assert op in graph.ops_before and op not in graph.ops_after, op
    assert graph.fused_ops["aten.topk"] == graph.ops_before["aten.topk"]
    assert graph.new_ops == {ROUTE_EPLB: 1}
    assert "moe_compile.route_eplb" in graph.after and "aten.topk" in graph.before


def test_compiled_blocks_fuse_and_equal_eager(report):
    assert report.fused_in_compiled_graphs.get("route_eplb", 0) >= 1
    assert report.max_abs_diff < 1e-4
    assert report.load_matches_eager


def test_one_graph_and_no_recompiles_while_serving(report):
    assert report.graphs_compiled == 1
    assert report.recompiles == 0
    assert report.batch_sizes_seen == [1, 5, 48, 96]
    assert report.tokens_served == 2 * (48 + 1 + 96 + 5)


def test_rebalancing_improves_balance_and_keeps_outputs(report):
    assert report.balancedness_after > report.balancedness_before
    assert report.balancedness_planned > report.balancedness_before
    assert 0 < report.balancedness_before < 1 and report.balancedness_after <= 1
    assert report.changed_slots > 0
    assert report.output_unchanged_by_rebalance < 1e-4


def test_report_text_states_the_measurements(report):
    text = demo.format_report(report)
    assert f"balancedness before rebalancing: {report.balancedness_before:.3f}" in text
    assert f"recompiles while serving {report.serve_steps} batches" in text
    assert "moe_compile.route_eplb" in text  # the after graph is shown
    short = demo.format_report(report, show_graphs=False)
    assert "--- before ---" not in short and "fused away" in short


def test_simulated_balancedness_matches_hand_computation():
    # SPEC 4: [[100, 0, 0, 0]] over 4 ranks is 0.25. Two slots per rank here.
    load = torch.tensor([[60, 40, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert demo.simulated_balancedness(load, 4) == pytest.approx((0.25 + 1.0) / 2)
    # Ranks loads 3, 7 -> mean 5 / max 7.
    assert demo.simulated_balancedness(torch.tensor([[1, 2, 3, 4]]), 2) == pytest.approx(5 / 7)


def test_planned_load_splits_each_expert_over_its_replicas():
    logical = torch.tensor([[90.0, 30.0, 10.0]])
    new_map, _, counts = rebalance(logical, 4, 1, 1, 2)
    planned = demo.planned_physical_load(logical, new_map)
    for slot, expert in enumerate(new_map[0].tolist()):
        assert planned[0, slot] == pytest.approx(logical[0, expert] / counts[0, expert])
    assert planned.sum() == pytest.approx(logical.sum())


def test_zipf_stream_is_skewed_and_reproducible():
    first = demo.ZipfTokens(1000, 1.2, seed=3).batch(20000)
    again = demo.ZipfTokens(1000, 1.2, seed=3).batch(20000)
    assert torch.equal(first, again)
    counts = torch.bincount(first, minlength=1000).double() / first.numel()
    expected_top = 1 / sum((i + 1) ** -1.2 for i in range(1000))
    assert counts[0] == pytest.approx(expected_top, rel=0.1)
    assert counts[0] > 10 * counts[50]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(steps=1), "steps"),
        (dict(num_redundant_experts=3), "split evenly"),
        (dict(num_expert_group=5), "groups"),
        (dict(backend="eager"), "backend"),
        (dict(batch_sizes=(4, 0)), "batch_sizes"),
        (dict(num_layers=0), "num_layers"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_progress_bar_writes_stage_lines_when_not_a_terminal():
    stream = io.StringIO()
    bar = demo.Progress(4, stream=stream, width=8)
    bar.update(1, "first")
    bar.update(1)  # same stage, not a terminal: no new line
    bar.update(2, "second")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[##------]   1/4") and lines[0].endswith("first")
    assert lines[1].startswith("[########]   4/4") and lines[1].endswith("second")


@pytest.mark.slow
def test_inductor_run_fuses_and_equals_eager():
    """The real path: Inductor generates code for the fused graph (one compile, ~10 s)."""
    with torch._inductor.config.patch(fx_graph_cache=False):
        report = demo.run_demo(small_config(backend="inductor", steps=4))
    assert report.fused_in_compiled_graphs.get("route_eplb", 0) >= 1
    assert report.graphs_compiled == 1 and report.recompiles == 0
    assert report.max_abs_diff < 1e-4 and report.load_matches_eager
    assert report.balancedness_after > report.balancedness_before
