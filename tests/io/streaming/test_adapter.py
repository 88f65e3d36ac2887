"""The layer-streamed FuRA adapter: exactly what ``get_peft_model`` computes on the loaded model."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

import fura
from fura.io.streaming.adapter import ADAPTER_WEIGHTS, prepare_adapter

from .conftest import TINY, adapter_config, load_model, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def _forbid_decompositions(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a decomposition ran while loading a streamed adapter")

    for name in ("svd", "eigh", "qr"):
        monkeypatch.setattr(torch.linalg, name, forbidden)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_adapter_equals_in_memory_get_peft_model(dtype, checkpoints, tmp_path, monkeypatch):
    model_dir = checkpoints(dtype)
    report = prepare_adapter(model_dir, tmp_path / "streamed", fura.FuraConfig(), progress=False)
    assert report.modules == 7 * TINY["layers"] and report.layers == TINY["layers"]

    expected_model = get_peft_model(load_model(model_dir, dtype), fura.FuraConfig())
    expected = get_peft_model_state_dict(expected_model)
    expected_model.save_pretrained(tmp_path / "in_memory")
    with safe_open(str(tmp_path / "streamed" / ADAPTER_WEIGHTS), "pt") as handle:
        assert set(handle.keys()) == set(expected)
    streamed_config, in_memory_config = (adapter_config(tmp_path / name) for name in ("streamed", "in_memory"))
    assert streamed_config == in_memory_config
    assert streamed_config["weights_in_file"] is True and streamed_config["base_model_name_or_path"] == str(model_dir)

    base = load_model(model_dir, dtype)
    inputs = token_ids()
    with torch.no_grad():
        reference = base(inputs).logits
    _forbid_decompositions(monkeypatch)
    loaded = PeftModel.from_pretrained(base, tmp_path / "streamed")
    state = get_peft_model_state_dict(loaded)
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, reference)


def test_streamed_adapter_other_options_tied_embeddings_single_file(checkpoints, tmp_path):
    model_dir = checkpoints(tie_word_embeddings=True, shard_per_layer=False)
    assert (model_dir / "model.safetensors").is_file()
    config = fura.FuraConfig(
        decomp_mode="input_one_block", rank=4, s_merged_to="split", target_modules=["q_proj", "down_proj"]
    )
    prepare_adapter(model_dir, tmp_path, config, progress=False)
    expected = get_peft_model_state_dict(get_peft_model(load_model(model_dir), config))
    loaded = PeftModel.from_pretrained(load_model(model_dir), tmp_path)
    state = get_peft_model_state_dict(loaded)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert config.target_modules == {"q_proj", "down_proj"}  # the caller's config is not modified


def test_streamed_adapter_refuses_extra_saved_tensors(checkpoints, tmp_path):
    config = fura.FuraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        prepare_adapter(checkpoints(), tmp_path, config, progress=False)
    assert not (tmp_path / ADAPTER_WEIGHTS).exists()
