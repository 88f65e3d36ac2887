"""SVDLinear: the full-rank SVD reparameterisation baseline."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fura.explicit.svd import SVDLinear, configure_svd_trainability, convert_linear_to_svd, resolve_svd_s_merged_to

F64 = torch.float64
SHAPES = [(48, 32), (32, 48), (30, 30)]
POSITIONS = ["output", "input", "both"]
S_OPTIONS = [None, "keep_frozen", "keep_trainable", "split", "output", "input", "frozen", "trainable"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny matrices: intra-op threads only add OpenMP overhead (100x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lossless_every_placement(shape):
    out_f, in_f = shape
    torch.manual_seed(0)
    weight, bias = torch.randn(out_f, in_f, dtype=F64), torch.randn(out_f, dtype=F64)
    x = torch.randn(4, 3, in_f, dtype=F64)
    for position, s_merged_to in itertools.product(POSITIONS, S_OPTIONS):
        layer = SVDLinear(in_f, out_f, s_merged_to=s_merged_to, train_position=position, dtype=F64)
        layer.init_from_linear_weight(weight, bias)
        assert layer.svd_a.shape == (out_f, min(shape)) and layer.svd_b.shape == (min(shape), in_f)
        assert (layer.materialize_dense_weight() - weight).abs().max() <= 1e-12
        assert (layer(x) - (x @ weight.T + bias)).abs().max() <= 1e-12


def test_placement_aliases():
    assert resolve_svd_s_merged_to("output", None) == "input"  # launcher default: S into the frozen svd_b
    assert resolve_svd_s_merged_to("output", "trainable") == "output"
    assert resolve_svd_s_merged_to("input", "frozen") == "output"
    assert resolve_svd_s_merged_to("both", None) == resolve_svd_s_merged_to("both", "frozen") == "split"
    with pytest.raises(ValueError, match=r"'blk'.*'middle'.*Fix"):
        resolve_svd_s_merged_to("output", "middle", "blk")
    with pytest.raises(ValueError, match="train_position"):
        resolve_svd_s_merged_to("small", None)


def test_forward_never_builds_the_dense_weight(monkeypatch):
    layer = SVDLinear.from_linear(nn.Linear(32, 48))
    monkeypatch.setattr(SVDLinear, "materialize_dense_weight", lambda self: pytest.fail("dense weight built"))
    layer(torch.randn(2, 32)).sum().backward()


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 32)
        self.q_proj = nn.Linear(32, 48)
        self.down_proj = nn.Linear(48, 32, bias=False)
        self.lm_head = nn.Linear(32, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.down_proj(self.q_proj(self.embed_tokens(ids))))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize(("train_s", "train_bias", "embed"), [(False, True, False), (True, False, True)])
def test_trainability_flags_and_gradients(position, train_s, train_bias, embed):
    torch.manual_seed(0)
    model = Toy().double()
    ids = torch.randint(0, 10, (2, 5))
    before = model(ids)
    names = convert_linear_to_svd(model, s_merged_to="keep_trainable", train_position=position, show_progress=False)
    assert names == ["q_proj", "down_proj"]
    assert (model(ids) - before).abs().max() <= 1e-12
    counts = configure_svd_trainability(model, position, train_bias, embed, train_singular_values=train_s)
    expected = {"q_proj.bias": train_bias}
    for layer in ("q_proj", "down_proj"):
        expected[f"{layer}.svd_a"] = position in ("output", "both")
        expected[f"{layer}.svd_b"] = position in ("input", "both")
        expected[f"{layer}.svd_s"] = train_s
    for name in ("embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
        expected[name] = embed
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert flags == expected
    assert counts["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model(ids).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


def test_launcher_default_trains_the_column_basis():
    """train_position=output, s_merged_to=frozen: svd_a = U trains, out·min(out, in) numbers per module."""
    layer = SVDLinear.from_linear(nn.Linear(32, 48), s_merged_to="frozen", train_position="output")
    assert layer.s_merged_to == "input" and layer.svd_s is None
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == 48 * 32 + 48  # svd_a + bias
    assert torch.allclose(layer.svd_a.T @ layer.svd_a, torch.eye(32), atol=1e-5)


def test_errors_and_half_precision():
    layer = SVDLinear(32, 48, module_name="blk")
    with pytest.raises(ValueError, match=r"blk.*\(32, 48\).*\(48, 32\)"):
        layer.init_from_linear_weight(torch.randn(32, 48), torch.randn(48))
    with pytest.raises(ValueError, match=r"blk.*bias"):
        layer.init_from_linear_weight(torch.randn(48, 32))
    linear = nn.Linear(64, 40).to(torch.bfloat16)
    half = SVDLinear.from_linear(linear)
    assert half.svd_a.dtype == torch.bfloat16
    rel = (half.materialize_dense_weight().float() - linear.weight.float()).norm() / linear.weight.float().norm()
    assert rel < 1e-2
