"""The benchmark scripts' own logic: traces, tables, the PNG plotter, a CPU smoke run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _png  # noqa: E402
import compile_time  # noqa: E402
import layer as layer_bench  # noqa: E402
import plot_routing  # noqa: E402

# ------------------------------------------------------------ compile_time


def test_trace_sizes_cover_one_to_max_with_odd_sizes():
    sizes = compile_time.trace_sizes(8192)
    assert sorted(s for s in sizes if s & (s - 1) == 0) == [2**i for i in range(14)]
    assert {3, 77, 1000} <= set(sizes)
    assert len(sizes) == 14 + 3
    assert compile_time.trace_sizes(100)[-1] == 100 and max(compile_time.trace_sizes(100)) == 100
    with pytest.raises(ValueError, match="max_batch"):
        compile_time.trace_sizes(0)


def test_trace_turns_eplb_off_only_before_any_rebalance():
    events = compile_time.trace_events(64, rebalances=3)
    names = [name for name, _ in events]
    assert names.count("rebalance") == 3
    assert names.index("eplb_off") < names.index("eplb_on") < names.index("rebalance")
    assert names.count("eplb_off") == 1
    assert names.index("record_off") < names.index("record_on")
    served = [batch for name, batch in events if name == "serve"]
    assert set(served) == set(compile_time.trace_sizes(64))
    assert all(batch == 0 for name, batch in events if name != "serve")


def _row(layers, mode, compiler, cold, pass_s, setup):
    return {
        "layers": layers, "mode": mode, "compiler": compiler, "cold_compile_s": cold,
        "warm_compile_s": 0.5, "pass_s": pass_s, "pattern_setup_s": setup,
        "pass_share_of_cold_compile": pass_s / cold, "cold_graphs": 1,
        "trace_graphs_compiled": 1, "trace_recompiled_at_batch": ["1 (EPLB off)"],
        "fused": {"route_eplb": 1} if compiler == "moe_compile" else {},
    }  # fmt: skip


def test_pass_overhead_and_markdown():
    results = [
        _row(4, "regional", "moe_compile", 20.0, 1.5, 1.0),
        _row(4, "regional", "torch_compile_dynamic", 19.0, 0.0, 0.0),
        {
            "layers": 61,
            "mode": "whole",
            "compiler": "moe_compile",
            "skipped": "--whole-max-layers 4",
        },
    ]
    [entry] = compile_time.pass_overhead(results)
    assert entry["pass_share"] == pytest.approx(1.5 / 20.0)
    assert entry["pass_share_without_pattern_setup"] == pytest.approx(0.5 / 19.0)
    assert entry["vs_torch_compile_dynamic"] == pytest.approx(20.0 / 19.0 - 1)
    report = {
        "label": "test",
        "environment": {"card": "C", "torch": "T", "triton": "X", "python": "P", "date": "D"},
        "command": "python bench/compile_time.py --x",
        "args": {"experts": 256, "redundant": 32, "groups": 8, "topk_group": 4, "top_k": 8,
                 "hidden": 128, "intermediate": 64, "dtype": "bfloat16", "rebalances": 2},
        "trace_sizes": [1, 2], "trace_events": 9, "results": results,
        "pass_overhead": compile_time.pass_overhead(results),
    }  # fmt: skip
    text = compile_time.markdown(report)
    assert "| 4 | regional | moe_compile | 20.0 | 0.5 | 1.50 (1.00) | 7.5% |" in text
    assert "| 61 | whole | moe_compile | skipped: --whole-max-layers 4 |" in text
    assert "time in the pass is 7.5% of moe_compile's cold compile (2.6% without" in text
    assert "**MISSED**" in text  # 7.5% is over the 5% target


# ------------------------------------------------------------------- layer


def test_layer_replicas_hold_their_logical_experts():
    shape = dict(layer_bench.SHAPES["deepseek_v3"], **layer_bench.TINY["deepseek_v3"])
    module = layer_bench.MoELayer(shape, torch.float32, "cpu")
    experts = shape["experts"]
    for name in ("w13_weight", "w2_weight"):
        weight = getattr(module.moe, name)
        assert weight.shape[0] == experts + shape["redundant"]
        for physical in range(experts, weight.shape[0]):
            assert torch.equal(weight[physical], weight[physical % experts])
        assert weight[:experts].std() > 0


def test_layer_bench_cpu_smoke_run(tmp_path, capsys):
    code = layer_bench.main(
        ["--device", "cpu", "--tiny", "--modes", "eager", "--shapes", "qwen3_moe",
         "--tokens", "1,8", "--iters", "1", "--repeats", "1", "--warmup", "0",
         "--dtype", "float32", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "layer_cpu_tiny.json").read_text())
    assert [row["num_tokens"] for row in report["rows"]] == [1, 8]
    for row in report["rows"]:
        assert row["tokens_per_s"] == pytest.approx(row["num_tokens"] / (row["us_per_call"] / 1e6))
    assert report["environment"]["torch"] == torch.__version__
    assert "| 8 |" in (tmp_path / "layer_cpu_tiny.md").read_text()


# --------------------------------------------------------- plot_routing / png


def test_png_round_trip_and_line_pixels(tmp_path):
    canvas = _png.Canvas(40, 30)
    canvas.line(5, 5, 35, 5, (255, 0, 0))
    canvas.line(5, 20, 35, 20, (0, 0, 255), dash=4)
    path = tmp_path / "t.png"
    canvas.save(path)
    pixels = _png.decode_png(path.read_bytes())
    assert pixels.shape == (30, 40, 3)
    assert (pixels[5, 5:36] == (255, 0, 0)).all()
    assert (pixels[6] == 255).all()
    dashed = (pixels[20, 5:36] == (0, 0, 255)).all(axis=1)
    assert dashed[:4].all() and not dashed[4:8].any() and dashed[8:12].all()
    with pytest.raises(ValueError, match="uint8"):
        _png.encode_png(np.zeros((2, 2), np.uint8))


def test_loglog_panel_puts_points_on_log_positions(tmp_path):
    # y = x**2 is a straight line on log-log axes and a strongly curved one on linear axes.
    series = _png.Series("a", [1, 10, 100], [1, 100, 10000], colour=(0, 200, 0))
    path = tmp_path / "p.png"
    _png.plot_panels([_png.Panel("T", [series])], path, panel_size=(500, 400))
    pixels = _png.decode_png(path.read_bytes())
    green = np.argwhere((pixels == (0, 200, 0)).all(axis=2))
    # The legend swatch sits near the top-left; the data line spans the plot area.
    data = green[green[:, 0] > 60]
    xs, ys = data[:, 1].astype(float), data[:, 0].astype(float)
    fit = np.polyfit(xs, ys, 1)
    residual = ys - np.polyval(fit, xs)
    assert fit[0] < 0 and np.abs(residual).max() < 5
    assert xs.max() - xs.min() > 200 and ys.max() - ys.min() > 200


def _routing_report():
    timings = []
    for eplb in (False, True):
        for tokens in (1, 1024):
            for impl, us in (("eager", 50.0 + tokens / 10), ("kernel", 2.0 + tokens / 100)):
                timings.append(
                    {"case": "E256_k8", "eplb": eplb, "num_tokens": tokens, "impl": impl,
                     "us_per_call": us, "floor_us": 1.0 + tokens / 200}
                )  # fmt: skip
    timings.append(
        {"case": "E256_k8", "eplb": True, "num_tokens": 1024, "impl": "torch_compile",
         "us_per_call": None, "floor_us": 6.12, "error": "RuntimeError: out of memory"}
    )  # fmt: skip
    return {"device": "H100", "torch": "2.13", "triton": "3.6", "date": "2026-01-01",
            "timings": timings}  # fmt: skip


def test_routing_markdown_table_values():
    text = plot_routing.markdown(_routing_report())
    assert "Device: H100; torch 2.13; triton 3.6; date 2026-01-01." in text
    section = text.split("## E256_k8, EPLB on")[1]
    # T=1024: eager 152.4, kernel 12.24, floor 6.12 -> 50% of floor, 12.5x vs eager.
    expected_pct = f"{100 * 6.12 / 12.24:.0f}%"
    expected_speedup = f"{152.4 / 12.24:.1f}x"
    assert (
        f"| 1024 | 152.40 | err | 12.24 | 6.12 | {expected_pct} | {expected_speedup} |" in section
    )
    assert "- E256_k8 EPLB on T=1024 torch_compile: RuntimeError: out of memory" in text


def test_plot_routing_main_writes_files(tmp_path):
    source = tmp_path / "routing_kernel.json"
    source.write_text(json.dumps(_routing_report()))
    assert plot_routing.main([str(source), "--out", str(tmp_path / "out")]) == 0
    pixels = _png.decode_png((tmp_path / "out" / "routing_kernel.png").read_bytes())
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    # Both implementations were drawn in their palette colours.
    for colour in _png.PALETTE[:2]:
        assert (pixels == colour).all(axis=2).sum() > 50
    panels = plot_routing.panels(_routing_report())
    assert [p.title for p in panels] == ["E256_k8  EPLB OFF", "E256_k8  EPLB ON"]
    assert panels[1].series[-1].dashed and panels[1].series[-1].label == plot_routing.FLOOR


def test_plot_routing_rejects_other_json(tmp_path):
    source = tmp_path / "x.json"
    source.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="no 'timings' list"):
        plot_routing.load_report(source)


def test_plot_routing_baseline_adds_only_missing_implementations():
    report = _routing_report()
    new = dict(report, timings=[t for t in report["timings"] if t["impl"] == "kernel"])
    new["timings"] = [dict(t, us_per_call=t["us_per_call"] / 2) for t in new["timings"]]
    merged = plot_routing.merge_baseline(new, report, "old.json")
    by_impl = {}
    for t in merged["timings"]:
        by_impl.setdefault(t["impl"], []).append(t["us_per_call"])
    # The new run's kernel times are kept; eager and torch_compile come from the baseline.
    assert by_impl["kernel"] == [t["us_per_call"] for t in new["timings"]]
    assert len(by_impl["eager"]) == 4 and len(by_impl["torch_compile"]) == 1
    assert "Columns eager, torch_compile are from old.json" in plot_routing.markdown(merged)
    with pytest.raises(ValueError, match="baseline ran on"):
        plot_routing.merge_baseline(new, dict(report, device="A100"), "old.json")
