r"""Layer-streaming conversion: prepare FuRA adapters and QFuRA checkpoints without loading the model.

A 70B model does not fit in the memory of one machine, but its FuRA initialisation is local: the
adapter of a weight ``W0: (out, in)`` depends on that weight alone (``n`` blocks ``W0_j: (out, b)``,
thin SVDs ``W0_j = U_j diag(σ_j) V_jᵀ``; stored are ``V: (n, b, r)``, ``σ``, ``s = σ`` and the
trained core ``R = Vᵀ``). So the model is never built: its skeleton lives on the meta device (shapes,
no storage), and the weights are read from the checkpoint's safetensors shards one at a time.

* :func:`prepare_adapter` — the PEFT adapter. ``get_peft_model`` runs on the meta skeleton (FuRA
  skips decompositions for meta weights), so every adapter tensor's name, shape and dtype is known
  before any weight is read. ``adapter_model.safetensors`` is written header first; then, per target
  weight, the weight is read, the layer's own initialisation runs on it (:meth:`FuraLayer.reset_from_base`:
  :func:`~fura.tuner.layer.decompose_blocks` + :meth:`~fura.tuner.layer.FuraLayer.load_decomposition`, the same code
  as ``get_peft_model`` on a loaded model), the adapter tensors are appended to the file and dropped.
  Resident at any time: one weight and its decomposition. The file loads with
  ``PeftModel.from_pretrained(model, output_dir)`` and holds exactly what ``get_peft_model`` computes.
* :func:`convert_qfura` — the explicit QFuRA model (the reference's 70B path, ``layer_stream``): per
  target weight ``convert_linear_to_btt`` → ``configure_blocktt_trainability`` (train the small core
  and σ; biases follow ``train_bias``, which the reference ignored) → ``convert_btt_to_qbtt_`` (NF4
  frozen core); each decoder layer's converted tensors go to their own shard, every other tensor
  (embeddings, norms, lm_head) is copied through in bounded chunks. :func:`load_qfura` builds the
  model back from the shards and a manifest, without recomputing anything.

Memory is measured (:class:`StreamReport`: peak RSS, RSS of the skeleton, per-layer time and RSS)
and :func:`make_random_checkpoint` writes Llama-shaped random checkpoints of any size layer by layer
for measuring it. ``python -m fura.io.streaming --help`` runs all three from the command line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fura.explicit.btt import BlockTTLinear, configure_blocktt_trainability, convert_linear_to_btt, iter_target_linears
from fura.explicit.qbtt import Packed4bit, QBlockTTLinear, as_quantized_, convert_btt_to_qbtt_
from fura.io.memory import current_rss, peak_rss, release_free_memory, reset_peak_rss
from fura.io.ownership import staged_output
from fura.io.safetensors_stream import (
    INDEX_FILE,
    CheckpointReader,
    StreamingSafetensorsWriter,
    TensorSpec,
    read_header,
    write_index,
)
from fura.tuner.config import FuraConfig
from fura.tuner.factorize import ALL_PROJECTIONS, BlockPlan
from fura.tuner.layer import FuraLayer

logger = logging.getLogger("fura.io.streaming")  # not __name__: the module also runs as __main__

ADAPTER_WEIGHTS = "adapter_model.safetensors"
QFURA_MANIFEST = "qfura_manifest.json"
QFURA_INDEX = "qfura.safetensors.index.json"
QFURA_FORMAT = "fura-qfura-v1"
#: Weight files never copied by :func:`convert_qfura` (the checkpoint itself).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_COPY_LIMIT_BYTES = 64 << 20


# --------------------------------------------------------------------------------------------
# The report (memory is read with fura.io.memory)
# --------------------------------------------------------------------------------------------


@dataclass
class StreamReport:
    """What a streaming conversion did and what it cost.

    Attributes:
        kind: ``"fura_adapter"`` (:func:`prepare_adapter`) or ``"qfura"`` (:func:`convert_qfura`).
        model_dir: the checkpoint read.
        output_dir: where the result was written.
        modules: number of target weights converted.
        layers: number of layer groups (decoder layers; a target outside any numbered layer is its own group).
        wall_seconds: total time of the call.
        skeleton_seconds: time to read the config and build the meta skeleton (and the meta PEFT model).
        layer_seconds: time per layer group, in checkpoint order.
        other_seconds: time spent outside the layer groups (e.g. copying embeddings).
        baseline_rss_bytes: RSS when the call started (imports and whatever the process held before).
        skeleton_rss_bytes: RSS once the meta skeleton was built.
        layer_rss_bytes: RSS after each layer group (flat when streaming works).
        peak_rss_bytes: peak RSS during the call (``VmHWM``; over the whole process if ``peak_reset`` is False).
        peak_reset: whether the kernel's peak counter could be reset at the start of the call.
        bytes_read: checkpoint bytes of the target weights (the streamed input).
        bytes_written: bytes of all files written.
        largest_layer_bytes: checkpoint bytes of the largest layer group's target weights.
        largest_weight_bytes: checkpoint bytes of the largest single target weight.
        extra: kind-specific numbers (trainable parameters, NF4 bytes saved, …).
    """

    kind: str
    model_dir: str
    output_dir: str
    modules: int = 0
    layers: int = 0
    wall_seconds: float = 0.0
    skeleton_seconds: float = 0.0
    layer_seconds: list[float] = field(default_factory=list)
    other_seconds: float = 0.0
    baseline_rss_bytes: int = 0
    skeleton_rss_bytes: int = 0
    layer_rss_bytes: list[int] = field(default_factory=list)
    peak_rss_bytes: int = 0
    peak_reset: bool = False
    bytes_read: int = 0
    bytes_written: int = 0
    largest_layer_bytes: int = 0
    largest_weight_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_above_baseline_bytes(self) -> int:
        """Peak RSS minus the RSS at the start: what the conversion itself needed."""
        return max(0, self.peak_rss_bytes - self.baseline_rss_bytes)

    def extrapolate(self, layers: int) -> dict[str, float]:
        """Time and memory for the same model with ``layers`` layer groups, from this run.

        Time is linear in the number of layers (the mean measured layer time per extra layer, plus
        the fixed skeleton / copy time); the peak RSS does not grow with depth, because exactly one
        layer is processed at a time and nothing from earlier layers is kept (the meta skeleton grows
        by a few kB per layer).
        """
        per_layer = sum(self.layer_seconds) / max(1, len(self.layer_seconds))
        fixed = self.wall_seconds - sum(self.layer_seconds)
        written_per_layer = self.extra.get("layer_bytes_written", 0)
        return {
            "layers": layers,
            "wall_seconds": fixed + per_layer * layers,
            "peak_rss_bytes": self.peak_rss_bytes,
            "bytes_written": self.bytes_written + written_per_layer * (layers - self.layers),
        }

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["peak_above_baseline_bytes"] = self.peak_above_baseline_bytes
        return data

    def save_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        """A few readable lines."""
        mean = sum(self.layer_seconds) / max(1, len(self.layer_seconds))
        size = format_bytes
        return (
            f"{self.kind}: {self.modules} modules in {self.layers} layers, {self.wall_seconds:.1f} s "
            f"(skeleton {self.skeleton_seconds:.2f} s, {mean:.2f} s/layer, other {self.other_seconds:.1f} s)\n"
            f"  RSS: start {size(self.baseline_rss_bytes)}, skeleton {size(self.skeleton_rss_bytes)}, "
            f"peak {size(self.peak_rss_bytes)} (+{size(self.peak_above_baseline_bytes)}); "
            f"largest layer {size(self.largest_layer_bytes)}, largest weight {size(self.largest_weight_bytes)}\n"
            f"  read {size(self.bytes_read)} of target weights, wrote {size(self.bytes_written)} to {self.output_dir}"
        )


def format_bytes(count: float) -> str:
    """``1536 → '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} B" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


