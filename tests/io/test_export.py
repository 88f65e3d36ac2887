"""Serving exports: the dense merged folder (``fura merge``) and the LoRA export (``fura export lora``).

FuRA's trained update ``ΔW = W0·blockdiag(Δ)`` is full rank, so a LoRA adapter reproduces it only at rank
``min(out, in)``; smaller ranks are approximations whose error :func:`fura.io.export.export_lora` reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import fura
import fura_cli.commands as cli
from fura.io.export import REPORT_NAME, export_lora
from fura.recipes.artifacts import merge_adapter
from fura.tuner.layer import FuraLayer

STEPS = 3


def load_base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A FuRA adapter on all projections after a few AdamW steps (``ΔW`` no longer zero), and its saved folder."""
    torch.manual_seed(0)
    model = get_peft_model(load_base(tiny_model_dir), fura.FuraConfig())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, model.config.vocab_size, (4, 16))
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    folder = tmp_path_factory.mktemp("fura-adapter")
    model.save_pretrained(folder)
    return model, folder, ids


def shapes(model) -> dict[str, tuple[int, int]]:
    return {
        name.removeprefix("base_model.model."): (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, FuraLayer)
    }


def test_trained_fura_update_has_full_rank(trained, tmp_path: Path) -> None:
    model, _, _ = trained
    report = export_lora(model, 1, tmp_path / "lora")
    dims = shapes(model)
    assert set(report.delta_ranks) == set(dims) and len(dims) == 14  # 2 layers x 7 projections
    for name, (out, inp) in dims.items():
        assert report.delta_ranks[name] == min(out, inp), name  # no exact low-rank form below the full rank


def test_lora_export_at_the_modules_full_rank_is_exact_and_loads_with_peft(tiny_model_dir: Path, tmp_path: Path):
    """At rank ``min(out, in)`` of every adapted module (k/v: 16 x 32) the export is exact and PEFT loads it."""
    torch.manual_seed(0)
    model = get_peft_model(load_base(tiny_model_dir), fura.FuraConfig(target_modules=["k_proj", "v_proj"]))
    for layer in model.modules():
        if isinstance(layer, FuraLayer):
            layer.perturb("default")
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    full = min(min(shape) for shape in shapes(model).values())
    report = export_lora(model, full, tmp_path / "lora")
    assert report.overall_error <= 1e-5 and report.max_error <= 1e-5
    lora = PeftModel.from_pretrained(load_base(tiny_model_dir), tmp_path / "lora").eval()
    config = lora.peft_config["default"]
    assert config.peft_type.value == "LORA" and config.r == full and config.lora_alpha == full
    with torch.no_grad():
        assert torch.allclose(lora(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_a_rank_above_a_module_is_refused_naming_it(trained, tmp_path: Path) -> None:
    model, _, _ = trained
    with pytest.raises(ValueError, match=r"rank 17 is larger than module '.*k_proj' \(16x32\).*--rank 16"):
        export_lora(model, 17, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_peft_convert_to_lora_runs_on_a_fura_model_and_matches_the_export(trained, tmp_path: Path) -> None:
    """PEFT's ``convert_to_lora`` works on FuRA models (``get_additive_delta``) and is what ``export_lora`` saves."""
    from peft import convert_to_lora
    from safetensors.torch import load_file

    model, _, _ = trained
    config, tensors = convert_to_lora(model, 4)
    assert config.r == 4 and len(tensors) == 2 * len(shapes(model))
    export_lora(model, 4, tmp_path / "lora4")
    saved = load_file(tmp_path / "lora4" / "adapter_model.safetensors")
    assert saved.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(saved[key], tensor), key


def test_lora_export_at_small_rank_reports_its_error(trained, tiny_model_dir: Path, tmp_path: Path) -> None:
    model, _, ids = trained
    report = export_lora(model, 4, tmp_path / "lora4")
    assert all(0.0 < error < 1.0 for error in report.errors.values())
    assert 0.0 < report.overall_error <= report.max_error < 1.0
    assert set(report.ranks.values()) == {4}
    assert not json.loads((tmp_path / "lora4" / "adapter_config.json").read_text())["rank_pattern"]
    saved = json.loads((tmp_path / "lora4" / REPORT_NAME).read_text())
    assert saved["overall_error"] == pytest.approx(report.overall_error)
    lora = PeftModel.from_pretrained(load_base(tiny_model_dir), tmp_path / "lora4").eval()
    base = load_base(tiny_model_dir)
    with torch.no_grad():
        fura_logits, lora_logits, base_logits = (m(input_ids=ids).logits for m in (model, lora, base))
    # an approximation: closer to the FuRA model than the base model is
    assert (lora_logits - fura_logits).norm() < (base_logits - fura_logits).norm()


def test_export_lora_refuses_a_model_without_fura_layers(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig

    lora = get_peft_model(load_base(tiny_model_dir), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no FuRA adapter"):
        export_lora(lora, 4, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_to_dense_gives_a_plain_model_with_the_adapted_outputs(trained, tmp_path: Path) -> None:
    model, adapter, ids = trained
    merged_dir = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    merged = load_base(merged_dir)
    assert not any("fura" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_command_line_exports_a_lora_adapter_with_tokenizer(trained, tmp_path: Path, capsys) -> None:
    _, adapter, _ = trained
    assert cli.main(["export", "lora", "--adapter", str(adapter), "--rank", "8", "-o", str(tmp_path / "cli")]) == 0
    assert "relative Frobenius error" in capsys.readouterr().out
    for name in ("adapter_config.json", "adapter_model.safetensors", REPORT_NAME, "tokenizer.json"):
        assert (tmp_path / "cli" / name).is_file(), name
