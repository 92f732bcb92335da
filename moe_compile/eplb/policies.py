"""Rebalancing policies: where each physical expert slot should point after a rebalance.

A policy turns a ``[L, E]`` load tensor (tokens per logical expert per layer)
into a ``[L, P]`` physical -> logical map in *GPU-major* slot order: GPU ``g``
owns slots ``[g * P // num_gpus, (g + 1) * P // num_gpus)``. :func:`rebalance`
validates the input, runs the policy named in the registry and derives the
logical -> physical map and the replica counts from the result, so every policy
yields the same, self-consistent outputs.

Policies live in a small registry (:func:`register_policy`):

- ``"deepseek"``: DeepSeek's hierarchical EPLB (SPEC §4), vectorised over
  layers: the only Python loops run over items of one layer, never over layers.
- ``"migration_aware"``: ours. It plans with the old placement in mind and
  returns, per layer, the cheaper (in expert weights sent between GPUs) of two
  plans whose heaviest GPU is no heavier than DeepSeek's plan: DeepSeek's plan
  with its GPUs relabelled to overlap the old placement most, or a repair of the
  old placement (few replica count changes, then load-reducing swaps).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

PolicyFn = Callable[..., torch.Tensor]
"""``fn(weight, num_replicas, num_groups, num_nodes, num_gpus, old_physical_to_logical)``
returning the ``[L, P]`` int64 physical -> logical map (GPU-major)."""

_POLICIES: dict[str, PolicyFn] = {}

# Relative slack when comparing floating-point GPU loads, so that two plans
# whose loads differ only by summation order count as equally balanced.
_LOAD_RTOL = 1e-9


def register_policy(name: str, fn: PolicyFn | None = None):
    """Register ``fn`` as policy ``name`` (usable as a decorator when ``fn`` is omitted)."""

    def add(policy_fn: PolicyFn) -> PolicyFn:
        if name in _POLICIES:
            raise ValueError(f"EPLB policy {name!r} is already registered")
        _POLICIES[name] = policy_fn
        return policy_fn

    return add(fn) if fn is not None else add


def available_policies() -> tuple[str, ...]:
    """Names of the registered policies, sorted."""
    return tuple(sorted(_POLICIES))


def get_policy(name: str) -> PolicyFn:
    """The policy function registered as ``name``; ``ValueError`` if there is none."""
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown EPLB policy {name!r}; available policies: {list(available_policies())}"
        ) from None


# ---------------------------------------------------------------------------
# Map conversions shared by the policies and the model-wide state
# ---------------------------------------------------------------------------


def replica_counts(physical_to_logical: torch.Tensor, num_logical_experts: int) -> torch.Tensor:
    """``[L, E]`` int64: how many physical slots of each layer hold each logical expert."""
    p2l = physical_to_logical.long()
    counts = torch.zeros(p2l.shape[0], num_logical_experts, dtype=torch.int64, device=p2l.device)
    return counts.scatter_add_(1, p2l, torch.ones_like(p2l))


def physical_to_logical_to_logical_to_physical(
    physical_to_logical: torch.Tensor,
    num_logical_experts: int,
    max_replicas: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a ``[L, P]`` physical -> logical map.

    Returns ``(logical_to_physical [L, E, S], logical_replica_count [L, E])``,
    both int64. Each expert's replicas are listed in ascending physical order
    and the rows are padded with -1 up to ``S = max_replicas`` (default: the
    largest replica count, at least 1). SPEC §4's example: ``[[0,1,2,3,0,1],
    [0,2,0,1,0,3]]`` gives ``[[[0,4,-1],[1,5,-1],[2,-1,-1],[3,-1,-1]],
    [[0,2,4],[3,-1,-1],[1,-1,-1],[5,-1,-1]]]`` with ``S = 3``.
    """
    if physical_to_logical.dim() != 2:
        raise ValueError(
            "physical_to_logical must be 2-D [num_layers, num_physical_experts], got shape "
            f"{tuple(physical_to_logical.shape)}"
        )
    p2l = physical_to_logical.long()
    num_layers, num_physical = p2l.shape
    if p2l.numel() and (int(p2l.min()) < 0 or int(p2l.max()) >= num_logical_experts):
        raise ValueError(
            f"physical_to_logical holds ids in [{int(p2l.min())}, {int(p2l.max())}] but there "
            f"are {num_logical_experts} logical experts"
        )
    counts = replica_counts(p2l, num_logical_experts)
    widest = int(counts.max()) if counts.numel() else 0
    if max_replicas is None:
        max_replicas = max(widest, 1)
    elif widest > max_replicas:
        raise ValueError(
            f"an expert has {widest} replicas but the map holds only {max_replicas} per expert"
        )
    # A stable sort by logical id keeps the replicas of one expert in physical order;
    # a replica's rank is its position in the sorted row minus its expert's first position.
    order = torch.sort(p2l, dim=1, stable=True).indices
    expert_sorted = p2l.gather(1, order)
    first_position = torch.cumsum(counts, dim=1) - counts
    rank = torch.arange(num_physical, device=p2l.device) - first_position.gather(1, expert_sorted)
    l2p = torch.full(
        (num_layers, num_logical_experts * max_replicas), -1, dtype=torch.int64, device=p2l.device
    )
    l2p.scatter_(1, expert_sorted * max_replicas + rank, order)
    return l2p.view(num_layers, num_logical_experts, max_replicas), counts


