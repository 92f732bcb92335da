"""Snapshots of the post-pass graph for each router, EPLB off and on.

Update with ``EXPECTTEST_ACCEPT=1 make test`` and read the diff before committing.
"""

import expecttest
import torch
from pass_helpers import make_eplb_state, tied_logits

import moe_compile as mc
from moe_compile.passes.testing import PassTestBackend

NUM_EXPERTS, TOP_K, NUM_TOKENS = 16, 4, 8
BIAS = torch.linspace(-0.3, 0.3, NUM_EXPERTS)
NUM_ZERO_EXPERTS = 2


class FusedGraphSnapshots(expecttest.TestCase):
    def setUp(self):
        torch._dynamo.reset()

    def fused_graph(self, eplb: bool, distinct_logits=False, **router_options) -> str:
        """Compile the router, check it against eager, return the post-pass graph."""
        num_logits = NUM_EXPERTS + router_options.get("num_fused_shared_experts", 0)
        if router_options.get("zero_expert_type"):
            num_logits += NUM_ZERO_EXPERTS
            router_options["num_logical_experts"] = NUM_EXPERTS
        state = make_eplb_state(NUM_EXPERTS, NUM_EXPERTS + 4) if eplb else None
        router = mc.create_fused_moe_router(
            top_k=TOP_K,
            global_num_experts=NUM_EXPERTS + (4 if eplb else 0),
            eplb_state=state,
            **router_options,
        )
        backend = PassTestBackend()
        compiled = torch.compile(router.select_experts, backend=backend, fullgraph=True)
        hidden, logits = torch.randn(NUM_TOKENS, 4), tied_logits(NUM_TOKENS, num_logits)
        if distinct_logits:  # for model code that uses torch.topk, whose ties are unspecified
            logits = torch.stack([torch.randperm(num_logits) for _ in range(NUM_TOKENS)]) / 4.0
        expected = router.select_experts(hidden, logits)
        expected_side_output = getattr(router, "zero_expert_output", None)
        got = compiled(hidden, logits)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
        torch.testing.assert_close(got[0], expected[0])
        if expected_side_output is not None:
            torch.testing.assert_close(router.zero_expert_output, expected_side_output)
        return backend.graphs[0].after

    def test_topk_softmax(self):
        self.assertExpectedInline(
            self.fused_graph(False),
            """\
in0: f32[8, 16]
%0: (f32[8, 4], i32[8, 4]) = moe_compile.route(in0, None, 4, 'softmax', True, 1.0, 0, 0, 0, i32)
%1: f32[8, 4] = %0[0]
%2: i32[8, 4] = %0[1]
return (%1, %2)""",
        )

    def test_topk_softmax_eplb(self):
        self.assertExpectedInline(
            self.fused_graph(True),
            """\
in0: f32[8, 16]
in1: i32[20]
in2: i64[16, 2]
in3: i64[16]
in4: b8[]
%0: (f32[8, 4], i32[8, 4], i32[20]) = auto_functionalized(moe_compile.route_eplb, router_logits=in0, e_score_correction_bias=None, top_k=4, scoring_func='softmax', renormalize=True, routed_scaling_factor=1.0, num_expert_group=0, topk_group=0, num_fused_shared_experts=0, indices_dtype=i32, logical_to_physical_map=in2, logical_replica_count=in3, expert_load_view=in1, should_record=in4, num_unpadded_tokens=None, replica_policy='token_hash')
%1: f32[8, 4] = %0[0]
%2: i32[8, 4] = %0[1]
%3: i32[20] = %0[2]
%4: i32[20] = aten.copy_(in1, %3)
return (%1, %2)""",
        )

    def test_topk_bias_sigmoid(self):
        options = dict(
            scoring_func="sigmoid", e_score_correction_bias=BIAS, routed_scaling_factor=2.5
        )
        self.assertExpectedInline(
            self.fused_graph(False, **options),
            """\
in0: f32[8, 16]
in1: f32[16]
%0: (f32[8, 4], i32[8, 4]) = moe_compile.route(in0, in1, 4, 'sigmoid', True, 2.5, 0, 0, 0, i32)
%1: f32[8, 4] = %0[0]
%2: i32[8, 4] = %0[1]
return (%1, %2)""",
        )

    def test_topk_bias_sigmoid_eplb(self):
        options = dict(
            scoring_func="sigmoid", e_score_correction_bias=BIAS, routed_scaling_factor=2.5
        )
        self.assertExpectedInline(
            self.fused_graph(True, **options),
            """\
in0: f32[8, 16]
in1: f32[16]
in2: i32[20]
in3: i64[16, 2]
in4: i64[16]
in5: b8[]
%0: (f32[8, 4], i32[8, 4], i32[20]) = auto_functionalized(moe_compile.route_eplb, router_logits=in0, e_score_correction_bias=in1, top_k=4, scoring_func='sigmoid', renormalize=True, routed_scaling_factor=2.5, num_expert_group=0, topk_group=0, num_fused_shared_experts=0, indices_dtype=i32, logical_to_physical_map=in3, logical_replica_count=in4, expert_load_view=in2, should_record=in5, num_unpadded_tokens=None, replica_policy='token_hash')
%1: f32[8, 4] = %0[0]
%2: i32[8, 4] = %0[1]
%3: i32[20] = %0[2]
%4: i32[20] = aten.copy_(in2, %3)
return (%1, %2)""",
        )

    def test_grouped_sigmoid_bias(self):
        options = dict(
            scoring_func="sigmoid",
            use_grouped_topk=True,
            num_expert_group=4,
            topk_group=2,
            e_score_correction_bias=BIAS,
            routed_scaling_factor=2.5,
        )
        self.assertExpectedInline(
            self.fused_graph(False, **options),
            """\
in0: f32[8, 16]
in1: f32[16]
%0: (f32[8, 4], i32[8, 4]) = moe_compile.route(in0, in1, 4, 'sigmoid', True, 2.5, 4, 2, 0, i32)
%1: f32[8, 4] = %0[0]
%2: i32[8, 4] = %0[1]
return (%1, %2)""",
        )

    def test_grouped_sigmoid_bias_eplb(self):
        options = dict(
            scoring_func="sigmoid",
            use_grouped_topk=True,
            num_expert_group=4,
            topk_group=2,
            e_score_correction_bias=BIAS,
            routed_scaling_factor=2.5,
        )
        self.assertExpectedInline(
            self.fused_graph(True, **options),
            """\
in0: f32[8, 16]
in1: f32[16]
in2: i32[20]
in3: i64[16, 2]
in4: i64[16]
in5: b8[]
%0: (f32[8, 4], i32[8, 4], i32[20]) = auto_functionalized(moe_compile.route_eplb, router_logits=in0, e_score_correction_bias=in1, top_k=4, scoring_func='sigmoid', renormalize=True, routed_scaling_factor=2.5, num_expert_group=4, topk_group=2, num_fused_shared_experts=0, indices_dtype=i32, logical_to_physical_map=in3, logical_replica_count=in4, expert_load_view=in2, should_record=in5, num_unpadded_tokens=None, replica_policy='token_hash')
%1: f32[8, 4] = %0[0]
%2: i32[8, 4] = %0[1]
%3: i32[20] = %0[2]
%4: i32[20] = aten.copy_(in2, %3)
return (%1, %2)""",
        )

    def test_grouped_all_groups_softmax_eplb(self):
        # topk_group == num_expert_group: Inductor drops the group slice as a no-op.
        options = dict(use_grouped_topk=True, num_expert_group=4, topk_group=4)
        self.assertExpectedInline(
            self.fused_graph(True, **options),
            """\
in0: f32[8, 16]
in1: i32[20]
in2: i64[16, 2]
in3: i64[16]
in4: b8[]
%0: (f32[8, 4], i32[8, 4], i32[20]) = auto_functionalized(moe_compile.route_eplb, router_logits=in0, e_score_correction_bias=None, top_k=4, scoring_func='softmax', renormalize=True, routed_scaling_factor=1.0, num_expert_group=4, topk_group=4, num_fused_shared_experts=0, indices_dtype=i32, logical_to_physical_map=in2, logical_replica_count=in3, expert_load_view=in1, should_record=in4, num_unpadded_tokens=None, replica_policy='token_hash')
%1: f32[8, 4] = %0[0]
%2: i32[8, 4] = %0[1]
%3: i32[20] = %0[2]
%4: i32[20] = aten.copy_(in1, %3)
return (%1, %2)""",
        )

    def test_shared_routed(self):
        self.assertExpectedInline(
            self.fused_graph(False, num_fused_shared_experts=2),
            """\
in0: f32[8, 18]
%0: (f32[8, 6], i32[8, 6]) = moe_compile.route(in0, None, 4, 'softmax', True, 1.0, 0, 0, 2, i32)
%1: f32[8, 6] = %0[0]
%2: i32[8, 6] = %0[1]
return (%1, %2)""",
        )

    def test_shared_routed_eplb(self):
        self.assertExpectedInline(
            self.fused_graph(True, num_fused_shared_experts=2),
            """\
in0: f32[8, 18]
in1: i32[20]
in2: i64[16, 2]
in3: i64[16]
in4: b8[]
%0: (f32[8, 6], i32[8, 6], i32[20]) = auto_functionalized(moe_compile.route_eplb, router_logits=in0, e_score_correction_bias=None, top_k=4, scoring_func='softmax', renormalize=True, routed_scaling_factor=1.0, num_expert_group=0, topk_group=0, num_fused_shared_experts=2, indices_dtype=i32, logical_to_physical_map=in2, logical_replica_count=in3, expert_load_view=in1, should_record=in4, num_unpadded_tokens=None, replica_policy='token_hash')
%1: f32[8, 6] = %0[0]
%2: i32[8, 6] = %0[1]
%3: i32[20] = %0[2]
%4: i32[20] = aten.copy_(in1, %3)
return (%1, %2)""",
        )

    def test_custom_routing_eplb(self):
        def llama4_routing(hidden_states, gating_output, topk, renormalize):
            values, ids = torch.topk(gating_output, topk, dim=-1)
            return torch.sigmoid(values.float()), ids.to(torch.int32)

        options = dict(custom_routing_function=llama4_routing, distinct_logits=True)
        self.assertExpectedInline(
            self.fused_graph(True, **options),
            """\
in0: f32[8, 16]
in1: i32[20]
in2: i64[16, 2]
in3: i64[16]
in4: b8[]
%0: (f32[8, 4], i32[8, 4], i32[20]) = auto_functionalized(moe_compile.route_eplb, router_logits=in0, e_score_correction_bias=None, top_k=4, scoring_func='sigmoid', renormalize=False, routed_scaling_factor=1.0, num_expert_group=0, topk_group=0, num_fused_shared_experts=0, indices_dtype=i32, logical_to_physical_map=in2, logical_replica_count=in3, expert_load_view=in1, should_record=in4, num_unpadded_tokens=None, replica_policy='token_hash')
%1: f32[8, 4] = %0[0]
%2: i32[8, 4] = %0[1]
%3: i32[20] = %0[2]
%4: i32[20] = aten.copy_(in1, %3)
return (%1, %2)""",
        )

    def test_zero_experts(self):
        self.assertExpectedInline(
            self.fused_graph(False, **_zero_expert_options()),
            """\
in0: f32[8, 18]
in1: f32[8, 4]
in2: f32[18]
%0: (f32[8, 4], i32[8, 4], f32[8, 1], None) = auto_functionalized(moe_compile.route_zero_experts, router_logits=in0, e_score_correction_bias=in2, top_k=4, scoring_func='softmax', renormalize=True, routed_scaling_factor=1.0, num_expert_group=0, topk_group=0, indices_dtype=i32, num_real_experts=16, logical_to_physical_map=None, logical_replica_count=None, expert_load_view=None, should_record=None, num_unpadded_tokens=None, replica_policy='token_hash')
%1: f32[8, 4] = %0[0]
%2: i32[8, 4] = %0[1]
%3: f32[8, 1] = %0[2]
%4: f32[8, 4] = aten.mul(in1, %3)
return (%1, %2, %4)""",
        )

    def test_zero_experts_eplb(self):
        self.assertExpectedInline(
            self.fused_graph(True, **_zero_expert_options()),
            """\
in0: f32[8, 18]
in1: f32[8, 4]
in2: f32[18]
in3: i32[20]
in4: i64[16, 2]
in5: i64[16]
in6: b8[]
%0: (f32[8, 4], i32[8, 4], f32[8, 1], i32[20]) = auto_functionalized(moe_compile.route_zero_experts, router_logits=in0, e_score_correction_bias=in2, top_k=4, scoring_func='softmax', renormalize=True, routed_scaling_factor=1.0, num_expert_group=0, topk_group=0, indices_dtype=i32, num_real_experts=16, logical_to_physical_map=in4, logical_replica_count=in5, expert_load_view=in3, should_record=in6, num_unpadded_tokens=None, replica_policy='token_hash')
%1: f32[8, 4] = %0[0]
%2: i32[8, 4] = %0[1]
%3: f32[8, 1] = %0[2]
%4: f32[8, 4] = aten.mul(in1, %3)
%5: i32[20] = %0[3]
%6: i32[20] = aten.copy_(in3, %5)
return (%1, %2, %4)""",
        )


def _zero_expert_options():
    # The zero experts (the last columns) have the highest bias, so tokens choose them.
    bias = torch.linspace(-0.3, 0.3, NUM_EXPERTS + NUM_ZERO_EXPERTS)
    return dict(zero_expert_type="identity", e_score_correction_bias=bias, renormalize=True)


if __name__ == "__main__":
    import unittest

    unittest.main()
