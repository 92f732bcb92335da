"""Rebalancing policies: DeepSeek's hierarchical EPLB, the migration-aware policy, the registry."""

from __future__ import annotations

import time

import pytest
import torch

from moe_compile.eplb import (
    available_policies,
    balancedness_of_plan,
    count_moved_experts,
    gpu_loads,
    physical_to_logical_to_logical_to_physical,
    rebalance,
    register_policy,
)

SPEC_WEIGHT = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)


# --- an independent, loop-by-loop reading of SPEC §4's "deepseek" policy -------------


def _pack(loads: list[float], num_packs: int) -> list[list[int]]:
    """Heaviest item first into the lightest non-full pack; returns each pack's items in order."""
    per_pack = len(loads) // num_packs
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    totals = [0.0] * num_packs
    for item in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        open_packs = [p for p in range(num_packs) if len(packs[p]) < per_pack]
        pack = min(open_packs, key=lambda p: (totals[p], p))
        packs[pack].append(item)
        totals[pack] += loads[item]
    return packs


def _reference_deepseek(weight, num_replicas, num_groups, num_nodes, num_gpus):
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    result = []
    for row in weight.double().tolist():
        num_experts = len(row)
        group_size = num_experts // num_groups
        group_loads = [sum(row[g * group_size : (g + 1) * group_size]) for g in range(num_groups)]
        plan = []
        for node_groups in _pack(group_loads, num_nodes):
            experts = [g * group_size + i for g in node_groups for i in range(group_size)]
            replicas = list(experts)
            counts = {e: 1 for e in experts}
            for _ in range(num_replicas // num_nodes - len(experts)):
                # Highest load per replica; ties to the earliest position in the node.
                best = max(experts, key=lambda e: (row[e] / counts[e], -experts.index(e)))
                replicas.append(best)
                counts[best] += 1
            shares = [row[e] / counts[e] for e in replicas]
            for gpu_items in _pack(shares, num_gpus // num_nodes):
                plan.extend(replicas[i] for i in gpu_items)
        result.append(plan)
    return torch.tensor(result)


# --- "deepseek" -----------------------------------------------------------------------


def test_spec_acceptance_example_matches_exactly():
    p2l, l2p, counts = rebalance(SPEC_WEIGHT, 16, 4, 2, 8)
    assert p2l.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    assert counts.tolist() == [
        [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
        [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1],
    ]
    assert p2l.dtype == l2p.dtype == counts.dtype == torch.int64
    # The inverse map lists every slot of an expert, in ascending physical order.
    for layer in range(2):
        for expert in range(12):
            slots = [p for p in range(16) if p2l[layer, p] == expert]
            row = l2p[layer, expert].tolist()
            assert row == slots + [-1] * (l2p.shape[2] - len(slots))


def test_spec_map_inversion_example():
    p2l = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 2, 0, 1, 0, 3]])
    l2p, counts = physical_to_logical_to_logical_to_physical(p2l, 4)
    assert l2p.tolist() == [
        [[0, 4, -1], [1, 5, -1], [2, -1, -1], [3, -1, -1]],
        [[0, 2, 4], [3, -1, -1], [1, -1, -1], [5, -1, -1]],
    ]
    assert counts.tolist() == [[2, 2, 1, 1], [3, 1, 1, 1]]
    wide, _ = physical_to_logical_to_logical_to_physical(p2l, 4, max_replicas=5)
    assert wide.shape == (2, 4, 5) and wide[..., :3].equal(l2p) and (wide[..., 3:] == -1).all()
    with pytest.raises(ValueError, match="3 replicas"):
        physical_to_logical_to_logical_to_physical(p2l, 4, max_replicas=2)


@pytest.mark.parametrize(
    "num_experts,num_replicas,num_groups,num_nodes,num_gpus",
    [
        (12, 16, 4, 2, 8),
        (16, 24, 4, 2, 4),
        (16, 32, 8, 4, 8),
        (32, 48, 8, 2, 8),
        (12, 16, 3, 2, 4),  # groups % nodes != 0: falls back to a global plan
        (8, 8, 1, 1, 4),  # no redundant slots
        (8, 16, 1, 1, 1),  # one GPU
    ],
)
def test_deepseek_equals_loop_reference(num_experts, num_replicas, num_groups, num_nodes, num_gpus):
    gen = torch.Generator().manual_seed(num_experts * 1000 + num_replicas)
    weight = torch.rand(5, num_experts, generator=gen, dtype=torch.float64) ** 3 * 1000
    p2l, _, counts = rebalance(weight, num_replicas, num_groups, num_nodes, num_gpus)
    assert p2l.equal(_reference_deepseek(weight, num_replicas, num_groups, num_nodes, num_gpus))
    assert (counts >= 1).all() and counts.sum(1).eq(num_replicas).all()


