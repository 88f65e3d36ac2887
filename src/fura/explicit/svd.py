r"""``SVDLinear``: the full-rank SVD reparameterisation baseline of the FuRA paper.

The whole weight gets one thin SVD, ``W = U · diag(S) · Vh`` with ``k = min(out, in)``, stored as

==========  ============  =====================================================
parameter   shape         init (by the resolved ``s_merged_to``)
==========  ============  =====================================================
``svd_a``   ``(out, k)``  ``U`` (``output``: ``U·S``; ``split``: ``U·√S``)
``svd_b``   ``(k, in)``   ``Vh`` (``input``: ``S·Vh``; ``split``: ``√S·Vh``)
``svd_s``   ``(k,)``      ``S``, only for ``keep_frozen`` / ``keep_trainable``
==========  ============  =====================================================

and ``train_position`` picks which factor trains: ``output`` (``svd_a``, the column basis — the
launchers' default, with S merged into the frozen ``svd_b``), ``input`` (``svd_b``) or ``both``.

Unlike the reference (which rebuilds ``W = a·diag(s)·b`` on every call) the forward never forms the
dense weight: ``y = ((x @ svd_bᵀ) ⊙ s) @ svd_aᵀ + bias`` costs ``2·k·(in + out)`` FLOPs per token,
the same order as the dense layer for ``k = min(out, in)``. Initialisation works on any device.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fura.explicit.btt import check_compat_kwargs, iter_target_linears
from fura.tuner.base_weight import read_dense_weight
from fura.tuner.factorize import decomposition_dtype

SVD_TRAIN_POSITIONS = ("output", "input", "both")
SVD_S_MERGED_TO = ("keep_frozen", "keep_trainable", "split", "output", "input")


def resolve_svd_s_merged_to(train_position: str, s_merged_to: str | None, module_name: str = "<module>") -> str:
    """Resolve ``s_merged_to`` for :class:`SVDLinear` to one of :data:`SVD_S_MERGED_TO`.

    ``None`` → ``split`` for ``both``, else ``frozen``; ``trainable`` → the trained side; ``frozen`` →
    the other side (both are ``split`` under ``both``); concrete placements pass through.
    """
    if train_position not in SVD_TRAIN_POSITIONS:
        raise ValueError(
            f"module '{module_name}': unknown train_position {train_position!r} for SVDLinear; use one of "
            f"{SVD_TRAIN_POSITIONS}"
        )
    if s_merged_to is None:
        s_merged_to = "split" if train_position == "both" else "frozen"
    if s_merged_to in SVD_S_MERGED_TO:
        return s_merged_to
    if s_merged_to not in ("frozen", "trainable"):
        raise ValueError(
            f"module '{module_name}': unknown s_merged_to {s_merged_to!r}. Fix: use one of {SVD_S_MERGED_TO} or the "
            "aliases 'frozen' / 'trainable' / None."
        )
    if train_position == "both":
        return "split"
    other = {"output": "input", "input": "output"}
    return train_position if s_merged_to == "trainable" else other[train_position]


class SVDLinear(nn.Module):
    """A linear layer stored as ``W = svd_a · diag(svd_s) · svd_b`` (see the module docstring).

    Args:
        in_features: ``in``.
        out_features: ``out``.
        s_merged_to: placement of the singular values (:func:`resolve_svd_s_merged_to`).
        train_position: ``output`` / ``input`` / ``both`` — factors that get ``requires_grad=True``.
        bias: whether the layer has a bias.
        module_name: used in error messages.

    Factors are allocated uninitialised; call :meth:`init_from_linear_weight` before use.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        s_merged_to: str | None = None,
        train_position: str = "output",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        module_name: str = "<module>",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.module_name = in_features, out_features, module_name
        self.s_merged_to = resolve_svd_s_merged_to(train_position, s_merged_to, module_name)
        self.rank = min(in_features, out_features)
        kw = {"device": device, "dtype": dtype}
        self.svd_a = nn.Parameter(torch.empty(out_features, self.rank, **kw))
        self.svd_b = nn.Parameter(torch.empty(self.rank, in_features, **kw))
        self.svd_s = nn.Parameter(torch.empty(self.rank, **kw)) if self.s_merged_to.startswith("keep_") else None
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.set_trainable(train_position, train_singular_values=self.s_merged_to == "keep_trainable")

    def set_trainable(
        self, train_position: str, *, train_bias: bool = True, train_singular_values: bool = False
    ) -> None:
        """Set requires_grad: ``svd_a`` for ``output|both``, ``svd_b`` for ``input|both``, ``svd_s``, bias by flag."""
        resolve_svd_s_merged_to(train_position, "split", self.module_name)  # validates train_position
        self.train_position = train_position
        self.svd_a.requires_grad_(train_position in ("output", "both"))
        self.svd_b.requires_grad_(train_position in ("input", "both"))
        if self.svd_s is not None:
            self.svd_s.requires_grad_(train_singular_values)
        if self.bias is not None:
            self.bias.requires_grad_(train_bias)

    @torch.no_grad()
    def init_from_linear_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> SVDLinear:
        """Thin SVD of ``weight: (out, in)`` on its device (float32 for half dtypes), placed by ``s_merged_to``."""
        where = f"module '{self.module_name}'"
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{where}: weight has shape {tuple(weight.shape)} but the layer expects "
                f"({self.out_features}, {self.in_features}) (out x in). Fix: pass the matching weight."
            )
        if (bias is None) != (self.bias is None):
            raise ValueError(
                f"{where}: bias presence differs from the source. Fix: construct with bias={bias is not None}."
            )
        work = weight.to(self.svd_a.device, decomposition_dtype(weight.dtype))
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        s = s.clamp_min(0)
        placement = self.s_merged_to
        if placement == "split":
            u, vh = u * s.sqrt(), s.sqrt()[:, None] * vh
        elif placement == "output":
            u = u * s
        elif placement == "input":
            vh = s[:, None] * vh
        self.svd_a.copy_(u)
        self.svd_b.copy_(vh)
        if self.svd_s is not None:
            self.svd_s.copy_(s)
        if bias is not None:
            self.bias.copy_(bias)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Module, **kwargs: Any) -> SVDLinear:
        """Build and initialise a layer from an ``nn.Linear`` (bitsandbytes layers are dequantised)."""
        weight = read_dense_weight(linear)
        bias = getattr(linear, "bias", None)
        kw = {"bias": bias is not None, "device": weight.device, "dtype": weight.dtype}
        layer = cls(linear.in_features, linear.out_features, **kw, **kwargs)
        return layer.init_from_linear_weight(weight, None if bias is None else bias.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = ((x @ svd_bᵀ) ⊙ s) @ svd_aᵀ + bias`` — two thin products, no dense weight."""
        inner = F.linear(x, self.svd_b)  # (..., k)
        if self.svd_s is not None:
            inner = inner * self.svd_s
        return F.linear(inner, self.svd_a, self.bias)

    def materialize_dense_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight ``svd_a · diag(svd_s) · svd_b``."""
        a = self.svd_a if self.svd_s is None else self.svd_a * self.svd_s
        return a @ self.svd_b

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"s_merged_to={self.s_merged_to}, train_position={self.train_position}, bias={self.bias is not None}"
        )


