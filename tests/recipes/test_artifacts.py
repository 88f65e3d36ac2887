"""Saved artifacts reproduce the trained model: dense folders for explicit layers, PiSSA converted for the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fura.recipes.artifacts import adapter_base, dense_state_dict, resolve_trained, save_trained_model
from fura.recipes.loading import load_model_for_method

INPUTS = torch.tensor([[1, 5, 9, 40, 77, 3, 120, 8, 2, 60]])


pytestmark = pytest.mark.usefixtures("one_thread")


def perturb_trainable(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Stand-in for training: move every trainable tensor a little (seeded)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator).to(param.dtype))


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUTS).logits.float()


@pytest.mark.parametrize(("method", "atol"), [("svd", 1e-5), ("qfura-nf4", 1e-4), ("full", 1e-6)])
def test_dense_folder_matches_the_trained_model(tiny_model_dir: Path, tmp_path: Path, method: str, atol: float) -> None:
    model, info = load_model_for_method(method, tiny_model_dir, dtype="float32")
    perturb_trainable(model)
    expected = logits(model)
    assert info.save_format == "dense"
    folder = save_trained_model(model, info, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(reloaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(reloaded), expected, atol=atol, rtol=0)


def test_dense_state_dict_has_plain_linear_keys(tiny_model_dir: Path) -> None:
    model, _ = load_model_for_method("svd", tiny_model_dir, dtype="float32")
    state = dense_state_dict(model)
    assert "model.layers.0.self_attn.q_proj.weight" in state
    assert not any("svd_" in key for key in state)


def test_pissa_adapter_is_converted_for_the_original_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fura.recipes.artifacts import save_initial_adapter

    torch.manual_seed(0)
    model, info = load_model_for_method("pissa", tiny_model_dir, dtype="float32", overrides={"r": 8})
    initial = save_initial_adapter(model, tmp_path / "adapter_init")
    perturb_trainable(model)
    expected = logits(model)
    folder = save_trained_model(model, info, tmp_path / "adapter", initial_adapter=initial)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    restored = PeftModel.from_pretrained(base, folder)
    torch.testing.assert_close(logits(restored), expected, atol=1e-4, rtol=0)


def test_resolve_trained_accepts_run_adapter_and_base_folders(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, info = load_model_for_method("fura", tiny_model_dir, dtype="float32")
    run = tmp_path / "run"
    save_trained_model(model, info, run / "adapter")
    assert adapter_base(run / "adapter") == str(tiny_model_dir)
    assert resolve_trained(run).adapter == str(run / "adapter")
    assert resolve_trained(run / "adapter").base == str(tiny_model_dir)
    assert resolve_trained(tiny_model_dir, run / "adapter").adapter == str(run / "adapter")
    assert resolve_trained(tiny_model_dir).adapter is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_trained(tmp_path / "missing")


@pytest.mark.parametrize("method", ["qlora", "qfura"])
def test_a_quantised_run_is_loaded_on_its_quantised_base(tiny_model_dir, tmp_path, method) -> None:
    """``fura eval`` / ``fura merge`` of a QLoRA / QFuRA run folder evaluate the model that was trained."""
    import json

    from fura.recipes.artifacts import load_for_inference
    from fura.recipes.base_models import is_4bit_model

    model, info = load_model_for_method(method, tiny_model_dir, dtype="float32")
    perturb_trainable(model)
    run = tmp_path / "run"
    save_trained_model(model, info, run / "adapter")
    (run / "method.json").write_text(json.dumps(info.to_dict()))
    for argument in (run, run / "adapter"):
        loaded, _, _ = load_for_inference(argument, dtype="float32")
        assert is_4bit_model(loaded), argument
        torch.testing.assert_close(logits(loaded), logits(model), atol=1e-4, rtol=0)
