r"""Export a FuRA adapter as an (approximate) standard LoRA adapter.

For serving the exact model, merge instead: ``fura merge`` (:func:`fura.recipes.artifacts.merge_adapter`) writes a
dense Hugging Face folder that any runtime loads (``vllm serve <merged_dir>``).

**LoRA form.** FuRA's update of a linear weight is ``ΔW = W0 · blockdiag(Δ_1 … Δ_n)`` (``output_one_block``;
``blockdiag(Δᵀ) · W0`` for ``input_one_block``) with ``b × b`` blocks ``Δ_j`` of rank up to ``r`` (``b`` at the default
full rank). Its rank is bounded only by ``min(out, in, n·r)``, and after training it is full: ``min(out, in)``
(verified on a tiny model in ``tests/distributed/test_export.py``). So there is **no exact low-rank form**: a LoRA
adapter ``B·A`` equals ``ΔW`` only at rank ``min(out, in)``, i.e. as large as the weight itself.
:func:`export_lora` writes the best rank-``k`` approximation per module (truncated SVD, Eckart–Young) as a standard
PEFT LoRA adapter (``lora_alpha = r`` so the scaling is 1; modules smaller than ``k`` keep their full rank through
``rank_pattern``) and reports the relative Frobenius error ``‖ΔW − B·A‖ / ‖ΔW‖`` per module and overall. Use it where
only LoRA adapters can be served (e.g. many adapters on one vLLM base with ``--enable-lora``) and check the reported
error (and the task metric) first.

Command line (no GPU needed; the adapter is applied to its base model on the CPU)::

    fura export lora --adapter RUN_OR_ADAPTER --rank 64 -o OUT_DIR [--model BASE] [--dtype float32]
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    """``(name in the base model, layer, ΔW)`` for every FuRA layer holding ``adapter_name`` (``ΔW`` in fp32+)."""
    from fura.tuner.layer import FuraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, FuraLayer) and adapter_name in module.fura_core:
            with torch.no_grad():
                delta = module.get_delta_weight(adapter_name).detach()
            yield name.removeprefix(_PEFT_PREFIX), module, delta.to(torch.promote_types(delta.dtype, torch.float32))


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Best rank-``rank`` factors ``B (out, k)``, ``A (k, in)`` of ``delta``, its relative error and numerical rank.

    ``B = U_k·√S_k``, ``A = √S_k·V_kᵀ`` (balanced, as PiSSA-style SVD inits); the error is
    ``sqrt(Σ_{i>k} σ_i²) / sqrt(Σ σ_i²)``, computed from the discarded singular values.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    total = float(s.square().sum())
    error = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    tolerance = (s[0] if s.numel() else 0.0) * max(delta.shape) * torch.finfo(delta.dtype).eps
    return u[:, :k] * root, root[:, None] * vh[:k], error, int((s > tolerance).sum())


def _lora_config(peft_model: nn.Module, adapter_name: str, rank: int, ranks: dict[str, int]) -> Any:
    from peft import LoraConfig

    fura_config = peft_model.peft_config[adapter_name]
    if getattr(fura_config, "modules_to_save", None):
        raise ValueError(
            f"adapter '{adapter_name}' also trains whole modules ({fura_config.modules_to_save}); a LoRA adapter "
            "cannot hold them. Fix: serve the merged model instead (fura merge)."
        )
    special = {re.escape(name): r for name, r in ranks.items() if r != rank}
    return LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling alpha / r = 1: B·A is the update itself
        target_modules=sorted(ranks),
        rank_pattern=special,
        alpha_pattern=dict(special),
        lora_dropout=0.0,
        bias="none",
        task_type=fura_config.task_type,
        base_model_name_or_path=fura_config.base_model_name_or_path,
        inference_mode=True,
    )


def export_lora(
    peft_model: nn.Module,
    rank: int,
    output_dir: str | Path,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> LoraExportReport:
    """Write a standard PEFT LoRA adapter approximating a FuRA adapter (truncated SVD of each ``ΔW``); see module doc.

    Args:
        peft_model: a ``PeftModel`` holding the FuRA adapter (unmerged), on any device.
        rank: LoRA rank; each module uses ``min(rank, out, in)`` (``rank_pattern`` records the smaller ones).
        output_dir: destination folder (``adapter_config.json``, ``adapter_model.safetensors``, the report JSON),
            written atomically; a non-empty one is refused unless ``force``.
        adapter_name: which FuRA adapter to export.
        dtype: dtype of the LoRA tensors.
        force: replace a non-empty ``output_dir``.

    Returns:
        the :class:`LoraExportReport` (also written as ``lora_export_report.json``).
    """
    from safetensors.torch import save_file

    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    report = LoraExportReport(rank=rank, output_dir=str(output_dir))
    tensors: dict[str, torch.Tensor] = {}
    residual = total = 0.0
    for name, _, delta in delta_weights(peft_model, adapter_name):
        b, a, error, delta_rank = low_rank_factors(delta, rank)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous().cpu()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous().cpu()
        norm = float(torch.linalg.matrix_norm(delta))
        residual, total = residual + (error * norm) ** 2, total + norm**2
        report.ranks[name], report.delta_ranks[name], report.errors[name] = a.shape[0], delta_rank, error
    if not tensors:
        raise ValueError(f"the model holds no FuRA adapter named '{adapter_name}' to export")
    report.overall_error = math.sqrt(residual / total) if total > 0 else 0.0
    report.max_error = max(report.errors.values())
    config = _lora_config(peft_model, adapter_name, rank, report.ranks)
    with atomic_directory(output_dir, force=force) as staging:
        config.save_pretrained(str(staging))
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    logger.info("%s -> %s", report.summary(), output_dir)
    return report
