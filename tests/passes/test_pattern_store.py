"""The stored initial traces (``passes/_traced_patterns_<torch>.py``): fresh, used, optional."""

import pytest
import torch
from torch._inductor.pattern_matcher import PatternPrettyPrinter

from moe_compile.passes import pattern_store, tracing
from moe_compile.passes.manager import _source_files
from moe_compile.passes.routing import RoutingVariant, _LazyRoutingPatterns

REGENERATE = "run `python -m moe_compile.passes.pattern_store --write` and commit the result"
VARIANTS = [
    RoutingVariant("grouped", "sigmoid", True, torch.bfloat16, torch.float32),
    RoutingVariant("topk", "softmax", False, torch.float32),
    RoutingVariant("softmax_then_topk", "softmax", True, torch.bfloat16, topk_dim=1),
]


needs_matching_torch = pytest.mark.skipif(
    not pattern_store.generated_path().exists(),
    reason="no stored traces for this torch release (it traces every pattern)",
)


@pytest.fixture
def fresh_store():
    """Forget which stored graphs this process loaded, before and after (the
    cached loader itself, which a test may have patched over meanwhile)."""
    loader = pattern_store._stored_graphs
    loader.cache_clear()
    yield
    loader.cache_clear()


def _registered(variants) -> list[str]:
    """Every pattern registered for ``variants``, printed, in registration order."""
    lazy = _LazyRoutingPatterns()
    for variant in variants:
        lazy._register(variant)
    return [
        PatternPrettyPrinter.run(entry.pattern)
        for entries in lazy.patterns.patterns.values()
        for entry in entries
    ]


@needs_matching_torch
def test_stored_traces_match_fresh_traces():
    fresh = pattern_store.generate().splitlines()
    stored = pattern_store.generated_path().read_text().splitlines()
    differ = [i for i, (a, b) in enumerate(zip(stored, fresh, strict=False)) if a != b]
    if differ or len(stored) != len(fresh):
        first = differ[0] if differ else min(len(stored), len(fresh))
        pytest.fail(
            f"{pattern_store.generated_path().name} differs from fresh traces from line "
            f"{first + 1} ({len(differ)} lines differ, {len(stored)} vs {len(fresh)} lines): "
            + REGENERATE
        )


@needs_matching_torch
def test_registration_uses_stored_traces(monkeypatch, fresh_store):
    from moe_compile.passes.eplb import _LazyEplbPatterns

    assert pattern_store._stored_graphs(), f"the stored traces do not fit the source: {REGENERATE}"
    traced = []
    original = tracing.trace_post_grad

    def counting_trace(*args, **kwargs):
        traced.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(tracing, "trace_post_grad", counting_trace)
    assert _registered(VARIANTS)
    assert _LazyEplbPatterns().register((False, True)).patterns
    assert not traced


def test_without_stored_traces_patterns_are_traced_alike(monkeypatch, fresh_store):
    with_store = _registered(VARIANTS)
    pattern_store._stored_graphs.cache_clear()
    monkeypatch.setattr(pattern_store, "torch_version", lambda: "0.0.0")
    assert pattern_store._stored_graphs() == {}
    assert _registered(VARIANTS) == with_store


class _BrokenStore(dict):
    """A stored graph for every key, each of which fails to rebuild."""

    def get(self, key, default=None):
        return "raise RuntimeError('a stored graph that does not rebuild')\n"


def test_a_broken_stored_graph_falls_back_to_tracing(monkeypatch, fresh_store):
    expected = _registered(VARIANTS)
    monkeypatch.setattr(pattern_store, "_stored_graphs", _BrokenStore)
    assert _registered(VARIANTS) == expected


def test_stored_traces_are_part_of_the_pass_uuid():
    stored = sorted(pattern_store.generated_path().parent.glob("_traced_patterns_*.py"))
    assert stored, "no stored pattern traces at all"
    assert set(stored) <= set(_source_files())