class _Meter:
    """Fills a :class:`StreamReport` while a conversion runs: times, RSS, byte counts."""

    def __init__(self, report: StreamReport) -> None:
        self.report = report
        release_free_memory()  # so that memory freed earlier in the process cannot hide what this call needs
        report.peak_reset = reset_peak_rss()
        report.baseline_rss_bytes = current_rss()
        self._start = self._lap = time.perf_counter()

    def skeleton_done(self) -> None:
        self.report.skeleton_seconds = time.perf_counter() - self._start
        self.report.skeleton_rss_bytes = current_rss()
        self._lap = time.perf_counter()

    def layer_done(self, read_bytes: int) -> None:
        now = time.perf_counter()
        self.report.layer_seconds.append(now - self._lap)
        self.report.layer_rss_bytes.append(current_rss())
        self.report.largest_layer_bytes = max(self.report.largest_layer_bytes, read_bytes)
        self.report.layers += 1
        self._lap = now

    def weight_read(self, nbytes: int) -> None:
        self.report.bytes_read += nbytes
        self.report.modules += 1
        self.report.largest_weight_bytes = max(self.report.largest_weight_bytes, nbytes)

    def finish(self) -> StreamReport:
        report = self.report
        report.wall_seconds = time.perf_counter() - self._start
        report.other_seconds = report.wall_seconds - report.skeleton_seconds - sum(report.layer_seconds)
        report.peak_rss_bytes = peak_rss()
        return report


