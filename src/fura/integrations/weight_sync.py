"""Merged weights for an inference engine, one module at a time, without merging the model.

An RL trainer that generates with vLLM (TRL's GRPO) syncs the policy's weights to the engine at every step: TRL calls
``merge_adapter()``, reads every parameter and calls ``unmerge_adapter()``. FuRA's bit-exact unmerge keeps each merged
weight's original meanwhile — a second copy of every targeted weight. :func:`iter_merged_parameters` yields the same
tensors without touching the model: each adapted weight is merged into a fresh tensor with the layer's own merge
arithmetic (:meth:`fura.FuraLayer._merged_weight` / :meth:`fura.tuner.experts.ParamWrapper.adapted_stack`, adapter by
adapter, cast to the weight's dtype in between, exactly as ``merge`` writes it), so what the engine receives equals
``merge_and_unload()``'s weights bit for bit, and the extra memory does not grow with the model: one merged tensor
at a time (the engine's ``load_weights`` copies it before the next is made), computed block slice by block slice
(``benchmarks/weight_sync.py`` measures the peak: 459 MiB on a 4-layer Llama-3-8B-shaped stack whose largest module
is 112 MiB, against 2,280 MiB for merge / unmerge).

Names follow TRL's convention for merged PEFT models (``base_model.model.`` and ``.base_layer`` removed, FuRA tensors
and ``modules_to_save``'s ``original_module`` skipped); the trainer applies its own vLLM renaming on top.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from fura.tuner import base_weight
from fura.tuner.experts import ParamWrapper
from fura.tuner.layer import FuraLayer

#: A module is merged this many block slices at a time (the float32 temporaries cover one slice).
SLICES = 16


def _adapters_to_merge(layer: FuraLayer) -> list[str]:
    """The adapters ``merge_adapter()`` would merge into ``layer`` (its active ones), none if it is merged already."""
    if layer.merged or layer.disable_adapters:
        return []
    return [name for name in layer.active_adapters if name in layer.fura_core]


def _merged_linear(layer: FuraLayer, names: list[str]) -> torch.Tensor:
    """The weight ``merge`` would write into a linear / conv layer, in the stored layout and dtype."""
    base = layer.get_base_layer()
    if base_weight.bnb_kind(base) is not None:
        raise NotImplementedError(
            f"FuRA module '{layer.module_name}': merged weights of a bitsandbytes base are re-quantised by merge; "
            "sync a dequantised copy instead (merge_and_unload on a full-precision base)."
        )
    if len(names) == 1:
        return _merged_in_slices(layer, names[0])
    current = base_weight.read_dense_weight(base)  # (out, in), a view of the stored weight
    for name in names:  # merge writes each adapter's result in the weight's dtype before the next one reads it
        current = layer._merged_weight(name, current).to(base.weight.dtype)
    return current.T.contiguous() if base_weight.is_conv1d(base) else current


def _merged_in_slices(layer: FuraLayer, name: str) -> torch.Tensor:
    """``FuraLayer._merged_weight`` of one adapter, cast to the stored dtype, computed :data:`SLICES` block slices
    at a time straight into a tensor of the stored layout: the float32 temporaries cover one slice, not the module.

    Each slice runs the same operations on the same blocks as the whole-module merge (the blocks are independent), so
    the result is the same tensor (checked bit for bit against ``merge_and_unload`` in the tests).
    """
    base = layer.get_base_layer()
    stored = base.weight
    weight = base_weight.read_dense_weight(base)  # (out, in) view (C_out, C_in, kh, kw) for a convolution
    result = torch.empty(stored.shape, dtype=stored.dtype, device=stored.device)
    target = result.T if base_weight.is_conv1d(base) else result
    delta = layer.delta_blocks(name).detach()
    blocks, width, _ = layer.block_layout(name)
    step = max(1, -(-blocks // SLICES))
    for first in range(0, blocks, step):
        last = min(first + step, blocks)
        part = delta[first:last]
        if layer.side(name) == "input":
            columns = slice(first * width, last * width)
            work = weight[:, columns].to(delta.dtype).reshape(weight.shape[0], last - first, width)
            merged = (work + torch.einsum("okd,kde->oke", work, part)).reshape(weight.shape[0], -1)
            target[:, columns] = merged.to(stored.dtype)
        else:
            rows = slice(first * width, last * width)
            work = weight[rows].to(delta.dtype).reshape(last - first, width, -1)
            merged = work + torch.bmm(part.transpose(1, 2), work)
            target[rows] = merged.reshape(target[rows].shape).to(stored.dtype)
    return result


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


def iter_merged_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every base parameter as ``merge_and_unload()`` would leave it, one at a time.

    The model is not changed. Adapted weights are fresh tensors (merged with the active adapters); the others are the
    parameters' own data.
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
            elif isinstance(layer, ParamWrapper):
                yield clean, _merged_stack(layer, names)
            else:
                yield clean, _merged_linear(layer, names)
