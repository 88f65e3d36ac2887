"""Trained artifacts: save them, turn explicit layers into dense weights, load them back, merge adapters.

Details: ``docs/recipes/methods.md``."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, PeftType
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import fura
from fura.integrations import distributed
from fura.io.files import atomic_directory, check_output_folder
from fura.io.ownership import check_output_is_not_an_input, locked_output
from fura.io.safetensors_stream import check_file
from fura.recipes.base_models import model_dtype, resolve_dtype, resolve_model_path
from fura.recipes.divergence import check_finite
from fura.recipes.loading import MethodInfo, quantization_config
from fura.recipes.method_args import QuantizationArgs
from fura.recipes.registry import get_method

logger = logging.getLogger(__name__)

_EXPLICIT_LAYERS = (fura.SVDLinear, fura.BlockTTLinear)


def dense_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every explicit layer (``SVDLinear`` / ``BlockTTLinear`` / ``QBlockTTLinear``)
    replaced by ``<name>.weight`` (+ ``.bias``) of a dense Linear, in ``dtype`` (default: the layer's trained dtype)."""
    explicit = {name: m for name, m in model.named_modules() if isinstance(m, _EXPLICIT_LAYERS)}
    state = {
        key: value.detach()
        for key, value in model.state_dict().items()
        if not any(key.startswith(name + ".") for name in explicit)
    }
    with torch.no_grad():
        for name, layer in explicit.items():
            weight = layer.materialize_dense_weight()
            target = dtype or (layer.compute_dtype if isinstance(layer, fura.QBlockTTLinear) else model_dtype(layer))
            state[f"{name}.weight"] = weight.to(target).contiguous()
            if getattr(layer, "bias", None) is not None:
                state[f"{name}.bias"] = layer.bias.detach().to(target).contiguous()
    return state


def has_explicit_layers(model: nn.Module) -> bool:
    """Whether the model holds SVD / BlockTT layers that must be materialised before saving a dense folder."""
    return any(isinstance(m, _EXPLICIT_LAYERS) for m in model.modules())