# --------------------------------------------------------------------------------------------
# Skeletons and checkpoint names
# --------------------------------------------------------------------------------------------


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


class _KeyMap:
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


def _grouped(names: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_group(name), []).append(name)
    return groups


# --------------------------------------------------------------------------------------------
# FuRA adapters
# --------------------------------------------------------------------------------------------


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
    meter = _Meter(report)
    reader = CheckpointReader(model_dir)
    skeleton = build_skeleton(load_model_config(model_dir), checkpoint_dtype(reader))
    peft_model = get_peft_model(skeleton, copy.deepcopy(config), adapter_name=adapter_name)
    modules = _adapter_modules(peft_model, adapter_name, _KeyMap(reader, skeleton))
    specs = [spec for module in modules for spec in module.specs]
    _check_against_peft(peft_model, adapter_name, specs)
    meter.skeleton_done()
    logger.info("FuRA streaming: %d modules from %s -> %s", len(modules), model_dir, output_dir)
    output = Path(output_dir)
    groups = _grouped(module.name for module in modules)
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


def _adapter_modules(peft_model: nn.Module, adapter_name: str, keys: _KeyMap) -> list[_AdapterModule]:
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
    meter: _Meter,
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


# --------------------------------------------------------------------------------------------
# QFuRA: explicit BlockTT layers with an NF4 frozen core
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QfuraSettings:
    """Everything that decides a QFuRA conversion (recorded in ``qfura_manifest.json``).

    Attributes:
        btt_rank: ``"full"``, an int or a float budget (see :func:`fura.tuner.factorize.resolve_rank`).
        decomp_mode: ``output_one_block`` (default), ``input_one_block``, ``square`` or a per-group dict.
        s_merged_to: singular-value placement (:func:`fura.explicit.btt.resolve_s_merged_to`); σ trains iff
        ``keep_trainable``. train_position: which core trains (``small`` as in the reference's QFuRA; the other one is
        quantised). train_bias: whether biases train (the reference's streaming path forced True, ignoring
        ``--no_train_bias``). convert_mode: ``svd`` or ``qr``.
        layout: ``flat`` or ``per_core_block`` (:func:`fura.explicit.qbtt.quantize_frozen_core_`).
        quant_type: ``nf4`` or ``fp4``.
        double_quant: quantise the absmax statistics too.
        blocksize: values per absmax.
        compute_dtype: dtype of the dequantised core in the forward.
        factorize_by_head: split q/k/v outputs and the o_proj input by attention head.
        target_modules: leaf (or full) names of the linears to convert.
    """

    btt_rank: str | int | float = "full"
    decomp_mode: Any = "output_one_block"
    s_merged_to: str | None = "keep_trainable"
    train_position: str = "small"
    train_bias: bool = True
    convert_mode: str = "svd"
    layout: str = "flat"
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype = torch.bfloat16
    factorize_by_head: bool = True
    target_modules: tuple[str, ...] = ALL_PROJECTIONS

    @property
    def train_singular_values(self) -> bool:
        return self.s_merged_to == "keep_trainable"

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["compute_dtype"] = str(self.compute_dtype).removeprefix("torch.")
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QfuraSettings:
        values = dict(data)
        values["compute_dtype"] = getattr(torch, values["compute_dtype"])
        values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)


