"""Probe for the RL suite: the untrained model's held-out accuracy on candidate reasoning-gym tasks, with the GRPO
recipe's own prompt (the boxed instruction through the chat template), greedy decoding and its reward's grader
(math-verify on the completion). The RL suite needs a task where the base model is between 10 % and 50 %: low
enough to learn, high enough for GRPO's group-relative reward to see a signal.

    python -m benchmarks.method_comparison.probe_rl --out benchmarks/method_comparison/probes/rl_tasks.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

#: Numeric-answer tasks (math-verify grades numbers, not strings) of a difficulty a 135M model might partly solve.
CANDIDATES = (
    "basic_arithmetic", "chain_sum", "leg_counting", "gsm_symbolic", "decimal_arithmetic", "gcd", "lcm", "count_bits",
    "products", "simple_equations", "power_function", "number_sequence",
)  # fmt: skip


def probe(tasks: list[str], problems: int, max_new_tokens: int, seed: int) -> list[dict]:
    """Base accuracy per task on ``problems`` held-out problems (the split ``fura train grpo`` would use)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fura.io.assets import smollm2_path
    from fura.recipes.data.math_problems import MathProblemsConfig, build_problem_sets, write_problems
    from fura.recipes.data.prompts import BOXED_MATH_INSTRUCTION
    from fura.recipes.eval.math import MathEvalConfig, evaluate_math

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for task in tasks:
            start = time.perf_counter()
            sets = build_problem_sets(MathProblemsConfig(dataset=task, train_size=1, held_out_size=problems, seed=seed))
            file = write_problems(sets.held_out, Path(folder) / f"{task}.jsonl")
            config = MathEvalConfig(
                data_path=str(file), name=task, grader="math_verify", question_field="problem", answer_field="answer",
                question_template=BOXED_MATH_INSTRUCTION, prompt_style="chat", max_new_tokens=max_new_tokens,
                batch_size=16, output_dir=str(Path(folder) / task),
            )  # fmt: skip
            result = evaluate_math(model, tokenizer, config)
            first = json.loads(Path(result.predictions_path).read_text().splitlines()[0])
            example = {key: first.get(key) for key in ("completion", "extracted", "label", "correct")}
            results.append({"task": task, "accuracy": result.accuracy, "correct": result.correct,
                            "total": result.total, "seconds": round(time.perf_counter() - start, 1),
                            "example": example})  # fmt: skip
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=list(CANDIDATES))
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = probe(args.tasks, args.problems, args.max_new_tokens, args.seed)
    settings = {"model": "SmolLM2-135M-Instruct", "problems": args.problems, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed, "prompt": "boxed instruction, chat template", "grader": "math_verify"}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
