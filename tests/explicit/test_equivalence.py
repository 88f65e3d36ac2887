"""The implicit PEFT form equals the explicit reference layer: outputs and gradients (float64).

For every combination both forms support (decomposition mode × singular-value placement × SVD/QR ×
full/truncated rank) the two are initialised from the same weight, given the same random
perturbation of the trained core R (or L) and of S, and compared: outputs within 1e-10 relative
(at full rank; at a truncated rank the implicit form adds the frozen residual W0 − W0·V·Vᵀ, which
is checked exactly), gradients with respect to S and the core within 1e-10 relative.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import get_peft_model
from torch import nn

import fura
from fura.explicit.btt import BlockTTLinear

SHAPES = [(48, 32), (40, 24)]  # (out, in): output blocks are tall, input side wide enough for input_one_block
S_OPTIONS = ["keep_trainable", "keep_frozen", "frozen", "trainable", "split", "output", "input"]


class Wrapper(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _pair(shape, mode, s_merged_to, convert_mode, rank, factor):
    torch.manual_seed(0)
    out_features, in_features = shape
    linear = nn.Linear(in_features, out_features, bias=True, dtype=torch.float64)
    spec = {"input_factorization": factor} if mode == "output_one_block" else {"output_factorization": factor}
    implicit = get_peft_model(
        Wrapper(nn.Linear(in_features, out_features, bias=True, dtype=torch.float64)),
        fura.FuraConfig(
            target_modules=["proj"],
            decomp_mode=mode,
            s_merged_to=s_merged_to,
            convert_mode=convert_mode,
            rank=rank,
            factorize_by_head=False,
            **spec,
        ),
    )
    implicit.base_model.model.proj.base_layer.load_state_dict(linear.state_dict())
    layer = implicit.base_model.model.proj
    layer.reset_from_base("default", convert_mode)
    explicit = BlockTTLinear.from_linear(
        linear,
        convert_mode=convert_mode,
        decomp_mode=mode,
        rank=rank,
        s_merged_to=s_merged_to,
        train_position="small",
        module_name="proj",
        **spec,
    )
    explicit.set_trainable("small", train_bias=False, train_singular_values=s_merged_to == "keep_trainable")
    return linear, layer, explicit


def _explicit_core(explicit, mode):
    return explicit.btt_r if mode == "output_one_block" else explicit.btt_l


def _to_explicit_layout(core, mode):
    """Implicit ``(k, r, d)`` core → explicit ``btt_r (n, b, r)`` or ``btt_l (m, r, a)``."""
    return core.transpose(1, 2) if mode == "output_one_block" else core


CASES = [
    (shape, mode, s, conv, rank)
    for shape, mode, s, conv, rank in itertools.product(
        SHAPES, ["output_one_block", "input_one_block"], S_OPTIONS, ["svd", "qr"], ["full", 3]
    )
    if not (conv == "qr" and s in ("keep_trainable", "keep_frozen"))
]


@pytest.mark.parametrize(("shape", "mode", "s_merged_to", "convert_mode", "rank"), CASES)
@pytest.mark.filterwarnings("ignore:.*s_merged_to is ignored with convert_mode=.qr.")
def test_implicit_and_explicit_agree(shape, mode, s_merged_to, convert_mode, rank):
    factor = (4, shape[1] // 4) if mode == "output_one_block" else (4, shape[0] // 4)
    linear, layer, explicit = _pair(shape, mode, s_merged_to, convert_mode, rank, factor)
    core, scale = layer.fura_core["default"].weight, layer.fura_core["default"].scale
    explicit_core = _explicit_core(explicit, mode)
    assert explicit_core.requires_grad and core.requires_grad
    # same initial state (same deterministic decomposition in float64)
    torch.testing.assert_close(_to_explicit_layout(core, mode), explicit_core, rtol=0, atol=1e-12)

    generator = torch.Generator().manual_seed(1)
    delta_core = 0.1 * torch.randn(core.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        core.add_(delta_core)
        explicit_core.add_(_to_explicit_layout(delta_core, mode))
        if scale is not None:
            delta_s = 0.1 * torch.randn(scale.shape, generator=generator, dtype=torch.float64)
            scale.add_(delta_s)
            explicit.btt_s.add_(delta_s.reshape(explicit.btt_s.shape))

    x = torch.randn(7, shape[1], generator=generator, dtype=torch.float64)
    probe = torch.randn(7, shape[0], generator=generator, dtype=torch.float64)
    y_implicit, y_explicit = layer(x), explicit(x)
    if rank == "full":
        assert ((y_implicit - y_explicit).norm() / y_explicit.norm()) <= 1e-10
    else:
        # the implicit form keeps the tail W0 − W0·P (P = projection on the kept directions) frozen
        residual = _frozen_tail(linear.weight, layer, mode)
        expected = y_explicit + x @ residual.T
        assert ((y_implicit - expected).norm() / expected.norm()) <= 1e-10

    (y_implicit * probe).sum().backward()
    (y_explicit * probe).sum().backward()
    grad_core = _to_explicit_layout(core.grad, mode)
    assert ((grad_core - explicit_core.grad).norm() / explicit_core.grad.norm()) <= 1e-10
    if scale is not None:
        grad_s = explicit.btt_s.grad.reshape(scale.shape)
        assert ((scale.grad - grad_s).norm() / grad_s.norm()) <= 1e-10


def _frozen_tail(weight, layer, mode):
    basis = layer.fura_basis["default"].basis.detach()  # (k, d, r)
    k, d, _ = basis.shape
    projections = basis @ basis.transpose(1, 2)  # (k, d, d)
    w = weight.detach()
    if mode == "output_one_block":
        kept = torch.einsum("okd,kde->oke", w.reshape(-1, k, d), projections).reshape(w.shape)
    else:
        kept = torch.bmm(projections, w.reshape(k, d, -1)).reshape(w.shape)
    return w - kept


def test_implicit_training_trajectory_matches_the_explicit_layer():
    """Ten AdamW steps on the same data: the two forms follow the same trajectory."""
    linear, layer, explicit = _pair((48, 32), "output_one_block", "keep_trainable", "svd", "full", (4, 8))
    opt_implicit = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    opt_explicit = torch.optim.AdamW([explicit.btt_r, explicit.btt_s], lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    for _ in range(10):
        x = torch.randn(16, 32, generator=generator, dtype=torch.float64)
        target = torch.randn(16, 48, generator=generator, dtype=torch.float64)
        for model, optimizer in ((layer, opt_implicit), (explicit, opt_explicit)):
            loss = ((model(x) - target) ** 2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    x = torch.randn(5, 32, generator=generator, dtype=torch.float64)
    y_implicit, y_explicit = layer(x), explicit(x)
    assert ((y_implicit - y_explicit).norm() / y_explicit.norm()) <= 1e-9
    merged = linear.weight + layer.get_delta_weight("default")
    assert ((merged - explicit.materialize_dense_weight()).norm() / merged.norm()) <= 1e-9
