"""EPLB patterns: the remap + load-count chain, then its fold into the routing op.

Two steps keep the pattern count linear instead of routers x EPLB variants:
1. the eager mapping chain (whatever produced the ids) becomes one functional
   ``moe_compile::eplb_remap`` op;
2. ``eplb_remap`` fed by a ``moe_compile::route`` op whose ids have no other
   user becomes one ``route_eplb`` op, inserted through ``auto_functionalized``
   so Inductor writes the load counter in place.

A ``ZeroExpertRouter``'s chain is not folded in step 2: between routing and
remap it sends zero-expert slots to id 0 with weight 0 and sums their
pre-mask weights into a side output. ``route_eplb`` has no zero-expert
semantics (no count of real experts, no pre-mask weights out), and giving it
some would change its schema and the Triton kernel, so there the routing
fuses alone and the remap stays one ``eplb_remap``.
"""

from __future__ import annotations

import functools
import itertools
import operator
from dataclasses import dataclass

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch._inductor.pattern_matcher import PatternMatcherPass, stable_topological_sort

import moe_compile.custom_ops  # noqa: F401  (registers the ops the patterns emit)
from moe_compile.eplb.mapping import REPLICA_POLICIES, map_to_physical

from .tracing import register_pattern, set_fake_values

_EXAMPLE_TOKENS, _EXAMPLE_TOP_K, _EXAMPLE_EXPERTS, _EXAMPLE_SLOTS = 13, 6, 32, 3


def _search_and_replace(policy: str, with_padding: bool):
    """The eager chain and its replacement; the pattern's inputs are named after
    the parameters, so the form without padding has its own signature."""

    def remap(ids, l2p, counts, load, record, unpadded):
        physical, counted, increments = map_to_physical(
            ids, l2p, counts, load.shape[0], record, unpadded, policy
        )
        return physical, load.index_put((counted,), increments.to(load.dtype), accumulate=True)

    def fused(ids, l2p, counts, load, record, unpadded):
        return torch.ops.moe_compile.eplb_remap.default(
            ids, l2p, counts, load, record, unpadded, policy
        )

    if with_padding:
        return remap, fused

    def remap_unpadded(ids, l2p, counts, load, record):
        return remap(ids, l2p, counts, load, record, None)

    def fused_unpadded(ids, l2p, counts, load, record):
        return fused(ids, l2p, counts, load, record, None)

    return remap_unpadded, fused_unpadded


def eplb_patterns(graph: torch.fx.Graph) -> PatternMatcherPass:
    """The mapping chains ``graph`` can contain: both policies, for int64 and int32 ids
    and maps (int32 adds casts to the traced graph), with padding only where the graph
    compares against a tensor (the padded chain's ``slot < unpadded * k``)."""
    padded = bool(graph.find_nodes(op="call_function", target=torch.ops.aten.lt.Tensor))
    return _lazy_eplb_patterns().register((False, True) if padded else (False,))


class _LazyEplbPatterns:
    """One pattern pass, filled per padding form as graphs need them."""

    def __init__(self):
        self.patterns = PatternMatcherPass(pass_name="moe_compile_eplb")
        self.registered: set[bool] = set()

    def register(self, paddings: tuple[bool, ...]) -> PatternMatcherPass:
        for with_padding in paddings:
            if with_padding not in self.registered:
                self._register(with_padding)
                self.registered.add(with_padding)
        return self.patterns

    def _register(self, with_padding: bool) -> None:
        for policy, ids_dtype, map_dtype in itertools.product(
            REPLICA_POLICIES, (torch.int64, torch.int32), (torch.int64, torch.int32)
        ):
            search, replace = _search_and_replace(policy, with_padding)
            example_inputs = [
                torch.zeros(_EXAMPLE_TOKENS, _EXAMPLE_TOP_K, dtype=ids_dtype),
                torch.zeros(_EXAMPLE_EXPERTS, _EXAMPLE_SLOTS, dtype=map_dtype),
                torch.ones(_EXAMPLE_EXPERTS, dtype=map_dtype),
                torch.zeros(_EXAMPLE_EXPERTS + 8, dtype=torch.int32),
                torch.tensor(True),
            ] + ([torch.tensor(_EXAMPLE_TOKENS)] if with_padding else [])
            register_pattern(
                search,
                replace,
                example_inputs,
                self.patterns,
                pattern_name=f"eplb_{policy}_{'padded' if with_padding else 'unpadded'}",
                skip_duplicates=True,
            )


@functools.cache
def _lazy_eplb_patterns() -> _LazyEplbPatterns:
    return _LazyEplbPatterns()


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


def _is_integer_cast(node: torch.fx.Node) -> bool:
    if node.target is not torch.ops.prims.convert_element_type.default:
        return False
    dtype = node.args[1]
    return not dtype.is_floating_point and dtype != torch.bool


def _is_column_slice(node, start, end=None) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.target is torch.ops.aten.slice.Tensor
        and tuple(node.args[1:3]) == (1, start)
        and (end is None or node.args[3] == end)
    )


