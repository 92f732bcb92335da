"""Checks that need a GPU, run on the device machine: compiled == eager on CUDA for both
lowering strategies, inside a whole model, with and without CUDA graphs.

    python bench/gpu_checks.py [--out DIR]

Prints one line per check and writes gpu_checks.json; exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._inductor.config
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import moe_compile as mc  # noqa: E402

NUM_EXPERTS, NUM_REDUNDANT, TOP_K, HIDDEN, INTERMEDIATE = 64, 16, 6, 256, 128


class DeepSeekStyleModel(torch.nn.Module):
    """Grouped sigmoid routing with bias, redundant experts, EPLB on."""

    def __init__(self, num_layers: int, device):
        super().__init__()
        self.gates = torch.nn.ModuleList(
            torch.nn.Linear(HIDDEN, NUM_EXPERTS, bias=False) for _ in range(num_layers)
        )
        self.moes = torch.nn.ModuleList(
            mc.FusedMoE(
                NUM_EXPERTS,
                TOP_K,
                HIDDEN,
                INTERMEDIATE,
                scoring_func="sigmoid",
                use_grouped_topk=True,
                num_expert_group=8,
                topk_group=4,
                e_score_correction_bias=torch.randn(NUM_EXPERTS) * 0.01,
                routed_scaling_factor=2.5,
                eplb_state=mc.EplbLayerState(),
                num_redundant_experts=NUM_REDUNDANT,
                params_dtype=torch.bfloat16,
            )
            for _ in range(num_layers)
        )
        generator = torch.Generator().manual_seed(0)
        for moe in self.moes:
            moe.load_logical_weights(
                torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator) / 16,
                torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) / 16,
            )
        self.to(device=device, dtype=torch.bfloat16)

    def forward(self, hidden_states):
        for gate, moe in zip(self.gates, self.moes, strict=True):
            hidden_states = hidden_states + moe(hidden_states, gate(hidden_states))
        return hidden_states


def check_model(strategy: str, mode: str | None, device) -> dict:
    """Each MoE layer compiled (one region shared by all layers) against the same
    layer in eager mode, on identical inputs: routing decisions are discrete, so
    the inputs must be bit-identical for the outputs to be comparable."""
    torch._dynamo.reset()
    counters.clear()
    model = DeepSeekStyleModel(num_layers=3, device=device)
    eplb = mc.EplbState.from_model(model, num_redundant_experts=NUM_REDUNDANT)
    compiled_layers = [
        mc.compile(moe, fusion={"strategy": strategy}, mode=mode, fullgraph=True)
        for moe in model.moes
    ]
    worst, loads_equal = 0.0, True
    sizes = (1, 7, 64, 1000, 4096, 1, 4096) if device.type == "cuda" else (1, 7, 64, 3)
    with torch.no_grad():
        for step, num_tokens in enumerate(sizes):
            hidden = torch.randn(num_tokens, HIDDEN, device=device, dtype=torch.bfloat16)
            for gate, moe, compiled in zip(model.gates, model.moes, compiled_layers, strict=True):
                logits = gate(hidden)
                eplb.expert_load_pass.zero_()
                expected = moe(hidden, logits)
                expected_load = eplb.expert_load_pass.clone()
                eplb.expert_load_pass.zero_()
                got = compiled(hidden, logits)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if num_tokens:
                    worst = max(worst, float((got.float() - expected.float()).abs().max()))
                loads_equal &= torch.equal(eplb.expert_load_pass, expected_load)
                hidden = hidden + expected
            if step == 2:  # a rebalance in place: must not recompile
                permutation = torch.randperm(NUM_EXPERTS + NUM_REDUNDANT, device=device)
                l2p = eplb.logical_to_physical_map
                l2p.copy_(torch.where(l2p >= 0, permutation[l2p.clamp(min=0)], -1))
    fused = counters["moe_compile"]["route_eplb"]
    return {
        "strategy": strategy,
        "mode": mode,
        "max_abs_diff": worst,
        "loads_equal": bool(loads_equal),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "fused_route_eplb": int(fused),
        "inductor_lowering": int(counters["moe_compile"].get("inductor_lowering", 0)),
        "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0)),
        "ok": bool(loads_equal and worst < 0.05 and fused >= 1),
    }


ROUTER_CASES = {
    "softmax_renorm": dict(),
    "sigmoid_bias": dict(scoring_func="sigmoid", e_score_correction_bias=True),
    "grouped_sigmoid_bias": dict(
        scoring_func="sigmoid",
        e_score_correction_bias=True,
        use_grouped_topk=True,
        num_expert_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
    ),
}


def check_router(name: str, strategy: str, device) -> dict:
    """The eager router alone under moe_compile.compile on CUDA: fused, and equal to eager."""
    torch._dynamo.reset()
    counters.clear()
    options = dict(ROUTER_CASES[name])
    if options.pop("e_score_correction_bias", False):
        options["e_score_correction_bias"] = torch.randn(256, device=device) * 0.05
    num_physical = NUM_EXPERTS + NUM_REDUNDANT
    l2p = torch.arange(256, device=device).remainder(num_physical).unsqueeze(-1)
    state = mc.EplbLayerState(
        expert_load_view=torch.zeros(num_physical, dtype=torch.int32, device=device),
        logical_to_physical_map=l2p,
        logical_replica_count=torch.ones(256, dtype=torch.int64, device=device),
        should_record_tensor=torch.tensor(True, device=device),
    )
    router = mc.create_fused_moe_router(
        top_k=8, global_num_experts=num_physical, eplb_state=state, **options
    )
    compiled = mc.compile(router.select_experts, fusion={"strategy": strategy}, fullgraph=True)
    # One graph (fused once) serves both launches and both layouts (1, 3000, 8192 tokens
    # on). Many rows: a near-tie that device math breaks differently shows up as a
    # few differing rows in hundreds of thousands.
    generator = torch.Generator(device=device).manual_seed(0)
    rows_differing, ids_equal, loads_equal, weights_close = 0, True, True, True
    for num_tokens in (1, 3000, 8192, 65536, 65536, 65536, 65536):
        logits = torch.randn(num_tokens, 256, device=device, generator=generator).bfloat16()
        hidden = torch.empty(num_tokens, 1, device=device)
        state.expert_load_view.zero_()
        weights, ids = router.select_experts(hidden, logits)
        expected_load = state.expert_load_view.clone()
        state.expert_load_view.zero_()
        got_weights, got_ids = compiled(hidden, logits)
        rows_differing += int((got_ids != ids).any(dim=-1).sum())
        ids_equal &= torch.equal(got_ids, ids)
        loads_equal &= torch.equal(state.expert_load_view, expected_load)
        weights_close &= torch.allclose(got_weights, weights, rtol=1e-5, atol=1e-6)
    fused = int(counters["moe_compile"]["route_eplb"])
    return {
        "router": name,
        "strategy": strategy,
        "fused_route_eplb": fused,
        "ids_equal": ids_equal,
        "rows_differing": rows_differing,
        "weights_close": weights_close,
        "loads_equal": loads_equal,
        "ok": bool(fused == 1 and ids_equal and weights_close and loads_equal),
    }


def check_score_arithmetic(device) -> dict:
    """Every finite bf16 logit: how many float32 scores Inductor's own sigmoid and softmax
    round differently from eager, and how many the inductor strategy's scores do."""
    from moe_compile.passes.lowering import _scores
    from moe_compile.router.scoring import compute_scores

    torch._dynamo.reset()
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32, device=device).to(torch.int16)
    logits = bits.view(torch.bfloat16).float()
    logits = logits[torch.isfinite(logits)].reshape(-1, 128)  # rows of 128 experts
    result = {"check": "score_arithmetic"}
    for scoring in ("sigmoid", "softmax"):
        eager = compute_scores(logits, scoring)
        inductor_own = torch.compile(compute_scores, dynamic=False)(logits, scoring)
        strategy = torch.compile(_scores, dynamic=False)(logits, scoring)
        result[f"{scoring}_inductor_own_differing"] = int((inductor_own != eager).sum())
        result[f"{scoring}_strategy_differing"] = int((strategy != eager).sum())
    # Softmax sums in another order than eager, so its scores may differ in the last
    # bit (the same for every score of a row, which keeps their order): informative only.
    result["ok"] = result["sigmoid_strategy_differing"] == 0
    return result


