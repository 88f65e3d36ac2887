"""``FuraConfig``: the PEFT configuration of a FuRA adapter, and :class:`ModuleSpecs`, its parsed per-module settings.

Every field is validated in ``__post_init__`` so that a bad value fails when the config is built,
with a message that says what to use instead, rather than deep inside the model. The per-module
settings are parsed there once into :class:`ModuleSpecs`; the tuner builds every module's plan from
them and checks nothing of its own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils.other import get_pattern_key

from fura.tuner.factorize import (
    FactorizationError,
    RankSpec,
    canonical_decomp_mode,
    parse_module_spec,
    parse_rank,
    spec_for_module,
)
from fura.tuner.registration import FURA_PEFT_TYPE

#: Where the singular values go, as the reference names it (``s_merged_to``).
S_OPTIONS = ("keep_trainable", "keep_frozen", "frozen", "trainable", "split", "output", "input")
CONVERT_MODES = ("svd", "qr")
#: Fields parsed into :class:`ModuleSpecs` (a change to one of them after construction is validated again).
SPEC_FIELDS = (
    "decomp_mode",
    "input_factorization",
    "output_factorization",
    "rank",
    "rank_pattern",
    "s_merged_to",
    "convert_mode",
)
#: Fields that must be real booleans (``"False"`` is a true string, a classic YAML / CLI slip).
BOOL_FIELDS = ("init_weights", "weights_in_file", "factorize_by_head", "exact_unmerge", "check_base_model")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"FuraConfig: {name} must be True or False, got {value!r} ({type(value).__name__}). Fix: pass a boolean "
            f"(in YAML: {name}: false, on the command line: {name}=false)."
        )


BIAS_OPTIONS = ("none", "all", "fura_only")


def _parse_decomp_modes(spec: Any) -> Any:
    """The parsed ``decomp_mode`` spec; ``square`` is refused (it has no implicit form)."""
    modes = parse_module_spec(spec, what="decomp_mode", value_parser=canonical_decomp_mode)
    if "square" in (modes.values() if isinstance(modes, dict) else [modes]):
        raise ValueError(
            "FuraConfig: decomp_mode='square' splits both sides of the weight, so it has no implicit "
            "W0·blockdiag(T) form and cannot run as a PEFT adapter over an untouched base layer. Fix: "
            "use 'output_one_block' / 'input_one_block', or the explicit layer "
            "(fura.convert_linear_to_btt(model, decomp_mode='square'))."
        )
    return modes


def _jsonable_factor_spec(spec: Any) -> Any:
    """Tuples become lists so that the config round-trips through ``adapter_config.json``."""
    if isinstance(spec, tuple):
        return list(spec)
    if isinstance(spec, dict):
        return {key: _jsonable_factor_spec(value) for key, value in spec.items()}
    return spec


@dataclass(frozen=True)
class ModuleSpecs:
    """A :class:`FuraConfig`'s per-module settings, parsed and validated: what each module's plan is built from.

    ``decomp_mode`` / ``input_factorization`` / ``output_factorization`` are parsed specs (a value, or a dict over
    groups and leaf names, see :func:`~fura.tuner.factorize.parse_module_spec`) with ``square`` already refused;
    ``rank`` and the values of ``rank_pattern`` are checked rank specs (:func:`~fura.tuner.factorize.parse_rank`).
    """

    decomp_mode: Any
    input_factorization: Any
    output_factorization: Any
    rank: RankSpec
    rank_pattern: dict[str, RankSpec]
    s_merged_to: str
    convert_mode: str

    def rank_for(self, key: str) -> RankSpec:
        """The rank of module ``key``: its ``rank_pattern`` entry (regex or name suffix, as LoRA's) or ``rank``."""
        pattern = get_pattern_key(self.rank_pattern.keys(), key) if self.rank_pattern else None
        return self.rank_pattern.get(pattern, self.rank) if pattern is not None else self.rank

    def decomp_mode_for(self, leaf: str) -> str:
        """The decomposition mode of a module with this leaf name (``output_one_block`` unless a dict names it)."""
        return spec_for_module(self.decomp_mode, leaf) or "output_one_block"

    def factorizations_for(self, leaf: str) -> tuple[Any, Any]:
        """``(input, output)`` factorisation specs of a module with this leaf name."""
        return spec_for_module(self.input_factorization, leaf), spec_for_module(self.output_factorization, leaf)

    def placement(self, decomp_mode: str) -> str:
        """Where the singular values sit in the implicit form of ``decomp_mode``: one of :data:`PLACEMENTS`.

        ``output`` / ``input`` name the output-side core ``L`` / input-side core ``R``. The implicit
        ``output_one_block`` form trains ``R`` (so ``output`` → frozen side, ``input`` → trained
        side); ``input_one_block`` trains ``L`` (the reverse). ``keep_frozen`` and ``frozen`` are the
        same function with the same gradients.
        """
        trained_side = "input" if decomp_mode == "output_one_block" else "output"
        if self.s_merged_to in ("output", "input"):
            return "trainable" if self.s_merged_to == trained_side else "frozen"
        return "frozen" if self.s_merged_to == "keep_frozen" else self.s_merged_to


#: The implicit form's four placements of the singular values (:meth:`ModuleSpecs.placement`).
PLACEMENTS = ("keep_trainable", "frozen", "trainable", "split")


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

    @property
    def specs(self) -> ModuleSpecs:
        """The per-module settings, parsed once (again only if one of :data:`SPEC_FIELDS` changed since)."""
        if self._spec_source != self._current_spec_source():
            self._validate()
        return self._specs

    def _current_spec_source(self) -> tuple[Any, ...]:
        """The current values of :data:`SPEC_FIELDS`, compared with those :attr:`specs` was parsed from."""
        return tuple(getattr(self, name) for name in SPEC_FIELDS)

    def _validate(self) -> None:
        """Check every per-module setting and keep the parsed result as :attr:`specs`."""
        self.input_factorization = _jsonable_factor_spec(self.input_factorization)
        self.output_factorization = _jsonable_factor_spec(self.output_factorization)
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
        try:
            specs = ModuleSpecs(
                decomp_mode=_parse_decomp_modes(self.decomp_mode),
                input_factorization=parse_module_spec(self.input_factorization, what="input_factorization"),
                output_factorization=parse_module_spec(self.output_factorization, what="output_factorization"),
                rank=parse_rank(self.rank),
                rank_pattern={
                    key: parse_rank(value, f"rank_pattern[{key!r}]") for key, value in (self.rank_pattern or {}).items()
                },
                s_merged_to=self.s_merged_to,
                convert_mode=self.convert_mode,
            )
        except FactorizationError as exc:
            raise ValueError(f"FuraConfig: {exc}") from None
        self.rank = specs.rank  # "16" is stored as 16, "FULL" as "full"
        if self.rank_pattern is not None:
            self.rank_pattern = dict(specs.rank_pattern)
        self._specs = specs
        self._spec_source = copy.deepcopy(self._current_spec_source())

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json``; it records ``weights_in_file=True`` (the file's weights hold the SVD)."""
        weights_in_file = self.weights_in_file
        self.weights_in_file = True
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.weights_in_file = weights_in_file
