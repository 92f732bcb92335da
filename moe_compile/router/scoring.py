"""The small pieces of routing math every router is built from.

All of them are plain PyTorch so the graph passes can find them in a traced
graph; the fused kernel reproduces them exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")


def check_scoring_func(scoring_func: str) -> None:
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"unknown scoring_func {scoring_func!r}; expected one of {SCORING_FUNCS}")


def compute_scores(router_logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Float32 expert scores ``[T, E]`` from router logits of any float dtype."""
    logits = router_logits.float()
    if scoring_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits)
    if scoring_func == "sqrtsoftplus":
        return torch.sqrt(F.softplus(logits))
    raise ValueError(f"unknown scoring_func {scoring_func!r}; expected one of {SCORING_FUNCS}")


def topk_lowest_index_on_ties(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim where equal values go to the lower index.

    ``torch.topk`` leaves the order of equal values unspecified (and the GPU
    orders them differently from the CPU); a stable descending sort does not.
    """
    sorted_values, sorted_indices = torch.sort(values, dim=-1, descending=True, stable=True)
    return sorted_values[..., :k], sorted_indices[..., :k]


def renormalize_weights(weights: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Divide each token's k weights by their sum."""
    denominator = weights.sum(dim=-1, keepdim=True)
    if scoring_func == "sqrtsoftplus":
        denominator = denominator.clamp(min=1e-20)
    return weights / denominator
