"""Extra memory and time of one weight sync to an inference engine: FuRA module by module vs merge/unmerge paths.

An RL trainer syncing to vLLM reads every merged weight. Three ways are measured on SmolLM2-135M-Instruct in bf16 (all
seven projections adapted), each in its own process so that peaks do not mix:

* ``fura-module-by-module`` — :func:`fura.integrations.weight_sync.iter_merged_parameters` (what ``fura train grpo
  --use_vllm`` and :func:`fura.integrations.trl_sync.enable_memory_light_sync` use);
* ``fura-merge-unmerge`` — TRL's generic PEFT path, ``merge_adapter()`` / read / ``unmerge_adapter()`` (FuRA keeps each
  merged weight's original for the bit-exact unmerge);
* ``lora-merge-unmerge`` — the same path with LoRA r=16 on the same modules.

The stand-in engine copies every tensor into buffers allocated before the measurement (as vLLM's ``load_weights``
copies into its own weights), and the model's weights are copied out of the memory-mapped checkpoint first, so the
peak anonymous resident memory above the pre-sync level during the first sync is the sync's own extra memory; the
time is the mean of the further syncs.
Measured (see the README for the table): SmolLM2 9 / 226 / 19 MiB extra, the Llama-3-8B-shaped 4-layer stack
459 / 2,280 / 768 MiB (its largest module is 112 MiB in bf16) for module-by-module / FuRA merge-unmerge / LoRA.

Run::

    OMP_NUM_THREADS=1 python -m benchmarks.weight_sync                      # SmolLM2-135M-Instruct, 3 timed syncs
    fura stream make-checkpoint /tmp/llama3-8b-4layers                        # Llama-3-8B-shaped, 4 layers
    OMP_NUM_THREADS=1 python -m benchmarks.weight_sync /tmp/llama3-8b-4layers 1
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import warnings

METHODS = ("fura-module-by-module", "fura-merge-unmerge", "lora-merge-unmerge")
MIB = 2**20


def _rss() -> int:
    """Anonymous resident memory (file-backed pages of memory-mapped checkpoints excluded)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class _PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)


def measure(method: str, model_path: str = "smollm2", syncs: int = 3) -> dict[str, float]:
    """Peak extra resident memory (MiB) and seconds per sync of ``method`` (run in a fresh process)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import fura
    from fura.integrations.weight_sync import iter_merged_parameters
    from fura.recipes.methods import resolve_model_path
    from fura.tuner.model import DEFAULT_TARGET_MODULES

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_path), dtype=torch.bfloat16)
    with torch.no_grad():  # own memory, as on a GPU: no copy-on-write pages of a memory-mapped checkpoint in the peak
        for param in base.parameters():
            param.data = param.data.clone()
    targets = DEFAULT_TARGET_MODULES["llama"]
    targeted = [m.weight for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in targets]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method.startswith("fura"):
            model = get_peft_model(base, fura.FuraConfig(init_weights=False))
        else:
            model = get_peft_model(base, LoraConfig(target_modules=targets, r=16, init_lora_weights=False))

    def merge_unmerge():
        model.merge_adapter()
        for name, param in model.named_parameters():
            if model.prefix not in name:
                yield name.removeprefix("base_model.model.").replace(".base_layer", ""), param.data
        model.unmerge_adapter()

    source = iter_merged_parameters if method == "fura-module-by-module" else (lambda _: merge_unmerge())
    engine = {  # the engine's own weights, allocated and touched before the measurement
        name.removeprefix("base_model.model.").replace(".base_layer", ""): torch.zeros_like(param)
        for name, param in model.named_parameters()
        if model.prefix not in name
    }
    # memory: the first sync (a warm-up would leave freed blocks in the allocator and hide the peak)
    sampler = _PeakSampler()
    start_rss = _rss()
    sampler.start()
    for name, tensor in source(model):
        engine[name].copy_(tensor)
    sampler.running = False
    sampler.join()
    start = time.perf_counter()
    for _ in range(syncs):
        for name, tensor in source(model):
            engine[name].copy_(tensor)
    seconds = (time.perf_counter() - start) / syncs
    return {
        "method": method,
        "extra_mib": (sampler.peak - start_rss) / MIB,
        "seconds_per_sync": seconds,
        "targeted_mib": sum(w.numel() * w.element_size() for w in targeted) / MIB,
        "largest_module_mib": max(w.numel() * w.element_size() for w in targeted) / MIB,
    }


def main() -> None:
    if len(sys.argv) > 4 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2], sys.argv[3], syncs=int(sys.argv[4]))))
        return
    model_path = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    syncs = sys.argv[2] if len(sys.argv) > 2 else "3"
    rows = []
    for method in METHODS:
        command = [sys.executable, "-m", "benchmarks.weight_sync", "--one", method, model_path, syncs]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(
        f"{model_path}, bf16, 7 projections: targeted weights {first['targeted_mib']:.0f} MiB, "
        f"largest module {first['largest_module_mib']:.2f} MiB"
    )
    print("| sync path | peak extra memory | time per sync |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['extra_mib']:.1f} MiB | {row['seconds_per_sync']:.2f} s |")


if __name__ == "__main__":
    main()
