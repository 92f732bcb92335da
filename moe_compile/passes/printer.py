"""A canonical text form of FX graphs, stable across torch 2.11-2.14, for snapshot tests.

Generated node names, the view/reshape spelling and the two
``auto_functionalized`` forms differ between torch versions; this printer
names nodes by position and spells each of those one way.
"""

from __future__ import annotations

import operator

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

_SAME_SPELLING = {"view": "reshape", "_unsafe_view": "reshape", "view_copy": "reshape"}
_DTYPE = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
}


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        namespace, name = target.namespace, target._schema.name.split("::")[-1]
        return f"{namespace}.{_SAME_SPELLING.get(name, name)}"
    if target in (auto_functionalized, auto_functionalized_v2):
        return "auto_functionalized"
    return getattr(target, "__name__", str(target))


class _Printer:
    def __init__(self):
        self.names: dict[torch.fx.Node, str] = {}
        self.symbols: dict[str, str] = {}

    def symbol(self, size) -> str:
        if isinstance(size, int):
            return str(size)
        text = str(size)
        if text not in self.symbols:
            self.symbols[text] = f"s{len(self.symbols)}"
        return self.symbols[text]

    def value(self, val) -> str:
        if isinstance(val, torch.Tensor):
            dims = ", ".join(self.symbol(s) for s in val.shape)
            return f"{_DTYPE.get(val.dtype, str(val.dtype))}[{dims}]"
        if isinstance(val, (tuple, list)):
            return "(" + ", ".join("None" if v is None else self.value(v) for v in val) + ")"
        return type(val).__name__ if val is not None else ""

    def arg(self, arg) -> str:
        if isinstance(arg, torch.fx.Node):
            return self.names[arg]
        if isinstance(arg, (list, tuple)):
            inner = ", ".join(self.arg(a) for a in arg)
            return f"[{inner}]" if isinstance(arg, list) else f"({inner})"
        if isinstance(arg, torch.dtype):
            return _DTYPE.get(arg, str(arg))
        if isinstance(arg, torch._ops.OpOverload):
            return _op_name(arg)
        if isinstance(arg, torch.device):
            return "device"
        if isinstance(arg, torch.SymInt):
            return self.symbol(arg)
        return repr(arg)

    def node(self, node: torch.fx.Node) -> str | None:
        if node.op == "placeholder":
            self.names[node] = f"in{sum(n.startswith('in') for n in self.names.values())}"
        elif node.op == "output":
            return "return " + self.arg(node.args[0])
        else:
            self.names[node] = f"%{sum(n.startswith('%') for n in self.names.values())}"
        name, value = self.names[node], self.value(node.meta.get("val"))
        if node.op == "placeholder":
            return f"{name}: {value}"
        if node.target is operator.getitem:
            return f"{name}: {value} = {self.arg(node.args[0])}[{node.args[1]}]"
        args = [self.arg(a) for a in node.args]
        if node.target in (auto_functionalized, auto_functionalized_v2):
            args = [self.arg(node.args[0])]
        kwargs = [
            f"{k}={self.arg(v)}"
            for k, v in node.kwargs.items()
            if not k.startswith("_") and k not in ("device", "layout", "pin_memory")
        ]
        return f"{name}: {value} = {_op_name(node.target)}({', '.join(args + kwargs)})"


def canonical_graph(graph: torch.fx.Graph | torch.fx.GraphModule) -> str:
    """The graph as text: one line per node, names by position, dtypes and shapes shown."""
    if isinstance(graph, torch.fx.GraphModule):
        graph = graph.graph
    printer = _Printer()
    lines = (printer.node(node) for node in graph.nodes)
    return "\n".join(line for line in lines if line is not None)


def count_ops(graph: torch.fx.Graph | torch.fx.GraphModule) -> dict[str, int]:
    """How often each op appears, by its canonical name."""
    if isinstance(graph, torch.fx.GraphModule):
        graph = graph.graph
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is not operator.getitem:
            name = _op_name(node.target)
            if node.target in (auto_functionalized, auto_functionalized_v2):
                name = f"auto_functionalized({_op_name(node.args[0])})"
            counts[name] = counts.get(name, 0) + 1
    return counts
