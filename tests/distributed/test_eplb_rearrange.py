"""EPLB "nothing lost" on CPU/gloo: forced rearrangements of a running expert-parallel model.

The per-rank checks live in ``bench/eplb_nothing_lost.py`` (the same script runs
on GPUs with NCCL); each rank raises on the first failed check: (a) outputs equal
the pre-rearrangement outputs, (b) every slot holds its logical expert's original
tensors bit for bit, (c) each recorded pass adds T*k per layer and matches a plain
top-k count. Here the reports of all ranks are cross-checked.
"""

from __future__ import annotations

import os
import sys

import pytest
from gloo_helpers import run_on_ranks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from eplb_nothing_lost import DEFAULT_CONFIG, nothing_lost_worker  # noqa: E402

CASES = {
    "2_ranks_layer_transactions": (2, {"transaction": "layer"}),
    "4_ranks_model_transaction_int8": (
        4,
        {"transaction": "model", "quant": "int8", "replica_policy": "modulo"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rearrangements_lose_nothing(case):
    world_size, overrides = CASES[case]
    reports = run_on_ranks(world_size, nothing_lost_worker, overrides, timeout_s=300)
    config = {**DEFAULT_CONFIG, **overrides}
    labels = [check["label"] for check in reports[0]["checks"]]
    assert labels == (
        ["initial"]
        + [f"random {i}" for i in range(config["random_rearrangements"])]
        + [f"policy {p}" for p in config["policies"]]
        + ["after fault", "after planning fault", "recovery"]
    )
    # Every rank saw the same rearrangements and ends with the same maps.
    for report in reports[1:]:
        assert report["final_physical_to_logical"] == reports[0]["final_physical_to_logical"]
        assert [c["moved_experts"] for c in report["checks"]] == [
            c["moved_experts"] for c in reports[0]["checks"]
        ]
    random_moves = [
        c["moved_experts"] for c in reports[0]["checks"] if c["label"].startswith("random")
    ]
    assert sum(random_moves) > 0, "random placements should move weights between ranks"
    # The injected fault aborted the move on every rank; the failing rank names its error.
    faulty = world_size - 1
    assert "injected fault while moving layer 1" in reports[faulty]["fault_error"]
    for report in reports[:faulty]:
        assert f"rank(s) [{faulty}] failed" in report["fault_error"]
    assert "injected fault while planning" in reports[0]["planning_fault_error"]
    after_fault = next(c for c in reports[0]["checks"] if c["label"] == "after fault")
    assert after_fault["committed_layers"] == ([0] if config["transaction"] == "layer" else [])
    for report in reports:
        assert all(c["max_abs_output_diff"] < 1e-4 for c in report["checks"])