def test_deepseek_global_fallback_when_groups_do_not_divide_nodes():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randint(0, 500, (4, 12), generator=gen)
    p2l, _, _ = rebalance(weight, 18, 3, 2, 6)
    flat, _, _ = rebalance(weight, 18, 1, 1, 6)
    assert p2l.equal(flat)


def test_deepseek_plans_deepseek_v3_scale_in_under_a_second():
    gen = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, 257, dtype=torch.float64)
    weight = torch.stack(
        [(1000 / ranks**1.2)[torch.randperm(256, generator=gen)] for _ in range(61)]
    )
    for groups, nodes in ((8, 4), (1, 1)):
        rebalance(weight, 288, groups, nodes, 32)  # warm-up: first-call overheads
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            p2l, _, counts = rebalance(weight, 288, groups, nodes, 32)
            best = min(best, time.perf_counter() - start)
        assert best < 1.0, f"planning took {best:.2f} s"
        assert p2l.shape == (61, 288) and counts.sum(1).eq(288).all()


def test_deepseek_hot_expert_worked_by_hand():
    # 8 experts, 12 slots on 4 GPUs: all 4 extra slots go to the hot expert (5 x 160),
    # the 5th replica lands on GPU 0 next to the first, and GPU 0 takes the last 10.
    weight = torch.tensor([[800.0] + [10.0] * 7])
    p2l, _, counts = rebalance(weight, 12, 1, 1, 4)
    assert counts[0].tolist() == [5, 1, 1, 1, 1, 1, 1, 1]
    assert p2l[0].tolist() == [0, 0, 7, 0, 1, 4, 0, 2, 5, 0, 3, 6]
    assert gpu_loads(weight, p2l, 4)[0].tolist() == [330.0, 180.0, 180.0, 180.0]


# --- "migration_aware" ----------------------------------------------------------------


def _drifting_zipf(num_steps, num_layers, num_experts, seed, sigma=0.1, tokens=50_000):
    """Token counts per expert: Zipf popularity whose log drifts by N(0, sigma) per step."""
    gen = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64)
    log_popularity = torch.stack(
        [zipf[torch.randperm(num_experts, generator=gen)].log() for _ in range(num_layers)]
    )
    for _ in range(num_steps):
        log_popularity += sigma * torch.randn(
            num_layers, num_experts, generator=gen, dtype=torch.float64
        )
        probs = torch.softmax(log_popularity, dim=1)
        picks = torch.multinomial(probs, tokens, replacement=True, generator=gen)
        yield torch.stack([row.bincount(minlength=num_experts) for row in picks])


@pytest.mark.parametrize("num_groups,num_nodes", [(1, 1), (4, 2)])
def test_migration_aware_balances_as_well_and_moves_less(num_groups, num_nodes):
    num_experts, num_replicas, num_gpus = 32, 40, 8
    old_ds = old_ma = torch.arange(num_replicas).remainder(num_experts).repeat(6, 1)
    moved_ds = moved_ma = 0
    for weight in _drifting_zipf(6, 6, num_experts, seed=1):
        args = (weight, num_replicas, num_groups, num_nodes, num_gpus)
        ds, _, _ = rebalance(*args, policy="deepseek", old_physical_to_logical=old_ds)
        ma, _, _ = rebalance(*args, policy="migration_aware", old_physical_to_logical=old_ma)
        # Same or better balance, layer by layer, on the load it planned for.
        reference_peak = gpu_loads(weight, ds, num_gpus).max(1).values
        assert (gpu_loads(weight, ma, num_gpus).max(1).values <= reference_peak * (1 + 1e-9)).all()
        assert (
            balancedness_of_plan(weight, ma, num_gpus)
            >= balancedness_of_plan(weight, ds, num_gpus) - 1e-9
        ).all()
        # Never more experts sent than DeepSeek's plan would send from the same start.
        ds_from_ma_start, _, _ = rebalance(*args, policy="deepseek")
        assert (
            count_moved_experts(old_ma, ma, num_gpus)
            <= count_moved_experts(old_ma, ds_from_ma_start, num_gpus)
        ).all()
        moved_ds += int(count_moved_experts(old_ds, ds, num_gpus).sum())
        moved_ma += int(count_moved_experts(old_ma, ma, num_gpus).sum())
        old_ds, old_ma = ds, ma
    assert moved_ma < 0.5 * moved_ds, (moved_ma, moved_ds)


