"""FuRA on fused MoE expert stacks (``target_parameters``): the tiny random Mixtral, Qwen3-MoE and gpt-oss models of
``benchmarks/architectures.py``."""

from __future__ import annotations

import warnings

import pytest
import torch
from benchmarks.architectures import build as build_architecture
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import fura
from fura.tuner.coverage import measure
from fura.tuner.experts import FuraParameterTargetError, ParamWrapper
from fura.tuner.model import FuraAdapterFileError

#: The MoE architectures of ``benchmarks/architectures.py``, built with two decoder layers.
MOE_ARCHITECTURES = ("gpt_oss", "mixtral", "qwen3_moe")


def build(name: str):
    """A fresh tiny MoE model of ``name`` with two decoder layers: two wrappers per expert parameter."""
    return build_architecture(name, num_hidden_layers=2)


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 64, (2, 9))


def _snapshot(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("name", MOE_ARCHITECTURES)
def test_default_config_adapts_every_expert_and_leaves_routers_frozen(name):
    model = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "parameters left without an adapter" warning
        peft_model = get_peft_model(model, fura.FuraConfig())
    assert sorted(peft_model.peft_config["default"].target_parameters) == ["experts.down_proj", "experts.gate_up_proj"]
    coverage = measure(peft_model)
    assert 1 - coverage.adapted_share < 0.3
    wrappers = [m for m in peft_model.modules() if isinstance(m, ParamWrapper)]
    assert sorted(w.parameter_name for w in wrappers) == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]
    for wrapper in wrappers:
        experts = wrapper.num_experts
        k, _, _ = wrapper.block_layout("default")
        assert experts == 4 and k % experts == 0
        assert wrapper.fura_core["default"].weight.requires_grad
    routers = [p for n, p in peft_model.named_parameters() if ".router." in n or ".mlp.gate." in n]
    assert routers and not any(p.requires_grad for p in routers)


@pytest.mark.parametrize("name", MOE_ARCHITECTURES)
def test_init_step_merge_unmerge_save_load(name, tokens, tmp_path):
    model = build(name)
    expected = model(tokens).logits
    original = _snapshot(model)
    peft_model = get_peft_model(model, fura.FuraConfig())
    assert torch.equal(peft_model(tokens).logits, expected)

    peft_model.train()
    peft_model(tokens, labels=tokens).loss.backward()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    expert_tensors = [n for n in trainable if ".experts." in n]
    assert len(expert_tensors) == 8  # core + scale of two stacks in two layers
    for param_name, param in trainable.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    assert all(trainable[n].grad.abs().sum() > 0 for n in expert_tensors)
    torch.optim.SGD(trainable.values(), lr=0.5).step()
    peft_model.eval()
    adapted = peft_model(tokens).logits
    assert not torch.allclose(adapted, expected)

    peft_model.merge_adapter()
    torch.testing.assert_close(peft_model(tokens).logits, adapted, atol=1e-5, rtol=1e-5)
    peft_model.unmerge_adapter()
    base_state = {
        key.replace(".base_layer", ""): value
        for key, value in peft_model.get_base_model().state_dict().items()
        if "fura_" not in key
    }
    assert base_state.keys() == original.keys()
    assert all(torch.equal(base_state[key], value) for key, value in original.items())

    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(name), tmp_path)
    assert torch.equal(loaded(tokens).logits, adapted)

    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, ParamWrapper) for m in merged.modules())
    torch.testing.assert_close(merged(tokens).logits, adapted, atol=1e-5, rtol=1e-5)


def test_unmerge_bit_exact_restores_each_expert_stack(tokens):
    peft_model = get_peft_model(build("mixtral"), fura.FuraConfig(init_weights=False))
    wrappers = [m for m in peft_model.modules() if isinstance(m, ParamWrapper)]
    before = [w.target_weight().detach().clone() for w in wrappers]
    peft_model.merge_adapter()
    assert not any(torch.equal(w.target_weight(), b) for w, b in zip(wrappers, before, strict=True))
    peft_model.unmerge_adapter()
    assert all(torch.equal(w.target_weight(), b) for w, b in zip(wrappers, before, strict=True))


def test_unmerge_without_copy_inverts_the_transform(tokens):
    peft_model = get_peft_model(build("gpt_oss"), fura.FuraConfig(init_weights=False, exact_unmerge=False))
    wrappers = [m for m in peft_model.modules() if isinstance(m, ParamWrapper)]
    before = [w.target_weight().detach().clone() for w in wrappers]
    peft_model.merge_adapter()
    peft_model.unmerge_adapter()
    for wrapper, weight in zip(wrappers, before, strict=True):
        torch.testing.assert_close(wrapper.target_weight(), weight, atol=1e-5, rtol=1e-5)


