"""``FuraModel``: PEFT's tuner for FuRA — targeting, injection, batched initialisation, merging.

Everything PEFT users know works through PEFT itself (``get_peft_model``, ``PeftModel``,
``save_pretrained``, ``merge_and_unload``, several named adapters, ``modules_to_save``, FSDP
wrap policies, TRL's trainers). This class only adds what is FuRA-specific: turning the config
into a per-module :class:`~fura.tuner.factorize.BlockPlan`, and computing all block SVDs after the
modules are created, with a progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import get_pattern_key
from torch import nn
from tqdm.auto import tqdm

from fura.tuner import base_weight
from fura.tuner.config import FuraConfig
from fura.tuner.factorize import (
    ALL_PROJECTIONS,
    BlockPlan,
    FactorizationError,
    HeadInfo,
    canonical_decomp_mode,
    make_plan,
    parse_module_spec,
    spec_for_module,
)
from fura.tuner.layer import FuraLayer, FuraLinear

#: Default targets when ``target_modules`` is None: the paper adapts all seven projections.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    model_type: list(ALL_PROJECTIONS)
    for model_type in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "olmo",
        "olmo2",
        "granite",
        "cohere",
        "deepseek_v2",
        "internlm2",
        "smollm3",
    )
}

try:  # optional: silence only when PEFT exposes the error class
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError
except ImportError:  # pragma: no cover - older PEFT
    NoMatchingPeftModuleError = ValueError  # type: ignore[misc,assignment]


class FuraModel(BaseTuner):
    """Inject FuRA adapters into a model (see :class:`~fura.tuner.config.FuraConfig`)."""

    prefix: str = "fura_"
    tuner_layer_cls = FuraLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    #: seconds spent in the last batch of block decompositions (for reports and benchmarks)
    last_init_seconds: float = 0.0

    def _prepare_adapter_config(self, peft_config: FuraConfig, model_config: dict) -> FuraConfig:
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_config.get("model_type"))
            peft_config.target_modules = set(targets) if targets else "all-linear"
        return peft_config

    def _heads(self) -> HeadInfo | None:
        return HeadInfo.from_model_config(getattr(self.model, "config", None))

    def plan_for(self, config: FuraConfig, module: nn.Module, key: str) -> BlockPlan:
        """The block plan of one target module under ``config``."""
        leaf = key.rsplit(".", 1)[-1]
        rank = config.rank
        if config.rank_pattern:
            pattern = get_pattern_key(config.rank_pattern.keys(), key)
            if pattern is not None and pattern in config.rank_pattern:
                rank = config.rank_pattern[pattern]
        modes = parse_module_spec(config.decomp_mode, what="decomp_mode", value_parser=canonical_decomp_mode)
        inputs = parse_module_spec(config.input_factorization, what="input_factorization")
        outputs = parse_module_spec(config.output_factorization, what="output_factorization")
        out_features, in_features = base_weight.layer_shape(module)
        try:
            return make_plan(
                out_features,
                in_features,
                decomp_mode=spec_for_module(modes, leaf) or "output_one_block",
                rank=rank,
                input_factorization=spec_for_module(inputs, leaf),
                output_factorization=spec_for_module(outputs, leaf),
                leaf_name=leaf,
                heads=self._heads(),
                factorize_by_head=config.factorize_by_head,
                module_name=key,
            )
        except FactorizationError as exc:
            raise ValueError(str(exc)) from None

    def _create_and_replace(
        self,
        fura_config: FuraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, FuraLayer) else target
        base_weight.check_supported(base, current_key)
        plan = self.plan_for(fura_config, base, current_key)
        kwargs = {
            "s_merged_to": fura_config.s_merged_to,
            "convert_mode": fura_config.convert_mode,
            "init_weights": False,  # decompositions run batched in inject_adapter, with a progress bar
            "check_base_model": fura_config.check_base_model,
            "exact_unmerge": fura_config.exact_unmerge,
            "inference_mode": fura_config.inference_mode,
        }
        if isinstance(target, FuraLayer):
            target.update_layer(adapter_name, plan, **kwargs)
            layer = target
        else:
            layer = FuraLinear(target, adapter_name, plan, module_name=current_key, **kwargs)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)
        if fura_config.init_weights and layer.fura_core[adapter_name].weight.device.type != "meta":
            self._pending_init.append((layer, adapter_name))

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """PEFT's injection, followed by the block decompositions of every new adapter."""
        self._pending_init: list[tuple[FuraLayer, str]] = []
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except NoMatchingPeftModuleError as exc:
            raise NoMatchingPeftModuleError(f"{exc} {_linear_layer_hint(model)}") from None
        self._initialize_pending()

    def _initialize_pending(self) -> None:
        pending, self._pending_init = self._pending_init, []
        if not pending:
            return
        start = time.perf_counter()
        progress = tqdm(pending, desc="FuRA block decomposition", unit="module", disable=len(pending) < 8)
        for layer, adapter_name in progress:
            layer.reset_from_base(adapter_name, layer.fura_convert_mode[adapter_name])
        FuraModel.last_init_seconds = time.perf_counter() - start

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Swap ``child`` for ``new_module``; adapter tensors follow the base weight's device.

        Unlike PEFT's generic version this never copies a ``weight`` attribute across, so unloading
        works for ``modules_to_save`` wrappers around modules without one (e.g. a LLaVA projector).
        """
        setattr(parent, child_name, new_module)
        base = getattr(child, "base_layer", child)
        weight = getattr(base, "weight", None)
        if weight is None or not isinstance(new_module, FuraLayer):
            return
        for module in (new_module.fura_core, new_module.fura_basis):
            if not any(p.device.type == "meta" for p in module.parameters()):
                module.to(weight.device)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            # the layers are discarded right after merging: no need to keep copies for an unmerge
            for layer in self._fura_layers():
                layer._exact_unmerge = False
        return super()._unload_and_optionally_merge(merge=merge, **kwargs)

    def _fura_layers(self) -> Iterator[FuraLayer]:
        return (module for module in self.model.modules() if isinstance(module, FuraLayer))

    def verify_adapters(self, adapter_name: str | None = None) -> None:
        """Run the load checks (weights present, made from this base) on every layer now."""
        for layer in self._fura_layers():
            for name in list(layer.fura_core):
                if adapter_name in (None, name):
                    layer.verify_adapter(name)


def _linear_layer_hint(model: nn.Module) -> str:
    """Name the linear layers a user could target instead."""
    leaves = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    )
    if not leaves:
        return "The model has no nn.Linear layers, which is what FuRA adapts."
    shown = ", ".join(leaves[:20]) + (" …" if len(leaves) > 20 else "")
    return f"Fix: target some of the model's linear layers ({shown}) or use target_modules='all-linear'."
