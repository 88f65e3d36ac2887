"""Attention roles of linear layers, whatever an architecture names them, and their attention-head block splits.

FuRA's most important design choice is where the blocks fall (the paper's ablation: head-aligned blocks 88.1 vs
blocks of 8 at 80.0 on commonsense). The attention output's input and the q/k/v outputs are concatenations of
attention heads, so blocks of one head width keep each block inside one head. Architectures name these layers
differently; this module recognises them by name *and* shape:

=================  ====================================================================================
role               examples (module path)
=================  ====================================================================================
``output``         ``self_attn.o_proj`` (Llama), ``attention.dense`` (GPT-NeoX, Falcon, Bloom, Phi),
                   ``self_attn.out_proj`` (OPT, BART, CLIP, GPT-J), ``SelfAttention.o`` (T5),
                   ``attn.c_proj`` (GPT-2), ``attention.output.dense`` (BERT, RoBERTa, ViT)
``query``          ``q_proj``, ``attention.self.query`` (BERT), ``SelfAttention.q`` (T5)
``key_value``      ``k_proj`` / ``v_proj``, ``key`` / ``value``, ``k`` / ``v``
``fused``          ``attn.c_attn`` (GPT-2), ``query_key_value`` (GPT-NeoX, Falcon, Bloom), ``qkv_proj`` (Phi-3)
=================  ====================================================================================

Outside an attention block (a path component containing ``attn`` / ``attention``) only the unambiguous Llama names
count, so an MLP's ``dense`` or ``c_proj`` is never taken for an attention output. The shape must match the model's
head geometry too (:func:`head_pair`), otherwise the caller falls back to the closest divisor pair.
"""

from __future__ import annotations

import re
from typing import Protocol

_ATTENTION_SCOPE = re.compile(r"attn|attention", re.IGNORECASE)
OUTPUT_LEAVES = frozenset({"o_proj", "out_proj", "dense", "o", "c_proj", "attn_out", "out_lin", "wo", "out", "proj"})
QUERY_LEAVES = frozenset({"q_proj", "query", "q", "wq", "q_lin"})
KEY_VALUE_LEAVES = frozenset({"k_proj", "v_proj", "key", "value", "k", "v", "wk", "wv", "k_lin", "v_lin"})
FUSED_LEAVES = frozenset({"c_attn", "query_key_value", "qkv_proj", "qkv", "wqkv", "Wqkv", "att_proj", "in_proj"})
#: Llama-style names that mean the same role anywhere.
_UNAMBIGUOUS = {"o_proj": "output", "q_proj": "query", "k_proj": "key_value", "v_proj": "key_value"}


class Heads(Protocol):
    """The head geometry (see :class:`fura.tuner.factorize.HeadInfo`)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


def attention_role(module_name: str) -> str | None:
    """``"output"``, ``"query"``, ``"key_value"``, ``"fused"`` or ``None`` for a module path such as
    ``model.layers.0.self_attn.o_proj``."""
    *scope, leaf = module_name.split(".")
    if leaf in _UNAMBIGUOUS:
        return _UNAMBIGUOUS[leaf]
    if not any(_ATTENTION_SCOPE.search(part) for part in scope):
        return None
    for role, leaves in (
        ("output", OUTPUT_LEAVES),
        ("query", QUERY_LEAVES),
        ("key_value", KEY_VALUE_LEAVES),
        ("fused", FUSED_LEAVES),
    ):
        if leaf in leaves:
            return role
    return None


def head_pair(module_name: str, side: str, heads: Heads | None, dim: int) -> tuple[int, int] | None:
    """``(blocks, head_dim)`` splitting ``dim`` (the ``"in"`` or ``"out"`` side of the module) at head boundaries.

    The attention output's input, and the q / k / v (or fused qkv) outputs, are heads side by side; a q/k/v input is
    split by head only when it has the width of all heads (the explicit ``"head"`` spec). ``None`` when the module
    has no attention role or its shape does not match the geometry.
    """
    role = attention_role(module_name)
    if heads is None or role is None or heads.head_dim <= 0:
        return None
    width, all_heads = heads.head_dim, heads.num_heads * heads.head_dim
    if side == "in":
        return (heads.num_heads, width) if dim == all_heads else None
    if role == "query" and dim == all_heads:
        return (heads.num_heads, width)
    if role == "key_value" and dim in (heads.num_kv_heads * width, all_heads):
        return (dim // width, width)
    if role == "fused" and dim % width == 0:
        count = dim // width
        if count in (3 * heads.num_heads, heads.num_heads + 2 * heads.num_kv_heads, heads.num_heads + 2):
            return (count, width)
    return None


def aligned_side(module_name: str) -> str | None:
    """The side ``factorize_by_head`` splits by head: ``"in"`` for attention outputs, ``"out"`` for q/k/v."""
    role = attention_role(module_name)
    if role is None:
        return None
    return "in" if role == "output" else "out"
