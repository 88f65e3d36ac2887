"""Read, replace and restore the weight of a base layer, whatever stores it.

FuRA never changes the base layer during training. It needs the dense weight twice: once to
compute the block SVD (initialisation) and when merging. This module hides how the weight is
stored — a plain ``nn.Linear``, transformers' ``Conv1D`` (GPT-2 family: weight stored as ``(in, out)``,
``y = x W + b``), a bitsandbytes 4-bit ``Linear4bit`` (NF4/FP4) or an 8-bit ``Linear8bitLt`` — and keeps
the original storage so that an unmerge can put it back exactly. Everything above this module sees
the weight in PyTorch's ``(out, in)`` layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from peft.utils.integrations import dequantize_bnb_weight, gather_params_ctx
from torch import nn


def bnb_kind(layer: nn.Module) -> str | None:
    """``"4bit"`` / ``"8bit"`` for bitsandbytes linear layers, else ``None``."""
    name = type(getattr(layer, "weight", None)).__name__
    if name == "Params4bit":
        return "4bit"
    if name == "Int8Params":
        return "8bit"
    return None


def is_conv1d(layer: nn.Module) -> bool:
    """Whether ``layer`` is transformers' ``Conv1D`` (a linear layer whose weight is stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D)


def check_supported(layer: nn.Module, module_name: str) -> None:
    """FuRA adapts ``nn.Linear`` (bitsandbytes layers subclass it) and transformers' ``Conv1D``; refuse the rest."""
    if not isinstance(layer, nn.Linear) and not is_conv1d(layer):
        raise TypeError(
            f"Target module '{module_name}' of type {type(layer).__name__} is not supported: FuRA adapts "
            "torch.nn.Linear, transformers' Conv1D (GPT-2 family) and bitsandbytes Linear4bit / Linear8bitLt. "
            "Fix: leave it out of target_modules (or add it to exclude_modules)."
        )


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a supported layer."""
    if is_conv1d(layer):
        return int(layer.nf), int(layer.nx)
    return int(layer.out_features), int(layer.in_features)


def read_dense_weight(layer: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight as a dense floating tensor (dequantised for bitsandbytes).

    Plain layers return the stored tensor itself (no copy); callers must not modify it. Under
    DeepSpeed ZeRO-3 the caller wraps this in :func:`gathered`.
    """
    kind = bnb_kind(layer)
    if kind == "4bit":
        return dequantize_bnb_weight(layer.weight, state=layer.weight.quant_state)
    if kind == "8bit":
        return dequantize_bnb_weight(layer.weight, state=layer.state)
    if is_conv1d(layer):
        return layer.weight.data.T  # (in, out) storage -> (out, in) view
    return layer.weight.data


def gathered(layer: nn.Module):
    """Context manager that gathers a ZeRO-3 partitioned weight (no-op otherwise)."""
    return gather_params_ctx(layer.weight, modifier_rank=None)


@dataclass
class WeightBackup:
    """What :func:`write_dense_weight` replaced, enough to restore it bit for bit."""

    kind: str | None
    payload: Any


def write_dense_weight(layer: nn.Module, new_weight: torch.Tensor, keep_backup: bool) -> WeightBackup | None:
    """Replace the layer's weight by ``new_weight`` (re-quantised for bitsandbytes layers).

    Returns a backup of the old storage when ``keep_backup`` (a clone for plain layers, the old
    quantised parameter object for bitsandbytes layers).
    """
    kind = bnb_kind(layer)
    if kind is None:
        backup = WeightBackup(None, layer.weight.data.clone()) if keep_backup else None
        layout = new_weight.T if is_conv1d(layer) else new_weight
        layer.weight.data.copy_(layout.to(layer.weight.dtype))
        return backup
    import bitsandbytes as bnb

    old = layer.weight
    saved = (old, getattr(layer.state, "CB", None), getattr(layer.state, "SCB", None)) if kind == "8bit" else old
    if kind == "4bit":
        kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs["requires_grad"] = False
        kwargs.pop("bnb_quantized", None)
        layer.weight = bnb.nn.Params4bit(new_weight.to("cpu"), **kwargs).to(old.device)
    else:
        layer.weight = bnb.nn.Int8Params(
            new_weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)
        layer.state.reset_grads()
        layer.state.CB, layer.state.SCB = None, None  # the next forward takes them from the new weight
    return WeightBackup(kind, saved) if keep_backup else None


def read_backup_weight(layer: nn.Module, backup: WeightBackup) -> torch.Tensor:
    """The ``(out, in)`` dense weight that ``backup`` holds (the weight before :func:`write_dense_weight`)."""
    if backup.kind is None:
        return backup.payload.T if is_conv1d(layer) else backup.payload
    if backup.kind == "4bit":
        return dequantize_bnb_weight(backup.payload, state=backup.payload.quant_state)
    weight, _, scb = backup.payload  # an Int8Params keeps its int8 matrix in .data; the scales may sit in the state
    return dequantize_bnb_weight(weight, state=SimpleNamespace(SCB=scb if scb is not None else weight.SCB))


def restore_weight(layer: nn.Module, backup: WeightBackup) -> None:
    """Undo :func:`write_dense_weight` exactly."""
    if backup.kind is None:
        layer.weight.data.copy_(backup.payload)
        return
    if backup.kind == "4bit":
        layer.weight = backup.payload
        return
    # 8-bit layers move the int8 matrix and its scales from the weight into `state` on first use
    layer.weight, cb, scb = backup.payload
    layer.state.reset_grads()
    layer.state.CB, layer.state.SCB = cb, scb
