"""Merged weights for an inference engine, one module at a time, without merging the model.

An RL trainer that generates with vLLM (TRL's GRPO) syncs the policy's weights to the engine at every step: TRL calls
``merge_adapter()``, reads every parameter and calls ``unmerge_adapter()``. FuRA's bit-exact unmerge keeps each merged
weight's original meanwhile — a second copy of every targeted weight. :func:`iter_merged_parameters` yields the same
tensors without touching the model: each adapted weight is merged into a fresh tensor by the code ``merge`` runs
(:meth:`fura.tuner.layer.FuraLayer.merged_weight`, computed in slices of the weight;
:meth:`fura.tuner.experts.ParamWrapper.adapted_stack` for expert stacks), so what the engine receives equals
``merge_and_unload()``'s weights bit for bit, and the extra memory does not grow with the model: one merged module
at a time when the consumer copies each tensor before asking for the next (``release``; ``benchmarks/weight_sync.py``
measures it).

Names follow TRL's convention for merged PEFT models (``base_model.model.`` and ``.base_layer`` removed, FuRA tensors
and ``modules_to_save``'s ``original_module`` skipped); the trainer applies its own vLLM renaming on top.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from fura.tuner.experts import ParamWrapper
from fura.tuner.layer import FuraLayer


def _adapters_to_merge(layer: FuraLayer) -> list[str]:
    """The adapters ``merge_adapter()`` would merge into ``layer`` (its active ones), none if it is merged already."""
    if layer.merged or layer.disable_adapters:
        return []
    return [name for name in layer.active_adapters if name in layer.fura_core]


def _merged_stack(layer: ParamWrapper, names: list[str]) -> torch.Tensor:
    current = layer.target_weight().data
    for name in names:
        current = layer.adapted_stack(current, [name])
    return current


def _adapted_parameters(model: nn.Module) -> dict[int, FuraLayer]:
    """``{id(base tensor): the FuRA layer that adapts it}``."""
    adapted = {}
    for module in model.modules():
        if isinstance(module, FuraLayer):
            adapted[id(module.target_weight())] = module
    return adapted


def iter_merged_parameters(model: nn.Module, release: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every base parameter as ``merge_and_unload()`` would leave it, one at a time.

    The model is not changed. Adapted weights are fresh tensors (merged with the active adapters); the others are the
    parameters' own data. A consumer's loop variable keeps the last tensor alive while the next one is computed, so
    two merged modules would coexist; with ``release`` each fresh tensor's memory is freed as soon as the consumer
    asks for the next pair (for consumers that copy a tensor before asking for the next, as vLLM's ``load_weights``
    does; the tensor is empty afterwards). Model parameters are never released.
    """
    adapted = _adapted_parameters(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
            if "fura_" in clean or "original_module" in clean:
                continue
            layer = adapted.get(id(param))
            names = _adapters_to_merge(layer) if layer is not None else []
            if not names:
                yield clean, param.data
                continue
            merged = _merged_stack(layer, names) if isinstance(layer, ParamWrapper) else layer.merged_weight()
            yield clean, merged
            if release:
                merged.untyped_storage().resize_(0)
            del merged  # the generator holds no merged tensor while the next one is computed
