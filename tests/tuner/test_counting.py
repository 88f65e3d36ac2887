"""``print_trainable_parameters()``: FuRA's "all params" is the base model plus its trainable tensors, as for LoRA."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

import fura
from tests.conftest import tiny_llama_config


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def test_all_params_equal_loras_on_the_same_base():
    base_numel = sum(p.numel() for p in _model().parameters())
    fura_model = get_peft_model(_model(), fura.FuraConfig(target_modules="all-linear"))
    lora_model = get_peft_model(_model(), LoraConfig(target_modules="all-linear"))
    fura_trainable, fura_all = fura_model.get_nb_trainable_parameters()
    lora_trainable, lora_all = lora_model.get_nb_trainable_parameters()
    assert fura_all - fura_trainable == lora_all - lora_trainable == base_numel
    frozen_basis = sum(p.numel() for n, p in fura_model.named_parameters() if "fura_basis" in n)
    assert frozen_basis > 0  # they exist, but are adapter state, not model parameters


def test_install_is_idempotent():
    from fura.tuner import counting

    counting.install()
    counting.install()
    model = get_peft_model(_model(), fura.FuraConfig())
    trainable, total = model.get_nb_trainable_parameters()
    assert total - trainable == sum(p.numel() for p in _model().parameters())
