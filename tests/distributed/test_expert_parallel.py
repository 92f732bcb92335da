"""Expert parallelism on CPU/gloo: the layer split over 2 or 4 ranks equals the single-process layer."""

from __future__ import annotations

import pytest
import torch
from gloo_helpers import run_on_ranks

from moe_compile import EplbLayerState, FusedMoE, Int8WeightOnlyFusedMoEMethod

H, INTER, K = 16, 8, 2
NUM_TOKENS = 29

# Twelve physical experts for EPLB: 8 logical + 4 replicas, divisible by 2 and 4 ranks.
EPLB_PHYSICAL_TO_LOGICAL = [3, 0, 5, 1, 7, 2, 0, 6, 4, 3, 1, 0]


def eplb_maps(physical_to_logical, num_logical):
    replicas = [
        [p for p, e in enumerate(physical_to_logical) if e == logical]
        for logical in range(num_logical)
    ]
    width = max(len(r) for r in replicas)
    l2p = torch.tensor([r + [-1] * (width - len(r)) for r in replicas])
    return l2p, torch.tensor([len(r) for r in replicas])


SCENARIOS = {
    "linear": {"num_experts": 8, "kwargs": {}},
    "linear_uneven": {"num_experts": 10, "kwargs": {}},
    "round_robin_uneven": {"num_experts": 10, "kwargs": {"expert_placement": "round_robin"}},
    "eplb_replicas": {
        "num_experts": 8,
        "kwargs": {"eplb_state": EplbLayerState(), "num_redundant_experts": 4},
        "eplb": EPLB_PHYSICAL_TO_LOGICAL,
    },
    "eplb_int8": {
        "num_experts": 8,
        "kwargs": {
            "eplb_state": EplbLayerState(),
            "num_redundant_experts": 4,
            "quant_method": Int8WeightOnlyFusedMoEMethod(),
            "eplb_replica_policy": "modulo",
        },
        "eplb": EPLB_PHYSICAL_TO_LOGICAL,
    },
    "shared_experts": {"num_experts": 8, "kwargs": {"num_fused_shared_experts": 2}, "extra": 2},
    "zero_experts": {
        "num_experts": 8,
        "kwargs": {
            "zero_expert_type": "identity",
            "e_score_correction_bias": torch.tensor([0.0] * 8 + [0.2, 0.2]),
            "renormalize": False,
        },
        "extra_logits": 2,
    },
    "grouped_gelu_reference_impl": {
        "num_experts": 8,
        "kwargs": {
            "use_grouped_topk": True,
            "num_expert_group": 4,
            "topk_group": 2,
            "activation": "gelu",
            "experts_impl": "reference",
        },
    },
}


def run_scenario(name, ep_size, ep_rank, num_tokens=NUM_TOKENS, compile_layer=False):
    """Build the layer of ``name`` for one rank, load the shared weights, run one batch."""
    scenario = SCENARIOS[name]
    num_experts = scenario["num_experts"]
    layer = FusedMoE(
        num_experts, K, H, INTER, ep_size=ep_size, ep_rank=ep_rank, **scenario["kwargs"]
    )
    g = torch.Generator().manual_seed(len(name))
    num_sources = num_experts + scenario.get("extra", 0)
    w13 = torch.randn(num_sources, 2 * INTER, H, generator=g) / H**0.5
    w2 = torch.randn(num_sources, H, INTER, generator=g) / INTER**0.5
    x = torch.randn(num_tokens, H, generator=g)
    num_logits = num_experts + scenario.get("extra", 0) + scenario.get("extra_logits", 0)
    logits = torch.randn(num_tokens, num_logits, generator=g)
    load = None
    if "eplb" in scenario:
        physical_to_logical = torch.tensor(scenario["eplb"])
        l2p, counts = eplb_maps(scenario["eplb"], num_experts)
        layer.load_logical_weights(w13, w2, physical_to_logical)
        load = torch.zeros(1, layer.global_num_experts, dtype=torch.int32)
        layer.set_eplb_state(0, load, l2p[None], counts[None])
        layer.eplb_state.should_record_tensor = torch.tensor(True)
    else:
        layer.load_logical_weights(w13, w2)
    if compile_layer:
        # the all-reduce must trace into the same single graph as the rest of the layer
        layer = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = layer(x, logits)
    return {
        "out": out,
        "load": None if load is None else load[0],
        "local_num_experts": layer.local_num_experts,
    }


def run_all_scenarios(rank, world_size, names):
    results = {name: run_scenario(name, world_size, rank) for name in names}
    results["empty_batch"] = run_scenario("eplb_replicas", world_size, rank, num_tokens=0)
    if world_size == 2:
        results["compiled"] = run_scenario("eplb_replicas", world_size, rank, compile_layer=True)
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_equals_single_process(world_size):
    names = list(SCENARIOS)
    per_rank = run_on_ranks(world_size, run_all_scenarios, names)
    for name in names:
        expected = run_scenario(name, 1, 0)
        local_counts = [results[name]["local_num_experts"] for results in per_rank]
        assert sum(local_counts) == expected["local_num_experts"]  # every expert on one rank
        for rank, results in enumerate(per_rank):
            got = results[name]
            assert got["out"].abs().max() > 0
            torch.testing.assert_close(
                got["out"], expected["out"], rtol=1e-5, atol=1e-6, msg=f"{name} rank {rank}"
            )
            if expected["load"] is not None:
                # every rank sees every token, so each counts the same global physical load
                assert got["load"].tolist() == expected["load"].tolist(), (name, rank)
                assert int(got["load"].sum()) == NUM_TOKENS * K
    for results in per_rank:
        assert results["empty_batch"]["out"].shape == (0, H)
        assert int(results["empty_batch"]["load"].sum()) == 0
    if world_size == 2:
        expected = run_scenario("eplb_replicas", 1, 0)
        for results in per_rank:
            torch.testing.assert_close(
                results["compiled"]["out"], expected["out"], rtol=1e-5, atol=1e-6
            )
            assert results["compiled"]["load"].tolist() == expected["load"].tolist()
    # uneven split: 10 experts over 4 ranks are 3, 3, 2, 2
    if world_size == 4:
        assert [r["linear_uneven"]["local_num_experts"] for r in per_rank] == [3, 3, 2, 2]


def failing_rank(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    return rank


def test_run_on_ranks_propagates_child_exceptions():
    with pytest.raises(Exception, match="rank 1 failed on purpose"):
        run_on_ranks(2, failing_rank)
