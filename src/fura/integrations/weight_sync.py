"""Weight sync to an inference engine without a second copy of the model (TRL's GRPO with vLLM).

At every weight sync TRL's ``VLLMGeneration`` calls ``model.merge_adapter()``, reads every parameter and sends it to
vLLM, then calls ``model.unmerge_adapter()``. For FuRA that merge keeps each targeted weight's original so that the
unmerge is bit-exact: the whole set of targeted weights exists twice during the sync (for Llama-3-8B about 13 GiB of
extra GPU memory, beside the trainer and a colocated vLLM).

:func:`merged_named_parameters` yields the same ``(name, tensor)`` pairs, named as TRL names them for vLLM, with each
FuRA layer's weight merged on the fly (:meth:`fura.tuner.layer.FuraLayer.merged_weight`): one module's merged weight
exists at a time, nothing in the model changes, and every tensor equals what ``merge_and_unload()`` gives, bit for
bit. :func:`stream_fura_weights` makes a ``GRPOTrainer`` sync that way.

Why this mechanism: TRL has no documented hook for the sync, and no merge can be both memory-light and exactly
undone (an in-place merge loses the original weight in floating point; keeping it is the second copy). The sync's
one generator of parameters, ``VLLMGeneration._iter_named_params``, is the narrowest place to change: the trainer,
vLLM's side and every other path stay TRL's. Under FSDP or DeepSpeed ZeRO-3 (where TRL gathers the sharded model
first) the trainer keeps TRL's own path.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fura.tuner.layer import FuraLayer

logger = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."


def vllm_name(name: str) -> str:
    """A PEFT model's parameter name as vLLM knows it (TRL's renaming): no PEFT prefix, no ``.base_layer``, no
    ``modules_to_save.default.``."""
    name = name.removeprefix(_PEFT_PREFIX).replace(".base_layer", "")
    return name.replace("_checkpoint_wrapped_module.", "").replace("modules_to_save.default.", "")


def merged_named_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter TRL sends to vLLM for a PEFT ``model``, FuRA layers' weights merged one module at a time.

    Adapter tensors and the ``original_module`` of ``modules_to_save`` are skipped (as TRL skips them); a FuRA
    layer's base weight is replaced by its merged weight, computed when the consumer asks for it and dropped when it
    moves on. Nothing in ``model`` changes.
    """
    weights = {
        id(layer.get_base_layer().weight): layer
        for layer in model.modules()
        if isinstance(layer, FuraLayer) and not layer.disable_adapters
    }
    prefix = getattr(model, "prefix", "fura_")
    for name, param in model.named_parameters():
        if prefix in name or "original_module" in name:
            continue
        layer = weights.get(id(param))
        yield vllm_name(name), (layer.merged_weight() if layer is not None else param.data)


def _fura_layers(model: nn.Module) -> bool:
    return any(isinstance(module, FuraLayer) for module in model.modules())


def stream_fura_weights(trainer: Any) -> bool:
    """Make ``trainer`` (TRL's ``GRPOTrainer`` with ``use_vllm``) sync a FuRA model through
    :func:`merged_named_parameters` instead of merging it. Returns whether it did (no vLLM, no FuRA layer, a TRL
    without ``VLLMGeneration``, FSDP or ZeRO-3: TRL's own path stays, and this says why in the log)."""
    generation = getattr(trainer, "vllm_generation", None)
    model = getattr(generation, "model", None)
    if generation is None or model is None or not _fura_layers(model):
        return False
    if not hasattr(generation, "_iter_named_params"):
        logger.warning("this TRL's vLLM sync has no _iter_named_params: FuRA weights are synced by TRL's merge")
        return False
    original = generation._iter_named_params

    def _iter_named_params(self: Any) -> Iterator[tuple[str, torch.Tensor]]:
        dist = getattr(self, "_dist", None)
        if dist is not None and (dist.is_fsdp or dist.is_zero3):
            yield from original()
            return
        yield from merged_named_parameters(self.model)

    generation._iter_named_params = types.MethodType(_iter_named_params, generation)
    logger.info("vLLM weight sync: FuRA layers are merged one module at a time (no second copy of the model)")
    return True
