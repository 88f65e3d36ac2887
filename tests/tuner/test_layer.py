"""The implicit FuRA layer: exact init, the column-space identity, gradients, edge cases."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaForCausalLM

import fura
from fura.tuner.layer import FuraLayer, apply_block_transform

from ..conftest import tiny_llama_config

S_OPTIONS = ["keep_trainable", "keep_frozen", "frozen", "trainable", "split", "output", "input"]


def _fura_layers(model):
    return [m for m in model.modules() if isinstance(m, FuraLayer)]


def _perturb(model, scale=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["output_one_block", "input_one_block"])
def test_init_is_bit_identical_to_base(dtype, mode, tiny_inputs):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).to(dtype).eval()
    reference = base(tiny_inputs).logits
    model = get_peft_model(base, fura.FuraConfig(decomp_mode=mode))
    assert torch.equal(model(tiny_inputs).logits, reference)


@pytest.mark.parametrize("s_merged_to", S_OPTIONS)
@pytest.mark.parametrize("rank", ["full", 3])
def test_every_s_option_and_rank_starts_exact(s_merged_to, rank, tiny_llama, tiny_inputs):
    reference = tiny_llama(tiny_inputs).logits
    model = get_peft_model(tiny_llama, fura.FuraConfig(s_merged_to=s_merged_to, rank=rank))
    assert torch.equal(model(tiny_inputs).logits, reference)


def test_qr_mode_starts_exact_and_trains(tiny_llama, tiny_inputs):
    reference = tiny_llama(tiny_inputs).logits
    model = get_peft_model(tiny_llama, fura.FuraConfig(convert_mode="qr", s_merged_to="frozen"))
    assert torch.equal(model(tiny_inputs).logits, reference)
    loss = model(tiny_inputs, labels=tiny_inputs).loss
    loss.backward()
    assert all(layer.fura_core["default"].weight.grad is not None for layer in _fura_layers(model))


def test_trainable_count_is_in_times_b_plus_one(tiny_llama):
    model = get_peft_model(tiny_llama, fura.FuraConfig())
    for layer in _fura_layers(model):
        plan = layer.fura_plan["default"]
        count = sum(p.numel() for p in layer.fura_core["default"].parameters() if p.requires_grad)
        assert count == layer.in_features * (plan.in_block_size + 1)
    # o_proj is split by head (4 heads of 16) rather than the closest pair (8, 8)
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    assert o_proj.fura_plan["default"].in_block_size == 16


def _train_steps(model, inputs, steps=3, lr=5e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _residual(a, b):
    """min_T ||a T - b|| / ||b|| via least squares."""
    solution = torch.linalg.lstsq(a, b).solution
    return ((a @ solution - b).norm() / b.norm()).item()


@pytest.mark.parametrize("s_merged_to", ["keep_trainable", "trainable", "split"])
def test_column_space_identity_after_training_output_one_block(s_merged_to, tiny_inputs):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).double()
    model = get_peft_model(base, fura.FuraConfig(s_merged_to=s_merged_to))
    _train_steps(model, tiny_inputs)
    checked = 0
    for layer in _fura_layers(model):
        w0 = layer.get_base_layer().weight.detach()
        updated = w0 + layer.get_delta_weight("default")
        k, d, _ = layer.block_layout("default")
        assert (updated - w0).abs().max() > 1e-4  # training moved it
        for j in range(k):
            w0_j, new_j = w0[:, j * d : (j + 1) * d], updated[:, j * d : (j + 1) * d]
            assert _residual(w0_j, new_j) <= 1e-10
            checked += 1
        # control: a dense perturbation leaves the column space (blocks are tall: out > d)
        dense = w0 + 0.01 * torch.randn_like(w0)
        assert _residual(w0[:, :d], dense[:, :d]) > 1e-3
    assert checked > 0


def test_row_space_identity_after_training_input_one_block(tiny_inputs):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).double()
    model = get_peft_model(base, fura.FuraConfig(decomp_mode="input_one_block"))
    _train_steps(model, tiny_inputs)
    for layer in _fura_layers(model):
        w0 = layer.get_base_layer().weight.detach()
        updated = w0 + layer.get_delta_weight("default")
        k, d, _ = layer.block_layout("default")
        for i in range(k):
            rows0, rows = w0[i * d : (i + 1) * d], updated[i * d : (i + 1) * d]
            assert _residual(rows0.T, rows.T) <= 1e-10  # W'_i = T_i W0_i


def test_gradients_reach_only_trainable_adapter_tensors(tiny_llama, tiny_inputs):
    model = get_peft_model(tiny_llama, fura.FuraConfig())
    model(tiny_inputs, labels=tiny_inputs).loss.backward()
    for name, param in model.named_parameters():
        trainable = ".fura_core." in name
        assert param.requires_grad == trainable, name
        assert (param.grad is not None) == trainable, name
        if trainable:
            assert param.grad.abs().sum() > 0, name


def test_losses_fall_and_base_is_untouched(tiny_llama, tiny_inputs):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    model = get_peft_model(tiny_llama, fura.FuraConfig())
    losses = _train_steps(model, tiny_inputs, steps=8, lr=2e-2)
    assert losses[-1] < losses[0] - 0.1
    after = {
        k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items() if "fura_" not in k
    }
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_block_transform_associations_agree():
    torch.manual_seed(0)
    left, right = torch.randn(3, 8, 5, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    for tokens in (1, 2, 40):  # few tokens -> two thin matmuls, many -> dense (k, d, d) product
        x = torch.randn(tokens, 24, dtype=torch.float64)
        blocks = x.reshape(tokens, 3, 8)
        expected = blocks + torch.einsum("tkd,kde->tke", blocks, left @ right)
        assert torch.allclose(apply_block_transform(x, left, right), expected.reshape(tokens, 24), atol=1e-12)


def test_rank_deficient_blocks_warn_and_stay_exact(tiny_inputs):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).eval()
    q_proj = base.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight[:, :16] = torch.randn(64, 1) @ torch.randn(1, 16)  # first input block has rank 1
    reference = base(tiny_inputs).logits
    with pytest.warns(UserWarning, match="zero"):
        model = get_peft_model(base, fura.FuraConfig(target_modules=["q_proj"], input_factorization="4,16"))
    assert torch.equal(model(tiny_inputs).logits, reference)
    losses = _train_steps(model, tiny_inputs)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_truncated_rank_keeps_the_residual_frozen(tiny_inputs):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).double().eval()
    model = get_peft_model(base, fura.FuraConfig(rank=3, target_modules=["q_proj"]))
    layer = _fura_layers(model)[0]
    assert layer.fura_core["default"].weight.shape[1] == 3
    _perturb(model)
    delta = layer.get_delta_weight("default")
    basis = layer.fura_basis["default"].basis  # (k, d, 3)
    k, d, _ = basis.shape
    # the update lives in the top-3 left singular subspace of each block: (I - U_j U_jᵀ) ΔW_j = 0
    w0 = layer.get_base_layer().weight.detach()
    for j in range(k):
        u = torch.linalg.qr(w0[:, j * d : (j + 1) * d] @ basis[j]).Q  # span(U_j) = span(W0_j V_j)
        block = delta[:, j * d : (j + 1) * d]
        assert (block - u @ (u.T @ block)).abs().max() < 1e-12
        assert block.abs().max() > 1e-4
