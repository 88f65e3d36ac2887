"""Supervised fine-tuning (``fura train sft``): LLM-Adapters data → any registered method → a run folder.

Pipeline: resolve the config (YAML < flags, method defaults for the track) → prepare the run folder (new, or resume
from its last complete checkpoint) → load the model with :func:`fura.recipes.methods.load_model_for_method` → tokenise
the data with :func:`fura.recipes.data.build_sft_datasets` (prompt-masked labels as the reference) →
``transformers.Trainer`` (``resume_from_checkpoint`` restores weights, optimizer, scheduler, RNG states and the data
position) → save the adapter / dense model → optional evaluation with :mod:`fura.recipes.eval`. See
:mod:`fura.recipes.runs` for the folder layout.

Reference defaults kept (reference-spec §4.1): AdamW β = (0.9, 0.95), ε 1e-8, weight decay 0, linear schedule with
3 % warm-up, per-device batch 8 × gradient accumulation 2, 3 epochs, max sequence length 2048, 100 held-out rows,
seed 43, the method's learning rate per track (2e-4 on commonsense for every method).

Deliberate differences from the reference:

* **Full fine-tuning really uses weight decay 0.** The reference's launcher passes 0 but its full-FT optimizer
  ignores it (torch's default 0.01, §7.19); every method here uses ``training.weight_decay``.
* **One prompt template for training and evaluation** (``prompt_style="fura"``, the teammate's decision in
  :mod:`fura.recipes.data.prompts`): the reference's training text without the literal ``"<s> "``, the tokenizer adds
  its own BOS; ``prompt_style="reference"`` restores the reference's two templates (§7.16).
* **One dtype for every method.** The reference trains and evaluates LoRA from an fp16 base and the others in bf16
  (§7.18); here ``dtype`` applies to all methods.
* **fp32 trainable tensors.** PEFT keeps adapter weights in fp32 over a bf16 base (FuRA's R, S, V, σ too), where the
  reference updated bf16 tensors with no fp32 master copy (§7.5). ``full``/``svd``/``qfura-nf4`` train in the
  storage dtype, as the reference.
* **Loss normalisation across gradient accumulation.** ``transformers`` averages over all target tokens of the
  accumulated batch; the reference averaged per micro-batch and then over micro-batches.
* **Warm-up steps** = ``ceil(0.03·T)`` (``transformers``) instead of ``int(0.03·T)``: one step more at most.
* **Held-out rows are scored.** The reference removes 100/120 rows and never uses them under ``--load_last_model``;
  here they give a held-out loss at the end (and every ``eval_steps`` if set). Always the last model is saved, no
  best-model tracking (the reference's SVD track tracked the best model, §7.20).
* **Evaluation runs on the trained model as it is** (the adapter on its base, quantised or not). The reference merged
  QLoRA into the unquantised bf16 base but rebuilt QFuRA / QDoRA from the dequantised base (§7.22); use
  ``fura merge`` + ``fura eval`` for a merged-model evaluation.
* **QDoRA is PEFT's DoRA** on the 4-bit base: the weight norm is recomputed every forward instead of the reference's
  cache refreshed every 16 forwards (§7.25).
* **No gradient clipping by default** (as the reference's SFT), but the gradient norm is always logged.
* Checkpoints every ``save_steps`` (reference: last step only), so that a killed run resumes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fura.integrations import distributed
from fura.recipes import artifacts, runs
from fura.recipes.cli_args import add_config_flag, add_run_arguments, config_overrides
from fura.recipes.config import SFTRunConfig, TrainingConfig, build_config, config_to_dict, dump_yaml
from fura.recipes.methods import MethodInfo, get_method, load_model_for_method, resolve_model_path
from fura.recipes.runs import RunFolder

logger = logging.getLogger(__name__)

#: Settings that must not change when a run is resumed (the data order and the model would differ).
RESUME_INVARIANTS = (
    "model",
    "method",
    "track",
    "method_args",
    "dtype",
    "data",
    "training.seed",
    "training.per_device_train_batch_size",
    "training.gradient_accumulation_steps",
)


@dataclass
class SFTResult:
    """Outcome of :func:`run_sft`.

    Attributes:
        run_dir: the run folder.
        method: the method's :class:`~fura.recipes.methods.MethodInfo` (trainable parameters etc.).
        global_step: optimizer steps done (resumed runs included).
        train_loss: mean training loss over this invocation's steps.
        held_out_loss: loss on the held-out rows at the end (None without held-out rows).
        artifact: the saved adapter / dense model folder.
        evaluation: the evaluation summary (None when ``eval.kind`` is ``none``).
    """

    run_dir: Path
    method: MethodInfo
    global_step: int
    train_loss: float | None
    held_out_loss: float | None
    artifact: Path
    evaluation: dict[str, Any] | None


class ListDataset(torch.utils.data.Dataset):
    """A map-style dataset over a list of tokenised rows."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


