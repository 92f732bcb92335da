"""Routing patterns: every router's traced math, replaced by one ``moe_compile::route`` op.

Each pattern is the eager routing function itself, traced the way Inductor's
post-grad graph spells it. Python-level options (scoring function,
renormalize, ...) are baked into one pattern per combination; integer and
float options are matched as arguments (``scalar_workaround``) and the match
is re-checked by re-tracing with the real shapes and values.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only

import moe_compile.custom_ops  # noqa: F401  (registers the ops the patterns emit)
from moe_compile.router.custom import shared_routed_topk
from moe_compile.router.grouped import grouped_topk
from moe_compile.router.scoring import SCORING_FUNCS
from moe_compile.router.topk import fused_topk, fused_topk_bias

from .tracing import register_pattern

# Example scalars for tracing. The matcher re-traces each candidate with the
# real values and then reads every literal equal to one of these examples as
# that argument, so an example must never equal a literal the routing code
# contains (-1, 0, 1, 2 of the top-2 group score, ...) nor a value a real model
# gives to a different argument: hence odd values no model uses.
_EXAMPLE = dict(num_tokens=17, num_experts=33, top_k=13, num_expert_group=11, topk_group=7)
_EXAMPLE_SCALE = 2.718
_EXAMPLE_SHARED = 9


@dataclass(frozen=True)
class RoutingVariant:
    """One traced form of a router: the options that change the graph's structure."""

    family: str
    scoring_func: str = "softmax"
    renormalize: bool = True
    logits_dtype: torch.dtype = torch.float32
    bias_dtype: torch.dtype | None = None
    topk_dim: int = -1  # model code writes torch.topk(..., dim=1) or dim=-1
    scale_input: bool = False  # routed_scaling_factor made a graph input by Dynamo
    unit_scale: bool = False  # routed_scaling_factor 1.0, its multiply removed as a no-op

    @property
    def name(self) -> str:
        parts = [self.family, self.scoring_func, "renorm" if self.renormalize else "raw"]
        parts.append(str(self.logits_dtype).removeprefix("torch."))
        if self.bias_dtype is not None:
            parts.append("bias_" + str(self.bias_dtype).removeprefix("torch."))
        if self.scale_input:
            parts.append("scale_input")
        if self.unit_scale:
            parts.append("unit_scale")
        return "_".join(parts) + f"_dim{self.topk_dim}"


def _route(router_logits, bias, top_k, variant, scale=1.0, groups=0, topk_group=0, shared=0):
    return torch.ops.moe_compile.route.default(
        router_logits,
        bias,
        top_k,
        variant.scoring_func,
        variant.renormalize,
        scale,
        groups,
        topk_group,
        shared,
        torch.int64,
    )


def _scalars_are_constants(scalars: frozenset[str], match) -> bool:
    """The op takes Python scalars, and the Triton kernel and the inductor
    lowering need the integer ones as constants. An int router option that
    Dynamo made a graph input (a ``SymInt``: after a recompile, for a changed
    ``top_k`` of a router that is not reached through an ``nn.Module``) leaves
    the graph as it is; ``dynamic=False`` keeps such options constant."""
    return not any(isinstance(v, torch.fx.Node) for k, v in match.kwargs.items() if k in scalars)


def _scale_as_graph_input(search, replace, example_inputs, scalars):
    """The same routing where Dynamo turned ``routed_scaling_factor`` into a
    graph input (it does so for a float attribute that changed between
    compiles): a 0-d float64 tensor the graph casts to float32 and multiplies
    by. The op routes with scale 1.0 (an exact no-op) and the graph's own
    multiply stays after it, so the result is the unfused graph's."""
    names = list(inspect.signature(search).parameters)
    at = names.index("routed_scaling_factor")

    @functools.wraps(search)
    def search_with_scale_input(*args):
        args = list(args)
        args[at] = args[at].to(torch.float32)
        return search(*args)

    @functools.wraps(replace)
    def replace_with_scale_input(*args):
        args = list(args)
        scale, args[at] = args[at], 1.0
        weights, ids = replace(*args)
        return weights * scale.to(torch.float32), ids

    scalars = {k: v for k, v in scalars.items() if k != "routed_scaling_factor"}
    inputs = list(example_inputs)
    inputs.insert(
        sum(name not in scalars for name in names[:at]),
        torch.tensor(_EXAMPLE_SCALE, dtype=torch.float64),
    )
    return search_with_scale_input, replace_with_scale_input, inputs, scalars


