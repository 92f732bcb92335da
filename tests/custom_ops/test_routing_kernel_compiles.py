"""The Triton kernel compiles for sm_90 (no GPU needed: Triton's bundled ptxas).

The interpreter tests run the kernel's Python, which accepts code that the
compiler rejects (for example a name bound to different types in the two
branches of a runtime ``if``), so a few representative launches are also
compiled. The launch arguments come from ``launch_route_kernel`` itself.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moe_compile.custom_ops import _routing_kernels  # noqa: E402
from moe_compile.eplb import EplbLayerState  # noqa: E402

KERNEL = _routing_kernels._route_kernel
_POINTER_TYPES = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.int16: "*i16",
    torch.bool: "*i1",
}


def _launch_arguments(monkeypatch, logits, bias, top_k, *, eplb_policy=None, **options):
    captured = {}

    class Capture:
        def __getitem__(self, grid):
            return lambda **kwargs: captured.update(kwargs)

    monkeypatch.setattr(_routing_kernels, "_route_kernel", Capture())
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
    num_tokens, width = logits.shape
    shared = options.get("num_fused_shared_experts", 0)
    eplb = None
    if eplb_policy is not None:
        num_routed = width - shared
        state = EplbLayerState(
            expert_load_view=torch.zeros(num_routed + 8, dtype=torch.int32),
            logical_to_physical_map=torch.zeros(num_routed, 2, dtype=torch.int64),
            logical_replica_count=torch.ones(num_routed, dtype=torch.int64),
            should_record_tensor=torch.tensor(True),
        )
        eplb = (state, eplb_policy)
    _routing_kernels.launch_route_kernel(
        logits,
        bias,
        torch.empty(num_tokens, top_k + shared),
        torch.empty(num_tokens, top_k + shared, dtype=torch.int32),
        top_k=top_k,
        eplb=eplb,
        **options,
    )
    return captured


def _compile(arguments):
    kernel = KERNEL
    signature, constexprs = {}, {}
    for name in kernel.arg_names:
        value = arguments[name]
        if name in {p.name for p in kernel.params if p.is_constexpr}:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


COMMON = dict(routed_scaling_factor=1.0, num_fused_shared_experts=0)
CASES = {
    "packed_softmax_E256_k8_eplb_token_hash": (
        torch.bfloat16, 256, 8, False,
        dict(scoring_func="softmax", renormalize=True, num_expert_group=0, topk_group=0),
        "token_hash",
    ),
    "packed_softmax_raw_E8_k2_eplb_modulo": (
        torch.float16, 8, 2, False,
        dict(scoring_func="softmax", renormalize=False, num_expert_group=0, topk_group=0),
        "modulo",
    ),
    "grouped_sigmoid_bias_E256_g8_k8": (
        torch.bfloat16, 256, 8, True,
        dict(scoring_func="sigmoid", renormalize=True, num_expert_group=8, topk_group=4),
        None,
    ),
    "sqrtsoftplus_fp32_E60_k6_shared2": (
        torch.float32, 62, 6, False,
        dict(scoring_func="sqrtsoftplus", renormalize=True, num_expert_group=0, topk_group=0,
             num_fused_shared_experts=2),
        None,
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_compiles_for_sm90(monkeypatch, case):
    dtype, width, top_k, has_bias, options, policy = CASES[case]
    logits = torch.zeros(5, width, dtype=dtype)
    num_routed = width - options.get("num_fused_shared_experts", 0)
    bias = torch.zeros(num_routed) if has_bias else None
    arguments = _launch_arguments(
        monkeypatch, logits, bias, top_k, eplb_policy=policy, **(COMMON | options)
    )
    compiled = _compile(arguments)
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
