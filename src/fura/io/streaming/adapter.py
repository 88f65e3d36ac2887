"""A FuRA adapter written weight by weight from a checkpoint, without loading the model.

``get_peft_model`` runs on the meta skeleton (FuRA skips decompositions for meta weights), so every
adapter tensor's name, shape and dtype is known before any weight is read. ``adapter_model.safetensors``
is written header first; then, per target weight, the weight is read, the layer's own initialisation
runs on it (:meth:`~fura.tuner.layer.FuraLayer.reset_from_base`, the same code as ``get_peft_model`` on a
loaded model), and the adapter tensors are appended to the file and dropped. Resident at any time: one
weight and its decomposition.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fura.io.memory import release_free_memory
from fura.io.safetensors_stream import CheckpointReader, StreamingSafetensorsWriter, TensorSpec
from fura.io.streaming.report import StreamMeter, StreamReport
from fura.io.streaming.skeleton import KeyMap, build_skeleton, checkpoint_dtype, grouped, load_model_config
from fura.tuner.config import FuraConfig
from fura.tuner.layer import FuraLayer

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class _AdapterModule:
    """One FuRA layer of the meta PEFT model and where its tensors come from / go."""

    name: str  # module name in the base model (``model.layers.0.self_attn.q_proj``)
    layer: FuraLayer
    weight_key: str  # checkpoint key of its base weight
    saved_keys: dict[str, str]  # tensor path inside the layer (``fura_core.default.weight``) → adapter-file key
    specs: list[TensorSpec]


def prepare_adapter(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: FuraConfig,
    *,
    adapter_name: str = "default",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> StreamReport:
    """Write the FuRA adapter of a checkpoint without loading the model (see the module docstring).

    Args:
        model_dir: a Hugging Face model folder with ``config.json`` and safetensors weights (one file
            or shards with ``model.safetensors.index.json``; bf16 / fp16 / fp32).
        output_dir: receives ``adapter_model.safetensors`` and ``adapter_config.json`` (which records
            ``weights_in_file=True`` and ``base_model_name_or_path=model_dir``).
        config: the adapter's :class:`~fura.tuner.config.FuraConfig` (not modified).
        adapter_name: the adapter's name while it is built (the file does not store it, as in PEFT).
        device: where the decompositions run (``"cuda"`` to use a GPU); files are written from CPU.
        progress: show a tqdm bar.

    Returns:
        A :class:`StreamReport`. Loading: ``PeftModel.from_pretrained(model, output_dir)`` gives the
        same adapter tensors as ``get_peft_model(model, config)`` and computes no decomposition.
    """
    from peft import get_peft_model

    report = StreamReport("fura_adapter", str(model_dir), str(output_dir))
    meter = StreamMeter(report)
    reader = CheckpointReader(model_dir)
    skeleton = build_skeleton(load_model_config(model_dir), checkpoint_dtype(reader))
    peft_model = get_peft_model(skeleton, copy.deepcopy(config), adapter_name=adapter_name)
    modules = _adapter_modules(peft_model, adapter_name, KeyMap(reader, skeleton))
    specs = [spec for module in modules for spec in module.specs]
    _check_against_peft(peft_model, adapter_name, specs)
    meter.skeleton_done()
    logger.info("FuRA streaming: %d modules from %s -> %s", len(modules), model_dir, output_dir)
    output = Path(output_dir)
    groups = grouped(module.name for module in modules)
    by_name = {module.name: module for module in modules}
    bar = tqdm(total=len(modules), desc="FuRA streaming init", unit="module", disable=not progress)
    with StreamingSafetensorsWriter(output / ADAPTER_WEIGHTS, specs, metadata={"format": "pt"}) as writer:
        for members in groups.values():
            layer_bytes = 0
            for name in members:
                layer_bytes += _stream_adapter_module(by_name[name], reader, writer, adapter_name, device, meter)
                bar.update()
            meter.layer_done(layer_bytes)
    bar.close()
    _save_adapter_config(peft_model.peft_config[adapter_name], output, model_dir, type(skeleton))
    report.bytes_written = sum(p.stat().st_size for p in output.iterdir() if p.name.startswith("adapter_"))
    report.extra["trainable_params"] = sum(
        spec.nbytes // spec.dtype.itemsize for module in modules for spec in module.specs if "fura_core" in spec.name
    )
    report.extra["layer_bytes_written"] = sum(spec.nbytes for spec in specs) // max(1, len(groups))
    meter.finish()
    logger.info("%s", report.summary())
    return report


def _adapter_modules(peft_model: nn.Module, adapter_name: str, keys: KeyMap) -> list[_AdapterModule]:
    """The FuRA layers of the meta PEFT model with their checkpoint keys and adapter-file names, in model order."""
    tuner = type(peft_model.base_model)
    base_names = {id(module): name for name, module in peft_model.get_base_model().named_modules()}
    modules = []
    for full_name, layer in peft_model.named_modules():
        if not isinstance(layer, FuraLayer) or adapter_name not in layer.fura_core:
            continue
        name = base_names[id(layer)]
        saved, specs = {}, []
        for owner in ("fura_core", "fura_basis"):
            for param_name, param in getattr(layer, owner)[adapter_name].named_parameters():
                path = f"{owner}.{adapter_name}.{param_name}"
                saved[path] = tuner._remove_adapter_name_from_key(f"{full_name}.{path}", adapter_name)
                specs.append(TensorSpec.of(saved[path], param))
        weight_key = keys.require(f"{name}.weight")
        modules.append(_AdapterModule(name, layer, weight_key, saved, specs))
    if not modules:
        raise ValueError(f"adapter '{adapter_name}' matched no module; check target_modules")
    return modules


def _check_against_peft(peft_model: nn.Module, adapter_name: str, specs: Sequence[TensorSpec]) -> None:
    """The adapter file must hold exactly what ``save_pretrained`` would write (names, shapes, dtypes)."""
    from peft.utils import get_peft_model_state_dict

    expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    ours = {spec.name: spec for spec in specs}
    extra = sorted(set(expected) - set(ours))
    if extra:
        raise NotImplementedError(
            f"prepare_adapter streams FuRA's own tensors, but this config also saves {len(extra)} other tensors "
            f"(e.g. {extra[:3]}: modules_to_save, or bias='all'/'fura_only' on layers with biases). Fix: drop "
            "those options for the streamed adapter, or build this adapter in memory with get_peft_model."
        )
    unknown = sorted(set(ours) - set(expected))
    if unknown:
        raise RuntimeError(
            f"streamed adapter tensors that PEFT would not save: {unknown[:3]} (PEFT internals changed?)"
        )
    for name, tensor in expected.items():
        if ours[name] != TensorSpec.of(name, tensor):
            raise RuntimeError(f"adapter tensor {name}: streamed {ours[name]} but PEFT saves {tuple(tensor.shape)}")


def _stream_adapter_module(
    module: _AdapterModule,
    reader: CheckpointReader,
    writer: StreamingSafetensorsWriter,
    adapter_name: str,
    device: str | torch.device,
    meter: StreamMeter,
) -> int:
    """Read one weight, run the layer's own initialisation on it, append its adapter tensors; returns bytes read."""
    weight = reader.get_tensor(module.weight_key)
    nbytes = weight.numel() * weight.element_size()
    meter.weight_read(nbytes)
    tensors = initialise_from_weight(module.layer, adapter_name, weight, device)
    del weight
    for path, tensor in tensors.items():
        writer.write(module.saved_keys[path], tensor)
    del tensors
    release_free_memory(collect_garbage=False)
    return nbytes


