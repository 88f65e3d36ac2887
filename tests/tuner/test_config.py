"""FuraConfig validation and the bad-input errors users see (module, shape, fix)."""

from __future__ import annotations

import importlib
import json

import peft
import pytest
import torch
from peft import PeftConfig, get_peft_model
from peft.utils import PeftType
from transformers import LlamaForCausalLM

import fura
from fura.tuner import registration as _registration

from ..conftest import tiny_llama_config


def _base():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def test_config_round_trips_through_json(tmp_path):
    config = fura.FuraConfig(
        rank=0.5,
        input_factorization={"qkv": "head", "mlp_down": (8, 12)},
        decomp_mode={"o": "input_one_block"},
        s_merged_to="split",
        target_modules=["q_proj"],
    )
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "FURA" and data["input_factorization"]["mlp_down"] == [8, 12]
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, fura.FuraConfig)
    assert loaded.rank == 0.5 and loaded.s_merged_to == "split" and loaded.init_weights is True
    assert loaded.weights_in_file is True  # the file holds the decomposition: loading skips it
    assert config.weights_in_file is False  # saving does not change the live config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"s_merged_to": "sideways"}, "unknown s_merged_to"),
        ({"decomp_mode": "square"}, "no implicit"),
        ({"decomp_mode": {"qkv": "square"}}, "no implicit"),
        ({"decomp_mode": "diagonal"}, "unknown decomp_mode"),
        ({"convert_mode": "lu"}, "unknown convert_mode"),
        ({"convert_mode": "qr"}, "s_merged_to='frozen'"),
        ({"rank": 0}, "positive"),
        ({"rank": -2}, "positive"),
        ({"rank": 1.5}, r"\(0, 1\)"),
        ({"rank": "most"}, "not 'full'"),
        ({"input_factorization": "seven"}, "cannot read"),
        ({"input_factorization": "0,64"}, "positive"),
        ({"bias": "some"}, "unknown bias"),
    ],
)
def test_bad_config_values_fail_early_with_a_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fura.FuraConfig(**kwargs)


def test_per_module_specs_are_parsed_once_when_the_config_is_built(monkeypatch):
    from fura.tuner import factorize

    calls = []
    parse = factorize.parse_factor_value
    monkeypatch.setattr(factorize, "parse_factor_value", lambda *a, **k: calls.append(a) or parse(*a, **k))
    config = fura.FuraConfig(input_factorization='{qkv: head, mlp_down: "8,12"}', decomp_mode={"o": "input"})
    parsed = len(calls)
    model = get_peft_model(_base(), config)
    assert parsed > 0 and len(calls) == parsed  # 14 modules planned, no spec parsed again
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    assert o_proj.fura_plan["default"].decomp_mode == "input_one_block"
    assert model.base_model.model.model.layers[0].mlp.down_proj.fura_plan["default"].in_blocks == 8


def test_a_field_changed_after_construction_is_validated_again():
    config = fura.FuraConfig(target_modules=["q_proj"])
    config.rank = "most"
    with pytest.raises(ValueError, match="not 'full'"):
        get_peft_model(_base(), config)
    config.rank = 4
    model = get_peft_model(_base(), config)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.fura_plan["default"].rank == 4


def test_factorization_that_does_not_divide_names_module_shape_and_fix():
    with pytest.raises(ValueError) as info:
        get_peft_model(_base(), fura.FuraConfig(target_modules=["q_proj"], input_factorization="5,12"))
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in message and "64" in message and "Fix" in message


def test_rank_above_block_size_names_module_and_fix():
    with pytest.raises(ValueError) as info:
        get_peft_model(_base(), fura.FuraConfig(target_modules=["k_proj"], rank=9))
    message = str(info.value)
    assert "k_proj" in message and "1..8" in message and "Fix" in message


def test_targets_that_match_nothing_list_the_linear_layers():
    with pytest.raises(ValueError) as info:
        get_peft_model(_base(), fura.FuraConfig(target_modules=["qproj"]))
    message = str(info.value)
    assert "qproj" in message and "q_proj" in message and "all-linear" in message


def test_unsupported_layer_type_is_named():
    with pytest.raises(TypeError) as info:
        get_peft_model(_base(), fura.FuraConfig(target_modules=["embed_tokens"]))
    message = str(info.value)
    assert "model.embed_tokens" in message and "Embedding" in message and "Fix" in message


def test_bad_input_width_is_named():
    model = get_peft_model(_base(), fura.FuraConfig(target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match=r"q_proj.*in_features=64"):
        layer(torch.randn(3, 48))


def test_registration_is_idempotent_and_survives_reload():
    assert fura.is_registered()
    fura.register()
    fura.register()
    reloaded = importlib.reload(fura)
    assert reloaded.is_registered()
    assert PeftType("FURA") is PeftType.FURA
    assert list(PeftType).count(PeftType.FURA) == 1
    model = get_peft_model(_base(), reloaded.FuraConfig(target_modules=["q_proj"]))
    assert model.peft_config["default"].peft_type == PeftType.FURA


def test_version_guard_gives_a_clear_message(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.10.0")
    with pytest.raises(_registration.PeftInternalsChangedError, match="pip install -U"):
        _registration._check_peft_version()


def test_missing_registry_is_reported(monkeypatch):
    from peft import mapping

    monkeypatch.delattr(mapping, "PEFT_TYPE_TO_PREFIX_MAPPING")
    with pytest.raises(_registration.PeftInternalsChangedError, match="PEFT_TYPE_TO_PREFIX_MAPPING"):
        _registration.register()
