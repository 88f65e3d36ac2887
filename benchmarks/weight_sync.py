"""Extra memory and time of one RL weight sync (TRL's GRPO with vLLM), per method, measured side by side.

Three ways to hand every weight of a PEFT model to an inference engine:

* ``lora / trl-merge`` and ``fura / trl-merge`` — TRL's own path for PEFT models: ``merge_adapter()``, read every
  parameter, ``unmerge_adapter()``. FuRA's merge keeps each targeted weight's original (its unmerge is bit-exact), so
  this path holds a second copy of every targeted weight during the sync.
* ``fura / stream`` — :func:`fura.integrations.weight_sync.iter_merged_parameters` (what ``fura train grpo
  --use_vllm`` and :func:`fura.integrations.trl_sync.enable_memory_light_sync` use): each FuRA layer's merged weight
  is computed when the engine asks for it and released when it asks for the next; nothing is merged.

Extra memory is the largest rise of live CPU tensor bytes during the sync (PyTorch profiler allocation events, as
``fura bench`` measures peak memory); the engine side reads each tensor and keeps nothing (vLLM copies into its own
buffers). The goal, kept here with the benchmark: a sync adds at most the largest single targeted module's weight.

    python -m benchmarks.weight_sync --models smollm2 llama3-8b:4 --out docs/bench/weight_sync
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

#: (method label of ``fura bench``, sync path) pairs measured on every model.
CASES = (("lora-matched", "trl-merge"), ("fura", "trl-merge"), ("fura", "stream"))
MiB = 2**20


def trl_merge_sync(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """TRL's generic PEFT sync (``VLLMGeneration._iter_named_params`` without FSDP / ZeRO-3)."""
    model.merge_adapter()
    for name, param in model.named_parameters():
        if model.prefix in name or "original_module" in name:
            continue
        yield name.removeprefix("base_model.model.").replace(".base_layer", ""), param.data
    model.unmerge_adapter()


def stream_sync(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    from fura.integrations.weight_sync import iter_merged_parameters

    yield from iter_merged_parameters(model, release=True)  # as enable_memory_light_sync in vLLM's colocate mode


def engine(pairs: Iterable[tuple[str, torch.Tensor]]) -> int:
    """A stand-in engine: reads one element of each tensor, keeps nothing; returns how many tensors it got."""
    count = 0
    for _, tensor in pairs:
        tensor.reshape(-1)[:1].tolist()
        count += 1
    return count


def measure(model: torch.nn.Module, sync: Callable, repeats: int) -> dict[str, Any]:
    """Peak extra tensor bytes of one sync (profiled) and its median wall time over ``repeats`` more."""
    from fura.apps.bench_memory import peak_increase

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        tensors = engine(sync(model))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine(sync(model))
        times.append(time.perf_counter() - start)
    return {"extra_bytes": peak_increase(prof), "seconds": statistics.median(times), "tensors": tensors}


def perturb(model: torch.nn.Module) -> None:
    """Move every trainable tensor off its initial value (seeded), so that each merge changes the weights."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param), alpha=1e-2)


def largest_module_bytes(model: torch.nn.Module) -> int:
    from fura.tuner.layer import FuraLayer

    weights = [m.get_base_layer().weight for m in model.modules() if isinstance(m, FuraLayer)]
    return max(w.numel() * w.element_size() for w in weights)


def run_model(spec: str, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    from fura.apps.bench_models import build_method, fura_budget, model_label

    budget, rows, largest = fura_budget(spec), [], None
    for method, path in CASES:
        built = build_method(method, spec, dtype=dtype, device=torch.device("cpu"), budget=budget)
        perturb(built.model)
        if method == "fura":
            largest = largest_module_bytes(built.model)
        result = measure(built.model, trl_merge_sync if path == "trl-merge" else stream_sync, repeats)
        rows.append({"method": method, "path": path, **result})
        print(json.dumps({"model": spec, **rows[-1]}), file=sys.stderr, flush=True)
        del built
    return {"model": spec, "label": model_label(spec), "dtype": str(dtype).removeprefix("torch."),
            "largest_module_bytes": largest, "rows": rows}  # fmt: skip


def within_goal(row: dict[str, Any], largest: int) -> bool:
    """The goal: one sync adds at most the largest single targeted module's weight."""
    return row["extra_bytes"] <= largest


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | sync path | extra memory (MiB) | × largest module | time per sync (s) | within goal |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for result in results:
        largest = result["largest_module_bytes"]
        for row in result["rows"]:
            lines.append(
                f"| {result['label']} ({result['dtype']}) | {row['method']} | {row['path']} | "
                f"{row['extra_bytes'] / MiB:,.1f} | {row['extra_bytes'] / largest:.2f} | {row['seconds']:.3f} | "
                f"{'yes' if within_goal(row, largest) else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        labels = [f"{r['method']}\n{r['path']}" for r in result["rows"]]
        ax.bar(labels, [r["extra_bytes"] / MiB for r in result["rows"]], color=["tab:gray", "tab:red", "tab:blue"])
        ax.axhline(result["largest_module_bytes"] / MiB, color="black", ls="--", lw=1, label="largest module's weight")
        ax.set_title(f"{result['label']} ({result['dtype']})", fontsize=9)
        ax.set_ylabel("extra memory during one sync (MiB)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama3-8b:4"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    results = [run_model(spec, dtype, args.repeats) for spec in args.models]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weight_sync.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "weight_sync.md").write_text("# One RL weight sync: extra memory and time\n\n" + table)
    chart(results, args.out / "weight_sync.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
