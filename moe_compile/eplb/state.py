"""Model-wide EPLB state: the tensors every MoE layer's view points into, and rebalancing.

``EplbState`` owns, for the L MoE layers of a model (SPEC §4):

- ``physical_to_logical_map [L, P]`` int64,
- ``logical_to_physical_map [L, E, S]`` int64, -1 padded, ``S = P - E + 1``,
- ``logical_replica_count [L, E]`` int64,
- ``expert_load_pass [L, P]`` int32 (the layers count into it),
- ``expert_load_window [W, L, P]`` int32 (ring of the last W passes),
- ``should_record_tensor``: 0-d bool shared by all layers.

They are created once; every later change is an in-place ``copy_``/``fill_``/
``zero_``, so layers, compiled graphs and captured CUDA graphs that hold views
of them always see current values.

The model is duck-typed: an MoE layer is any module with ``set_eplb_state``,
``get_expert_weights`` and a non-None ``eplb_state`` (EPLB on), plus the
attributes ``num_experts``, ``global_num_experts``, ``local_num_experts``,
``ep_size`` and ``ep_rank``. Physical slots are laid out linearly over the
expert-parallel ranks (rank ``r`` holds ``[r * P / ep, (r + 1) * P / ep)``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .policies import (
    check_rebalance_arguments,
    count_moved_experts,
    physical_to_logical_to_logical_to_physical,
    rebalance,
)
from .weight_transfer import TRANSACTIONS, ExpertWeightMover, FaultHook

logger = logging.getLogger(__name__)

_LAYER_METHODS = ("set_eplb_state", "get_expert_weights")
_LAYER_ATTRIBUTES = ("num_experts", "global_num_experts", "local_num_experts", "ep_size", "ep_rank")


def balancedness(rank_load: torch.Tensor) -> torch.Tensor:
    """Mean over max of the last dimension (ranks); 1.0 where every rank is idle.

    SPEC §4: loads ``[[100, 0, 0, 0], [100, 0, 0, 0]]`` over 4 ranks give 0.25 each.
    """
    load = rank_load.double()
    peak = load.amax(dim=-1)
    return torch.where(peak > 0, load.mean(dim=-1) / peak.clamp(min=1e-300), 1.0)


def initial_physical_to_logical_map(
    num_layers: int, num_logical_experts: int, num_physical_experts: int
) -> torch.Tensor:
    """``[L, P]`` int64: ``[0 .. E-1]`` then ``i % E`` for the replicas (SPEC §4)."""
    layout = torch.arange(num_physical_experts, dtype=torch.int64) % num_logical_experts
    return layout.repeat(num_layers, 1)


def find_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the MoE layers with EPLB on, in ``named_modules`` order."""
    found = []
    for name, module in model.named_modules():
        if all(callable(getattr(module, m, None)) for m in _LAYER_METHODS) and (
            getattr(module, "eplb_state", None) is not None
        ):
            found.append((name, module))
    return found


@dataclass
class EplbStepResult:
    """What one :meth:`EplbState.step` did."""

    recorded: bool
    """The pass was moved into the window (recording on, not a dummy pass)."""
    balancedness: float | None = None
    """This pass's balancedness over all layers (only when asked for)."""
    rearranged: bool = False
    """A rearrangement ran (and committed) in this step."""
    moved_experts: int = 0
    """Expert weights sent between ranks by that rearrangement."""