def convert_qfura(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    btt_rank: str | int | float = "full",
    decomp_mode: Any = "output_one_block",
    s_merged_to: str | None = "keep_trainable",
    layout: str = "flat",
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    factorize_by_head: bool = True,
    target_modules: Sequence[str] = ALL_PROJECTIONS,
    train_position: str = "small",
    train_bias: bool = True,
    convert_mode: str = "svd",
    blocksize: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> StreamReport:
    """Convert a checkpoint to QFuRA (BlockTT layers, NF4 frozen core) one weight at a time.

    Per target weight: ``convert_linear_to_btt`` → ``configure_blocktt_trainability`` →
    ``convert_btt_to_qbtt_``, exactly the in-memory recipe, on a model holding only that weight.
    Output in ``output_dir``: one shard per decoder layer (its converted tensors and its norms), one
    shard with everything else copied through unchanged (embeddings, final norm, lm_head),
    ``qfura.safetensors.index.json``, ``qfura_manifest.json`` (settings and per-module plans) and the
    model's ``config.json`` / tokenizer files. Load it with :func:`load_qfura`. (The index is not named
    ``model.safetensors.index.json`` on purpose: ``from_pretrained`` would load the folder as a plain
    model with randomly initialised projections.)

    Resident at any time: one weight with its decomposition and BlockTT factors, plus the current
    layer's already-quantised tensors (about 0.53 byte per weight element), which are written when
    the layer is done. The arguments are those of :class:`QfuraSettings`; ``device`` is where the
    decompositions and quantisation run.
    """
    settings = QfuraSettings(
        btt_rank=btt_rank,
        decomp_mode=decomp_mode,
        s_merged_to=s_merged_to,
        train_position=train_position,
        train_bias=train_bias,
        convert_mode=convert_mode,
        layout=layout,
        quant_type=quant_type,
        double_quant=double_quant,
        blocksize=blocksize,
        compute_dtype=compute_dtype,
        factorize_by_head=factorize_by_head,
        target_modules=tuple(target_modules),
    )
    return _QfuraConverter(model_dir, output_dir, settings, device, progress).run()


class _QfuraConverter:
    """The state of one :func:`convert_qfura` run."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        settings: QfuraSettings,
        device: str | torch.device,
        progress: bool,
    ) -> None:
        self.model_dir, self.output = Path(model_dir), Path(output_dir)
        self.settings, self.device, self.progress = settings, torch.device(device), progress
        self.report = StreamReport("qfura", str(model_dir), str(output_dir))
        self.meter = _Meter(self.report)
        self.reader = CheckpointReader(model_dir)
        self.model_config = load_model_config(model_dir)
        self.dtype = checkpoint_dtype(self.reader)
        skeleton = build_skeleton(self.model_config, self.dtype)
        self.keys = _KeyMap(self.reader, skeleton)
        self.targets = {
            name: module.bias is not None
            for name, module in iter_target_linears(skeleton, include_names=settings.target_modules)
        }
        if not self.targets:
            raise ValueError(f"{model_dir}: no nn.Linear matches target_modules={list(settings.target_modules)}")
        self.passthrough = self._passthrough_tensors(skeleton)
        del skeleton
        self.meter.skeleton_done()
        self.modules: dict[str, dict[str, Any]] = {}
        self.weight_map: dict[str, str] = {}
        self.totals = {"trainable_params": 0, "nf4_bytes_saved": 0, "quantized_bytes": 0}
        self.layer_shard_bytes: list[int] = []
        self.tensor_bytes = 0  # data bytes of every tensor written (the index's total_size)

    def _passthrough_tensors(self, skeleton: nn.Module) -> dict[str, str]:
        """Output name → checkpoint key of every tensor that is not part of a target linear."""
        consumed = {self.keys.checkpoint_name(f"{name}.{kind}") for name in self.targets for kind in ("weight", "bias")}
        names = {}
        for name in skeleton.state_dict():
            key = self.keys.checkpoint_name(name)
            if key is not None and key not in consumed:
                names[name] = key
        mapped = set(names.values()) | consumed
        for key in self.reader:  # checkpoint tensors the model does not name: keep them under their key
            if key not in mapped:
                logger.warning("QFuRA: checkpoint tensor %s matches no model tensor; copied as is", key)
                names[key] = key
        return names

    def run(self) -> StreamReport:
        self.output.mkdir(parents=True, exist_ok=True)
        groups = _grouped(self.targets)
        rest = [name for name in self.passthrough if layer_group(name) not in groups]
        shard_count = len(groups) + (1 if rest else 0)
        shard = (f"qfura-{i:05d}-of-{shard_count:05d}.safetensors" for i in range(1, shard_count + 1))
        logger.info("QFuRA streaming: %d modules in %d layers from %s", len(self.targets), len(groups), self.model_dir)
        bar = tqdm(total=len(self.targets), desc="QFuRA streaming conversion", unit="module", disable=not self.progress)
        for group, members in groups.items():
            own = [name for name in self.passthrough if layer_group(name) == group]
            self._convert_group(next(shard), members, own, bar)
        bar.close()
        if rest:
            start = time.perf_counter()
            self._write_shard(next(shard), {}, rest)
            logger.info("QFuRA: copied %d other tensors in %.1f s", len(rest), time.perf_counter() - start)
        self._write_metadata()
        report = self.report
        report.bytes_written = sum(p.stat().st_size for p in self.output.iterdir() if p.is_file())
        report.extra.update(self.totals)
        report.extra["layer_bytes_written"] = sum(self.layer_shard_bytes) // max(1, len(self.layer_shard_bytes))
        self.meter.finish()
        logger.info("%s", report.summary())
        return report

    def _convert_group(self, shard: str, members: list[str], own: list[str], bar: tqdm) -> None:
        """Convert one layer's targets, then write them with the layer's other tensors to ``shard``."""
        converted: dict[str, torch.Tensor] = {}
        layer_bytes = 0
        for name in members:
            state, nbytes = self._convert_module(name)
            converted.update(state)
            layer_bytes += nbytes
            del state
            release_free_memory(collect_garbage=False)
            bar.update()
        self._write_shard(shard, converted, own)
        self.layer_shard_bytes.append((self.output / shard).stat().st_size)
        self.meter.layer_done(layer_bytes)

    def _convert_module(self, name: str) -> tuple[dict[str, torch.Tensor], int]:
        """One linear → QBlockTTLinear with the in-memory functions; returns its state dict (CPU) and bytes read."""
        settings = self.settings
        weight = self.reader.get_tensor(self.keys.require(f"{name}.weight"))
        nbytes = weight.numel() * weight.element_size()
        self.meter.weight_read(nbytes)
        bias = self.reader.get_tensor(self.keys.require(f"{name}.bias")) if self.targets[name] else None
        holder = _holder(name, _linear(weight, bias, self.device))
        del weight, bias
        convert_linear_to_btt(
            holder,
            btt_rank=settings.btt_rank,
            decomp_mode=settings.decomp_mode,
            include_names=[name],
            s_merged_to=settings.s_merged_to,
            train_position=settings.train_position,
            factorize_by_head=settings.factorize_by_head,
            model_config=self.model_config,
            convert_mode=settings.convert_mode,
            show_progress=False,
        )
        counts = configure_blocktt_trainability(
            holder, settings.train_bias, settings.train_position, settings.train_singular_values
        )
        saved = convert_btt_to_qbtt_(
            holder,
            settings.layout,
            settings.quant_type,
            settings.double_quant,
            settings.compute_dtype,
            settings.blocksize,
        )
        layer = holder.get_submodule(name)
        if not isinstance(layer, QBlockTTLinear):
            raise ValueError(
                f"module '{name}': nothing was quantised (train_position={settings.train_position!r} leaves no frozen "
                "core). Fix: use train_position='small' (QFuRA's setting) or 'large'."
            )
        self.modules[name] = _module_record(layer, settings)
        self.totals["trainable_params"] += counts["trainable_params"]
        self.totals["nf4_bytes_saved"] += saved
        self.totals["quantized_bytes"] += layer.quantized_nbytes()
        return {key: tensor.detach().to("cpu") for key, tensor in holder.state_dict().items()}, nbytes

    def _write_shard(self, shard: str, converted: dict[str, torch.Tensor], copied: list[str]) -> None:
        """Write converted tensors and copy checkpoint tensors (in bounded chunks) into one shard."""
        specs = [TensorSpec.of(key, tensor) for key, tensor in converted.items()]
        specs += [dataclasses.replace(self.reader.info(self.passthrough[name]).spec, name=name) for name in copied]
        with StreamingSafetensorsWriter(self.output / shard, specs, metadata={"format": "pt"}) as writer:
            for key, tensor in converted.items():
                writer.write(key, tensor)
            for name in copied:
                writer.write_bytes(name, self.reader.iter_bytes(self.passthrough[name]))
        self.weight_map.update(dict.fromkeys((spec.name for spec in specs), shard))
        self.tensor_bytes += sum(spec.nbytes for spec in specs)

    def _write_metadata(self) -> None:
        write_index(self.output, self.weight_map, self.tensor_bytes, name=QFURA_INDEX)
        manifest = {
            "format": QFURA_FORMAT,
            "source": str(self.model_dir),
            "dtype": str(self.dtype).removeprefix("torch."),
            "settings": self.settings.to_json(),
            "totals": self.totals,
            "modules": self.modules,
        }
        (self.output / QFURA_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _copy_model_files(self.model_dir, self.output)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> nn.Linear:
    """An ``nn.Linear`` around existing tensors (no allocation, no random init)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(device), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(device), requires_grad=False)
    return linear


