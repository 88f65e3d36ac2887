"""QFuRA: the frozen core in NF4 / FP4 (CPU, plus a CUDA variant that runs when a GPU is present)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fura.explicit.btt import BlockTTLinear, configure_blocktt_trainability, convert_linear_to_btt
from fura.explicit.qbtt import QBlockTTLinear, convert_btt_to_qbtt_, quantize_frozen_core_

pytest.importorskip("bitsandbytes")

LAYOUTS = ["flat", "per_core_block"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny matrices: intra-op threads only add OpenMP overhead (100x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_layer(seed: int = 0, decomp_mode: str = "square", device: str = "cpu", **kwargs) -> BlockTTLinear:
    """A 192x256 layer; ``square`` uses 6x16 blocks of 32x16 (``btt_l`` larger, ``m > 1``, so layouts differ)."""
    torch.manual_seed(seed)
    linear = nn.Linear(256, 192).to(device)
    kwargs = {"s_merged_to": "keep_trainable", "train_position": "large", "output_factorization": (6, 32), **kwargs}
    return BlockTTLinear.from_linear(linear, decomp_mode=decomp_mode, **kwargs)


def frozen_core(layer: BlockTTLinear) -> torch.Tensor:
    return (layer.btt_r if layer.btt_l.requires_grad else layer.btt_l).detach().clone()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_error_is_4bit_sized(layout, quant_type):
    layer = make_layer(decomp_mode="output_one_block", train_position="small")
    core = frozen_core(layer)
    quantize_frozen_core_(layer, layout, quant_type, compute_dtype=torch.float32)
    assert isinstance(layer, QBlockTTLinear) and layer.quantized_side == "left"
    rel = ((layer.left_core() - core).norm() / core.norm()).item()
    assert 0.0 < rel < 0.2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("train_position", ["small", "large"])
def test_forward_matches_dense_with_dequantised_core(layout, train_position):
    layer = make_layer(train_position=train_position)
    before = layer.materialize_dense_weight().detach()
    quantize_frozen_core_(layer, layout, compute_dtype=torch.float32)
    assert layer.quantized_side == ("right" if train_position == "large" else "left")
    weight = layer.materialize_dense_weight().detach()
    x = torch.randn(3, 7, 256)
    assert (layer(x) - (x @ weight.T + layer.bias)).abs().max() <= 1e-5
    assert 0 < ((weight - before).norm() / before.norm()) < 0.2


def test_materialize_is_dequantised_left_times_sigma_times_right():
    layer = make_layer(decomp_mode="output_one_block", train_position="small")
    quantize_frozen_core_(layer, compute_dtype=torch.float32)
    n, b = layer.plan.in_blocks, layer.plan.in_block_size
    left = layer.left_core()[0].reshape(n, b, 192)  # [j, k, α] = U_j[α, k]
    right = layer.btt_r.detach()  # [j, β, k] = R_j[k, β]
    sigma = layer.btt_s.detach()[0]  # (n, r)
    blocks = [left[j].T @ torch.diag(sigma[j]) @ right[j].T for j in range(n)]
    assert torch.allclose(layer.materialize_dense_weight(), torch.cat(blocks, dim=1), atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_reach_trained_tensors_only(layout):
    layer = make_layer(decomp_mode="output_one_block", train_position="small")
    quantize_frozen_core_(layer, layout, compute_dtype=torch.float32)
    layer(torch.randn(4, 256)).square().sum().backward()
    grads = {name: p.grad is not None for name, p in layer.named_parameters()}
    assert grads == {"btt_r": True, "btt_s": True, "bias": True}
    assert all(not buf.requires_grad for buf in layer.buffers())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_round_trip_through_safetensors(tmp_path, layout):
    layer = make_layer(seed=0)
    quantize_frozen_core_(layer, layout, compute_dtype=torch.float32)
    with torch.no_grad():
        layer.btt_s.mul_(1.1)  # a "trained" state
    path = tmp_path / "qbtt.safetensors"
    save_file(layer.state_dict(), str(path))
    fresh = make_layer(seed=1)  # different weights → different statistics and metadata
    quantize_frozen_core_(fresh, layout, compute_dtype=torch.float32)
    fresh.load_state_dict(load_file(str(path)))
    x = torch.randn(5, 256)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.materialize_dense_weight(), layer.materialize_dense_weight())


def test_dtype_casts_leave_the_4bit_buffers_alone():
    layer = make_layer(decomp_mode="output_one_block", train_position="small")
    quantize_frozen_core_(layer)  # compute dtype bf16
    dtypes = {name: buf.dtype for name, buf in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert {name: buf.dtype for name, buf in layer.named_buffers()} == dtypes
    assert layer.btt_r.dtype == torch.bfloat16
    x = torch.randn(2, 256)
    y = layer(x)
    assert y.dtype == torch.float32
    dense = x @ layer.materialize_dense_weight().float().T + layer.bias.float()
    assert ((y - dense).norm() / dense.norm()) < 2e-2
    assert torch.equal(copy.deepcopy(layer)(x), y)


def test_convert_counts_bytes_with_statistics_and_configure_still_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 192), nn.Linear(192, 256))
    convert_linear_to_btt(model, decomp_mode="output_one_block", s_merged_to="keep_trainable", show_progress=False)
    configure_blocktt_trainability(model, train_singular_values=True)
    numel = sum(layer.btt_l.numel() for layer in model)
    saved = convert_btt_to_qbtt_(model, layout="flat", compute_dtype=torch.float32)
    stored = sum(layer.quantized_nbytes() for layer in model)
    assert saved == numel * 4 - stored
    data_only = numel // 2
    assert stored > data_only + numel // 64  # absmax (1 byte / 64 values with double quant) + maps are counted
    counts = configure_blocktt_trainability(model, train_position="small", train_singular_values=True)
    assert counts["core_params"] == sum(layer.btt_r.numel() for layer in model)
    with pytest.raises(ValueError, match="quantised and cannot train"):
        configure_blocktt_trainability(model, train_position="both")


def test_needs_exactly_one_frozen_core():
    layer = make_layer(train_position="both", s_merged_to="split")
    layer.module_name = "layers.0.q_proj"
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj.*both trainable.*Fix"):
        quantize_frozen_core_(layer)
    layer.btt_l.requires_grad_(False)
    layer.btt_r.requires_grad_(False)
    with pytest.raises(ValueError, match="both frozen"):
        quantize_frozen_core_(layer)
    with pytest.raises(ValueError, match="unknown layout"):
        quantize_frozen_core_(make_layer(), layout="rows")


def test_float64_core_is_quantised_from_float32():
    torch.manual_seed(0)
    layer = BlockTTLinear.from_linear(nn.Linear(128, 64).double())
    quantize_frozen_core_(layer, compute_dtype=torch.float64)
    x = torch.randn(3, 128, dtype=torch.float64)
    assert (layer(x) - (x @ layer.materialize_dense_weight().T + layer.bias)).abs().max() <= 1e-10


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nf4_on_cuda(tmp_path, layout):
    layer = make_layer(device="cuda", train_position="small")
    core = frozen_core(layer)
    quantize_frozen_core_(layer, layout, compute_dtype=torch.float32)
    assert layer.qbtt_frozen[0].packed.is_cuda
    assert 0 < ((layer.left_core() - core).norm() / core.norm()) < 0.2
    x = torch.randn(4, 256, device="cuda")
    weight = layer.materialize_dense_weight()
    assert (layer(x) - (x @ weight.T + layer.bias)).abs().max() <= 1e-4
    save_file(layer.state_dict(), str(tmp_path / "q.safetensors"))
    fresh = make_layer(seed=1, device="cuda", train_position="small")
    quantize_frozen_core_(fresh, layout, compute_dtype=torch.float32)
    fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors"), device="cuda"))
    assert torch.equal(fresh(x), layer(x))
    layer(x).sum().backward()
    assert layer.btt_r.grad is not None and layer.btt_s.grad is not None
    cpu = copy.deepcopy(layer).to("cpu")
    assert torch.allclose(cpu(x.cpu()), layer(x).cpu(), atol=1e-4)