def _with_unit_scale(search, replace, example_inputs, scalars):
    """The same routing with ``routed_scaling_factor`` 1.0 baked in: where Inductor
    removes a multiply by 1.0 as a no-op (torch 2.14), the scale is not in the graph."""
    names = list(inspect.signature(search).parameters)
    kept = [name for name in names if name != "routed_scaling_factor"]
    call = ", ".join("1.0" if name == "routed_scaling_factor" else name for name in names)

    def with_scale_one(fn):
        # A function of the other arguments by name: tracing reads its signature.
        namespace = {}
        exec(f"def {fn.__name__}({', '.join(kept)}):\n    return fn({call})", {"fn": fn}, namespace)
        return namespace[fn.__name__]

    scalars = {k: v for k, v in scalars.items() if k != "routed_scaling_factor"}
    return with_scale_one(search), with_scale_one(replace), example_inputs, scalars


@functools.cache
def multiply_by_one_is_removed() -> bool:
    """Whether Inductor's no-op removal before our pass drops ``x * 1.0`` (from torch 2.14
    on, for a Python-scalar factor)."""
    from torch._inductor.fx_passes.joint_graph import remove_no_ops

    gm = fwd_only(lambda x: x * 1.0, [torch.ones(2)])
    remove_no_ops(gm, set(), set())
    return not any(node.target == torch.ops.aten.mul.Tensor for node in gm.graph.nodes)


