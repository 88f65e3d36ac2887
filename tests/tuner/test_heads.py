"""Head-aligned block splits for attention layers, whatever the architecture names them."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tr
from peft import get_peft_model

import fura
from fura.tuner.factorize import HeadInfo, make_plan
from fura.tuner.heads import attention_role, head_pair

GQA = HeadInfo(num_heads=8, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize(
    ("path", "role"),
    [
        ("model.layers.0.self_attn.o_proj", "output"),
        ("gpt_neox.layers.0.attention.dense", "output"),
        ("transformer.h.0.self_attention.dense", "output"),
        ("model.decoder.layers.0.self_attn.out_proj", "output"),
        ("encoder.block.0.layer.0.SelfAttention.o", "output"),
        ("transformer.h.0.attn.c_proj", "output"),
        ("encoder.layer.0.attention.output.dense", "output"),
        ("encoder.layer.0.attention.self.query", "query"),
        ("decoder.block.0.layer.1.EncDecAttention.k", "key_value"),
        ("transformer.h.0.attn.c_attn", "fused"),
        ("gpt_neox.layers.0.attention.query_key_value", "fused"),
        ("transformer.h.0.mlp.c_proj", None),  # GPT-2's MLP output shares the name
        ("encoder.layer.0.output.dense", None),  # BERT's MLP output
        ("gpt_neox.layers.0.mlp.dense_4h_to_h", None),
        ("model.layers.0.mlp.down_proj", None),
    ],
)
def test_attention_role_by_path(path, role):
    assert attention_role(path) == role


def test_head_pairs_follow_the_geometry():
    assert head_pair("x.attention.dense", "in", GQA, 128) == (8, 16)
    assert head_pair("x.attention.dense", "in", GQA, 96) is None  # not the width of all heads
    assert head_pair("x.self_attn.k_proj", "out", GQA, 32) == (2, 16)
    assert head_pair("x.attn.c_attn", "out", GQA, 3 * 128) == (24, 16)
    assert head_pair("x.attn.query_key_value", "out", GQA, 128 + 2 * 32) == (12, 16)
    assert head_pair("x.mlp.c_proj", "in", GQA, 128) is None


def test_make_plan_aligns_any_attention_output_by_head():
    wide = HeadInfo(num_heads=2, num_kv_heads=2, head_dim=48)  # 96 = 2 x 48; the closest pair is 8 x 12
    for path in ("h.0.attn.c_proj", "layers.0.attention.dense", "block.0.layer.0.SelfAttention.o", "h.0.mlp.c_proj"):
        leaf = path.rsplit(".", 1)[-1]
        plan = make_plan(96, 96, leaf_name=leaf, module_name=path, heads=wide, factorize_by_head=True)
        expected = (8, 12) if ".mlp." in path else (2, 48)
        assert (plan.in_blocks, plan.in_block_size) == expected, path
        plan = make_plan(96, 96, leaf_name=leaf, module_name=path, heads=wide, factorize_by_head=False)
        assert (plan.in_blocks, plan.in_block_size) == (8, 12), path


def test_head_info_reads_t5_and_falcon_configs():
    t5 = tr.T5Config(d_model=64, d_kv=8, num_heads=4)
    assert HeadInfo.from_model_config(t5) == HeadInfo(4, 4, 8)  # inner width 32, not d_model / heads
    falcon = tr.FalconConfig(hidden_size=64, num_attention_heads=4, multi_query=True)
    assert HeadInfo.from_model_config(falcon) == HeadInfo(4, 1, 16)


def _tiny(name):
    configs = {
        "gpt_neox": (
            tr.GPTNeoXConfig(
                vocab_size=64, hidden_size=96, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
            ),
            tr.GPTNeoXForCausalLM,
        ),
        "opt": (
            tr.OPTConfig(vocab_size=64, hidden_size=96, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64),
            tr.OPTForCausalLM,
        ),
        "gpt2": (tr.GPT2Config(vocab_size=64, n_embd=96, n_layer=1, n_head=2), tr.GPT2LMHeadModel),
        "t5": (
            tr.T5Config(vocab_size=64, d_model=64, d_kv=24, d_ff=64, num_layers=1, num_heads=2),
            tr.T5ForConditionalGeneration,
        ),
        "bert": (
            tr.BertConfig(
                vocab_size=64, hidden_size=96, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
            ),
            tr.BertModel,
        ),
    }
    config, cls = configs[name]
    torch.manual_seed(0)
    return cls(config)


@pytest.mark.parametrize("name", ["gpt_neox", "opt", "gpt2", "t5", "bert"])
def test_default_config_splits_each_attention_output_by_head(name):
    """Width 96 = 2 heads of 48, where the closest divisor pair would be 8 blocks of 12."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_tiny(name), fura.FuraConfig())
    plans = {
        key: layer.fura_plan["default"] for key, layer in model.named_modules() if isinstance(layer, fura.FuraLayer)
    }
    outputs = {
        key: plan for key, plan in plans.items() if attention_role(key.replace("base_model.model.", "")) == "output"
    }
    assert outputs, sorted(plans)
    width = 24 if name == "t5" else 48
    for key, plan in outputs.items():
        assert (plan.in_blocks, plan.in_block_size) == (2, width), key
    others = [plan for key, plan in plans.items() if key not in outputs]
    assert all(plan.in_block_size != width or plan.in_features == 2 * width for plan in others)
