"""The "inductor" lowering strategy: fused routing ops rewritten for Inductor to fuse.

``torch.topk``/``sort`` are fallbacks in Inductor and the eager EPLB count is
a scatter into whatever dtype the counter has. Here the selection becomes k
rounds of (row max, lowest column holding it, mask it out) — reductions over
the same row that Inductor fuses into one kernel with the scoring before and
the remap and count after, the count being an accumulating ``index_put``
that Inductor emits as atomics.
"""

from __future__ import annotations

import functools

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch._inductor.pattern_matcher import (
    CallFunction,
    KeywordArg,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)

from moe_compile.eplb.mapping import map_to_physical
from moe_compile.router.custom import append_shared_experts, mask_zero_experts
from moe_compile.router.scoring import compute_scores, renormalize_weights


def _divide_rounded(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """float32 ``numerator / denominator`` correctly rounded, as eager CUDA divides.

    Inductor's Triton code divides float32 approximately; the quotient of two
    float32 values taken in float64 and rounded to float32 is the correctly
    rounded float32 quotient (53 >= 2 * 24 + 2 bits: double rounding is innocuous).
    """
    return (numerator.double() / denominator.double()).float()


def _scores(router_logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """``compute_scores`` in the arithmetic eager CUDA uses, so selection on them breaks
    near-ties as eager does: ``1 / (1 + exp(-x))`` for sigmoid and ``exp(x - max) / sum``
    for softmax with correctly rounded division (Inductor's own sigmoid and
    division are approximate). Elsewhere Inductor's math already matches eager."""
    if router_logits.device.type != "cuda" or scoring_func == "sqrtsoftplus":
        return compute_scores(router_logits, scoring_func)
    logits = router_logits.float()
    if scoring_func == "sigmoid":
        return _divide_rounded(torch.ones_like(logits), 1.0 + torch.exp(-logits))
    numerators = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    return _divide_rounded(numerators, numerators.sum(dim=-1, keepdim=True))


def _select_top(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim by k rounds of max; equal values go to the lower index."""
    num_columns = values.shape[-1]
    columns = torch.arange(num_columns, device=values.device)
    chosen_values, chosen_ids = [], []
    for _ in range(k):
        best = values.amax(dim=-1, keepdim=True)
        best_id = torch.where(values == best, columns, num_columns).amin(dim=-1, keepdim=True)
        # A NaN row matches nothing; clamp keeps the id a valid column.
        best_id = best_id.clamp(max=num_columns - 1)
        chosen_values.append(best)
        chosen_ids.append(best_id)
        values = torch.where(columns == best_id, float("-inf"), values)
    return torch.cat(chosen_values, dim=-1), torch.cat(chosen_ids, dim=-1)


def _top2_sum(grouped: torch.Tensor) -> torch.Tensor:
    """Sum of the two largest values of each group (of size >= 2)."""
    group_size = grouped.shape[-1]
    columns = torch.arange(group_size, device=grouped.device)
    first = grouped.amax(dim=-1, keepdim=True)
    first_id = torch.where(grouped == first, columns, group_size).amin(dim=-1, keepdim=True)
    second = torch.where(columns == first_id, float("-inf"), grouped).amax(dim=-1, keepdim=True)
    return (first + second).squeeze(-1)


def decomposed_route(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_expert_group: int,
    topk_group: int,
    num_fused_shared_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_compile::route`` in plain reductions; ids are int64."""
    num_tokens = router_logits.shape[0]
    num_routed = router_logits.shape[1] - num_fused_shared_experts
    scores = _scores(router_logits[:, :num_routed], scoring_func)
    choice = scores
    if e_score_correction_bias is not None:
        choice = scores + e_score_correction_bias.float()
    if num_expert_group > 1:
        group_size = num_routed // num_expert_group
        grouped = choice.view(num_tokens, num_expert_group, group_size)
        if e_score_correction_bias is None:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = _top2_sum(grouped)
        _, kept_groups = _select_top(group_scores, topk_group)
        groups = torch.arange(num_expert_group, device=router_logits.device)
        group_kept = (kept_groups.unsqueeze(-1) == groups).any(dim=1)
        expert_kept = group_kept.unsqueeze(-1).expand(num_tokens, num_expert_group, group_size)
        choice = torch.where(expert_kept.reshape(num_tokens, num_routed), choice, float("-inf"))
    _, topk_ids = _select_top(choice, top_k)
    topk_weights = scores.gather(-1, topk_ids)
    if renormalize:
        topk_weights = renormalize_weights(topk_weights, scoring_func)
    topk_weights = topk_weights * routed_scaling_factor
    if num_fused_shared_experts:
        return append_shared_experts(
            topk_weights, topk_ids, router_logits, num_fused_shared_experts
        )
    return topk_weights, topk_ids


def decomposed_route_eplb(
    router_logits,
    e_score_correction_bias,
    logical_to_physical_map,
    logical_replica_count,
    expert_load_view,
    should_record,
    num_unpadded_tokens,
    *,
    top_k,
    replica_policy,
    indices_dtype,
    num_fused_shared_experts,
    **route_options,
):
    """``moe_compile::route_eplb``: returns (weights, physical ids, updated load)."""
    weights, ids = decomposed_route(
        router_logits,
        e_score_correction_bias,
        top_k,
        num_fused_shared_experts=num_fused_shared_experts,
        **route_options,
    )
    physical, new_load = _remap_and_count(
        ids[:, :top_k],
        logical_to_physical_map,
        logical_replica_count,
        expert_load_view,
        should_record,
        num_unpadded_tokens,
        replica_policy,
    )
    if num_fused_shared_experts:
        physical = torch.cat([physical, ids[:, top_k:]], dim=-1)
    return weights, physical.to(indices_dtype), new_load


def decomposed_route_zero_experts(
    router_logits,
    e_score_correction_bias,
    logical_to_physical_map,
    logical_replica_count,
    expert_load_view,
    should_record,
    num_unpadded_tokens,
    *,
    top_k,
    num_real_experts,
    replica_policy,
    indices_dtype,
    **route_options,
):
    """``moe_compile::route_zero_experts``: (weights, ids, zero-expert weight[, updated load])."""
    weights, ids = decomposed_route(
        router_logits, e_score_correction_bias, top_k, num_fused_shared_experts=0, **route_options
    )
    weights, ids, zero_weight = mask_zero_experts(weights, ids, num_real_experts)
    if logical_to_physical_map is None:
        return weights, ids.to(indices_dtype), zero_weight
    physical, new_load = _remap_and_count(
        ids,
        logical_to_physical_map,
        logical_replica_count,
        expert_load_view,
        should_record,
        num_unpadded_tokens,
        replica_policy,
    )
    return weights, physical.to(indices_dtype), zero_weight, new_load


def _remap_and_count(
    ids,
    logical_to_physical_map,
    logical_replica_count,
    expert_load_view,
    should_record,
    num_unpadded_tokens,
    replica_policy,
):
    """Physical ids and the load with this batch added."""
    physical, counted, increments = map_to_physical(
        ids,
        logical_to_physical_map,
        logical_replica_count,
        expert_load_view.shape[0],
        should_record,
        num_unpadded_tokens,
        replica_policy,
    )
    # Inductor emits atomics only into int32/float targets and falls back to
    # ATen for an int64 scatter: count this batch in int32, then add.
    count_dtype = torch.int32 if expert_load_view.dtype == torch.int64 else expert_load_view.dtype
    batch_load = torch.zeros_like(expert_load_view, dtype=count_dtype).index_put(
        (counted,), increments.to(count_dtype), accumulate=True
    )
    return physical, expert_load_view + batch_load


_ROUTE_TENSORS = ("router_logits", "e_score_correction_bias")
_EPLB_TENSORS = (
    "logical_to_physical_map",
    "logical_replica_count",
    "expert_load_view",
    "should_record",
    "num_unpadded_tokens",
)


def _params(op) -> list[str]:
    return [a.name for a in op._schema.arguments]


def _replace(match: Match, kwargs: dict, tensor_names: tuple[str, ...], fn) -> None:
    """Trace ``fn`` over the tensor arguments (None ones stay None) and splice it in."""
    present = [n for n in tensor_names if kwargs[n] is not None]
    options = {n: v for n, v in kwargs.items() if n not in tensor_names}

    def replacement(*tensors):
        given = dict(zip(present, tensors, strict=True))
        return fn(**{n: given.get(n) for n in tensor_names}, **options)

    match.replace_by_example(replacement, [kwargs[n] for n in present])


def _counting_op_lowering(decomposed):
    """The pattern handler that replaces an op with a load counter by ``decomposed``."""

    def lower(match: Match, **kwargs):
        _replace(match, kwargs, _ROUTE_TENSORS + _EPLB_TENSORS, decomposed)

    return lower


@functools.cache
def lowering_patterns() -> PatternMatcherPass:
    patterns = PatternMatcherPass(pass_name="moe_compile_inductor_lowering")
    route_op = torch.ops.moe_compile.route.default

    @register_graph_pattern(
        CallFunction(route_op, *(KeywordArg(n) for n in _params(route_op))), pass_dict=patterns
    )
    def lower_route(match: Match, **kwargs):
        indices_dtype = kwargs.pop("indices_dtype")

        def route(**arguments):
            weights, ids = decomposed_route(**arguments)
            return weights, ids.to(indices_dtype)

        _replace(match, kwargs, _ROUTE_TENSORS, route)

    # The ops with a load counter, inserted through auto_functionalized.
    for op, decomposed in (
        (torch.ops.moe_compile.route_eplb.default, decomposed_route_eplb),
        (torch.ops.moe_compile.route_zero_experts.default, decomposed_route_zero_experts),
    ):
        register_graph_pattern(
            CallFunction(auto_functionalized, op, **{n: KeywordArg(n) for n in _params(op)}),
            pass_dict=patterns,
        )(_counting_op_lowering(decomposed))

    return patterns
