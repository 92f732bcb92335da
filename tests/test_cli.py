"""The ``moe-compile`` command: explain, bench dispatch, demo wiring."""

import json

import pytest
import torch

from moe_compile import cli


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr()


DEEPSEEK_FLAGS = (
    "--num-experts", "16", "--top-k", "4", "--scoring-func", "sigmoid", "--bias",
    "--grouped", "--num-expert-group", "4", "--topk-group", "2",
    "--routed-scaling-factor", "2.5",
)  # fmt: skip


def sections(text):
    before = text.split("--- before ---")[1].split("--- after ---")[0]
    after = text.split("--- after ---")[1]
    return before, after


def test_explain_grouped_with_eplb_fuses_into_route_eplb(capsys):
    code, out = run(capsys, "explain", *DEEPSEEK_FLAGS, "--redundant-experts", "4")
    assert code == 0
    before, after = sections(out.out)
    assert "GroupedTopKRouter; EPLB on, 4 redundant experts" in out.out
    assert "aten.topk" in before and "aten.sigmoid" in before and "aten.index_put" in before
    assert "moe_compile.route_eplb" in after
    for op in ("aten.topk", "aten.sigmoid", "aten.index_put", "aten.sort"):
        assert op not in after
    # The scalars of the configuration end up as arguments of the fused op.
    assert "top_k=4" in after and "num_expert_group=4" in after and "topk_group=2" in after
    assert "routed_scaling_factor=2.5" in after


def test_explain_zero_experts_with_eplb_fuses_into_route_zero_experts(capsys):
    code, out = run(
        capsys, "explain", "--zero-experts", "4", "--redundant-experts", "4", "--ops-only"
    )
    assert code == 0
    assert "ZeroExpertRouter; EPLB on" in out.out
    assert "put in     : auto_functionalized(moe_compile.route_zero_experts)" in out.out
    assert "aten.index_put" in out.out.split("fused away :")[1].split("\n")[0]


def test_explain_without_eplb_fusion_leaves_the_remap(capsys):
    code, out = run(
        capsys, "explain", *DEEPSEEK_FLAGS, "--redundant-experts", "4", "--no-fuse-eplb"
    )
    assert code == 0
    _, after = sections(out.out)
    assert "moe_compile.route(" in after and "route_eplb" not in after
    assert "aten.index_put" in after  # load counting stays in plain ops
    assert "fuse_eplb=False" in out.out


def test_explain_plain_softmax_ops_only(capsys):
    code, out = run(capsys, "explain", "--top-k", "2", "--ops-only")
    assert code == 0
    assert "FusedTopKRouter; EPLB off" in out.out
    assert "--- before ---" not in out.out
    assert "put in     : moe_compile.route" in out.out


def test_explain_reports_when_nothing_fuses(capsys):
    code, out = run(capsys, "explain", "--top-k", "2", "--ops-only", "--no-fuse-routing")
    assert code == 0
    assert "nothing was fused" in out.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (("explain", "--grouped"), "--grouped needs --num-expert-group"),
        (("explain", "--zero-experts", "-1"), "--zero-experts must be >= 0"),
        (("explain", "--redundant-experts", "-1"), "--redundant-experts must be >= 0"),
        (("explain", "--tokens", "0"), "--tokens must be >= 1"),
        (("explain", "--top-k", "40"), "top_k"),
    ],
)
def test_explain_bad_options_exit_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        cli.main(list(argv))
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_list_names_the_scripts(capsys):
    code, out = run(capsys, "bench", "--list")
    assert code == 0
    names = out.out.split()
    for name in ("compile_time", "layer", "plot_routing", "routing_kernel"):
        assert name in names
    assert "_png" not in names


def test_bench_unknown_name_exits_with_the_list():
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'; available: .*compile_time"):
        cli.main(["bench", "nope"])


def test_bench_passes_arguments_and_exit_status(tmp_path):
    (tmp_path / "echo_args.py").write_text(
        "import sys, pathlib\n"
        "pathlib.Path(sys.argv[1]).write_text(' '.join(sys.argv[2:]))\n"
        "raise SystemExit(3)\n"
    )
    out_file = tmp_path / "args.txt"
    code = cli.run_bench("echo_args", [str(out_file), "--help", "x"], folder=tmp_path)
    assert code == 3
    assert out_file.read_text() == "--help x"


def test_bench_plot_routing_through_the_cli(tmp_path, capsys):
    timings = [
        {"case": "E8_k2", "eplb": True, "num_tokens": t, "impl": impl, "us_per_call": us,
         "floor_us": 1.0}
        for t in (1, 64)
        for impl, us in (("eager", 40.0), ("kernel", 4.0))
    ]  # fmt: skip
    source = tmp_path / "routing_kernel.json"
    source.write_text(json.dumps({"device": "test", "timings": timings}))
    code, _ = run(capsys, "bench", "plot_routing", str(source))
    assert code == 0
    assert (tmp_path / "routing_kernel.md").exists() and (tmp_path / "routing_kernel.png").exists()


def test_demo_through_the_cli(capsys):
    code, out = run(
        capsys,
        "demo", "--backend", "passes", "--steps", "4", "--layers", "1",
        "--batch-sizes", "16,3", "--quiet", "--no-graphs",
    )  # fmt: skip
    assert code == 0
    assert "1 MoE blocks" in out.out
    assert "recompiles while serving 4 batches of sizes [3, 16]" in out.out
    assert "balancedness after rebalancing" in out.out
    assert out.err == ""  # --quiet: no progress bar


def test_demo_rejects_bad_batch_sizes(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["demo", "--batch-sizes", "4,0"])
    assert stop.value.code == 2
    assert "batch sizes must be positive" in capsys.readouterr().err
