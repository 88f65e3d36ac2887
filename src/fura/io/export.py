r"""Export a FuRA adapter as an (approximate) standard LoRA adapter.

For serving the exact model, merge instead: ``fura merge`` (:func:`fura.recipes.artifacts.merge_adapter`) writes a
dense Hugging Face folder that any runtime loads (``vllm serve <merged_dir>``).

**LoRA form.** FuRA's update of a linear weight is ``ΔW = W0 · blockdiag(Δ_1 … Δ_n)`` (``output_one_block``;
``blockdiag(Δᵀ) · W0`` for ``input_one_block``) with ``b × b`` blocks ``Δ_j`` of rank up to ``r`` (``b`` at the default
full rank). Its rank is bounded only by ``min(out, in, n·r)``, and after training it is full: ``min(out, in)``
(``tests/io/test_export.py``). So there is **no exact low-rank form**: a LoRA adapter ``B·A`` equals ``ΔW`` only at
rank ``min(out, in)``, i.e. as large as the weight itself.

The conversion is PEFT's own (``peft.convert_to_lora``, through FuRA's ``get_additive_delta``): the best rank-``k``
approximation per module (truncated SVD, Eckart–Young) with the scaling folded in (``lora_alpha = r``), and
``modules_to_save`` carried over. :func:`export_lora` adds what a user needs around it: the relative Frobenius error
``‖ΔW − B·A‖ / ‖ΔW‖`` per module and overall, and the numerical rank of each ``ΔW``, in a report beside the adapter;
an atomic write; and a clear error for a rank larger than a module. Use it where only LoRA adapters can be served
(e.g. many adapters on one vLLM base with ``--enable-lora``) and check the reported error (and the task metric) first.

Command line (no GPU needed; the adapter is applied to its base model on the CPU)::

    fura export lora --adapter RUN_OR_ADAPTER --rank 64 -o OUT_DIR [--model BASE] [--dtype float32]
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fura.io.files import atomic_directory

logger = logging.getLogger(__name__)

#: Report file written next to the exported LoRA adapter (PEFT ignores it).
REPORT_NAME = "lora_export_report.json"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraExportReport:
    """What :func:`export_lora` wrote and how far it is from the FuRA update.

    Attributes:
        rank: the requested rank.
        output_dir: the LoRA adapter folder.
        ranks: rank used per module (``min(rank, out, in)``), keyed by module name in the base model.
        delta_ranks: numerical rank of each module's ``ΔW`` (``min(out, in)`` means no exact low-rank form).
        errors: relative Frobenius error ``‖ΔW − B·A‖_F / ‖ΔW‖_F`` per module (0 for a zero update).
        overall_error: ``sqrt(Σ‖ΔW − B·A‖²) / sqrt(Σ‖ΔW‖²)`` over all modules.
        max_error: the largest per-module error.
    """

    rank: int
    output_dir: str
    ranks: dict[str, int] = field(default_factory=dict)
    delta_ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    overall_error: float = 0.0
    max_error: float = 0.0

    def summary(self) -> str:
        """One line for logs and the command line."""
        full = sum(self.delta_ranks[name] == self.ranks[name] for name in self.ranks)
        return (
            f"LoRA rank {self.rank} on {len(self.ranks)} modules: relative Frobenius error {self.overall_error:.3e} "
            f"overall, {self.max_error:.3e} at worst; {full} module(s) exported at the full rank of their update"
        )


def delta_weights(
    peft_model: nn.Module, adapter_name: str = "default"
) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
    """``(name in the base model, layer, ΔW)`` for every FuRA layer holding ``adapter_name`` (``ΔW: (out, in)`` in
    fp32 or wider)."""
    from fura.tuner.layer import FuraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, FuraLayer) and adapter_name in module.fura_core:
            with torch.no_grad():
                delta = module.get_delta_weight(adapter_name).detach()
            yield name.removeprefix(_PEFT_PREFIX), module, delta.to(torch.promote_types(delta.dtype, torch.float32))


def numerical_rank(delta: torch.Tensor) -> int:
    """Number of singular values of ``delta`` above ``σ_max · max(shape) · eps`` (NumPy's ``matrix_rank`` rule)."""
    s = torch.linalg.svdvals(delta)
    tolerance = (s[0] if s.numel() else 0.0) * max(delta.shape) * torch.finfo(delta.dtype).eps
    return int((s > tolerance).sum())


def _check_rank(peft_model: nn.Module, adapter_name: str, rank: int) -> None:
    """Refuse a rank PEFT's conversion cannot give (< 1, or above a module's ``min(out, in)``), naming the module."""
    from fura.tuner.layer import FuraLayer

    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    sizes = {
        name.removeprefix(_PEFT_PREFIX): (module.out_features, module.in_features)
        for name, module in peft_model.named_modules()
        if isinstance(module, FuraLayer) and adapter_name in module.fura_core
    }
    if not sizes:
        raise ValueError(f"the model holds no FuRA adapter named '{adapter_name}' to export")
    name, shape = min(sizes.items(), key=lambda item: min(item[1]))
    if rank > min(shape):
        raise ValueError(
            f"rank {rank} is larger than module '{name}' ({shape[0]}x{shape[1]}) allows: a LoRA adapter of it has "
            f"rank at most {min(shape)}. Fix: --rank {min(shape)} or less (at that rank the export of the smallest "
            "modules is exact); for the exact model at any size, merge instead (fura merge)."
        )


def _measure(peft_model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], report: LoraExportReport):
    """Fill ``report`` with each module's rank, ``ΔW``'s numerical rank and the error of ``B·A`` against ``ΔW``."""
    residual = total = 0.0
    for name, _, delta in delta_weights(peft_model, adapter_name):
        a = tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"].to(delta)
        b = tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"].to(delta)
        norm, gap = float(torch.linalg.matrix_norm(delta)), float(torch.linalg.matrix_norm(delta - b @ a))
        residual, total = residual + gap**2, total + norm**2
        report.ranks[name], report.delta_ranks[name] = a.shape[0], numerical_rank(delta)
        report.errors[name] = gap / norm if norm > 0 else 0.0
    report.overall_error = math.sqrt(residual / total) if total > 0 else 0.0
    report.max_error = max(report.errors.values())


