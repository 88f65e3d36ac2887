#!/usr/bin/env bash
# The README's SmolLM2-135M commonsense comparison: FuRA vs parameter-matched LoRA vs full fine-tuning,
# same data, steps, batch and seed; greedy evaluation on the shared test files. CPU, about 40 minutes.
#
#   scripts/compare_commonsense.sh [OUT_DIR] [DATA_DIR]
set -euo pipefail
OUT=${1:-runs/commonsense-smollm2}
DATA=${2:-../shared/data/commonsense}
COMMON=(--model smollm2 --data "$DATA/train" --max-rows-per-file 200 --max-steps 60
        --per-device-train-batch-size 8 --gradient-accumulation-steps 1 --max-seq-len 256 --val-set-size 32 --seed 43 --logging-steps 5 --save-steps 1000
        --eval commonsense --eval-data "$DATA/test" --eval-max-examples 60 --eval-num-beams 1
        --eval-max-new-tokens 16 --eval-batch-size 30 --overwrite)
ALL_7=target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]

mkdir -p "$OUT" && rm -f "$OUT/wall_times.txt"
fura eval commonsense --model smollm2 --data "$DATA/test" --max-examples 60 --num-beams 1 --max-new-tokens 16 \
    --batch-size 30 --output-dir "$OUT/base"
for method in fura lora full; do
    extra=()
    # LoRA matched to FuRA's 5,541,120 trainable parameters: r=18 on the same 7 projections (5,495,040)
    [[ $method == lora ]] && extra=(--method-arg r=18 --method-arg lora_alpha=36 --method-arg "$ALL_7")
    start=$(date +%s)
    fura train sft --method "$method" "${extra[@]}" "${COMMON[@]}" --output-dir "$OUT/$method"
    echo "$method: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/wall_times.txt"
done

# the README table: held-out accuracy per task (greedy), trainable parameters, training time
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [("base (no training)", "-", "-", json.loads((out / "base/commonsense/summary.json").read_text()))]
for method in ("fura", "lora", "full"):
    result = json.loads((out / method / "results.json").read_text())
    seconds = f"{result['train']['train_runtime']:.0f}"
    rows.append((method, f"{result['method']['trainable_params']:,}", seconds, result["eval"]))
tasks = rows[-1][3]["average_over"]
print("| method | trainable params | train time (s) | " + " | ".join(tasks) + " | average |")
print("|---|---:|---:|" + "---:|" * (len(tasks) + 1))
for name, params, seconds, ev in rows:
    cells = [f"{100 * ev['tasks'][t]['accuracy']:.1f}" for t in tasks]
    print(f"| {name} | {params} | {seconds} | " + " | ".join(cells) + f" | **{100 * ev['average']:.1f}** |")
PY
