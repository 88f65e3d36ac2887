"""The registry of fine-tuning methods: ``fura | lora | dora | pissa | oft | full | svd | qlora | qfura | qdora |
qfura-nf4`` (and ``fura-explicit``, the reference's explicit layer, for benchmarks and parity runs).

Details: ``docs/recipes/methods.md``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import LoraConfig, OFTConfig

import fura
from fura.recipes.method_args import (
    SEVEN_PROJECTIONS,
    FullArgs,
    FuraExplicitArgs,
    QFuraNF4Args,
    QuantizationArgs,
    SVDArgs,
)

logger = logging.getLogger(__name__)

Track = Literal["commonsense", "rl", "vlm"]
TRACKS: tuple[str, ...] = ("commonsense", "rl", "vlm")
MethodKind = Literal["peft", "full", "svd", "fura-explicit", "qfura-nf4"]

#: LoRA targets of the reference's commonsense LoRA/DoRA/PiSSA launcher (finetune_commonsense_lora.sh): no o_proj,
#: no gate_proj.
LORA_COMMONSENSE_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


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
        explicit = {"full": FullArgs, "svd": SVDArgs, "fura-explicit": FuraExplicitArgs, "qfura-nf4": QFuraNF4Args}
        return self.peft_config_cls if self.kind == "peft" else explicit[self.kind]

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


def _four_bit(name: str, summary: str, config_cls: type, args: dict[str, Any], source: str) -> MethodSpec:
    """A PEFT method on a 4-bit NF4 base (Track 4: the reference's commonsense values only)."""
    return MethodSpec(
        name=name,
        summary=summary,
        kind="peft",
        peft_config_cls=config_cls,
        quantize_base=True,
        tracks={"commonsense": TrackDefaults(args, _Q_TRAIN, source)},
    )


def _build_registry() -> dict[str, MethodSpec]:
    lora = LoraConfig
    rl = "the reference's rl/reproduce.sh"
    # The reference's values of a method without method arguments on the text tracks (FuRA, SVD, explicit FuRA).
    plain = {
        "commonsense": TrackDefaults({}, {"learning_rate": 2e-4}, _COMMON_CS),
        "rl": TrackDefaults({}, _RL_PEFT_TRAIN, rl),
    }
    specs = [
        MethodSpec(
            name="fura",
            summary="FuRA: block-wise SVD, train the small core R and the singular values S (PEFT adapter)",
            kind="peft",
            peft_config_cls=fura.FuraConfig,
            tracks={
                **plain,
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
            tracks=plain,
        ),
        MethodSpec(
            name="fura-explicit",
            summary="FuRA as the reference computes it: explicit BlockTT layers, large core stored and scaled by S",
            kind="fura-explicit",
            tracks=plain,
        ),
        _four_bit(
            "qlora",
            "QLoRA: LoRA r=48 on a 4-bit NF4 base (bitsandbytes)",
            lora,
            _QLORA_CS,
            "the reference's QLoRA launcher",
        ),
        _four_bit(
            "qdora",
            "QDoRA: DoRA r=64 on a 4-bit NF4 base (bitsandbytes)",
            lora,
            _QDORA_CS,
            "the reference's QDoRA launcher",
        ),
        _four_bit(
            "qfura",
            "QFuRA as a PEFT adapter: FuRA over a 4-bit NF4 base weight (implicit form)",
            fura.FuraConfig,
            {},
            "the reference's QFuRA launcher",
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
