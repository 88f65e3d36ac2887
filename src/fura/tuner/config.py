"""``FuraConfig``: the PEFT configuration of a FuRA adapter.

Every field is validated in ``__post_init__`` so that a bad value fails when the config is built,
with a message that says what to use instead, rather than deep inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from fura.tuner.factorize import (
    FactorizationError,
    canonical_decomp_mode,
    parse_module_spec,
)
from fura.tuner.registration import FURA_PEFT_TYPE

#: Where the singular values go, as the reference names it (``s_merged_to``).
S_OPTIONS = ("keep_trainable", "keep_frozen", "frozen", "trainable", "split", "output", "input")
CONVERT_MODES = ("svd", "qr")
#: Fields that must be real booleans (``"False"`` is a true string, a classic YAML / CLI slip).
BOOL_FIELDS = ("init_weights", "weights_in_file", "factorize_by_head", "exact_unmerge", "check_base_model")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"FuraConfig: {name} must be True or False, got {value!r} ({type(value).__name__}). Fix: pass a boolean "
            f"(in YAML: {name}: false, on the command line: {name}=false)."
        )


BIAS_OPTIONS = ("none", "all", "fura_only")


def _jsonable_factor_spec(spec: Any) -> Any:
    """Tuples become lists so that the config round-trips through ``adapter_config.json``."""
    if isinstance(spec, tuple):
        return list(spec)
    if isinstance(spec, dict):
        return {key: _jsonable_factor_spec(value) for key, value in spec.items()}
    return spec


@dataclass
class FuraConfig(PeftConfig):
    """Configuration of a FuRA (Full-Rank Adaptation) adapter.

    FuRA writes each target weight as its block-wise SVD ``W = L·S·R`` and trains only the small
    core ``R`` (and the singular values ``S``). As a PEFT adapter it runs in the equivalent
    implicit form ``W = W0 · blockdiag(T)``: the base layer is left untouched (it may be quantised)
    and the adapter applies a block-diagonal transform to the layer input (``output_one_block``)
    or output (``input_one_block``). Swap it in for ``LoraConfig``::

        model = get_peft_model(base, FuraConfig(target_modules="all-linear"))
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match), a regex string, or 'all-linear'. None picks the "
            "projections of known model types (the seven q/k/v/o/gate/up/down projections for Llama-style "
            "decoders) and falls back to 'all-linear'."
        },
    )
    target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "Parameters to adapt directly, by name or name suffix (PEFT's convention), e.g. "
            "['experts.gate_up_proj', 'experts.down_proj']: 3-D fused expert stacks (each expert gets its own block "
            "decomposition) or 2-D (out, in) weights. None with the default target_modules (None or 'all-linear') "
            "picks every fused expert stack of the model (MoE models such as Mixtral, Qwen3-MoE, gpt-oss); [] "
            "adapts no parameter directly. Routers are adapted only when named here."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules never to adapt."}
    )
    rank: str | int | float = field(
        default="full",
        metadata={
            "help": "Singular directions kept per block: 'full' = min(a, b) (lossless, the paper's setting), an int "
            "in 1..min(a, b), or a float in (0, 1) read as a parameter budget (both cores hold about rank·out·in "
            "numbers, as in the reference)."
        },
    )
    rank_pattern: dict[str, str | int | float] | None = field(
        default=None,
        metadata={"help": "Per-module rank overrides: {regex or name suffix: rank}, as LoRA's rank_pattern."},
    )
    decomp_mode: str | dict[str, str] = field(
        default="output_one_block",
        metadata={
            "help": "'output_one_block' (FuRA's default: one output block, n input blocks of width b; the adapter "
            "transforms the layer input) or 'input_one_block' (the mirror image: the adapter transforms the "
            "output). A dict over groups qkv / o / mlp_upgate / mlp_down or leaf names sets it per module. "
            "'square' has no implicit form: use fura.convert_linear_to_btt."
        },
    )
    s_merged_to: str = field(
        default="keep_trainable",
        metadata={
            "help": "Singular values S: 'keep_trainable' (own trainable vector, the paper's default), 'keep_frozen' "
            "/ 'frozen' (fixed, folded into the frozen side), 'trainable' (folded into the trained core), "
            "'split' (sqrt(S) on both sides), or 'output' / 'input' (folded into the output-side L or input-side "
            "R core, resolved to frozen / trainable by the decomposition mode)."
        },
    )
    convert_mode: str = field(
        default="svd",
        metadata={
            "help": "'svd' (block SVD) or 'qr' (an orthonormal basis from an LQ/QR split; no singular values, so "
            "s_merged_to must not be keep_trainable / keep_frozen)."
        },
    )
    input_factorization: Any | None = field(
        default=None,
        metadata={
            "help": "Input-side blocks: None (closest divisor pair, or the head split of o_proj when "
            "factorize_by_head), 'closest', 'head', 'n,b' / [n, b], or a dict over qkv / o / mlp_upgate / "
            "mlp_down / leaf names (JSON or Python literal strings accepted)."
        },
    )
    output_factorization: Any | None = field(
        default=None,
        metadata={
            "help": "Output-side blocks for input_one_block, with the same syntax as input_factorization (q/k/v "
            "outputs split by head when factorize_by_head)."
        },
    )
    factorize_by_head: bool = field(
        default=True,
        metadata={
            "help": "Split the o_proj input (and, for input_one_block, the q/k/v outputs) by attention head, as "
            "the reference's text tracks do (Llama-3-8B o_proj: 32 blocks of 128 instead of 64 of 64)."
        },
    )
    bias: Literal["none", "all", "fura_only"] = field(
        default="none",
        metadata={"help": "Which biases train: 'none', 'all' biases of the model, or 'fura_only' (adapted layers)."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the adapter starts as the exact identity (the model is bit-identical to the base). False "
            "(PEFT's convention, used to test merging and saving): the decomposition is computed and the trainable "
            "tensors start at a random perturbation of the identity, so the adapter changes the model."
        },
    )
    weights_in_file: bool = field(
        default=False,
        metadata={
            "help": "The adapter's weights come from a file: creating it skips the block decomposition, so loading "
            "never computes an SVD. save_pretrained records True in adapter_config.json; such an adapter refuses to "
            "run until its weights are loaded. Leave False to create an adapter."
        },
    )
    exact_unmerge: bool = field(
        default=True,
        metadata={
            "help": "Keep a copy of each base weight while an adapter is merged, so unmerge restores it bit for "
            "bit (costs one weight copy per merged module). False unmerges through the inverse transform "
            "(no copy, exact only up to rounding)."
        },
    )
    check_base_model: bool = field(
        default=True,
        metadata={
            "help": "When weights are loaded, check that the stored singular vectors belong to this base model "
            "(||W0_j v_j|| = σ_j for the top direction of each block) and raise a clear error otherwise."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules (e.g. a classifier head) trained fully and stored in the adapter file."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices (see PEFT's LoraConfig)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform (e.g. 'layers')."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = FURA_PEFT_TYPE()
        for name in BOOL_FIELDS:
            _check_bool(name, getattr(self, name))
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(
                isinstance(name, str) for name in self.target_parameters
            ):
                raise ValueError(
                    f"FuraConfig: target_parameters must be a list of parameter names, got {self.target_parameters!r}. "
                    "Fix: e.g. target_parameters=['experts.gate_up_proj', 'experts.down_proj']."
                )
            self.target_parameters = sorted(set(self.target_parameters))
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("FuraConfig: layers_to_transform cannot be used when target_modules is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("FuraConfig: layers_pattern needs layers_to_transform.")
        self._validate()

    def _validate(self) -> None:
        try:
            modes = parse_module_spec(self.decomp_mode, what="decomp_mode", value_parser=canonical_decomp_mode)
            for mode in modes.values() if isinstance(modes, dict) else [modes]:
                if mode == "square":
                    raise ValueError(
                        "FuraConfig: decomp_mode='square' splits both sides of the weight, so it has no implicit "
                        "W0·blockdiag(T) form and cannot run as a PEFT adapter over an untouched base layer. Fix: "
                        "use 'output_one_block' / 'input_one_block', or the explicit layer "
                        "(fura.convert_linear_to_btt(model, decomp_mode='square'))."
                    )
            parse_module_spec(self.input_factorization, what="input_factorization")
            parse_module_spec(self.output_factorization, what="output_factorization")
        except FactorizationError as exc:
            raise ValueError(f"FuraConfig: {exc}") from None
        if self.s_merged_to not in S_OPTIONS:
            raise ValueError(
                f"FuraConfig: unknown s_merged_to {self.s_merged_to!r}; use one of {S_OPTIONS} "
                "(None / 'split' with train_position='both' exist only in the explicit BlockTT layer)."
            )
        if self.convert_mode not in CONVERT_MODES:
            raise ValueError(f"FuraConfig: unknown convert_mode {self.convert_mode!r}; use 'svd' or 'qr'.")
        if self.convert_mode == "qr" and self.s_merged_to in ("keep_trainable", "keep_frozen"):
            raise ValueError(
                f"FuraConfig: convert_mode='qr' has no singular values, so s_merged_to={self.s_merged_to!r} is "
                "impossible. Fix: set s_merged_to='frozen' (or use convert_mode='svd')."
            )
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"FuraConfig: unknown bias {self.bias!r}; use one of {BIAS_OPTIONS}.")
        self._validate_rank(self.rank, "rank")
        for key, value in (self.rank_pattern or {}).items():
            self._validate_rank(value, f"rank_pattern[{key!r}]")
        self.input_factorization = _jsonable_factor_spec(self.input_factorization)
        self.output_factorization = _jsonable_factor_spec(self.output_factorization)

    @staticmethod
    def _validate_rank(rank: Any, what: str) -> None:
        if isinstance(rank, bool) or not isinstance(rank, (str, int, float)):
            raise ValueError(f"FuraConfig: {what} must be 'full', an int or a float, got {rank!r}")
        if isinstance(rank, str):
            if rank.strip().lower() == "full":
                return
            text = rank.strip()
            try:
                rank = float(text) if any(c in text.lower() for c in ".e") else int(text)
            except ValueError:
                raise ValueError(
                    f"FuraConfig: {what} {rank!r} is not 'full', an int or a float. Fix: e.g. rank='full', 16 or 0.25."
                ) from None
        if isinstance(rank, int) and rank <= 0:
            raise ValueError(f"FuraConfig: {what} must be positive, got {rank}. Use 'full' or an int >= 1.")
        if isinstance(rank, float) and not 0.0 < rank < 1.0:
            raise ValueError(f"FuraConfig: a float {what} is a parameter budget in (0, 1), got {rank}.")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json``; it records ``weights_in_file=True`` (the file's weights hold the SVD)."""
        weights_in_file = self.weights_in_file
        self.weights_in_file = True
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.weights_in_file = weights_in_file
