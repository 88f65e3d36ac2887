"""``FuraModel``: PEFT's tuner for FuRA — targeting, atomic injection, block decompositions, loading checks.

Everything PEFT users know works through PEFT itself (``get_peft_model``, ``PeftModel``, ``save_pretrained``,
``merge_and_unload``, several named adapters, mixed-adapter batches, ``modules_to_save``, FSDP wrap policies, TRL's
trainers). This class adds what is FuRA-specific:

* turning the config into a per-module :class:`~fura.tuner.factorize.BlockPlan` and computing the block
  decompositions as the modules are created, with a progress bar;
* **atomic injection**: if creating the adapter fails at any module (a bad factorisation found at the 200th layer,
  an out-of-memory SVD, …) every module already replaced is put back and every layer that already had other adapters
  loses the new one, so the user's model is exactly as it was;
* ``autocast_adapter_dtype=False`` keeps the adapter in the base weight's dtype, as PEFT documents;
* ``adapter_names=[...]`` in ``forward`` / ``generate`` routes each row of a batch through its own adapter;
* loading refuses files that miss a FuRA tensor of the adapters they bring, or bring tensors this model does not have.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn
from tqdm.auto import tqdm

from fura.tuner import base_weight
from fura.tuner.config import FuraConfig
from fura.tuner.conv import FuraConv2d
from fura.tuner.coverage import warn_unadapted
from fura.tuner.experts import ParamWrapper, find_expert_parameters
from fura.tuner.factorize import (
    ALL_PROJECTIONS,
    MODULE_GROUPS,
    BlockPlan,
    FactorizationError,
    HeadInfo,
    closest_factor_pair,
    make_plan,
)
from fura.tuner.heads import head_pair
from fura.tuner.layer import BASE_ROW, FuraLayer, FuraLinear

#: Default targets when ``target_modules`` is None: the paper adapts every projection of a decoder layer.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{
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
    },
    # GPT-2 family: transformers' Conv1D layers (weight stored as (in, out)); c_proj is in both attention and MLP
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}

#: A block wider than this multiple of √(size of the transformed side) gets a warning (no good factorisation).
POOR_FACTORIZATION_RATIO = 4.0

try:  # optional: silence only when PEFT exposes the error class
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError
except ImportError:  # pragma: no cover - older PEFT
    NoMatchingPeftModuleError = ValueError  # type: ignore[misc,assignment]


class FuraAdapterFileError(ValueError):
    """A loaded adapter file does not hold exactly the FuRA tensors of the adapters it brings."""


class FuraModel(BaseTuner):
    """Inject FuRA adapters into a model (see :class:`~fura.tuner.config.FuraConfig`)."""

    prefix: str = "fura_"
    tuner_layer_cls = FuraLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: seconds spent in block decompositions by the last injection (for reports and benchmarks)
        self.decomposition_seconds = 0.0
        self._injection: _Injection | None = None
        #: requires_grad of the model's parameters before each adapter was injected (restored if its load fails)
        self._requires_grad_before: dict[str, dict[nn.Parameter, bool]] = {}
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ config → plans

    def _prepare_adapter_config(self, peft_config: FuraConfig, model_config: dict) -> FuraConfig:
        default_targets = peft_config.target_modules is None or peft_config.target_modules == "all-linear"
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_config.get("model_type"))
            peft_config.target_modules = set(targets) if targets else "all-linear"
        if peft_config.target_parameters is None:
            # the default reaches the fused expert stacks of MoE models, where LoRA's all-linear reaches the experts
            # (saved configs hold their resolved target_modules, so an adapter file made without experts loads as is)
            peft_config.target_parameters = find_expert_parameters(self.model) if default_targets else []
        return peft_config

    def _heads(self) -> HeadInfo | None:
        return HeadInfo.from_model_config(getattr(self.model, "config", None))

    def plan_for(
        self,
        config: FuraConfig,
        module: nn.Module,
        key: str,
        shape: tuple[int, int] | None = None,
        decomp_mode: str | None = None,
    ) -> BlockPlan:
        """The block plan of one target module (or, with ``shape``, one expert of a parameter target / a convolution's
        ``(C_out, C_in·kh·kw)``; ``decomp_mode`` overrides the config's, as convolutions need ``input_one_block``)."""
        leaf = key.rsplit(".", 1)[-1]
        specs = config.specs
        inputs, outputs = specs.factorizations_for(leaf)
        out_features, in_features = shape or base_weight.layer_shape(module)
        try:
            return make_plan(
                out_features,
                in_features,
                decomp_mode=decomp_mode or specs.decomp_mode_for(leaf),
                rank=specs.rank_for(key),
                input_factorization=inputs,
                output_factorization=outputs,
                leaf_name=leaf,
                heads=self._heads(),
                factorize_by_head=config.factorize_by_head,
                module_name=key,
            )
        except FactorizationError as exc:
            raise ValueError(str(exc)) from None

    # ------------------------------------------------------------------ injection

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
        parameter_name = optional_kwargs.get("parameter_name")
        base = target.get_base_layer() if isinstance(target, FuraLayer) else target
        if isinstance(base, nn.Conv2d):
            shape = FuraConv2d.conv_shape(base, current_key)
            plan = self.plan_for(fura_config, base, current_key, shape=shape, decomp_mode="input_one_block")
        elif parameter_name is None:
            base_weight.check_supported(base, current_key)
            plan = self.plan_for(fura_config, base, current_key)
        else:
            shape = ParamWrapper.expert_shape(base, parameter_name, current_key)
            plan = self.plan_for(fura_config, base, current_key, shape=shape)
        _warn_poor_factorization(plan, current_key, self._heads())
        kwargs = {
            "placement": fura_config.specs.placement(plan.decomp_mode),
            "convert_mode": fura_config.convert_mode,
            "init_weights": fura_config.init_weights,
            "decompose": not fura_config.weights_in_file,
            "check_base_model": fura_config.check_base_model,
            "exact_unmerge": fura_config.exact_unmerge,
            "inference_mode": fura_config.inference_mode,
        }
        injection = self._injection
        start = time.perf_counter()
        # a parameter's own wrapper gets the new adapter; a wrapper of another parameter of the module is nested
        extend = isinstance(target, FuraLayer) and getattr(target, "parameter_name", None) == parameter_name
        if extend:
            if injection is not None:
                injection.extended.append(target)
            target.update_layer(adapter_name, plan, **kwargs)
        else:
            # on meta (low_cpu_mem_usage) the layer only allocates; otherwise it decomposes on the weight's device
            if isinstance(base, nn.Conv2d):
                layer = FuraConv2d(target, adapter_name, plan, module_name=current_key, **kwargs)
            elif parameter_name is None:
                layer = FuraLinear(target, adapter_name, plan, module_name=current_key, **kwargs)
            else:
                layer = ParamWrapper(target, adapter_name, parameter_name, plan, module_name=current_key, **kwargs)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)
            if injection is not None:
                injection.replaced.append((parent, target_name, target))
        self.decomposition_seconds += time.perf_counter() - start
        if injection is not None:
            injection.progress.update()

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """PEFT's injection, made atomic: on any error the model is left exactly as it was."""
        config = self.peft_config[adapter_name]
        _check_spec_keys(config, model)
        self.decomposition_seconds = 0.0
        self._injection = _Injection(adapter_name, requires_grad={p: p.requires_grad for p in model.parameters()})
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except NoMatchingPeftModuleError as exc:
            self._injection.roll_back()
            raise NoMatchingPeftModuleError(f"{exc} {_linear_layer_hint(model)}") from None
        except BaseException:
            self._injection.roll_back()
            raise
        else:
            self._requires_grad_before[adapter_name] = self._injection.requires_grad
            warn_unadapted(model, adapter_name)
        finally:
            self._injection.progress.close()
            self._injection = None

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Swap ``child`` for ``new_module``; adapter tensors follow the base weight's device.

        Unlike PEFT's generic version this never copies a ``weight`` attribute across, so unloading
        works for ``modules_to_save`` wrappers around modules without one (e.g. a LLaVA projector).
        """
        setattr(parent, child_name, new_module)
        if not isinstance(new_module, FuraLayer):
            return
        weight = new_module.target_weight() if isinstance(new_module, ParamWrapper) else None
        if weight is None:
            weight = getattr(getattr(child, "base_layer", child), "weight", None)
        if weight is None:
            return
        for module in (new_module.fura_core, new_module.fura_basis):
            if not any(p.device.type == "meta" for p in module.parameters()):
                module.to(weight.device)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Adapter tensors in float32 (``autocast_adapter_dtype=True``, PEFT's default) or in the base weight's dtype.

        FuRA computes its decomposition in float32 or better, so the float32 adapter needs no upcast; with
        ``False`` each layer's adapter is stored in its base weight's floating dtype (bf16 / fp16 bases), as PEFT
        does for LoRA.
        """
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if autocast_adapter_dtype:
            return
        for layer in self._fura_layers():
            if adapter_name in layer.fura_core:
                dtype = layer.target_weight().dtype
                if dtype.is_floating_point:
                    layer.cast_adapter(adapter_name, dtype)

    # ------------------------------------------------------------------ mixed-adapter batches

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Pass ``adapter_names`` of ``forward`` / ``generate`` to every FuRA layer (and ``modules_to_save``)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names is for inference: call model.eval() first (it cannot be used in training).")
        wrapped = [layer.module_name for layer in self._fura_layers() if isinstance(layer, ParamWrapper)]
        if wrapped:
            raise ValueError(
                f"adapter_names (mixed-adapter batches) is not supported when FuRA adapts parameters directly "
                f"(target_parameters, e.g. '{wrapped[0]}'): every row would need its own copy of the expert weights. "
                "Fix: run one adapter per batch (model.set_adapter(name)), or create the adapter with "
                "target_parameters=[] to leave the experts out."
            )
        known = {name for layer in self._fura_layers() for name in layer.fura_core}
        unknown = sorted({name for name in adapter_names if name != BASE_ROW} - known)
        if unknown:
            raise ValueError(
                f"adapter_names holds unknown adapter(s) {unknown}; this model has {sorted(known)} (and '{BASE_ROW}' "
                "for the base model)."
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate repeats every row num_beams times
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        for module in self.modules():
            if isinstance(module, (FuraLayer, AuxiliaryTrainingWrapper)):
                hook = partial(_inject_adapter_names, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------ loading

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """Before any tensor is copied: the file must hold exactly the FuRA tensors of the adapters it brings.

        On a mismatch nothing is loaded, and adapters created only to receive this file (``PeftModel.from_pretrained``,
        ``load_adapter``) are removed again, so the model is left as it was before the load.
        """
        try:
            check_adapter_file(self, state_dict, prefix)
        except FuraAdapterFileError:
            for adapter in {_adapter_of_key(key) for key in state_dict} - {None}:
                self._remove_unloaded_adapter(adapter)
            raise
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def _remove_unloaded_adapter(self, adapter_name: str) -> None:
        """Remove an adapter that was created for a load and never received weights (a placeholder everywhere)."""
        layers = [layer for layer in self._fura_layers() if adapter_name in layer.fura_core]
        if not layers or not all(adapter_name in layer._unverified for layer in layers):
            return  # an adapter with weights: leave it alone
        for name, module in list(self.model.named_modules()):
            if isinstance(module, FuraLayer) and adapter_name in module.fura_core:
                if set(module.fura_core) == {adapter_name}:
                    parent_name, _, child_name = name.rpartition(".")
                    setattr(self.model.get_submodule(parent_name), child_name, module.get_base_layer())
                else:
                    _delete_from_layer(module, adapter_name)
        for param, requires_grad in self._requires_grad_before.pop(adapter_name, {}).items():
            param.requires_grad_(requires_grad)
        self.peft_config.pop(adapter_name, None)
        if not self.peft_config and getattr(self.model, "peft_config", None) is self.peft_config:
            del self.model.peft_config  # set on the user's model by PEFT's injection

    # ------------------------------------------------------------------ merging and checks

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            # the layers are discarded right after merging: no need to keep copies for an unmerge
            for layer in self._fura_layers():
                layer._keep_merge_backup = False
        return super()._unload_and_optionally_merge(merge=merge, **kwargs)

    def _fura_layers(self) -> Iterator[FuraLayer]:
        return (module for module in self.model.modules() if isinstance(module, FuraLayer))

    def verify_adapters(self, adapter_name: str | None = None) -> None:
        """Run the load checks (weights present, made from this base) on every layer now."""
        for layer in self._fura_layers():
            for name in list(layer.fura_core):
                if adapter_name in (None, name):
                    layer.verify_adapter(name)


class _Injection:
    """What one injection changed, so that a failure can undo it (see :meth:`FuraModel.inject_adapter`)."""

    def __init__(self, adapter_name: str, requires_grad: dict[nn.Parameter, bool] | None = None) -> None:
        self.adapter_name = adapter_name
        self.requires_grad = requires_grad or {}
        self.replaced: list[tuple[nn.Module, str, nn.Module]] = []
        self.extended: list[FuraLayer] = []
        # shown only when the decompositions take more than a second (large models), never for tiny ones
        self.progress = tqdm(desc="FuRA block decomposition", unit="module", delay=1.0)

    def roll_back(self) -> None:
        """Put back every replaced module, remove the adapter from layers that had others, restore trainability."""
        for parent, name, original in reversed(self.replaced):
            setattr(parent, name, original)
        for layer in self.extended:
            if self.adapter_name in layer.fura_core:
                _delete_from_layer(layer, self.adapter_name)
        for param, requires_grad in self.requires_grad.items():
            param.requires_grad_(requires_grad)


def _delete_from_layer(layer: FuraLayer, adapter_name: str) -> None:
    """Remove one adapter from a layer that keeps others (PEFT's ``delete_adapter`` plus FuRA's per-adapter state)."""
    BaseTunerLayer.delete_adapter(layer, adapter_name)
    for store in (layer.fura_plan, layer.fura_placement, layer.fura_convert_mode, layer.fura_check_base):
        store.pop(adapter_name, None)
    layer._unverified.discard(adapter_name)


def _inject_adapter_names(module: nn.Module, args: Any, kwargs: dict[str, Any], adapter_names: list[str]) -> Any:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _fura_tensor_keys(model: nn.Module, prefix: str) -> dict[str, set[str]]:
    """``{adapter: {state-dict key of each FuRA tensor}}`` of the model's current FuRA layers."""
    expected: dict[str, set[str]] = {}
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        if not isinstance(module, FuraLayer):
            continue
        for tensor_name, _ in module.named_parameters(recurse=True):
            store, _, rest = tensor_name.partition(".")
            if store in (*FuraLayer.adapter_layer_names, "fura_basis"):
                expected.setdefault(rest.split(".", 1)[0], set()).add(f"{name}.{tensor_name}")
    return expected


def _adapter_of_key(key: str) -> str | None:
    for store in ("fura_core", "fura_basis"):
        marker = f".{store}."
        if marker in key:
            return key.split(marker, 1)[1].split(".", 1)[0]
    return None


def check_adapter_file(model: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Refuse a state dict that misses a FuRA tensor of an adapter it brings, or brings tensors the model lacks.

    PEFT loads adapter files with ``strict=False`` and only warns about missing keys; a FuRA adapter missing its
    trained core (or basis) would then run a transform that is neither the trained adapter nor the base.
    """
    expected = _fura_tensor_keys(model, prefix)
    brought = {key for key in state_dict if key.startswith(prefix) and _adapter_of_key(key) is not None}
    problems = []
    for adapter, keys in sorted(expected.items()):
        if keys & brought and (missing := sorted(keys - brought)):
            problems.append(f"adapter '{adapter}' is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    extra = sorted(brought - set().union(*expected.values()))
    if extra:
        problems.append(f"the file has {len(extra)} tensor(s) this model has no place for: {', '.join(extra[:3])}")
    problems += _tensor_problems(model, state_dict, sorted(brought - set(extra)), prefix)
    if problems:
        raise FuraAdapterFileError(
            "FuRA adapter file does not match the model: "
            + "; ".join(problems)
            + ". Nothing was loaded. Fix: load the complete adapter folder written by save_pretrained, onto the base "
            "model and target modules it was made for (adapter_config.json)."
        )


def _tensor_problems(model: nn.Module, state_dict: dict[str, Any], keys: list[str], prefix: str) -> list[str]:
    """Shape, dtype and finiteness of the FuRA tensors a file brings: an integer tensor would load truncated (σ = 0,
    an adapter equal to the base) and a NaN / Inf one makes every output NaN, so both are refused, as is a tensor
    whose shape differs from the module's (an edited rank, another block plan)."""
    own = dict(model.named_parameters(prefix=prefix.rstrip(".")))
    problems = []
    for key in keys:
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor):
            continue
        if not tensor.dtype.is_floating_point:
            problems.append(f"{key} is {str(tensor.dtype).removeprefix('torch.')}, not a floating-point tensor")
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"{key} holds non-finite values (NaN or Inf)")
        elif key in own and tuple(own[key].shape) != tuple(tensor.shape):
            problems.append(f"{key} has shape {tuple(tensor.shape)}, the module needs {tuple(own[key].shape)}")
    return problems[:3] + ([f"and {len(problems) - 3} more"] if len(problems) > 3 else [])


def _check_spec_keys(config: FuraConfig, model: nn.Module) -> None:
    """Per-module dict keys (decomp_mode, input/output_factorization) must name a group or a module of the model."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    leaves |= {name.rsplit(".", 1)[-1] for name, param in model.named_parameters() if param.ndim == 3}  # expert stacks
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)})
    valid = [*MODULE_GROUPS, "mlp_up_gate", "upgate", "up_gate"]
    for field_name in ("decomp_mode", "input_factorization", "output_factorization"):
        spec = getattr(config.specs, field_name)
        if not isinstance(spec, dict):
            continue
        unknown = sorted(set(spec) - set(valid) - leaves)
        if unknown:
            shown = ", ".join(sorted(MODULE_GROUPS)) + " or a module name such as " + ", ".join(linear[:12])
            raise ValueError(
                f"FuraConfig.{field_name}: key(s) {unknown} match no group and no module of this model. Valid keys: "
                f"{shown}."
            )


def _is_linear(module: nn.Module) -> bool:
    try:
        base_weight.check_supported(module, "")
    except TypeError:
        return False
    return True


def _warn_poor_factorization(plan: BlockPlan, module_name: str, heads: HeadInfo | None = None) -> None:
    """Warn when a layer's plan is costly, naming the cause.

    FuRA trains ``size · (r + 1)`` numbers on the transformed side (``size`` features, rank ``r <= b`` for blocks of
    width ``b``). Two things make that large: the plan trains as many numbers as the weight holds (the other side is
    narrower than the block: a 16-input layer with 4 outputs), or the blocks are far wider than ``√size`` — because
    ``size`` has no divisor near its square root (a prime), or because the split was chosen that way (attention heads,
    an explicit factorisation).
    """
    input_side = plan.decomp_mode == "output_one_block"
    side, size, blocks, block = (
        ("input", plan.in_features, plan.in_blocks, plan.in_block_size)
        if input_side
        else ("output", plan.out_features, plan.out_blocks, plan.out_block_size)
    )
    other_side, other = ("output", plan.out_features) if input_side else ("input", plan.in_features)
    trainable = (plan.right_core_numel if input_side else plan.left_core_numel) + plan.singular_values_numel
    weight = plan.out_features * plan.in_features
    causes = []
    if trainable >= weight:
        causes.append(
            f"the plan trains {trainable:,} numbers for a weight of {weight:,} ({trainable / weight:.0%}): each of the "
            f"{size} {side} features gets rank + 1 = {plan.rank + 1} trained numbers, but the weight holds only "
            f"{other} per {side} feature ({other_side}_features = {other})"
        )
    if block > POOR_FACTORIZATION_RATIO * math.sqrt(size):
        if closest_factor_pair(size) == (blocks, block):
            causes.append(
                f"{side}_features = {size} has no block split near its square root, so its blocks are {blocks} x "
                f"{block} and it trains {trainable:,} numbers"
            )
        else:
            aligned = head_pair(module_name, "in" if input_side else "out", heads, size) == (blocks, block)
            why = "the attention heads" if aligned else "the configured factorisation"
            causes.append(
                f"its {side} is split into {blocks} block(s) of {block} following {why}, far from √{size} ≈ "
                f"{math.sqrt(size):.0f}, so it trains {trainable:,} numbers"
            )
    if causes:
        warnings.warn(
            f"FuRA module '{module_name}' ({plan.out_features}x{plan.in_features}): plan {plan.describe()}; "
            + "; ".join(causes)
            + f". Fix: give this module a smaller int rank (rank_pattern), choose another block split with "
            f"{side}_factorization, or leave it out (exclude_modules).",
            stacklevel=2,
        )


def _linear_layer_hint(model: nn.Module) -> str:
    """Name the linear layers a user could target instead."""
    leaves = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    )
    if not leaves:
        return (
            "No layer types compatible with FuRA were found: the model has no nn.Linear (or transformers Conv1D) "
            "layers, which is what FuRA adapts."
        )
    shown = ", ".join(leaves[:20]) + (" …" if len(leaves) > 20 else "")
    return f"Fix: target some of the model's linear layers ({shown}) or use target_modules='all-linear'."
