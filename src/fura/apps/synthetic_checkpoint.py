"""Random Llama-shaped safetensors checkpoints of any size, written one tensor at a time.

Benchmark tooling: what ``fura stream make-checkpoint`` writes to measure the layer-streaming conversion
(:mod:`fura.io.streaming`) on a model of a real size without downloading one.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fura.io.safetensors_stream import StreamingSafetensorsWriter, TensorSpec, write_index
from fura.io.streaming.skeleton import build_skeleton, layer_group


def make_random_checkpoint(
    path: str | os.PathLike,
    *,
    hidden: int = 4096,
    intermediate: int = 14336,
    layers: int = 4,
    heads: int = 32,
    kv_heads: int = 8,
    vocab: int = 32000,
    dtype: torch.dtype = torch.bfloat16,
    shard_per_layer: bool = True,
    attention_bias: bool = False,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write a Llama checkpoint with random weights, one tensor in memory at a time.

    The defaults are Llama-3-8B's layer shapes (hidden 4096, intermediate 14336, 32 heads of 128,
    8 KV heads, rope θ 500000) with 4 layers and a 32000-token vocabulary (Llama-3's is 128256: the
    embedding and lm_head are only copied by the conversions, never decomposed, so a small vocabulary
    keeps the file small without changing what is measured). Linear weights are ``N(0, 0.02²)``
    (full rank, like a fresh init), norms are ones, biases ``N(0, 0.02²)``.

    With ``shard_per_layer`` there is one shard per decoder layer plus one for the other tensors and a
    ``model.safetensors.index.json``; otherwise a single ``model.safetensors``. Every file is written
    through :class:`~fura.io.safetensors_stream.StreamingSafetensorsWriter`.
    """
    from transformers import LlamaConfig

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        attention_bias=attention_bias,
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
    )
    config.save_pretrained(str(folder))
    specs = _checkpoint_specs(build_skeleton(config, dtype))
    files = _shard_layout(specs, shard_per_layer)
    bar = tqdm(total=len(specs), desc="random checkpoint", unit="tensor", disable=not progress)
    weight_map = {}
    for file_name, members in files.items():
        with StreamingSafetensorsWriter(folder / file_name, members, metadata={"format": "pt"}) as writer:
            for spec in members:
                writer.write_bytes(spec.name, _random_bytes(spec, seed))
                weight_map[spec.name] = file_name
                bar.update()
    bar.close()
    if shard_per_layer:
        write_index(folder, weight_map, sum(spec.nbytes for spec in specs))
    return folder


def _checkpoint_specs(model: nn.Module) -> list[TensorSpec]:
    """Specs of the tensors ``save_pretrained`` would store (tied duplicates dropped)."""
    model.tie_weights()
    unique = {name for name, _ in model.named_parameters()}
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [
        TensorSpec.of(name, tensor)
        for name, tensor in model.state_dict().items()
        if name in unique or name not in every
    ]


def _shard_layout(specs: list[TensorSpec], shard_per_layer: bool) -> dict[str, list[TensorSpec]]:
    """File name → its tensors: one shard for the non-layer tensors, then one per layer (or one file)."""
    if not shard_per_layer:
        return {"model.safetensors": specs}
    groups: dict[str, list[TensorSpec]] = {"": []}
    for spec in specs:
        group = layer_group(spec.name)
        groups.setdefault(group if group != spec.name else "", []).append(spec)
    count = len(groups)
    return {f"model-{i:05d}-of-{count:05d}.safetensors": members for i, members in enumerate(groups.values(), 1)}


def _random_bytes(spec: TensorSpec, seed: int, chunk_elements: int = 1 << 22) -> Iterator[bytes]:
    """Ones for norms, ``N(0, 0.02²)`` otherwise, as raw bytes in row chunks of at most ``chunk_elements``.

    Seeded by name, so the values do not depend on the file layout; generated chunk by chunk, so
    even a large embedding never exists in memory in float32.
    """
    rows = spec.shape[0] if spec.shape else 1
    row_elements = max(1, math.prod(spec.shape[1:]))
    step = max(1, chunk_elements // row_elements)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    for start in range(0, rows, step):
        shape = (min(step, rows - start), *spec.shape[1:]) if spec.shape else ()
        if "norm" in spec.name:
            chunk = torch.ones(shape, dtype=spec.dtype)
        else:
            chunk = torch.randn(shape, generator=generator).mul_(0.02).to(spec.dtype)
        yield chunk.reshape(-1).view(torch.uint8).numpy().tobytes()
