"""Model construction for ``fura bench``: base models, the compared methods, one training step.

Every method starts from a freshly built base model and is applied through the one method registry,
:func:`fura.recipes.loading.apply_method` — the bench's labels are thin aliases of registry methods:

=================  ==========================================================================
label              registry method and arguments
=================  ==========================================================================
``fura``           ``fura`` (``get_peft_model(model, FuraConfig())``, the implicit PEFT layer)
``fura-explicit``  ``fura-explicit`` (the reference's explicit BlockTT layer and computation
                   order, ``scale_large_core=True``), ``train_bias=False``
``lora-matched``   ``lora`` with ``r`` chosen so ``r·Σ(in+out)`` ≈ FuRA's trainable count,
                   ``lora_alpha=2r``, ``lora_dropout=0``
``lora-rN``        ``lora`` with rank ``N`` (``lora-r32`` by default), ``lora_alpha=2N``, no dropout
``dora``           ``dora`` (``LoraConfig(use_dora=True)``) at the matched rank, as ``lora-matched``
``full``           ``full``: every parameter trainable
``svd``            ``svd`` (train ``U``, ``S`` folded into the frozen side)
=================  ==========================================================================

Every method adapts exactly the modules FuRA adapts (the seven projections of a Llama-style model).

Base models (``--model``): ``smollm2`` (the offline SmolLM2-135M-Instruct), ``tiny`` (a 2-layer random
Llama for checking the harness in seconds), a *shaped* model — random weights of a real model's geometry,
built from a transformers config with no checkpoint (``llama3-8b``, ``llama3.2-3b``; ``NAME:N`` keeps the
first ``N`` decoder layers, e.g. ``llama3-8b:4``) — or a local folder / hub id. :class:`LlamaShape` /
:class:`ShapedDecoderLayer` also make one decoder layer's seven projections of a large model for timing the
conversion alone.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The method labels ``fura bench`` knows, in report order (``lora-rN`` accepts any rank N); each is an alias of a
#: registry method (:func:`registry_method`).
BENCH_METHODS = ("fura", "fura-explicit", "lora-matched", "lora-r32", "dora", "full", "svd")
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


@dataclass(frozen=True)
class LlamaShape:
    """Geometry of a Llama-style model: enough to build its projections, or the whole model from a config.

    Attributes:
        name: label used in reports.
        hidden: ``hidden_size``.
        intermediate: ``intermediate_size`` (MLP width).
        heads: ``num_attention_heads``.
        kv_heads: ``num_key_value_heads``.
        head_dim: width of one head.
        layers: ``num_hidden_layers``.
        vocab_size: vocabulary size (embedding and ``lm_head`` rows).
        tie_word_embeddings: ``lm_head`` shares the input embedding (Llama-3.2-1B/3B) or has its own (Llama-3-8B).
    """

    name: str = "Llama-3-8B"
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    layers: int = 32
    vocab_size: int = 128256
    tie_word_embeddings: bool = False

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

    def transformers_config(self, layers: int | None = None) -> Any:
        """A ``LlamaConfig`` of this geometry with ``layers`` decoder layers (default: all of them).

        Only what shapes the computation is set (rotary scaling and token ids are left at their defaults:
        they change no tensor shape and no cost); ``rms_norm_eps`` and the context length are Llama 3's.
        """
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            num_hidden_layers=self.layers if layers is None else layers,
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings,
            rms_norm_eps=1e-5,
            max_position_embeddings=8192,
        )


#: Llama-3-8B: hidden 4096, MLP 14336, 32 heads, 8 KV heads, head_dim 128, 32 layers, vocab 128256 (untied).
LLAMA3_8B = LlamaShape()
#: Llama-3.2-3B: hidden 3072, MLP 8192, 24 heads, 8 KV heads, head_dim 128, 28 layers, vocab 128256 (tied).
LLAMA32_3B = LlamaShape(
    name="Llama-3.2-3B",
    hidden=3072,
    intermediate=8192,
    heads=24,
    kv_heads=8,
    head_dim=128,
    layers=28,
    tie_word_embeddings=True,
)
#: Shaped models accepted by ``--model`` (``NAME`` or ``NAME:N`` for the first N decoder layers).
SHAPED_MODELS: dict[str, LlamaShape] = {"llama3-8b": LLAMA3_8B, "llama3.2-3b": LLAMA32_3B}


def check_method(name: str) -> str:
    """Return ``name`` if it is a known method label, else raise with the list of valid labels."""
    if name in BENCH_METHODS or _LORA_FIXED.match(name):
        return name
    raise ValueError(
        f"unknown benchmark method {name!r}; use some of {', '.join(BENCH_METHODS)} (or lora-rN for any N)"
    )


# --------------------------------------------------------------------------------------------
# Base models
# --------------------------------------------------------------------------------------------


def shaped_model(spec: str) -> tuple[LlamaShape, int] | None:
    """``(shape, layers)`` for a shaped-model spec (``llama3-8b``, ``llama3.2-3b:4``), ``None`` for anything else.

    Raises:
        ValueError: a shaped model with a layer count that is not a positive integer.
    """
    name, colon, layers = spec.partition(":")
    shape = SHAPED_MODELS.get(name.lower())
    if shape is None:
        return None
    if not colon:
        return shape, shape.layers
    if not layers.isdigit() or int(layers) < 1:
        raise ValueError(
            f"model {spec!r}: the layer count after ':' must be a positive integer. Fix: e.g. {name}:4 "
            f"(the first 4 of its {shape.layers} decoder layers)"
        )
    return shape, int(layers)


def model_label(spec: str) -> str:
    """A short human name for a ``--model`` value."""
    if spec == "smollm2":
        from fura.io.assets import SMOLLM2_NAME

        return SMOLLM2_NAME
    if spec == "tiny":
        return "tiny random Llama (hidden 64, 2 layers)"
    shaped = shaped_model(spec)
    if shaped is not None:
        shape, layers = shaped
        depth = f"all {layers} layers" if layers == shape.layers else f"{layers} of {shape.layers} layers"
        return f"{shape.name}-shaped random weights ({depth})"
    return Path(spec).name or spec


def _model_path(spec: str) -> str:
    if spec == "smollm2":
        from fura.io.assets import smollm2_path

        return str(smollm2_path())
    return spec


def load_model_config(spec: str) -> Any:
    """The transformers config of ``smollm2``, ``tiny``, a shaped model or a local folder / hub id."""
    from transformers import AutoConfig, LlamaConfig

    if spec == "tiny":
        return LlamaConfig(**TINY_LLAMA)
    shaped = shaped_model(spec)
    if shaped is not None:
        shape, layers = shaped
        return shape.transformers_config(layers)
    return AutoConfig.from_pretrained(_model_path(spec))


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Run the block with torch's generators (CPU and ``device``) seeded, then restore the caller's RNG state.

    Random initialisations (the shaped models' weights, LoRA's ``A``) are then the same in every run and in
    every process, whatever the process drew before.
    """
    devices = []
    if device.type == "cuda":
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def load_base_model(spec: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A fresh copy of the base causal LM on ``device`` in ``dtype``.

    ``tiny``: seeded random weights drawn on the CPU in float32, then moved. A shaped model: seeded random
    weights (transformers' own initialisation) built by ``AutoModelForCausalLM.from_config`` directly on
    ``device`` in ``dtype``, so an 8B-shaped stack never passes through host memory. Anything else:
    ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if spec == "tiny":
        with seeded(torch.device("cpu"), seed):
            model = LlamaForCausalLM(load_model_config("tiny"))
        model = model.to(device=device, dtype=dtype)
    elif shaped_model(spec) is not None:
        with seeded(device, seed), torch.device(device):
            model = AutoModelForCausalLM.from_config(load_model_config(spec), dtype=dtype)
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
    """Apply the registry's ``fura`` to the meta-device model (no SVD on meta weights) and count what it trains; the
    modules and the LoRA comparison are ``fura convert``'s (:func:`fura.recipes.convert.module_groups`)."""
    from fura.recipes.convert import module_groups
    from fura.recipes.loading import apply_method

    model, info = apply_method(build_meta_model(spec), "fura", show_progress=False)
    groups = module_groups(model)
    unit = sum(group.lora(1) for group in groups)
    per_module: dict[str, list[int]] = {}
    for group in groups:
        per_module.setdefault(group.leaf, [group.plan.in_features, group.plan.out_features, group.block_width])
    rank = max(1, round(info.trainable_params / unit)) if unit else 1
    modules = sum(group.count for group in groups)
    return FuraBudget(info.trainable_params, unit, rank, sorted(per_module), modules, per_module)


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


def registry_method(label: str, budget: FuraBudget) -> tuple[str, dict[str, Any]]:
    """``(registry method, overrides)`` behind a bench label (see the module docstring).

    Every method but ``fura`` gets ``target_modules=budget.targets``, so all of them adapt FuRA's modules.
    """
    check_method(label)
    targets = list(budget.targets)
    fixed = _LORA_FIXED.match(label)
    if fixed or label in ("lora-matched", "dora"):
        rank = int(fixed.group(1)) if fixed else budget.matched_rank
        lora = {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": targets, "bias": "none"}
        return ("dora" if label == "dora" else "lora"), lora
    return {
        "fura": ("fura", {}),
        "fura-explicit": ("fura-explicit", {"target_modules": targets, "train_bias": False}),
        "full": ("full", {}),
        "svd": ("svd", {"target_modules": targets}),
    }[label]


@dataclass
class BuiltMethod:
    """A model ready to train for one method.

    Attributes:
        name: the bench label.
        model: the model (a ``PeftModel`` for fura / lora / dora, else the converted base model).
        trainable: trainable parameter count (:func:`fura.recipes.base_models.count_parameters`).
        total: total parameter count (frozen included).
        build_seconds: wall time of :func:`fura.recipes.loading.apply_method` (``get_peft_model`` /
            ``convert_*`` and trainability setup), excluding building the base model.
        details: the registry method and its resolved arguments, plus method-specific facts (LoRA rank,
            FuRA's SVD time, …).
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
    """Build a fresh base model and apply the registry method behind label ``name`` (:func:`registry_method`)."""
    from fura.recipes.loading import apply_method

    method, overrides = registry_method(name, budget)
    model = load_base_model(spec, dtype, device, seed)
    _sync(device)
    start = time.perf_counter()
    with seeded(device, seed):  # adapters with a random init (LoRA's A) start the same in every run
        model, info = apply_method(model, method, overrides=overrides, dtype=dtype, show_progress=False)
    _sync(device)
    build_seconds = time.perf_counter() - start
    details: dict[str, Any] = {"registry_method": method, "method_args": info.method_args}
    if "r" in overrides:
        details["rank"] = overrides["r"]
    if method == "fura":
        details["svd_seconds"] = model.base_model.decomposition_seconds
    model.train()
    return BuiltMethod(name, model, info.trainable_params, info.total_params, build_seconds, details)


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
# Large-model-shaped layers for the conversion benchmark (LlamaShape is defined above)
# --------------------------------------------------------------------------------------------


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
