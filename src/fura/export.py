r"""Serving and export: a dense merged folder for vLLM, and an (approximate) standard LoRA adapter.

**Dense folder.** ``fura merge`` (:func:`fura.train.artifacts.merge_adapter`) already loads the base model, applies
the adapter, calls ``merge_and_unload()`` and writes a plain Hugging Face folder (+ tokenizer) atomically;
:func:`merge_to_dense` is that function under the name this module's users look for. The folder holds no FuRA code or
tensors, so any runtime loads it: ``vllm serve <merged_dir>``.

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

    python -m fura.export lora --adapter RUN_OR_ADAPTER --rank 64 -o OUT_DIR [--model BASE] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Report file written next to the exported LoRA adapter (PEFT ignores it).
REPORT_NAME = "lora_export_report.json"
_PEFT_PREFIX = "base_model.model."


def merge_to_dense(
    adapter_or_run: str | Path,
    output_dir: str | Path,
    dtype: str | torch.dtype = "auto",
    model: str | Path | None = None,
    force: bool = False,
) -> Path:
    """A dense Hugging Face folder of base + adapter, loadable by vLLM (``vllm serve OUTPUT_DIR``): ``fura merge``.

    Args:
        adapter_or_run: a FuRA (or any PEFT) adapter folder, or a run folder holding ``adapter/``.
        output_dir: destination; a non-empty folder is refused unless ``force``.
        dtype: dtype of the base weights and of the merged model (``auto``: bf16 on a GPU that has it, else fp32).
        model: the base model (default: the one recorded in the adapter config).
        force: replace a non-empty ``output_dir``.
    """
    from fura.train.artifacts import merge_adapter

    return merge_adapter(adapter_or_run, output_dir, model=model, dtype=dtype, force=force)


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
    from fura.layer import FuraLayer

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

    from fura.train.runs import atomic_directory

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


# ----------------------------------------------------------------------------------------------------------------
# Command line: python -m fura.export lora ...
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """``python -m fura.export lora --adapter ADAPTER --rank K -o OUT`` (flags as ``fura merge``)."""
    parser = argparse.ArgumentParser(prog="python -m fura.export", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    lora = commands.add_parser("lora", help="approximate a FuRA adapter by a standard LoRA adapter (truncated SVD)")
    lora.add_argument("--adapter", required=True, help="FuRA adapter folder (or a run folder holding adapter/)")
    lora.add_argument("--rank", type=int, required=True, help="LoRA rank (min(rank, out, in) per module)")
    lora.add_argument("--output", "-o", required=True, help="destination folder of the LoRA adapter")
    lora.add_argument("--model", default=None, help="base model (default: the adapter config's)")
    lora.add_argument("--dtype", default="float32", help="dtype of the base weights while exporting (default float32)")
    lora.add_argument("--adapter-name", default="default", help="adapter to export (default: default)")
    lora.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fura.export``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from fura.train.artifacts import load_for_inference
    from fura.train.runs import check_output_folder

    check_output_folder(args.output, args.force)  # fail before loading anything
    adapter = Path(args.adapter)
    if (adapter / "adapter" / "adapter_config.json").is_file():
        adapter = adapter / "adapter"
    model, tokenizer, _ = load_for_inference(args.model or adapter, adapter, args.dtype)
    report = export_lora(model, args.rank, args.output, args.adapter_name, force=args.force)
    tokenizer.save_pretrained(args.output)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
