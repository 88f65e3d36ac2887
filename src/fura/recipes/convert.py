"""``fura convert``: FuRA's block plans and parameter counts for a model, without loading any weight.

Details: ``docs/recipes/methods.md``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from fura import FuraConfig, FuraLayer
from fura.recipes.base_models import count_parameters, resolve_model_path
from fura.recipes.jsonable import jsonable
from fura.tuner.factorize import BlockPlan, HeadInfo
from fura.tuner.heads import aligned_side, head_pair

logger = logging.getLogger(__name__)


@dataclass
class ModuleGroup:
    """Modules of one type that share a shape and a block plan.

    Attributes:
        leaf: module leaf name (``q_proj``, ...).
        plan: the block plan.
        block_width: width ``d`` of the blocks on the transformed side (:meth:`fura.FuraLayer.block_layout`).
        count: number of modules.
        trainable_per_module: trainable parameters of one module's adapter.
        split: ``"head"`` when the transformed side is cut at attention-head boundaries (read from the model
            config, see :mod:`fura.tuner.heads`), else ``"-"``.
        experts: weights per module (the experts of a fused expert stack, each with this plan; 1 otherwise).
    """

    leaf: str
    plan: BlockPlan
    split: str = "-"
    experts: int = 1
    block_width: int = 0
    count: int = 0
    trainable_per_module: int = 0

    @property
    def trainable(self) -> int:
        """Trainable parameters of all modules of the group."""
        return self.count * self.trainable_per_module

    def lora(self, rank: int) -> int:
        """LoRA parameters at ``rank`` on the same modules: ``r·(in + out)`` per weight (per expert of a stack)."""
        return self.count * self.experts * rank * (self.plan.in_features + self.plan.out_features)


@dataclass
class PlanReport:
    """FuRA's plan for one model.

    Attributes:
        model: the model reference.
        architecture: the model class name.
        base_params: parameters of the base model.
        config: the FuRA settings used (``FuraConfig`` fields that shape the plan).
        groups: module groups, in model order.
        lora_ranks: LoRA ranks to compare with.
    """

    model: str
    architecture: str
    base_params: int
    config: dict[str, Any]
    groups: list[ModuleGroup] = field(default_factory=list)
    lora_ranks: Sequence[int] = (32, 64)

    @property
    def trainable(self) -> int:
        """Total FuRA trainable parameters."""
        return sum(g.trainable for g in self.groups)

    @property
    def modules(self) -> int:
        """Number of adapted modules."""
        return sum(g.count for g in self.groups)

    def lora_totals(self) -> dict[int, int]:
        """``{rank: LoRA parameters on the same modules}``."""
        return {rank: sum(g.lora(rank) for g in self.groups) for rank in self.lora_ranks}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable report."""
        return {
            "model": self.model,
            "architecture": self.architecture,
            "base_params": self.base_params,
            "config": self.config,
            "modules": self.modules,
            "trainable": self.trainable,
            "trainable_percent": 100.0 * self.trainable / self.base_params if self.base_params else None,
            "groups": [
                {
                    "module": g.leaf,
                    "count": g.count,
                    "experts": g.experts,
                    "out_features": g.plan.out_features,
                    "in_features": g.plan.in_features,
                    "m": g.plan.out_blocks,
                    "a": g.plan.out_block_size,
                    "n": g.plan.in_blocks,
                    "b": g.plan.in_block_size,
                    "rank": g.plan.rank,
                    "decomp_mode": g.plan.decomp_mode,
                    "split": g.split,
                    "trainable_per_module": g.trainable_per_module,
                    "trainable": g.trainable,
                }
                for g in self.groups
            ],
            "lora": {str(rank): total for rank, total in self.lora_totals().items()},
        }

    def format(self) -> str:
        """The report as a text table."""
        settings = ", ".join(f"{k}={v}" for k, v in self.config.items())
        header = (
            f"{'module':<12}{'count':>6}  {'weight (out x in)':<19}{'blocks m x a | n x b':<24}{'split':<7}{'rank':>6}"
        )
        header += f"{'trainable/module':>18}{'trainable':>16}"
        lines = [
            f"FuRA plan for {self.model} ({self.architecture}, {self.base_params:,} parameters)",
            f"settings: {settings}",
            "",
            header,
            "-" * len(header),
        ]
        for g in self.groups:
            p = g.plan
            blocks = f"{p.out_blocks} x {p.out_block_size} | {p.in_blocks} x {p.in_block_size}"
            shape = ("" if g.experts == 1 else f"{g.experts}x ") + f"{p.out_features} x {p.in_features}"
            lines.append(
                f"{g.leaf:<12}{g.count:>6}  {shape:<19}{blocks:<24}{g.split:<7}"
                f"{p.rank:>6}{g.trainable_per_module:>18,}{g.trainable:>16,}"
            )
        lines.append("-" * len(header))
        share = f" ({100 * self.trainable / self.base_params:.2f}% of the base model)" if self.base_params else ""
        lines.append(f"FuRA trainable parameters: {self.trainable:,} in {self.modules} modules{share}")
        for rank, total in self.lora_totals().items():
            ratio = f", {total / self.trainable:.2f}x FuRA" if self.trainable else ""
            lines.append(f"LoRA r={rank} on the same modules: {total:,}{ratio}")
        return "\n".join(lines)