@dataclass
class _RouteToRemap:
    """The nodes between a ``route`` op and the ``eplb_remap`` that consumes its ids."""

    route: torch.fx.Node
    ids: torch.fx.Node
    between: list[torch.fx.Node]  # integer casts and the routed-columns slice, remap side first
    shared_cat: torch.fx.Node | None = None  # cat(routed physical ids, shared ids)


def _find_route(remap: torch.fx.Node) -> _RouteToRemap | None:
    """Walk from the remap's ids back to a ``route`` op, through lossless integer
    casts and, with shared experts, the slice of the routed columns."""
    node, between = remap.args[0], []
    while isinstance(node, torch.fx.Node) and (_is_integer_cast(node) or _is_column_slice(node, 0)):
        if _single_user(node) is not (between[-1] if between else remap):
            return None
        between.append(node)
        node = node.args[0]
    if not (
        isinstance(node, torch.fx.Node) and node.target is operator.getitem and node.args[1] == 1
    ):
        return None
    route = node.args[0]
    if route.target is not torch.ops.moe_compile.route.default:
        return None
    found = _RouteToRemap(route, node, between)
    routed_slices = [n for n in between if _is_column_slice(n, 0)]
    num_shared = _route_arg(route, "num_fused_shared_experts")
    if num_shared == 0:
        return (
            found
            if not routed_slices and _single_user(node) is _between_head(found, remap)
            else None
        )
    # Shared experts: ids -> [routed slice -> ... -> remap] and [shared slice -> cat].
    top_k = _route_arg(route, "top_k")
    if len(routed_slices) != 1 or not _is_column_slice(routed_slices[0], 0, top_k):
        return None
    others = [u for u in node.users if u is not _between_head(found, remap)]
    if len(others) != 1 or not _is_column_slice(others[0], top_k):
        return None
    cat = _single_user(others[0])
    remap_ids = [u for u in remap.users if u.target is operator.getitem and u.args[1] == 0]
    if (
        cat is None
        or cat.target is not torch.ops.aten.cat.default
        or len(remap_ids) != 1
        or list(cat.args[0]) != [remap_ids[0], others[0]]
        or _single_user(remap_ids[0]) is not cat
    ):
        return None
    found.shared_cat = cat
    return found


def _between_head(found: _RouteToRemap, remap: torch.fx.Node) -> torch.fx.Node:
    """The node that reads the route's ids on the way to the remap."""
    return found.between[-1] if found.between else remap


def _route_arg(route: torch.fx.Node, name: str):
    return _route_kwargs(route)[name]


def _route_kwargs(route: torch.fx.Node) -> dict:
    """A ``route`` node's arguments by name."""
    params = [a.name for a in route.target._schema.arguments]
    return dict(zip(params, route.args, strict=False)) | dict(route.kwargs)


_REMAP_ARGUMENTS = (
    "logical_to_physical_map",
    "logical_replica_count",
    "expert_load_view",
    "should_record",
    "num_unpadded_tokens",
    "replica_policy",
)


def _remap_kwargs(remap: torch.fx.Node) -> dict:
    """An ``eplb_remap`` node's EPLB arguments (all but the ids), by the fused ops' names."""
    return dict(zip(_REMAP_ARGUMENTS, remap.args[1:], strict=True))


def fold_remap_into_routing(graph: torch.fx.Graph) -> int:
    """``route -> eplb_remap`` becomes one ``route_eplb``; returns how many were folded."""
    route_eplb_op = torch.ops.moe_compile.route_eplb.default
    folded = 0
    for remap in list(
        graph.find_nodes(op="call_function", target=torch.ops.moe_compile.eplb_remap.default)
    ):
        found = _find_route(remap)
        if found is None:
            continue
        route = found.route
        route_outputs, remap_outputs = _getitem_users(route), _getitem_users(remap)
        if route_outputs is None or remap_outputs is None:
            continue
        kwargs = _route_kwargs(route) | _remap_kwargs(remap)
        with graph.inserting_before(found.shared_cat or remap):
            fused = graph.call_function(auto_functionalized, (route_eplb_op,), kwargs)
            weights, ids, load = (
                graph.call_function(operator.getitem, (fused, i)) for i in range(3)
            )
        set_fake_values(fused, [weights, ids, load])
        if 0 in route_outputs:
            route_outputs[0].replace_all_uses_with(weights)
        physical_ids = found.shared_cat or remap_outputs.get(0)
        if physical_ids is not None:
            physical_ids.replace_all_uses_with(ids)
        if 1 in remap_outputs:
            remap_outputs[1].replace_all_uses_with(load)
        dead = [found.shared_cat, *remap_outputs.values(), remap, *found.between]
        dead += [*(u for u in found.ids.users), *route_outputs.values(), route]
        for node in dict.fromkeys(n for n in dead if n is not None):
            if not node.users:
                graph.erase_node(node)
        folded += 1
    if folded:
        # The fused op sits where the remap was; a use of the weights between
        # the route and the remap (the multiply by a scale that is a graph
        # input) now comes before it, so restore a valid order.
        stable_topological_sort(graph)
    return folded