def _holder(name: str, module: nn.Module) -> nn.Module:
    """A module tree containing only ``module`` at the dotted path ``name`` (so state-dict keys are the model's)."""
    root = parent = nn.Module()
    *path, leaf = name.split(".")
    for part in path:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, module)
    return root


def _module_record(layer: QBlockTTLinear, settings: QfuraSettings) -> dict[str, Any]:
    """What :func:`load_qfura` needs to rebuild an empty layer of this shape."""
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "plan": dataclasses.asdict(layer.plan),
        "s_merged_to": settings.s_merged_to,
        "train_position": settings.train_position,
        "quantized_side": layer.quantized_side,
        "frozen_shape": list(layer.frozen_shape),
        "layout": layer.quant_layout,
        "compute_dtype": str(layer.compute_dtype).removeprefix("torch."),
        "blobs": len(layer.qbtt_frozen),
    }


def _copy_model_files(source: Path, target: Path) -> None:
    """Copy ``config.json``, tokenizer and other small non-weight files of the model folder."""
    for path in source.iterdir():
        weights = path.name.endswith(_WEIGHT_SUFFIXES) or path.name == INDEX_FILE
        if path.is_file() and not weights and path.stat().st_size <= _COPY_LIMIT_BYTES:
            shutil.copy2(path, target / path.name)


