"""Block plans and batched block decompositions — the math shared by every FuRA layer.

A linear weight ``W`` of shape ``(out, in)`` (PyTorch layout, ``y = x @ W.T``) is cut into an
``m × n`` grid of blocks of shape ``a × b`` (``out = m·a``, ``in = n·b``). Block ``(i, j)`` is
``W[i·a:(i+1)·a, j·b:(j+1)·b]`` and the batched view is ``(m·n, a, b)`` with flat index ``i·n + j``.
Each block gets a thin decomposition ``W_ij = L_ij · diag(σ_ij) · R_ij`` with ``L_ij: (a, r)``,
``σ_ij: (r,)`` and ``R_ij: (r, b)``.

FuRA's decomposition modes pick the grid:

============================  =====  =====  =====  =====
``decomp_mode``               m      a      n      b
============================  =====  =====  =====  =====
``square``                    m      a      n      b       (both sides split)
``output_one_block`` (FuRA)   1      out    n      b       (default)
``input_one_block``           m      a      1      in
============================  =====  =====  =====  =====

This module resolves every knob of that plan (factor pairs, attention-head splits, per-group
specs, ranks) into a :class:`BlockPlan` with clear errors, and runs the batched SVD / QR.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from fura.tuner.heads import aligned_side, head_pair

DECOMP_MODES = ("square", "output_one_block", "input_one_block")
_DECOMP_ALIASES = {
    "output": "output_one_block",
    "output_block": "output_one_block",
    "output_one_block": "output_one_block",
    "input": "input_one_block",
    "input_block": "input_one_block",
    "input_one_block": "input_one_block",
    "square": "square",
}

#: Named groups of transformer projections accepted as keys of per-module specs.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "mlp_upgate": ("gate_proj", "up_proj", "gate_up_proj"),
    "mlp_down": ("down_proj",),
}
_GROUP_ALIASES = {"mlp_up_gate": "mlp_upgate", "upgate": "mlp_upgate", "up_gate": "mlp_upgate"}

#: The seven projections of a Llama-style decoder layer.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FactorSpec = None | str | tuple[int, int]
RankSpec = str | int | float


class FactorizationError(ValueError):
    """A block plan cannot be built for a module (bad factorisation, rank or mode)."""


@dataclass(frozen=True)
class HeadInfo:
    """Attention geometry used by ``factorize_by_head`` and the ``"head"`` spec.

    Attributes:
        num_heads: number of query heads ``H``.
        num_kv_heads: number of key/value heads ``H_kv`` (``H`` without grouped-query attention).
        head_dim: width of one head.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_model_config(cls, config: Any) -> HeadInfo | None:
        """Read the head geometry of a transformers config (or its text sub-config); ``None`` if absent."""
        if config is None:
            return None
        if isinstance(config, Mapping):
            get = config.get
        else:
            if hasattr(config, "get_text_config"):
                config = config.get_text_config()
            get = lambda key, default=None: getattr(config, key, default)  # noqa: E731
        heads = get("num_attention_heads") or get("n_head") or get("num_heads")
        hidden = get("hidden_size") or get("d_model") or get("n_embd")
        if not heads:
            return None
        kv_heads = get("num_key_value_heads") or get("num_kv_heads") or heads
        if get("multi_query") and not get("new_decoder_architecture"):
            kv_heads = 1  # Falcon's multi-query attention
        head_dim = get("head_dim") or get("d_kv") or (hidden // heads if hidden else None)
        if not head_dim:
            return None
        return cls(int(heads), int(kv_heads), int(head_dim))


@dataclass(frozen=True)
class BlockPlan:
    """How one ``(out, in)`` weight is cut into blocks and which rank each block keeps.

    Attributes:
        out_features: rows of the weight.
        in_features: columns of the weight.
        out_blocks: ``m``, number of blocks along the output dimension.
        out_block_size: ``a``, rows per block (``m·a = out``).
        in_blocks: ``n``, number of blocks along the input dimension.
        in_block_size: ``b``, columns per block (``n·b = in``).
        rank: ``r``, singular directions kept per block (``1 <= r <= min(a, b)``).
        decomp_mode: the resolved decomposition mode.
    """

    out_features: int
    in_features: int
    out_blocks: int
    out_block_size: int
    in_blocks: int
    in_block_size: int
    rank: int
    decomp_mode: str

    @property
    def num_blocks(self) -> int:
        """Total number of blocks ``m·n``."""
        return self.out_blocks * self.in_blocks

    @property
    def full_rank(self) -> int:
        """``min(a, b)``: the rank at which the block factorisation is lossless."""
        return min(self.out_block_size, self.in_block_size)

    @property
    def left_core_numel(self) -> int:
        """Elements of the output-side core ``L``: ``m·n·r·a``."""
        return self.num_blocks * self.rank * self.out_block_size

    @property
    def right_core_numel(self) -> int:
        """Elements of the input-side core ``R``: ``m·n·r·b``."""
        return self.num_blocks * self.rank * self.in_block_size

    @property
    def singular_values_numel(self) -> int:
        """Elements of ``S``: ``m·n·r``."""
        return self.num_blocks * self.rank

    def describe(self) -> str:
        """One line such as ``576x576 -> 1x24 blocks of 576x24, rank 24``."""
        return (
            f"{self.out_features}x{self.in_features} -> {self.out_blocks}x{self.in_blocks} blocks of "
            f"{self.out_block_size}x{self.in_block_size}, rank {self.rank}"
        )


def closest_factor_pair(dim: int) -> tuple[int, int]:
    """Divisor pair ``(count, size)`` of ``dim`` with the smallest gap, smaller factor first.

    Examples: 4096 → (64, 64), 14336 → (112, 128), 576 → (24, 24), 1536 → (32, 48).
    A prime degrades to ``(1, dim)``.
    """
    if dim <= 0:
        raise FactorizationError(f"cannot factorise a dimension of size {dim}")
    best = (1, dim)
    for count in range(1, math.isqrt(dim) + 1):
        if dim % count == 0:
            best = (count, dim // count)
    return best


def divisor_pairs(dim: int) -> list[tuple[int, int]]:
    """All ``(count, size)`` pairs with ``count·size = dim``, used in error messages."""
    return [(c, dim // c) for c in range(1, dim + 1) if dim % c == 0]


def canonical_decomp_mode(mode: str) -> str:
    """Resolve an alias (``output``, ``input_block`` …) to one of :data:`DECOMP_MODES`."""
    key = str(mode).strip().lower()
    if key not in _DECOMP_ALIASES:
        raise FactorizationError(
            f"unknown decomp_mode {mode!r}; use one of {DECOMP_MODES} "
            f"(aliases: {sorted(k for k in _DECOMP_ALIASES if k not in DECOMP_MODES)})"
        )
    return _DECOMP_ALIASES[key]


# --------------------------------------------------------------------------------------------
# Per-module specs: scalar, "n,b", or a dict over groups / leaf names.
# --------------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_.]*)(\s*:)")


def _parse_literal(text: str) -> Any:
    """Parse a JSON or Python literal, accepting bare keys and values (``{qkv: head, o: '32,128'}``)."""
    keys_quoted = _BARE_KEY.sub(r'\1"\2"\3', text)
    values_quoted = re.sub(r":\s*([A-Za-z_][A-Za-z0-9_]*)", r': "\1"', keys_quoted)
    for candidate in (text, keys_quoted, values_quoted):
        for parse in (json.loads, ast.literal_eval):
            try:
                return parse(candidate)
            except (ValueError, SyntaxError):
                pass
    raise FactorizationError(f'cannot parse the spec {text!r}; write it as JSON, e.g. {{"o": "closest"}}')


def parse_factor_value(value: Any, *, what: str = "input_factorization") -> FactorSpec:
    """Normalise one factorisation value: ``None``, ``"closest"``, ``"head"`` or ``(count, size)``."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "default"):
            return None
        if text.lower() in ("closest", "head"):
            return text.lower()
        numbers = re.findall(r"-?\d+", text)
        if len(numbers) == 2 and re.fullmatch(r"[\s(\[]*-?\d+\s*[,x×\s]\s*-?\d+[\s)\]]*", text):
            value = (int(numbers[0]), int(numbers[1]))
        else:
            raise FactorizationError(
                f"{what}: cannot read {value!r}; use 'closest', 'head', 'n,b' (blocks, block size) "
                "or a dict over qkv / o / mlp_upgate / mlp_down / leaf names"
            )
    if isinstance(value, (tuple, list)) and len(value) == 2:
        count, size = (int(v) for v in value)
        if count <= 0 or size <= 0:
            raise FactorizationError(f"{what}: block counts and sizes must be positive, got {tuple(value)}")
        return (count, size)
    raise FactorizationError(f"{what}: cannot read {value!r}; expected 'closest', 'head' or (blocks, block_size)")


def parse_module_spec(spec: Any, *, what: str, value_parser=None) -> Any:
    """Normalise a scalar-or-dict spec (strings holding JSON / Python dict literals are accepted).

    Dict keys may be group names (:data:`MODULE_GROUPS` and aliases) or leaf module names; the
    result maps canonical keys to parsed values. Unknown keys are kept as leaf names.
    """
    parse = value_parser or (lambda v: parse_factor_value(v, what=what))
    if isinstance(spec, str) and spec.strip().startswith("{"):
        spec = _parse_literal(spec.strip())
    if isinstance(spec, Mapping):
        out = {}
        for key, value in spec.items():
            key = _GROUP_ALIASES.get(str(key), str(key))
            out[key] = parse(value)
        return out
    return parse(spec)


def spec_for_module(spec: Any, leaf_name: str) -> Any:
    """Pick the value of a parsed spec for one module: a leaf key wins over a group key."""
    if not isinstance(spec, Mapping):
        return spec
    if leaf_name in spec:
        return spec[leaf_name]
    for group, members in MODULE_GROUPS.items():
        if group in spec and leaf_name in members:
            return spec[group]
    return None


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


def _check_pair(pair: tuple[int, int], dim: int, side: str, module_name: str) -> tuple[int, int]:
    if pair[0] * pair[1] != dim:
        close = closest_factor_pair(dim)
        raise FactorizationError(
            f"module '{module_name}': {side}_factorization {pair} gives {pair[0]}·{pair[1]} = {pair[0] * pair[1]}, "
            f"but {side}_features = {dim}. Fix: use a pair whose product is {dim}, e.g. the closest pair {close}, "
            f"or one of {divisor_pairs(dim)[:8]}…"
        )
    return pair


def _resolve_side(
    dim: int,
    side: str,
    spec: FactorSpec,
    leaf_name: str,
    heads: HeadInfo | None,
    factorize_by_head: bool,
    module_name: str,
) -> tuple[int, int]:
    """Resolve one side's ``(count, size)``: explicit spec > factorize_by_head > closest pair.

    Attention layers are recognised by :func:`fura.tuner.heads.attention_role` (any architecture's names): the
    reference splits the q/k/v outputs and the attention output's input by head.
    """
    if isinstance(spec, tuple):
        return _check_pair(spec, dim, side.replace("in", "input").replace("out", "output"), module_name)
    if spec == "closest":
        return closest_factor_pair(dim)
    path = module_name if module_name.rsplit(".", 1)[-1] == leaf_name else leaf_name
    if spec == "head":
        return head_pair(path, side, heads, dim) or closest_factor_pair(dim)
    if factorize_by_head and aligned_side(path) == side:
        return head_pair(path, side, heads, dim) or closest_factor_pair(dim)
    return closest_factor_pair(dim)


def parse_rank(rank: Any, what: str = "rank") -> RankSpec:
    """Check a rank spec's form, independently of any weight: ``"full"``, an int ``>= 1`` or a float in ``(0, 1)``.

    Strings holding a number (``"16"``, ``"0.25"``) become that number; the result is what :func:`resolve_rank`
    resolves per module. ``what`` names the value in the message (``rank``, ``rank_pattern['q_proj']``).
    """
    if isinstance(rank, bool) or not isinstance(rank, (str, int, float)):
        raise FactorizationError(f"{what} must be 'full', an int or a float, got {rank!r}")
    if isinstance(rank, str):
        text = rank.strip().lower()
        if text == "full":
            return "full"
        try:
            rank = float(text) if any(c in text for c in ".e") else int(text)
        except ValueError:
            raise FactorizationError(
                f"{what} {rank!r} is not 'full', an int or a float. Fix: e.g. rank='full', 16 or 0.25."
            ) from None
    if isinstance(rank, int) and rank <= 0:
        raise FactorizationError(f"{what} must be positive, got {rank}. Use 'full' or an int >= 1.")
    if isinstance(rank, float) and not 0.0 < rank < 1.0:
        raise FactorizationError(f"a float {what} is a parameter budget in (0, 1), got {rank}.")
    return rank


def resolve_rank(rank: RankSpec, m: int, n: int, a: int, b: int, module_name: str = "<module>") -> int:
    """Resolve a rank spec into an int ``r`` with ``1 <= r <= min(a, b)``.

    ``"full"`` → ``min(a, b)`` (lossless). An ``int`` is taken as is but must lie in
    ``1..min(a, b)`` (the reference silently creates dead, untrainable slots above that).
    A ``float`` in ``(0, 1)`` is a parameter budget: the two cores together hold about
    ``rank · out · in`` numbers, i.e. ``r ≈ rank·out·in / (m·n·(a+b))`` (floor or ceil, whichever
    total is closer; ties go to floor). The spec's form is checked by :func:`parse_rank`.
    """
    full = min(a, b)
    if not isinstance(rank, int) or isinstance(rank, bool):  # an int gets the range check below, with its bounds
        try:
            rank = parse_rank(rank)
        except FactorizationError as exc:
            raise FactorizationError(f"module '{module_name}': {exc}") from None
    if rank == "full":
        return full
    if isinstance(rank, float):
        target = rank * (m * a) * (n * b)
        per_rank = m * n * (a + b)
        low = max(1, math.floor(target / per_rank))
        high = max(1, math.ceil(target / per_rank))
        chosen = low if abs(low * per_rank - target) <= abs(high * per_rank - target) else high
        return min(chosen, full)
    if not 1 <= rank <= full:
        raise FactorizationError(
            f"module '{module_name}': rank {rank} is outside 1..{full} = min(a, b) for blocks of {a}x{b}. "
            f"Fix: use rank='full' (={full}) or an int in 1..{full}; ranks above min(a, b) would only add dead, "
            "untrainable slots."
        )
    return rank


def make_plan(
    out_features: int,
    in_features: int,
    *,
    decomp_mode: str = "output_one_block",
    rank: RankSpec = "full",
    input_factorization: FactorSpec = None,
    output_factorization: FactorSpec = None,
    leaf_name: str = "",
    heads: HeadInfo | None = None,
    factorize_by_head: bool = False,
    module_name: str = "<module>",
) -> BlockPlan:
    """Resolve the block grid and rank of one weight.

    Args:
        out_features: rows ``out`` of the weight.
        in_features: columns ``in`` of the weight.
        decomp_mode: ``square``, ``output_one_block`` or ``input_one_block`` (aliases accepted).
        rank: ``"full"``, an int or a float budget (see :func:`resolve_rank`).
        input_factorization: ``None``, ``"closest"``, ``"head"`` or ``(n, b)`` for the input side.
        output_factorization: same for the output side (used by ``square`` / ``input_one_block``).
        leaf_name: last component of the module name (``q_proj`` …), for head splits.
        heads: attention geometry for ``factorize_by_head`` / ``"head"``.
        factorize_by_head: split q/k/v outputs and the o_proj input by attention head.
        module_name: full module name, used in error messages.
    """
    mode = canonical_decomp_mode(decomp_mode)
    m, a = _resolve_side(out_features, "out", output_factorization, leaf_name, heads, factorize_by_head, module_name)
    n, b = _resolve_side(in_features, "in", input_factorization, leaf_name, heads, factorize_by_head, module_name)
    if mode == "output_one_block":
        m, a = 1, out_features
    elif mode == "input_one_block":
        n, b = 1, in_features
    r = resolve_rank(rank, m, n, a, b, module_name)
    return BlockPlan(out_features, in_features, m, a, n, b, r, mode)


# --------------------------------------------------------------------------------------------
# Blocks and decompositions
# --------------------------------------------------------------------------------------------


def split_blocks(weight: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """``(out, in)`` → ``(m·n, a, b)`` with flat index ``i·n + j`` (a copy)."""
    m, a, n, b = plan.out_blocks, plan.out_block_size, plan.in_blocks, plan.in_block_size
    return weight.reshape(m, a, n, b).permute(0, 2, 1, 3).reshape(m * n, a, b)


def merge_blocks(blocks: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Inverse of :func:`split_blocks`: ``(m·n, a, b)`` → ``(out, in)``."""
    m, a, n, b = plan.out_blocks, plan.out_block_size, plan.in_blocks, plan.in_block_size
    return blocks.reshape(m, n, a, b).permute(0, 2, 1, 3).reshape(m * a, n * b)


def decomposition_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decompose half-precision weights in float32, keep float32 / float64 as they are."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``count`` inside the block (``None`` or 0: left as it is), restored after."""
    if not count:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def lapack_threads(device: torch.device) -> AbstractContextManager[None]:
    """Run many tiny LAPACK calls single-threaded on CPU (measured 3–100× faster here), then restore."""
    return torch_threads(1 if device.type == "cpu" else None)


def block_svd(
    blocks: torch.Tensor, rank: int, factors: str = "both"
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Batched thin SVD of ``(B, a, b)`` blocks, keeping the top ``rank`` directions.

    Runs on the device of ``blocks``. float64 blocks use LAPACK's SVD (``full_matrices=False``).
    float32 / half blocks use the eigendecomposition of the small Gram matrix ``BᵀB`` (or ``BBᵀ``
    for wide blocks) formed in float64: the same singular pairs, with error ``ε₆₄·κ²`` instead of
    float32 SVD's ``ε₃₂·κ`` — more accurate for any block condition number ``κ < 10⁸`` (on
    SmolLM2's blocks: 1e-14 vs 2e-6 relative error in σ) and several times faster on CPU. The
    other factor is recovered as ``U = B V / σ`` (zero for zero singular values).

    Args:
        blocks: ``(B, a, b)`` blocks.
        rank: directions kept, ``r <= min(a, b)``.
        factors: ``"both"``, or only ``"left"`` (U) / ``"right"`` (Vh) — the other is returned as None.

    Returns:
        ``U: (B, a, r)``, ``S: (B, r)`` (≥ 0, descending), ``Vh: (B, r, b)``, in float32
        (float64 for float64 blocks).
    """
    work_dtype = decomposition_dtype(blocks.dtype)
    if work_dtype == torch.float64:
        with lapack_threads(blocks.device):
            u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
        return u[..., :rank].contiguous(), s[..., :rank].clamp_min(0).contiguous(), vh[..., :rank, :].contiguous()
    wide = blocks.shape[-2] < blocks.shape[-1]
    exact = blocks.to(torch.float64)
    oriented = exact.transpose(-1, -2) if wide else exact  # (B, rows >= cols)
    gram = oriented.transpose(-1, -2) @ oriented
    with lapack_threads(blocks.device):
        eigenvalues, vectors = torch.linalg.eigh(gram)
    sigma = eigenvalues.flip(-1)[..., :rank].clamp_min(0).sqrt()
    short_side = vectors.flip(-1)[..., :rank]  # (B, cols, r): V for tall blocks, U for wide ones
    want_long = factors == "both" or (factors == "left") != wide
    long_side = None
    if want_long:
        inverse = torch.where(sigma > 0, 1.0 / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), torch.zeros_like(sigma))
        long_side = (oriented @ short_side).mul_(inverse.unsqueeze(-2))  # (B, rows, r)
    u, v = (short_side, long_side) if wide else (long_side, short_side)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(work_dtype).contiguous()

    return (
        cast(u) if factors != "right" else None,
        cast(sigma),
        cast(v.transpose(-1, -2)) if factors != "left" and v is not None else None,
    )


def block_qr(blocks: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched QR-type split ``W = L · R`` of ``(B, a, b)`` blocks, keeping the leading ``rank``.

    For ``a >= b`` an LQ split is used (``Wᵀ = Q'R'``, ``L = R'ᵀ`` lower-trapezoidal, ``R = Q'ᵀ``
    with orthonormal rows); for ``a < b`` a QR split (``L = Q`` orthonormal columns, ``R`` upper).
    Truncation keeps the leading directions (not Frobenius-optimal).

    Returns:
        ``L: (B, a, r)``, ``R: (B, r, b)``.
    """
    work = blocks.to(decomposition_dtype(blocks.dtype))
    a, b = work.shape[-2:]
    with lapack_threads(work.device):
        if a >= b:
            q, r = torch.linalg.qr(work.transpose(-1, -2), mode="reduced")  # (B, b, b), (B, b, a)
            left, right = r.transpose(-1, -2), q.transpose(-1, -2)
        else:
            left, right = torch.linalg.qr(work, mode="reduced")  # (B, a, a), (B, a, b)
    return left[..., :rank].contiguous(), right[..., :rank, :].contiguous()
