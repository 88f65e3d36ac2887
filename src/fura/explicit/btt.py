r"""``BlockTTLinear``: the explicit block-wise SVD layer of the FuRA reference code, and its functional API.

A weight ``W: (out, in)`` is cut into an ``m × n`` grid of ``a × b`` blocks (see :mod:`fura.tuner.factorize`)
and every block is stored factorised, ``W_ij = L_ij · diag(σ_ij) · R_ij`` with ``L_ij: (a, r)``,
``σ_ij: (r,)``, ``R_ij: (r, b)``. The factors are packed exactly like the reference ``BTTLayer``:

=========  ===============  ==============================================
parameter  shape            packing
=========  ===============  ==============================================
``btt_r``  ``(n, b, m·r)``  ``btt_r[j, β, i·r + k] = R_ij[k, β]``  (input / "right" core)
``btt_l``  ``(m, r·n, a)``  ``btt_l[i, j·r + k, α] = L_ij[α, k]``  (output / "left" core)
``btt_s``  ``(m, n, r)``    ``btt_s[i, j, k] = σ_ij[k]`` (only for ``s_merged_to = keep_*``)
``bias``   ``(out,)``       as in the source ``nn.Linear``
=========  ===============  ==============================================

so that ``y[t, i·a+α] = Σ_j Σ_k L_ij[α, k] σ_ij[k] Σ_β R_ij[k, β] x[t, j·b+β] + bias[i·a+α]``.
With FuRA's default (``output_one_block``, full rank, train the small core ``btt_r`` plus ``btt_s``)
the frozen ``btt_l`` holds the block bases ``[U_1 … U_n]`` (as large as ``W``) and
``in·(b+1)`` numbers train per module.

Differences from the reference (deliberate): cores are allocated with ``torch.empty`` (never a
random full-size init), any device works (``allow_non_cuda`` is accepted and ignored), σ scales the
small intermediate instead of the large core, integer ranks above ``min(a, b)`` are rejected, the
``lr_act`` nonlinearity is not implemented (the layer is always linear), ``square`` is allowed in a
per-module ``decomp_mode`` dict, and cores get their ``requires_grad`` from ``train_position`` at
construction (``configure_blocktt_trainability`` still sets every flag of the model).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fura.tuner.base_weight import read_dense_weight
from fura.tuner.factorize import (
    ALL_PROJECTIONS,
    MODULE_GROUPS,
    BlockPlan,
    FactorSpec,
    HeadInfo,
    RankSpec,
    block_qr,
    block_svd,
    canonical_decomp_mode,
    make_plan,
    merge_blocks,
    parse_module_spec,
    spec_for_module,
    split_blocks,
)

TRAIN_POSITIONS = ("small", "large", "both")
S_MERGED_TO = ("keep_frozen", "keep_trainable", "split", "output", "input")
S_ALIASES = ("frozen", "trainable", None)
CONVERT_MODES = ("svd", "qr")


# --------------------------------------------------------------------------------------------
# Sides and singular-value placement
# --------------------------------------------------------------------------------------------


def _check_train_position(train_position: str, module_name: str = "<module>") -> str:
    if train_position not in TRAIN_POSITIONS:
        raise ValueError(
            f"module '{module_name}': unknown train_position {train_position!r}; use one of {TRAIN_POSITIONS}"
        )
    return train_position


def trainable_sides(train_position: str, left_numel: int, right_numel: int) -> tuple[bool, bool]:
    """``(train_left, train_right)`` for a core pair of the given sizes.

    ``small`` trains the smaller core (``btt_l`` on a tie), ``large`` the larger (``btt_l`` on a
    tie), ``both`` both. Since ``numel(btt_l) / numel(btt_r) = a / b``, "small" is ``btt_l`` iff ``a ≤ b``.
    """
    _check_train_position(train_position)
    if train_position == "both":
        return True, True
    left = left_numel <= right_numel if train_position == "small" else left_numel >= right_numel
    return left, not left


def resolve_s_merged_to(
    train_position: str,
    s_merged_to: str | None,
    left_numel: int,
    right_numel: int,
    module_name: str = "<module>",
) -> str:
    """Resolve ``s_merged_to`` (reference semantics) to one of :data:`S_MERGED_TO`.

    ``None`` means ``split`` for ``train_position="both"`` and ``frozen`` otherwise; ``frozen`` /
    ``trainable`` merge σ into the frozen / trained core (``"output"`` = ``btt_l``, ``"input"`` =
    ``btt_r``), which needs exactly one trained side. Concrete placements pass through.
    """
    _check_train_position(train_position, module_name)
    if s_merged_to is None:
        s_merged_to = "split" if train_position == "both" else "frozen"
    if s_merged_to in S_MERGED_TO:
        return s_merged_to
    if s_merged_to not in S_ALIASES:
        raise ValueError(
            f"module '{module_name}': unknown s_merged_to {s_merged_to!r}. Fix: use one of "
            f"{S_MERGED_TO} or the aliases 'frozen' / 'trainable' / None."
        )
    if train_position == "both":
        raise ValueError(
            f"module '{module_name}': s_merged_to={s_merged_to!r} needs exactly one trained core, but "
            "train_position='both'. Fix: use s_merged_to='split', 'output', 'input' or 'keep_*'."
        )
    train_left, _ = trainable_sides(train_position, left_numel, right_numel)
    left_gets_s = train_left == (s_merged_to == "trainable")
    return "output" if left_gets_s else "input"


# --------------------------------------------------------------------------------------------
# Packing and the two-step product
# --------------------------------------------------------------------------------------------


def pack_left(left: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """``L: (m·n, a, r)`` (flat block index ``i·n+j``) → ``btt_l: (m, n·r, a)``."""
    m, a, n, r = plan.out_blocks, plan.out_block_size, plan.in_blocks, plan.rank
    return left.reshape(m, n, a, r).permute(0, 1, 3, 2).reshape(m, n * r, a)


def pack_right(right: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """``R: (m·n, r, b)`` → ``btt_r: (n, b, m·r)``."""
    m, n, b, r = plan.out_blocks, plan.in_blocks, plan.in_block_size, plan.rank
    return right.reshape(m, n, r, b).permute(1, 3, 0, 2).reshape(n, b, m * r)


def btt_forward(
    x: torch.Tensor,
    right: torch.Tensor,
    left: torch.Tensor,
    s: torch.Tensor | None,
    plan: BlockPlan,
    bias: torch.Tensor | None = None,
    scale_large_core: bool = False,
) -> torch.Tensor:
    """``y = ((x blocks @ btt_r) ⊙ σ) @ btt_l + bias`` for ``x: (..., in)`` → ``(..., out)``.

    ``scale_large_core=True`` reproduces the reference's order instead, ``y = (x blocks @ btt_r) @
    (σ ⊙ btt_l)``: the same function, but a trainable σ then costs a weight-sized temporary and a
    weight-sized gradient GEMM per call (the reference's BTTLayer.forward, kept for benchmarks).

    Step 1: ``(n, B, b) @ (n, b, m·r) → inner (n, B, m·r)`` (``2·in·m·r`` FLOPs per token).
    σ scales ``inner`` (``B·n·m·r`` elements), never the large core, so a trainable σ costs a cheap
    reduction in backward instead of a weight-sized gradient. Step 2: ``inner`` regrouped to
    ``(m, B, n·r) @ (m, n·r, a) → (m, B, a)`` (``2·out·n·r`` FLOPs per token).
    """
    m, a, n, b, r = plan.out_blocks, plan.out_block_size, plan.in_blocks, plan.in_block_size, plan.rank
    lead = x.shape[:-1]
    tokens = x.reshape(-1, n, b).transpose(0, 1)  # (n, B, b)
    inner = torch.bmm(tokens, right)  # (n, B, m·r)
    batch = inner.shape[1]
    inner = inner.view(n, batch, m, r)
    if s is not None and scale_large_core:
        left = (left.view(m, n, r, a) * s.unsqueeze(-1)).view(m, n * r, a)
    elif s is not None:
        inner = inner * s.transpose(0, 1).unsqueeze(1)  # σ_ij[k] broadcast as (n, 1, m, r)
    inner = inner.permute(2, 1, 0, 3).reshape(m, batch, n * r)
    out = torch.bmm(inner, left).transpose(0, 1).reshape(*lead, m * a)  # (m, B, a) → (..., out)
    return out if bias is None else out + bias


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------


class BlockTTLinear(nn.Module):
    """A linear layer stored as block-wise factors ``W_ij = L_ij · diag(σ_ij) · R_ij`` (see the module docstring).

    Args:
        in_features: ``in``.
        out_features: ``out``.
        plan: a :class:`~fura.tuner.factorize.BlockPlan`; if ``None`` it is built with
            :func:`~fura.tuner.factorize.make_plan` from ``decomp_mode``, ``rank``, ``input_factorization``
            and ``output_factorization``.
        s_merged_to: where the singular values go (:func:`resolve_s_merged_to`); ``btt_s`` exists only
            for ``keep_frozen`` / ``keep_trainable``.
        train_position: ``small`` / ``large`` / ``both`` — which core(s) get ``requires_grad=True``.
        bias: whether the layer has a bias.
        module_name: used in error messages.
        scale_large_core: multiply σ into the large core every forward, the reference's order (a
            weight-sized temporary and gradient per call when σ trains); default False scales the
            small intermediate instead — the same function, cheaper (see :func:`btt_forward`).

    The cores are allocated uninitialised (``torch.empty``); call :meth:`init_from_linear_weight`
    (or load a state dict) before use. There is no ``lr_act`` option: the layer is always linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        plan: BlockPlan | None = None,
        *,
        decomp_mode: str = "output_one_block",
        rank: RankSpec = "full",
        input_factorization: FactorSpec = None,
        output_factorization: FactorSpec = None,
        s_merged_to: str | None = None,
        train_position: str = "small",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        module_name: str = "<module>",
        scale_large_core: bool = False,
    ) -> None:
        super().__init__()
        #: multiply σ into the large core each forward, as the reference does (for benchmarks; see btt_forward)
        self.scale_large_core = scale_large_core
        if plan is None:
            plan = make_plan(
                out_features,
                in_features,
                decomp_mode=decomp_mode,
                rank=rank,
                input_factorization=input_factorization,
                output_factorization=output_factorization,
                module_name=module_name,
            )
        if (plan.out_features, plan.in_features) != (out_features, in_features):
            raise ValueError(
                f"module '{module_name}': plan is for a {plan.out_features}x{plan.in_features} weight but the layer "
                f"is {out_features}x{in_features} (out x in). Fix: build the plan with make_plan({out_features}, "
                f"{in_features}, ...)."
            )
        self.in_features, self.out_features, self.plan, self.module_name = in_features, out_features, plan, module_name
        self.train_position = _check_train_position(train_position, module_name)
        self.s_merged_to_requested = s_merged_to
        self.s_merged_to = resolve_s_merged_to(
            train_position, s_merged_to, plan.left_core_numel, plan.right_core_numel, module_name
        )
        m, a, n, b, r = plan.out_blocks, plan.out_block_size, plan.in_blocks, plan.in_block_size, plan.rank
        kw = {"device": device, "dtype": dtype}
        self.btt_l = nn.Parameter(torch.empty(m, n * r, a, **kw))
        self.btt_r = nn.Parameter(torch.empty(n, b, m * r, **kw))
        keep_s = self.s_merged_to.startswith("keep_")
        self.btt_s = nn.Parameter(torch.empty(m, n, r, **kw)) if keep_s else None
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.set_trainable(train_position, train_singular_values=self.s_merged_to == "keep_trainable")

    # ---- views of the cores (overridden by the quantised layer) ---------------------------

    def left_core(self) -> torch.Tensor:
        """The output-side core ``btt_l: (m, n·r, a)``."""
        return self.btt_l

    def right_core(self) -> torch.Tensor:
        """The input-side core ``btt_r: (n, b, m·r)``."""
        return self.btt_r

    def core_parameters(self) -> dict[str, nn.Parameter]:
        """The core parameters that exist as parameters (``btt_l`` / ``btt_r``), by name."""
        return {name: self._parameters[name] for name in ("btt_l", "btt_r") if self._parameters.get(name) is not None}

    # ---- trainability ---------------------------------------------------------------------

    def set_trainable(
        self, train_position: str, *, train_bias: bool = True, train_singular_values: bool = False
    ) -> dict[str, int]:
        """Set ``requires_grad`` of this layer's tensors and return the trainable counts per kind.

        The core(s) follow ``train_position`` (:func:`trainable_sides`), ``btt_s`` follows
        ``train_singular_values`` and the bias ``train_bias``.
        """
        _check_train_position(train_position, self.module_name)
        sides = trainable_sides(train_position, self.plan.left_core_numel, self.plan.right_core_numel)
        counts = {"core": self._set_cores_trainable(*sides), "s": 0, "bias": 0}
        self.train_position = train_position
        for key, param, flag in (("s", self.btt_s, train_singular_values), ("bias", self.bias, train_bias)):
            if param is not None:
                param.requires_grad_(flag)
                counts[key] = flag * param.numel()
        return counts

    def _set_cores_trainable(self, train_left: bool, train_right: bool) -> int:
        self.btt_l.requires_grad_(train_left)
        self.btt_r.requires_grad_(train_right)
        return train_left * self.btt_l.numel() + train_right * self.btt_r.numel()

    # ---- initialisation --------------------------------------------------------------------

    @torch.no_grad()
    def init_from_linear_weight(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, convert_mode: str = "svd"
    ) -> BlockTTLinear:
        """Factorise ``weight: (out, in)`` block by block and copy the factors (and bias) in.

        ``svd``: ``W_ij = U diag(S) Vh`` (top ``r``), placed by ``s_merged_to``: ``keep_*`` → ``L = U``,
        ``R = Vh``, ``σ = S``; ``split`` → ``U√S``, ``√S·Vh``; ``output`` → ``U·S``, ``Vh``; ``input`` →
        ``U``, ``S·Vh``. ``qr``: ``L·R`` from a batched QR/LQ (no σ; ``keep_*`` is an error, other
        placements are ignored with a warning). The decomposition runs on the weight's device in float32
        (float64 stays float64); factors are cast to the parameter dtype.
        """
        where = f"module '{self.module_name}'"
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{where}: weight has shape {tuple(weight.shape)} but the layer expects "
                f"({self.out_features}, {self.in_features}) (out x in, nn.Linear layout). Fix: pass the matching "
                "weight."
            )
        if (bias is None) != (self.bias is None):
            have, got = ("a bias", "none") if bias is None else ("no bias", "one")
            raise ValueError(
                f"{where}: the layer has {have} but the source has {got}. Fix: construct with bias={bias is not None}."
            )
        plan = self.plan
        blocks = split_blocks(weight.to(self.btt_r.device), plan)
        s = None
        if convert_mode == "svd":
            left, s, right = block_svd(blocks, plan.rank)
            left, s, right = self._place_singular_values(left, s, right)
        elif convert_mode == "qr":
            if self.btt_s is not None:
                raise ValueError(
                    f"{where}: convert_mode='qr' has no singular values, so s_merged_to={self.s_merged_to!r} is "
                    "impossible. Fix: use convert_mode='svd', or s_merged_to='frozen'/'trainable'/'split'/None."
                )
            if self.s_merged_to_requested is not None:
                warnings.warn(f"{where}: s_merged_to is ignored with convert_mode='qr'", stacklevel=2)
            left, right = block_qr(blocks, plan.rank)
        else:
            raise ValueError(f"{where}: unknown convert_mode {convert_mode!r}; use one of {CONVERT_MODES}")
        self.btt_l.copy_(pack_left(left, plan))
        self.btt_r.copy_(pack_right(right, plan))
        if self.btt_s is not None:
            self.btt_s.copy_(s.reshape(self.btt_s.shape))
        if bias is not None:
            self.bias.copy_(bias)
        return self

    def _place_singular_values(
        self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Apply the ``s_merged_to`` placement to ``U: (B, a, r)``, ``S: (B, r)``, ``Vh: (B, r, b)``."""
        placement = self.s_merged_to
        if placement.startswith("keep_"):
            return u, s, vh
        if placement == "split":
            root = s.sqrt()
            return u * root[:, None, :], None, root[:, :, None] * vh
        if placement == "output":
            return u * s[:, None, :], None, vh
        return u, None, s[:, :, None] * vh  # "input"

    @classmethod
    def from_linear(cls, linear: nn.Module, *, convert_mode: str = "svd", **kwargs: Any) -> BlockTTLinear:
        """Build and initialise a layer from an ``nn.Linear`` (bitsandbytes layers are dequantised)."""
        weight = read_dense_weight(linear)
        bias = getattr(linear, "bias", None)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        return layer.init_from_linear_weight(weight, None if bias is None else bias.data, convert_mode)

    # ---- compute ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = ((x blocks @ btt_r) ⊙ σ) @ btt_l + bias`` (see :func:`btt_forward`)."""
        self._check_input(x)
        return btt_forward(
            x, self.right_core(), self.left_core(), self.btt_s, self.plan, self.bias, self.scale_large_core
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"module '{self.module_name}': input has shape {tuple(x.shape)}, but the last dimension must be "
                f"in_features={self.in_features}. Fix: feed (..., {self.in_features}) activations."
            )

    def materialize_dense_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight ``W_ij = L_ij diag(σ_ij) R_ij`` (differentiable)."""
        plan = self.plan
        m, a, n, b, r = plan.out_blocks, plan.out_block_size, plan.in_blocks, plan.in_block_size, plan.rank
        left = self.left_core().reshape(m, n, r, a)  # [i, j, k, α] = L_ij[α, k]
        right = self.right_core().reshape(n, b, m, r)  # [j, β, i, k] = R_ij[k, β]
        if self.btt_s is not None:
            left = left * self.btt_s.to(left.dtype).unsqueeze(-1)
        blocks = torch.einsum("ijka,jbik->ijab", left, right.to(left.dtype))
        return merge_blocks(blocks.reshape(m * n, a, b), plan)

    def extra_repr(self) -> str:
        return (
            f"{self.plan.describe()}, mode={self.plan.decomp_mode}, s_merged_to={self.s_merged_to}, "
            f"train_position={self.train_position}, bias={self.bias is not None}"
        )


# --------------------------------------------------------------------------------------------
# Functional API (reference names)
# --------------------------------------------------------------------------------------------


def iter_target_linears(
    model: nn.Module, skip_names: Iterable[str] = ("lm_head",), include_names: Iterable[str] | None = None
) -> Iterator[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` whose leaf (or full) name is not skipped and, if given, included."""
    skip = set(skip_names or ())
    include = None if include_names is None else set(include_names)
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in skip or name in skip:
            continue
        if include is not None and leaf not in include and name not in include:
            continue
        yield name, module


def _decomp_mode_for(spec: Any, leaf: str, name: str) -> str:
    if not isinstance(spec, Mapping):
        return spec
    mode = spec_for_module(spec, leaf)
    if mode is None:
        raise ValueError(
            f"module '{name}': decomp_mode is a dict {dict(spec)} without an entry for '{leaf}'. Fix: add '{leaf}' "
            f"(or its group among {list(MODULE_GROUPS)}) to the dict, or skip the module via skip_names."
        )
    return mode


def check_compat_kwargs(function: str, ignored: dict[str, Any]) -> None:
    if ignored.get("lr_act"):
        raise ValueError(f"{function}: lr_act=True (a nonlinear layer) is not supported; FuRA layers are linear.")
    extra = sorted(k for k in ignored if k not in ("lr_act", "allow_non_cuda"))
    if extra:
        warnings.warn(f"{function} ignores the arguments {extra}", stacklevel=3)


def convert_linear_to_btt(
    model: nn.Module,
    btt_rank: RankSpec | None = "full",
    decomp_mode: str | Mapping[str, str] = "square",
    skip_names: Iterable[str] = ("lm_head",),
    include_names: Iterable[str] | None = None,
    s_merged_to: str | None = None,
    train_position: str = "small",
    factorize_by_head: bool = False,
    model_config: Any = None,
    convert_mode: str = "svd",
    input_factorization: Any = None,
    allow_non_cuda: bool = True,
    *,
    show_progress: bool = True,
    scale_large_core: bool = False,
    **ignored: Any,
) -> list[str]:
    """Replace every targeted ``nn.Linear`` of ``model`` by an initialised :class:`BlockTTLinear`, in place.

    ``decomp_mode`` is a mode or a dict over leaf names / groups (``qkv``, ``o``, ``mlp_upgate``,
    ``mlp_down``); ``input_factorization`` is a spec as in :func:`fura.tuner.factorize.parse_module_spec`;
    ``factorize_by_head`` splits q/k/v outputs and the o_proj input by attention head using
    ``model_config`` (default: ``model.config``). Each layer gets ``requires_grad`` from
    ``train_position``; call :func:`configure_blocktt_trainability` to freeze the rest of the model.
    ``allow_non_cuda``, ``init_mode`` and ``forward_impl`` are accepted for compatibility and ignored;
    ``scale_large_core=True`` keeps the reference's computation order (see :class:`BlockTTLinear`).

    Returns:
        The names of the converted modules.
    """
    check_compat_kwargs("convert_linear_to_btt", ignored)
    rank = "full" if btt_rank is None else btt_rank
    modes = parse_module_spec(decomp_mode, what="decomp_mode", value_parser=canonical_decomp_mode)
    in_specs = parse_module_spec(input_factorization, what="input_factorization")
    heads = HeadInfo.from_model_config(model_config if model_config is not None else getattr(model, "config", None))
    targets = list(iter_target_linears(model, skip_names, include_names))
    converted = []
    for name, linear in tqdm(targets, desc="Linear -> BlockTT", disable=not show_progress):
        leaf = name.rsplit(".", 1)[-1]
        plan = make_plan(
            linear.out_features,
            linear.in_features,
            decomp_mode=_decomp_mode_for(modes, leaf, name),
            rank=rank,
            input_factorization=spec_for_module(in_specs, leaf),
            leaf_name=leaf,
            heads=heads,
            factorize_by_head=factorize_by_head,
            module_name=name,
        )
        layer = BlockTTLinear.from_linear(
            linear,
            plan=plan,
            scale_large_core=scale_large_core,
            s_merged_to=s_merged_to,
            train_position=train_position,
            convert_mode=convert_mode,
            module_name=name,
        )
        model.set_submodule(name, layer)
        converted.append(name)
    return converted


def configure_blocktt_trainability(
    model: nn.Module, train_bias: bool = True, train_position: str = "small", train_singular_values: bool = False
) -> dict[str, int]:
    """Freeze every parameter of ``model``, then per :class:`BlockTTLinear` train the core(s) picked by
    ``train_position``, ``btt_s`` iff ``train_singular_values`` and the bias iff ``train_bias``.

    Returns:
        ``{"layers", "core_params", "singular_value_params", "bias_params", "trainable_params", "total_params"}``.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    totals = {"layers": 0, "core_params": 0, "singular_value_params": 0, "bias_params": 0}
    for module in model.modules():
        if isinstance(module, BlockTTLinear):
            counts = module.set_trainable(
                train_position, train_bias=train_bias, train_singular_values=train_singular_values
            )
            totals["layers"] += 1
            totals["core_params"] += counts["core"]
            totals["singular_value_params"] += counts["s"]
            totals["bias_params"] += counts["bias"]
    totals["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    totals["total_params"] = sum(p.numel() for p in model.parameters())
    return totals


@torch.no_grad()
def normalize_trainable_blocktt_cores_(model: nn.Module, eps: float = 1e-12) -> int:
    """Rescale trainable cores to unit directions: every ``R_ij[k, :]`` row (``btt_r`` over dim 1) and
    every ``L_ij[:, k]`` column (``btt_l`` over dim 2) gets L2 norm 1 (norms clamped at ``eps``).

    Returns:
        The number of tensors normalised.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, BlockTTLinear):
            continue
        for name, param in module.core_parameters().items():
            if param.requires_grad:
                dim = 1 if name == "btt_r" else 2
                param.div_(param.norm(dim=dim, keepdim=True).clamp_min(eps))
                count += 1
    return count


def get_blocktt_target_module_names(kind: str = "all") -> list[str]:
    """Leaf names of the Llama-style projections: ``all`` (7), ``mlp`` (gate/up/down) or ``attn`` (q/k/v/o)."""
    names = {"all": ALL_PROJECTIONS, "mlp": ALL_PROJECTIONS[4:], "attn": ALL_PROJECTIONS[:4]}
    if kind not in names:
        raise ValueError(f"unknown target kind {kind!r}; use one of {sorted(names)}")
    return list(names[kind])