# ----------------------------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------------------------


def resolve_config(config: SFTRunConfig) -> SFTRunConfig:
    """A validated copy with the method's track defaults filled in where the user left ``None``, and a run folder."""
    resolved = copy.deepcopy(config)
    resolved.validate()
    defaults = get_method(resolved.method).defaults(resolved.track).training
    fallbacks = {"learning_rate": 2e-4, "optim": "adamw_torch", "gradient_checkpointing": False}
    for key, fallback in fallbacks.items():
        if getattr(resolved.training, key) is None:
            setattr(resolved.training, key, defaults.get(key, fallback))
    resolved.output_dir = str(resolved.run_dir())
    _disable_risky_eval(resolved)
    return resolved


def mixed_precision_flags(training: TrainingConfig) -> dict[str, bool]:
    """``{"bf16": ..., "fp16": ...}`` for ``TrainingArguments`` (``auto``: bf16 autocast on a GPU that supports it)."""
    mode = training.mixed_precision
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"bf16": mode == "bf16", "fp16": mode == "fp16"}


def training_arguments(training: TrainingConfig, run: RunFolder, has_val: bool) -> Any:
    """The ``transformers.TrainingArguments`` of a resolved :class:`TrainingConfig`; checkpoints go to the run."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(run.checkpoints_dir),
        per_device_train_batch_size=training.per_device_train_batch_size,
        per_device_eval_batch_size=training.per_device_train_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        num_train_epochs=training.num_train_epochs,
        max_steps=training.max_steps,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_epsilon=training.adam_epsilon,
        max_grad_norm=training.max_grad_norm,
        lr_scheduler_type=training.lr_scheduler_type,
        warmup_steps=training.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        optim=training.optim,
        seed=training.seed,
        data_seed=training.seed,
        logging_strategy="steps",
        logging_steps=training.logging_steps,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        eval_strategy="steps" if training.eval_steps and has_val else "no",
        eval_steps=training.eval_steps,
        dataloader_num_workers=training.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        report_to="none",
        use_cpu=distributed.use_cpu_backend(),  # several CPU processes: DDP over gloo, not N separate runs
        **mixed_precision_flags(training),
        **checkpointing_args(TrainingArguments, bool(training.gradient_checkpointing)),
    )


def checkpointing_args(cls: type, enabled: bool) -> dict[str, Any]:
    """Activation checkpointing flags under the names this ``transformers`` version uses (renamed in v5)."""
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def check_resume_compatible(run: RunFolder, resolved: SFTRunConfig) -> None:
    """Refuse to resume with settings that change the model or the data order (:data:`RESUME_INVARIANTS`)."""
    runs.check_resume_compatible(run, config_to_dict(resolved), RESUME_INVARIANTS, "the same model and data order")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer; right padding for training (the eval harness switches to left padding itself)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    return tokenizer


def build_trainer(
    model: Any,
    tokenizer: Any,
    datasets: Any,
    args: Any,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ``transformers.Trainer`` over the tokenised rows with the SFT collator."""
    from transformers import Trainer

    return Trainer(
        model=model,
        args=args,
        train_dataset=ListDataset(datasets.train),
        eval_dataset=ListDataset(datasets.val) if datasets.val else None,
        data_collator=datasets.collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def prepare_initial_adapter(model: Any, info: MethodInfo, run: RunFolder) -> Path | None:
    """PiSSA: keep the adapter as initialised, to convert the trained one for the original base at the end."""
    if not get_method(info.method).converts_on_save:
        return None
    from fura.recipes.artifacts import save_initial_adapter

    folder = run.root / "adapter_init"
    if distributed.is_main_process() and not (folder / "adapter_config.json").exists():
        save_initial_adapter(model, folder)
    return folder


def _check_targets(rows: Sequence[dict[str, Any]], max_seq_len: int) -> None:
    """Refuse data in which truncation removed every answer token (the loss would be 0 / NaN)."""
    from fura.recipes.data import IGNORE_INDEX

    empty = sum(all(label == IGNORE_INDEX for label in row["labels"]) for row in rows)
    if rows and empty == len(rows):
        raise ValueError(
            f"every training row was truncated before its answer (max_seq_len={max_seq_len}). Fix: raise --max-seq-len."
        )
    if empty:
        logger.warning("%d of %d training rows have no answer token left after truncation", empty, len(rows))


def _disable_risky_eval(resolved: SFTRunConfig) -> None:
    spec = get_method(resolved.method)
    quantized = spec.quantize_base or spec.kind == "qfura-nf4"
    if resolved.training.eval_steps and quantized and not torch.cuda.is_available():
        # an eval-mode no-grad forward can repack bnb 4-bit CPU weights in place and silently stop their gradients
        logger.warning("periodic evaluation is off for 4-bit methods on CPU; the held-out loss is computed at the end")
        resolved.training.eval_steps = None


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


def run_sft(
    config: SFTRunConfig, resume: bool = False, overwrite: bool = False, callbacks: Sequence[Any] = ()
) -> SFTResult:
    """Train (or resume) one SFT run and write its run folder; see the module docstring.

    Args:
        config: the run's settings (method defaults fill the ``None`` fields).
        resume: continue from the last complete checkpoint in the run folder.
        overwrite: delete a previous run in the run folder first.
        callbacks: extra ``transformers`` callbacks (called after the run-folder callback).
    """
    from fura.recipes.data import build_sft_datasets

    resolved = resolve_config(config)
    run = RunFolder(Path(resolved.output_dir))
    checkpoint = runs.prepare_run_folder(run, resume=resume, overwrite=overwrite)
    with runs.main_process_log(run.log_path):
        if distributed.is_main_process():
            if checkpoint is not None:
                check_resume_compatible(run, resolved)
            run.write_config(dump_yaml(config_to_dict(resolved)))
        logger.info("run folder %s (%s)", run.root, f"resuming from {checkpoint.name}" if checkpoint else "new run")
        tokenizer = load_tokenizer(resolved.model, resolved.trust_remote_code)
        datasets = build_sft_datasets(resolved.data, tokenizer)
        _check_targets(datasets.train, resolved.data.max_seq_len)
        # before the model: sets up the process group / device, and DeepSpeed ZeRO-3 partitioned loading
        args = training_arguments(resolved.training, run, has_val=bool(datasets.val))
        seed_everything(resolved.training.seed)
        model, info = load_model_for_method(
            resolved.method,
            resolved.model,
            resolved.dtype,
            resolved.track,
            resolved.method_args,
            trust_remote_code=resolved.trust_remote_code,
        )
        distributed.prepare_model_for_sharding(model)
        _set_pad_token_id(model, tokenizer)
        if distributed.is_main_process():
            run.write_json(run.method_path, info.to_dict())
        initial_adapter = prepare_initial_adapter(model, info, run)
        return _train_and_finish(
            resolved, run, model, info, tokenizer, datasets, checkpoint, callbacks, initial_adapter, args
        )


def _train_and_finish(
    resolved: SFTRunConfig,
    run: RunFolder,
    model: Any,
    info: MethodInfo,
    tokenizer: Any,
    datasets: Any,
    checkpoint: Path | None,
    callbacks: Sequence[Any],
    initial_adapter: Path | None,
    args: Any,
) -> SFTResult:
    from fura.recipes.callbacks import RunFolderCallback

    title = f"{info.method} on {Path(str(resolved.model)).name} ({info.trainable_params:,} trainable)"
    trainer = build_trainer(
        model, tokenizer, datasets, args, [RunFolderCallback(run, title, plot_at_end=False), *callbacks]
    )
    distributed.configure_trainer_for_fsdp(trainer)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    held_out = trainer.evaluate() if datasets.val else {}  # also logged to metrics.jsonl as an eval line
    folder = run.adapter_dir if info.save_format == "adapter" else run.model_dir
    artifact = artifacts.save_trained_model_distributed(trainer, info, folder, tokenizer, initial_adapter)
    evaluation = None
    if distributed.is_main_process():
        run.plot(title)  # after the final held-out loss, so the plot shows it
        evaluation = _evaluate(trainer, tokenizer, resolved, run)
    result = SFTResult(
        run_dir=run.root,
        method=info,
        global_step=output.global_step,
        train_loss=output.training_loss,
        held_out_loss=held_out.get("eval_loss"),
        artifact=artifact,
        evaluation=evaluation,
    )
    if distributed.is_main_process():
        run.write_json(run.results_path, _results_payload(result, output.metrics))
    logger.info("done: %d steps, artifact %s", result.global_step, artifact)
    return result


def _evaluate(trainer: Any, tokenizer: Any, resolved: SFTRunConfig, run: RunFolder) -> dict[str, Any] | None:
    """The evaluation after training (main process only; skipped with a warning for a sharded model)."""
    from fura.recipes.evaluation import run_evaluation

    if resolved.eval.kind != "none" and distributed.sharding(trainer):
        logger.warning("no evaluation inside a sharded run: evaluate with `fura eval %s` afterwards", run.root)
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    return run_evaluation(model, tokenizer, resolved.eval, resolved.data.prompt_style, run.eval_dir)


def _results_payload(result: SFTResult, train_metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "method": result.method.to_dict(),
        "train": {"global_step": result.global_step, "train_loss": result.train_loss, **train_metrics},
        "held_out_loss": result.held_out_loss,
        "artifact": str(result.artifact),
        "eval": result.evaluation,
    }


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _set_pad_token_id(model: Any, tokenizer: Any) -> None:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None and pad is not None:
        config.pad_token_id = pad


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fura train sft`` (each overrides the matching YAML setting)."""
    parser.epilog = (
        "Example: fura train sft --model smollm2 --method fura --data ../shared/data/commonsense/train "
        "--max-rows-per-file 200 --max-steps 100 --eval commonsense --eval-data ../shared/data/commonsense/test "
        "-o runs/smollm2-fura. Resume a killed run with the same command plus --resume."
    )
    add_run_arguments(parser, default_track="commonsense")
    data = parser.add_argument_group("data")
    add_config_flag(
        data,
        "--data",
        key="data.train_files",
        nargs="+",
        metavar="PATH",
        help="training data: LLM-Adapters JSON/JSONL files, folders of them, or Hub ids (online)",
    )
    add_config_flag(
        data,
        "--prompt-style",
        key="data.prompt_style",
        choices=["fura", "reference", "chat"],
        help="prompt template (default fura: one template for training and evaluation)",
    )
    add_config_flag(data, "--max-seq-len", key="data.max_seq_len", type=int, help="truncate rows (default 2048)")
    add_config_flag(
        data,
        "--val-set-size",
        key="data.val_set_size",
        type=int,
        help="rows held out for a held-out loss (default 100)",
    )
    add_config_flag(
        data,
        "--max-rows-per-file",
        key="data.max_rows_per_file",
        type=int,
        help="seeded random subset of each file (default: all rows)",
    )
    _add_training_flags(parser.add_argument_group("training"))
    _add_eval_flags(parser.add_argument_group("evaluation after training"))


def _add_training_flags(group: Any) -> None:
    add_config_flag(
        group,
        "--learning-rate",
        "--lr",
        key="training.learning_rate",
        type=float,
        help="peak learning rate (default: the method's reference value for the track)",
    )
    add_config_flag(group, "--epochs", key="training.num_train_epochs", type=float, help="epochs (default 3)")
    add_config_flag(
        group,
        "--max-steps",
        key="training.max_steps",
        type=int,
        help="stop after N optimizer steps; also the schedule length (default: all epochs)",
    )
    add_config_flag(
        group, "--batch-size", key="training.per_device_train_batch_size", type=int, help="micro-batch size (default 8)"
    )
    add_config_flag(
        group,
        "--grad-accum",
        key="training.gradient_accumulation_steps",
        type=int,
        help="micro-batches per optimizer step (default 2)",
    )
    add_config_flag(group, "--warmup-ratio", key="training.warmup_ratio", type=float, help="default 0.03")
    add_config_flag(group, "--lr-scheduler", key="training.lr_scheduler_type", help="default linear")
    add_config_flag(group, "--weight-decay", key="training.weight_decay", type=float, help="default 0")
    add_config_flag(
        group,
        "--max-grad-norm",
        key="training.max_grad_norm",
        type=float,
        help="clip gradients to this norm (default 0 = no clipping; the norm is logged anyway)",
    )
    add_config_flag(
        group,
        "--optim",
        key="training.optim",
        help="transformers optimizer name (default adamw_torch; paged_adamw_8bit for 4-bit methods)",
    )
    add_config_flag(
        group,
        "--gradient-checkpointing",
        key="training.gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        help="default: on for 4-bit methods, off otherwise",
    )
    add_config_flag(
        group,
        "--mixed-precision",
        key="training.mixed_precision",
        choices=["auto", "bf16", "fp16", "no"],
        help="autocast (default auto: bf16 on a GPU that supports it, none on CPU)",
    )
    add_config_flag(group, "--seed", key="seed", type=int, help="seed of init, data order and split (default 43)")
    add_config_flag(group, "--logging-steps", key="training.logging_steps", type=int, help="default 10")
    add_config_flag(group, "--save-steps", key="training.save_steps", type=int, help="checkpoint period (default 500)")
    add_config_flag(
        group, "--save-total-limit", key="training.save_total_limit", type=int, help="checkpoints kept (default 2)"
    )
    add_config_flag(
        group,
        "--eval-steps",
        key="training.eval_steps",
        type=int,
        help="held-out loss every N steps (default: at the end only)",
    )


def _add_eval_flags(group: Any) -> None:
    add_config_flag(
        group,
        "--eval",
        key="eval.kind",
        choices=["none", "commonsense", "math"],
        help="evaluate the trained model (default none)",
    )
    add_config_flag(
        group,
        "--eval-data",
        key="eval.data",
        metavar="PATH",
        help="commonsense: folder of <task>.json test files; math: a JSON/JSONL file",
    )
    add_config_flag(
        group,
        "--eval-tasks",
        key="eval.tasks",
        nargs="+",
        metavar="TASK",
        help="commonsense tasks (default: all 8 that have a file)",
    )
    add_config_flag(group, "--eval-max-examples", key="eval.max_examples", type=int, help="rows per task / file")
    add_config_flag(group, "--eval-batch-size", key="eval.batch_size", type=int, help="prompts per generate call")
    add_config_flag(
        group,
        "--eval-num-beams",
        key="eval.num_beams",
        type=int,
        help="beam width (commonsense default 4, as the reference)",
    )
    add_config_flag(group, "--eval-max-new-tokens", key="eval.max_new_tokens", type=int, help="new-token budget")
    add_config_flag(
        group,
        "--eval-grader",
        key="eval.grader",
        choices=["numeric", "math_verify"],
        help="math grader (default numeric)",
    )


def config_from_args(args: argparse.Namespace) -> SFTRunConfig:
    """Defaults < ``--config`` YAML < flags."""
    overrides = config_overrides(args)
    seed = overrides.pop("seed", None)
    if seed is not None:
        overrides["training.seed"] = overrides["data.seed"] = seed
    return build_config(SFTRunConfig, getattr(args, "config", None), overrides)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``fura train sft``; returns the exit status."""
    config = config_from_args(args)
    if getattr(args, "print_config", False):
        print(dump_yaml(config_to_dict(resolve_config(config))), end="")
        return 0
    result = run_sft(config, resume=args.resume, overwrite=args.overwrite)
    print(f"{result.method.summary()}")
    print(f"trained {result.global_step} steps; run folder: {result.run_dir}; saved: {result.artifact}")
    if result.evaluation and result.evaluation.get("average") is not None:
        print(f"commonsense average accuracy: {100 * result.evaluation['average']:.1f}%")
    elif result.evaluation and result.evaluation.get("accuracy") is not None:
        print(f"math accuracy: {100 * result.evaluation['accuracy']:.1f}%")
    return 0
