"""EPLB "nothing lost" check: rearrange a running expert-parallel model and prove no data moved wrongly.

Every rank builds the same stack of ``FusedMoE`` layers (EPLB on, redundant
experts, expert parallelism over all ranks), wires an ``EplbState`` and runs a
fixed batch. Then it forces several rearrangements — random placements and the
policy's own plan — and after each one checks, on every rank:

(a) the model output equals the output before any rearrangement (same tokens;
    the experts accumulate in float32 and the order of the cross-rank sum
    follows the placement, so the match is to float32 rounding);
(b) every local physical slot holds, bit for bit, every per-expert tensor
    (``get_expert_weights()``: weights and quantization scales) of the logical
    expert its map names, as that expert was loaded at the start;
(c) every recorded pass adds exactly T*k to each layer's load window, and the
    per-logical-expert load equals a plain top-k count of the router logits.

Finally one rank raises in the middle of a move (fault hook) and every rank
checks that the layers that were not committed keep their old maps and weights
and that (a)-(c) still hold; a later rearrangement must work again.

CPU / gloo (what the test suite runs):
    python bench/eplb_nothing_lost.py --backend gloo --world-size 2
GPU / NCCL, one GPU per rank:
    python bench/eplb_nothing_lost.py --backend nccl --world-size 2 \\
        --out bench/results/eplb_nothing_lost_nccl.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import queue
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

try:
    from moe_compile import (
        EplbLayerState,
        EplbState,
        EplbTransferError,
        FusedMoE,
        Int8WeightOnlyFusedMoEMethod,
    )
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from moe_compile import (
        EplbLayerState,
        EplbState,
        EplbTransferError,
        FusedMoE,
        Int8WeightOnlyFusedMoEMethod,
    )

DEFAULT_CONFIG = {
    "device": "cpu",
    "num_layers": 3,
    "num_experts": 8,
    "num_redundant_experts": 4,
    "top_k": 2,
    "hidden_size": 16,
    "intermediate_size": 8,
    "num_tokens": 24,
    "random_rearrangements": 3,
    "policies": ["deepseek", "migration_aware"],
    "transaction": "layer",
    "quant": "none",
    "replica_policy": "token_hash",
    "seed": 0,
}


class MoEStack(nn.Module):
    """Residual stack of MoE layers with fixed per-layer router logits (routing is
    then independent of the hidden state, so the load is known in advance)."""

    def __init__(self, layers: list[FusedMoE]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden: torch.Tensor, router_logits: list[torch.Tensor]) -> torch.Tensor:
        for layer, logits in zip(self.layers, router_logits, strict=True):
            hidden = hidden + layer(hidden, logits)
        return hidden


def _random_placement(gen, num_layers, num_experts, num_physical):
    rows = []
    for _ in range(num_layers):
        extra = torch.randint(0, num_experts, (num_physical - num_experts,), generator=gen)
        row = torch.cat([torch.randperm(num_experts, generator=gen), extra])
        rows.append(row[torch.randperm(num_physical, generator=gen)])
    return torch.stack(rows)


def _gather_slots(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's ``[m, n]`` local slots into ``[P, n]`` (rank order)."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def nothing_lost_worker(rank: int, world_size: int, overrides: dict | None = None) -> dict:
    """One rank's run; the process group must be initialised. Raises on a failed check."""
    cfg = {**DEFAULT_CONFIG, **(overrides or {})}
    if cfg["device"] == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    num_layers, num_experts = cfg["num_layers"], cfg["num_experts"]
    num_physical = num_experts + cfg["num_redundant_experts"]
    top_k, hidden_size, inter = cfg["top_k"], cfg["hidden_size"], cfg["intermediate_size"]
    num_tokens = cfg["num_tokens"]
    slots_per_rank = num_physical // world_size
    my_slots = slice(rank * slots_per_rank, (rank + 1) * slots_per_rank)

    def make_quant():
        return Int8WeightOnlyFusedMoEMethod() if cfg["quant"] == "int8" else None

    layers = [
        FusedMoE(
            num_experts,
            top_k,
            hidden_size,
            inter,
            eplb_state=EplbLayerState(),
            num_redundant_experts=cfg["num_redundant_experts"],
            ep_size=world_size,
            ep_rank=rank,
            quant_method=make_quant(),
            eplb_replica_policy=cfg["replica_policy"],
            params_dtype=torch.float64,
            device=device,
        )
        for _ in range(num_layers)
    ]
    model = MoEStack(layers)
    # Identical data on every rank: one CPU generator, same seed.
    gen = torch.Generator().manual_seed(cfg["seed"])
    for layer in layers:
        w13 = torch.randn(num_experts, 2 * inter, hidden_size, generator=gen, dtype=torch.float64)
        w2 = torch.randn(num_experts, hidden_size, inter, generator=gen, dtype=torch.float64)
        layer.load_logical_weights(w13 / hidden_size**0.5, w2 / inter**0.5)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen, dtype=torch.float64).to(device)
    logits = [torch.randn(num_tokens, num_experts, generator=gen).to(device) for _ in layers]
    # Independent load reference: plain softmax top-k of the logits, counted per expert.
    expected_logical = torch.stack(
        [
            torch.bincount(
                torch.topk(torch.softmax(lg.double().cpu(), -1), top_k).indices.flatten(),
                minlength=num_experts,
            )
            for lg in logits
        ]
    )

    # The initial layout puts logical expert e in physical slot e (e < E), so the
    # gathered slots [0, E) are each expert's original tensors, exactly as loaded.
    originals = [
        [_gather_slots(t, world_size)[:num_experts].clone() for t in layer.get_expert_weights()]
        for layer in layers
    ]

    state = EplbState.from_model(
        model,
        cfg["num_redundant_experts"],
        window_size=16,
        step_interval=10**9,  # rearrangements are forced below
        policy=cfg["policies"][0],
        transaction=cfg["transaction"],
    )
    report: dict = {"rank": rank, "checks": []}
    started = time.perf_counter()

    def check_weights(label):
        p2l = state.physical_to_logical_map.cpu()
        for index, layer in enumerate(layers):
            local_experts = p2l[index, my_slots]
            for tensor_index, tensor in enumerate(layer.get_expert_weights()):
                want = originals[index][tensor_index][local_experts].to(device)
                if not torch.equal(tensor, want):
                    bad = (tensor != want).any(dim=1).nonzero().flatten().tolist()
                    raise AssertionError(
                        f"{label}: rank {rank} layer {index} tensor {tensor_index}: local slots "
                        f"{bad} do not hold their logical experts {local_experts.tolist()}"
                    )
        # The maps the layers see are the model-wide ones and mutually consistent.
        for index in range(num_layers):
            row = p2l[index].tolist()
            l2p = state.logical_to_physical_map[index].cpu()
            counts = state.logical_replica_count[index].cpu()
            for expert in range(num_experts):
                slots = [p for p in range(num_physical) if row[p] == expert]
                got = l2p[expert, : int(counts[expert])].tolist()
                if got != slots or bool((l2p[expert, int(counts[expert]) :] != -1).any()):
                    raise AssertionError(
                        f"{label}: layer {index} expert {expert} map {got} != {slots}"
                    )

    def forward_and_count(label, reference_output=None):
        output = model(hidden, logits)
        slot = state.window_index
        result = state.step(log_balancedness=True)
        window = state.expert_load_window[slot].cpu().long()
        # Every rank counts every token, so the all-reduced balancedness is the local one.
        rank_load = window.view(num_layers, world_size, slots_per_rank).sum(-1).double()
        want = float(rank_load.mean(1).sum() / rank_load.amax(1).sum())
        if not (result.recorded and abs(result.balancedness - want) <= 1e-12):
            raise AssertionError(f"{label}: balancedness {result.balancedness} != {want}")
        sums = window.sum(-1)
        if not bool((sums == num_tokens * top_k).all()):
            raise AssertionError(f"{label}: load sums {sums.tolist()} != T*k={num_tokens * top_k}")
        logical = torch.zeros(num_layers, num_experts, dtype=torch.long)
        logical.scatter_add_(1, state.physical_to_logical_map.cpu(), window)
        if not torch.equal(logical, expected_logical):
            raise AssertionError(f"{label}: logical load {logical.tolist()} != top-k counts")
        diff = 0.0
        if reference_output is not None:
            diff = float((output - reference_output).abs().max())
            # The experts accumulate in float32 and the cross-rank sum's order follows
            # the placement, so outputs match to float32 rounding; a wrong expert in a
            # slot shows up as an O(1) difference (and fails check (b) exactly).
            torch.testing.assert_close(
                output, reference_output, rtol=1e-4, atol=1e-5, msg=lambda m: f"{label}: {m}"
            )
        return output, diff

    def record(label, moved, diff, committed):
        report["checks"].append(
            {
                "label": label,
                "moved_experts": moved,
                "committed_layers": committed,
                "max_abs_output_diff": diff,
                "weights_bit_identical": True,
                "load_sums_ok": True,
            }
        )

    check_weights("initial")
    reference_output, _ = forward_and_count("initial")
    record("initial", 0, 0.0, [])

    def expected_moves(old, new):
        """(rank, expert) pairs a rank holds after but not before, counted plainly."""
        moves = 0
        for index in range(num_layers):
            for r in range(world_size):
                window = slice(r * slots_per_rank, (r + 1) * slots_per_rank)
                moves += len(set(new[index, window].tolist()) - set(old[index, window].tolist()))
        return moves

    def rearrange_and_check_moves(new=None):
        old = state.physical_to_logical_map.cpu().clone()
        info = state.rearrange(new)
        want = expected_moves(old, state.physical_to_logical_map.cpu())
        if info["moved_experts"] != want:
            raise AssertionError(f"reported {info['moved_experts']} moved experts, counted {want}")
        return info

    placements = torch.Generator().manual_seed(cfg["seed"] + 1)
    for attempt in range(cfg["random_rearrangements"]):
        new = _random_placement(placements, num_layers, num_experts, num_physical)
        info = rearrange_and_check_moves(new)
        if not torch.equal(state.physical_to_logical_map.cpu(), new):
            raise AssertionError(f"random {attempt}: maps not committed")
        check_weights(f"random {attempt}")
        _, diff = forward_and_count(f"random {attempt}", reference_output)
        record(f"random {attempt}", info["moved_experts"], diff, info["committed_layers"])

    for policy in cfg["policies"]:
        state.policy = policy
        for _ in range(3):
            forward_and_count(f"{policy} warm-up", reference_output)
        before = state.balancedness().tolist()
        info = rearrange_and_check_moves()
        check_weights(f"policy {policy}")
        _, diff = forward_and_count(f"policy {policy}", reference_output)
        record(f"policy {policy}", info["moved_experts"], diff, info["committed_layers"])
        report["checks"][-1]["balancedness_before"] = before
        report["checks"][-1]["balancedness_after"] = state.balancedness().tolist()

    # Fault injection: the last rank raises once layer 1's weights are staged.
    faulty_rank = world_size - 1
    old_maps = state.physical_to_logical_map.cpu().clone()
    new = _random_placement(placements, num_layers, num_experts, num_physical)
    while torch.equal(new[1], old_maps[1]):
        new = _random_placement(placements, num_layers, num_experts, num_physical)

    def fault(stage, layer_index):
        if rank == faulty_rank and stage == "received" and layer_index == 1:
            raise RuntimeError("injected fault while moving layer 1")

    try:
        state.rearrange(new, fault_hook=fault)
    except EplbTransferError as error:
        report["fault_error"] = str(error)
    else:
        raise AssertionError("the injected fault did not abort the rearrangement")
    committed = 1 if cfg["transaction"] == "layer" else 0
    maps_now = state.physical_to_logical_map.cpu()
    for index in range(num_layers):
        want = new[index] if index < committed else old_maps[index]
        if not torch.equal(maps_now[index], want):
            raise AssertionError(
                f"after the fault, layer {index}'s map is neither kept nor committed"
            )
    check_weights("after fault")
    _, diff = forward_and_count("after fault", reference_output)
    record("after fault", 0, diff, list(range(committed)))

    # A rank failing before any transfer: nothing moves at all.
    maps_before = state.physical_to_logical_map.cpu().clone()

    def fault_while_planning(stage, layer_index):
        if rank == 0 and stage == "planned":
            raise RuntimeError("injected fault while planning")

    try:
        state.rearrange(
            _random_placement(placements, num_layers, num_experts, num_physical),
            fault_hook=fault_while_planning,
        )
    except EplbTransferError as error:
        report["planning_fault_error"] = str(error)
    else:
        raise AssertionError("the injected planning fault did not abort the rearrangement")
    if not torch.equal(state.physical_to_logical_map.cpu(), maps_before):
        raise AssertionError("a fault while planning changed the maps")
    check_weights("after planning fault")
    _, diff = forward_and_count("after planning fault", reference_output)
    record("after planning fault", 0, diff, [])

    # And the machinery still works after an aborted move.
    new = _random_placement(placements, num_layers, num_experts, num_physical)
    info = rearrange_and_check_moves(new)
    check_weights("recovery")
    _, diff = forward_and_count("recovery", reference_output)
    record("recovery", info["moved_experts"], diff, info["committed_layers"])
    report["final_physical_to_logical"] = state.physical_to_logical_map.cpu().tolist()
    report["worker_s"] = round(time.perf_counter() - started, 3)
    return report


