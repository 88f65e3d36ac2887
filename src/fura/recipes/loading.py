"""A model ready to train with a method: load the base model (in 4-bit NF4 for the quantised methods), apply the
method, and describe what was built (:class:`MethodInfo`).

Details: ``docs/recipes/methods.md``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import fura
from fura.recipes.base_models import count_parameters, is_4bit_model, model_dtype, resolve_dtype, resolve_model_path
from fura.recipes.jsonable import jsonable
from fura.recipes.method_args import BlockTTArgs, FullArgs, FuraExplicitArgs, QFuraNF4Args, QuantizationArgs, SVDArgs
from fura.recipes.registry import MethodSpec, get_method

logger = logging.getLogger(__name__)


@dataclass
class MethodInfo:
    """What :func:`apply_method` built: counts, resolved arguments and how to save the result.

    Attributes:
        method: registry name.
        track: the track whose defaults were used.
        kind: the method's kind (see :class:`MethodSpec`).
        trainable_params: parameters with ``requires_grad`` (4-bit weights counted at their logical size).
        total_params: all parameters of the model, frozen 4-bit ones at their logical size.
        method_args: the resolved method arguments (defaults + overrides), JSON-serialisable.
        training_defaults: the method's training hyper-parameters for this track (e.g. ``learning_rate``).
        save_format: ``"adapter"`` or ``"dense"``.
        quantized: whether frozen weights are stored in 4 bits.
    """

    method: str
    track: str
    kind: str
    trainable_params: int
    total_params: int
    method_args: dict[str, Any]
    training_defaults: dict[str, Any]
    save_format: str
    quantized: bool

    @classmethod
    def of(cls, model: nn.Module, spec: MethodSpec, track: str, args: Mapping[str, Any]) -> MethodInfo:
        """The info of ``model`` once method ``spec`` with the resolved arguments ``args`` is applied (parameters
        counted now, by :func:`~fura.recipes.base_models.count_parameters`)."""
        trainable, total = count_parameters(model)
        return cls(
            method=spec.name,
            track=track,
            kind=spec.kind,
            trainable_params=trainable,
            total_params=total,
            method_args=jsonable(args),
            training_defaults=dict(spec.defaults(track).training),
            save_format=spec.save_format,
            quantized=spec.quantize_base or spec.kind == "qfura-nf4",
        )

    @property
    def trainable_percent(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def summary(self) -> str:
        """One line, e.g. ``fura (commonsense): 4,608 trainable of 53,408 parameters (8.63%)``."""
        return (
            f"{self.method} ({self.track}): {self.trainable_params:,} trainable of {self.total_params:,} "
            f"parameters ({self.trainable_percent:.2f}%)"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (with ``trainable_percent``)."""
        return {**jsonable(dataclasses.asdict(self)), "trainable_percent": self.trainable_percent}


