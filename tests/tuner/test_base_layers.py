"""FuRA over other base layers and loading modes: bitsandbytes 8-bit, DeepSpeed ZeRO-3, meta tensors."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import fura
from fura.tuner.layer import FuraLayer


class Wrapper(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def test_eight_bit_base_exact_init_training_and_exact_unmerge():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    quantised = bnb.nn.Linear8bitLt(64, 48, bias=True, has_fp16_weights=False)
    quantised.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    quantised.bias = nn.Parameter(dense.bias.data.clone())
    model = Wrapper(quantised.to("cpu"))
    x = torch.randn(3, 64)
    reference = model(x)
    peft_model = get_peft_model(model, fura.FuraConfig(target_modules=["proj"]))
    assert torch.equal(peft_model(x), reference)
    peft_model(x).sum().backward()
    assert peft_model.base_model.model.proj.fura_core["default"].weight.grad.abs().sum() > 0
    _perturb(peft_model)
    adapted = peft_model(x)
    for _ in range(3):
        peft_model.merge_adapter()
        assert torch.allclose(peft_model(x), adapted, atol=0.05)  # re-quantised to int8
        peft_model.unmerge_adapter()
    assert torch.equal(peft_model(x), adapted)


def test_zero3_partitioned_weights_are_gathered_for_the_decomposition(monkeypatch):
    """Under ZeRO-3 the base weight is gathered (as PEFT's SVD-based inits do) before decomposing."""
    gathered = []

    @contextlib.contextmanager
    def gathered_parameters(params, modifier_rank=None, fwd_module=None):
        gathered.append((params, modifier_rank))
        yield

    fake = types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=gathered_parameters))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr("peft.utils.integrations.check_deepspeed_zero3_enabled", lambda: True)
    torch.manual_seed(0)
    model = Wrapper(nn.Linear(32, 24))
    weight = model.proj.weight
    get_peft_model(model, fura.FuraConfig(target_modules=["proj"]))
    assert any(params is weight and rank is None for params, rank in gathered)


def test_meta_model_injection_counts_llama3_8b_without_weights():
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    peft_model = get_peft_model(model, fura.FuraConfig())
    layers = [m for m in peft_model.modules() if isinstance(m, FuraLayer)]
    assert len(layers) == 32 * 7
    assert all(layer.fura_core["default"].weight.device.type == "meta" for layer in layers)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 118_685_696
