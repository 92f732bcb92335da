"""The "inductor" strategy: Inductor itself generates one kernel for routing + remap + count."""

import re

import pytest
import torch
from pass_helpers import make_eplb_state, tied_logits
from torch._inductor.utils import fresh_cache, run_and_get_code

import moe_compile as mc

ROUTERS = {
    "grouped_sigmoid_bias": dict(
        scoring_func="sigmoid",
        use_grouped_topk=True,
        num_expert_group=4,
        topk_group=2,
        e_score_correction_bias=torch.linspace(-0.2, 0.2, 16),
        routed_scaling_factor=2.5,
    ),
    # Two zero experts after the 16 real ones; their side output joins the kernel too.
    "zero_experts": dict(
        zero_expert_type="identity",
        num_logical_experts=16,
        e_score_correction_bias=torch.linspace(-0.2, 0.2, 18),
        routed_scaling_factor=1.5,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ROUTERS))
def test_one_generated_kernel_for_routing_remap_and_count(name):
    num_experts, num_physical, top_k = 16, 22, 4
    state = make_eplb_state(num_experts, num_physical, load_dtype=torch.int32)
    router = mc.create_fused_moe_router(
        top_k=top_k, global_num_experts=num_physical, eplb_state=state, **ROUTERS[name]
    )
    num_columns = ROUTERS[name]["e_score_correction_bias"].shape[0]
    hidden, logits = torch.randn(37, 8), tied_logits(37, num_columns, torch.bfloat16)

    def route(hidden, logits):
        weights, ids = router.select_experts(hidden, logits)
        return weights, ids, getattr(router, "zero_expert_output", None)

    weights, ids, side_output = route(hidden, logits)
    expected_load = state.expert_load_view.clone()
    state.expert_load_view.zero_()

    compiled = mc.compile(route, fusion={"strategy": "inductor"}, fullgraph=True)
    with fresh_cache():
        (got_weights, got_ids, got_side_output), codes = run_and_get_code(compiled, hidden, logits)
    torch.testing.assert_close(got_ids, ids, rtol=0, atol=0)
    torch.testing.assert_close(got_weights, weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_side_output, side_output)
    torch.testing.assert_close(state.expert_load_view, expected_load, rtol=0, atol=0)

    code = "\n".join(codes)
    kernels = set(re.findall(r"(cpp_fused\w*) = async_compile", code))
    assert len(kernels) == 1, kernels
    assert "moe_compile" not in code and "extern_kernels" not in code.split("def call")[-1]
    # The load count is an atomic add into the int32 counter inside that kernel.
    assert "atomic_add" in code