class EplbState:
    """Model-wide EPLB tensors, load window, rebalancing and weight movement.

    Build it with :meth:`from_model`; call :meth:`step` after every forward pass.

    Args:
        layers: the MoE layers, in model order (index = ``moe_layer_idx``).
        window_size: passes kept in the load window.
        step_interval: recorded passes between two rearrangements.
        policy: rebalancing policy name (see :func:`moe_compile.eplb.available_policies`).
        ep_group: expert-parallel process group (``None``: the layers' group, else default).
        num_groups, num_nodes: expert groups and nodes for hierarchical policies.
        transaction: ``"layer"`` or ``"model"``, see :mod:`moe_compile.eplb.weight_transfer`.
        initial_physical_to_logical: ``[L, P]`` placement the weights were loaded with
            (default: SPEC's initial layout, which ``load_logical_weights`` uses).
    """

    def __init__(
        self,
        layers: list[nn.Module],
        *,
        window_size: int = 1000,
        step_interval: int = 3000,
        policy: str = "deepseek",
        ep_group: dist.ProcessGroup | None = None,
        num_groups: int = 1,
        num_nodes: int = 1,
        transaction: str = "layer",
        initial_physical_to_logical: torch.Tensor | None = None,
    ):
        if not layers:
            raise ValueError("EplbState needs at least one MoE layer with EPLB enabled")
        for name, value in (("window_size", window_size), ("step_interval", step_interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if transaction not in TRANSACTIONS:
            raise ValueError(f"unknown transaction {transaction!r}; expected one of {TRANSACTIONS}")
        first = layers[0]
        for index, layer in enumerate(layers):
            missing = [a for a in _LAYER_ATTRIBUTES if not hasattr(layer, a)]
            missing += [m for m in _LAYER_METHODS if not callable(getattr(layer, m, None))]
            if missing or getattr(layer, "eplb_state", None) is None:
                raise ValueError(
                    f"MoE layer {index} ({type(layer).__name__}) is not an EPLB layer: "
                    f"missing {missing or ['eplb_state (EPLB off)']}"
                )
            for attribute in _LAYER_ATTRIBUTES:
                if getattr(layer, attribute) != getattr(first, attribute):
                    raise ValueError(
                        f"MoE layers disagree on {attribute}: layer 0 has "
                        f"{getattr(first, attribute)}, layer {index} has {getattr(layer, attribute)}"
                    )
        num_logical = first.num_experts
        num_physical = first.global_num_experts
        ep_size, ep_rank = first.ep_size, first.ep_rank
        if num_physical % ep_size != 0 or first.local_num_experts != num_physical // ep_size:
            raise ValueError(
                f"EPLB needs the {num_physical} physical experts split evenly over ep_size="
                f"{ep_size} ranks, but a rank holds {first.local_num_experts}"
            )
        check_rebalance_arguments(num_logical, num_physical, num_groups, num_nodes, ep_size, policy)
        slots_per_rank = num_physical // ep_size
        linear_slots = list(range(ep_rank * slots_per_rank, (ep_rank + 1) * slots_per_rank))
        for index, layer in enumerate(layers):
            local_ids = getattr(layer, "local_expert_ids", None)
            if local_ids is not None and list(local_ids) != linear_slots:
                raise ValueError(
                    f"EPLB needs linear expert placement; layer {index} on rank {ep_rank} holds "
                    f"slots {list(local_ids)}, expected {linear_slots}"
                )
        if ep_group is None:
            ep_group = getattr(first, "ep_group", None)

        self.layers = list(layers)
        self.num_layers = len(layers)
        self.num_logical_experts = num_logical
        self.num_physical_experts = num_physical
        self.max_replicas = num_physical - num_logical + 1
        self.ep_size, self.ep_rank, self.ep_group = ep_size, ep_rank, ep_group
        self.window_size, self.step_interval = window_size, step_interval
        self.policy, self.num_groups, self.num_nodes = policy, num_groups, num_nodes

        weights = first.get_expert_weights()
        device = weights[0].device if weights else torch.device("cpu")
        shape = (self.num_layers, num_physical)
        self.physical_to_logical_map = torch.empty(shape, dtype=torch.int64, device=device)
        self.logical_to_physical_map = torch.empty(
            (self.num_layers, num_logical, self.max_replicas), dtype=torch.int64, device=device
        )
        self.logical_replica_count = torch.empty(
            (self.num_layers, num_logical), dtype=torch.int64, device=device
        )
        self.expert_load_pass = torch.zeros(shape, dtype=torch.int32, device=device)
        self.expert_load_window = torch.zeros(
            (window_size, *shape), dtype=torch.int32, device=device
        )
        self.should_record_tensor = torch.ones((), dtype=torch.bool, device=device)
        self._recording = True
        self.window_index = 0  # where the next pass goes in the ring
        self.recorded_passes = 0  # passes in the window since the last rearrangement (<= W)
        self.steps_since_rearrangement = 0
        self.last_rearrangement: dict | None = None

        if initial_physical_to_logical is None:
            initial_physical_to_logical = initial_physical_to_logical_map(
                self.num_layers, num_logical, num_physical
            )
        initial = self._check_map(initial_physical_to_logical, "initial_physical_to_logical")
        for layer in range(self.num_layers):
            self._write_maps(layer, initial[layer])
        for index, layer in enumerate(self.layers):
            layer.set_eplb_state(
                index,
                self.expert_load_pass,
                self.logical_to_physical_map,
                self.logical_replica_count,
            )
            layer.eplb_state.should_record_tensor = self.should_record_tensor
        self.mover = ExpertWeightMover(
            weights, self.num_layers, ep_size, ep_rank, ep_group, transaction
        )

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        num_redundant_experts: int | None = None,
        window_size: int = 1000,
        step_interval: int = 3000,
        policy: str = "deepseek",
        ep_group: dist.ProcessGroup | None = None,
        *,
        num_groups: int = 1,
        num_nodes: int = 1,
        transaction: str = "layer",
        initial_physical_to_logical: torch.Tensor | None = None,
    ) -> EplbState:
        """Find the model's EPLB layers and wire them to a new model-wide state.

        ``num_redundant_experts`` is fixed when the layers are built; passing it here
        checks that it matches them (``None`` takes the layers' value).
        """
        layers = [module for _, module in find_moe_layers(model)]
        if not layers:
            raise ValueError(
                "the model has no MoE layer with EPLB enabled (a module with set_eplb_state, "
                "get_expert_weights and a non-None eplb_state)"
            )
        if num_redundant_experts is not None:
            for index, layer in enumerate(layers):
                has = layer.global_num_experts - layer.num_experts
                if has != num_redundant_experts:
                    raise ValueError(
                        f"num_redundant_experts={num_redundant_experts} but MoE layer {index} was "
                        f"built with {has} (global_num_experts={layer.global_num_experts}, "
                        f"num_experts={layer.num_experts})"
                    )
        return cls(
            layers,
            window_size=window_size,
            step_interval=step_interval,
            policy=policy,
            ep_group=ep_group,
            num_groups=num_groups,
            num_nodes=num_nodes,
            transaction=transaction,
            initial_physical_to_logical=initial_physical_to_logical,
        )

    # ------------------------------------------------------------------ maps

    def _check_map(self, physical_to_logical: torch.Tensor, name: str) -> torch.Tensor:
        p2l = torch.as_tensor(physical_to_logical).detach().to("cpu", torch.int64, copy=True)
        expected = (self.num_layers, self.num_physical_experts)
        if tuple(p2l.shape) != expected:
            raise ValueError(f"{name} must be {list(expected)}, got {list(p2l.shape)}")
        if int(p2l.min()) < 0 or int(p2l.max()) >= self.num_logical_experts:
            raise ValueError(
                f"{name} holds ids in [{int(p2l.min())}, {int(p2l.max())}], outside "
                f"[0, {self.num_logical_experts})"
            )
        counts = torch.zeros(self.num_layers, self.num_logical_experts, dtype=torch.int64)
        counts.scatter_add_(1, p2l, torch.ones_like(p2l))
        if bool((counts == 0).any()):
            layer, expert = (int(i) for i in torch.nonzero(counts == 0)[0])
            raise ValueError(
                f"{name} leaves logical expert {expert} of layer {layer} without a physical slot"
            )
        return p2l

    def _write_maps(self, layer: int, physical_to_logical: torch.Tensor) -> None:
        """Publish one layer's maps, in place."""
        l2p, counts = physical_to_logical_to_logical_to_physical(
            physical_to_logical[None], self.num_logical_experts, self.max_replicas
        )
        self.physical_to_logical_map[layer].copy_(physical_to_logical)
        self.logical_to_physical_map[layer].copy_(l2p[0])
        self.logical_replica_count[layer].copy_(counts[0])

    # -------------------------------------------------------------- recording

    @property
    def recording(self) -> bool:
        """Whether the layers count load (``should_record_tensor``)."""
        return self._recording

    @recording.setter
    def recording(self, on: bool) -> None:
        self._recording = bool(on)
        self.should_record_tensor.fill_(self._recording)

    @contextmanager
    def recording_paused(self) -> Iterator[None]:
        """Turn load counting off inside the block (warm-up, profiling, graph capture)."""
        before = self.recording
        self.recording = False
        try:
            yield
        finally:
            self.recording = before

    # ------------------------------------------------------------------- load

    def rank_load(self, physical_load: torch.Tensor) -> torch.Tensor:
        """``[..., L, P]`` per-slot load -> ``[..., L, ep_size]`` per-rank load."""
        return physical_load.unflatten(-1, (self.ep_size, -1)).sum(-1)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.ep_size > 1:
            dist.all_reduce(tensor, group=self.ep_group)
        return tensor

    def window_load(self) -> torch.Tensor:
        """``[L, P]`` int64: this rank's counts summed over the window."""
        return self.expert_load_window.sum(dim=0, dtype=torch.int64)

    def logical_load(self) -> torch.Tensor:
        """``[L, E]`` int64: window counts per logical expert, summed over the EP group
        (a collective when ``ep_size > 1``)."""
        physical = self.window_load()
        logical = torch.zeros(
            self.num_layers, self.num_logical_experts, dtype=torch.int64, device=physical.device
        )
        logical.scatter_add_(1, self.physical_to_logical_map, physical)
        return self._all_reduce(logical)

    def balancedness(self, physical_load: torch.Tensor | None = None) -> torch.Tensor:
        """``[L]`` float64 balancedness of ``physical_load [L, P]`` (default: the window)."""
        if physical_load is None:
            physical_load = self.window_load()
        return balancedness(self.rank_load(physical_load))

    # ------------------------------------------------------------------- step

    def step(self, *, is_dummy: bool = False, log_balancedness: bool = False) -> EplbStepResult:
        """Call once per forward pass, on every rank.

        Moves the pass's counts into the window ring and zeroes them; every
        ``step_interval`` recorded passes, rearranges. A dummy pass or a pass run
        while recording is off is dropped and does not count towards the interval.
        ``log_balancedness`` (a collective: all ranks must agree on it) all-reduces
        the pass's load and logs and returns its balancedness (mean over layers of
        each layer's mean rank load, over the same of the max rank load).
        """
        if is_dummy or not self._recording:
            self.expert_load_pass.zero_()
            return EplbStepResult(recorded=False)
        result = EplbStepResult(recorded=True)
        if log_balancedness:
            rank_load = self._all_reduce(self.rank_load(self.expert_load_pass.long()))
            total_mean = rank_load.double().mean(dim=1).sum()
            total_peak = rank_load.double().amax(dim=1).sum()
            result.balancedness = float(total_mean / total_peak) if total_peak > 0 else 1.0
            logger.info("EPLB pass balancedness %.4f", result.balancedness)
        self.expert_load_window[self.window_index].copy_(self.expert_load_pass)
        self.expert_load_pass.zero_()
        self.window_index = (self.window_index + 1) % self.window_size
        self.recorded_passes = min(self.recorded_passes + 1, self.window_size)
        self.steps_since_rearrangement += 1
        if self.steps_since_rearrangement >= self.step_interval:
            info = self.rearrange()
            result.rearranged = True
            result.moved_experts = info["moved_experts"]
        return result

    # -------------------------------------------------------------- rearrange

    def plan(self) -> torch.Tensor:
        """``[L, P]`` the policy's placement for the window's load (a collective)."""
        load = self.logical_load().cpu()
        old = self.physical_to_logical_map.to("cpu", copy=True)
        new, _, _ = rebalance(
            load,
            self.num_physical_experts,
            self.num_groups,
            self.num_nodes,
            self.ep_size,
            policy=self.policy,
            old_physical_to_logical=old,
        )
        return new

    def rearrange(
        self,
        new_physical_to_logical: torch.Tensor | None = None,
        *,
        fault_hook: FaultHook | None = None,
    ) -> dict:
        """Move to ``new_physical_to_logical [L, P]`` (default: the policy's plan).

        Collective over the EP group; every rank must pass the same map. For each
        layer, the weights are moved first and the maps are ``copy_``'d only after
        every rank's weights arrived, then that layer's window is cleared (its
        counts refer to the old slots). Raises ``EplbTransferError`` if a rank
        fails; uncommitted layers keep their old weights and maps.
        """
        old = self.physical_to_logical_map.to("cpu", copy=True)
        if new_physical_to_logical is None:
            new = self.plan()
        else:
            new = self._check_map(new_physical_to_logical, "new_physical_to_logical")
        before = self.balancedness()
        self.steps_since_rearrangement = 0

        def commit(layer: int) -> None:
            self._write_maps(layer, new[layer].to(self.physical_to_logical_map.device))
            self.expert_load_window[:, layer].zero_()

        layer_weights = [layer.get_expert_weights() for layer in self.layers]
        committed = self.mover.move(layer_weights, old, new, commit, fault_hook)
        if len(committed) == self.num_layers:
            self.window_index = 0
            self.recorded_passes = 0
        moved = int(count_moved_experts(old, new, self.ep_size).sum())
        self.last_rearrangement = {
            "moved_experts": moved,
            "balancedness_before": before.tolist(),
            "committed_layers": committed,
        }
        logger.info(
            "EPLB rearranged %d layers, %d expert weights moved between ranks",
            len(committed),
            moved,
        )
        return self.last_rearrangement
