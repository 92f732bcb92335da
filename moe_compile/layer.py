"""``FusedMoE``: the Mixture-of-Experts layer users build models from.

Its forward is plain eager code (route, run experts, all-reduce across the
expert-parallel group) that ``torch.compile`` traces whole; fusion of the
routing, EPLB remapping and load counting happens later, in graph passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from moe_compile.eplb import EplbLayerState
from moe_compile.expert_map import ExpertMapManager
from moe_compile.experts import check_experts_impl
from moe_compile.experts.common import check_activation
from moe_compile.quantization import FusedMoEMethodBase, UnquantizedFusedMoEMethod
from moe_compile.router import SharedRoutedRouter, ZeroExpertRouter, create_fused_moe_router


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class FusedMoE(nn.Module):
    """A MoE layer: router, optional EPLB, stacked gated-MLP experts, expert parallelism.

    Expert weights are stacked parameters, ``w13_weight [slots, 2 * I, H]``
    (gate rows, then up rows) and ``w2_weight [slots, H, I]`` (quantization
    methods may add per-expert scales or use another layout). Slot ``s <
    local_num_experts`` holds global physical expert ``local_expert_ids[s]``.

    EPLB is on exactly when ``self.eplb_state is not None``: pass ``eplb_state=
    EplbLayerState()`` (its tensors are bound later, by :meth:`set_eplb_state` or
    ``EplbState.from_model``); then the router
    emits physical ids in ``[0, global_num_experts)`` and counts their load
    (``global_num_experts = num_experts + num_redundant_experts``). Without
    EPLB, ids are logical = global ids in ``[0, num_experts)``.

    Expert parallelism (``ep_size > 1``): every rank sees all tokens, computes
    the contributions of the experts it holds (``expert_map`` sends the other
    ids to -1) and the ranks' outputs are summed with an all-reduce over
    ``ep_group`` (the default group when None). With EPLB on, every rank counts
    the load of all tokens, so each rank's ``expert_load_view`` holds the same
    per-global-physical-expert counts.

    Shared experts fused into the MoE (``num_fused_shared_experts = n > 0``,
    shared-routed router): the router appends ``n`` columns with ids
    ``num_experts + i``. The layer holds them as ``n`` extra slots after the
    routed ones, ``[local_num_experts, local_num_experts + n)``, on every rank;
    EPLB never moves them (they are not in :meth:`get_expert_weights`). Under
    expert parallelism only rank 0 computes them, so the all-reduce counts them
    once; likewise only rank 0 adds the zero-expert router's output.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        renormalize: bool = True,
        scoring_func: str = "softmax",
        e_score_correction_bias: torch.Tensor | None = None,
        routed_scaling_factor: float = 1.0,
        use_grouped_topk: bool = False,
        num_expert_group: int | None = None,
        topk_group: int | None = None,
        custom_routing_function: Callable | None = None,
        num_fused_shared_experts: int = 0,
        zero_expert_type: str | None = None,
        num_logical_experts: int | None = None,
        routing_simulation_strategy: str | None = None,
        indices_dtype: torch.dtype | None = None,
        eplb_replica_policy: str = "token_hash",
        eplb_state: EplbLayerState | None = None,
        num_redundant_experts: int = 0,
        ep_size: int = 1,
        ep_rank: int = 0,
        ep_group: dist.ProcessGroup | None = None,
        expert_placement: str = "linear",
        quant_method: FusedMoEMethodBase | None = None,
        activation: str = "silu",
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        experts_impl: str = "grouped",
    ):
        super().__init__()
        _check_positive_int("num_experts", num_experts)
        _check_positive_int("top_k", top_k)
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("intermediate_size", intermediate_size)
        _check_positive_int("ep_size", ep_size)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts}")
        if not isinstance(num_redundant_experts, int) or num_redundant_experts < 0:
            raise ValueError(
                f"num_redundant_experts must be a non-negative int, got {num_redundant_experts!r}"
            )
        if not isinstance(num_fused_shared_experts, int) or num_fused_shared_experts < 0:
            raise ValueError(
                "num_fused_shared_experts must be a non-negative int, got "
                f"{num_fused_shared_experts!r}"
            )
        if not isinstance(ep_rank, int) or not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank must be in [0, ep_size={ep_size}), got {ep_rank!r}")
        if num_logical_experts is not None and num_logical_experts != num_experts:
            raise ValueError(
                f"num_logical_experts={num_logical_experts} must equal num_experts={num_experts} "
                "(the layer's logical experts)"
            )
        check_activation(activation)
        check_experts_impl(experts_impl)
        global_num_experts = num_experts + num_redundant_experts
        if eplb_state is not None and not isinstance(eplb_state, EplbLayerState):
            raise ValueError(
                f"eplb_state must be an EplbLayerState or None, got {type(eplb_state).__name__}"
            )
        if num_redundant_experts > 0 and eplb_state is None:
            raise ValueError(
                f"num_redundant_experts={num_redundant_experts} needs an eplb_state "
                "(redundant experts are EPLB replicas): pass eplb_state=EplbLayerState()"
            )
        if eplb_state is not None and ep_size > 1 and global_num_experts % ep_size != 0:
            raise ValueError(
                f"with EPLB, the {global_num_experts} physical experts (num_experts={num_experts} "
                f"+ num_redundant_experts={num_redundant_experts}) must divide evenly over "
                f"ep_size={ep_size}"
            )
        if eplb_state is not None and ep_size > 1 and expert_placement != "linear":
            raise ValueError(
                f"EPLB moves experts between contiguous per-rank blocks; expert_placement="
                f"{expert_placement!r} is only supported without EPLB"
            )
        if quant_method is None:
            quant_method = UnquantizedFusedMoEMethod()
        if not isinstance(quant_method, FusedMoEMethodBase):
            raise ValueError(
                f"quant_method must be a FusedMoEMethodBase, got {type(quant_method).__name__}"
            )
        if eplb_state is not None and not quant_method.supports_eplb:
            raise ValueError(
                f"quantization method {type(quant_method).__name__} ({quant_method.name!r}) "
                "does not support EPLB (supports_eplb=False); construct the layer with "
                "eplb_state=None or use another method"
            )
        if ep_size > 1 and dist.is_available() and dist.is_initialized():
            group_size = dist.get_world_size(ep_group)
            group_rank = dist.get_rank(ep_group)
            if group_size != ep_size or group_rank != ep_rank:
                raise ValueError(
                    f"ep_size={ep_size}, ep_rank={ep_rank} disagree with the process group "
                    f"(size {group_size}, this process is rank {group_rank})"
                )

        self.num_experts = num_experts
        self.num_redundant_experts = num_redundant_experts
        self.global_num_experts = global_num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.ep_group = ep_group
        self.expert_placement = expert_placement
        self.activation = activation
        self.experts_impl = experts_impl
        self.params_dtype = params_dtype
        self.num_fused_shared_experts = num_fused_shared_experts
        self.quant_method = quant_method
        self.eplb_state: EplbLayerState | None = eplb_state

        placement = ExpertMapManager(global_num_experts, ep_size, expert_placement)
        self.local_expert_ids: list[int] = placement.local_expert_ids(ep_rank)
        self.local_num_experts = len(self.local_expert_ids)
        self.register_buffer(
            "expert_map",
            placement.expert_map(ep_rank, device=device) if ep_size > 1 else None,
            persistent=False,
        )

        if isinstance(e_score_correction_bias, torch.Tensor) and not isinstance(
            e_score_correction_bias, nn.Parameter
        ):
            # A parameter (not a buffer) keeps its identity through module.to(),
            # so the router's reference stays valid after the layer moves.
            self.e_score_correction_bias = nn.Parameter(
                e_score_correction_bias.to(device=device), requires_grad=False
            )
            e_score_correction_bias = self.e_score_correction_bias
        self.router = create_fused_moe_router(
            top_k=top_k,
            global_num_experts=global_num_experts,
            eplb_state=self.eplb_state,
            renormalize=renormalize,
            scoring_func=scoring_func,
            e_score_correction_bias=e_score_correction_bias,
            routed_scaling_factor=routed_scaling_factor,
            use_grouped_topk=use_grouped_topk,
            num_expert_group=num_expert_group,
            topk_group=topk_group,
            custom_routing_function=custom_routing_function,
            num_fused_shared_experts=num_fused_shared_experts,
            zero_expert_type=zero_expert_type,
            num_logical_experts=num_experts,
            routing_simulation_strategy=routing_simulation_strategy,
            indices_dtype=indices_dtype,
            eplb_replica_policy=eplb_replica_policy,
        )
        if num_fused_shared_experts > 0 and not isinstance(self.router, SharedRoutedRouter):
            raise ValueError(
                f"num_fused_shared_experts={num_fused_shared_experts} needs the shared-routed "
                f"router, but this configuration selects {type(self.router).__name__}"
            )
        self._adds_zero_expert_output = isinstance(self.router, ZeroExpertRouter)

        self.quant_method.create_weights(
            self,
            self.local_num_experts + num_fused_shared_experts,
            hidden_size,
            intermediate_size,
            params_dtype,
            device,
        )

    # ------------------------------------------------------------------ EPLB

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: torch.Tensor,
        logical_to_physical_map: torch.Tensor,
        logical_replica_count: torch.Tensor,
    ) -> None:
        """Point this layer's EPLB state at row ``moe_layer_idx`` of the model-wide tensors."""
        if self.eplb_state is None:
            raise ValueError(
                "set_eplb_state needs EPLB; construct the layer with eplb_state=EplbLayerState()"
            )
        self.eplb_state.set_layer_state(
            moe_layer_idx, expert_load_view, logical_to_physical_map, logical_replica_count
        )

    def get_expert_weights(self) -> list[torch.Tensor]:
        """Every per-expert tensor of the local physical experts (weights, then scales),
        each a ``[local_num_experts, -1]`` view of the parameter's storage, so writing
        into a view changes the layer. Fused shared experts are not included."""
        views = []
        for name in self.quant_method.expert_weight_names():
            param = getattr(self, name).detach()
            per_expert = math.prod(param.shape[1:])
            views.append(param[: self.local_num_experts].view(self.local_num_experts, per_expert))
        return views

    def initial_physical_to_logical(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 ``[global_num_experts]``: ``[0, ..., E-1]`` then ``i % E`` for the replicas."""
        return torch.arange(self.global_num_experts, device=device) % self.num_experts

    @torch.no_grad()
    def load_logical_weights(
        self,
        w13: torch.Tensor,
        w2: torch.Tensor,
        physical_to_logical: torch.Tensor | None = None,
    ) -> None:
        """Fill this rank's slots from full logical weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]``.

        Local slot ``s`` gets logical expert ``physical_to_logical[local_expert_ids[s]]``
        (default :meth:`initial_physical_to_logical`). With fused shared experts,
        ``w13``/``w2`` carry ``E + num_fused_shared_experts`` rows, the shared ones last.
        The quantization method quantizes here.
        """
        num_sources = self.num_experts + self.num_fused_shared_experts
        if (
            w13.dim() != 3
            or w2.dim() != 3
            or w13.shape[0] != num_sources
            or w2.shape[0] != (num_sources)
        ):
            raise ValueError(
                f"load_logical_weights expects {num_sources} experts (num_experts="
                f"{self.num_experts} + num_fused_shared_experts={self.num_fused_shared_experts})"
                f" in w13 and w2, got shapes {tuple(w13.shape)} and {tuple(w2.shape)}"
            )
        if physical_to_logical is None:
            physical_to_logical = self.initial_physical_to_logical()
        physical_to_logical = torch.as_tensor(physical_to_logical).to("cpu", torch.int64)
        if tuple(physical_to_logical.shape) != (self.global_num_experts,):
            raise ValueError(
                f"physical_to_logical must be [{self.global_num_experts}], got shape "
                f"{tuple(physical_to_logical.shape)}"
            )
        if physical_to_logical.numel() and not bool(
            ((physical_to_logical >= 0) & (physical_to_logical < self.num_experts)).all()
        ):
            raise ValueError(
                f"physical_to_logical entries must be in [0, {self.num_experts}), got "
                f"{physical_to_logical.tolist()}"
            )
        sources = physical_to_logical[self.local_expert_ids].tolist() + list(
            range(self.num_experts, num_sources)
        )
        index = torch.tensor(sources, dtype=torch.long, device=w13.device)
        device = next(p for n, p in self.named_parameters() if n.startswith("w13")).device
        self.quant_method.load_weights(self, w13[index].to(device), w2[index].to(device))

    # --------------------------------------------------------------- forward

    def _local_slots(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Router ids -> slots of this rank's stacked weights; -1 where the expert is elsewhere."""
        ids = topk_ids.long()
        num_shared = self.num_fused_shared_experts
        routed = ids[:, : self.top_k] if num_shared else ids
        in_range = (routed >= 0) & (routed < self.global_num_experts)
        if self.expert_map is None:
            slots = torch.where(in_range, routed, -1)
        else:
            slots = torch.where(
                in_range, self.expert_map.long()[torch.where(in_range, routed, 0)], -1
            )
        if not num_shared:
            return slots
        if self.ep_rank == 0:
            shared = torch.arange(
                self.local_num_experts, self.local_num_experts + num_shared, device=ids.device
            )
        else:
            shared = torch.full((num_shared,), -1, dtype=torch.long, device=ids.device)
        return torch.cat([slots, shared.expand(ids.shape[0], num_shared)], dim=1)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """``hidden_states [T, H]``, ``router_logits [T, n_logits]`` -> ``[T, H]``."""
        topk_weights, topk_ids = self.router.select_experts(hidden_states, router_logits)
        slots = self._local_slots(topk_ids)
        output = self.quant_method.apply(self, hidden_states, topk_weights, slots)
        if self._adds_zero_expert_output and self.ep_rank == 0:
            output = output + self.router.zero_expert_output
        if self.ep_size > 1:
            dist.all_reduce(output, group=self.ep_group)
        return output

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, "
            f"global_num_experts={self.global_num_experts}, "
            f"local_num_experts={self.local_num_experts}, ep_size={self.ep_size}, "
            f"ep_rank={self.ep_rank}, eplb={self.eplb_state is not None}, "
            f"router={type(self.router).__name__}, quant_method={self.quant_method.name}, "
            f"activation={self.activation!r}"
        )
