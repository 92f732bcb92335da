"""The public face: what is importable, and that EPLB has no on/off flag anywhere."""

import dataclasses
import importlib
import inspect
import pkgutil

import pytest
import torch

import moe_compile
from moe_compile import EplbLayerState, FusedMoE
from moe_compile.router import (
    BaseRouter,
    CustomRoutingRouter,
    FusedTopKBiasRouter,
    FusedTopKRouter,
    GroupedTopKRouter,
    RoutingSimulatorRouter,
    SharedRoutedRouter,
    ZeroExpertRouter,
    create_fused_moe_router,
)

PUBLIC_NAMES = [
    "BaseRouter",
    "CustomRoutingRouter",
    "EplbLayerState",
    "FusedTopKBiasRouter",
    "FusedTopKRouter",
    "GroupedTopKRouter",
    "RoutingSimulatorRouter",
    "SharedRoutedRouter",
    "ZeroExpertRouter",
    "create_fused_moe_router",
    "eplb_map_to_physical_and_record",
]
ROUTER_CLASSES = [
    FusedTopKRouter,
    FusedTopKBiasRouter,
    GroupedTopKRouter,
    CustomRoutingRouter,
    SharedRoutedRouter,
    ZeroExpertRouter,
    RoutingSimulatorRouter,
]


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_is_exported_from_the_top_level(name):
    assert name in moe_compile.__all__
    assert getattr(moe_compile, name) is not None


def test_every_subpackage_imports():
    for module in pkgutil.walk_packages(moe_compile.__path__, prefix="moe_compile."):
        importlib.import_module(module.name)
    for name in ("router", "eplb", "passes", "custom_ops", "experts"):
        importlib.import_module(f"moe_compile.{name}")


def test_routers_share_the_base_contract():
    for router_cls in ROUTER_CLASSES:
        assert issubclass(router_cls, BaseRouter)
    parameters = list(inspect.signature(BaseRouter.__init__).parameters)
    assert parameters[:5] == ["self", "top_k", "global_num_experts", "eplb_state", "indices_dtype"]
    for method in (
        "select_experts",
        "set_capture_fn",
        "_validate_eplb_state",
        "_apply_eplb_mapping",
    ):
        assert callable(getattr(BaseRouter, method))
    with pytest.raises(TypeError):
        BaseRouter(2, 8)  # abstract: a router must say how it routes


def test_mapping_signature():
    parameters = inspect.signature(moe_compile.eplb_map_to_physical_and_record).parameters
    assert list(parameters) == ["topk_ids", "eplb_state", "policy"]
    assert parameters["policy"].default == "token_hash"


@pytest.mark.parametrize(
    "callable_",
    [*ROUTER_CLASSES, BaseRouter, create_fused_moe_router, EplbLayerState, FusedMoE],
)
def test_no_enable_eplb_parameter(callable_):
    target = callable_.__init__ if inspect.isclass(callable_) else callable_
    assert "enable_eplb" not in inspect.signature(target).parameters


def test_no_enable_eplb_attribute_on_built_routers():
    state = EplbLayerState(
        expert_load_view=torch.zeros(8, dtype=torch.int32),
        logical_to_physical_map=torch.arange(8)[:, None],
        logical_replica_count=torch.ones(8, dtype=torch.int64),
        should_record_tensor=torch.tensor(True),
    )
    routers = [
        create_fused_moe_router(top_k=2, global_num_experts=8, eplb_state=state),
        create_fused_moe_router(
            top_k=2, global_num_experts=8, routing_simulation_strategy="uniform_random"
        ),
        create_fused_moe_router(
            top_k=2, global_num_experts=8, use_grouped_topk=True, num_expert_group=2, topk_group=1
        ),
        create_fused_moe_router(
            top_k=2, global_num_experts=8, e_score_correction_bias=torch.zeros(8)
        ),
        create_fused_moe_router(top_k=2, global_num_experts=8, num_fused_shared_experts=1),
        create_fused_moe_router(
            top_k=2,
            global_num_experts=8,
            zero_expert_type="identity",
            num_logical_experts=8,
            e_score_correction_bias=torch.zeros(10),
        ),
        create_fused_moe_router(
            top_k=2, global_num_experts=8, custom_routing_function=lambda **kw: None
        ),
    ]
    assert {type(r) for r in routers} == set(ROUTER_CLASSES)
    for router in routers:
        assert not hasattr(router, "enable_eplb")
        assert not any("enable_eplb" in name for name in vars(router))
    assert "enable_eplb" not in [f.name for f in dataclasses.fields(EplbLayerState)]
    assert not hasattr(state, "enable_eplb")


def test_eplb_is_on_exactly_when_a_state_is_given():
    assert FusedTopKRouter(2, 8).eplb_state is None
    state = EplbLayerState()
    assert FusedTopKRouter(2, 8, eplb_state=state).eplb_state is state