def meta_model(model: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """A causal LM built from ``model``'s config on the meta device (a folder, a ``config.json``, a Hub id, smollm2)."""
    config = AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def plan_report(
    model: str,
    fura_config: Any = None,
    lora_ranks: Sequence[int] = (32, 64),
    trust_remote_code: bool = False,
    adapter_name: str = "default",
) -> PlanReport:
    """Build the :class:`PlanReport` of ``fura_config`` (default: ``FuraConfig()``) on ``model``, on the meta device."""
    fura_config = fura_config or FuraConfig()
    base = meta_model(model, trust_remote_code)
    base_params = count_parameters(base)[1]
    peft_model = get_peft_model(base, fura_config, adapter_name=adapter_name)
    return PlanReport(
        model=str(Path(str(model)).name if Path(str(model)).exists() else model),
        architecture=type(base).__name__,
        base_params=base_params,
        config=_plan_settings(fura_config),
        groups=module_groups(peft_model, adapter_name),
        lora_ranks=tuple(lora_ranks),
    )


def _split_kind(name: str, plan: BlockPlan, heads: HeadInfo | None) -> str:
    """``"head"`` if the plan's transformed side is cut at the attention heads of ``heads``, else ``"-"``."""
    side = "in" if plan.decomp_mode == "output_one_block" else "out"
    blocks = (plan.in_blocks, plan.in_block_size) if side == "in" else (plan.out_blocks, plan.out_block_size)
    dim = plan.in_features if side == "in" else plan.out_features
    return "head" if aligned_side(name) == side and head_pair(name, side, heads, dim) == blocks else "-"


def module_groups(model: torch.nn.Module, adapter_name: str = "default") -> list[ModuleGroup]:
    """The FuRA layers of ``model`` grouped by leaf name, block plan and head alignment, in model order (works on the
    meta device). A parameter target (a fused expert stack) is named by its parameter; its plan is one expert's."""
    config = getattr(model, "config", None) or getattr(getattr(model, "base_model", None), "config", None)
    heads = HeadInfo.from_model_config(config)
    groups: dict[tuple[str, BlockPlan, str], ModuleGroup] = {}
    for name, module in model.named_modules():
        if not isinstance(module, FuraLayer) or adapter_name not in module.fura_plan:
            continue
        plan = module.fura_plan[adapter_name]
        leaf = getattr(module, "parameter_name", None) or name.rsplit(".", 1)[-1]
        experts = getattr(module, "num_experts", 1) if hasattr(module, "parameter_name") else 1
        split = _split_kind(name, plan, heads)
        group = groups.setdefault(
            (leaf, plan, split),
            ModuleGroup(leaf, plan, split=split, experts=experts, block_width=module.block_layout(adapter_name)[1]),
        )
        group.count += 1
        group.trainable_per_module = count_parameters(module.fura_core[adapter_name])[0]
    return list(groups.values())


def _plan_settings(config: Any) -> dict[str, Any]:
    keys = ("decomp_mode", "rank", "s_merged_to", "factorize_by_head", "input_factorization", "target_modules")
    return jsonable({key: getattr(config, key, None) for key in keys})  # a set of targets becomes a sorted list