def _search_and_replace(variant: RoutingVariant) -> tuple[Callable, Callable, list, dict]:
    """The search function, its replacement, example inputs and scalar arguments."""
    if variant.unit_scale:
        scaled = dataclasses.replace(variant, unit_scale=False)
        return _with_unit_scale(*_search_and_replace(scaled))
    if variant.scale_input:
        static = dataclasses.replace(variant, scale_input=False)
        return _scale_as_graph_input(*_search_and_replace(static))
    n, e = _EXAMPLE["num_tokens"], _EXAMPLE["num_experts"]
    logits = torch.empty(n, e, dtype=variant.logits_dtype)
    bias = torch.empty(e, dtype=variant.bias_dtype) if variant.bias_dtype else None
    scoring, renorm, dim = variant.scoring_func, variant.renormalize, variant.topk_dim
    top_k = {"top_k": _EXAMPLE["top_k"]}

    if variant.family == "topk":

        def search(router_logits, top_k):
            return fused_topk(router_logits, top_k, renorm, scoring)

        def replace(router_logits, top_k):
            return _route(router_logits, None, top_k, variant)

        return search, replace, [logits], top_k

    if variant.family == "topk_bias":

        def search(router_logits, e_score_correction_bias, top_k, routed_scaling_factor):
            return fused_topk_bias(
                router_logits,
                e_score_correction_bias,
                top_k,
                renorm,
                scoring,
                routed_scaling_factor,
            )

        def replace(router_logits, e_score_correction_bias, top_k, routed_scaling_factor):
            return _route(
                router_logits, e_score_correction_bias, top_k, variant, routed_scaling_factor
            )

        return search, replace, [logits, bias], {**top_k, "routed_scaling_factor": _EXAMPLE_SCALE}

    if variant.family == "grouped":
        groups = {k: _EXAMPLE[k] for k in ("num_expert_group", "topk_group")}
        scalars = {**top_k, **groups, "routed_scaling_factor": _EXAMPLE_SCALE}
        if bias is None:

            def search(router_logits, top_k, num_expert_group, topk_group, routed_scaling_factor):
                return grouped_topk(
                    router_logits, top_k, num_expert_group, topk_group, renorm, scoring, None,
                    routed_scaling_factor,
                )  # fmt: skip

            def replace(router_logits, top_k, num_expert_group, topk_group, routed_scaling_factor):
                return _route(
                    router_logits, None, top_k, variant, routed_scaling_factor,
                    num_expert_group, topk_group,
                )  # fmt: skip

            return search, replace, [logits], scalars

        def search(
            router_logits, e_score_correction_bias, top_k, num_expert_group, topk_group,
            routed_scaling_factor,
        ):  # fmt: skip
            return grouped_topk(
                router_logits, top_k, num_expert_group, topk_group, renorm, scoring,
                e_score_correction_bias, routed_scaling_factor,
            )  # fmt: skip

        def replace(
            router_logits, e_score_correction_bias, top_k, num_expert_group, topk_group,
            routed_scaling_factor,
        ):  # fmt: skip
            return _route(
                router_logits, e_score_correction_bias, top_k, variant, routed_scaling_factor,
                num_expert_group, topk_group,
            )  # fmt: skip

        return search, replace, [logits, bias], scalars

    if variant.family == "grouped_all_groups":
        # topk_group == num_expert_group: the slice that keeps the best groups
        # spans the whole row, so Inductor removes it as a no-op and the graph
        # no longer names topk_group; this form is traced without that slice
        # and gives the op the group count for both.
        scalars = {
            **top_k,
            "num_expert_group": _EXAMPLE["num_expert_group"],
            "routed_scaling_factor": _EXAMPLE_SCALE,
        }
        if bias is None:

            def search(router_logits, top_k, num_expert_group, routed_scaling_factor):
                return grouped_topk(
                    router_logits, top_k, num_expert_group, num_expert_group, renorm, scoring,
                    None, routed_scaling_factor,
                )  # fmt: skip

            def replace(router_logits, top_k, num_expert_group, routed_scaling_factor):
                return _route(
                    router_logits, None, top_k, variant, routed_scaling_factor,
                    num_expert_group, num_expert_group,
                )  # fmt: skip

            return search, replace, [logits], scalars

        def search(
            router_logits, e_score_correction_bias, top_k, num_expert_group, routed_scaling_factor
        ):
            return grouped_topk(
                router_logits, top_k, num_expert_group, num_expert_group, renorm, scoring,
                e_score_correction_bias, routed_scaling_factor,
            )  # fmt: skip

        def replace(
            router_logits, e_score_correction_bias, top_k, num_expert_group, routed_scaling_factor
        ):
            return _route(
                router_logits, e_score_correction_bias, top_k, variant, routed_scaling_factor,
                num_expert_group, num_expert_group,
            )  # fmt: skip

        return search, replace, [logits, bias], scalars

    if variant.family == "shared_routed":
        scalars = {**top_k, "num_fused_shared_experts": _EXAMPLE_SHARED}

        def search(router_logits, top_k, num_fused_shared_experts):
            return shared_routed_topk(router_logits, top_k, num_fused_shared_experts, renorm)

        def replace(router_logits, top_k, num_fused_shared_experts):
            return _route(router_logits, None, top_k, variant, shared=num_fused_shared_experts)

        return search, replace, [logits], scalars

    # Routing as open-source model code writes it, matched without changing that code.
    if variant.family == "softmax_then_topk":  # Mixtral / Qwen-MoE (HF), in-place renorm

        def search(router_logits, top_k):
            weights = F.softmax(router_logits, dim=1, dtype=torch.float)
            weights, ids = torch.topk(weights, top_k, dim=dim)
            if renorm:
                weights /= weights.sum(dim=-1, keepdim=True)
            return weights, ids

    elif variant.family == "topk_then_softmax":  # original Mixtral: softmax over the k logits

        def search(router_logits, top_k):
            values, ids = torch.topk(router_logits, top_k, dim=dim)
            return F.softmax(values, dim=1, dtype=torch.float), ids

    elif variant.family == "topk_then_sigmoid":  # Llama-4: top-k on raw logits, then sigmoid

        def search(router_logits, top_k):
            values, ids = torch.topk(router_logits, top_k, dim=dim)
            return torch.sigmoid(values.float()), ids

    else:
        raise ValueError(f"unknown routing pattern family {variant.family!r}")

    def replace(router_logits, top_k):
        return _route(router_logits, None, top_k, variant)

    return search, replace, [logits], top_k


