"""TRL's vLLM weight sync for FuRA models without a second copy of the targeted weights.

TRL 1.16's ``GRPOTrainer`` syncs the policy to vLLM through ``VLLMGeneration.sync_weights``, which reads the weights
from ``VLLMGeneration._iter_named_params``: for a PEFT model that method calls ``merge_adapter()``, yields every
parameter and calls ``unmerge_adapter()`` — with FuRA's bit-exact unmerge, a copy of every targeted weight is held for
the whole sync. :class:`FuraVLLMGeneration` overrides only that iterator: for a model with FuRA layers (outside FSDP
and DeepSpeed ZeRO-3, where TRL's gathered merge stays in charge) it yields
:func:`fura.integrations.weight_sync.iter_merged_parameters` under the names TRL gives them, so vLLM receives exactly
``merge_and_unload()``'s weights, module by module, and the trained weights are never written.

TRL builds its ``VLLMGeneration`` inside ``GRPOTrainer.__init__`` and offers no factory hook, so
:func:`enable_memory_light_sync` re-classes that one instance (the subclass adds no state); ``fura train grpo
--use_vllm`` does it for its trainer, and a TRL user calls it once after building a ``GRPOTrainer`` with a
``FuraConfig``.
"""

from __future__ import annotations

from typing import Any

from fura.integrations.weight_sync import iter_merged_parameters
from fura.tuner.layer import FuraLayer

_CLASS: type | None = None


def fura_vllm_generation_class() -> type:
    """``FuraVLLMGeneration``, a subclass of TRL's ``VLLMGeneration`` (created on first use: TRL is optional)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from trl.generation.vllm_generation import VLLMGeneration

    class FuraVLLMGeneration(VLLMGeneration):
        """TRL's vLLM generation, syncing FuRA models module by module (see :mod:`fura.integrations.trl_sync`)."""

        def _iter_named_params(self):
            model = self.model
            sharded = self._dist.is_fsdp or self._dist.is_zero3
            if sharded or not any(isinstance(module, FuraLayer) for module in model.modules()):
                yield from super()._iter_named_params()
                return
            # colocate: vLLM's load_weights copies each tensor before the next is asked for, so each merged module is
            # released then; the server mode's packed NCCL broadcast may still read it, so there it lives on until the
            # consumer drops it
            for name, tensor in iter_merged_parameters(model, release=self.mode == "colocate"):
                yield self._fix_param_name_to_vllm(name, extra_prefixes=["modules_to_save.default."]), tensor

    _CLASS = FuraVLLMGeneration
    return _CLASS


def enable_memory_light_sync(trainer: Any) -> bool:
    """Make ``trainer``'s vLLM weight sync memory-light for FuRA; ``False`` when it does not generate with vLLM."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None:
        return False
    cls = fura_vllm_generation_class()
    if not isinstance(generation, cls):
        generation.__class__ = cls
    return True
