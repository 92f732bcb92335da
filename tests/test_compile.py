"""moe_compile.compile / inductor_options with the real Inductor backend (CPU)."""

import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import fresh_cache

import moe_compile as mc
from moe_compile.compile import compile_options
from moe_compile.passes import MoEFusionPass

sys.path.insert(0, str(Path(__file__).parent / "passes"))
from pass_helpers import make_eplb_state, tied_logits  # noqa: E402

NUM_EXPERTS, NUM_PHYSICAL, TOP_K = 16, 20, 4


def make_router(state):
    return mc.create_fused_moe_router(
        top_k=TOP_K,
        global_num_experts=NUM_PHYSICAL,
        eplb_state=state,
        scoring_func="sigmoid",
        use_grouped_topk=True,
        num_expert_group=4,
        topk_group=2,
        e_score_correction_bias=torch.linspace(-0.2, 0.2, NUM_EXPERTS),
        routed_scaling_factor=2.5,
    )


class CountingPass(CustomGraphPass):
    """A user's own post-grad pass: must still run, and be part of the cache key."""

    def __init__(self, tag="v1"):
        self.calls, self.tag = 0, tag

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return f"counting-pass-{self.tag}"


@pytest.fixture(autouse=True)
def fresh_state():
    """Own compiles only, in an empty cache: passes do not run on a cache hit."""
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache():
        yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compile_fuses_and_matches_eager():
    state = make_eplb_state(NUM_EXPERTS, NUM_PHYSICAL)
    router = make_router(state)
    compiled = mc.compile(router.select_experts, fullgraph=True)
    for num_tokens in (1, 37, 0):
        hidden, logits = torch.randn(num_tokens, 8), tied_logits(num_tokens, NUM_EXPERTS)
        state.expert_load_view.zero_()
        weights, ids = router.select_experts(hidden, logits)
        expected_load = state.expert_load_view.clone()
        state.expert_load_view.zero_()
        got_weights, got_ids = compiled(hidden, logits)
        torch.testing.assert_close(got_ids, ids, rtol=0, atol=0)
        torch.testing.assert_close(got_weights, weights, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state.expert_load_view, expected_load, rtol=0, atol=0)
    assert counters["moe_compile"]["route_eplb"] == 1
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_fx_graph_cache_hits_on_same_config_and_misses_on_change():
    router = make_router(None)

    def routing(hidden, logits):
        return router.select_experts(hidden, logits)

    hidden, logits = torch.randn(9, 8), tied_logits(9, NUM_EXPERTS)
    user_pass = CountingPass()

    def compile_once(**fusion):
        torch._dynamo.reset()
        options = mc.inductor_options(user_pass=user_pass, **fusion)
        with torch._inductor.config.patch(fx_graph_cache=True):
            return torch.compile(routing, options=options, fullgraph=True)(hidden, logits)

    expected = routing(hidden, logits)
    for result in (compile_once(), compile_once(), compile_once(fold_index_casts=False)):
        torch.testing.assert_close(result[1], expected[1], rtol=0, atol=0)
    assert counters["inductor"]["fxgraph_cache_miss"] == 2
    assert counters["inductor"]["fxgraph_cache_hit"] == 1
    # Passes do not run on a cache hit: ours twice, the user's after ours each time.
    assert user_pass.calls == 2
    assert counters["moe_compile"]["routing"] == 2


def test_uuid_covers_config_and_user_pass():
    base = MoEFusionPass().uuid()
    assert MoEFusionPass().uuid() == base
    assert mc.inductor_options()["post_grad_custom_pre_pass"].uuid() == base
    assert mc.inductor_options(fuse_eplb=False)["post_grad_custom_pre_pass"].uuid() != base
    with_user = mc.inductor_options(user_pass=CountingPass("v1"))["post_grad_custom_pre_pass"]
    other_user = mc.inductor_options(user_pass=CountingPass("v2"))["post_grad_custom_pre_pass"]
    assert len({base, with_user.uuid(), other_user.uuid()}) == 3


def test_modes_and_user_options_compose_with_the_pass():
    user_pass = CountingPass()
    options = compile_options(
        mode="max-autotune",
        options={"post_grad_custom_pre_pass": user_pass, "epilogue_fusion": False},
    )
    assert options["max_autotune"] is True
    assert options["epilogue_fusion"] is False
    fusion_pass = options["post_grad_custom_pre_pass"]
    assert isinstance(fusion_pass, MoEFusionPass) and fusion_pass.user_pass is user_pass
    assert compile_options(mode="reduce-overhead")["triton.cudagraphs"] is True
    # A user's post pass is a different slot: left exactly as given.
    post = CountingPass()
    assert (
        compile_options(options={"post_grad_custom_post_pass": post})["post_grad_custom_post_pass"]
        is post
    )
    with pytest.raises(ValueError, match="unknown fusion strategy"):
        compile_options(fusion={"strategy": "magic"})


def test_separately_compiled_layers_can_share_one_region():
    """Dynamo reuses a compiled region only under an equal backend; Inductor's
    backend compares its options, so two compiles with the same fusion config
    must produce equal options (and a different config must not)."""
    user_pass = CountingPass()
    assert compile_options() == compile_options()
    assert compile_options(options={"post_grad_custom_pre_pass": user_pass}) == compile_options(
        options={"post_grad_custom_pre_pass": user_pass}
    )
    assert compile_options() != compile_options(fusion={"strategy": "inductor"})
    assert compile_options() != compile_options(options={"post_grad_custom_pre_pass": user_pass})
