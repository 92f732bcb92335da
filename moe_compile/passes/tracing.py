"""Tracing eager functions into patterns spelled like Inductor's post-grad graphs."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch._inductor.fx_passes.joint_graph import constant_fold_uniform_value
from torch._inductor.fx_passes.post_grad import remove_noop_ops, view_to_reshape
from torch._inductor.pattern_matcher import fwd_only, register_replacement
from torch._subclasses.fake_tensor import FakeTensor

from . import pattern_store


def trace_post_grad(fn, args, **kwargs) -> torch.fx.GraphModule:
    """Trace ``fn`` into the form of a post-grad graph: functional (in-place ops
    such as ``weights /= ...`` become their out-of-place forms) and with views
    spelled as reshapes."""
    gm = fwd_only(torch.func.functionalize(fn, remove="mutations"), args, **kwargs)
    canonicalize_like_inductor(gm)
    return gm


def canonicalize_like_inductor(gm: torch.fx.GraphModule) -> None:
    """The rewrites Inductor applies before its post-grad custom passes that
    change how routing code is spelled (scalar constants become ``full``,
    views become reshapes, no-ops vanish)."""
    constant_fold_uniform_value(gm)
    view_to_reshape(gm)
    gm.graph.eliminate_dead_code()
    remove_noop_ops(gm.graph)
    gm.recompile()


def _fake_value(arg):
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


def set_fake_values(node: torch.fx.Node, getitems: list[torch.fx.Node] = ()) -> None:
    """Fill ``meta["val"]`` of a node a pass inserted (and of its getitems) by
    running its target on the fake values of its inputs, as later passes expect."""
    args = torch.fx.map_arg(node.args, _fake_value)
    kwargs = torch.fx.map_arg(node.kwargs, _fake_value)
    fake_mode = detect_fake_mode(pytree.tree_leaves((args, kwargs)))
    if fake_mode is None:
        return
    with fake_mode:
        value = node.target(*args, **kwargs)
    node.meta["val"] = value
    for item in getitems:
        item.meta["val"] = value[item.args[1]]


_REPLACEMENT_PARAMETERS = frozenset(inspect.signature(register_replacement).parameters)


def register_pattern(search_fn, replace_fn, example_inputs, pass_dict, **options) -> None:
    """``register_replacement`` with our tracing, minus the keyword arguments the
    running torch does not know yet (``pattern_name`` and ``skip_duplicates``
    are newer than torch 2.11). A named pattern's initial trace comes from the
    stored graphs where they fit the running torch and source (``pattern_store``)."""
    key = pattern_store.pattern_key(
        options.get("pattern_name"), example_inputs, options.get("scalar_workaround")
    )
    trace_fn = _RecheckCache(pattern_store.trace_fn_for(key, trace_post_grad), example_inputs)
    supported = {k: v for k, v in options.items() if k in _REPLACEMENT_PARAMETERS}
    register_replacement(search_fn, replace_fn, example_inputs, trace_fn, pass_dict, **supported)


def _spec(value) -> object:
    if isinstance(value, torch.Tensor):
        return (
            tuple(str(s) for s in value.shape),
            tuple(str(s) for s in value.stride()),
            value.dtype,
            value.device,
        )
    if isinstance(value, torch.SymInt):
        return ("SymInt", str(value))
    return (type(value), repr(value))


def _float_casts(values) -> list[bool]:
    """For each floating-point tensor: whether a pattern reads it through a cast to float32."""
    return [
        t.dtype != torch.float32
        for t in pytree.tree_leaves(values)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]


class _RecheckCache:
    """A pattern's traces with fake tensors: once per fake mode, function and argument
    metadata, and none where the dtypes rule the match out.

    The matcher re-traces the search function for every candidate match with
    fake tensors of the match's shapes. The repeated identical layers of a
    whole-model graph give identical traces, so later ones copy the first
    (a copy: the matcher renames the placeholders of what it gets). A variant
    traced from float32 logits or bias has no cast where one traced from 16-bit
    ones has one, so where a floating input needs a cast and the example's did
    not (or the other way round) the re-trace cannot match: a ``RuntimeError``
    tells the matcher so without tracing. (Integer inputs are not judged: an
    int64 load counter matches the pattern traced with an int32 one.)"""

    def __init__(self, trace: Callable, example_inputs):
        self._trace = trace
        self._example_casts = _float_casts(example_inputs)
        self._by_mode: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, fn, args, **kwargs):
        leaves = pytree.tree_leaves(args)
        fakes = [a for a in leaves if isinstance(a, FakeTensor)]
        if not fakes:
            return self._trace(fn, args, **kwargs)
        casts = _float_casts(leaves)
        if len(casts) == len(self._example_casts) and casts != self._example_casts:
            raise RuntimeError("the inputs' dtypes rule this pattern variant out")
        cache = self._by_mode.setdefault(fakes[0].fake_mode, {})
        # The search function and the replacement both come through here.
        code = getattr(fn, "__code__", fn)
        key = (code, tuple(_spec(a) for a in leaves), tuple(sorted(kwargs)))
        if key not in cache:
            cache[key] = self._trace(fn, args, **kwargs)
        return _copy(cache[key])


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return pattern_store.graph_module_cls()(gm, graph)