def load_qfura(
    output_dir: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a :func:`convert_qfura` folder as a ready model (QBlockTTLinear layers, trainability set).

    The skeleton is built on meta, its target linears are replaced by empty QBlockTTLinear layers
    shaped from the manifest and the shard headers, and the shards are loaded with ``assign=True``
    (memory-mapped, so no second copy is made). Nothing is recomputed. ``dtype`` casts every stored
    floating tensor except the 4-bit core (the manifest's ``compute_dtype`` stays, and the rotary
    ``inv_freq`` stays float32 as in ``from_pretrained``); ``device`` moves the model.
    Trainability follows the manifest (the small core, σ if ``keep_trainable``, biases if ``train_bias``;
    everything else frozen), as the reference's QFuRA trainer sets it.
    """
    from safetensors.torch import load_file

    folder = Path(output_dir)
    manifest = _read_manifest(folder)
    settings = QfuraSettings.from_json(manifest["settings"])
    model = build_skeleton(load_model_config(folder), dtype or getattr(torch, manifest["dtype"]))
    weight_map = json.loads((folder / QFURA_INDEX).read_text())["weight_map"]
    headers = {shard: read_header(folder / shard)[0] for shard in dict.fromkeys(weight_map.values())}
    stored = {name: headers[shard][name].spec for name, shard in weight_map.items()}
    for name, record in manifest["modules"].items():
        model.set_submodule(name, empty_qblocktt(name, record, stored))
    state: dict[str, torch.Tensor] = {}
    for shard in headers:
        state.update(load_file(str(folder / shard)))
    if dtype is not None:  # the 4-bit blobs keep their storage types (uint8 data, float32 statistics)
        state = {k: v.to(dtype) if v.is_floating_point() and ".qbtt_frozen." not in k else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    del state
    if result.unexpected_keys:
        raise RuntimeError(f"{folder}: tensors the model does not have: {result.unexpected_keys[:5]}")
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise RuntimeError(f"{folder}: {len(missing)} tensors were not in the shards, e.g. {missing[:5]}")
    model.to(device)
    configure_blocktt_trainability(model, settings.train_bias, settings.train_position, settings.train_singular_values)
    return model.eval()


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / QFURA_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {QFURA_MANIFEST}. Fix: point at a folder written by convert_qfura.")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != QFURA_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {QFURA_FORMAT!r}")
    return manifest


def empty_qblocktt(name: str, record: dict[str, Any], stored: dict[str, TensorSpec]) -> QBlockTTLinear:
    """An unloaded :class:`~fura.explicit.qbtt.QBlockTTLinear` (all tensors on meta) matching a stored layer.

    ``record`` is the layer's manifest entry; the 4-bit blobs get one meta buffer per stored tensor
    ``<name>.qbtt_frozen.<i>.<buffer>``, so their shapes (which depend on the quantisation statistics)
    come from the shard headers. Loading a state dict with ``assign=True`` fills everything in.
    """
    plan = BlockPlan(**record["plan"])
    layer = BlockTTLinear(
        record["in_features"],
        record["out_features"],
        plan,
        s_merged_to=record["s_merged_to"],
        train_position=record["train_position"],
        bias=record["bias"],
        device="meta",
        module_name=name,
    )
    blobs = []
    for index in range(record["blobs"]):
        prefix = f"{name}.qbtt_frozen.{index}."
        buffers = {k[len(prefix) :]: (spec.shape, spec.dtype) for k, spec in stored.items() if k.startswith(prefix)}
        if "packed" not in buffers or "quant_state" not in buffers:
            raise RuntimeError(f"{name}: 4-bit blob {index} without packed data or quant state: {sorted(buffers)}")
        blobs.append(Packed4bit.empty(buffers))
    return as_quantized_(
        layer,
        side=record["quantized_side"],
        layout=record["layout"],
        compute_dtype=getattr(torch, record["compute_dtype"]),
        blobs=blobs,
    )


# --------------------------------------------------------------------------------------------
# Synthetic checkpoints
# --------------------------------------------------------------------------------------------


def make_random_checkpoint(
    path: str | os.PathLike,
    *,
    hidden: int = 4096,
    intermediate: int = 14336,
    layers: int = 4,
    heads: int = 32,
    kv_heads: int = 8,
    vocab: int = 32000,
    dtype: torch.dtype = torch.bfloat16,
    shard_per_layer: bool = True,
    attention_bias: bool = False,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write a Llama checkpoint with random weights, one tensor in memory at a time.

    The defaults are Llama-3-8B's layer shapes (hidden 4096, intermediate 14336, 32 heads of 128,
    8 KV heads, rope θ 500000) with 4 layers and a 32000-token vocabulary (Llama-3's is 128256: the
    embedding and lm_head are only copied by the conversions, never decomposed, so a small vocabulary
    keeps the file small without changing what is measured). Linear weights are ``N(0, 0.02²)``
    (full rank, like a fresh init), norms are ones, biases ``N(0, 0.02²)``.

    With ``shard_per_layer`` there is one shard per decoder layer plus one for the other tensors and a
    ``model.safetensors.index.json``; otherwise a single ``model.safetensors``. Every file is written
    through :class:`~fura.io.safetensors_stream.StreamingSafetensorsWriter`.
    """
    from transformers import LlamaConfig

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        attention_bias=attention_bias,
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
    )
    config.save_pretrained(str(folder))
    specs = _checkpoint_specs(build_skeleton(config, dtype))
    files = _shard_layout(specs, shard_per_layer)
    bar = tqdm(total=len(specs), desc="random checkpoint", unit="tensor", disable=not progress)
    weight_map = {}
    for file_name, members in files.items():
        with StreamingSafetensorsWriter(folder / file_name, members, metadata={"format": "pt"}) as writer:
            for spec in members:
                writer.write_bytes(spec.name, _random_bytes(spec, seed))
                weight_map[spec.name] = file_name
                bar.update()
    bar.close()
    if shard_per_layer:
        write_index(folder, weight_map, sum(spec.nbytes for spec in specs))
    return folder