def gpu_loads(
    weight: torch.Tensor, physical_to_logical: torch.Tensor, num_gpus: int
) -> torch.Tensor:
    """``[L, num_gpus]`` float64 load per GPU of a GPU-major plan.

    Every replica of an expert is assumed to take an equal share of its load.
    """
    w = weight.double()
    p2l = physical_to_logical.long()
    counts = replica_counts(p2l, w.shape[1]).clamp(min=1)
    per_slot = (w / counts).gather(1, p2l)
    return per_slot.view(p2l.shape[0], num_gpus, -1).sum(-1)


def balancedness_of_plan(
    weight: torch.Tensor, physical_to_logical: torch.Tensor, num_gpus: int
) -> torch.Tensor:
    """``[L]`` mean / max GPU load of a GPU-major plan (1.0 for a layer without load)."""
    loads = gpu_loads(weight, physical_to_logical, num_gpus)
    peak = loads.max(dim=1).values
    return torch.where(peak > 0, loads.mean(dim=1) / peak.clamp(min=1e-300), 1.0)


def count_moved_experts(
    old_physical_to_logical: torch.Tensor, new_physical_to_logical: torch.Tensor, num_gpus: int
) -> torch.Tensor:
    """``[L]`` int64: expert weights that must cross between GPUs to go from old to new.

    One unit per (GPU, logical expert) pair that the new plan puts on a GPU that
    held no replica of that expert before; moves between slots of one GPU are
    local copies and cost nothing here.
    """
    old = old_physical_to_logical.long()
    new = new_physical_to_logical.long()
    if old.shape != new.shape:
        raise ValueError(
            f"old and new physical_to_logical differ in shape: {tuple(old.shape)} vs {tuple(new.shape)}"
        )
    num_logical = int(torch.maximum(old.max(), new.max())) + 1 if old.numel() else 1
    num_layers = old.shape[0]

    def presence(p2l: torch.Tensor) -> torch.Tensor:
        gpu = torch.arange(num_gpus, device=p2l.device).repeat_interleave(p2l.shape[1] // num_gpus)
        held = torch.zeros(num_layers, num_gpus * num_logical, dtype=torch.bool)
        return held.scatter_(1, gpu * num_logical + p2l, True)

    return (presence(new) & ~presence(old)).sum(dim=1)


# ---------------------------------------------------------------------------
# DeepSeek's hierarchical policy, vectorised over rows (layers, or layers x nodes)
# ---------------------------------------------------------------------------


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    positions = torch.arange(perm.shape[1], dtype=perm.dtype, device=perm.device)
    return inverse.scatter_(1, perm, positions.expand_as(perm))


def _balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each row's ``n`` items into ``num_packs`` packs of ``n // num_packs`` items.

    Items go heaviest first (ties: lower index first) into the lightest pack that
    still has room (ties: lower pack index). Returns ``(pack_index, rank_in_pack)``,
    both ``[rows, n]``; an item's rank is the order in which it entered its pack.
    """
    rows, num_items = weight.shape
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        pack_index = torch.arange(num_items).expand(rows, num_items).clone()
        return pack_index, torch.zeros(rows, num_items, dtype=torch.int64)
    order = torch.sort(weight, dim=1, descending=True, stable=True).indices
    pack_load = torch.zeros(rows, num_packs, dtype=weight.dtype)
    pack_fill = torch.zeros(rows, num_packs, dtype=torch.int64)
    pack_index = torch.empty(rows, num_items, dtype=torch.int64)
    rank_in_pack = torch.empty(rows, num_items, dtype=torch.int64)
    row = torch.arange(rows)
    full = torch.tensor(float("inf"), dtype=weight.dtype)
    for position in range(num_items):
        item = order[:, position]
        pack = torch.where(pack_fill < items_per_pack, pack_load, full).argmin(dim=1)
        pack_index[row, item] = pack
        rank_in_pack[row, item] = pack_fill[row, pack]
        pack_load[row, pack] += weight[row, item]
        pack_fill[row, pack] += 1
    return pack_index, rank_in_pack


def _replicate_experts(weight: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each row's ``n`` experts ``num_slots`` slots: one each, then every extra slot
    to the expert with the largest load per replica (ties: lower index).

    Returns ``(slot_expert [rows, num_slots], count [rows, n])``.
    """
    rows, num_experts = weight.shape
    slot_expert = torch.arange(num_slots).repeat(rows, 1)
    count = torch.ones(rows, num_experts, dtype=torch.int64)
    row = torch.arange(rows)
    for slot in range(num_experts, num_slots):
        busiest = (weight / count).argmax(dim=1)
        slot_expert[:, slot] = busiest
        count[row, busiest] += 1
    return slot_expert, count


def _deepseek_hierarchical(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_replicas // num_nodes
    slots_per_gpu = num_replicas // num_gpus

    # 1. Groups onto nodes by group load. An expert's "node-major" position lists
    #    node 0's groups first, each group's experts contiguous.
    group_load = weight.view(num_layers, num_groups, group_size).sum(-1)
    group_node, group_rank = _balanced_packing(group_load, num_nodes)
    group_start = (group_node * groups_per_node + group_rank) * group_size
    expert_position = (group_start.unsqueeze(-1) + torch.arange(group_size)).flatten(1)
    expert_at_position = _inverse_permutation(expert_position)

    # 2. Replicate within each node; rows are (layer, node).
    node_weight = weight.gather(1, expert_at_position).view(-1, experts_per_node)
    replica_expert, replica_count = _replicate_experts(node_weight, slots_per_node)

    # 3. Replicas onto the node's GPUs by load per replica.
    replica_load = (node_weight / replica_count).gather(1, replica_expert)
    replica_gpu, replica_rank = _balanced_packing(replica_load, num_gpus // num_nodes)
    replica_at_slot = _inverse_permutation(replica_gpu * slots_per_gpu + replica_rank)
    slot_expert_in_node = replica_expert.gather(1, replica_at_slot)

    node_offset = torch.arange(num_nodes).mul(experts_per_node).view(1, num_nodes, 1)
    slot_position = (slot_expert_in_node.view(num_layers, num_nodes, -1) + node_offset).flatten(1)
    return expert_at_position.gather(1, slot_position)


@register_policy("deepseek")
def deepseek_policy(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    old_physical_to_logical: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek's hierarchical EPLB (SPEC §4); global (1 group, 1 node) when the
    groups do not divide among the nodes. Ignores the old placement."""
    del old_physical_to_logical
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    return _deepseek_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)


# ---------------------------------------------------------------------------
# Migration-aware policy
# ---------------------------------------------------------------------------


def _greedy_max_overlap(overlap: np.ndarray) -> np.ndarray:
    """Assignment row -> column maximising total overlap greedily (biggest pair first)."""
    size = overlap.shape[0]
    assignment = np.full(size, -1, dtype=np.int64)
    free_rows = np.ones(size, dtype=bool)
    free_cols = np.ones(size, dtype=bool)
    # Ties: lower row, then lower column, so the identity wins among equals.
    flat_order = np.argsort(-overlap, axis=None, kind="stable")
    for flat in flat_order:
        row, col = divmod(int(flat), size)
        if free_rows[row] and free_cols[col]:
            assignment[row] = col
            free_rows[row] = free_cols[col] = False
    return assignment


def _place_in_old_slots(new_gpu_experts: list[np.ndarray], old_layer: np.ndarray) -> np.ndarray:
    """Lay each GPU's multiset of experts into its slots, keeping an expert in the
    slot where the old placement had it (saves local copies)."""
    num_gpus = len(new_gpu_experts)
    slots_per_gpu = old_layer.shape[0] // num_gpus
    plan = np.empty_like(old_layer)
    for gpu, experts in enumerate(new_gpu_experts):
        old_slots = old_layer[gpu * slots_per_gpu : (gpu + 1) * slots_per_gpu]
        remaining = list(experts)
        placed = np.full(slots_per_gpu, -1, dtype=np.int64)
        for slot, expert in enumerate(old_slots):
            if expert in remaining:
                remaining.remove(expert)
                placed[slot] = expert
        empty = np.flatnonzero(placed < 0)
        placed[empty] = remaining
        plan[gpu * slots_per_gpu : (gpu + 1) * slots_per_gpu] = placed
    return plan


def _align_to_old(
    plan_layer: np.ndarray,
    old_layer: np.ndarray,
    num_experts: int,
    num_nodes: int,
    num_gpus: int,
) -> np.ndarray:
    """Relabel a plan's GPUs (whole nodes, then GPUs within a node) so that they
    overlap the old placement most; every GPU keeps the same set of replicas."""
    slots_per_gpu = plan_layer.shape[0] // num_gpus
    gpus_per_node = num_gpus // num_nodes

    def held(layer: np.ndarray) -> np.ndarray:
        presence = np.zeros((num_gpus, num_experts), dtype=np.int64)
        presence[np.repeat(np.arange(num_gpus), slots_per_gpu), layer] = 1
        return presence

    def per_node(presence: np.ndarray) -> np.ndarray:
        return presence.reshape(num_nodes, gpus_per_node, num_experts).max(1)

    new_held, old_held = held(plan_layer), held(old_layer)
    node_of = _greedy_max_overlap(per_node(new_held) @ per_node(old_held).T)
    gpu_target = np.empty(num_gpus, dtype=np.int64)
    for node in range(num_nodes):
        src = slice(node * gpus_per_node, (node + 1) * gpus_per_node)
        dst = slice(node_of[node] * gpus_per_node, (node_of[node] + 1) * gpus_per_node)
        within = _greedy_max_overlap(new_held[src] @ old_held[dst].T)
        gpu_target[src] = node_of[node] * gpus_per_node + within
    gpu_experts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_gpus
    for gpu in range(num_gpus):
        gpu_experts[gpu_target[gpu]] = plan_layer[gpu * slots_per_gpu : (gpu + 1) * slots_per_gpu]
    return _place_in_old_slots(gpu_experts, old_layer)


def _repair_counts(
    weight: np.ndarray, old_counts: np.ndarray, peak: float, total: int
) -> np.ndarray | None:
    """Replica counts close to the old ones under which no replica exceeds ``peak``."""
    needed = np.maximum(1, np.ceil(weight / peak * (1 - _LOAD_RTOL))).astype(np.int64)
    counts = np.maximum(needed, old_counts)
    # Too many: take replicas away where the per-replica load stays lowest.
    while counts.sum() > total:
        removable = counts > needed
        if not removable.any():
            return None
        after = np.where(removable, weight / np.maximum(counts - 1, 1), np.inf)
        counts[int(np.argmin(after))] -= 1
    # Too few: extra replicas where the per-replica load is highest.
    while counts.sum() < total:
        counts[int(np.argmax(weight / counts))] += 1
    return counts


def _drop_and_fill(
    share: np.ndarray, counts: np.ndarray, old_layer: np.ndarray, num_gpus: int
) -> np.ndarray:
    """The old placement with surplus replicas dropped (from the heaviest GPUs) and
    the new replicas put, heaviest first, on the lightest GPU with a freed slot."""
    num_experts = share.shape[0]
    slots_per_gpu = old_layer.shape[0] // num_gpus
    slot_gpu = np.repeat(np.arange(num_gpus), slots_per_gpu)
    old_counts = np.bincount(old_layer, minlength=num_experts)
    plan = old_layer.copy()
    gpu_load = np.bincount(slot_gpu, weights=share[plan], minlength=num_gpus)
    free_slots: list[int] = []
    for expert in np.flatnonzero(old_counts > counts):
        slots = np.flatnonzero(plan == expert)
        heaviest_first = slots[np.argsort(-gpu_load[slot_gpu[slots]], kind="stable")]
        for slot in heaviest_first[: old_counts[expert] - counts[expert]]:
            gpu_load[slot_gpu[slot]] -= share[expert]
            free_slots.append(int(slot))
            plan[slot] = -1
    missing = np.repeat(np.arange(num_experts), np.maximum(counts - old_counts, 0))
    for expert in missing[np.argsort(-share[missing], kind="stable")]:
        gpus = slot_gpu[free_slots]
        holds = np.array(
            [expert in plan[g * slots_per_gpu : (g + 1) * slots_per_gpu] for g in gpus]
        )
        key = gpu_load[gpus] + np.where(holds, np.inf, 0.0)
        pick = int(np.argmin(key)) if np.isfinite(key).any() else int(np.argmin(gpu_load[gpus]))
        slot = free_slots.pop(pick)
        plan[slot] = expert
        gpu_load[slot_gpu[slot]] += share[expert]
    return plan


def _swap_until_under(
    plan: np.ndarray, share: np.ndarray, old_layer: np.ndarray, num_gpus: int, limit: float
) -> np.ndarray | None:
    """Swap replicas between the heaviest GPU and another until no GPU exceeds
    ``limit``; ``None`` if no swap lowers the heaviest GPU any more.

    Among swaps that bring both GPUs under the limit, the one adding the fewest
    cross-GPU moves (relative to ``old_layer``) wins; when none does, the one that
    lowers the pair's peak most.
    """
    plan = plan.copy()
    num_slots = plan.shape[0]
    num_experts = share.shape[0]
    slots_per_gpu = num_slots // num_gpus
    slot_gpu = np.repeat(np.arange(num_gpus), slots_per_gpu)
    slot_share = share[plan]
    held_before = np.zeros((num_gpus, num_experts), dtype=bool)
    held_before[slot_gpu, old_layer] = True
    holding = np.zeros((num_gpus, num_experts), dtype=np.int64)
    np.add.at(holding, (slot_gpu, plan), 1)
    for _ in range(4 * num_slots):
        gpu_load = np.bincount(slot_gpu, weights=slot_share, minlength=num_gpus)
        heavy = int(np.argmax(gpu_load))
        if gpu_load[heavy] <= limit:
            return plan
        mine = np.arange(heavy * slots_per_gpu, (heavy + 1) * slots_per_gpu)
        delta = slot_share[mine][:, None] - slot_share[None, :]  # load leaving `heavy`
        pair_peak = np.maximum(gpu_load[heavy] - delta, gpu_load[slot_gpu][None, :] + delta)
        useless = (slot_gpu[None, :] == heavy) | (delta <= 0)
        pair_peak = np.where(useless, np.inf, pair_peak)
        if not pair_peak.min() < gpu_load[heavy] * (1 - _LOAD_RTOL):
            return None
        gains = (holding == 0) & ~held_before  # receiving this expert would be a move
        losses = (holding == 1) & ~held_before  # giving away the last copy undoes a move
        outgoing, incoming = plan[mine][:, None], plan[None, :]
        other = slot_gpu[None, :]
        cost = (
            gains[other, outgoing].astype(np.int64)
            + gains[heavy, incoming]
            - losses[heavy, outgoing]
            - losses[other, incoming]
        )
        fixes = pair_peak <= limit
        if fixes.any():
            cheapest = np.where(fixes, cost, np.iinfo(np.int64).max).min()
            best = int(np.argmin(np.where(fixes & (cost == cheapest), pair_peak, np.inf)))
        else:
            best = int(np.argmin(pair_peak))
        a, b = mine[best // num_slots], best % num_slots
        for gpu, expert_out, expert_in in (
            (heavy, plan[a], plan[b]),
            (slot_gpu[b], plan[b], plan[a]),
        ):
            holding[gpu, expert_out] -= 1
            holding[gpu, expert_in] += 1
        plan[a], plan[b] = plan[b], plan[a]
        slot_share[a], slot_share[b] = slot_share[b], slot_share[a]
    return None


def _repair_old_placement(
    weight: np.ndarray, old_layer: np.ndarray, num_gpus: int, peak: float
) -> np.ndarray | None:
    """A plan close to the old placement with no GPU heavier than ``peak``, or ``None``."""
    old_counts = np.bincount(old_layer, minlength=weight.shape[0])
    counts = _repair_counts(weight, old_counts, peak, old_layer.shape[0])
    if counts is None:
        return None
    share = weight / counts
    start = _drop_and_fill(share, counts, old_layer, num_gpus)
    return _swap_until_under(start, share, old_layer, num_gpus, peak * (1 + _LOAD_RTOL))


def _layer_moves(old_layer: np.ndarray, new_layer: np.ndarray, num_gpus: int) -> int:
    slots_per_gpu = old_layer.shape[0] // num_gpus
    moves = 0
    for gpu in range(num_gpus):
        window = slice(gpu * slots_per_gpu, (gpu + 1) * slots_per_gpu)
        moves += len(set(new_layer[window].tolist()) - set(old_layer[window].tolist()))
    return moves


@register_policy("migration_aware")
def migration_aware_policy(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    old_physical_to_logical: torch.Tensor | None = None,
) -> torch.Tensor:
    """Balance at least as well as ``"deepseek"`` while sending fewer expert weights.

    Without an old placement this is ``"deepseek"``. Otherwise, per layer, the
    heaviest GPU of DeepSeek's plan sets the bar, and the policy keeps whichever of
    two plans meeting it sends fewer experts between GPUs (then: the better
    balanced): DeepSeek's plan with its nodes and GPUs relabelled to overlap the
    old placement, or the old placement repaired (replica counts changed only where
    the bar requires, then swaps off the heaviest GPU). The repair balances GPUs
    flat, so it may mix DeepSeek's groups across nodes; the relabelled plan keeps them.
    """
    reference = deepseek_policy(weight, num_replicas, num_groups, num_nodes, num_gpus)
    if old_physical_to_logical is None:
        return reference
    if num_groups % num_nodes != 0:
        num_nodes = 1
    num_experts = weight.shape[1]
    bar = gpu_loads(weight, reference, num_gpus).max(dim=1).values
    weight_np = weight.double().numpy()
    old_np = old_physical_to_logical.long().numpy()
    reference_np = reference.numpy()
    plan = np.empty_like(old_np)
    for layer in range(weight_np.shape[0]):
        old_layer = old_np[layer]
        candidates = [
            reference_np[layer],
            _align_to_old(reference_np[layer], old_layer, num_experts, num_nodes, num_gpus),
        ]
        peak = float(bar[layer])
        repaired = (
            _repair_old_placement(weight_np[layer], old_layer, num_gpus, peak)
            if peak > 0
            else old_layer.copy()
        )
        if repaired is not None:
            candidates.append(repaired)
        scores = []
        for candidate in candidates:
            loads = gpu_loads(
                torch.from_numpy(weight_np[layer : layer + 1]),
                torch.from_numpy(candidate[None]),
                num_gpus,
            )
            candidate_peak = float(loads.max())
            if candidate_peak > peak * (1 + _LOAD_RTOL) + 1e-12:
                continue
            # Peaks equal up to summation order tie; then fewer local slot copies win.
            scores.append(
                (
                    _layer_moves(old_layer, candidate, num_gpus),
                    round(candidate_peak / peak, 9) if peak > 0 else 0.0,
                    int((candidate != old_layer).sum()),
                    candidate,
                )
            )
        # The reference always qualifies, so `scores` is never empty.
        plan[layer] = min(scores, key=lambda score: score[:3])[3]
    return torch.from_numpy(plan)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_rebalance_arguments(
    num_logical_experts: int,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: str | None = None,
) -> None:
    """Raise ``ValueError`` naming the first argument of :func:`rebalance` that cannot work."""
    if policy is not None:
        get_policy(policy)
    for name, value in (
        ("num_logical_experts", num_logical_experts),
        ("num_replicas", num_replicas),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_gpus", num_gpus),
    ):
        _check_positive(name, value)
    if num_replicas < num_logical_experts:
        raise ValueError(
            f"num_replicas ({num_replicas}) must be at least the number of logical experts "
            f"({num_logical_experts})"
        )
    if num_replicas % num_gpus != 0:
        raise ValueError(
            f"num_gpus ({num_gpus}) must divide num_replicas ({num_replicas}) into equal slots per GPU"
        )
    if num_gpus % num_nodes != 0:
        raise ValueError(f"num_nodes ({num_nodes}) must divide num_gpus ({num_gpus})")
    if num_logical_experts % num_groups != 0:
        raise ValueError(
            f"num_groups ({num_groups}) must divide the {num_logical_experts} logical experts"
        )


def rebalance(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: str = "deepseek",
    old_physical_to_logical: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan where every physical expert slot goes, for every layer.

    Args:
        weight: ``[L, E]`` non-negative load per logical expert (any real or int dtype).
        num_replicas: physical slots P per layer, ``>= E`` and a multiple of ``num_gpus``.
        num_groups: expert groups (E must divide into them); DeepSeek packs groups onto nodes.
        num_nodes: nodes; ``num_gpus`` must divide into them.
        num_gpus: GPUs (EP ranks); GPU ``g`` owns slots ``[g*P/num_gpus, (g+1)*P/num_gpus)``.
        policy: a name from :func:`available_policies`.
        old_physical_to_logical: ``[L, P]`` current placement, used by migration-aware policies.

    Returns:
        ``(physical_to_logical [L, P], logical_to_physical [L, E, S], logical_replica_count [L, E])``,
        int64 on the CPU; each expert's replicas are listed in ascending physical
        order, rows padded with -1 to ``S`` = the largest replica count.
    """
    fn = get_policy(policy)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"weight must be a 2-D [num_layers, num_logical_experts] tensor, got {shape}"
        )
    if weight.is_complex() or weight.dtype == torch.bool:
        raise ValueError(f"weight must be a real number tensor, got {weight.dtype}")
    num_layers, num_experts = weight.shape
    check_rebalance_arguments(num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    weight = weight.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("weight must be finite and non-negative")
    old = None
    if old_physical_to_logical is not None:
        old = old_physical_to_logical.detach().to("cpu", torch.int64)
        if tuple(old.shape) != (num_layers, num_replicas):
            raise ValueError(
                f"old_physical_to_logical must be [{num_layers}, {num_replicas}], got "
                f"{tuple(old.shape)}"
            )
        if old.numel() and (int(old.min()) < 0 or int(old.max()) >= num_experts):
            raise ValueError(
                f"old_physical_to_logical holds ids outside [0, {num_experts}): "
                f"[{int(old.min())}, {int(old.max())}]"
            )
    physical_to_logical = fn(weight, num_replicas, num_groups, num_nodes, num_gpus, old).long()
    if tuple(physical_to_logical.shape) != (num_layers, num_replicas):
        raise ValueError(
            f"EPLB policy {policy!r} returned shape {tuple(physical_to_logical.shape)}, "
            f"expected {(num_layers, num_replicas)}"
        )
    logical_to_physical, counts = physical_to_logical_to_logical_to_physical(
        physical_to_logical, num_experts
    )
    if bool((counts == 0).any()):
        raise ValueError(f"EPLB policy {policy!r} left a logical expert without a replica")
    return physical_to_logical, logical_to_physical, counts