def save_dense_model(model: nn.Module, folder: Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` a plain model folder (explicit layers materialised to dense weights).

    ``state_dict``: a full state dict gathered from a sharded run (see :mod:`fura.integrations.distributed`).
    """
    if has_explicit_layers(model):
        if state_dict is not None:
            raise ValueError(
                "SVD / BlockTT layers cannot be materialised from a gathered state dict. Fix: train these methods "
                "without sharding (DDP or a single process)."
            )
        state_dict = dense_state_dict(model)
    model.save_pretrained(folder, state_dict=state_dict)  # None: the model's own


def save_trained_model(
    model: nn.Module,
    info: MethodInfo,
    folder: str | Path,
    tokenizer: Any = None,
    initial_adapter: str | Path | None = None,
    force: bool = True,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    tensor_files: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Save the trained ``model`` atomically to ``folder`` (``<run>/adapter`` or ``<run>/model``): a PEFT adapter or a
    dense model folder, as ``info`` (:func:`fura.recipes.loading.apply_method`'s) says, with the ``tokenizer`` when
    given and ``tensor_files`` (``{file name: tensors}``) as more safetensors files. PiSSA: ``initial_adapter`` (saved
    before training) converts the adapter to apply to the original base. ``force`` replaces an existing folder;
    ``state_dict`` is the full state dict gathered from a sharded (FSDP / ZeRO-3) run (None: the model's own)."""
    folder = Path(folder)
    check_finite(model, f"the trained model to {folder}")
    with atomic_directory(folder, force=force) as staging:
        if info.save_format == "adapter":
            kwargs = {}
            if get_method(info.method).converts_on_save and initial_adapter is not None:
                kwargs["path_initial_model_for_weight_conversion"] = str(initial_adapter)
            if state_dict is not None:
                kwargs["state_dict"] = state_dict
            model.save_pretrained(staging, **kwargs)
        else:
            save_dense_model(model, staging, state_dict)
        for name, tensors in (tensor_files or {}).items():
            save_file(dict(tensors), str(staging / name))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    logger.info("saved the trained %s to %s", "adapter" if info.save_format == "adapter" else "model", folder)
    return folder


def save_initial_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Save a PiSSA-style adapter before training (``init_lora_weights=True`` so loading it re-runs no SVD)."""
    folder = Path(folder)
    config = model.peft_config["default"]
    original = config.init_lora_weights
    config.init_lora_weights = True
    try:
        with atomic_directory(folder, force=True) as staging:
            model.save_pretrained(staging)
    finally:
        config.init_lora_weights = original
    return folder


@dataclass
class ResolvedModel:
    """Where the weights to load are.

    Attributes:
        base: the base model folder / Hub id.
        adapter: a PEFT adapter folder on top of ``base`` (None for a dense folder).
    """

    base: str
    adapter: str | None = None

    def source(self, saved_file: str) -> str:
        """The adapter folder if it holds ``saved_file`` (a tokenizer's or processor's config), else the base."""
        return self.adapter if self.adapter and (Path(self.adapter) / saved_file).is_file() else self.base


def resolve_trained(model: str | Path, adapter: str | Path | None = None) -> ResolvedModel:
    """Accept a run folder (its ``adapter/`` or ``model/``), an adapter folder, or a base model (+ adapter)."""
    path = Path(str(model)).expanduser()
    if adapter is None and path.is_dir():
        if (path / "adapter" / "adapter_config.json").is_file():
            adapter = path / "adapter"
        elif (path / "model" / "config.json").is_file():
            return ResolvedModel(str(path / "model"))
        elif (path / "adapter_config.json").is_file():
            adapter = path
    if adapter is None:
        return ResolvedModel(resolve_model_path(model))
    adapter = Path(adapter)
    if path.resolve() in (adapter.resolve(), adapter.resolve().parent):  # no separate base given
        return ResolvedModel(adapter_base(adapter), str(adapter))
    return ResolvedModel(resolve_model_path(model), str(adapter))


def check_adapter_folder(adapter: str | Path) -> dict[str, Any]:
    """Check a PEFT adapter folder before anything is loaded; returns its ``adapter_config.json``.

    The config must be a JSON object naming a known ``peft_type``; the weights a whole safetensors file
    (:func:`fura.io.safetensors_stream.check_file`; pickled ``adapter_model.bin`` files are refused) holding that
    type's tensors, every one floating-point and finite.
    """
    folder = Path(adapter)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not an adapter folder (no adapter_config.json). Fix: give the folder "
            "written by save_pretrained (or a run folder holding adapter/)."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON ({exc}). Fix: save the adapter again.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object. Fix: save the adapter again (save_pretrained).")
    known = sorted(t.value for t in PeftType)
    if config.get("peft_type") not in known:
        raise ValueError(
            f"{config_path}: peft_type {config.get('peft_type')!r} is not a PEFT adapter type (known: "
            f"{', '.join(known)}). Fix: save the adapter again, or repair the peft_type field."
        )
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(
                f"{folder / 'adapter_model.bin'} is a pickle file, which fura does not load (unpickling can run "
                "code). Fix: save the adapter with safetensors (save_pretrained's default)."
            )
        raise FileNotFoundError(f"{folder} holds no adapter_model.safetensors. Fix: save the adapter again.")
    _check_adapter_tensors(weights, PEFT_TYPE_TO_PREFIX_MAPPING.get(PeftType(config["peft_type"]), ""))
    return config


def _check_adapter_tensors(weights: Path, prefix: str) -> None:
    """Refuse an adapter file with no tensors, none of the adapter type's ``prefix`` (``fura_``, ``lora_``, ...),
    integer or non-finite tensors."""
    check_file(weights)
    tensors = load_file(weights)
    fix = "Fix: use the adapter folder written by save_pretrained"
    if not tensors:
        raise ValueError(f"{weights} holds no tensors. {fix}.")
    if prefix and not any(prefix in key for key in tensors):  # other tensors may be modules_to_save
        raise ValueError(
            f"{weights} holds no tensor of the adapter type its config names (none has {prefix!r} in its name, e.g. "
            f"{next(iter(tensors))}); the config and the weights do not belong together. {fix}, with its own "
            "adapter_config.json."
        )
    for key, tensor in tensors.items():
        if not tensor.dtype.is_floating_point:
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise ValueError(f"{weights}: {key} is {dtype}, not a floating-point tensor. {fix}.")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{weights}: {key} holds non-finite values (NaN or Inf): the training that wrote it diverged. "
                "Fix: train again with a lower learning rate."
            )


def adapter_base(adapter: str | Path) -> str:
    """The ``base_model_name_or_path`` recorded in an adapter's ``adapter_config.json``."""
    config_path = Path(adapter) / "adapter_config.json"
    base = check_adapter_folder(adapter).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path} does not record its base model. Fix: pass --model BASE explicitly.")
    return str(base)


def load_for_inference(
    model: str | Path,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    trained_base: bool = True,
) -> tuple[nn.Module, Any, ResolvedModel]:
    """Load ``(model, tokenizer, resolved)`` for evaluation or merging, the model in eval mode: ``model`` is a base
    model (folder, Hub id, ``smollm2``), a merged/dense folder, an adapter folder or a run folder, ``adapter`` a PEFT
    adapter folder (any registered type) on top of it, loaded in ``dtype``. ``trained_base``: load the adapter of a run
    trained on a 4-bit base on that 4-bit base (:func:`trained_quantization`; evaluation); False: the full-precision
    base (merging, as the reference merged QLoRA)."""
    resolved = resolve_trained(model, adapter)
    if resolved.adapter:
        check_adapter_folder(resolved.adapter)  # a truncated or broken folder fails here, before the base loads
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    quantization = trained_quantization(model, resolved, torch_dtype) if trained_base else None
    if quantization is not None:  # the adapter was trained on a 4-bit base: evaluate that model, not another
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    logger.info("loading %s%s", resolved.base, f" + adapter {resolved.adapter}" if resolved.adapter else "")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(resolved.base, **kwargs)
    except OSError as exc:  # a missing folder, a file, an unknown or offline Hub id
        raise FileNotFoundError(
            f"cannot load the base model {resolved.base}: {str(exc).splitlines()[0]} Fix: give a local model folder "
            "(config.json + weights), or a Hub id with network access."
        ) from None
    if resolved.adapter:
        try:
            loaded = PeftModel.from_pretrained(loaded, resolved.adapter)
        except RuntimeError as exc:  # torch's load_state_dict: tensors of other shapes than the config describes
            if "Error(s) in loading state_dict" not in str(exc):
                raise
            detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), "")
            raise ValueError(
                f"{resolved.adapter}: the adapter's tensors do not fit the model its config describes ({detail}). "
                "Fix: use the adapter folder as save_pretrained wrote it, on the base model it was made for."
            ) from None
    tokenizer = AutoTokenizer.from_pretrained(
        resolved.source("tokenizer_config.json"), trust_remote_code=trust_remote_code
    )
    if torch.cuda.is_available() and quantization is None:
        loaded = loaded.to("cuda")
    return loaded.eval(), tokenizer, resolved


def trained_quantization(model: str | Path, resolved: ResolvedModel, dtype: torch.dtype) -> Any | None:
    """The ``BitsAndBytesConfig`` of the base an adapter was trained on, when its run folder's ``method.json`` says
    the base was quantised (``qlora``, ``qdora``, ``qfura``); None otherwise (a dense folder, a plain adapter)."""
    if not resolved.adapter:
        return None
    for folder in (Path(str(model)), Path(resolved.adapter).parent):
        method_file = folder / "method.json"
        if method_file.is_file() and (folder / "adapter").resolve() == Path(resolved.adapter).resolve():
            info = json.loads(method_file.read_text(encoding="utf-8"))
            if not info.get("quantized"):
                return None
            names = {f.name for f in dataclasses.fields(QuantizationArgs)}
            args = QuantizationArgs(**{k: v for k, v in info.get("method_args", {}).items() if k in names})
            logger.info("%s was trained on a 4-bit %s base: loading the base the same way", folder, args.quant_type)
            return quantization_config(args, dtype)
    return None


def merge_adapter(
    adapter: str | Path,
    output: str | Path,
    model: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    force: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merge a PEFT ``adapter`` (or a run folder holding ``adapter/``) into its base ``model`` (default: the one its
    config records) in ``dtype``, and save a dense Hugging Face folder (+ tokenizer) to ``output``, atomically. A
    non-empty ``output`` is refused unless ``force``, and one that is, contains or lies inside the adapter or the base
    model always; it is locked while the merge runs (a second merge into it fails at once)."""
    adapter_path = Path(adapter)
    if (adapter_path / "adapter" / "adapter_config.json").is_file():
        adapter_path = adapter_path / "adapter"
    base = model or adapter_base(adapter_path)
    check_output_is_not_an_input(output, [adapter_path, base], "--output")
    check_output_folder(output, force)  # fail before any loading
    with locked_output(output):
        loaded, tokenizer, _ = load_for_inference(base, adapter_path, dtype, trust_remote_code, trained_base=False)
        merged = loaded.merge_and_unload()
        with atomic_directory(output, force=force) as staging:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    logger.info("merged %s into %s", adapter_path, output)
    return Path(output)


def save_trained_model_distributed(
    trainer: Any,
    info: MethodInfo,
    folder: str | Path,
    tokenizer: Any = None,
    initial_adapter: str | Path | None = None,
) -> Path:
    """:func:`save_trained_model` for any launch: gather if sharded, write on rank 0, wait.

    Every process must call it (gathering a sharded model is a collective); only the main process writes.
    """
    state_dict = distributed.gathered_state_dict(trainer)
    if distributed.is_main_process():
        model = trainer.accelerator.unwrap_model(trainer.model)
        with distributed.unwrapped_module_names(model):
            save_trained_model(model, info, folder, tokenizer, initial_adapter, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()
    return Path(folder)