def convert_linear_to_svd(
    model: nn.Module,
    skip_names: Iterable[str] = ("lm_head",),
    include_names: Iterable[str] | None = None,
    s_merged_to: str | None = None,
    train_position: str = "output",
    allow_non_cuda: bool = True,
    *,
    show_progress: bool = True,
    **ignored: Any,
) -> list[str]:
    """Replace every targeted ``nn.Linear`` by an initialised :class:`SVDLinear`, in place; returns the names."""
    check_compat_kwargs("convert_linear_to_svd", ignored)
    targets = list(iter_target_linears(model, skip_names, include_names))
    converted = []
    for name, linear in tqdm(targets, desc="Linear -> SVD", disable=not show_progress):
        layer = SVDLinear.from_linear(linear, s_merged_to=s_merged_to, train_position=train_position, module_name=name)
        model.set_submodule(name, layer)
        converted.append(name)
    return converted


def configure_svd_trainability(
    model: nn.Module,
    train_position: str = "output",
    train_bias: bool = True,
    train_embed_lm_head: bool = False,
    train_singular_values: bool = False,
) -> dict[str, int]:
    """Freeze every parameter, then per :class:`SVDLinear` train the factor(s) of ``train_position``, ``svd_s``
    iff ``train_singular_values``, the bias iff ``train_bias``; ``train_embed_lm_head`` also trains the input
    embeddings and the ``lm_head``.

    Returns:
        ``{"layers", "trainable_params", "total_params"}``.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    layers = 0
    for module in model.modules():
        if isinstance(module, SVDLinear):
            module.set_trainable(train_position, train_bias=train_bias, train_singular_values=train_singular_values)
            layers += 1
    if train_embed_lm_head:
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head"):
                module.requires_grad_(True)
        getters = ("get_input_embeddings", "get_output_embeddings")
        for module in (getattr(model, g)() for g in getters if hasattr(model, g)):
            if module is not None:
                module.requires_grad_(True)
    return {
        "layers": layers,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
