"""FuRA on the real SmolLM2-135M-Instruct (all seven projections), on this CPU."""

from __future__ import annotations

import json
import time

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import fura
from fura.tuner.layer import FuraLayer

from ..conftest import shared_data_dir

pytestmark = pytest.mark.slow

SMOLLM2_LAYER_TRAINABLE = 5 * 576 * 25 + 576 * 65 + 1536 * 49  # q/k/v/gate/up (24x24), o by head (9x64), down 32x48


@pytest.fixture(scope="module")
def smollm2_dir():
    from fura.io.assets import smollm2_path

    try:
        return smollm2_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def batch(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    path = shared_data_dir() / "commonsense" / "train" / "boolq.json"
    if not path.exists():
        pytest.skip(f"{path} not found (set FURA_DATA_DIR)")
    rows = json.loads(path.read_text())[:4]
    texts = [f"{row['instruction']}\nAnswer: {row['output']}" for row in rows]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=96)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return {**encoded, "labels": labels}


def _steps(model, batch, steps, lr):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_conversion_time_count_exactness_and_training(smollm2_dir, batch, capsys):
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    base.eval()
    with torch.no_grad():
        reference = base(input_ids=batch["input_ids"][:1]).logits
    start = time.perf_counter()
    model = get_peft_model(base, fura.FuraConfig())
    seconds = time.perf_counter() - start
    layers = [m for m in model.modules() if isinstance(m, FuraLayer)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with capsys.disabled():
        print(
            f"\nSmolLM2-135M: {len(layers)} modules converted in {seconds:.2f} s "
            f"(block decompositions {model.base_model.decomposition_seconds:.2f} s), {trainable:,} trainable parameters"
        )
    assert len(layers) == 30 * 7
    assert trainable == 30 * SMOLLM2_LAYER_TRAINABLE == 5_541_120
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"][:1]).logits, reference)
    model.train()
    losses = _steps(model, batch, steps=6, lr=1e-3)
    with capsys.disabled():
        print("SmolLM2 FuRA losses:", " ".join(f"{loss:.3f}" for loss in losses))
    assert losses[-1] < losses[0] - 0.2


def test_four_bit_base_trains_s_and_r(smollm2_dir, batch, capsys):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quantisation = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=quantisation)
    base.train()  # never run a no-grad eval forward of a 4-bit layer before training (repacking trap, DESIGN.md)
    model = get_peft_model(base, fura.FuraConfig(target_modules=["q_proj", "v_proj", "down_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.get_base_layer()).__name__ == "Linear4bit"
    losses = _steps(model, batch, steps=4, lr=2e-3)
    core = layer.fura_core["default"]
    model(**batch).loss.backward()
    assert core.weight.grad is not None and core.weight.grad.abs().sum() > 0
    assert core.scale.grad is not None and core.scale.grad.abs().sum() > 0
    with capsys.disabled():
        print("\nSmolLM2 4-bit base + FuRA losses:", " ".join(f"{loss:.3f}" for loss in losses))
    assert losses[-1] < losses[0]
