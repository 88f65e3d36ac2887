"""Tensor-by-tensor safetensors access: a file written as you go, one tensor read at a time from any layout."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fura.apps.synthetic_checkpoint import make_random_checkpoint
from fura.io.safetensors_stream import CheckpointReader, StreamingSafetensorsWriter, TensorSpec

from .streaming.conftest import TINY


def test_writer_streams_a_valid_file_in_any_order(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 5, dtype=torch.bfloat16),
        "a.scale": torch.randn(7),
        "c.count": torch.tensor(3, dtype=torch.int64),
        "d.empty": torch.empty(0, 4),
    }
    path = tmp_path / "out.safetensors"
    specs = [TensorSpec.of(name, tensor) for name, tensor in tensors.items()]
    with StreamingSafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer:
        for name in reversed(tensors):
            writer.write(name, tensors[name])
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0  # data section 8-byte aligned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # the temp file was renamed


def test_writer_checks_specs_and_leaves_nothing_behind_on_error(tmp_path):
    path = tmp_path / "out.safetensors"
    specs = [TensorSpec("x", torch.float32, (2, 2)), TensorSpec("y", torch.float32, (3,))]
    with pytest.raises(ValueError, match="header says"), StreamingSafetensorsWriter(path, specs) as writer:
        writer.write("x", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="never written"), StreamingSafetensorsWriter(path, specs) as writer:
        writer.write("x", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="already written"), StreamingSafetensorsWriter(path, specs) as writer:
        writer.write("x", torch.zeros(2, 2))
        writer.write("x", torch.zeros(2, 2))
    assert list(tmp_path.iterdir()) == []


def test_reader_sees_the_same_tensors_in_one_file_and_in_shards(tmp_path):
    sharded = make_random_checkpoint(tmp_path / "sharded", **TINY, dtype=torch.float32)
    single = make_random_checkpoint(tmp_path / "single", **TINY, dtype=torch.float32, shard_per_layer=False)
    assert len(list(sharded.glob("model-*.safetensors"))) == TINY["layers"] + 1
    a, b = CheckpointReader(sharded), CheckpointReader(single)
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a)
    key = "model.layers.1.mlp.down_proj.weight"
    assert b"".join(a.iter_bytes(key, chunk_bytes=100)) == a.get_tensor(key).numpy().tobytes()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        CheckpointReader(tmp_path)
