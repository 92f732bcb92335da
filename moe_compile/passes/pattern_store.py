"""Pre-traced search graphs, so that registering a pattern does not trace it.

``register_replacement`` traces each search function once with example
inputs to build the pattern (the "initial trace") and again, with a
match's real shapes, for every candidate match. The initial traces of our
patterns cost seconds on the first compile of a process, several times
the pass itself. Their graphs depend only on torch and on our source, so
the generated ``_traced_patterns_<torch major>_<minor>.py`` keeps them (as code that rebuilds
each graph), and ``register_pattern`` hands a stored graph to
``register_replacement`` in place of its initial trace. Every later trace
(the re-check of a match with its real shapes, the replacement) still
traces for real, so what matches and what it becomes is unchanged.

The stored graphs are used only where they were generated on the running
torch version from the very source the patterns are traced from
(``SOURCES_SHA256``); otherwise every pattern is traced as before. Each torch
release has its own module. Regenerate after changing a pattern or the code it
traces, under each torch release that has a module (CI checks the one it runs):

    python -m moe_compile.passes.pattern_store --write

``--check`` exits non-zero when the committed module differs from fresh
traces (``tests/passes/test_pattern_store.py`` runs the same comparison).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import logging
import math
import operator
import sys
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent.parent
# The code a search function can run while it is traced, plus this file (the
# key and the serialization). Kept narrow on purpose: every file here makes the
# stored graphs stale whenever it changes.
_TRACED_SOURCES = (
    "passes/routing.py",
    "passes/eplb.py",
    "passes/tracing.py",
    "passes/pattern_store.py",
    "router/*.py",
    "eplb/*.py",
)


def sources_sha256() -> str:
    """Hash of every file whose text can change a search function's trace."""
    hasher = hashlib.sha256()
    for pattern in _TRACED_SOURCES:
        for path in sorted(_PACKAGE.glob(pattern)):
            hasher.update(path.relative_to(_PACKAGE).as_posix().encode())
            hasher.update(b"\0")
            hasher.update(path.read_bytes())
    return hasher.hexdigest()


def torch_version() -> str:
    """The public torch version: CPU and CUDA wheels of one release trace alike
    (the example inputs are CPU tensors), so the local ``+cu...`` tag is dropped."""
    return torch.__version__.split("+")[0]


def generated_module_name() -> str:
    """The stored traces' module for the running torch release (major.minor)."""
    major, minor = torch_version().split(".")[:2]
    return f"moe_compile.passes._traced_patterns_{major}_{minor}"


def generated_path() -> Path:
    return _PACKAGE / "passes" / (generated_module_name().rpartition(".")[2] + ".py")


def _input_spec(value) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        device = "" if value.device.type == "cpu" else f"@{value.device}"
        return f"{dtype}{list(value.shape)}{device}"
    return repr(value)


def pattern_key(pattern_name: str | None, example_inputs, scalar_workaround) -> str | None:
    """What identifies one initial trace: the pattern's name (which spells the
    Python options baked into the search function) and the example inputs and
    scalars it is traced with. None for an unnamed pattern, which is always traced."""
    if not pattern_name:
        return None
    inputs = ", ".join(_input_spec(value) for value in example_inputs)
    scalars = ", ".join(f"{k}={v!r}" for k, v in sorted((scalar_workaround or {}).items()))
    return f"{pattern_name}({inputs}; {scalars})"


# ------------------------------------------------------------------ loading


def _rebuild(source: str) -> torch.fx.GraphModule:
    """Runs one stored graph's code, in which ``p`` makes a placeholder, ``c`` a
    call and ``o`` the output."""
    graph = torch.fx.Graph()

    def placeholder(name):
        return graph.create_node("placeholder", name, name=name)

    def call(name, target, args=(), kwargs=None):
        return graph.create_node("call_function", target, args, kwargs or {}, name=name)

    def output(result):
        return graph.create_node("output", "output", (result,), name="output")

    exec(source, {**_CODE_GLOBALS, "p": placeholder, "c": call, "o": output})
    return graph_module_cls()(torch.nn.Module(), graph)


