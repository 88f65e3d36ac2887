"""Model construction for ``fura bench``: base models, the compared methods, one training step.

Every method starts from a freshly loaded base model and is built the way a user would build it:

=================  ==========================================================================
``fura``           ``get_peft_model(model, FuraConfig())`` — the implicit PEFT layer
``fura-explicit``  ``convert_linear_to_btt(output_one_block, keep_trainable, by head,
                   scale_large_core=True)`` + ``configure_blocktt_trainability(train_bias=False,
                   train_singular_values=True)`` — the reference's layer and computation order
``lora-matched``   PEFT LoRA with ``r`` chosen so ``r·Σ(in+out)`` ≈ FuRA's trainable count
``lora-rN``        PEFT LoRA with rank ``N`` (``lora-r32`` by default)
``dora``           ``LoraConfig(use_dora=True)`` at the matched rank
``full``           every parameter trainable
``svd``            ``convert_linear_to_svd`` (train ``U``, ``S`` folded into the frozen side) +
                   ``configure_svd_trainability``
=================  ==========================================================================

LoRA / DoRA / the explicit layers / SVD adapt exactly the modules FuRA adapts (the seven
projections of a Llama-style model). ``tiny`` is a 2-layer random Llama for checking the harness
in seconds; :class:`LlamaShape` / :func:`build_shaped_layer` make one decoder layer's seven
projections of a large model (random weights, no checkpoint) for timing the conversion alone.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The methods ``fura bench`` knows, in report order (``lora-rN`` accepts any rank N).
METHODS = ("fura", "fura-explicit", "lora-matched", "lora-r32", "dora", "full", "svd")
_LORA_FIXED = re.compile(r"^lora-r([1-9]\d*)$")

#: The tiny random Llama behind ``--model tiny`` (hidden 64, 2 layers, GQA, head_dim 16). Its sizes
#: are chosen so that a LoRA rank matches FuRA's trainable count exactly (6·Σ(in+out) = Σ in·(b+1)).
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def check_method(name: str) -> str:
    """Return ``name`` if it is a known method, else raise with the list of valid names."""
    if name in METHODS or _LORA_FIXED.match(name):
        return name
    raise ValueError(f"unknown benchmark method {name!r}; use some of {', '.join(METHODS)} (or lora-rN for any N)")


# --------------------------------------------------------------------------------------------
# Base models
# --------------------------------------------------------------------------------------------


def model_label(spec: str) -> str:
    """A short human name for a ``--model`` value."""
    if spec == "smollm2":
        from fura.io.assets import SMOLLM2_NAME

        return SMOLLM2_NAME
    if spec == "tiny":
        return "tiny random Llama (hidden 64, 2 layers)"
    return Path(spec).name or spec


def _model_path(spec: str) -> str:
    if spec == "smollm2":
        from fura.io.assets import smollm2_path

        return str(smollm2_path())
    return spec


def load_model_config(spec: str) -> Any:
    """The transformers config of ``smollm2``, ``tiny`` or a local folder / hub id."""
    from transformers import AutoConfig, LlamaConfig

    if spec == "tiny":
        return LlamaConfig(**TINY_LLAMA)
    return AutoConfig.from_pretrained(_model_path(spec))


def load_base_model(spec: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A fresh copy of the base causal LM on ``device`` in ``dtype`` (``tiny``: seeded random weights)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if spec == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(load_model_config("tiny"))
        model = model.to(device=device, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(_model_path(spec), dtype=dtype).to(device)
    model.config.use_cache = False
    return model


def build_meta_model(spec: str) -> nn.Module:
    """The model's architecture on the meta device (no weights, no memory, milliseconds)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_model_config(spec))


# --------------------------------------------------------------------------------------------
# Parameter budget: what FuRA adapts and trains, and the matched LoRA rank
# --------------------------------------------------------------------------------------------


@dataclass
class FuraBudget:
    """FuRA's footprint on a model, computed on the meta device (no SVD).

    Attributes:
        trainable: FuRA's trainable parameter count (``Σ in·(b+1)`` over the adapted modules).
        lora_unit: ``Σ (in + out)`` over the same modules: LoRA rank ``r`` trains ``r·lora_unit``.
        matched_rank: the integer ``r ≥ 1`` with ``r·lora_unit`` closest to ``trainable``.
        targets: leaf names of the adapted modules (used as every other method's targets).
        modules: number of adapted modules.
        per_module: ``{leaf: [in, out, b]}`` for one instance of each leaf name.
    """

    trainable: int
    lora_unit: int
    matched_rank: int
    targets: list[str]
    modules: int
    per_module: dict[str, list[int]] = field(default_factory=dict)


def fura_budget(spec: str) -> FuraBudget:
    """Inject FuRA (default config) into the meta-device model and count what it trains."""
    from peft import get_peft_model

    from fura.tuner.config import FuraConfig
    from fura.tuner.layer import FuraLayer

    model = get_peft_model(build_meta_model(spec), FuraConfig())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, FuraLayer)]
    unit = sum(layer.in_features + layer.out_features for _, layer in layers)
    per_module: dict[str, list[int]] = {}
    for name, layer in layers:
        leaf = name.rsplit(".", 1)[-1]
        _, block, _ = layer.block_layout("default")
        per_module.setdefault(leaf, [layer.in_features, layer.out_features, block])
    rank = max(1, round(trainable / unit)) if unit else 1
    return FuraBudget(trainable, unit, rank, sorted(per_module), len(layers), per_module)


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


