"""Stub demo: route one batch with a DeepSeek-style grouped router and EPLB on.

It prints the logical choice, the physical replicas EPLB sent each slot to,
the weights, and the per-physical-expert load that was counted. (A fuller
demo with the compiled MoE layer replaces this one.)
"""

from __future__ import annotations

import argparse

import torch

from moe_compile import EplbLayerState, create_fused_moe_router

NUM_LOGICAL_EXPERTS = 16
REDUNDANT_REPLICAS = (0, 3, 5, 9)  # logical experts that get a second physical copy
NUM_EXPERT_GROUPS, TOPK_GROUP, TOP_K = 4, 2, 4


def replica_tables(num_logical: int, extra: tuple[int, ...]):
    """Model-wide ``[1, E, S]`` map and ``[1, E]`` counts for physical layout
    ``[0..E-1] + extra`` (one MoE layer)."""
    physical_to_logical = list(range(num_logical)) + list(extra)
    replicas = [[] for _ in range(num_logical)]
    for physical, logical in enumerate(physical_to_logical):
        replicas[logical].append(physical)
    width = max(len(r) for r in replicas)
    table = [r + [-1] * (width - len(r)) for r in replicas]
    return (
        torch.tensor([table]),
        torch.tensor([[len(r) for r in replicas]]),
        len(physical_to_logical),
    )


def run_demo(num_tokens: int = 8, seed: int = 0, policy: str = "token_hash") -> dict:
    """Route ``num_tokens`` random tokens; returns what it printed, as tensors."""
    generator = torch.Generator().manual_seed(seed)
    l2p, counts, num_physical = replica_tables(NUM_LOGICAL_EXPERTS, REDUNDANT_REPLICAS)
    load = torch.zeros(1, num_physical, dtype=torch.int32)

    state = EplbLayerState(should_record_tensor=torch.tensor(True))
    state.set_layer_state(0, load, l2p, counts)
    router = create_fused_moe_router(
        top_k=TOP_K,
        global_num_experts=num_physical,
        eplb_state=state,
        scoring_func="sigmoid",
        e_score_correction_bias=torch.randn(NUM_LOGICAL_EXPERTS, generator=generator) * 0.1,
        routed_scaling_factor=2.5,
        use_grouped_topk=True,
        num_expert_group=NUM_EXPERT_GROUPS,
        topk_group=TOPK_GROUP,
        num_logical_experts=NUM_LOGICAL_EXPERTS,
        eplb_replica_policy=policy,
    )
    logical = []
    router.set_capture_fn(lambda ids: logical.append(ids.clone()))

    hidden_states = torch.randn(num_tokens, 32, generator=generator)
    router_logits = torch.randn(num_tokens, NUM_LOGICAL_EXPERTS, generator=generator)
    weights, physical = router.select_experts(hidden_states, router_logits)
    return {
        "router": type(router).__name__,
        "logical_ids": logical[0],
        "physical_ids": physical,
        "weights": weights,
        "load": state.expert_load_view.clone(),
    }


def format_result(result: dict) -> str:
    lines = [
        f"router: {result['router']}  ({NUM_LOGICAL_EXPERTS} logical experts in "
        f"{NUM_EXPERT_GROUPS} groups, keep {TOPK_GROUP}, top-{TOP_K}; "
        f"{len(REDUNDANT_REPLICAS)} redundant replicas of experts {list(REDUNDANT_REPLICAS)})",
        "token | logical ids      | physical ids     | weights",
    ]
    for token, (logical, physical, weights) in enumerate(
        zip(result["logical_ids"], result["physical_ids"], result["weights"], strict=True)
    ):
        weight_text = " ".join(f"{w:.3f}" for w in weights.tolist())
        lines.append(
            f"{token:5d} | {str(logical.tolist()):16s} | {str(physical.tolist()):16s} | {weight_text}"
        )
    lines.append(f"load per physical expert: {result['load'].tolist()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-compile demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8, help="tokens in the batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", choices=("token_hash", "modulo"), default="token_hash")
    args = parser.parse_args(argv)
    print(format_result(run_demo(args.tokens, args.seed, args.policy)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