# --------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawned(rank, world_size, backend, port, overrides, results):
    torch.set_num_threads(1)
    if backend == "gloo" and sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=300),
    )
    try:
        try:
            outcome = ("ok", nothing_lost_worker(rank, world_size, overrides))
        except Exception as error:  # reported to the parent, which fails the run
            outcome = ("error", f"{type(error).__name__}: {error}")
        results.put((rank, pickle.dumps(outcome)))
    finally:
        dist.destroy_process_group()


def run(world_size: int, backend: str, overrides: dict, timeout_s: float = 600) -> list:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    processes = mp.start_processes(
        _spawned,
        args=(world_size, backend, _free_port(), overrides, results),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    collected: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout_s
    while len(collected) < world_size and time.monotonic() < deadline:
        try:
            rank, payload = results.get(timeout=0.5)
            collected[rank] = pickle.loads(payload)
        except queue.Empty:
            if not any(p.is_alive() for p in processes.processes) and results.empty():
                break
    for process in processes.processes:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
    if len(collected) != world_size:
        raise RuntimeError(f"only ranks {sorted(collected)} of {world_size} reported")
    return [collected[rank] for rank in range(world_size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--transaction", choices=["layer", "model"], default="layer")
    parser.add_argument("--quant", choices=["none", "int8"], default="none")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.backend == "nccl" and torch.cuda.device_count() < args.world_size:
        parser.error(f"nccl needs {args.world_size} GPUs, found {torch.cuda.device_count()}")
    overrides = {
        "device": "cuda" if args.backend == "nccl" else "cpu",
        "transaction": args.transaction,
        "quant": args.quant,
    }
    start = time.perf_counter()
    outcomes = run(args.world_size, args.backend, overrides)
    failures = [f"rank {r}: {o[1]}" for r, o in enumerate(outcomes) if o[0] != "ok"]
    summary = {
        "backend": args.backend,
        "world_size": args.world_size,
        "config": {**DEFAULT_CONFIG, **overrides},
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(0)
        if args.backend == "nccl"
        else platform.processor() or platform.machine(),
        "passed": not failures,
        "failures": failures,
        "wall_s": round(time.perf_counter() - start, 2),
        "ranks": [o[1] for o in outcomes if o[0] == "ok"],
    }
    text = json.dumps(summary, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    for check in summary["ranks"][0]["checks"] if summary["ranks"] else []:
        print(
            f"{check['label']:>22}: moved {check['moved_experts']:3d}  "
            f"max|dout| {check['max_abs_output_diff']:.2e}  committed {check['committed_layers']}"
        )
    print("PASSED" if not failures else "FAILED:\n" + "\n".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
