"""ExpertMapManager against the placement rules of SPEC §5, including uneven splits."""

from __future__ import annotations

import pytest
import torch

from moe_compile import ExpertMapManager


def spec_local_ids(num_global, ep_size, rank, placement):
    """SPEC §5 written out: base = G // ep, the first G % ep ranks get one more."""
    base, rem = num_global // ep_size, num_global % ep_size
    if placement == "linear":
        count = base + (1 if rank < rem else 0)
        start = rank * base + min(rank, rem)
        return list(range(start, start + count))
    return [e for e in range(num_global) if e % ep_size == rank]


CASES = [(8, 1), (8, 2), (8, 4), (10, 4), (7, 3), (13, 5), (3, 4), (16, 16)]


@pytest.mark.parametrize("placement", ["linear", "round_robin"])
@pytest.mark.parametrize(("num_global", "ep_size"), CASES)
def test_placement_follows_spec_and_covers_every_expert_once(num_global, ep_size, placement):
    manager = ExpertMapManager(num_global, ep_size, placement)
    owners = torch.full((num_global,), -1)
    for rank in range(ep_size):
        local_ids = manager.local_expert_ids(rank)
        assert local_ids == spec_local_ids(num_global, ep_size, rank, placement)
        assert manager.local_num_experts(rank) == len(local_ids)
        expert_map = manager.expert_map(rank)
        assert expert_map.dtype == torch.int32 and expert_map.shape == (num_global,)
        for slot, global_id in enumerate(local_ids):
            assert expert_map[global_id] == slot
            assert manager.owner(global_id) == (rank, slot)
            assert owners[global_id] == -1
            owners[global_id] = rank
        assert int((expert_map >= 0).sum()) == len(local_ids)
        assert (expert_map[expert_map >= 0].sort().values == torch.arange(len(local_ids))).all()
    assert (owners >= 0).all()


def test_uneven_split_worked_examples():
    linear = ExpertMapManager(10, 4, "linear")
    assert [linear.local_expert_ids(r) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert linear.expert_map(2).tolist() == [-1, -1, -1, -1, -1, -1, 0, 1, -1, -1]
    round_robin = ExpertMapManager(10, 4, "round_robin")
    assert [round_robin.local_expert_ids(r) for r in range(4)] == [
        [0, 4, 8],
        [1, 5, 9],
        [2, 6],
        [3, 7],
    ]
    assert round_robin.expert_map(1).tolist() == [-1, 0, -1, -1, -1, 1, -1, -1, -1, 2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 2), "global_num_experts"),
        ((8, 0), "ep_size"),
        ((8, 2, "blocked"), "placement"),
    ],
)
def test_bad_arguments_raise(args, message):
    with pytest.raises(ValueError, match=message):
        ExpertMapManager(*args)


def test_bad_rank_or_id_raises():
    manager = ExpertMapManager(8, 2)
    with pytest.raises(ValueError, match=r"ep_rank must be in \[0, 2\)"):
        manager.expert_map(2)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        manager.owner(8)