@functools.cache
def graph_module_cls() -> type[torch.fx.GraphModule]:
    """A pattern graph is read, never run: the lazy module skips generating its
    Python code, a third of what registering a stored pattern costs."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # private; fall back to the module that generates code
        return torch.fx.GraphModule
    return _LazyGraphModule


# The other names stored graph code uses.
_CODE_GLOBALS = {
    "math": math,
    "operator": operator,
    "torch": torch,
    "aten": torch.ops.aten,
    "prims": torch.ops.prims,
    "cpu": torch.device("cpu"),
}


@functools.cache
def _stored_graphs() -> dict[str, str]:
    """The generated module's graphs as code, or nothing where they do not fit."""
    try:
        module = importlib.import_module(generated_module_name())
    except Exception as error:  # a broken or missing generated module means tracing
        log.info("no stored pattern graphs (%s); patterns are traced", error)
        return {}
    stored_version = getattr(module, "TORCH_VERSION", None)
    if stored_version != torch_version():
        log.info(
            "stored pattern graphs are for torch %s, not %s; patterns are traced",
            stored_version,
            torch_version(),
        )
        return {}
    if getattr(module, "SOURCES_SHA256", None) != sources_sha256():
        log.info("stored pattern graphs predate the pattern source; patterns are traced")
        return {}
    return module.GRAPHS


def _has_fake_tensor(args) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(a, FakeTensor) for a in torch.utils._pytree.tree_leaves(args))


class _StoredFirstTrace:
    """A ``trace_fn`` for ``register_replacement`` whose first call, the initial
    trace from the example inputs, returns the stored graph; every later call
    (a match's re-check with fake tensors of its real shapes, the replacement)
    traces for real."""

    def __init__(self, key: str, source: str, trace: Callable):
        self._key, self._source, self._trace = key, source, trace

    def __call__(self, fn, args, **kwargs):
        source, self._source = self._source, None
        if source is not None and not _has_fake_tensor(args):
            try:
                return _rebuild(source)
            except Exception as error:  # e.g. an op the running torch lacks
                log.warning("stored graph of %s failed (%s); tracing it", self._key, error)
        return self._trace(fn, args, **kwargs)


# What register_pattern records instead of using stored graphs, while generating.
_recording: dict[str, torch.fx.GraphModule] | None = None


def trace_fn_for(key: str | None, trace: Callable) -> Callable:
    """The ``trace_fn`` to register a pattern with: ``trace`` itself, or one that
    starts from the stored graph of ``key``."""
    if key is None:
        return trace
    if _recording is not None:
        return _Recorder(key, trace)
    source = _stored_graphs().get(key)
    return trace if source is None else _StoredFirstTrace(key, source, trace)


class _Recorder:
    def __init__(self, key: str, trace: Callable):
        self._key, self._trace, self._first = key, trace, True

    def __call__(self, fn, args, **kwargs):
        gm = self._trace(fn, args, **kwargs)
        if self._first:
            self._first = False
            _record(self._key, gm)
        return gm


def _record(key: str, gm: torch.fx.GraphModule) -> None:
    seen = _recording.get(key)
    if seen is not None and str(seen.graph) != str(gm.graph):
        raise RuntimeError(
            f"two different search graphs are registered as {key!r}: give the patterns "
            "distinct pattern_name values"
        )
    _recording[key] = gm


# ---------------------------------------------------------------- generating


class _Unserializable(Exception):
    pass