def _checkpoint_specs(model: nn.Module) -> list[TensorSpec]:
    """Specs of the tensors ``save_pretrained`` would store (tied duplicates dropped)."""
    model.tie_weights()
    unique = {name for name, _ in model.named_parameters()}
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [
        TensorSpec.of(name, tensor)
        for name, tensor in model.state_dict().items()
        if name in unique or name not in every
    ]


def _shard_layout(specs: list[TensorSpec], shard_per_layer: bool) -> dict[str, list[TensorSpec]]:
    """File name → its tensors: one shard for the non-layer tensors, then one per layer (or one file)."""
    if not shard_per_layer:
        return {"model.safetensors": specs}
    groups: dict[str, list[TensorSpec]] = {"": []}
    for spec in specs:
        group = layer_group(spec.name)
        groups.setdefault(group if group != spec.name else "", []).append(spec)
    count = len(groups)
    return {f"model-{i:05d}-of-{count:05d}.safetensors": members for i, members in enumerate(groups.values(), 1)}


def _random_bytes(spec: TensorSpec, seed: int, chunk_elements: int = 1 << 22) -> Iterator[bytes]:
    """Ones for norms, ``N(0, 0.02²)`` otherwise, as raw bytes in row chunks of at most ``chunk_elements``.

    Seeded by name, so the values do not depend on the file layout; generated chunk by chunk, so
    even a large embedding never exists in memory in float32.
    """
    rows = spec.shape[0] if spec.shape else 1
    row_elements = max(1, math.prod(spec.shape[1:]))
    step = max(1, chunk_elements // row_elements)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    for start in range(0, rows, step):
        shape = (min(step, rows - start), *spec.shape[1:]) if spec.shape else ()
        if "norm" in spec.name:
            chunk = torch.ones(shape, dtype=spec.dtype)
        else:
            chunk = torch.randn(shape, generator=generator).mul_(0.02).to(spec.dtype)
        yield chunk.reshape(-1).view(torch.uint8).numpy().tobytes()


# --------------------------------------------------------------------------------------------
# Command line: python -m fura.io.streaming {make-checkpoint, prepare, qfura}
# --------------------------------------------------------------------------------------------


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """The steps of ``fura stream`` (and ``python -m fura.io.streaming``): make-checkpoint, prepare, qfura."""
    sub = parser.add_subparsers(dest="stream_command", metavar="STEP", required=True)
    make = sub.add_parser(
        "make-checkpoint", help="write a random Llama-shaped safetensors checkpoint (Llama-3-8B layer shapes)"
    )
    make.add_argument("path", help="output folder (config.json + one shard per decoder layer)")
    for flag, default in (("hidden", 4096), ("intermediate", 14336), ("layers", 4), ("heads", 32), ("kv-heads", 8)):
        make.add_argument(f"--{flag}", type=int, default=default, help=f"default {default}")
    make.add_argument("--vocab", type=int, default=32000, help="default 32000")
    make.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    for name, helptext in (
        ("prepare", "write a FuRA adapter (FuraConfig defaults) one weight at a time"),
        ("qfura", "convert to the explicit NF4 QFuRA model one decoder layer at a time"),
    ):
        command = sub.add_parser(name, help=helptext, description=helptext)
        command.add_argument("model_dir", help="Hugging Face folder with safetensors weights (one file or shards)")
        command.add_argument("output_dir", help="written on success only; a non-empty one needs --force")
        command.add_argument("--force", action="store_true", help="replace a non-empty output_dir")
        command.add_argument("--report", help="also write the StreamReport (time and memory per layer) as JSON here")
        command.add_argument("--device", default="cpu", help="where the decompositions run (default cpu)")
        command.add_argument("--no-progress", action="store_true", help="no progress bar")


def stream_cli(args: argparse.Namespace) -> int:
    """Run the step chosen by :func:`add_stream_arguments`; returns the exit status."""
    if args.stream_command == "make-checkpoint":
        sizes = {
            name: getattr(args, name) for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")
        }
        folder = make_random_checkpoint(args.path, **sizes, dtype=getattr(torch, args.dtype), progress=True)
        print(f"random checkpoint written to {folder}")
        return 0
    progress = not args.no_progress
    with staged_output(args.output_dir, [args.model_dir], args.force, "output_dir") as staging:  # refused, locked
        if args.stream_command == "prepare":
            report = prepare_adapter(args.model_dir, staging, FuraConfig(), device=args.device, progress=progress)
        else:
            report = convert_qfura(args.model_dir, staging, device=args.device, progress=progress)
    report.output_dir = str(args.output_dir)
    if args.report:
        report.save_json(args.report)
    return 0  # the summary was logged by the conversion


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fura.io.streaming`` (the same steps as ``fura stream``)."""
    parser = argparse.ArgumentParser(prog="python -m fura.io.streaming", description=__doc__.split("\n")[0])
    add_stream_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return stream_cli(args)


if __name__ == "__main__":
    sys.exit(main())
