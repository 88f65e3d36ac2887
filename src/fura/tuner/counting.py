"""``print_trainable_parameters()`` counts what LoRA counts: FuRA's frozen block bases are not model parameters.

FuRA stores the frozen block basis ``V`` and singular values ``σ`` of each adapted weight as frozen ``nn.Parameter`` s
(so that code copying adapters parameter by parameter carries them). PEFT's ``get_nb_trainable_parameters`` counts every
parameter, so "all params" would be the base model plus these frozen tensors, where LoRA's is the base model plus its
trainable adapter — and FuRA's trainable share would look smaller than it is. PEFT 0.22 offers no per-tuner hook there
(it special-cases only DeepSpeed's ``ds_numel`` and bitsandbytes' ``Params4bit``), so :func:`install` wraps
``PeftModel.get_nb_trainable_parameters`` (and ``PeftMixedModel``'s) once to leave FuRA's frozen tensors out; models
without FuRA layers are counted exactly as before.
"""

from __future__ import annotations

from functools import wraps

from torch import nn

_MARKER = "_fura_skips_frozen_basis"


def frozen_basis_numel(model: nn.Module) -> int:
    """Numbers held in the frozen FuRA bases / singular values of ``model`` (adapter state, not model weights)."""
    from fura.tuner.layer import FuraBasis

    return sum(p.numel() for m in model.modules() if isinstance(m, FuraBasis) for p in m.parameters(recurse=False))


def _wrap(cls: type) -> None:
    original = cls.get_nb_trainable_parameters
    if getattr(original, _MARKER, False):
        return

    @wraps(original)
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = original(self)
        return trainable, total - frozen_basis_numel(self)

    setattr(get_nb_trainable_parameters, _MARKER, True)
    cls.get_nb_trainable_parameters = get_nb_trainable_parameters


def install() -> None:
    """Make PEFT's parameter counts leave FuRA's frozen bases out (idempotent)."""
    from peft import PeftMixedModel, PeftModel

    for cls in (PeftModel, PeftMixedModel):
        _wrap(cls)
