"""Which base parameters an adapter reaches: the adapted share of a model, and one warning when much is left out.

A user who swaps ``LoraConfig`` for ``FuraConfig`` expects the adapter to reach the same weights. Where a model keeps
most of its parameters outside the adapted layers (the experts of an MoE left out by ``target_parameters=[]``, the
convolutions of a UNet, a ``target_modules`` list that misses the MLP), :func:`warn_unadapted` says so once, with the
share and the fix. Input / output embeddings, norms and biases are never counted as "left out": no adapter in PEFT's
default configurations reaches them.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

#: Warn when the base parameters that no adapter reaches (embeddings, norms and biases aside) exceed this share.
UNADAPTED_WARN_SHARE = 0.2


@dataclass(frozen=True)
class Coverage:
    """How much of a model's base parameters adapters reach.

    Attributes:
        total: numbers in the base model's parameters (adapter tensors excluded).
        adapted: numbers in the base weights / parameter stacks that some adapter transforms.
        left_out: numbers in matrices and stacks no adapter reaches (embeddings, norms, biases excluded).
        left_out_kinds: ``{type of the module holding them: numbers}`` of what is left out (``"Conv2d"``,
            ``"MixtralExperts"`` …).
    """

    total: int
    adapted: int
    left_out: int
    left_out_kinds: dict[str, int]

    @property
    def adapted_share(self) -> float:
        return self.adapted / self.total if self.total else 0.0

    @property
    def left_out_share(self) -> float:
        return self.left_out / self.total if self.total else 0.0


def _adapted_tensors(model: nn.Module) -> list:
    """The base tensors transformed by any PEFT tuner layer (a ``parameter_name`` target, or the layer's weight)."""
    tensors = []
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        holder = module
        while isinstance(holder, BaseTunerLayer):
            holder = holder.base_layer
        name = getattr(module, "parameter_name", None) or "weight"
        tensor = getattr(holder, name, None)
        if tensor is not None:
            tensors.append(tensor)
    return tensors


def _is_adapter_tensor(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(f".{prefix}" in f".{name}" for prefix in prefixes)


def measure(model: nn.Module, adapter_prefixes: tuple[str, ...] = ("fura_", "lora_")) -> Coverage:
    """:class:`Coverage` of a model with PEFT tuner layers (a ``PeftModel``, its ``base_model``, or the bare model)."""
    adapted_ids = {id(t) for t in _adapted_tensors(model)}
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            embeddings.update(id(p) for p in module.parameters())
    kinds: Counter[str] = Counter()
    total = adapted = 0
    seen = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or _is_adapter_tensor(f"{module_name}.{name}", adapter_prefixes):
                continue
            seen.add(id(param))
            total += param.numel()
            if id(param) in adapted_ids:
                adapted += param.numel()
            elif param.ndim >= 2 and id(param) not in embeddings and not isinstance(module, nn.Embedding):
                kinds[type(module).__name__] += param.numel()
    return Coverage(total, adapted, sum(kinds.values()), dict(kinds))


def _fix_for(kind: str) -> str:
    if kind in ("Linear", "Conv1D"):
        return "add them to target_modules (or use target_modules='all-linear')"
    if kind == "Conv2d":
        return "name them in target_modules (FuRA adapts Conv2d on its output channels)"
    if kind.startswith("Conv"):
        return f"FuRA does not adapt {kind} layers (modules_to_save trains them fully)"
    return "name them in target_parameters (e.g. ['experts.gate_up_proj', 'experts.down_proj'])"


def warn_unadapted(model: nn.Module, adapter_name: str) -> Coverage:
    """Warn once when more than :data:`UNADAPTED_WARN_SHARE` of the base parameters sit where no adapter reaches."""
    coverage = measure(model)
    if coverage.left_out_share > UNADAPTED_WARN_SHARE:
        parts = sorted(coverage.left_out_kinds.items(), key=lambda item: -item[1])
        detail = "; ".join(
            f"{kind}: {numbers / coverage.total:.0%} of the model, {_fix_for(kind)}"
            for kind, numbers in parts[:3]
            if numbers >= 0.01 * coverage.total
        )
        warnings.warn(
            f"FuRA adapter '{adapter_name}' leaves {coverage.left_out_share:.0%} of the model's parameters without an "
            f"adapter (it reaches {coverage.adapted_share:.0%}). Left out — {detail}.",
            stacklevel=4,
        )
    return coverage
