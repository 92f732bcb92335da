"""A light ``torch.compile`` backend for graph tests: AOTAutograd + our pass, no codegen.

It builds the same functional post-grad graph Inductor would hand to its
``post_grad_custom_pre_pass``, runs the fusion pass on it, records the
graph before and after, and then simply runs the graph. Graph tests cost
milliseconds instead of an Inductor compile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.fx_passes.joint_graph import joint_graph_passes

from .manager import MoEFusionPass
from .printer import canonical_graph, count_ops
from .tracing import canonicalize_like_inductor


@dataclass
class RecordedGraph:
    before: str
    after: str
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    applied: dict[str, int]


@dataclass
class PassTestBackend:
    """``torch.compile(fn, backend=PassTestBackend())``; ``.graphs`` holds one entry per compile."""

    fusion_pass: MoEFusionPass | None = field(default_factory=MoEFusionPass)
    graphs: list[RecordedGraph] = field(default_factory=list)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=self._compile_forward,
            decompositions=select_decomp_table(),
            keep_inference_input_mutations=True,
        )

    def _compile_forward(self, gm: torch.fx.GraphModule, example_inputs):
        # What Inductor does to an inference graph before its custom pre pass.
        joint_graph_passes(gm)
        canonicalize_like_inductor(gm)
        before, ops_before = canonical_graph(gm), count_ops(gm)
        if self.fusion_pass is not None:
            self.fusion_pass(gm.graph)
        gm.recompile()
        applied = dict(self.fusion_pass.last_counts) if self.fusion_pass else {}
        self.graphs.append(
            RecordedGraph(before, canonical_graph(gm), ops_before, count_ops(gm), applied)
        )
        return gm.forward