def _target_source(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        spelled = str(target)  # namespace.op.overload
        return spelled if spelled.startswith(("aten.", "prims.")) else f"torch.ops.{spelled}"
    if getattr(operator, getattr(target, "__name__", ""), None) is target:
        return f"operator.{target.__name__}"
    raise _Unserializable(f"call target {target!r}")


def _value_source(value, names: dict[torch.fx.Node, str]) -> str:
    if isinstance(value, torch.fx.Node):
        return names[value]
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "math.nan"
        if math.isinf(value):
            return "math.inf" if value > 0 else "-math.inf"
        return repr(value)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return str(value)  # torch.float32, torch.strided, torch.contiguous_format
    if isinstance(value, torch.device):
        return "cpu" if str(value) == "cpu" else f"torch.device({str(value)!r})"
    if isinstance(value, list):  # FX's immutable_list too: create_node makes it again
        return "[" + ", ".join(_value_source(v, names) for v in value) + "]"
    if isinstance(value, tuple):
        items = [_value_source(v, names) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, dict):
        items = (f"{k!r}: {_value_source(v, names)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise _Unserializable(f"argument {value!r} of type {type(value).__name__}")


def _graph_source(graph: torch.fx.Graph) -> str:
    """The graph as code for ``_rebuild``, a node a line."""
    # Locals get a prefix so that no node name can shadow a name the code uses.
    names = {node: f"n_{node.name}" for node in graph.nodes}
    lines = []
    for n in graph.nodes:
        if n.op == "placeholder" and n.target == n.name and not n.args:
            lines.append(f"{names[n]} = p({n.name!r})")
        elif n.op == "call_function":
            call = f"c({n.name!r}, {_target_source(n.target)}"
            if n.args or n.kwargs:
                call += f", {_value_source(n.args, names)}"
            if n.kwargs:
                call += f", {_value_source(n.kwargs, names)}"
            lines.append(f"{names[n]} = {call})")
        elif n.op == "output" and n.name == "output" and len(n.args) == 1 and not n.kwargs:
            lines.append(f"o({_value_source(n.args[0], names)})")
        else:
            raise _Unserializable(f"{n.op} node {n.name}")
    source = "\n".join(lines) + "\n"
    if "\\" in source or '"""' in source:
        raise _Unserializable("text that a plain triple-quoted string cannot hold")
    return source


def _register_every_pattern() -> None:
    """Runs every registration that goes through ``register_pattern``, into
    throwaway pattern passes."""
    from .eplb import _LazyEplbPatterns
    from .routing import _LazyRoutingPatterns, routing_variants

    routing = _LazyRoutingPatterns()
    for variant in routing_variants():
        routing._register(variant)
    _LazyEplbPatterns().register((False, True))


def _same_pattern(stored: torch.fx.GraphModule, fresh: torch.fx.GraphModule) -> bool:
    """The duplicate check compares graphs as text, the matcher their patterns;
    a stored graph must give both exactly (every literal kept)."""
    from torch._inductor.pattern_matcher import PatternPrettyPrinter, fx_to_pattern

    def printed(gm):
        return PatternPrettyPrinter.run(fx_to_pattern(gm))

    return str(stored.graph) == str(fresh.graph) and printed(stored) == printed(fresh)


def generate() -> str:
    """Traces every registered pattern now and returns the generated module's text."""
    global _recording
    _recording = {}
    try:
        _register_every_pattern()
        recorded = dict(sorted(_recording.items()))
    finally:
        _recording = None
    entries, skipped = [], []
    for key, gm in recorded.items():
        try:
            source = _graph_source(gm.graph)
        except _Unserializable as why:
            skipped.append(f"# traced at run time: {key} ({why})")
            continue
        if not _same_pattern(_rebuild(source), gm):
            raise RuntimeError(f"the stored code of {key!r} does not rebuild its trace")
        entries.append(f'    {key!r}: """\\\n{source}""",')
    lines = [
        "# Generated by `python -m moe_compile.passes.pattern_store --write`: the",
        "# initial traces of the pass's patterns, as code for pattern_store._rebuild.",
        "# Strings, so that importing this compiles only constants. Do not edit.",
        "# fmt: off",
        "# ruff: noqa",
        "",
        f"TORCH_VERSION = {torch_version()!r}",
        f"SOURCES_SHA256 = {sources_sha256()!r}",
        *skipped,
        "",
        "GRAPHS = {",
        *entries,
        "}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite this torch's module")
    action.add_argument("--check", action="store_true", help="fail if it is out of date")
    args = parser.parse_args(argv)
    text = generate()
    path = generated_path()
    if args.write:
        path.write_text(text)
        print(f"wrote {path} ({len(text.splitlines())} lines)")
        return 0
    current = path.read_text() if path.exists() else ""
    if current != text:
        print(f"{path} is out of date: run this module with --write")
        return 1
    print(f"{path} is up to date")
    return 0


if __name__ == "__main__":
    # Run as a script this file is ``__main__``, a second copy of the module;
    # the recording must happen in the copy that ``tracing.py`` imports.
    from moe_compile.passes import pattern_store

    sys.exit(pattern_store.main())
