"""The layer-streamed QFuRA model: equal to the in-memory NF4 conversion, loadable without recomputation."""

from __future__ import annotations

import json

import pytest
import torch

import fura
from fura.explicit.btt import configure_blocktt_trainability, convert_linear_to_btt
from fura.io.safetensors_stream import read_header
from fura.io.streaming.qfura import QFURA_MANIFEST, convert_qfura, load_qfura
from fura.tuner.factorize import ALL_PROJECTIONS

from .conftest import TINY, load_model, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def _in_memory_qfura(model_dir, train_bias, layout):
    model = load_model(model_dir)
    convert_linear_to_btt(
        model,
        "full",
        decomp_mode="output_one_block",
        include_names=ALL_PROJECTIONS,
        s_merged_to="keep_trainable",
        train_position="small",
        factorize_by_head=True,
        show_progress=False,
    )
    configure_blocktt_trainability(model, train_bias, "small", train_singular_values=True)
    fura.convert_btt_to_qbtt_(model, layout, "nf4", True, torch.float32)
    return model


@pytest.mark.parametrize(
    ("overrides", "train_bias", "layout"),
    [({"attention_bias": True}, False, "flat"), ({"tie_word_embeddings": True}, True, "per_core_block")],
)
def test_qfura_streaming_equals_in_memory_nf4(overrides, train_bias, layout, checkpoints, tmp_path):
    model_dir = checkpoints(**overrides)
    report = convert_qfura(
        model_dir, tmp_path, layout=layout, compute_dtype=torch.float32, train_bias=train_bias, progress=False
    )
    assert report.modules == 7 * TINY["layers"] and report.extra["nf4_bytes_saved"] > 0
    assert not (tmp_path / "model.safetensors.index.json").exists()  # not loadable as a plain model by mistake
    manifest = json.loads((tmp_path / QFURA_MANIFEST).read_text())
    assert manifest["settings"]["train_bias"] is train_bias and len(manifest["modules"]) == report.modules
    shards = sorted(tmp_path.glob("qfura-*.safetensors"))
    assert len(shards) == TINY["layers"] + 1
    index = json.loads((tmp_path / "qfura.safetensors.index.json").read_text())
    stored = {name: info for shard in shards for name, info in read_header(shard)[0].items()}
    assert index["weight_map"].keys() == stored.keys()
    assert index["metadata"]["total_size"] == sum(info.nbytes for info in stored.values())
    assert all(name.startswith("model.layers.0.") for name in read_header(shards[0])[0])

    loaded = load_qfura(tmp_path, dtype=torch.float32)
    expected = _in_memory_qfura(model_dir, train_bias, layout)
    assert not [name for name, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    assert isinstance(loaded.get_submodule("model.layers.1.mlp.down_proj"), fura.QBlockTTLinear)
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in expected.named_parameters() if p.requires_grad}
    assert any(name.endswith("btt_s") for name in trainable)
    assert any(name.endswith(".bias") for name in trainable) == (train_bias and "attention_bias" in overrides)
    inputs = token_ids()
    with torch.no_grad():
        assert torch.allclose(loaded(inputs).logits, expected(inputs).logits, atol=1e-5, rtol=0)
    loaded(inputs, labels=inputs).loss.backward()  # trains: gradients reach the small cores
    assert all(p.grad is not None for name, p in loaded.named_parameters() if name.endswith("btt_r"))

    half = load_qfura(tmp_path, dtype=torch.bfloat16)
    assert half.get_submodule("model.layers.0.self_attn.q_proj").btt_r.dtype == torch.bfloat16
    assert half.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained keeps it
    blobs = {name: buf.dtype for name, buf in loaded.named_buffers() if "qbtt_frozen" in name}
    assert blobs == {name: buf.dtype for name, buf in half.named_buffers() if "qbtt_frozen" in name}


def test_load_qfura_needs_a_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_qfura"):
        load_qfura(tmp_path)
