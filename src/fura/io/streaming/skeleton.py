"""The model without its weights: the meta skeleton, the checkpoint's names and dtype, and layer groups."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fura.io.safetensors_stream import CheckpointReader


def load_model_config(model_dir: str | os.PathLike) -> Any:
    """The transformers config of a local model folder (``config.json``)."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json. Fix: point at a Hugging Face model folder.")
    return AutoConfig.from_pretrained(str(path))


def build_skeleton(model_config: Any, dtype: torch.dtype) -> nn.Module:
    """``AutoModelForCausalLM`` with every parameter on the meta device (no storage), in ``dtype``.

    Buffers stay real (``init_empty_weights(include_buffers=False)``): the rotary ``inv_freq`` is
    non-persistent, so a checkpoint cannot restore it, and it is tiny.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype)


def checkpoint_dtype(reader: CheckpointReader) -> torch.dtype:
    """The dtype of most floating tensors of the checkpoint (the dtype the model is stored in)."""
    counts: dict[torch.dtype, int] = {}
    for info in reader.tensors.values():
        if info.spec.dtype.is_floating_point:
            counts[info.spec.dtype] = counts.get(info.spec.dtype, 0) + info.nbytes
    if not counts:
        raise ValueError(f"{reader.model_dir}: the checkpoint holds no floating-point tensors")
    return max(counts, key=counts.get)


class KeyMap:
    """Model state-dict names ↔ checkpoint names (equal, or differing by the base-model prefix)."""

    def __init__(self, reader: CheckpointReader, model: nn.Module) -> None:
        self.reader = reader
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    def checkpoint_name(self, name: str) -> str | None:
        """The checkpoint key holding the model tensor ``name``, or ``None``."""
        candidates = [name]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(name[len(self.prefix) + 1 :])
        elif self.prefix:
            candidates.append(f"{self.prefix}.{name}")
        return next((key for key in candidates if key in self.reader), None)

    def require(self, name: str) -> str:
        key = self.checkpoint_name(name)
        if key is None:
            raise KeyError(
                f"{self.reader.model_dir}: the checkpoint has no tensor for '{name}'. The config.json and the "
                "weights do not describe the same model (or the checkpoint uses renamed keys)."
            )
        return key


def layer_group(name: str) -> str:
    """The layer a module belongs to: the name up to its first numeric component.

    ``model.layers.3.self_attn.q_proj`` → ``model.layers.3``; a name without a numbered
    component (``lm_head``) is its own group.
    """
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return name


def grouped(names: Iterable[str]) -> dict[str, list[str]]:
    """``names`` by :func:`layer_group`, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_group(name), []).append(name)
    return groups
