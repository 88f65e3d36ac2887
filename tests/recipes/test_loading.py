"""Loading and applying a method: every method builds on a tiny Llama, trains, and reports the trainable count it
should.

Tiny Llama (tests/data/conftest.py): hidden 32, intermediate 64, 4 heads of 8, 2 KV heads, 2 layers, so per layer
q/o: 32→32, k/v: 32→16, gate/up: 32→64, down: 64→32. The 4-bit methods run on CPU with bitsandbytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fura.recipes.base_models import count_parameters, is_4bit_model
from fura.recipes.jsonable import jsonable
from fura.recipes.loading import apply_method, load_model_for_method
from fura.recipes.method_args import SEVEN_PROJECTIONS
from fura.recipes.registry import LORA_COMMONSENSE_TARGETS, METHODS, get_method

from .data.conftest import build_tokenizer, tiny_causal_lm

LAYERS = 2
SHAPES = {  # leaf: (in, out)
    "q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
    "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32),
}  # fmt: skip
BASE_PARAMS = sum(p.numel() for p in tiny_causal_lm(len(build_tokenizer())).parameters())


def lora_count(rank: int, targets, dora: bool = False) -> int:
    """``r·(in + out)`` per module (+ ``out`` magnitudes for DoRA), over both layers."""
    per_layer = sum(rank * sum(SHAPES[t]) + (SHAPES[t][1] if dora else 0) for t in targets)
    return LAYERS * per_layer


def fura_count() -> int:
    """``in·(b + 1)`` per module: b = 8 for in = 32 (4 blocks of 8; o_proj by head: 4 heads of 8), 8 for in = 64."""
    return LAYERS * sum(in_f * (8 + 1) for in_f, _ in SHAPES.values())


def svd_count() -> int:
    """U of each full SVD: ``out·min(out, in)``."""
    return LAYERS * sum(out * min(out, in_f) for in_f, out in SHAPES.values())


def oft_count(block: int) -> int:
    """PEFT's OFT keeps one skew-symmetric block per ``block`` inputs: ``(in / b) · b(b - 1)/2`` per module."""
    return LAYERS * sum(in_f // block * block * (block - 1) // 2 for in_f, _ in SHAPES.values())


EXPECTED = {
    "fura": fura_count(),
    "lora": lora_count(64, LORA_COMMONSENSE_TARGETS),
    "dora": lora_count(64, LORA_COMMONSENSE_TARGETS, dora=True),
    "pissa": lora_count(8, LORA_COMMONSENSE_TARGETS),  # r=8: PiSSA cannot exceed min(in, out) of the tiny layers
    "oft": oft_count(8),
    "full": BASE_PARAMS,
    "svd": svd_count(),
    "fura-explicit": fura_count(),
    "qlora": lora_count(48, SEVEN_PROJECTIONS),
    "qdora": lora_count(64, SEVEN_PROJECTIONS, dora=True),
    "qfura": fura_count(),
    "qfura-nf4": fura_count(),
}
OVERRIDES = {"pissa": {"r": 8}, "oft": {"oft_block_size": 8}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    tiny_causal_lm(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(METHODS))  # a new method without an EXPECTED count fails
def test_method_builds_trains_and_counts(tiny_dir: Path, name: str) -> None:
    model, info = load_model_for_method(name, tiny_dir, dtype="float32", overrides=OVERRIDES.get(name))
    assert info.trainable_params == EXPECTED[name], info.summary()
    assert info.trainable_params == count_parameters(model)[0]
    assert 0 < info.trainable_percent <= 100
    assert info.quantized == (name in ("qlora", "qdora", "qfura", "qfura-nf4"))
    assert is_4bit_model(model) == METHODS[name].quantize_base
    model.train()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)


def test_peft_methods_come_from_peft(tiny_dir: Path) -> None:
    from peft import LoraConfig, PeftModel

    from fura import FuraConfig

    model, _ = load_model_for_method("dora", tiny_dir, dtype="float32")
    assert isinstance(model, PeftModel)
    config = model.peft_config["default"]
    assert isinstance(config, LoraConfig) and config.use_dora and (config.r, config.lora_alpha) == (64, 128)
    model, _ = load_model_for_method("fura", tiny_dir, dtype="float32")
    assert isinstance(model.peft_config["default"], FuraConfig)


def test_overrides_replace_defaults(tiny_dir: Path) -> None:
    _, info = load_model_for_method("lora", tiny_dir, dtype="float32", overrides={"r": 4, "target_modules": ["q_proj"]})
    assert info.trainable_params == LAYERS * 4 * sum(SHAPES["q_proj"])
    assert info.method_args["r"] == 4 and info.method_args["lora_alpha"] == 128


def test_4bit_methods_need_a_4bit_model() -> None:
    model = tiny_causal_lm(len(build_tokenizer()))
    with pytest.raises(ValueError, match="not quantised"):
        apply_method(model, "qlora")


def test_method_info_is_json_ready(tiny_dir: Path) -> None:
    import json

    _, info = load_model_for_method("qlora", tiny_dir, dtype="float32")
    payload = json.loads(json.dumps(info.to_dict()))
    assert payload["method_args"]["target_modules"] == list(SEVEN_PROJECTIONS)
    assert jsonable({"a": {1, 2}, "b": (torch.float16,)}) == {"a": [1, 2], "b": ["float16"]}


def test_fura_explicit_is_the_reference_layer_and_lossless(tiny_dir: Path) -> None:
    """``fura-explicit``: BlockTT layers in the reference's order (scale_large_core), the base model's function."""
    from fura import BlockTTLinear

    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    base, _ = load_model_for_method("full", tiny_dir, dtype="float32")
    explicit, info = load_model_for_method("fura-explicit", tiny_dir, dtype="float32")
    layers = [m for m in explicit.modules() if isinstance(m, BlockTTLinear)]
    assert len(layers) == 7 * LAYERS and all(layer.scale_large_core for layer in layers)
    assert info.save_format == "dense" and info.method_args == {}
    with torch.no_grad():
        torch.testing.assert_close(explicit(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4, rtol=0)
    overrides = {"scale_large_core": False}
    cheaper, _ = load_model_for_method("fura-explicit", tiny_dir, dtype="float32", overrides=overrides)
    assert not any(m.scale_large_core for m in cheaper.modules() if isinstance(m, BlockTTLinear))
    # the shared BlockTT arguments, extended by the NF4 method: every existing qfura-nf4 argument is still there
    assert set(get_method("qfura-nf4").valid_arg_names()) - set(get_method("fura-explicit").valid_arg_names()) == {
        "layout", "quant_type", "double_quant"
    }  # fmt: skip


def test_count_parameters_is_peft_counter_plus_nf4_cores(tiny_dir: Path) -> None:
    """PEFT's own count on PEFT models, the same rule on any module, and QFuRA's NF4 buffers in the total."""
    model, info = load_model_for_method("qlora", tiny_dir, dtype="float32")
    assert count_parameters(model) == model.get_nb_trainable_parameters() == (info.trainable_params, info.total_params)
    assert info.total_params == BASE_PARAMS + EXPECTED["qlora"]  # the 4-bit weights at their logical size
    plain = tiny_causal_lm(len(build_tokenizer()))
    plain.requires_grad_(False)
    plain.lm_head.requires_grad_(True)
    assert count_parameters(plain) == (plain.lm_head.weight.numel(), BASE_PARAMS)
    _, nf4 = load_model_for_method("qfura-nf4", tiny_dir, dtype="float32")
    assert nf4.total_params == BASE_PARAMS + EXPECTED["qfura-nf4"]  # L (as NF4 buffers) stands for W; + R and S