def test_loading_refuses_a_file_missing_an_expert_tensor(tmp_path):
    peft_model = get_peft_model(build("qwen3_moe"), fura.FuraConfig(init_weights=False))
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = next(key for key in tensors if ".experts.base_layer.fura_core" in key)
    del tensors[dropped]
    save_file(tensors, path)
    base = build("qwen3_moe")
    with pytest.raises(FuraAdapterFileError, match="missing 1 tensor"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, ParamWrapper) for m in base.modules())


def test_failing_injection_leaves_the_model_intact():
    model = build("mixtral")
    modules_before = dict(model.named_modules())
    state_before = _snapshot(model)
    # layer 0's gate_up_proj is wrapped first (parameters are injected in definition order), then down_proj is refused
    config = fura.FuraConfig(rank_pattern={"down_proj": 10_000})
    with pytest.raises(ValueError, match="rank 10000 is outside"):
        get_peft_model(model, config)
    assert dict(model.named_modules()).keys() == modules_before.keys()
    assert all(modules_before[n] is m for n, m in model.named_modules())
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_parameter_target_is_refused_early():
    model = build("gpt_oss")
    with pytest.raises(FuraParameterTargetError, match=r"gate_up_proj_bias.*Fix: leave it out"):
        get_peft_model(model, fura.FuraConfig(target_parameters=["experts.gate_up_proj_bias"]))
    assert not any(isinstance(m, ParamWrapper) for m in model.modules())


def test_explicit_targets_and_a_router_when_named(tokens):
    model = build("mixtral")
    expected = model(tokens).logits
    config = fura.FuraConfig(target_modules=["q_proj"], target_parameters=["experts.down_proj", "mlp.gate.weight"])
    peft_model = get_peft_model(model, config)
    names = sorted(m.parameter_name for m in peft_model.modules() if isinstance(m, ParamWrapper))
    assert names == ["down_proj", "down_proj", "weight", "weight"]
    assert torch.equal(peft_model(tokens).logits, expected)
    router = peft_model.base_model.model.model.layers[0].mlp.gate
    assert isinstance(router, ParamWrapper) and router.fura_core["default"].weight.requires_grad


def test_second_adapter_and_mixed_batch_error(tokens):
    peft_model = get_peft_model(build("mixtral"), fura.FuraConfig(init_weights=False))
    peft_model.add_adapter("other", fura.FuraConfig(init_weights=False))
    wrappers = [m for m in peft_model.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 4 and all(set(w.fura_core) == {"default", "other"} for w in wrappers)
    first = peft_model(tokens).logits
    peft_model.set_adapter("other")
    assert not torch.allclose(peft_model(tokens).logits, first)
    peft_model.eval()
    with pytest.raises(ValueError, match=r"adapter_names.*not supported.*target_parameters"):
        peft_model(tokens, adapter_names=["default", "other"])


def test_leaving_the_experts_out_warns_with_share_and_fix():
    with pytest.warns(UserWarning, match=r"leaves 7\d% of the model's parameters.*MixtralExperts.*target_parameters"):
        get_peft_model(build("mixtral"), fura.FuraConfig(target_parameters=[]))


def test_per_module_specs_reach_expert_stacks(tokens):
    model = build("qwen3_moe")
    expected = model(tokens).logits
    config = fura.FuraConfig(decomp_mode={"mlp_upgate": "input_one_block"}, rank_pattern={"down_proj": 2})
    peft_model = get_peft_model(model, config)
    wrappers = {m.parameter_name: m for m in peft_model.modules() if isinstance(m, ParamWrapper)}
    assert wrappers["gate_up_proj"].fura_plan["default"].decomp_mode == "input_one_block"
    assert wrappers["down_proj"].fura_plan["default"].rank == 2
    assert torch.equal(peft_model(tokens).logits, expected)


def test_an_adapter_saved_without_target_parameters_still_loads(tokens, tmp_path):
    """Adapter configs written before target_parameters existed have no such key: their files hold no experts."""
    import json

    peft_model = get_peft_model(build("mixtral"), fura.FuraConfig(target_parameters=[], init_weights=False))
    expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["target_parameters"]
    config_path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(build("mixtral"), tmp_path)
    assert torch.equal(loaded(tokens).logits, expected)
    assert not any(isinstance(m, ParamWrapper) for m in loaded.modules())