def _replicated_state(num_logical: int, num_redundant: int, device) -> mc.EplbLayerState:
    """Logical expert e on physical e, the first ``num_redundant`` also on ``num_logical + e``."""
    experts = torch.arange(num_logical, device=device)
    l2p = torch.stack([experts, num_logical + experts % num_redundant]).T.contiguous()
    return mc.EplbLayerState(
        expert_load_view=torch.zeros(num_logical + num_redundant, dtype=torch.int32, device=device),
        logical_to_physical_map=l2p,
        logical_replica_count=torch.where(experts < num_redundant, 2, 1),
        should_record_tensor=torch.tensor(True, device=device),
    )


def check_counts(device) -> list[dict]:
    """``route_counted`` on CUDA: counts and offsets equal a recount of the ids it returns
    (many programs, the last one writing the offsets), and ids, weights and load equal
    those of ``route`` / ``route_eplb``."""
    from moe_compile.custom_ops import expert_counts_reference, route, route_counted, route_eplb

    results = []
    generator = torch.Generator(device=device).manual_seed(3)
    for grouped in (False, True):
        options = dict(scoring_func="sigmoid", num_expert_group=8, topk_group=4) if grouped else {}
        for eplb in (False, True):
            for num_tokens in (1, 7, 4099, 65536):
                logits = torch.randn(num_tokens, 256, device=device, generator=generator)
                logits = logits.bfloat16()
                state = expected_state = None
                num_bins = 256
                if eplb:
                    num_bins = 256 + 32  # 32 experts with a second replica
                    state = _replicated_state(256, 32, device)
                    expected_state = _replicated_state(256, 32, device)
                weights, ids, counts, offsets = route_counted(logits, 8, num_bins, state, **options)
                if eplb:
                    ref_weights, ref_ids = route_eplb(logits, 8, expected_state, **options)
                else:
                    ref_weights, ref_ids = route(logits, 8, **options)
                ref_counts, ref_offsets = expert_counts_reference(ids, num_bins)
                ok = (
                    torch.equal(ids, ref_ids)
                    and torch.equal(weights, ref_weights)
                    and torch.equal(counts, ref_counts)
                    and torch.equal(offsets, ref_offsets)
                    and (
                        not eplb
                        or torch.equal(state.expert_load_view, expected_state.expert_load_view)
                    )
                )
                results.append(
                    {"check": "route_counted", "grouped": grouped, "eplb": eplb,
                     "num_tokens": num_tokens, "ok": bool(ok)}
                )  # fmt: skip
    return results


