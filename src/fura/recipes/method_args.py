"""The arguments of the methods that are not PEFT configs, and of the 4-bit base.

Details: ``docs/recipes/methods.md``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fura.tuner.factorize import ALL_PROJECTIONS

#: The seven projections of a Llama-style decoder layer (QLoRA / QDoRA / RL LoRA targets).
SEVEN_PROJECTIONS: tuple[str, ...] = tuple(ALL_PROJECTIONS)


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
    """FuRA as the reference computes it: explicit BlockTT layers ``W = L·S·R`` with the large core ``L`` stored (for
    benchmarks and parity runs: ``docs/recipes/methods.md``).

    Attributes:
        scale_large_core: the reference's computation order, ``y = (x·R)·(σ ⊙ L)``; False scales the small
            intermediate instead (the same function, cheaper; :func:`fura.explicit.btt.btt_forward`).
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
