"""Fold ``ZeroExpertRouter``'s masking (and the remap after it) into ``route_zero_experts``.

After the routing patterns a zero-expert router's graph reads::

    weights, ids = route(...)                   # real + zero experts, no shared ones
    is_zero = ids >= num_real_experts
    zero_weight = where(is_zero, weights, 0).sum(-1, keepdim=True)
    weights = where(is_zero, 0, weights)
    ids = where(is_zero, 0, ids)
    [ids, load = eplb_remap(ids, ...)]          # with EPLB, through integer casts

The masking sits between routing and remap, so ``fold_remap_into_routing``
cannot reach the remap. This pass recognises the masking by its structure and
replaces all of it, remap included when there is one, with one
``route_zero_experts`` op (inserted through ``auto_functionalized``: its load
counter is mutable, None without EPLB). Anything else about the nodes, such as
another user of the unmasked ids, leaves the graph as it is.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch._inductor.pattern_matcher import stable_topological_sort

from .eplb import (
    _REMAP_ARGUMENTS,
    _getitem_users,
    _is_integer_cast,
    _remap_kwargs,
    _route_arg,
    _route_kwargs,
    _single_user,
)
from .tracing import set_fake_values

_aten = torch.ops.aten


@dataclass
class _Masking:
    route: torch.fx.Node
    num_real_experts: int
    weights: torch.fx.Node  # where(is_zero, 0, weights)
    ids: torch.fx.Node  # where(is_zero, 0, ids)
    zero_weight: torch.fx.Node | None  # where(is_zero, weights, 0).sum(-1, keepdim=True)
    dead: list[torch.fx.Node]


def _is_zero(value) -> bool:
    """A literal 0 or a 0-d ``full([], 0)`` node."""
    if isinstance(value, torch.fx.Node):
        return (
            value.target is _aten.full.default and list(value.args[0]) == [] and value.args[1] == 0
        )
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _is_where(node: torch.fx.Node, condition: torch.fx.Node) -> bool:
    return (
        node.target in (_aten.where.self, _aten.where.ScalarSelf, _aten.where.ScalarOther)
        and node.args[0] is condition
    )


def _find_masking(route: torch.fx.Node) -> _Masking | None:
    outputs = _getitem_users(route)
    if outputs is None or set(outputs) != {0, 1} or _route_arg(route, "num_fused_shared_experts"):
        return None
    weights, ids = outputs[0], outputs[1]
    compares = [u for u in ids.users if u.target is _aten.ge.Scalar]
    if len(compares) != 1 or not isinstance(compares[0].args[1], int):
        return None
    is_zero = compares[0]
    masked_ids = masked_weights = zero_weight = None
    for user in is_zero.users:
        if not _is_where(user, is_zero):
            return None
        on_zero, otherwise = user.args[1], user.args[2]
        if on_zero is weights and _is_zero(otherwise):
            total = _single_user(user)
            if zero_weight is not None or total is None or not _is_last_dim_sum(total, user):
                return None
            zero_weight = total
        elif _is_zero(on_zero) and otherwise is weights and masked_weights is None:
            masked_weights = user
        elif _is_zero(on_zero) and otherwise is ids and masked_ids is None:
            masked_ids = user
        else:
            return None
    if masked_ids is None or masked_weights is None:
        return None
    if set(ids.users) != {is_zero, masked_ids}:
        return None
    weight_users = {masked_weights} | ({zero_weight.args[0]} if zero_weight else set())
    if set(weights.users) != weight_users:
        return None
    wheres = list(is_zero.users)
    constants = [a for w in wheres for a in w.args[1:] if a is not weights and a is not ids]
    dead = [zero_weight, *wheres, is_zero, weights, ids, route, *constants]
    return _Masking(
        route, is_zero.args[1], masked_weights, masked_ids, zero_weight, [n for n in dead if n]
    )


def _is_last_dim_sum(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    if node.target is not _aten.sum.dim_IntList or node.args[0] is not source:
        return False
    dims = list(node.args[1])
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return len(dims) == 1 and dims[0] in (-1, 1) and keepdim and "dtype" not in node.kwargs


def _find_remap(masked_ids: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """The ``eplb_remap`` reading the masked ids through lossless integer casts."""
    node, between = masked_ids, []
    while True:
        user = _single_user(node)
        if user is None:
            return None
        if user.target is torch.ops.moe_compile.eplb_remap.default and user.args[0] is node:
            return user, between
        if not _is_integer_cast(user):
            return None
        between.append(user)
        node = user


def fold_zero_expert_routing(graph: torch.fx.Graph) -> int:
    """``route`` + zero-expert masking [+ ``eplb_remap``] -> ``route_zero_experts``."""
    op = torch.ops.moe_compile.route_zero_experts.default
    folded = 0
    for route in list(
        graph.find_nodes(op="call_function", target=torch.ops.moe_compile.route.default)
    ):
        masking = _find_masking(route)
        if masking is None:
            continue
        found = _find_remap(masking.ids)
        remap_outputs = _getitem_users(found[0]) if found else None
        remap, casts = found if remap_outputs is not None else (None, [])
        kwargs = _route_kwargs(route)
        del kwargs["num_fused_shared_experts"]  # 0: _find_masking checked it
        kwargs.update(
            indices_dtype=(remap.args[0] if remap else masking.ids).meta["val"].dtype,
            num_real_experts=masking.num_real_experts,
        )
        if remap is None:
            kwargs |= dict.fromkeys(_REMAP_ARGUMENTS) | {"replica_policy": "token_hash"}
        else:
            kwargs |= _remap_kwargs(remap)
        with graph.inserting_before(remap or masking.ids):
            fused = graph.call_function(auto_functionalized, (op,), kwargs)
            outputs = [graph.call_function(operator.getitem, (fused, i)) for i in range(4)]
        set_fake_values(fused, outputs[:3] + (outputs[3:] if remap else []))
        masking.weights.replace_all_uses_with(outputs[0])
        if masking.zero_weight is not None:
            masking.zero_weight.replace_all_uses_with(outputs[2])
        dead = masking.dead
        if remap is None:
            masking.ids.replace_all_uses_with(outputs[1])
        else:
            if 0 in remap_outputs:
                remap_outputs[0].replace_all_uses_with(outputs[1])
            if 1 in remap_outputs:
                remap_outputs[1].replace_all_uses_with(outputs[3])
            dead = [*remap_outputs.values(), remap, *reversed(casts), *dead]
        for node in dict.fromkeys(dead):
            if isinstance(node, torch.fx.Node) and not node.users:
                graph.erase_node(node)
        for unused in outputs:
            if not unused.users:
                graph.erase_node(unused)
        folded += 1
    if folded:
        stable_topological_sort(graph)
    return folded