def check_zero_experts(device) -> list[dict]:
    """``route_zero_experts`` (the kernel) and the compiled ``ZeroExpertRouter`` against the
    eager router on CUDA: 256 real + 64 zero experts, top-8, EPLB off and on."""
    from moe_compile.custom_ops import route_zero_experts

    results = []
    num_real, num_zero = 256, 64
    generator = torch.Generator(device=device).manual_seed(4)
    bias = torch.randn(num_real + num_zero, device=device, generator=generator) * 0.05
    for eplb in (False, True):
        state = _replicated_state(num_real, 32, device) if eplb else None
        router = mc.create_fused_moe_router(
            top_k=8, global_num_experts=num_real + 32, eplb_state=state,
            zero_expert_type="identity", num_logical_experts=num_real,
            e_score_correction_bias=bias, routed_scaling_factor=2.5, renormalize=False,
        )  # fmt: skip

        def route(hidden, logits, router=router):
            weights, ids = router.select_experts(hidden, logits)
            return weights, ids, router.zero_expert_output

        torch._dynamo.reset()
        counters.clear()
        compiled = mc.compile(route, fullgraph=True)
        for num_tokens in (1, 7, 4099, 65536):
            logits = torch.randn(num_tokens, num_real + num_zero, device=device,
                                 generator=generator).bfloat16()  # fmt: skip
            hidden = torch.ones(num_tokens, 1, device=device)
            outputs, loads = [], []
            for fn in ("eager", "op", "compiled"):
                if eplb:
                    state.expert_load_view.zero_()
                if fn == "eager":
                    outputs.append(route(hidden, logits))
                elif fn == "op":
                    outputs.append(route_zero_experts(
                        logits, 8, num_real, state, e_score_correction_bias=bias,
                        routed_scaling_factor=2.5, renormalize=False,
                    ))  # fmt: skip
                else:
                    outputs.append(compiled(hidden, logits))
                loads.append(state.expert_load_view.clone() if eplb else None)
            (weights, ids, zero_weight), expected_load = outputs[0], loads[0]
            for fn, (got_weights, got_ids, got_zero), load in zip(
                ("op", "compiled"), outputs[1:], loads[1:], strict=True
            ):
                ok = (
                    torch.equal(got_ids, ids)
                    and torch.allclose(got_weights, weights, rtol=1e-6, atol=0)
                    and torch.allclose(got_zero, zero_weight, rtol=1e-6, atol=1e-7)
                    and (not eplb or torch.equal(load, expected_load))
                    and bool((zero_weight > 0).any())
                )
                if fn == "compiled":
                    ok &= counters["moe_compile"]["zero_experts"] >= 1
                results.append(
                    {"check": f"zero_experts_{fn}", "eplb": eplb, "num_tokens": num_tokens,
                     "ok": bool(ok)}
                )  # fmt: skip
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    args = parser.parse_args()
    # The checks count fusions, which a cache hit skips (the passes do not run): a
    # second run on one machine failed them while every result was right.
    torch._inductor.config.fx_graph_cache = False
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    report = {
        "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": time.strftime("%Y-%m-%d"),
        "checks": [],
    }
    failed = False
    if on_gpu:
        gpu_only = [
            check_score_arithmetic(device),
            *check_counts(device),
            *check_zero_experts(device),
        ]
        for result in gpu_only:
            failed |= not result["ok"]
            report["checks"].append(result)
            print(json.dumps(result), flush=True)
    for strategy in ("kernel", "inductor"):
        for name in ROUTER_CASES:
            try:
                result = check_router(name, strategy, device)
            except Exception as error:  # noqa: BLE001
                result = {
                    "router": name,
                    "strategy": strategy,
                    "ok": False,
                    "error": "".join(traceback.format_exception_only(error))[-1500:],
                }
            failed |= not result["ok"]
            report["checks"].append(result)
            print(json.dumps(result), flush=True)
        for mode in (None, "reduce-overhead") if on_gpu else (None,):
            start = time.time()
            try:
                result = check_model(strategy, mode, device)
            except Exception as error:  # noqa: BLE001
                result = {
                    "strategy": strategy,
                    "mode": mode,
                    "ok": False,
                    "error": "".join(traceback.format_exception_only(error))[-1500:],
                }
            result["seconds"] = round(time.time() - start, 1)
            failed |= not result["ok"]
            report["checks"].append(result)
            print(json.dumps(result), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_checks.json").write_text(json.dumps(report, indent=1))
    print("FAILED" if failed else "PASSED")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
