"""``torchrun --nproc_per_node 2 fsdp_worker.py MODEL_DIR OUT_DIR``: FSDP on CPU (gloo) for a tiny FuRA model.

Not a test module: ``tests/distributed/test_fsdp.py`` launches it and reads ``OUT_DIR/results.json``. Every rank trains
the same unsharded reference (each global batch as two accumulated micro-batches, the split the two ranks use), then
the same steps sharded three ways:

* ``fsdp2``: :func:`fura.integrations.distributed.fully_shard_peft_model` (one ``fully_shard`` unit per decoder layer +
the root);
* ``fsdp1``: ``FullyShardedDataParallel`` with :func:`fura.integrations.distributed.fsdp_auto_wrap_policy` and
  ``use_orig_params=True``;
* ``fsdp1_peft_policy``: ``FullyShardedDataParallel`` with PEFT's own ``fsdp_auto_wrap_policy`` (FuraCore in its own
  unit); FuraLayer calls the core module, so FSDP gathers it (an error, if any, is recorded).

Each rank's loss is its token-summed cross-entropy over the *global* token count times the world size (FSDP averages
gradients over ranks), as ``transformers.Trainer`` does. Rank 0 writes the losses, the gradient norms
(:func:`fura.integrations.distributed.global_grad_norm`) and the saved adapters (full state dict gathered by
:func:`fura.integrations.distributed.full_state_dict`).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fura
from fura.integrations import distributed

STEPS, LR, SEQ, VOCAB_LOW = 3, 1e-2, 12, 3


def make_model(model_dir: str) -> Any:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(base, fura.FuraConfig(target_modules=["q_proj", "v_proj", "down_proj"]))


def global_batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    """``STEPS`` batches of 4 sequences with different lengths (right padding, labels -100 on padding)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(VOCAB_LOW, vocab, (4, SEQ), generator=generator)
        lengths = torch.tensor([SEQ, SEQ - 3, SEQ - 5, SEQ - 1])
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return batches


def half(batch: dict[str, torch.Tensor], part: int) -> dict[str, torch.Tensor]:
    return {key: value[2 * part : 2 * part + 2] for key, value in batch.items()}


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def count(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["labels"][:, 1:].ne(-100).sum())


def optimizer_for(model: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, foreach=False)


def train_reference(model: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, list[float]]:
    optimizer, losses, norms = optimizer_for(model), [], []
    for batch in batches:
        total, step_loss = count(batch), 0.0
        for part in (0, 1):
            loss = token_loss_sum(model, half(batch, part)) / total
            loss.backward()
            step_loss += loss.item()
        norms.append(distributed.global_grad_norm(model))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step_loss)
    return {"loss": losses, "grad_norm": norms}


def train_sharded(model: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, list[float]]:
    optimizer, losses, norms = optimizer_for(model), [], []
    rank, world = dist.get_rank(), dist.get_world_size()
    for batch in batches:
        local = token_loss_sum(model, half(batch, rank)) / count(batch)
        (local * world).backward()  # FSDP averages gradients over ranks
        summed = local.detach().clone()
        dist.all_reduce(summed)
        norms.append(distributed.global_grad_norm(model))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(summed.item())
    return {"loss": losses, "grad_norm": norms}


def save_adapter(model: Any, peft_model: Any, folder: Path) -> None:
    state = distributed.full_state_dict(model)  # collective
    if dist.get_rank() == 0:
        with distributed.unwrapped_module_names(peft_model):
            peft_model.save_pretrained(folder, state_dict=state)
    dist.barrier()


def run_fsdp2(model_dir: str, batches: list, out: Path) -> dict[str, Any]:
    model = make_model(model_dir)
    distributed.fully_shard_peft_model(model, distributed.device_mesh("cpu"))
    result = train_sharded(model, batches)
    save_adapter(model, model, out / "fsdp2")
    return result


def run_fsdp1(model_dir: str, batches: list, out: Path, policy: str, info: dict[str, Any]) -> dict[str, Any]:
    from peft.utils.other import fsdp_auto_wrap_policy as peft_policy
    from torch.distributed.fsdp import FullyShardedDataParallel

    from fura.tuner.layer import FuraCore

    peft_model = make_model(model_dir)
    wrap = distributed.fsdp_auto_wrap_policy(peft_model) if policy == "fura" else peft_policy(peft_model)
    model = FullyShardedDataParallel(
        peft_model, auto_wrap_policy=wrap, device_id=torch.device("cpu"), use_orig_params=True
    )
    units = [m.module for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    info["core_units"] = sum(isinstance(unit, FuraCore) for unit in units)
    info["cores"] = sum(isinstance(m, FuraCore) for m in model.modules())
    info["units"] = len(units)
    result = train_sharded(model, batches)
    save_adapter(model, peft_model, out / ("fsdp1" if policy == "fura" else "fsdp1_peft_policy"))
    return result


def attempt(run: Any, info: dict[str, Any]) -> dict[str, Any]:
    """``run(info)`` merged into ``info``; an exception is recorded as ``info["error"]`` (later scenarios still run)."""
    try:
        info.update(run(info))
    except Exception as exc:
        if dist.get_rank() == 0:
            traceback.print_exc()
        info["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return info


def main(model_dir: str, out_dir: str, scenarios: str = "fsdp2,fsdp1,fsdp1_peft_policy") -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    with distributed.process_group("gloo"):
        reference = make_model(model_dir)
        batches = global_batches(reference.config.vocab_size)
        results: dict[str, Any] = {"world_size": dist.get_world_size()}
        results["reference"] = train_reference(reference, batches)
        if dist.get_rank() == 0:
            reference.save_pretrained(out / "reference")
        runs = {
            "fsdp2": lambda info: run_fsdp2(model_dir, batches, out),
            "fsdp1": lambda info: run_fsdp1(model_dir, batches, out, "fura", info),
            "fsdp1_peft_policy": lambda info: run_fsdp1(model_dir, batches, out, "peft", info),
        }
        for name in scenarios.split(","):
            results[name] = attempt(runs[name], {})
        if dist.get_rank() == 0:
            (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
