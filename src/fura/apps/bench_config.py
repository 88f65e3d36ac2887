"""The settings of ``fura bench`` (:class:`BenchConfig`) and the method its ratios are taken against."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fura.apps.bench_models import (
    BENCH_METHODS,
    LLAMA3_8B,
    LlamaShape,
    check_method,
    shaped_model,
)
from fura.recipes.base_models import resolve_dtype

REFERENCE = "lora-matched"

MiB = 1024**2


@dataclass
class BenchConfig:
    """Everything ``fura bench`` measures and how (each field is a CLI flag of the same name).

    Attributes:
        model: ``"smollm2"`` (SmolLM2-135M-Instruct, the offline asset), ``"tiny"`` (a 2-layer random
            Llama, hidden 64, for checking the harness in seconds), a shaped model with random weights built
            from a config (``"llama3-8b"``, ``"llama3.2-3b"``; ``"llama3-8b:4"`` keeps 4 decoder layers) or a
            local Hugging Face folder / hub id.
        batch: sequences per training step.
        seq: tokens per sequence.
        steps: timed training steps per method (after warm-up); the medians are over these.
        warmup: untimed warm-up rounds (each steps every method once) before the timed ones.
        methods: methods to compare, from ``fura, fura-explicit, lora-matched, lora-r32, dora, full,
            svd`` (``lora-rN`` for any fixed rank N). Ratios are taken against ``lora-matched``.
        dtype: a name of :func:`fura.recipes.base_models.resolve_dtype`'s table (``"float32"``, ``"bf16"``, …);
            ``None`` picks float32 on CPU and bfloat16 on CUDA.
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``); ``None`` picks CUDA when available.
        out: output folder for ``bench.json``, ``bench.md`` and ``bench.png`` (created).
        lr: AdamW learning rate of the training steps (its value does not change the cost).
        seed: seed of the random batch, the tiny model and the large-model weights.
        threads: ``torch.set_num_threads`` for the run (and every child process); ``None`` keeps
            PyTorch's default.
        memory: measure peak memory (one child process per method); off skips that phase.
        memory_steps: training steps run in each memory child. Step 1 allocates gradients and the
            optimizer state; from step 2 on every step starts with them resident, which is the
            steady-state peak, so 2 suffices.
        conversion_repeats: fresh base models converted with ``get_peft_model(FuraConfig())`` for the
            conversion-time median.
        inference: measure merged-inference latency (needs ``fura`` among the methods).
        inference_warmup: untimed rounds of the inference comparison.
        inference_repeats: timed rounds (each times every compared model once, interleaved).
        skip_8b: skip the large-model-shaped conversion benchmark.
        big_shape: geometry of the large model (default Llama-3-8B).
        big_layers: layers to build and convert one at a time; ``None`` = all of ``big_shape.layers``.
            Fewer layers give a total extrapolated to the full depth, labelled as such.
        show_progress: tqdm progress bars.
    """

    model: str = "smollm2"
    batch: int = 8
    seq: int = 128
    steps: int = 5
    warmup: int = 2
    methods: tuple[str, ...] = BENCH_METHODS
    dtype: str | None = None
    device: str | None = None
    out: str = "bench-out"
    lr: float = 1e-5
    seed: int = 0
    threads: int | None = None
    memory: bool = True
    memory_steps: int = 2
    conversion_repeats: int = 3
    inference: bool = True
    inference_warmup: int = 1
    inference_repeats: int = 10
    skip_8b: bool = False
    big_shape: LlamaShape = field(default_factory=lambda: LLAMA3_8B)
    big_layers: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        self.methods = tuple(dict.fromkeys(check_method(m) for m in self.methods))
        if not self.methods:
            raise ValueError("BenchConfig: no methods to benchmark")
        for name in ("batch", "seq", "steps", "memory_steps", "conversion_repeats", "inference_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "inference_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"BenchConfig: {name} must be >= 0, got {getattr(self, name)}")
        if self.dtype is not None:
            resolve_dtype(self.dtype)  # an unknown name raises, listing the valid ones
        shaped_model(self.model)  # a shaped model with a bad layer count raises
        if isinstance(self.big_shape, dict):
            self.big_shape = LlamaShape(**self.big_shape)
        if self.big_layers is not None and self.big_layers < 1:
            raise ValueError(f"BenchConfig: big_layers must be >= 1, got {self.big_layers}")

    def resolved_device(self) -> torch.device:
        """``device`` as a ``torch.device`` (CUDA when available if unset); errors if CUDA is asked for but absent."""
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("BenchConfig: device 'cuda' requested but torch.cuda.is_available() is False")
        return device

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        """``dtype`` resolved by :func:`~fura.recipes.base_models.resolve_dtype`; unset: bf16 on CUDA, else float32."""
        if self.dtype is not None:
            return resolve_dtype(self.dtype)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
