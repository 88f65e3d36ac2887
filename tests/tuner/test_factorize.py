"""Block plans, ranks and batched decompositions (fura.tuner.factorize)."""

from __future__ import annotations

import pytest
import torch

from fura.tuner.factorize import (
    FactorizationError,
    HeadInfo,
    block_qr,
    block_svd,
    closest_factor_pair,
    make_plan,
    merge_blocks,
    parse_module_spec,
    resolve_rank,
    spec_for_module,
    split_blocks,
    torch_threads,
)

LLAMA3_8B = HeadInfo(num_heads=32, num_kv_heads=8, head_dim=128)
LLAMA3_8B_SHAPES = {  # leaf: (out, in)
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


@pytest.mark.parametrize(
    ("dim", "pair"),
    [
        (4096, (64, 64)),
        (2048, (32, 64)),
        (1024, (32, 32)),
        (14336, (112, 128)),
        (11008, (86, 128)),
        (6144, (64, 96)),
        (48, (6, 8)),
        (576, (24, 24)),
        (1536, (32, 48)),
        (7, (1, 7)),
    ],
)
def test_closest_factor_pair_matches_reference(dim, pair):
    assert closest_factor_pair(dim) == pair


def test_output_one_block_plan_and_head_split():
    plan = make_plan(4096, 4096, leaf_name="o_proj", heads=LLAMA3_8B, factorize_by_head=True)
    assert (plan.out_blocks, plan.out_block_size, plan.in_blocks, plan.in_block_size, plan.rank) == (
        1,
        4096,
        32,
        128,
        128,
    )
    plan = make_plan(4096, 4096, leaf_name="o_proj", heads=LLAMA3_8B, factorize_by_head=False)
    assert (plan.in_blocks, plan.in_block_size) == (64, 64)


def test_input_one_block_splits_outputs_by_head():
    plan = make_plan(1024, 4096, decomp_mode="input", leaf_name="k_proj", heads=LLAMA3_8B, factorize_by_head=True)
    assert (plan.out_blocks, plan.out_block_size, plan.in_blocks, plan.in_block_size) == (8, 128, 1, 4096)


def test_explicit_spec_overrides_head_split():
    spec = parse_module_spec("{o: closest, mlp_down: '56,256'}", what="input_factorization")
    assert spec_for_module(spec, "o_proj") == "closest"
    plan = make_plan(
        4096,
        4096,
        leaf_name="o_proj",
        heads=LLAMA3_8B,
        factorize_by_head=True,
        input_factorization=spec_for_module(spec, "o_proj"),
    )
    assert plan.in_block_size == 64
    plan = make_plan(4096, 14336, leaf_name="down_proj", input_factorization=spec_for_module(spec, "down_proj"))
    assert (plan.in_blocks, plan.in_block_size) == (56, 256)


def test_head_sentinel_and_leaf_keys_win_over_groups():
    spec = parse_module_spec({"qkv": "head", "k_proj": [16, 256]}, what="input_factorization")
    assert spec_for_module(spec, "q_proj") == "head"
    assert spec_for_module(spec, "k_proj") == (16, 256)
    assert spec_for_module(spec, "gate_proj") is None
    plan = make_plan(4096, 4096, leaf_name="q_proj", heads=LLAMA3_8B, input_factorization="head")
    assert (plan.in_blocks, plan.in_block_size) == (32, 128)


def test_factorization_that_does_not_divide_names_module_and_fix():
    with pytest.raises(FactorizationError) as info:
        make_plan(576, 576, input_factorization=(7, 80), module_name="model.layers.3.self_attn.q_proj")
    message = str(info.value)
    assert "model.layers.3.self_attn.q_proj" in message and "576" in message and "Fix" in message
    assert "(24, 24)" in message


@pytest.mark.parametrize("bad", [0, -3, 25, 1.5, 0.0, "half", True])
def test_bad_ranks_are_refused(bad):
    with pytest.raises(FactorizationError, match="rank"):
        resolve_rank(bad, 1, 24, 576, 24, "m.q_proj")


def test_rank_budget_matches_reference():
    # reference [verified]: 48x32 square (m, n, a, b) = (6, 4, 8, 8): 0.1 -> 1, 0.25 -> 1
    assert resolve_rank(0.1, 6, 4, 8, 8) == 1
    assert resolve_rank(0.25, 6, 4, 8, 8) == 1
    assert resolve_rank("full", 1, 64, 4096, 64) == 64
    assert resolve_rank(0.5, 1, 64, 4096, 64) == 32  # 31.5 -> ceil is closer


def _fura_trainable(shapes, heads, factorize_by_head):
    total = 0
    for leaf, (out_features, in_features) in shapes.items():
        plan = make_plan(out_features, in_features, leaf_name=leaf, heads=heads, factorize_by_head=factorize_by_head)
        assert plan.rank == plan.in_block_size  # full rank, out >= b
        total += plan.right_core_numel + plan.singular_values_numel  # = in * (b + 1)
        assert plan.right_core_numel + plan.singular_values_numel == in_features * (plan.in_block_size + 1)
    return total


def test_llama3_8b_trainable_table_from_the_spec():
    per_layer = _fura_trainable(LLAMA3_8B_SHAPES, LLAMA3_8B, True)
    assert per_layer == 3_708_928
    assert per_layer * 32 == 118_685_696
    assert _fura_trainable(LLAMA3_8B_SHAPES, LLAMA3_8B, False) * 32 == 110_297_088


def test_other_tracks_trainable_counts():
    qwen3 = {
        "q_proj": (2048, 2048),
        "k_proj": (1024, 2048),
        "v_proj": (1024, 2048),
        "o_proj": (2048, 2048),
        "gate_proj": (6144, 2048),
        "up_proj": (6144, 2048),
        "down_proj": (2048, 6144),
    }
    assert _fura_trainable(qwen3, HeadInfo(16, 8, 128), True) * 28 == 42_721_280
    vicuna = {
        "q_proj": (4096, 4096),
        "k_proj": (4096, 4096),
        "v_proj": (4096, 4096),
        "o_proj": (4096, 4096),
        "gate_proj": (11008, 4096),
        "up_proj": (11008, 4096),
        "down_proj": (4096, 11008),
    }
    assert _fura_trainable(vicuna, HeadInfo(32, 32, 128), False) * 32 == 96_559_104


@pytest.mark.parametrize("mode", ["square", "output_one_block", "input_one_block"])
def test_split_merge_and_svd_are_lossless_in_float64(mode):
    torch.manual_seed(0)
    weight = torch.randn(48, 32, dtype=torch.float64)
    plan = make_plan(48, 32, decomp_mode=mode)
    blocks = split_blocks(weight, plan)
    assert blocks.shape == (plan.num_blocks, plan.out_block_size, plan.in_block_size)
    assert torch.equal(merge_blocks(blocks, plan), weight)
    u, s, vh = block_svd(blocks, plan.rank)
    assert u.dtype == torch.float64
    rebuilt = merge_blocks(u @ torch.diag_embed(s) @ vh, plan)
    assert (rebuilt - weight).abs().max() < 1e-12
    left, right = block_qr(blocks, plan.rank)
    assert (merge_blocks(left @ right, plan) - weight).abs().max() < 1e-12


def test_block_svd_runs_half_precision_in_float32():
    blocks = torch.randn(4, 16, 8).to(torch.bfloat16)
    u, s, vh = block_svd(blocks, 8)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert (s[:, :-1] >= s[:, 1:]).all()


@pytest.mark.parametrize("shape", [(5, 96, 12), (5, 12, 96), (3, 16, 16)])
def test_float32_decomposition_matches_float64_svd(shape):
    torch.manual_seed(0)
    blocks = torch.randn(*shape)
    u, s, vh = block_svd(blocks, min(shape[1:]))
    u64, s64, vh64 = torch.linalg.svd(blocks.double(), full_matrices=False)
    assert torch.allclose(s.double(), s64, rtol=1e-6)
    # singular vectors agree up to sign
    assert torch.allclose((vh.double() * vh64).sum(-1).abs(), torch.ones_like(s64), atol=1e-5)
    assert torch.allclose((u.double() * u64).sum(-2).abs(), torch.ones_like(s64), atol=1e-5)
    assert (
        torch.linalg.matrix_norm(u @ torch.diag_embed(s) @ vh - blocks) / torch.linalg.matrix_norm(blocks)
    ).max() < 1e-6


def test_rank_deficient_float32_block_gives_zero_singular_values():
    blocks = (torch.randn(2, 40, 1) @ torch.randn(2, 1, 8)).float()
    u, s, _ = block_svd(blocks, 8)
    assert torch.isfinite(u).all() and (s[:, 1:] < 1e-5 * s[:, :1]).all()


def test_thread_count_holds_inside_the_block_and_is_restored_even_after_an_error():
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), torch_threads(before + 1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):  # fura bench / demo without --threads: PyTorch's own count
        assert torch.get_num_threads() == before
