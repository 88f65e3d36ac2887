"""The vLLM weight sync of a FuRA model sends exactly ``merge_and_unload()``'s weights, without merging the model.

TRL's ``VLLMGeneration`` is built without vLLM (its constructor needs an engine, so ``__new__`` and the attributes
the sync reads); a stand-in engine records what it is sent.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import fura
from fura.integrations.weight_sync import merged_named_parameters, stream_fura_weights
from fura.tuner.layer import FuraLayer

from ..conftest import tiny_llama_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(model: torch.nn.Module, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    peft_model = get_peft_model(model, fura.FuraConfig(init_weights=False, **config))
    return peft_model


def _reference(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}


@pytest.mark.parametrize(
    "build",
    [
        lambda: LlamaForCausalLM(tiny_llama_config()),
        lambda: LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16),
        lambda: GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)),
    ],
    ids=["llama-fp32", "llama-bf16", "gpt2-conv1d"],
)
def test_the_weights_sent_equal_merge_and_unload_bit_for_bit_and_the_model_is_untouched(build):
    torch.manual_seed(0)
    model = _trained(build())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    sent = dict(merged_named_parameters(model))
    reference = _reference(model)
    assert set(reference) - set(sent) <= {"lm_head.weight"} and set(sent) <= set(reference)  # tied heads sent once
    for name, tensor in sent.items():
        assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name]), name
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, FuraLayer))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_released_tensors_free_their_memory_once_the_next_is_asked_for_and_parameters_never_do():
    model = _trained(LlamaForCausalLM(tiny_llama_config()))
    reference = _reference(model)
    sent, previous = 0, None
    for name, tensor in merged_named_parameters(model, release=True):
        if previous is not None and previous[1]:
            assert previous[0].untyped_storage().nbytes() == 0  # the merged weight sent before is gone
        assert torch.equal(tensor, reference[name]), name  # what the engine reads is complete
        merged = not any(tensor is p.data or tensor.data_ptr() == p.data_ptr() for p in model.parameters())
        previous, sent = (tensor, merged), sent + merged
    assert sent == sum(isinstance(m, FuraLayer) for m in model.modules())
    for name, tensor in model.state_dict().items():
        assert tensor.untyped_storage().nbytes() > 0, name


def test_a_trainer_syncs_through_the_stream_and_keeps_trls_path_elsewhere():
    from trl.generation.vllm_generation import VLLMGeneration

    model = _trained(LlamaForCausalLM(tiny_llama_config()))
    engine: list[tuple[str, torch.Tensor]] = []
    generation = VLLMGeneration.__new__(VLLMGeneration)
    generation.model, generation.mode = model, "colocate"
    generation._dist = type("Single", (), {"is_fsdp": False, "is_zero3": False})()
    trainer = type("Trainer", (), {"vllm_generation": generation})()
    assert stream_fura_weights(trainer)
    model.merge_adapter = lambda *a, **k: pytest.fail("the sync merged the whole model")
    reference = _reference(model)
    for name, tensor in generation._iter_named_params():  # as sync_weights hands them to load_weights
        assert torch.equal(tensor, reference[name]), name
        engine.append((name, tensor))
    assert len(engine) == len(dict(merged_named_parameters(model)))
    generation._dist.is_zero3 = True  # sharded: TRL's own gather + merge path
    calls = []
    model.merge_adapter = lambda *a, **k: calls.append("merge")
    model.unmerge_adapter = lambda *a, **k: calls.append("unmerge")
    generation._dist.gather_params = lambda params: torch.no_grad()
    list(generation._iter_named_params())
    assert calls == ["merge", "unmerge"]
    plain = type("Trainer", (), {"vllm_generation": None})()
    assert not stream_fura_weights(plain)
