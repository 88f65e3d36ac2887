"""The explicit QFuRA model (BlockTT layers with an NF4 frozen core) converted one decoder layer at a time.

Per target weight ``convert_linear_to_btt`` → ``configure_blocktt_trainability`` (train the small core
and σ; biases follow ``train_bias``) → ``convert_btt_to_qbtt_`` (NF4 frozen core), the in-memory recipe
on a model holding only that weight; each decoder layer's converted tensors go to their own shard, every
other tensor (embeddings, norms, lm_head) is copied through in bounded chunks. :func:`load_qfura` builds
the model back from the shards and a manifest, without recomputing anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fura.explicit.btt import BlockTTLinear, configure_blocktt_trainability, convert_linear_to_btt, iter_target_linears
from fura.explicit.qbtt import Packed4bit, QBlockTTLinear, as_quantized_, convert_btt_to_qbtt_
from fura.io.fields import same_named
from fura.io.memory import release_free_memory
from fura.io.safetensors_stream import (
    INDEX_FILE,
    CheckpointReader,
    StreamingSafetensorsWriter,
    TensorSpec,
    read_header,
    write_index,
)
from fura.io.streaming.report import StreamMeter, StreamReport
from fura.io.streaming.skeleton import (
    KeyMap,
    build_skeleton,
    checkpoint_dtype,
    grouped,
    layer_group,
    load_model_config,
)
from fura.tuner.factorize import ALL_PROJECTIONS, BlockPlan

logger = logging.getLogger(__name__)

QFURA_MANIFEST = "qfura_manifest.json"
QFURA_INDEX = "qfura.safetensors.index.json"
QFURA_FORMAT = "fura-qfura-v1"
#: Weight files never copied by :func:`convert_qfura` (the checkpoint itself).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_COPY_LIMIT_BYTES = 64 << 20
#: :class:`QfuraSettings` fields that are arguments of :func:`fura.explicit.btt.convert_linear_to_btt` by the same name.
BTT_SETTINGS = ("btt_rank", "decomp_mode", "s_merged_to", "train_position", "factorize_by_head", "convert_mode")


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
        self.meter = StreamMeter(self.report)
        self.reader = CheckpointReader(model_dir)
        self.model_config = load_model_config(model_dir)
        self.dtype = checkpoint_dtype(self.reader)
        skeleton = build_skeleton(self.model_config, self.dtype)
        self.keys = KeyMap(self.reader, skeleton)
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
        groups = grouped(self.targets)
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
            **same_named(settings, BTT_SETTINGS),
            include_names=[name],
            model_config=self.model_config,
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
