"""The public way in: ``moe_compile.compile`` and ``inductor_options``."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch._dynamo.decorators import mark_unbacked

from .passes.manager import FusionConfig, MoEFusionPass

# The pre slot: Inductor's own post-grad patterns run between the two slots
# and rewrite softmax on the GPU (online softmax), which would hide routing.
_PASS_OPTION = "post_grad_custom_pre_pass"
_HAS_SHAPE_ID = "shape_id" in inspect.signature(mark_unbacked).parameters


def inductor_options(user_pass=None, **config: Any) -> dict[str, Any]:
    """Inductor options that install the fusion pass: ``torch.compile(m, options=...)``.

    ``config`` are :class:`FusionConfig` fields. The pass goes into
    ``post_grad_custom_pre_pass``; a pass the user already had there (given
    here, or set in Inductor's config) keeps running, after ours, and a
    ``post_grad_custom_post_pass`` is not touched.
    """
    user_pass = user_pass or torch._inductor.config.post_grad_custom_pre_pass
    if isinstance(user_pass, MoEFusionPass):
        user_pass = user_pass.user_pass
    return {_PASS_OPTION: MoEFusionPass(FusionConfig(**config), user_pass=user_pass)}


def mark_dynamic_tokens(*tensors: torch.Tensor, dim: int = 0) -> None:
    """Compile one graph for every token count, 0 and 1 included (an unbacked size).

    All tensors given share one token-count symbol where torch supports that,
    so the graph needs no check that their token counts agree.
    """
    shared = {"shape_id": "moe_compile_tokens"} if _HAS_SHAPE_ID else {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.dim() > dim:
            mark_unbacked(tensor, dim, **shared)


def _mark_tensor_args(_module, args):
    mark_dynamic_tokens(*args)


def compile_options(
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    fusion: dict[str, Any] | None = None,
    dynamic: bool | None = None,
) -> dict[str, Any]:
    """Inductor options for ``mode`` + ``options`` with the fusion pass installed.

    ``torch.compile`` takes a mode or options, not both, so the mode is
    spelled out as its options; a ``post_grad_custom_pre_pass`` already in
    ``options`` keeps running after ours.
    """
    options = dict(options or {})
    if mode is not None:
        options = {**torch._inductor.list_mode_options(mode, dynamic), **options}
    options.update(inductor_options(options.pop(_PASS_OPTION, None), **(fusion or {})))
    return options


def compile(
    model_or_fn,
    *,
    fusion: dict[str, Any] | None = None,
    dynamic_tokens: bool = True,
    **torch_compile_kwargs: Any,
):
    """``torch.compile`` with the MoE fusion pass installed.

    ``fusion`` holds :class:`FusionConfig` fields. With ``dynamic_tokens``
    the first dimension of every positional tensor argument is marked as
    the token dimension, so one graph serves every batch size. ``mode``
    ("reduce-overhead", "max-autotune", ...) and ``options`` compose with
    the pass, including a user's own custom post-grad passes.
    """
    options = compile_options(
        torch_compile_kwargs.pop("mode", None),
        torch_compile_kwargs.pop("options", None),
        fusion,
        dynamic=torch_compile_kwargs.get("dynamic"),
    )
    compiled = torch.compile(model_or_fn, options=options, **torch_compile_kwargs)
    if not dynamic_tokens:
        return compiled
    if isinstance(compiled, torch.nn.Module):
        compiled.register_forward_pre_hook(_mark_tensor_args)
        return compiled

    def run(*args, **kwargs):
        mark_dynamic_tokens(*args)
        return compiled(*args, **kwargs)

    return run