@dataclass
class BuiltMethod:
    """A model ready to train for one method.

    Attributes:
        name: the method name.
        model: the model (a ``PeftModel`` for fura / lora / dora, else the converted base model).
        trainable: trainable parameter count.
        total: total parameter count (frozen included).
        build_seconds: wall time of the method's conversion (``get_peft_model`` / ``convert_*`` and
            trainability setup), excluding loading the base model.
        details: method-specific facts (rank, FuRA's SVD time, …).
    """

    name: str
    model: nn.Module
    trainable: int
    total: int
    build_seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_method(
    name: str,
    spec: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    budget: FuraBudget,
    seed: int = 0,
) -> BuiltMethod:
    """Load a fresh base model and turn it into ``name``'s trainable model (see the module docstring)."""
    from peft import LoraConfig, get_peft_model

    from fura.explicit.btt import configure_blocktt_trainability, convert_linear_to_btt
    from fura.explicit.svd import configure_svd_trainability, convert_linear_to_svd
    from fura.tuner.config import FuraConfig

    check_method(name)
    model = load_base_model(spec, dtype, device, seed)
    targets = budget.targets
    details: dict[str, Any] = {}
    _sync(device)
    start = time.perf_counter()
    if name == "fura":
        model = get_peft_model(model, FuraConfig())
        _sync(device)
        details["svd_seconds"] = model.base_model.decomposition_seconds
    elif name == "fura-explicit":
        convert_linear_to_btt(
            model,
            decomp_mode="output_one_block",
            s_merged_to="keep_trainable",
            factorize_by_head=True,
            model_config=model.config,
            include_names=targets,
            show_progress=False,
            scale_large_core=True,
        )
        configure_blocktt_trainability(model, train_bias=False, train_singular_values=True)
    elif name in ("lora-matched", "dora") or _LORA_FIXED.match(name):
        fixed = _LORA_FIXED.match(name)
        rank = int(fixed.group(1)) if fixed else budget.matched_rank
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=list(targets),
            bias="none",
            use_dora=name == "dora",
        )
        model = get_peft_model(model, config)
        details["rank"] = rank
    elif name == "full":
        model.requires_grad_(True)
    elif name == "svd":
        convert_linear_to_svd(model, include_names=targets, show_progress=False)
        configure_svd_trainability(model)
    _sync(device)
    build_seconds = time.perf_counter() - start
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return BuiltMethod(name, model, trainable, total, build_seconds, details)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW (PyTorch defaults otherwise) over the trainable parameters."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def make_batch(vocab_size: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Random token ids ``(batch, seq)``, the same for every method (labels = inputs: causal LM loss)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator).to(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> torch.Tensor:
    """One full training step: forward, causal-LM loss, backward, ``optimizer.step()``, ``zero_grad``."""
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# --------------------------------------------------------------------------------------------
# Large-model-shaped layers for the conversion benchmark
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """Geometry of a Llama-style decoder, enough to build its projections.

    Attributes:
        name: label used in reports.
        hidden: ``hidden_size``.
        intermediate: ``intermediate_size`` (MLP width).
        heads: ``num_attention_heads``.
        kv_heads: ``num_key_value_heads``.
        head_dim: width of one head.
        layers: ``num_hidden_layers``.
    """

    name: str = "Llama-3-8B"
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    layers: int = 32

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """``{leaf: (out, in)}`` for the seven projections of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (q, self.hidden),
            "k_proj": (kv, self.hidden),
            "v_proj": (kv, self.hidden),
            "o_proj": (self.hidden, q),
            "gate_proj": (self.intermediate, self.hidden),
            "up_proj": (self.intermediate, self.hidden),
            "down_proj": (self.hidden, self.intermediate),
        }

    def layer_params(self) -> int:
        """Weights in one layer's seven projections."""
        return sum(o * i for o, i in self.projection_shapes().values())

    def transformers_config(self) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            num_hidden_layers=self.layers,
        )


#: Llama-3-8B: hidden 4096, MLP 14336, 32 heads, 8 KV heads, head_dim 128, 32 layers.
LLAMA3_8B = LlamaShape()


def random_pool(numel: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``numel`` standard-normal numbers: the source of :class:`ShapedDecoderLayer` weights (drawn once)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(numel, dtype=dtype, device=device).normal_(generator=generator)


#: Extra numbers in a weight pool beyond the largest projection, so every layer reads a different window.
POOL_SLACK = 1_000_003


class ShapedDecoderLayer(nn.Module):
    """One decoder layer's seven projections (no norms, no attention math) with a ``config``.

    ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` are plain bias-free ``nn.Linear``
    layers with random weights; ``config`` is a ``LlamaConfig`` (model type ``llama``, head geometry)
    so ``get_peft_model(layer, FuraConfig())`` targets and factorises them exactly as in the full model.

    The weights are read-only windows (offset by ``index``) into ``pool``, a vector of at least
    ``max(out·in) + POOL_SLACK`` random numbers drawn once (:func:`random_pool`), so building a
    layer costs nothing and each layer still gets different weights; without a pool they are
    drawn afresh. Either way only one layer's projections exist at a time.
    """

    def __init__(
        self,
        shape: LlamaShape,
        dtype: torch.dtype,
        device: torch.device,
        index: int = 0,
        pool: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = shape.transformers_config()
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        generator = None if pool is not None else torch.Generator(device=device).manual_seed(index)
        for position, (leaf, (out_features, in_features)) in enumerate(shape.projection_shapes().items()):
            linear = nn.Linear(in_features, out_features, bias=False, device="meta")
            numel = out_features * in_features
            if pool is not None:
                offset = (index * 7 + position) * 9973 % (pool.numel() - numel + 1)
                weight = pool[offset : offset + numel].view(out_features, in_features)
            else:
                weight = torch.empty(out_features, in_features, dtype=dtype, device=device)
                weight.normal_(0.0, in_features**-0.5, generator=generator)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            parent = self.self_attn if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else self.mlp
            setattr(parent, leaf, linear)
