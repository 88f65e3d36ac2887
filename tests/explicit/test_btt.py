"""BlockTTLinear and the reference-compatible functional API (float64 exactness, trainability, errors)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

from fura.explicit.btt import (
    BlockTTLinear,
    configure_blocktt_trainability,
    convert_linear_to_btt,
    get_blocktt_target_module_names,
    normalize_trainable_blocktt_cores_,
    resolve_s_merged_to,
)
from fura.tuner.factorize import merge_blocks, split_blocks

SHAPES = [(48, 32), (32, 48), (24, 36), (30, 30)]  # (out, in)
MODES = ["square", "output_one_block", "input_one_block"]
POSITIONS = ["small", "large", "both"]
S_OPTIONS = [None, "keep_frozen", "keep_trainable", "split", "output", "input", "frozen", "trainable"]
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny matrices: intra-op threads only add OpenMP overhead (100x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g, dtype=F64), torch.randn(out_f, generator=g, dtype=F64)


def build(out_f: int, in_f: int, convert_mode: str = "svd", **kwargs) -> tuple[BlockTTLinear, torch.Tensor, ...]:
    weight, bias = dense(out_f, in_f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = BlockTTLinear(in_f, out_f, dtype=F64, **kwargs).init_from_linear_weight(weight, bias, convert_mode)
    return layer, weight, bias


# ------------------------------------------------------------------------------------------
# Lossless conversion over every combination
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convert_mode", ["svd", "qr"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lossless_every_combination(shape, mode, convert_mode):
    out_f, in_f = shape
    x = torch.randn(3, 5, in_f, dtype=F64)
    valid = 0
    for position, s_merged_to in itertools.product(POSITIONS, S_OPTIONS):
        kwargs = {"decomp_mode": mode, "train_position": position, "s_merged_to": s_merged_to}
        if position == "both" and s_merged_to in ("frozen", "trainable"):
            with pytest.raises(ValueError, match="train_position='both'"):
                build(out_f, in_f, convert_mode, **kwargs)
            continue
        if convert_mode == "qr" and s_merged_to in ("keep_frozen", "keep_trainable"):
            with pytest.raises(ValueError, match="convert_mode='qr'"):
                build(out_f, in_f, convert_mode, **kwargs)
            continue
        layer, weight, bias = build(out_f, in_f, convert_mode, **kwargs)
        assert (layer.materialize_dense_weight() - weight).abs().max() <= 1e-12, kwargs
        assert (layer(x) - (x @ weight.T + bias)).abs().max() <= 1e-12, kwargs
        valid += 1
    assert valid == (22 if convert_mode == "svd" else 16)


def test_packing_matches_reference_layout():
    """btt_r[j, β, i·r+k] = R_ij[k, β] and btt_l[i, j·r+k, α] = L_ij[α, k] (keep_frozen: L = U, R = Vh)."""
    layer, weight, _ = build(24, 36, decomp_mode="square", s_merged_to="keep_frozen")
    plan = layer.plan
    m, a, n, b, r = plan.out_blocks, plan.out_block_size, plan.in_blocks, plan.in_block_size, plan.rank
    blocks = split_blocks(weight, plan)
    for i, j in itertools.product(range(m), range(n)):
        left = layer.btt_l[i, j * r : (j + 1) * r, :].T  # (a, r)
        right = layer.btt_r[j, :, i * r : (i + 1) * r].T  # (r, b)
        block = left @ torch.diag(layer.btt_s[i, j]) @ right
        assert torch.allclose(block, blocks[i * n + j], atol=1e-12)
    assert layer.btt_l.shape == (m, n * r, a) and layer.btt_r.shape == (n, b, m * r)
    assert torch.equal(merge_blocks(blocks, plan), weight)


def test_sigma_on_intermediate_has_reference_gradients():
    """Scaling ``inner`` by σ gives the same outputs and gradients as scaling the large core (the reference)."""
    layer, _, _ = build(32, 48, decomp_mode="square", s_merged_to="keep_trainable", train_position="both")
    x = torch.randn(7, 48, dtype=F64)
    target = torch.randn(7, 32, dtype=F64)
    ((layer(x) - target) ** 2).sum().backward()
    ours = [p.grad.clone() for p in (layer.btt_l, layer.btt_r, layer.btt_s)]
    layer.zero_grad()
    ((x @ layer.materialize_dense_weight().T + layer.bias - target) ** 2).sum().backward()
    for mine, ref in zip(ours, (layer.btt_l.grad, layer.btt_r.grad, layer.btt_s.grad), strict=True):
        assert torch.allclose(mine, ref, atol=1e-10)


def test_uninitialised_allocation_is_cheap():
    layer = BlockTTLinear(4096, 14336, device="meta")  # no full-size random init anywhere
    assert layer.btt_l.shape == (1, 4096, 14336) and layer.btt_l.is_meta


# ------------------------------------------------------------------------------------------
# Column / row space constraints
# ------------------------------------------------------------------------------------------


def _perturb_trainable_(layer: BlockTTLinear, scale: float = 0.3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if param.requires_grad and name != "bias":
                param.add_(scale * torch.randn(param.shape, generator=g, dtype=param.dtype))


def _column_residual(w0: torch.Tensor, w1: torch.Tensor, block: int) -> float:
    """max_j ||W0_j X_j − W1_j|| / ||W1_j|| over column blocks of width ``block`` (least squares X_j)."""
    worst = 0.0
    for j in range(0, w0.shape[1], block):
        a, b = w0[:, j : j + block], w1[:, j : j + block]
        sol = torch.linalg.lstsq(a, b).solution
        worst = max(worst, ((a @ sol - b).norm() / b.norm()).item())
    return worst


COLUMN_CASES = [(s, "svd") for s in S_OPTIONS[1:]] + [(None, "svd"), (None, "qr"), ("split", "qr")]


@pytest.mark.parametrize(("s_merged_to", "convert_mode"), COLUMN_CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_output_one_block_preserves_column_spaces(shape, s_merged_to, convert_mode):
    out_f, in_f = shape
    layer, w0, _ = build(out_f, in_f, convert_mode, decomp_mode="output_one_block", s_merged_to=s_merged_to)
    assert layer.btt_r.requires_grad and not layer.btt_l.requires_grad
    b = layer.plan.in_block_size
    _perturb_trainable_(layer)
    w1 = layer.materialize_dense_weight().detach()
    assert (w1 - w0).norm() / w0.norm() > 0.05  # the perturbation really changed W
    assert _column_residual(w0, w1, b) <= 1e-10
    control = w0 + 0.3 * torch.randn_like(w0)
    assert _column_residual(w0, control, b) > 0.1


def test_training_the_large_core_breaks_the_column_constraint():
    layer, w0, _ = build(48, 32, decomp_mode="output_one_block", train_position="large")
    _perturb_trainable_(layer)
    assert _column_residual(w0, layer.materialize_dense_weight().detach(), layer.plan.in_block_size) > 0.1


@pytest.mark.parametrize("s_merged_to", ["keep_trainable", "frozen", "split"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_input_one_block_preserves_row_spaces(shape, s_merged_to):
    out_f, in_f = shape
    layer, w0, _ = build(out_f, in_f, decomp_mode="input_one_block", s_merged_to=s_merged_to)
    assert layer.btt_l.requires_grad and not layer.btt_r.requires_grad
    a = layer.plan.out_block_size
    _perturb_trainable_(layer)
    w1 = layer.materialize_dense_weight().detach()
    assert _column_residual(w0.T, w1.T, a) <= 1e-10
    assert _column_residual(w0.T, (w0 + 0.3 * torch.randn_like(w0)).T, a) > 0.1


# ------------------------------------------------------------------------------------------
# Trainability
# ------------------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 32)
        self.q_proj = nn.Linear(32, 48)
        self.down_proj = nn.Linear(48, 32, bias=False)
        self.norm = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.down_proj(self.q_proj(self.embed_tokens(ids)))))


def toy(**kwargs) -> Toy:
    torch.manual_seed(0)
    model = Toy().double()
    convert_linear_to_btt(model, show_progress=False, **kwargs)
    return model


# (decomp mode, train_position) -> (btt_l trainable, btt_r trainable) for q_proj 48x32
SIDES = {
    ("output_one_block", "small"): (False, True),
    ("output_one_block", "large"): (True, False),
    ("input_one_block", "small"): (True, False),
    ("input_one_block", "large"): (False, True),
    ("square", "small"): (True, False),  # 6x8 by 4x8 blocks: a = b, tie → left
    ("square", "large"): (True, False),
    ("square", "both"): (True, True),
}


@pytest.mark.parametrize(("mode", "position"), list(SIDES))
@pytest.mark.parametrize("train_s", [False, True])
@pytest.mark.parametrize("train_bias", [False, True])
def test_trainability_flags_and_gradients(mode, position, train_s, train_bias):
    s_merged_to = "keep_trainable" if position != "both" else "split"
    model = toy(decomp_mode=mode, s_merged_to=s_merged_to, train_position=position)
    configure_blocktt_trainability(model, train_bias, position, train_singular_values=train_s)
    left, right = SIDES[(mode, position)]  # down_proj (32x48) has the same sides as q_proj (48x32)
    expected = {"q_proj.bias": train_bias}
    for layer in ("q_proj", "down_proj"):
        expected |= {f"{layer}.btt_l": left, f"{layer}.btt_r": right}
        if s_merged_to == "keep_trainable":
            expected[f"{layer}.btt_s"] = train_s
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert flags == {name: expected.get(name, False) for name in flags}
    model(torch.randint(0, 10, (2, 5))).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


def test_default_trainable_count_is_in_times_b_plus_one():
    model = toy(decomp_mode="output_one_block", s_merged_to="keep_trainable")
    counts = configure_blocktt_trainability(model, train_bias=False, train_singular_values=True)
    q_in, q_b = 32, model.q_proj.plan.in_block_size
    d_in, d_b = 48, model.down_proj.plan.in_block_size
    assert (q_b, d_b) == (8, 8)
    assert counts["trainable_params"] == q_in * (q_b + 1) + d_in * (d_b + 1)
    assert counts["layers"] == 2 and counts["singular_value_params"] == q_in + d_in


def test_s_merged_to_aliases_follow_the_sides():
    # output_one_block 48x32: btt_l (48·32) is large, btt_r (8·32) small
    assert resolve_s_merged_to("small", "frozen", 48 * 32, 8 * 32) == "output"
    assert resolve_s_merged_to("small", "trainable", 48 * 32, 8 * 32) == "input"
    assert resolve_s_merged_to("large", "trainable", 48 * 32, 8 * 32) == "output"
    assert resolve_s_merged_to("both", None, 1, 1) == "split"
    assert resolve_s_merged_to("small", None, 48 * 32, 8 * 32) == "output"


def test_normalize_trainable_cores():
    model = toy(decomp_mode="square", train_position="both", s_merged_to="split")
    configure_blocktt_trainability(model, train_position="small")
    frozen_before = model.q_proj.btt_r.detach().clone()
    assert normalize_trainable_blocktt_cores_(model) == 2
    assert torch.allclose(model.q_proj.btt_l.norm(dim=2), torch.ones((), dtype=F64))
    assert torch.equal(model.q_proj.btt_r, frozen_before)


def test_target_module_names():
    assert len(get_blocktt_target_module_names("all")) == 7
    assert get_blocktt_target_module_names("mlp") == ["gate_proj", "up_proj", "down_proj"]
    assert get_blocktt_target_module_names("attn") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(ValueError, match="unknown target kind"):
        get_blocktt_target_module_names("conv")


# ------------------------------------------------------------------------------------------
# Conversion API
# ------------------------------------------------------------------------------------------


def test_convert_skip_include_and_compat_kwargs():
    torch.manual_seed(0)
    model = Toy().double()
    ids = torch.randint(0, 10, (2, 5))
    before = model(ids)
    with pytest.warns(UserWarning, match="init_mode"):
        names = convert_linear_to_btt(model, "full", allow_non_cuda=False, init_mode="mup", show_progress=False)
    assert names == ["q_proj", "down_proj"] and isinstance(model.lm_head, nn.Linear)
    assert (model(ids) - before).abs().max() <= 1e-12
    model = Toy()
    assert convert_linear_to_btt(model, include_names=["down_proj"], show_progress=False) == ["down_proj"]
    with pytest.raises(ValueError, match="lr_act"):
        convert_linear_to_btt(Toy(), lr_act=True)


def test_convert_tiny_llama_by_head_with_mode_dict_and_input_spec(tiny_llama, tiny_inputs):
    with torch.no_grad():
        before = tiny_llama(tiny_inputs).logits
    names = convert_linear_to_btt(
        tiny_llama,
        decomp_mode={"qkv": "square", "o": "output", "mlp_upgate": "input", "down_proj": "output"},
        factorize_by_head=True,
        input_factorization="{mlp_down: '4,24'}",
        show_progress=False,
    )
    assert len(names) == 14
    layer = tiny_llama.model.layers[0].self_attn
    assert (layer.q_proj.plan.out_blocks, layer.q_proj.plan.out_block_size) == (4, 16)
    assert (layer.k_proj.plan.out_blocks, layer.k_proj.plan.out_block_size) == (2, 16)
    assert (layer.o_proj.plan.in_blocks, layer.o_proj.plan.in_block_size) == (4, 16)
    mlp = tiny_llama.model.layers[0].mlp
    assert mlp.up_proj.plan.decomp_mode == "input_one_block"
    assert (mlp.down_proj.plan.in_blocks, mlp.down_proj.plan.in_block_size) == (4, 24)
    with torch.no_grad():
        assert torch.allclose(tiny_llama(tiny_inputs).logits, before, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Errors name the module, the shape and the fix
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"btt_rank": 0}, ["q_proj", "rank 0", "Fix"]),
        ({"btt_rank": 9}, ["q_proj", "1..8", "Fix"]),
        ({"input_factorization": "5,7"}, ["q_proj", "32", "Fix"]),
        ({"s_merged_to": "middle"}, ["q_proj", "middle", "Fix"]),
        ({"s_merged_to": "keep_frozen", "convert_mode": "qr"}, ["q_proj", "convert_mode='svd'", "Fix"]),
        ({"s_merged_to": "frozen", "train_position": "both"}, ["q_proj", "both", "Fix"]),
        ({"train_position": "middle"}, ["q_proj", "middle"]),
        ({"decomp_mode": {"mlp_down": "output"}}, ["q_proj", "Fix"]),
        ({"convert_mode": "lu"}, ["q_proj", "lu"]),
    ],
)
def test_errors_name_module_and_fix(kwargs, needles):
    kwargs = {"decomp_mode": "square", **kwargs}
    with pytest.raises(ValueError) as info:
        convert_linear_to_btt(Toy().double(), show_progress=False, **kwargs)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_qr_ignores_other_placements_with_a_warning():
    weight, bias = dense(48, 32)
    layer = BlockTTLinear(32, 48, s_merged_to="split", dtype=F64)
    with pytest.warns(UserWarning, match="ignored with convert_mode='qr'"):
        layer.init_from_linear_weight(weight, bias, "qr")


def test_shape_and_bias_errors():
    layer = BlockTTLinear(32, 48, dtype=F64, module_name="blk")
    weight, bias = dense(48, 32)
    with pytest.raises(ValueError, match=r"blk.*\(32, 48\).*expects \(48, 32\)"):
        layer.init_from_linear_weight(weight.T, bias)
    with pytest.raises(ValueError, match=r"blk.*bias"):
        layer.init_from_linear_weight(weight, None)
    layer.init_from_linear_weight(weight, bias)
    with pytest.raises(ValueError, match=r"blk.*\(2, 31\).*in_features=32"):
        layer(torch.randn(2, 31, dtype=F64))


def test_half_precision_weights_decompose_in_float32():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    layer = BlockTTLinear.from_linear(linear)
    assert layer.btt_l.dtype == torch.bfloat16
    err = (layer.materialize_dense_weight().float() - linear.weight.float()).norm() / linear.weight.float().norm()
    assert err < 1e-2


def test_reference_order_of_sigma_gives_the_same_function_and_gradients():
    """σ on the large core (the reference's order) and on the small intermediate agree in float64."""
    import torch
    from torch import nn

    from fura.explicit.btt import BlockTTLinear

    torch.manual_seed(0)
    linear = nn.Linear(32, 48, dtype=torch.float64)
    layers = [
        BlockTTLinear.from_linear(linear, s_merged_to="keep_trainable", scale_large_core=order)
        for order in (False, True)
    ]
    x = torch.randn(5, 32, dtype=torch.float64)
    outputs = [layer(x) for layer in layers]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for out in outputs:
        out.square().sum().backward()
    torch.testing.assert_close(layers[0].btt_s.grad, layers[1].btt_s.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layers[0].btt_r.grad, layers[1].btt_r.grad, rtol=1e-10, atol=1e-12)
