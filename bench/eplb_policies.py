"""EPLB policies under drifting, skewed load: balancedness and expert weights moved per rebalance.

Synthetic load: each layer's experts get Zipf popularity (``1 / rank**s``, in a
random order per layer) whose logarithm drifts by ``N(0, sigma)`` every window;
a window's load is a multinomial sample of ``tokens * top_k`` routed slots. Every
window, each policy rebalances from its *own* previous placement (both start
from SPEC's initial layout), and we report per rebalance:

- ``planned``: balancedness (mean / max GPU load) on the window it planned for;
- ``next``: balancedness of that plan on the following window (the load it serves);
- ``moved``: expert weights sent between GPUs (new (GPU, expert) pairs), per layer;
- ``plan_s``: wall time of ``rebalance`` for all layers, on this machine's CPU.

The first rebalance (from the initial layout) is reported apart from the
steady state (all later ones). ``static`` is the initial layout never rebalanced.

    python bench/eplb_policies.py                       # full run, writes bench/results/
    python bench/eplb_policies.py --quick               # small, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

try:
    from moe_compile.eplb import balancedness_of_plan, count_moved_experts, rebalance
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from moe_compile.eplb import balancedness_of_plan, count_moved_experts, rebalance

POLICIES = ("deepseek", "migration_aware")

SCENARIOS = [
    # name, layers, experts, physical slots, groups, nodes, GPUs, Zipf s, drift sigma
    ("v3-like hierarchical, slow drift", 16, 256, 288, 8, 4, 32, 1.0, 0.05),
    ("v3-like hierarchical, fast drift", 16, 256, 288, 8, 4, 32, 1.0, 0.2),
    ("v3-like flat, slow drift", 16, 256, 288, 1, 1, 32, 1.0, 0.05),
    ("v3-like flat, fast drift", 16, 256, 288, 1, 1, 32, 1.0, 0.2),
    ("64 experts on 16 GPUs, flat, steep Zipf", 16, 64, 80, 1, 1, 16, 1.3, 0.1),
]


def drifting_zipf_loads(num_windows, num_layers, num_experts, zipf_s, sigma, slots, seed):
    """Yield ``[L, E]`` int64 loads, one per window."""
    gen = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** zipf_s
    log_popularity = torch.stack(
        [zipf[torch.randperm(num_experts, generator=gen)].log() for _ in range(num_layers)]
    )
    for _ in range(num_windows):
        log_popularity += sigma * torch.randn(
            num_layers, num_experts, generator=gen, dtype=torch.float64
        )
        probs = torch.softmax(log_popularity, dim=1)
        picks = torch.multinomial(probs, slots, replacement=True, generator=gen)
        yield torch.stack([row.bincount(minlength=num_experts) for row in picks])


def run_scenario(scenario, num_windows, slots, seed):
    name, layers, experts, physical, groups, nodes, gpus, zipf_s, sigma = scenario
    loads = list(drifting_zipf_loads(num_windows + 1, layers, experts, zipf_s, sigma, slots, seed))
    initial = (torch.arange(physical) % experts).repeat(layers, 1)
    result = {
        "scenario": name,
        "layers": layers,
        "experts": experts,
        "physical_slots": physical,
        "groups": groups,
        "nodes": nodes,
        "gpus": gpus,
        "zipf_s": zipf_s,
        "drift_sigma": sigma,
        "routed_slots_per_window": slots,
        "rebalances": num_windows,
        "static_balancedness": float(
            torch.stack([balancedness_of_plan(w, initial, gpus).mean() for w in loads]).mean()
        ),
    }
    for policy in POLICIES:
        placement = initial
        rows = []
        for window in range(num_windows):
            start = time.perf_counter()
            plan, _, _ = rebalance(
                loads[window],
                physical,
                groups,
                nodes,
                gpus,
                policy,
                old_physical_to_logical=placement,
            )
            elapsed = time.perf_counter() - start
            rows.append(
                {
                    "planned": float(balancedness_of_plan(loads[window], plan, gpus).mean()),
                    "next": float(balancedness_of_plan(loads[window + 1], plan, gpus).mean()),
                    "moved_per_layer": float(
                        count_moved_experts(placement, plan, gpus).float().mean()
                    ),
                    "plan_s": elapsed,
                }
            )
            placement = plan

        def mean(key, part):
            return sum(r[key] for r in part) / len(part)

        steady = rows[1:]
        result[policy] = {
            "first": rows[0],
            "steady": {key: mean(key, steady) for key in rows[0]},
            "steady_min_planned": min(r["planned"] for r in steady),
        }
    return result


def to_markdown(results, meta) -> str:
    lines = [
        "# EPLB policies: balancedness and expert weights moved per rebalance",
        "",
        f"Generated by `python bench/eplb_policies.py` on {meta['machine']} (torch {meta['torch']}, "
        f"{meta['threads']} CPU threads). Loads: drifting Zipf, {meta['slots']} routed slots "
        f"per window, {meta['windows']} rebalances, seed {meta['seed']}. Steady state = every "
        "rebalance after the first (which starts from the initial layout). Balancedness = "
        "mean / max GPU load (1.0 is perfect), averaged over layers and rebalances; `next` "
        "scores the plan on the following window. `moved` = expert weights sent between GPUs "
        "per layer per rebalance.",
        "",
        "| scenario | static | policy | planned | next | moved / layer | first moved / layer | plan s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for policy in POLICIES:
            s, f = r[policy]["steady"], r[policy]["first"]
            lines.append(
                f"| {r['scenario']} ({r['layers']}L, {r['experts']}E, {r['physical_slots']} slots, "
                f"{r['groups']}g/{r['nodes']}n/{r['gpus']} GPUs) | {r['static_balancedness']:.3f} "
                f"| {policy} | {s['planned']:.4f} | {s['next']:.4f} | {s['moved_per_layer']:.1f} "
                f"| {f['moved_per_layer']:.1f} | {s['plan_s']:.3f} |"
            )
    lines += ["", "Moved experts, migration_aware vs deepseek (steady state):", ""]
    for r in results:
        ds, ma = r["deepseek"]["steady"], r["migration_aware"]["steady"]
        ratio = ma["moved_per_layer"] / ds["moved_per_layer"] if ds["moved_per_layer"] else 0.0
        lines.append(
            f"- {r['scenario']}: {ma['moved_per_layer']:.1f} vs {ds['moved_per_layer']:.1f} "
            f"({ratio:.0%}), balancedness {ma['planned']:.4f} vs {ds['planned']:.4f}"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=12, help="rebalances per policy")
    parser.add_argument("--slots", type=int, default=400_000, help="routed slots per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one small scenario, 4 rebalances")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    scenarios = SCENARIOS[-1:] if args.quick else SCENARIOS
    windows = 4 if args.quick else args.windows
    results = [run_scenario(s, windows, args.slots, args.seed) for s in scenarios]
    meta = {
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "slots": args.slots,
        "windows": windows,
        "seed": args.seed,
    }
    text = to_markdown(results, meta)
    print(text)
    if not args.no_write and not args.quick:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "eplb_policies.md"), "w") as handle:
            handle.write(text)
        with open(os.path.join(args.out_dir, "eplb_policies.json"), "w") as handle:
            json.dump({"meta": meta, "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