def initialise_from_weight(
    layer: FuraLayer, adapter_name: str, weight: torch.Tensor, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Adapter tensors of a meta FuRA layer computed from a real base ``weight: (out, in)``.

    Runs exactly what ``get_peft_model`` runs on a loaded model, :meth:`FuraLayer.reset_from_base`
    (block decomposition + :meth:`~fura.tuner.layer.FuraLayer.load_decomposition`), with ``weight``
    temporarily set as the base layer's weight and the adapter's tensors materialised on ``device``.
    Afterwards the layer is back on meta and holds nothing.

    Returns:
        ``{"fura_core.<adapter>.weight": (k, r, d), …, "fura_basis.<adapter>.sigma": (k, r)}`` on CPU.
    """
    base = layer.get_base_layer()
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"module '{layer.module_name}': checkpoint weight is {tuple(weight.shape)} but the model config gives "
            f"({layer.out_features}, {layer.in_features})"
        )
    placeholder = base.weight
    owners = {"fura_core": layer.fura_core[adapter_name], "fura_basis": layer.fura_basis[adapter_name]}
    try:
        base.weight = nn.Parameter(weight.to(device), requires_grad=False)
        for owner in owners.values():
            owner.to_empty(device=device)
        layer.reset_from_base(adapter_name, layer.fura_convert_mode[adapter_name])
        return {
            f"{owner_name}.{adapter_name}.{name}": param.detach().to("cpu")
            for owner_name, owner in owners.items()
            for name, param in owner.named_parameters()
        }
    finally:
        base.weight = placeholder
        for owner in owners.values():
            owner.to("meta")


def _save_adapter_config(config: FuraConfig, output_dir: Path, model_dir: str | os.PathLike, model_cls: type) -> None:
    """``adapter_config.json`` exactly as ``PeftModel.save_pretrained`` writes it.

    That is: ``weights_in_file=True`` (FuraConfig's rule), ``inference_mode=True``, the base model's
    path, and PEFT's ``auto_mapping`` when the config has no task type.
    """
    saved = copy.deepcopy(config)
    if not saved.base_model_name_or_path:
        saved.base_model_name_or_path = str(model_dir)
    saved.inference_mode = True
    auto_mapping = None
    if saved.task_type is None:
        auto_mapping = {"base_model_class": model_cls.__name__, "parent_library": model_cls.__module__}
    saved.save_pretrained(str(output_dir), auto_mapping_dict=auto_mapping)
