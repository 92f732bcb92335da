"""Fold the cast of routed ids into the routing op, so the kernel writes the final dtype."""

from __future__ import annotations

import operator

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized

from .tracing import set_fake_values


def _route_nodes(graph: torch.fx.Graph):
    yield from graph.find_nodes(op="call_function", target=torch.ops.moe_compile.route.default)
    for node in graph.find_nodes(op="call_function", target=auto_functionalized):
        if node.args[0] in (
            torch.ops.moe_compile.route_eplb.default,
            torch.ops.moe_compile.route_zero_experts.default,
        ):
            yield node


def _ids_output(node: torch.fx.Node) -> torch.fx.Node | None:
    """The getitem that reads the ids (output 1 of every routing op)."""
    found = [u for u in node.users if u.target is operator.getitem and u.args[1] == 1]
    return found[0] if len(found) == 1 else None


def _with_indices_dtype(node: torch.fx.Node, dtype: torch.dtype) -> None:
    if node.target is auto_functionalized:
        node.kwargs = {**node.kwargs, "indices_dtype": dtype}
        return
    schema_names = [a.name for a in node.target._schema.arguments]
    args = list(node.args)
    position = schema_names.index("indices_dtype")
    if position < len(args):
        args[position] = dtype
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "indices_dtype": dtype}


def fold_index_casts(graph: torch.fx.Graph) -> int:
    """``convert_element_type(ids, dtype)`` as the ids' only use -> the op emits ``dtype``."""
    folded = 0
    for node in list(_route_nodes(graph)):
        ids = _ids_output(node)
        if ids is None or len(ids.users) != 1:
            continue
        (cast,) = ids.users
        if cast.target is not torch.ops.prims.convert_element_type.default:
            continue
        dtype = cast.args[1]
        if dtype.is_floating_point or dtype == torch.bool:
            continue
        _with_indices_dtype(node, dtype)
        set_fake_values(node, [u for u in node.users if u.target is operator.getitem])
        cast.replace_all_uses_with(ids)
        graph.erase_node(cast)
        folded += 1
    return folded
