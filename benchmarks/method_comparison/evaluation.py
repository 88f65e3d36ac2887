"""Evaluation of a saved model in the harness process: accuracy per row, held-out loss, general-text cross-entropy.

* **Commonsense** rows use the library's log-likelihood protocol (:func:`fura.recipes.eval.choice_items` +
  :func:`fura.recipes.eval.score_choices`): after ``"the correct answer is"``, the row's candidate labels
  (``answer_format: label``) or, after the question alone, its options' texts (``answer_format: cloze``); the best
  summed log-probability wins. Every row keeps its candidate scores and token counts.
* **Math** rows use greedy generation (:func:`fura.recipes.eval.generate_completions`) and the numeric grader of
  :mod:`fura.recipes.eval.math` (GSM8K protocol: last number / ``\\boxed{}`` / "the answer is"); **RL** problems
  the GRPO recipe's boxed prompt and its accuracy reward's grader.
* **Held-out loss**: mean cross-entropy per target token of the validation rows, tokenised exactly as the recipe
  tokenises training rows (:func:`fura.recipes.data.sft.tokenize_example`, prompt masked), in the suite's answer
  format.
* **General-text cross-entropy**: mean cross-entropy per predicted token over the probe's windows
  (:mod:`benchmarks.method_comparison.corpus`); forgetting is this value minus the base model's.

``precision="bf16"`` runs every forward under CPU/GPU bfloat16 autocast (the weights stay float32); the base model and
every method are evaluated the same way. Records never hold question text: row index, prediction, correctness,
scores.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.method_comparison.data import Row
from fura.recipes.data.math_problems import math_instruction
from fura.recipes.data.prompts import PromptFormatter
from fura.recipes.data.sft import SFTCollator, tokenize_example
from fura.recipes.eval import (
    GenerationSettings,
    Grade,
    as_cloze,
    choice_items,
    generate_completions,
    grade_math_verify,
    grade_numeric,
    option_texts,
    score_choices,
)
from fura.recipes.eval.generation import eval_mode, model_device
from fura.recipes.rewards import ACCURACY_REWARDS, boxed_answer

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def precision(name: str) -> Iterator[None]:
    """``bf16``: bfloat16 autocast on the model's device type; ``fp32``: nothing."""
    if name == "bf16":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.autocast(device, dtype=torch.bfloat16):
            yield
    else:
        yield


def load_model(model_or_run: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in float32 eval mode: a base model name/folder, or a run folder (adapter or dense).

    A PEFT adapter on a float32 base is merged into it (``merge_and_unload``: the same function up to float32
    rounding, and 10-20 % faster to evaluate, generation above all); every method is then evaluated as a plain dense
    model. A PEFT adapter trained on a 4-bit base (qlora, qdora, qfura) is loaded on the same 4-bit base, unmerged, so
    the model evaluated is the model trained.
    """
    import json

    from fura.recipes.artifacts import load_for_inference

    method_file = Path(model_or_run) / "method.json"
    if method_file.is_file() and json.loads(method_file.read_text())["quantized"]:
        return _load_quantized(Path(model_or_run))
    model, tokenizer, _ = load_for_inference(model_or_run, dtype="float32")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload().eval()
    return model, tokenizer


def _load_quantized(run_dir: Path) -> tuple[Any, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fura.recipes.artifacts import adapter_base
    from fura.recipes.loading import quantization_config
    from fura.recipes.method_args import QuantizationArgs

    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():  # qfura-nf4 saves a dense model
        from fura.recipes.artifacts import load_for_inference

        model, tokenizer, _ = load_for_inference(run_dir, dtype="float32")
        return model, tokenizer
    base = AutoModelForCausalLM.from_pretrained(
        adapter_base(adapter),
        dtype=torch.float32,
        quantization_config=quantization_config(QuantizationArgs(), torch.float32),
    )
    return PeftModel.from_pretrained(base, adapter).eval(), AutoTokenizer.from_pretrained(adapter)


def evaluate_choice(
    model: Any,
    tokenizer: Any,
    rows: dict[str, list[Row]],
    prompt_style: str,
    batch_size: int,
    answer_format: str = "label",
) -> dict[str, list[dict[str, Any]]]:
    """Loglik records per commonsense task: index, predicted, label, correct, candidates, scores and token counts."""
    formatter = PromptFormatter(prompt_style, tokenizer)
    out = {}
    for task, task_rows in rows.items():
        items = choice_items(task, [r.example for r in task_rows], formatter, answer_format=answer_format)
        scores = score_choices(
            model, tokenizer, items, batch_size, add_special_tokens=formatter.add_special_tokens, desc=task
        )
        out[task] = [
            {
                "index": row.index,
                "predicted": _label(row, item.candidates[s.predicted]),
                "label": _label(row, item.label),
                "correct": item.candidates[s.predicted] == item.label,
                "candidates": [_label(row, c) for c in item.candidates],
                "scores": [round(x, 6) for x in s.scores],
                "num_tokens": list(s.num_tokens),
            }
            for row, item, s in zip(task_rows, items, scores, strict=True)
        ]
    return out


def _label(row: Row, candidate: str) -> str:
    """The option label of a candidate (``answer2`` for a cloze option's text): result files never hold data text."""
    by_text = {text: label for label, text in reversed(option_texts(row.example.instruction).items())}
    return by_text.get(candidate.strip(), candidate.strip())


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    rows: dict[str, list[Row]],
    prompt_style: str,
    batch_size: int,
    max_new_tokens: int,
    answer_source: str | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]]]:
    """Greedy generation + grading per math file; returns the records and the completions (kept apart).

    Math suites: the question as it is and the numeric GSM8K grader. RL suites (``answer_source`` given): the GRPO
    recipe's prompt (its boxed instruction around the question) and its accuracy reward's grader for that
    ``--answer-source`` (math-verify on the last ``\\boxed{}``, or on the final answer of the whole completion), so
    that the score is the greedy version of what training rewarded.

    ``completion_tokens`` is the length of the decoded completion tokenised again (equal to the generated tokens for
    text that round-trips, as a real model's does; a rough guide for random weights): it shows how many answers ran
    into ``max_new_tokens``.
    """
    formatter = PromptFormatter(prompt_style, tokenizer)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, num_beams=1, batch_size=batch_size)
    rl = answer_source is not None
    grade = grade_numeric if answer_source is None else rl_grader(answer_source)
    out, completions = {}, {}
    for name, task_rows in rows.items():
        questions = [
            math_instruction(r.example.instruction) if rl else formatter.instruction(r.example) for r in task_rows
        ]
        prompts = [formatter.prompt(q, split="eval") for q in questions]
        texts = [
            c[0]
            for c in generate_completions(
                model, tokenizer, prompts, settings, add_special_tokens=formatter.add_special_tokens, desc=name
            )
        ]
        grades = [grade(text, row.example.answer) for text, row in zip(texts, task_rows, strict=True)]
        out[name] = [
            {
                "index": row.index,
                "predicted": grade.extracted,
                "label": row.example.answer,
                "correct": grade.correct,
                "completion_tokens": len(tokenizer(text, add_special_tokens=False).input_ids),
            }
            for row, grade, text in zip(task_rows, grades, texts, strict=True)
        ]
        completions[name] = texts
    return out, completions


