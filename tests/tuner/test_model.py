"""PEFT-grade behaviour of FuRA adapters (modelled on PEFT's tests/test_custom_models.py)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

import fura
from fura.tuner.layer import FuraBaseMismatchError, FuraCore, FuraLayer, FuraWeightsMissingError

from ..conftest import tiny_llama_config


def _base(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).to(dtype).eval()


def _same_base(weights, seed):
    """A base with other random init, then loaded with the reference weights."""
    model = _base(seed)
    model.load_state_dict(weights)
    return model


def _trained(base, inputs, steps=3, config=None, adapter_name="default"):
    model = get_peft_model(base, config or fura.FuraConfig(), adapter_name=adapter_name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        model(inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _base_weights(model):
    """The base model's weights under their original names (adapter tensors left out)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k.replace("base_layer.", ""): v.clone() for k, v in model.state_dict().items() if "fura_" not in k}


def test_only_adapter_tensors_change_during_training(tiny_inputs):
    base = _base()
    model = get_peft_model(base, fura.FuraConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _trained_inplace = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(tiny_inputs, labels=tiny_inputs).loss.backward()
        _trained_inplace.step()
        _trained_inplace.zero_grad()
    for key, value in model.state_dict().items():
        changed = not torch.equal(before[key], value)
        assert changed == (".fura_core." in key), key


def test_save_load_round_trip_with_other_seed(tmp_path, tiny_inputs, capsys):
    base = _base()
    reference_weights = copy.deepcopy(base.state_dict())
    model = _trained(base, tiny_inputs)
    expected = model(tiny_inputs).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".fura_" in key for key in tensors)
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_params = sum(v.numel() for v in reference_weights.values())
    print(f"adapter file: {size:,} bytes for {trainable:,} trainable numbers (base model {base_params:,} numbers)")
    stored = sum(t.numel() for t in tensors.values())
    assert stored < 2.5 * trainable and stored < base_params
    assert json.loads((tmp_path / "adapter_config.json").read_text())["weights_in_file"] is True

    torch.manual_seed(1234)
    fresh = LlamaForCausalLM(tiny_llama_config()).eval()
    fresh.load_state_dict(reference_weights)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.allclose(loaded(tiny_inputs).logits, expected, atol=1e-6)


def test_loading_never_recomputes_a_decomposition(tmp_path, tiny_inputs, monkeypatch):
    base = _base()
    weights = copy.deepcopy(base.state_dict())
    model = _trained(base, tiny_inputs)
    model.save_pretrained(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("an SVD/QR ran during loading")

    monkeypatch.setattr(torch.linalg, "svd", forbidden)
    monkeypatch.setattr(torch.linalg, "qr", forbidden)
    loaded = PeftModel.from_pretrained(_same_base(weights, 7), tmp_path)
    loaded(tiny_inputs)
    again = _same_base(weights, 8)
    again.load_adapter(str(tmp_path))  # transformers' integration
    again(tiny_inputs)


def test_low_cpu_mem_usage_load_leaves_nothing_on_meta(tmp_path, tiny_inputs):
    base = _base()
    weights = copy.deepcopy(base.state_dict())
    model = _trained(base, tiny_inputs)
    expected = model(tiny_inputs).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_same_base(weights, 3), tmp_path, low_cpu_mem_usage=True)
    assert not [n for n, p in loaded.named_parameters() if p.device.type == "meta"]
    assert torch.allclose(loaded(tiny_inputs).logits, expected, atol=1e-6)


