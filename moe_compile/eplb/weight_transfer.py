"""Moving expert weights between expert-parallel ranks after a rebalance.

Physical slots are laid out linearly: rank ``r`` holds global slots
``[r * m, (r + 1) * m)`` in its local slots ``0 .. m-1``. For one layer and a
change of placement ``old -> new`` (both ``[P]`` physical -> logical maps,
identical on every rank):

- a slot whose expert does not change is not touched;
- an expert that this rank already held is copied locally from its old slot;
- an expert this rank lacked is received once, from a rank that held it (the
  holders take turns so that no single one sends everything), and copied into
  every other local slot that needs it.

Everything new lands first in a preallocated staging buffer; the weights are
overwritten only after *every* rank reports that its buffer is complete (an
all-reduce of success flags), and only then is ``on_commit(layer)`` called so
the caller can publish the new maps. A rank that fails (a raising fault hook,
an exception while copying) makes every rank abort that layer: its weights and
maps stay the old ones, never a mix. With ``transaction="model"`` the buffer
holds every layer and nothing is committed unless all layers arrived; with the
default ``"layer"`` the buffer holds one layer (no doubling of expert memory),
and a failure leaves the layers before it moved and the rest untouched — each
layer's weights always agree with its maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

TRANSACTIONS = ("layer", "model")

FaultHook = Callable[[str, int], None]
"""``hook(stage, layer)`` called at ``("planned", -1)`` before any transfer and at
``("received", layer)`` once a layer's staging buffer is complete; raising aborts."""


class EplbTransferError(RuntimeError):
    """A rank failed while expert weights were moving; uncommitted layers kept their old state."""


@dataclass
class LayerTransferPlan:
    """What one rank does for one layer (local slot indices)."""

    sends: list[tuple[int, int, int]] = field(default_factory=list)
    """``(peer rank, logical expert, local slot read)``, sorted by peer then expert."""
    recvs: list[tuple[int, int, int]] = field(default_factory=list)
    """``(peer rank, logical expert, local slot written in the buffer)``, same order."""
    local_copies: list[tuple[int, int]] = field(default_factory=list)
    """``(buffer slot, old weight slot)``: experts this rank already held."""
    fan_out: list[tuple[int, int]] = field(default_factory=list)
    """``(buffer slot, buffer slot received into)``: further replicas of a received expert."""
    changed_slots: list[int] = field(default_factory=list)
    """Local slots whose expert changes, copied from the buffer at commit."""