def export_lora(
    peft_model: nn.Module,
    rank: int,
    output_dir: str | Path,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> LoraExportReport:
    """Write a standard PEFT LoRA adapter approximating a FuRA adapter (``peft.convert_to_lora``); see module doc.

    Args:
        peft_model: a ``PeftModel`` holding the FuRA adapter (unmerged), on any device.
        rank: LoRA rank, at most the smallest ``min(out, in)`` of the adapted modules.
        output_dir: destination folder (``adapter_config.json``, ``adapter_model.safetensors``, the report JSON),
            written atomically; a non-empty one is refused unless ``force``.
        adapter_name: which FuRA adapter to export.
        dtype: dtype of the LoRA tensors.
        force: replace a non-empty ``output_dir``.

    Returns:
        the :class:`LoraExportReport` (also written as ``lora_export_report.json``).
    """
    from peft import convert_to_lora
    from safetensors.torch import save_file

    _check_rank(peft_model, adapter_name, rank)
    config, tensors = convert_to_lora(peft_model, rank, adapter_name=adapter_name)
    config.base_model_name_or_path = peft_model.peft_config[adapter_name].base_model_name_or_path
    config.task_type = peft_model.peft_config[adapter_name].task_type
    config.inference_mode = True
    report = LoraExportReport(rank=rank, output_dir=str(output_dir))
    _measure(peft_model, adapter_name, tensors, report)
    tensors = {key: value.to(dtype).contiguous().cpu() for key, value in tensors.items()}
    with atomic_directory(output_dir, force=force) as staging:
        config.save_pretrained(str(staging))
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    logger.info("%s -> %s", report.summary(), output_dir)
    return report