def test_merged_unmerged_and_unloaded_outputs_agree(tiny_inputs):
    base = _base()
    original = _base_weights(base)
    model = _trained(base, tiny_inputs)
    unmerged = model(tiny_inputs).logits
    model.merge_adapter()
    merged = model(tiny_inputs).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()  # idempotent: nothing merged twice
    assert torch.allclose(model(tiny_inputs).logits, merged, atol=0)
    model.unmerge_adapter()
    assert all(torch.equal(original[k], v) for k, v in _base_weights(model).items())
    assert torch.equal(model(tiny_inputs).logits, unmerged)
    plain = model.merge_and_unload()
    assert type(plain) is LlamaForCausalLM
    assert not any(isinstance(m, FuraLayer) for m in plain.modules())
    assert torch.allclose(plain(tiny_inputs).logits, unmerged, atol=1e-5)


def test_unload_returns_the_untouched_base(tiny_inputs):
    base = _base()
    reference = base(tiny_inputs).logits
    model = _trained(base, tiny_inputs)
    plain = model.unload()
    assert torch.equal(plain(tiny_inputs).logits, reference)


def test_safe_merge_refuses_non_finite_weights(tiny_inputs):
    base = _base()
    original = _base_weights(base)
    model = _trained(base, tiny_inputs)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.fura_core["default"].weight[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    model.unmerge_adapter()  # whatever merged before the failure is undone
    assert all(torch.equal(original[k], v) for k, v in _base_weights(model).items())


def test_thousand_merge_unmerge_cycles_in_bfloat16_are_bit_exact(tiny_inputs):
    base = _base(dtype=torch.bfloat16)
    original = _base_weights(base)
    model = get_peft_model(base, fura.FuraConfig(target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.01)
    for _ in range(1000):
        model.merge_adapter()
        model.unmerge_adapter()
    assert all(torch.equal(original[k], v) for k, v in _base_weights(model).items())


def test_inverse_unmerge_is_close_without_a_backup(tiny_inputs):
    base = _base()
    original = _base_weights(base)
    model = _trained(base, tiny_inputs, config=fura.FuraConfig(exact_unmerge=False))
    model.merge_adapter()
    model.unmerge_adapter()
    assert all(torch.allclose(original[k], v, atol=1e-5) for k, v in _base_weights(model).items())


def test_disabled_adapter_equals_base(tiny_inputs):
    base = _base()
    reference = base(tiny_inputs).logits
    model = _trained(base, tiny_inputs)
    assert not torch.allclose(model(tiny_inputs).logits, reference)
    with model.disable_adapter():
        assert torch.equal(model(tiny_inputs).logits, reference)
    model.merge_adapter()
    with model.disable_adapter():  # disabling also unmerges
        assert torch.equal(model(tiny_inputs).logits, reference)


def test_multiple_adapters_switch_and_delete(tiny_inputs, tmp_path):
    base = _base()
    model = _trained(base, tiny_inputs, adapter_name="first")
    first = model(tiny_inputs).logits
    model.add_adapter("second", fura.FuraConfig(target_modules=["q_proj", "v_proj"], decomp_mode="input_one_block"))
    model.set_adapter("second")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".second" in n for n in trainable)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".second" in name and p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    second = model(tiny_inputs).logits
    assert not torch.allclose(first, second)
    model.set_adapter("first")
    assert torch.equal(model(tiny_inputs).logits, first)
    model.delete_adapter("first")
    assert list(model.peft_config) == ["second"]
    assert not [n for n, _ in model.named_parameters() if ".first" in n]
    assert torch.equal(model(tiny_inputs).logits, second)


def test_trl_style_reference_adapter_copy(tiny_inputs):
    """TRL copies every parameter named '.default.' into a '.ref.' adapter: frozen bases included."""
    base = _base()
    model = _trained(base, tiny_inputs)
    expected = model(tiny_inputs).logits
    model.add_adapter("ref", model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
    model.set_adapter("ref")
    assert torch.equal(model(tiny_inputs).logits, expected)


def test_fsdp_wrap_policy_sees_the_trainable_cores():
    model = get_peft_model(_base(), fura.FuraConfig())
    policy = fsdp_auto_wrap_policy(model)
    cores = [m for m in model.modules() if isinstance(m, FuraCore)]
    assert cores and all(policy(module=m, recurse=False, nonwrapped_numel=m.weight.numel()) for m in cores)


def test_modules_to_save_round_trip(tmp_path):
    torch.manual_seed(0)
    config = tiny_llama_config(num_labels=3, pad_token_id=0)
    base = LlamaForSequenceClassification(config).eval()
    weights = copy.deepcopy(base.state_dict())
    inputs = torch.randint(1, 96, (2, 9))
    model = get_peft_model(base, fura.FuraConfig(task_type="SEQ_CLS", modules_to_save=["score"]))
    assert any("modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    expected = model(inputs).logits
    model.save_pretrained(tmp_path)
    fresh = LlamaForSequenceClassification(config).eval()
    fresh.load_state_dict(weights)
    assert torch.allclose(PeftModel.from_pretrained(fresh, tmp_path)(inputs).logits, expected, atol=1e-6)


def test_auto_peft_model_and_default_targets(tmp_path, tiny_inputs):
    _base().save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model = _trained(base, tiny_inputs)
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, FuraLayer)}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    expected = model(tiny_inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.allclose(loaded(tiny_inputs).logits, expected, atol=1e-6)


def test_all_linear_skips_the_output_head():
    model = get_peft_model(_base(), fura.FuraConfig(target_modules="all-linear"))
    adapted = [n for n, m in model.named_modules() if isinstance(m, FuraLayer)]
    assert len(adapted) == 14 and not any("lm_head" in n for n in adapted)


def test_adapter_onto_a_different_base_is_refused(tmp_path, tiny_inputs):
    model = _trained(_base(0), tiny_inputs)
    model.save_pretrained(tmp_path)
    with pytest.raises(FuraBaseMismatchError, match="different base model"):
        PeftModel.from_pretrained(_base(99), tmp_path)
    unchecked = fura.FuraConfig.from_pretrained(tmp_path)
    unchecked.check_base_model = False
    PeftModel.from_pretrained(_base(99), tmp_path, config=unchecked)  # explicit opt-out works


def test_an_adapter_without_weights_refuses_to_run(tiny_inputs):
    model = get_peft_model(_base(), fura.FuraConfig(weights_in_file=True))
    with pytest.raises(FuraWeightsMissingError, match="weights_in_file=False"):
        model(tiny_inputs)


def test_quantised_base_4bit_trains_s_and_r(tiny_inputs):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    base = _base()
    base.save_pretrained("/tmp/fura-tiny-4bit-src")
    quantised = LlamaForCausalLM.from_pretrained(
        "/tmp/fura-tiny-4bit-src",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
    )
    quantised.train()  # bitsandbytes repacks 4-bit weights in eval-mode forwards on some CPUs (DESIGN.md)
    reference = quantised(tiny_inputs).logits
    model = get_peft_model(quantised, fura.FuraConfig())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    assert torch.equal(model(tiny_inputs).logits, reference)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(4):
        loss = model(tiny_inputs, labels=tiny_inputs).loss
        loss.backward()
        assert layer.fura_core["default"].weight.grad.abs().sum() > 0
        assert layer.fura_core["default"].scale.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    before = layer.get_base_layer().weight.data.clone()
    adapted = model(tiny_inputs).logits
    model.merge_adapter()
    assert torch.allclose(model(tiny_inputs).logits, adapted, atol=0.5)  # re-quantised: NF4-sized error
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight.data, before)


def test_merge_and_unload_with_a_weightless_module_to_save(tiny_inputs):
    """modules_to_save may wrap a module without a .weight (e.g. a LLaVA projector)."""

    class Projector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.inner(x)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.projector = Projector()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.proj(self.projector(x))

    torch.manual_seed(0)
    model = get_peft_model(Model(), fura.FuraConfig(target_modules=["proj"], modules_to_save=["projector"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 64)
    expected = model(x)
    merged = model.merge_and_unload()
    assert torch.allclose(merged(x), expected, atol=1e-5)
