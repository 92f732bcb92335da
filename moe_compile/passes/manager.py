"""The one pass Inductor runs for moe_compile: a ``CustomGraphPass`` over the post-grad graph."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

STRATEGIES = ("kernel", "inductor")
_ACCUMULATE = torch.ops.aten.index_put.default  # how the eager code counts the load


@dataclass(frozen=True)
class FusionConfig:
    """What the pass fuses and how it lowers the fused routing.

    ``strategy="kernel"`` emits the ``moe_compile`` custom ops (one Triton
    kernel on the GPU, the eager math on the CPU); ``"inductor"`` rewrites
    them into reductions and atomics that Inductor fuses into one kernel of
    its own (see ``passes/lowering.py``).
    """

    strategy: str = "kernel"
    fuse_routing: bool = True
    fuse_eplb: bool = True
    fold_index_casts: bool = True

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown fusion strategy {self.strategy!r}; expected one of {STRATEGIES}"
            )


def _source_files() -> list[Path]:
    """Everything whose text decides what the pass does: the passes themselves,
    the ops they emit and the eager code the patterns are traced from."""
    package = Path(__file__).resolve().parent.parent
    folders = ("passes", "custom_ops", "router", "eplb")
    return sorted(p for folder in folders for p in (package / folder).glob("*.py"))


class MoEFusionPass(CustomGraphPass):
    """Finds MoE routing (+ EPLB remap + load count) and fuses it into one op.

    Installed as Inductor's ``post_grad_custom_pre_pass`` (see
    ``moe_compile.compile``). A pass the user had installed there runs after ours (``user_pass``), and its ``uuid`` is
    part of ours, so the FX graph cache stays correct for both.
    """

    def __init__(self, config: FusionConfig | None = None, user_pass=None):
        self.config = config or FusionConfig()
        self.user_pass = user_pass
        self.last_counts: dict[str, int] = {}

    def __call__(self, graph: torch.fx.Graph) -> None:
        # Deferred so that importing moe_compile does not trace any pattern.
        from .eplb import eplb_patterns, fold_remap_into_routing
        from .index_cast import fold_index_casts
        from .lowering import lowering_patterns
        from .routing import routing_patterns
        from .zero_experts import fold_zero_expert_routing

        applied = {}
        if self.config.fuse_routing:
            applied["routing"] = routing_patterns(graph).apply(graph)
        if self.config.fuse_eplb:
            # Tracing the EPLB patterns costs time: skip it where no count can be.
            has_count = bool(graph.find_nodes(op="call_function", target=_ACCUMULATE))
            applied["eplb_remap"] = eplb_patterns(graph).apply(graph) if has_count else 0
            applied["route_eplb"] = fold_remap_into_routing(graph)
        if self.config.fuse_routing:  # after the EPLB patterns: it takes their eplb_remap
            applied["zero_experts"] = fold_zero_expert_routing(graph)
        if self.config.fold_index_casts:
            applied["index_cast"] = fold_index_casts(graph)
        if self.config.strategy == "inductor":
            applied["inductor_lowering"] = lowering_patterns().apply(graph)
        graph.lint()
        for name, count in applied.items():
            counters["moe_compile"][name] += count
        self.last_counts = applied
        if self.user_pass is not None:
            self.user_pass(graph)

    # Dynamo reuses compiled code only under an equal backend, and Inductor's
    # backend compares its options: equal passes let separately compiled
    # identical layers share one compiled region.
    def __eq__(self, other) -> bool:
        return (
            type(other) is type(self)
            and other.config == self.config
            and other.user_pass == self.user_pass
        )

    def __hash__(self) -> int:
        return hash((type(self), self.config))

    def uuid(self) -> bytes:
        hasher = hashlib.sha256()
        for path in _source_files():
            hasher.update(path.read_bytes())
        hasher.update(repr(dataclasses.astuple(self.config)).encode())
        hasher.update(torch.__version__.encode())
        if self.user_pass is not None:
            user_uuid = getattr(self.user_pass, "uuid", None)
            if user_uuid is None:
                # A plain function: its source is the best identity we have.
                hasher.update(inspect.getsource(self.user_pass).encode())
            else:
                hasher.update(repr(user_uuid()).encode())
        return hasher.digest()