def plan_layer_transfer(
    old_physical_to_logical: Sequence[int],
    new_physical_to_logical: Sequence[int],
    ep_size: int,
    ep_rank: int,
) -> LayerTransferPlan:
    """The transfers of rank ``ep_rank`` for one layer; every rank derives the same
    global schedule from the same maps, so sends and receives pair up."""
    old = [int(e) for e in old_physical_to_logical]
    new = [int(e) for e in new_physical_to_logical]
    if len(old) != len(new):
        raise ValueError(f"old and new maps differ in length: {len(old)} vs {len(new)}")
    if len(old) % ep_size != 0:
        raise ValueError(f"{len(old)} physical slots do not divide over ep_size={ep_size} ranks")
    slots_per_rank = len(old) // ep_size
    # First local slot holding each expert, per rank, in the old placement.
    old_slot_of: list[dict[int, int]] = [{} for _ in range(ep_size)]
    for physical, expert in enumerate(old):
        old_slot_of[physical // slots_per_rank].setdefault(expert, physical % slots_per_rank)
    new_slots_of: list[dict[int, list[int]]] = [{} for _ in range(ep_size)]
    for physical, expert in enumerate(new):
        rank, slot = divmod(physical, slots_per_rank)
        new_slots_of[rank].setdefault(expert, []).append(slot)
    needers: dict[int, list[int]] = {}
    for rank in range(ep_size):
        for expert in sorted(new_slots_of[rank]):
            if expert not in old_slot_of[rank]:
                needers.setdefault(expert, []).append(rank)
    source: dict[tuple[int, int], int] = {}
    for expert, ranks in needers.items():
        holders = [rank for rank in range(ep_size) if expert in old_slot_of[rank]]
        if not holders:
            raise ValueError(
                f"logical expert {expert} is needed by the new map but no rank holds it in the "
                "old map; its weights would be lost"
            )
        for turn, rank in enumerate(ranks):
            source[(rank, expert)] = holders[turn % len(holders)]

    plan = LayerTransferPlan()
    for peer in range(ep_size):
        if peer == ep_rank:
            continue
        for expert in sorted(new_slots_of[peer]):
            if source.get((peer, expert)) == ep_rank:
                plan.sends.append((peer, expert, old_slot_of[ep_rank][expert]))
        for expert in sorted(new_slots_of[ep_rank]):
            if source.get((ep_rank, expert)) == peer:
                plan.recvs.append((peer, expert, new_slots_of[ep_rank][expert][0]))
    base = ep_rank * slots_per_rank
    for expert, slots in sorted(new_slots_of[ep_rank].items()):
        changed = [s for s in slots if old[base + s] != expert]
        plan.changed_slots.extend(changed)
        if expert in old_slot_of[ep_rank]:
            plan.local_copies.extend((s, old_slot_of[ep_rank][expert]) for s in changed)
        else:
            plan.fan_out.extend((s, slots[0]) for s in slots[1:])
    plan.changed_slots.sort()
    return plan


class ExpertWeightMover:
    """Moves expert weights between EP ranks through a preallocated staging buffer.

    Args:
        weight_templates: one layer's ``get_expert_weights()`` (``[m, -1]`` views);
            only their shapes, dtypes and device are used, to size the buffer.
        num_layers: layers that will be moved (the buffer holds all of them in
            ``"model"`` transactions, one otherwise).
        ep_size, ep_rank, ep_group: the expert-parallel group (``None``: the default
            group); with ``ep_size == 1`` nothing is communicated.
        transaction: ``"layer"`` (commit layer by layer) or ``"model"`` (all or nothing).
    """

    def __init__(
        self,
        weight_templates: Sequence[torch.Tensor],
        num_layers: int,
        ep_size: int = 1,
        ep_rank: int = 0,
        ep_group: dist.ProcessGroup | None = None,
        transaction: str = "layer",
    ):
        if transaction not in TRANSACTIONS:
            raise ValueError(f"unknown transaction {transaction!r}; expected one of {TRANSACTIONS}")
        if not weight_templates:
            raise ValueError("weight_templates is empty: a layer must expose its expert weights")
        self.signature = _signature(weight_templates)
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.ep_group = ep_group
        self.transaction = transaction
        self.device = weight_templates[0].device
        copies = num_layers if transaction == "model" else 1
        self.buffers = [
            [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self.signature]
            for _ in range(copies)
        ]

    def _global_rank(self, group_rank: int) -> int:
        if self.ep_group is None:
            return group_rank
        return dist.get_global_rank(self.ep_group, group_rank)

    def _failed_ranks(self, failed: bool) -> list[int]:
        """Every rank's failure flag, gathered on every rank (a collective)."""
        if self.ep_size == 1:
            return [0] if failed else []
        flags = torch.zeros(self.ep_size, dtype=torch.int32, device=self.device)
        flags[self.ep_rank] = int(failed)
        dist.all_reduce(flags, group=self.ep_group)
        return torch.nonzero(flags).flatten().tolist()

    def _check_same_maps(self, old: torch.Tensor, new: torch.Tensor) -> bool:
        """Whether every rank was handed the same maps (a collective)."""
        if self.ep_size == 1:
            return True
        both = torch.cat([old.flatten(), new.flatten()]).long()
        weights = torch.arange(1, both.numel() + 1, dtype=torch.int64)
        digest = int(((both + 1) * weights % 2_147_483_647).sum() % 2_147_483_647)
        extremes = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.ep_group)
        return int(extremes[0]) == digest and int(extremes[1]) == -digest

    def _abort(self, failed_ranks: list[int], error: BaseException | None, where: str):
        if error is not None:
            raise EplbTransferError(
                f"EPLB weight transfer failed on rank {self.ep_rank} {where}: {error!r}; "
                "uncommitted layers keep their old weights and maps"
            ) from error
        raise EplbTransferError(
            f"EPLB weight transfer aborted {where}: rank(s) {failed_ranks} failed; "
            "uncommitted layers keep their old weights and maps"
        )

    def move(
        self,
        layer_weights: Sequence[Sequence[torch.Tensor]],
        old_physical_to_logical: torch.Tensor,
        new_physical_to_logical: torch.Tensor,
        on_commit: Callable[[int], None],
        fault_hook: FaultHook | None = None,
    ) -> list[int]:
        """Move every layer from ``old`` to ``new`` (``[L, P]`` maps) and return the
        layers committed. ``on_commit(layer)`` runs right after a layer's weights were
        overwritten, on every rank; it must publish that layer's new maps."""
        if self.ep_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"ep_size={self.ep_size} needs torch.distributed to be initialised to move "
                "expert weights"
            )
        old = old_physical_to_logical.detach().to("cpu", torch.int64, copy=True)
        new = new_physical_to_logical.detach().to("cpu", torch.int64, copy=True)
        num_layers = len(layer_weights)
        if old.shape != new.shape or old.dim() != 2 or old.shape[0] != num_layers:
            raise ValueError(
                f"maps must both be [{num_layers}, P]; got {tuple(old.shape)} and {tuple(new.shape)}"
            )
        if self.transaction == "model" and num_layers > len(self.buffers):
            raise ValueError(
                f"the staging buffer holds {len(self.buffers)} layers, asked to move {num_layers}"
            )
        error: BaseException | None = None
        plans: list[LayerTransferPlan] = []
        try:
            for layer, weights in enumerate(layer_weights):
                if _signature(weights) != self.signature:
                    raise ValueError(
                        f"layer {layer}'s expert weights {_signature(weights)} do not match the "
                        f"staging buffer {self.signature}"
                    )
                plans.append(
                    plan_layer_transfer(old[layer], new[layer], self.ep_size, self.ep_rank)
                )
            if fault_hook is not None:
                fault_hook("planned", -1)
        except Exception as exc:  # reported to every rank below, then re-raised here
            error = exc
        same_maps = self._check_same_maps(old, new)
        failed = self._failed_ranks(error is not None)
        if failed:
            self._abort(failed, error, "while planning")
        if not same_maps:
            raise ValueError("EPLB ranks were given different expert maps; nothing was moved")

        committed: list[int] = []
        staged: list[int] = []
        for layer, (weights, plan) in enumerate(zip(layer_weights, plans, strict=True)):
            buffer = self.buffers[layer if self.transaction == "model" else 0]
            try:
                self._stage(weights, plan, buffer)
                if fault_hook is not None:
                    fault_hook("received", layer)
            except Exception as exc:  # reported to every rank below, then re-raised here
                error = exc
            failed = self._failed_ranks(error is not None)
            if failed:
                self._abort(failed, error, f"at layer {layer}")
            if self.transaction == "layer":
                _commit(weights, plan, buffer)
                on_commit(layer)
                committed.append(layer)
            else:
                staged.append(layer)
        for layer in staged:
            _commit(layer_weights[layer], plans[layer], self.buffers[layer])
            on_commit(layer)
            committed.append(layer)
        return committed

    @torch.no_grad()
    def _stage(
        self,
        weights: Sequence[torch.Tensor],
        plan: LayerTransferPlan,
        buffer: Sequence[torch.Tensor],
    ) -> None:
        """Fill the buffer rows of the changed slots: receive, then copy locally."""
        ops = []
        for peer, expert, slot in plan.sends:
            for index, weight in enumerate(weights):
                row = weight[slot]
                if not row.is_contiguous():
                    row = row.contiguous()
                ops.append(
                    dist.P2POp(
                        dist.isend,
                        row,
                        self._global_rank(peer),
                        self.ep_group,
                        expert * len(weights) + index,
                    )
                )
        for peer, expert, slot in plan.recvs:
            for index, staging in enumerate(buffer):
                ops.append(
                    dist.P2POp(
                        dist.irecv,
                        staging[slot],
                        self._global_rank(peer),
                        self.ep_group,
                        expert * len(weights) + index,
                    )
                )
        if plan.local_copies:
            dst = torch.tensor([d for d, _ in plan.local_copies], device=self.device)
            src = torch.tensor([s for _, s in plan.local_copies], device=self.device)
            for weight, staging in zip(weights, buffer, strict=True):
                staging.index_copy_(0, dst, weight.index_select(0, src))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        if plan.fan_out:
            dst = torch.tensor([d for d, _ in plan.fan_out], device=self.device)
            src = torch.tensor([s for _, s in plan.fan_out], device=self.device)
            for staging in buffer:
                staging.index_copy_(0, dst, staging.index_select(0, src))


def _signature(weights: Sequence[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(w.shape), w.dtype) for w in weights]


@torch.no_grad()
def _commit(
    weights: Sequence[torch.Tensor], plan: LayerTransferPlan, buffer: Sequence[torch.Tensor]
) -> None:
    if not plan.changed_slots:
        return
    slots = torch.tensor(plan.changed_slots, device=buffer[0].device)
    for weight, staging in zip(weights, buffer, strict=True):
        weight.index_copy_(0, slots, staging.index_select(0, slots))