def routing_variants() -> Iterator[RoutingVariant]:
    """Every traced form the routing pass knows."""
    # Cast variants first: on 16-bit logits the one that includes the cast must
    # win, or the op would read a float32 copy (twice the bytes, slower top-k).
    logits_dtypes = (torch.bfloat16, torch.float32)
    bias_dtypes = (torch.bfloat16, torch.float32)
    scale_forms = [dict(), dict(scale_input=True)]
    if multiply_by_one_is_removed():
        scale_forms.insert(1, dict(unit_scale=True))
    for scoring, renorm, logits in itertools.product(SCORING_FUNCS, (True, False), logits_dtypes):
        yield RoutingVariant("topk", scoring, renorm, logits)
        for scale in scale_forms:
            for grouped in ("grouped", "grouped_all_groups"):
                yield RoutingVariant(grouped, scoring, renorm, logits, **scale)
            for bias in bias_dtypes:
                for family in ("topk_bias", "grouped", "grouped_all_groups"):
                    yield RoutingVariant(family, scoring, renorm, logits, bias, **scale)
    for renorm, logits in itertools.product((True, False), logits_dtypes):
        yield RoutingVariant("shared_routed", "softmax", renorm, logits)
    for logits, dim in itertools.product(logits_dtypes, (-1, 1)):
        for renorm in (True, False):
            yield RoutingVariant("softmax_then_topk", "softmax", renorm, logits, topk_dim=dim)
        yield RoutingVariant("topk_then_softmax", "softmax", True, logits, topk_dim=dim)
        yield RoutingVariant("topk_then_sigmoid", "sigmoid", False, logits, topk_dim=dim)


# What a graph must contain for a family or a scoring function to be there at
# all: tracing only those patterns keeps the pass cheap on a cold compile.
_FAMILY_NEEDS = {
    "topk": torch.ops.aten.sort.stable,
    "topk_bias": torch.ops.aten.sort.stable,
    # The group mask's any(): plain top-k graphs then trace no grouped pattern.
    "grouped": torch.ops.aten.any.dim,
    "grouped_all_groups": torch.ops.aten.any.dim,
    "shared_routed": torch.ops.aten.sort.stable,
    "softmax_then_topk": torch.ops.aten.topk.default,
    "topk_then_softmax": torch.ops.aten.topk.default,
    "topk_then_sigmoid": torch.ops.aten.topk.default,
}
_SCORING_NEEDS = {
    # Not exp: the experts' SiLU has one too, so every graph would register softmax.
    "softmax": torch.ops.aten.amax.default,
    "sigmoid": torch.ops.aten.sigmoid.default,
    "sqrtsoftplus": torch.ops.aten.sqrt.default,
}


@functools.cache
def _variants_by_group() -> dict[tuple[str, str, bool], list[RoutingVariant]]:
    """Every variant under its group (family, scoring function, scale as an input),
    groups and members in ``routing_variants`` order."""
    groups: dict[tuple[str, str, bool], list[RoutingVariant]] = {}
    for variant in routing_variants():
        key = (variant.family, variant.scoring_func, variant.scale_input)
        groups.setdefault(key, []).append(variant)
    return groups


def _has_float_scalar_input(graph: torch.fx.Graph) -> bool:
    """Whether the graph takes a 0-d float64 tensor: how Dynamo passes a float
    option that changed between compiles. Only then can a scale be an input."""
    for node in graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.float64:
            return True
    return False


class _LazyRoutingPatterns:
    """One pattern pass, filled group by group (a family with one scoring
    function, all its dtype variants in priority order) as graphs need them."""

    def __init__(self):
        self.patterns = PatternMatcherPass(pass_name="moe_compile_routing")
        self.registered: set[tuple[str, str, bool]] = set()

    def for_graph(self, graph: torch.fx.Graph) -> PatternMatcherPass:
        targets = {node.target for node in graph.nodes if node.op == "call_function"}
        scale_input = _has_float_scalar_input(graph)
        for group, members in _variants_by_group().items():
            family, scoring_func, needs_scale_input = group
            if group in self.registered or not (
                _FAMILY_NEEDS[family] in targets
                and _SCORING_NEEDS[scoring_func] in targets
                and (scale_input or not needs_scale_input)
            ):
                continue
            for member in members:
                self._register(member)
            self.registered.add(group)
        return self.patterns

    def _register(self, variant: RoutingVariant) -> None:
        search, replace, example_inputs, scalars = _search_and_replace(variant)
        register_pattern(
            search,
            replace,
            example_inputs,
            self.patterns,
            extra_check=functools.partial(_scalars_are_constants, frozenset(scalars)),
            scalar_workaround=scalars,
            pattern_name=variant.name,
            skip_duplicates=True,
        )


@functools.cache
def _lazy_patterns() -> _LazyRoutingPatterns:
    return _LazyRoutingPatterns()


def routing_patterns(graph: torch.fx.Graph) -> PatternMatcherPass:
    """The routing patterns ``graph`` can contain, each traced once per process."""
    return _lazy_patterns().for_graph(graph)
