"""Weight sync to an inference engine: merged weights module by module, equal to merge_and_unload, model untouched."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from benchmarks.architectures import build
from peft import get_peft_model

import fura
from fura.integrations.weight_sync import iter_merged_parameters


class RecordingEngine:
    """Stands in for vLLM's ``load_weights``: copies what it is sent, checks one merged tensor is alive at a time."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.received: dict[str, torch.Tensor] = {}
        self.own = {p.data_ptr() for p in model.parameters()}
        self.fresh: list[weakref.ref] = []

    def load_weights(self, weights) -> None:
        for name, tensor in weights:
            # reference counting frees a merged tensor as soon as nobody holds it: no whole-model copy builds up
            assert all(ref() is None for ref in self.fresh), "an earlier merged tensor is still alive"
            if not any(tensor.data_ptr() == p for p in self.own):
                self.fresh.append(weakref.ref(tensor))
            self.received[name] = tensor.clone()
            del tensor


def _state(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


CASES = [  # (architecture, dtype, extra config, a second active adapter)
    ("llama", torch.float32, {}, True),
    ("llama", torch.bfloat16, {}, False),
    ("llama", torch.bfloat16, {}, True),
    ("llama", torch.bfloat16, {"decomp_mode": "input_one_block"}, False),
    ("gpt2", torch.float32, {}, False),
    ("gpt2", torch.float32, {"decomp_mode": "input_one_block"}, False),
    ("mixtral", torch.bfloat16, {}, False),
    ("unet2d", torch.float32, {"target_modules": r".*(conv1|conv2|to_q|to_k|to_v)$"}, False),
]


@pytest.mark.parametrize(("name", "dtype", "extra", "second"), CASES)
def test_engine_receives_merge_and_unload_weights_and_the_model_is_untouched(name, dtype, extra, second):
    config = fura.FuraConfig(init_weights=False, **extra)
    peft_model = get_peft_model(build(name).to(dtype), config)
    if second:
        peft_model.add_adapter("second", copy.deepcopy(config))
        peft_model.base_model.set_adapter(["default", "second"])  # two active adapters merge in order
    before = _state(peft_model)

    engine = RecordingEngine(peft_model)
    engine.load_weights(iter_merged_parameters(peft_model))

    after = _state(peft_model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(getattr(m, "merged", False) for m in peft_model.modules() if isinstance(m, fura.FuraLayer))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    expected = dict(merged.named_parameters())
    assert engine.received.keys() == expected.keys()
    for key, value in expected.items():
        assert engine.received[key].dtype == value.dtype and torch.equal(engine.received[key], value), key
    assert engine.fresh, "no adapted weight was merged"


class _Dist:
    is_fsdp = False
    is_zero3 = False


class _VLLM:
    """The parts of a colocated ``vllm.LLM`` that TRL's ``sync_weights`` touches, recording the weights."""

    def __init__(self, engine: RecordingEngine) -> None:
        model_runner = type("Runner", (), {"model": engine})()
        worker = type("Worker", (), {"model_runner": model_runner})()
        executor = type("Executor", (), {"driver_worker": worker})()
        self.llm_engine = type("Engine", (), {"model_executor": executor})()
        self.resets = 0

    def reset_prefix_cache(self) -> None:
        self.resets += 1


def test_trl_sync_weights_sends_merged_weights_module_by_module():
    """TRL's own ``VLLMGeneration.sync_weights`` (colocate mode), with FuRA's iterator swapped in."""
    from fura.integrations.trl_sync import enable_memory_light_sync, fura_vllm_generation_class

    trl_generation = pytest.importorskip("trl.generation.vllm_generation")
    peft_model = get_peft_model(build("llama"), fura.FuraConfig(init_weights=False))
    before = _state(peft_model)
    generation = object.__new__(trl_generation.VLLMGeneration)
    engine = RecordingEngine(peft_model)
    generation.__dict__.update(
        model=peft_model, _dist=_Dist(), mode="colocate", enable_sleep_mode=False, accelerator=None, llm=_VLLM(engine)
    )
    trainer = type("Trainer", (), {"vllm_generation": generation})()
    assert enable_memory_light_sync(trainer) and isinstance(generation, fura_vllm_generation_class())
    generation.sync_weights()

    assert all(torch.equal(value, before[key]) for key, value in _state(peft_model).items())
    expected = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    assert engine.received.keys() == expected.keys()
    assert all(torch.equal(engine.received[key], value) for key, value in expected.items())
    assert engine.fresh and generation.llm.resets == 1


def test_released_tensors_free_their_memory_once_the_next_is_asked_for_and_parameters_never_do():
    """vLLM's colocate mode: each merged module is freed before the next one is computed (TRL's loop variable would
    otherwise keep two alive); the model's own parameters are never touched."""
    from transformers import LlamaForCausalLM

    from ..conftest import tiny_llama_config

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), fura.FuraConfig(init_weights=False))
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    own = {param.data_ptr() for param in model.parameters()}
    previous, released = None, 0
    for name, tensor in iter_merged_parameters(model, release=True):
        if previous is not None:
            assert previous.untyped_storage().nbytes() == 0  # the merged weight sent before is gone
            released += 1
        assert torch.equal(tensor, reference[name]), name  # what the engine reads is complete
        previous = tensor if tensor.data_ptr() not in own else None
    assert released + (previous is not None) == sum(isinstance(m, fura.FuraLayer) for m in model.modules())
    assert all(param.untyped_storage().nbytes() > 0 for param in model.parameters())
