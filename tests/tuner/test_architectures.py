"""FuRA's guarantees on tiny random models of every architecture in ``benchmarks/architectures.py``.

For the default config, ``input_one_block`` and a float rank: the model wraps, starts bit-identical, one training step
changes its output with finite gradients on every trainable tensor, the merged model agrees with the adapter, unmerging
restores every base tensor bit for bit, save/load reproduces the outputs, ``generate`` runs (language models) and
``merge_and_unload`` leaves a plain model with the adapted outputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from benchmarks.architectures import ARCHITECTURES, build, main_output
from peft import PeftModel, get_peft_model

import fura
from fura.tuner.conv import FuraConv2d

#: Conv2d targets of the convolutional models (FuRA's default reaches only their linear layers).
CONV_TARGETS = {name: arch.conv_targets for name, arch in ARCHITECTURES.items() if arch.conv_targets}
CONFIGS = {
    "default": {},
    "input_one_block": {"decomp_mode": "input_one_block"},
    "rank_0.3": {"rank": 0.3},
}


def _run(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def _loss(output) -> torch.Tensor:
    """Every floating output tensor contributes (a BERT pooler sits beside the last hidden state, not on its path)."""
    tensors = [value for value in output.values() if isinstance(value, torch.Tensor) and value.is_floating_point()]
    return sum(value.float().square().mean() for value in tensors)


def _base_state(peft_model) -> dict[str, torch.Tensor]:
    """The base model's own tensors (FuRA's removed, wrapper paths collapsed), cloned."""
    return {
        key.replace(".base_layer", ""): value.detach().clone()
        for key, value in peft_model.get_base_model().state_dict().items()
        if "fura_" not in key
    }


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny layers draw the costly-plan warnings by design
        yield


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fura_guarantees(name, config_name, tmp_path):
    check_guarantees(name, fura.FuraConfig(**CONFIGS[config_name]), tmp_path)


@pytest.mark.parametrize("config_name", ["default", "rank_0.3"])
@pytest.mark.parametrize("name", list(CONV_TARGETS))
def test_fura_guarantees_on_convolutions(name, config_name, tmp_path):
    """The same guarantees with the Conv2d layers adapted (output-channel blocks, see ``fura.tuner.conv``)."""
    config = fura.FuraConfig(target_modules=CONV_TARGETS[name], **CONFIGS[config_name])
    assert FuraConv2d in check_guarantees(name, config, tmp_path)


def check_guarantees(name: str, config: fura.FuraConfig, tmp_path):
    """Run every guarantee on a fresh tiny ``name`` under ``config``; returns the FuRA layer types it created."""
    arch = ARCHITECTURES[name]
    inputs = arch.inputs()
    model = build(name)
    expected = _run(model, inputs)
    peft_model = get_peft_model(model, config)
    layer_types = {type(module) for module in peft_model.modules() if isinstance(module, fura.FuraLayer)}
    assert torch.equal(_run(peft_model, inputs), expected), "not bit-identical at init"

    trainable = {key: p for key, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("fura_core" in key for key in trainable)
    _loss(peft_model(**inputs)).backward()
    for key, param in trainable.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), f"gradient of {key}"
    with torch.no_grad():
        for param in trainable.values():
            param.add_(param.grad.sign(), alpha=-1e-2)
    adapted = _run(peft_model, inputs)
    assert not torch.equal(adapted, expected), "a training step did not change the output"

    before = _base_state(peft_model)
    peft_model.merge_adapter()
    torch.testing.assert_close(_run(peft_model, inputs), adapted, atol=1e-4, rtol=1e-4)
    peft_model.unmerge_adapter()
    after = _base_state(peft_model)
    assert all(torch.equal(after[key], value) for key, value in before.items()), "unmerge is not bit-exact"

    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(name), tmp_path)
    assert torch.equal(_run(loaded, inputs), adapted), "save/load changed the outputs"

    generated = peft_model.generate(**inputs, max_new_tokens=3, do_sample=False) if arch.generates else None

    merged = peft_model.merge_and_unload()
    assert not any(isinstance(module, fura.FuraLayer) for module in merged.modules())
    torch.testing.assert_close(_run(merged, inputs), adapted, atol=1e-4, rtol=1e-4)
    if generated is not None:  # greedy decoding through the adapter (incl. its few-token path) = the merged model's
        assert torch.equal(generated, merged.generate(**inputs, max_new_tokens=3, do_sample=False))
    return layer_types