def test_migration_aware_keeps_a_placement_that_is_already_deepseeks():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randint(1, 1000, (3, 16), generator=gen)
    current, _, _ = rebalance(weight, 24, 1, 1, 4)
    # Shuffle GPUs and slots within GPUs: same balance, so nothing needs to cross GPUs.
    shuffled = current.view(3, 4, 6)[:, torch.tensor([2, 0, 3, 1])]
    shuffled = shuffled[..., torch.tensor([5, 3, 1, 0, 2, 4])].reshape(3, 24)
    planned, _, _ = rebalance(weight, 24, 1, 1, 4, "migration_aware", shuffled)
    assert count_moved_experts(shuffled, planned, 4).eq(0).all()
    # ...and every expert that could stay in its slot did.
    assert planned.equal(shuffled)


def test_migration_aware_without_old_placement_is_deepseek():
    weight = SPEC_WEIGHT
    assert rebalance(weight, 16, 4, 2, 8, "migration_aware")[0].equal(
        rebalance(weight, 16, 4, 2, 8)[0]
    )


def test_migration_aware_all_zero_load_keeps_old_placement():
    old = torch.tensor([[3, 1, 0, 2, 0, 1]])
    planned, _, counts = rebalance(torch.zeros(1, 4), 6, 1, 1, 2, "migration_aware", old)
    assert planned.equal(old) and counts.tolist() == [[2, 2, 1, 1]]


# --- helpers, registry and bad input --------------------------------------------------


def test_count_moved_experts_counts_new_expert_gpu_pairs():
    old = torch.tensor([[0, 1, 2, 3, 0, 1]])  # GPU0 {0,1,2}, GPU1 {3,0,1}
    new = torch.tensor([[2, 0, 0, 1, 3, 2]])  # GPU0 {2,0} (nothing new), GPU1 {1,3,2}: 2 is new
    assert count_moved_experts(old, new, 2).tolist() == [1]
    assert count_moved_experts(old, old, 2).tolist() == [0]
    assert count_moved_experts(old, new, 1).tolist() == [0]


def test_balancedness_of_plan():
    weight = torch.tensor([[100.0, 0, 0, 0], [25.0, 25, 25, 25]])
    identity = torch.arange(4).repeat(2, 1)
    assert balancedness_of_plan(weight, identity, 4).tolist() == [0.25, 1.0]
    assert balancedness_of_plan(torch.zeros(1, 4), identity[:1], 4).tolist() == [1.0]


def test_registry_runs_a_user_policy_and_rejects_duplicates():
    name = "test_reverse_identity"
    if name not in available_policies():

        @register_policy(name)
        def reverse(weight, num_replicas, num_groups, num_nodes, num_gpus, old):
            return (
                torch.arange(num_replicas)
                .flip(0)
                .remainder(weight.shape[1])
                .repeat(weight.shape[0], 1)
            )

    assert {"deepseek", "migration_aware", name} <= set(available_policies())
    p2l, l2p, counts = rebalance(torch.ones(2, 4), 6, 1, 1, 2, policy=name)
    assert p2l[0].tolist() == [1, 0, 3, 2, 1, 0]
    assert counts[0].tolist() == [2, 2, 1, 1] and l2p[0, 0].tolist() == [1, 5]
    with pytest.raises(ValueError, match="already registered"):
        register_policy(name, lambda *args: None)


def test_policy_that_drops_an_expert_is_rejected():
    name = "test_drops_expert_three"
    if name not in available_policies():
        register_policy(name, lambda w, p, *rest: torch.zeros(w.shape[0], p, dtype=torch.int64))
    with pytest.raises(ValueError, match="without a replica"):
        rebalance(torch.ones(1, 4), 4, 1, 1, 1, policy=name)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(policy="no_such_policy"), "unknown EPLB policy 'no_such_policy'"),
        (dict(num_replicas=8), r"num_replicas \(8\) must be at least .* \(12\)"),
        (dict(num_gpus=5), r"num_gpus \(5\) must divide num_replicas \(16\)"),
        (dict(num_nodes=3), r"num_nodes \(3\) must divide num_gpus \(8\)"),
        (dict(num_groups=5), r"num_groups \(5\) must divide the 12"),
        (dict(num_gpus=0), "num_gpus must be a positive int"),
        (dict(weight=-SPEC_WEIGHT), "non-negative"),
        (dict(weight=SPEC_WEIGHT[0]), "2-D"),
        (dict(old_physical_to_logical=torch.zeros(2, 15, dtype=torch.long)), r"\[2, 16\]"),
        (dict(old_physical_to_logical=torch.full((2, 16), 12)), "outside"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    args = dict(
        weight=SPEC_WEIGHT,
        num_replicas=16,
        num_groups=4,
        num_nodes=2,
        num_gpus=8,
        policy="deepseek",
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        rebalance(**args)
