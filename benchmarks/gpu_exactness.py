"""The exactness step of ``make gpu-check`` (``benchmarks/gpu_check.py --worker exactness``), run in a child process
with torch and fura imported: init exactness and merge/unmerge bit-exactness on CUDA in bfloat16, and QFuRA's NF4
forward/backward.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks.gpu_check import FAILED, PASSED, SKIPPED, Check


def exactness_worker(device_name: str, dtype_name: str, model: str, cycles: int, quant: dict[str, int]) -> list[Check]:
    """Init exactness, merge/unmerge exactness and QFuRA NF4 forward/backward, in this process (fura imported)."""
    import torch

    from fura.apps.bench_models import load_base_model
    from fura.recipes.base_models import resolve_dtype

    device, dtype = torch.device(device_name), resolve_dtype(dtype_name)
    checks = []
    for name, probe in (
        ("init exactness", lambda: _init_and_merge(model, device, dtype, cycles, load_base_model)),
        ("qfura-nf4 forward/backward", lambda: _qfura_nf4(model, device, dtype, load_base_model)),
        ("qfura forward/backward (bitsandbytes 4-bit base)", lambda: _qfura_4bit_base(device, dtype, quant)),
    ):
        start = time.monotonic()
        try:
            for check in probe():
                check.seconds = check.seconds or time.monotonic() - start
                checks.append(check)
        except Exception as exc:  # report and go on: the other properties are still worth knowing
            checks.append(Check(name, FAILED, time.monotonic() - start, f"{type(exc).__name__}: {exc}"))
    return checks


def _batch(vocab_size: int, device: Any) -> Any:
    import torch

    return torch.randint(0, vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)


#: Scale of the random change given to every adapter tensor before the merge checks (relative to its mean |value|):
#: large enough that the adapter's effect on the logits dwarfs the bf16 rounding of a merged weight.
ADAPTER_NOISE = 0.2
#: Largest ‖merged − unmerged logits‖ / ‖unmerged − base logits‖ accepted (bf16 rounding; a merge that did nothing
#: scores 1, a merge of the wrong sign 2).
MERGE_TOLERANCE = 0.1


def _init_and_merge(model_spec: str, device: Any, dtype: Any, cycles: int, load_base_model: Callable) -> list[Check]:
    """Bit-identical logits at init; merged = adapter; ``cycles`` merge/unmerge cycles restore base weights exactly."""
    import torch
    from peft import get_peft_model

    from fura import FuraConfig

    start = time.monotonic()
    model = load_base_model(model_spec, dtype, device, seed=0).eval()
    ids = _batch(model.config.vocab_size, device)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        peft_model = get_peft_model(model, FuraConfig()).eval()
        adapted = peft_model(input_ids=ids).logits
    identical = torch.equal(base, adapted)
    init = Check(
        "init exactness",
        PASSED if identical else FAILED,
        time.monotonic() - start,
        f"logits of get_peft_model(base, FuraConfig()) vs base in {str(dtype).removeprefix('torch.')} on "
        f"{device}: " + ("bit-identical" if identical else f"max |Δ| {(base - adapted).abs().max().item():.3e}"),
        {"max_abs_diff": (base.float() - adapted.float()).abs().max().item()},
    )
    start = time.monotonic()
    with torch.no_grad():
        generator = torch.Generator(device="cpu").manual_seed(2)
        for param in peft_model.parameters():
            if param.requires_grad:  # a trained-looking adapter: every trainable tensor moved
                noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
                param.add_(noise * ADAPTER_NOISE * param.abs().mean())
        originals = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".base_layer." in n}
        unmerged = peft_model(input_ids=ids).logits.float()
        peft_model.merge_adapter()
        merged = peft_model(input_ids=ids).logits.float()
        peft_model.unmerge_adapter()
        for _ in range(cycles - 1):
            peft_model.merge_adapter()
            peft_model.unmerge_adapter()
        changed = [n for n, p in peft_model.named_parameters() if n in originals and not torch.equal(p, originals[n])]
    effect = (unmerged - base.float()).norm().item()
    relative = (merged - unmerged).norm().item() / effect if effect else float("inf")
    ok = bool(originals) and not changed and relative < MERGE_TOLERANCE
    merge = Check(
        "merge/unmerge exactness",
        PASSED if ok else FAILED,
        time.monotonic() - start,
        f"{cycles} merge/unmerge cycles: {len(originals) - len(changed)}/{len(originals)} base weights bit-identical"
        f"; ‖merged − adapter logits‖ / ‖adapter − base logits‖ = {relative:.3f} (< {MERGE_TOLERANCE}: "
        f"{str(dtype).removeprefix('torch.')} rounding of the merged weights)",
        {"cycles": cycles, "base_weights": len(originals), "changed": changed[:10], "merge_error_ratio": relative},
    )
    return [init, merge]


def _train_step_ok(model: Any, ids: Any) -> tuple[bool, str]:
    """One forward/backward: a finite loss and finite, non-zero gradients on every trainable tensor."""
    import torch

    model.train()  # bnb on CPU: an eval-mode no-grad forward can repack 4-bit weights and stop their gradients
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    finite = torch.isfinite(loss).item() and all(g is not None and torch.isfinite(g).all().item() for g in grads)
    nonzero = any(g is not None and g.abs().sum().item() > 0 for g in grads)
    return bool(finite and nonzero and grads), f"loss {loss.item():.4f}, {len(grads)} trainable tensors with gradients"


def _bitsandbytes_missing(name: str) -> list[Check] | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return [Check(name, SKIPPED, 0.0, "bitsandbytes is not installed (optional; carry its wheel to check NF4)")]
    return None


def _qfura_nf4(model_spec: str, device: Any, dtype: Any, load_base_model: Callable) -> list[Check]:
    """``qfura-nf4`` (the paper's QFuRA: NF4 frozen cores) on the exactness model: forward/backward on ``device``."""
    name = "qfura-nf4 forward/backward"
    skipped = _bitsandbytes_missing(name)
    if skipped:
        return skipped
    from fura.recipes.loading import apply_method

    start = time.monotonic()
    model = load_base_model(model_spec, dtype, device, seed=0)
    model, info = apply_method(model, "qfura-nf4", dtype=dtype, show_progress=False)
    ok, detail = _train_step_ok(model, _batch(model.config.vocab_size, device))
    status = PASSED if ok else FAILED
    return [Check(name, status, time.monotonic() - start, f"{detail}; {info.summary()}", {"info": info.to_dict()})]


def _qfura_4bit_base(device: Any, dtype: Any, quant: dict[str, int]) -> list[Check]:
    """``qfura`` (FuRA on a bitsandbytes NF4 base) on a small random Llama saved and reloaded in 4 bits."""
    name = "qfura forward/backward (bitsandbytes 4-bit base)"
    skipped = _bitsandbytes_missing(name)
    if skipped:
        return skipped
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fura.recipes.loading import load_model_for_method

    start = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**quant, num_attention_heads=8, num_key_value_heads=2)).save_pretrained(folder)
        model, info = load_model_for_method("qfura", folder, dtype=dtype)
    on_device = {p.device.type for p in model.parameters()} == {device.type}
    ok, detail = _train_step_ok(model, _batch(quant["vocab_size"], next(model.parameters()).device))
    status = PASSED if ok and on_device else FAILED
    detail += "" if on_device else f"; the model is not on {device.type}"
    return [Check(name, status, time.monotonic() - start, f"{detail}; {info.summary()}", {"info": info.to_dict()})]
