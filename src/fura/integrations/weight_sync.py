"""Weight sync to an inference engine without a second copy of the model (TRL's GRPO with vLLM).

At every weight sync TRL's ``VLLMGeneration`` calls ``model.merge_adapter()``, reads every parameter and sends it to
vLLM, then calls ``model.unmerge_adapter()``. For FuRA that merge keeps each targeted weight's original so that the
unmerge is bit-exact: the whole set of targeted weights exists twice during the sync (for Llama-3-8B about 13 GiB of
extra GPU memory, beside the trainer and a colocated vLLM).

:func:`merged_named_parameters` yields the same ``(name, tensor)`` pairs, named as TRL names them for vLLM, with each
FuRA layer's weight merged on the fly (:meth:`fura.tuner.layer.FuraLayer.merged_weight`): one module's merged weight
exists at a time, nothing in the model changes, and every tensor equals what ``merge_and_unload()`` gives, bit for
bit. In vLLM's colocate mode each merged tensor is released when the next is asked for, so at most one merged module
(plus the temporaries of its block transform) is alive. :func:`stream_fura_weights` makes a ``GRPOTrainer`` sync
that way.

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


def merged_named_parameters(model: nn.Module, release: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter TRL sends to vLLM for a PEFT ``model``, FuRA layers' weights merged one module at a time.

    Adapter tensors and the ``original_module`` of ``modules_to_save`` are skipped (as TRL skips them); a FuRA
    layer's base weight is replaced by its merged weight, computed when the consumer asks for it. Nothing in
    ``model`` changes. A consumer's loop variable keeps the last merged tensor alive while the next one is computed,
    so two modules' weights would coexist; with ``release`` the memory of each merged tensor is freed as soon as the
    consumer asks for the next pair (for consumers that copy a tensor before asking for the next, as vLLM's
    ``load_weights`` does; the tensor is empty afterwards). Model parameters are never released.
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
        if layer is None:
            yield vllm_name(name), param.data
            continue
        merged = layer.merged_weight()
        yield vllm_name(name), merged
        if release:
            merged.untyped_storage().resize_(0)


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
        # colocate: vLLM's load_weights copies each tensor before the next is asked for; the server mode's packed
        # NCCL broadcast may still read it, so there the consumer's reference decides when it is freed
        yield from merged_named_parameters(self.model, release=getattr(self, "mode", None) == "colocate")

    generation._iter_named_params = types.MethodType(_iter_named_params, generation)
    logger.info("vLLM weight sync: FuRA layers are merged one module at a time (no second copy of the model)")
    return True
