"""EPLB patterns: the remap + load-count chain, then its fold into the routing op.

Two steps keep the pattern count linear instead of routers x EPLB variants:
1. the eager mapping chain (whatever produced the ids) becomes one functional
   ``moe_compile::eplb_remap`` op;
2. ``eplb_remap`` fed by a ``moe_compile::route`` op whose ids have no other
   user becomes one ``route_eplb`` op, inserted through ``auto_functionalized``
   so Inductor writes the load counter in place.
"""

from __future__ import annotations

import functools
import itertools
import operator

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch._inductor.pattern_matcher import PatternMatcherPass, register_replacement

import moe_compile.custom_ops.eplb_remap  # noqa: F401  (registers the op the patterns emit)
from moe_compile.eplb.mapping import REPLICA_POLICIES, map_to_physical

from .tracing import set_fake_values, trace_post_grad

_EXAMPLE_TOKENS, _EXAMPLE_TOP_K, _EXAMPLE_EXPERTS, _EXAMPLE_SLOTS = 13, 6, 32, 3


def _search_and_replace(policy: str, with_padding: bool):
    def search(topk_ids, logical_to_physical_map, logical_replica_count, load, record, *unpadded):
        physical, counted, increments = map_to_physical(
            topk_ids,
            logical_to_physical_map,
            logical_replica_count,
            load.shape[0],
            record,
            *unpadded,
            policy=policy,
        )
        return physical, load.scatter_add(0, counted, increments.to(load.dtype))

    def replace(topk_ids, logical_to_physical_map, logical_replica_count, load, record, *unpadded):
        return torch.ops.moe_compile.eplb_remap.default(
            topk_ids,
            logical_to_physical_map,
            logical_replica_count,
            load,
            record,
            unpadded[0] if unpadded else None,
            policy,
        )

    if not with_padding:
        return (
            lambda topk_ids, logical_to_physical_map, logical_replica_count, load, record: search(
                topk_ids, logical_to_physical_map, logical_replica_count, load, record
            ),
            lambda topk_ids, logical_to_physical_map, logical_replica_count, load, record: replace(
                topk_ids, logical_to_physical_map, logical_replica_count, load, record
            ),
        )

    def search_padded(
        topk_ids, logical_to_physical_map, logical_replica_count, load, record, unpadded
    ):
        return search(
            topk_ids, logical_to_physical_map, logical_replica_count, load, record, unpadded
        )

    def replace_padded(
        topk_ids, logical_to_physical_map, logical_replica_count, load, record, unpadded
    ):
        return replace(
            topk_ids, logical_to_physical_map, logical_replica_count, load, record, unpadded
        )

    return search_padded, replace_padded


@functools.cache
def eplb_patterns() -> PatternMatcherPass:
    """The mapping chain for both policies, with and without padding, and for
    int32 and int64 maps (an int32 map adds a cast to the traced graph)."""
    patterns = PatternMatcherPass(pass_name="moe_compile_eplb")
    for policy, with_padding, map_dtype, count_dtype in itertools.product(
        REPLICA_POLICIES, (False, True), (torch.int64, torch.int32), (torch.int64, torch.int32)
    ):
        search, replace = _search_and_replace(policy, with_padding)
        example_inputs = [
            torch.zeros(_EXAMPLE_TOKENS, _EXAMPLE_TOP_K, dtype=torch.int64),
            torch.zeros(_EXAMPLE_EXPERTS, _EXAMPLE_SLOTS, dtype=map_dtype),
            torch.ones(_EXAMPLE_EXPERTS, dtype=count_dtype),
            torch.zeros(_EXAMPLE_EXPERTS + 8, dtype=torch.int32),
            torch.tensor(True),
        ] + ([torch.tensor(_EXAMPLE_TOKENS)] if with_padding else [])
        register_replacement(
            search,
            replace,
            example_inputs,
            trace_post_grad,
            patterns,
            pattern_name=f"eplb_{policy}_{'padded' if with_padding else 'unpadded'}",
            skip_duplicates=True,
        )
    return patterns


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _getitem_users(node: torch.fx.Node) -> dict[int, torch.fx.Node] | None:
    """``{index: getitem node}`` for a multi-output node, or None if used otherwise."""
    out = {}
    for user in node.users:
        if user.target is not operator.getitem or user.args[1] in out:
            return None
        out[user.args[1]] = user
    return out


def fold_remap_into_routing(graph: torch.fx.Graph) -> int:
    """``route -> eplb_remap`` becomes one ``route_eplb``; returns how many were folded."""
    route_op = torch.ops.moe_compile.route.default
    remap_op = torch.ops.moe_compile.eplb_remap.default
    route_eplb_op = torch.ops.moe_compile.route_eplb.default
    route_params = [a.name for a in route_op._schema.arguments]
    folded = 0
    for remap in list(graph.find_nodes(op="call_function", target=remap_op)):
        ids = remap.args[0]
        if not (isinstance(ids, torch.fx.Node) and ids.target is operator.getitem):
            continue
        route = ids.args[0]
        if route.target is not route_op or ids.args[1] != 1 or _single_user(ids) is not remap:
            continue
        route_outputs, remap_outputs = _getitem_users(route), _getitem_users(remap)
        if route_outputs is None or remap_outputs is None:
            continue
        kwargs = dict(zip(route_params, route.args, strict=False)) | dict(route.kwargs)
        kwargs.update(
            logical_to_physical_map=remap.args[1],
            logical_replica_count=remap.args[2],
            expert_load_view=remap.args[3],
            should_record=remap.args[4],
            num_unpadded_tokens=remap.args[5],
            replica_policy=remap.args[6],
        )
        with graph.inserting_before(remap):
            fused = graph.call_function(auto_functionalized, (route_eplb_op,), kwargs)
            outputs = [graph.call_function(operator.getitem, (fused, i)) for i in range(3)]
        set_fake_values(fused, outputs)
        for index, new in ((0, outputs[0]),):
            if index in route_outputs:
                route_outputs[index].replace_all_uses_with(new)
        for index, new in ((0, outputs[1]), (1, outputs[2])):
            if index in remap_outputs:
                remap_outputs[index].replace_all_uses_with(new)
        for node in [*remap_outputs.values(), remap, *route_outputs.values(), route]:
            graph.erase_node(node)
        folded += 1
    return folded