def rl_grader(answer_source: str) -> Callable[[str, str], Grade]:
    """The GRPO accuracy reward of ``--answer-source`` as a grader: its verdict, with what it read as the answer."""
    reward = ACCURACY_REWARDS[answer_source]

    def grade(completion: str, gold: str) -> Grade:
        read = boxed_answer(completion) if answer_source == "boxed" else grade_math_verify(completion, gold).extracted
        return Grade(read or "", reward([completion], [gold])[0] == 1.0)

    return grade


def held_out_loss(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Row],
    prompt_style: str,
    max_seq_len: int,
    batch_size: int,
    answer_format: str = "label",
) -> float:
    """Mean cross-entropy per target token of ``rows`` (prompt masked, as the recipe trains)."""
    formatter = PromptFormatter(prompt_style, tokenizer)
    examples = [as_cloze(r.source, r.example) if answer_format == "cloze" else r.example for r in rows]
    tokenized = sorted(
        (tokenize_example(e, formatter, max_seq_len) for e in examples), key=lambda t: -len(t["input_ids"])
    )
    collator = SFTCollator.for_tokenizer(tokenizer)
    total, count = 0.0, 0
    device = model_device(model)
    with eval_mode(model), torch.inference_mode():
        for start in tqdm(range(0, len(tokenized), batch_size), desc="held-out loss", leave=False):
            batch = {k: v.to(device) for k, v in collator(tokenized[start : start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(losses)
            count += int((labels != -100).sum())
    return total / count if count else math.nan


def window_cross_entropy(model: Any, windows: Sequence[Sequence[int]], batch_size: int) -> list[float]:
    """Mean cross-entropy per predicted token of each token window (each scored on its own, from its first token).

    The windows have equal lengths, so the mean of these values is the mean over all predicted tokens; kept per
    window, they give the paired bootstrap interval of forgetting (the same windows for the base model and a method).
    """
    values: list[float] = []
    device = model_device(model)
    with eval_mode(model), torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="general text", leave=False):
            ids = torch.tensor([list(w) for w in windows[start : start + batch_size]], device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            values.extend(float(x) for x in losses.mean(dim=1))
    return values


def text_cross_entropy(model: Any, windows: Sequence[Sequence[int]], batch_size: int) -> float:
    """Mean cross-entropy per predicted token over equal-length token windows (each scored from its first token)."""
    values = window_cross_entropy(model, windows, batch_size)
    return sum(values) / len(values)
