"""Independent float64 / pure-Python references for routing and EPLB, written from SPEC.md.

Nothing here imports ``moe_compile``: the tests compare the library against
these functions, so they must not share code with it. Rankings use
``np.lexsort`` with the expert index as the secondary key, which states the
"equal scores go to the lower index" rule explicitly.

Test data is built so that float32 (the library) and float64 (here) rank the
same way: exact ties come from equal inputs, every other pair of compared
values is separated far beyond float32 rounding, and
:func:`assert_clean_ranking` checks that before a reference is trusted.
"""

from __future__ import annotations

import numpy as np
import torch

TOKEN_HASH_MULTIPLIER = 2654435769
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")

# Relative gap below which two distinct float64 values might swap in float32.
# float32 scores are within ~2.5e-7 (relative) of float64; 1e-5 leaves 40x margin.
SEPARATION_RTOL = 1e-5


# ---------------------------------------------------------------- test data
def grid_logits(num_tokens: int, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """float32 logits on the grid ``m/4 + 0.1``, m in [-8, 8].

    Few distinct values, so equal logits (ties) are common at every rank. The
    offset breaks ``sigmoid(x) + sigmoid(-x) == 1``, so sums of two scores of
    distinct pairs stay >= 3.6e-5 apart (relative) for every scoring function.
    """
    steps = torch.randint(-8, 9, (num_tokens, num_experts), generator=generator)
    return (steps.double() / 4 + 0.1).float()


def coarse_bias(num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """Per-expert bias in {0, 2, 4}: larger than any score range, so ``score + bias``
    never nearly ties across bias levels, yet it reorders the experts."""
    return (torch.randint(0, 3, (num_experts,), generator=generator) * 2).float()


# ---------------------------------------------------------------- scoring
def scores64(logits: torch.Tensor, scoring_func: str) -> np.ndarray:
    x = logits.double().numpy()
    if scoring_func == "softmax":
        shifted = np.exp(x - x.max(axis=-1, keepdims=True)) if x.size else x
        return shifted / shifted.sum(axis=-1, keepdims=True)
    if scoring_func == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if scoring_func == "sqrtsoftplus":
        return np.sqrt(np.log1p(np.exp(x)))
    raise AssertionError(f"no reference for {scoring_func}")


def rank_desc_lower_index_first(values: np.ndarray) -> np.ndarray:
    """Column order per row: larger value first, equal values by ascending index."""
    index = np.broadcast_to(np.arange(values.shape[-1]), values.shape)
    # lexsort sorts by the last key first; -inf stays last, as masked entries must.
    return np.lexsort((index, -values), axis=-1)


def assert_clean_ranking(values: np.ndarray, depth: int, atol: float = 0.0) -> None:
    """The top ``depth + 1`` values of each row are exact ties or clearly apart.

    Guards the test data, not the library: a near-tie would make the float32
    order a matter of rounding that no float64 reference can predict.
    """
    if values.size == 0:
        return
    order = rank_desc_lower_index_first(values)
    top = np.take_along_axis(values, order, axis=-1)[:, : depth + 1]
    upper, lower = top[:, :-1], top[:, 1:]
    finite = np.isfinite(upper) & np.isfinite(lower)
    with np.errstate(invalid="ignore"):
        gap = upper - lower
        tolerance = SEPARATION_RTOL * np.maximum(np.abs(upper), np.abs(lower)) + atol
    near_tie = finite & (gap != 0) & (gap <= tolerance)
    if near_tie.any():
        row = int(np.argwhere(near_tie)[0, 0])
        raise AssertionError(f"test data has a near-tie in row {row}: {top[row]}")


def renormalized(weights: np.ndarray, scoring_func: str) -> np.ndarray:
    denominator = weights.sum(axis=-1, keepdims=True)
    if scoring_func == "sqrtsoftplus":
        denominator = np.maximum(denominator, 1e-20)
    return weights / denominator


# ---------------------------------------------------------------- routers
def topk_reference(
    logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scoring_func: str,
    bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    bias_atol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """(weights float64 [T, k], ids int64 [T, k]) of plain or biased top-k."""
    scores = scores64(logits, scoring_func)
    choice = scores if bias is None else scores + bias.double().numpy()
    assert_clean_ranking(choice, top_k, atol=0.0 if bias is None else bias_atol)
    ids = rank_desc_lower_index_first(choice)[:, :top_k]
    weights = np.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        weights = renormalized(weights, scoring_func)
    return weights * routed_scaling_factor, ids


def grouped_topk_reference(
    logits: torch.Tensor,
    top_k: int,
    num_expert_group: int,
    topk_group: int,
    renormalize: bool,
    scoring_func: str,
    bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    bias_atol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek grouped top-k in float64."""
    scores = scores64(logits, scoring_func)
    num_tokens, num_experts = scores.shape
    group_size = num_experts // num_expert_group
    choice = scores if bias is None else scores + bias.double().numpy()
    atol = 0.0 if bias is None else bias_atol
    per_group = choice.reshape(num_tokens, num_expert_group, group_size)
    if bias is None:
        group_score = per_group.max(axis=2, initial=-np.inf)
    else:
        best_two = -np.sort(-per_group, axis=2)[:, :, :2]
        group_score = best_two[:, :, 0] + best_two[:, :, 1]
    assert_clean_ranking(group_score, topk_group, atol=2 * atol)
    kept_groups = rank_desc_lower_index_first(group_score)[:, :topk_group]
    group_is_kept = np.zeros((num_tokens, num_expert_group), dtype=bool)
    np.put_along_axis(group_is_kept, kept_groups, True, axis=1)
    expert_is_kept = np.repeat(group_is_kept, group_size, axis=1)
    masked = np.where(expert_is_kept, choice, -np.inf)
    assert_clean_ranking(masked, top_k, atol=atol)
    ids = rank_desc_lower_index_first(masked)[:, :top_k]
    weights = np.take_along_axis(scores, ids, axis=1)
    if renormalize:
        weights = renormalized(weights, scoring_func)
    return weights * routed_scaling_factor, ids


# ---------------------------------------------------------------- EPLB
def token_hash_replica(token: int, replica_count: int) -> int:
    return ((token * TOKEN_HASH_MULTIPLIER) % (1 << 32)) % replica_count


def eplb_reference(
    logical_ids,
    logical_to_physical_map,
    replica_count,
    num_physical: int,
    policy: str,
    record: bool = True,
    num_unpadded_tokens: int | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Physical ids and the per-physical-expert load, slot by slot in plain Python."""
    ids = _as_nested_list(logical_ids)
    l2p = _as_nested_list(logical_to_physical_map)
    counts = _as_nested_list(replica_count)
    num_logical = len(l2p)
    physical_ids: list[list[int]] = []
    load = [0] * num_physical
    for token, row in enumerate(ids):
        mapped_row = []
        for position, logical in enumerate(row):
            slot = token * len(row) + position
            if not 0 <= logical < num_logical:
                mapped_row.append(-1)
                continue
            replicas = max(counts[logical], 1)
            if policy == "modulo":
                replica = slot % replicas
            elif policy == "token_hash":
                replica = token_hash_replica(token, replicas)
            else:
                raise AssertionError(policy)
            physical = l2p[logical][replica]
            mapped_row.append(physical)
            counted = num_unpadded_tokens is None or token < num_unpadded_tokens
            if record and counted and 0 <= physical < num_physical:
                load[physical] += 1
        physical_ids.append(mapped_row)
    return physical_ids, load


def _as_nested_list(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def random_replica_layout(
    num_logical: int, num_redundant: int, generator: torch.Generator, max_replicas=None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A shuffled physical layout with ``num_redundant`` extra replicas.

    Returns ``(logical_to_physical_map [E, S] int64 padded with -1,
    logical_replica_count [E] int64, num_physical)``. Replica slots are listed
    in ascending physical order, as SPEC §4 builds them.
    """
    num_physical = num_logical + num_redundant
    extra = torch.randint(0, num_logical, (num_redundant,), generator=generator).tolist()
    if max_replicas is not None:
        if num_physical > num_logical * max_replicas:
            raise ValueError(f"{num_physical} replicas do not fit {max_replicas} per expert")
        # Redraw an extra replica of an expert that already has max_replicas (draws
        # that fit are kept, so layouts that always fit are unchanged).
        held = [1] * num_logical
        for i, logical in enumerate(extra):
            while held[logical] >= max_replicas:
                logical = int(torch.randint(0, num_logical, (1,), generator=generator))
            held[logical] += 1
            extra[i] = logical
    physical_to_logical = list(range(num_logical)) + extra
    shuffle = torch.randperm(num_physical, generator=generator).tolist()
    physical_to_logical = [physical_to_logical[i] for i in shuffle]
    replicas: list[list[int]] = [[] for _ in range(num_logical)]
    for physical, logical in enumerate(physical_to_logical):
        replicas[logical].append(physical)
    width = max_replicas or max(len(r) for r in replicas)
    table = [r + [-1] * (width - len(r)) for r in replicas]
    counts = [len(r) for r in replicas]
    return torch.tensor(table), torch.tensor(counts), num_physical