def quantization_config(args: QuantizationArgs, compute_dtype: torch.dtype) -> Any:
    """The ``BitsAndBytesConfig`` of the 4-bit methods (reference: NF4, double quant, compute in the model dtype)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.quant_type,
        bnb_4bit_use_double_quant=args.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _split_quant_args(spec: MethodSpec, args: dict[str, Any]) -> tuple[dict[str, Any], QuantizationArgs]:
    quant_names = {f.name for f in dataclasses.fields(QuantizationArgs)}
    if not spec.quantize_base:
        return args, QuantizationArgs()
    quant = QuantizationArgs(**{k: v for k, v in args.items() if k in quant_names})
    return {k: v for k, v in args.items() if k not in quant_names}, quant


def load_model_for_method(
    name: str,
    model_path: str | Path,
    dtype: str | torch.dtype = "auto",
    track: str = "commonsense",
    overrides: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, MethodInfo]:
    """Load a causal LM from ``model_path`` (a local folder, Hub id or ``smollm2``) for method ``name`` (a key of
    :data:`METHODS`), in ``dtype`` (``"auto"``: bf16 on a GPU that has it, else fp32; 4-bit NF4 when the method needs
    it), and apply the method with the ``track``'s reference defaults (``commonsense``, ``rl``, ``vlm``) updated by
    ``overrides``. Returns ``(model, info)``: the model ready to train (a ``PeftModel`` for PEFT methods) and its
    :class:`MethodInfo`."""
    spec = get_method(name)
    torch_dtype = resolve_dtype(dtype)
    _, quant = _split_quant_args(spec, spec.resolve_args(track, overrides))
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if spec.quantize_base:
        kwargs["quantization_config"] = quantization_config(quant, torch_dtype)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    path = resolve_model_path(model_path)
    four_bit = f", 4-bit {quant.quant_type}" if spec.quantize_base else ""
    logger.info("loading %s (%s%s) for method %s", path, str(torch_dtype).removeprefix("torch."), four_bit, name)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return apply_method(model, name, track=track, overrides=overrides, dtype=torch_dtype)


def apply_method(
    model: nn.Module,
    name: str,
    track: str = "commonsense",
    overrides: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    show_progress: bool = True,
) -> tuple[nn.Module, MethodInfo]:
    """Apply method ``name`` to a loaded model; returns ``(model, info)``.

    The 4-bit methods (``qlora``, ``qdora``, ``qfura``) need a model loaded in 4 bits (use
    :func:`load_model_for_method`, or ``from_pretrained(..., quantization_config=quantization_config(...))``).
    ``dtype`` is the compute dtype of ``qfura-nf4`` (default: the model's dtype). ``show_progress=False`` hides
    the progress bars of the explicit conversions (``svd``, ``fura-explicit``, ``qfura-nf4``), e.g. in benchmarks.
    """
    spec = get_method(name)
    args, _ = _split_quant_args(spec, spec.resolve_args(track, overrides))
    if spec.quantize_base and not is_4bit_model(model):
        raise ValueError(
            f"method {name!r} trains on a 4-bit base model, but this model is not quantised. Fix: load it with "
            "fura.recipes.loading.load_model_for_method, or with from_pretrained(..., quantization_config=...)."
        )
    compute_dtype = resolve_dtype(dtype) if dtype is not None else model_dtype(model)
    model = _APPLIERS[spec.kind](model, spec, args, compute_dtype, show_progress)
    info = MethodInfo.of(model, spec, track, args)
    if info.trainable_params == 0:
        raise RuntimeError(f"method {name!r} left no trainable parameter in this model; check target_modules")
    logger.info("%s", info.summary())
    return model, info


def _build_args(cls: type, args: Mapping[str, Any], method: str) -> Any:
    try:
        return cls(**args)
    except TypeError as exc:  # pragma: no cover - resolve_args already rejects unknown keys
        raise ValueError(f"method {method!r}: {exc}") from None


def _apply_peft(
    model: nn.Module, spec: MethodSpec, args: dict[str, Any], dtype: torch.dtype, show_progress: bool
) -> nn.Module:
    config = _build_args(spec.peft_config_cls, {"task_type": "CAUSAL_LM", **args}, spec.name)
    if spec.quantize_base:
        # reference Track 4: prepare_model_for_kbit_training, gradient checkpointing mandatory
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return get_peft_model(model, config)


def _apply_full(
    model: nn.Module, spec: MethodSpec, args: dict[str, Any], dtype: torch.dtype, show_progress: bool
) -> nn.Module:
    _build_args(FullArgs, args, spec.name)
    return model.requires_grad_(True)


def _apply_svd(
    model: nn.Module, spec: MethodSpec, args: dict[str, Any], dtype: torch.dtype, show_progress: bool
) -> nn.Module:
    svd = _build_args(SVDArgs, args, spec.name)
    fura.convert_linear_to_svd(
        model,
        include_names=svd.target_modules,
        s_merged_to=svd.s_merged_to,
        train_position=svd.train_position,
        show_progress=show_progress,
    )
    fura.configure_svd_trainability(
        model,
        train_position=svd.train_position,
        train_bias=svd.train_bias,
        train_embed_lm_head=svd.train_embed_lm_head,
        train_singular_values=svd.s_merged_to == "keep_trainable",
    )
    return model


def _convert_blocktt(model: nn.Module, args: BlockTTArgs, scale_large_core: bool, show_progress: bool) -> None:
    """Swap the targets for explicit BlockTT layers and set what trains (shared by fura-explicit and qfura-nf4)."""
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(BlockTTArgs) if f.name != "train_bias"}
    options["btt_rank"], options["include_names"] = options.pop("rank"), options.pop("target_modules")
    config = getattr(model, "config", None)
    fura.convert_linear_to_btt(
        model, model_config=config, show_progress=show_progress, scale_large_core=scale_large_core, **options
    )
    fura.configure_blocktt_trainability(
        model,
        train_bias=args.train_bias,
        train_position=args.train_position,
        train_singular_values=args.s_merged_to == "keep_trainable",
    )


def _apply_fura_explicit(
    model: nn.Module, spec: MethodSpec, args: dict[str, Any], dtype: torch.dtype, show_progress: bool
) -> nn.Module:
    explicit = _build_args(FuraExplicitArgs, args, spec.name)
    _convert_blocktt(model, explicit, explicit.scale_large_core, show_progress)
    return model


def _apply_qfura_nf4(
    model: nn.Module, spec: MethodSpec, args: dict[str, Any], dtype: torch.dtype, show_progress: bool
) -> nn.Module:
    q = _build_args(QFuraNF4Args, args, spec.name)
    _convert_blocktt(model, q, scale_large_core=False, show_progress=show_progress)
    saved = fura.convert_btt_to_qbtt_(
        model, layout=q.layout, quant_type=q.quant_type, double_quant=q.double_quant, compute_dtype=dtype
    )
    logger.info("qfura-nf4: frozen cores stored in %s, %.1f MiB saved", q.quant_type, saved / 2**20)
    return model


_APPLIERS: dict[str, Callable[[nn.Module, MethodSpec, dict[str, Any], torch.dtype, bool], nn.Module]] = {
    "peft": _apply_peft,
    "full": _apply_full,
    "svd": _apply_svd,
    "fura-explicit": _apply_fura_explicit,
    "qfura-nf4": _apply_qfura_nf4,
}
