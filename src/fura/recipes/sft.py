"""Supervised fine-tuning (``fura train sft``): LLM-Adapters data → any registered method → a run folder.

Pipeline: parse the settings (:class:`SFTSettings`: ``--config`` YAML < flags, through TRL's ``TrlParser``; the
method's track defaults fill what the user left unset) → read and check the data → prepare the run folder (new, or
resume from its last complete checkpoint) → load the model with :func:`fura.recipes.loading.load_model_for_method` →
tokenise the data with :func:`fura.recipes.data.build_sft_datasets` (prompt-masked labels as the reference) →
``transformers.Trainer`` (``resume_from_checkpoint`` restores weights, optimizer, scheduler, RNG states and the data
position) → save the adapter / dense model → optional evaluation with :mod:`fura.recipes.eval`. See
:mod:`fura.recipes.runs` for the folder layout.

Reference defaults kept (the reference's finetune_commonsense_*.sh launchers): AdamW β = (0.9, 0.95), ε 1e-8, weight
decay 0, linear schedule with 3 % warm-up, per-device batch 8 × gradient accumulation 2, 3 epochs, max sequence length
2048, 100 held-out rows, seed 43, the method's learning rate per track (2e-4 on commonsense for every method).

Deliberate differences from the reference:

* **Full fine-tuning really uses weight decay 0.** The reference's launcher passes 0 but its full-FT optimizer
  ignores it (torch's default 0.01); every method here uses ``training.weight_decay``.
* **One prompt template for training and evaluation** (``prompt_style="fura"``, the teammate's decision in
  :mod:`fura.recipes.data.prompts`): the reference's training text without the literal ``"<s> "``, the tokenizer adds
  its own BOS; ``prompt_style="reference"`` restores the reference's two templates.
* **One dtype for every method.** The reference trains and evaluates LoRA from an fp16 base and the others in bf16;
  here ``dtype`` applies to all methods.
* **fp32 trainable tensors.** PEFT keeps adapter weights in fp32 over a bf16 base (FuRA's R, S, V, σ too), where the
  reference updated bf16 tensors with no fp32 master copy. ``full``/``svd``/``qfura-nf4`` train in the
  storage dtype, as the reference.
* **Loss normalisation across gradient accumulation.** ``transformers`` averages over all target tokens of the
  accumulated batch; the reference averaged per micro-batch and then over micro-batches.
* **Warm-up steps** = ``ceil(0.03·T)`` (``transformers``) instead of ``int(0.03·T)``: one step more at most.
* **Held-out rows are scored.** The reference removes 100/120 rows and never uses them under ``--load_last_model``;
  here they give a held-out loss at the end (and every ``eval_steps`` if set). Always the last model is saved, no
  best-model tracking (the reference's SVD track tracked the best model).
* **Evaluation runs on the trained model as it is** (the adapter on its base, quantised or not). The reference merged
  QLoRA into the unquantised bf16 base but rebuilt QFuRA / QDoRA from the dequantised base; use
  ``fura merge`` + ``fura eval`` for a merged-model evaluation.
* **QDoRA is PEFT's DoRA** on the 4-bit base: the weight norm is recomputed every forward instead of the reference's
  cache refreshed every 16 forwards.
* **No gradient clipping by default** (as the reference's SFT), but the gradient norm is always logged.
* Checkpoints every ``save_steps`` (reference: last step only), so that a killed run resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from fura.integrations import distributed
from fura.recipes import artifacts, runs
from fura.recipes.args import (
    RecipeParser,
    RunArguments,
    automatic_trainer_settings,
    dump_yaml,
    settings_dict,
    unset_defaults,
)
from fura.recipes.base_models import resolve_model_path
from fura.recipes.data.sft import SFTDataConfig
from fura.recipes.evaluation import EvalArguments, check_eval_data
from fura.recipes.loading import MethodInfo, load_model_for_method
from fura.recipes.registry import get_method
from fura.recipes.runs import RunFolder

logger = logging.getLogger(__name__)

#: Settings that must not change when a run is resumed (the data order and the model would differ).
RESUME_INVARIANTS = (
    "model",
    "method",
    "track",
    "method_arg",
    "dtype",
    "train_files",
    "prompt_style",
    "max_seq_len",
    "val_set_size",
    "max_rows_per_file",
    "seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
)


@dataclass
class SFTTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with the reference commonsense launcher's defaults.

    Only the defaults below differ from transformers' (every field keeps its meaning and its flag):

    * ``output_dir``: the run folder (default ``runs/<model>-<method>``); the Trainer's checkpoints go to its
      ``checkpoints/``;
    * ``learning_rate`` 2e-4 — unless set, the method's reference value for the track (``fura methods``);
    * ``num_train_epochs`` 3, ``per_device_train_batch_size`` 8, ``gradient_accumulation_steps`` 2 (batch 16),
      ``warmup_steps`` 0.03 (a fraction of the steps), ``adam_beta2`` 0.95, ``weight_decay`` 0, ``seed`` 43;
    * ``max_grad_norm`` 0: no clipping, as the reference's SFT (the gradient norm is logged anyway);
    * ``optim`` ``adamw_torch`` (the 4-bit methods: ``paged_adamw_8bit`` unless set);
    * ``logging_steps`` 10, ``save_steps`` 500, ``save_total_limit`` 2, ``report_to`` none.

    Mixed precision: unless ``bf16`` / ``fp16`` is set, bf16 autocast on a GPU that supports it, none on CPU.
    ``eval_steps`` alone turns on the periodic held-out loss (``eval_strategy`` steps).
    """

    output_dir: str | None = field(default=None, metadata={"help": "the run folder (default runs/<model>-<method>)"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate (default: the method's)"})
    num_train_epochs: float = field(default=3.0, metadata={"help": "epochs over the training rows"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "micro-batch size"})
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    warmup_steps: float = field(default=0.03, metadata={"help": "warm-up steps, or a fraction of the steps if < 1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm (0: no clipping)"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer (4-bit methods: paged_adamw_8bit)"})
    seed: int = field(default=43, metadata={"help": "seed of the init, the data order and the held-out split"})
    logging_steps: float = field(default=10, metadata={"help": "write a metrics line every N optimizer steps"})
    save_steps: float = field(default=500, metadata={"help": "save a resumable checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept"})
    # None first: TRL's parser tests isinstance(None, <second member>), which fails for list[str]
    report_to: None | str | list[str] = field(default="none", metadata={"help": "experiment trackers"})  # noqa: RUF036
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the collator's columns"})


@dataclass
class SFTSettings:
    """Everything one ``fura train sft`` run reads (see :func:`parse_settings`).

    Attributes:
        run: model, method and run-folder switches.
        data: training data and tokenisation.
        evaluation: the evaluation after training.
        training: the ``TrainingArguments`` (the reference's defaults, :class:`SFTTrainingArguments`).
        explicit: names of the fields the user set (YAML or flags); the method's track defaults fill the others.
    """

    run: RunArguments
    data: SFTDataConfig
    evaluation: EvalArguments
    training: SFTTrainingArguments
    explicit: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        """One flat mapping of every setting: what ``config.yaml`` holds (a valid ``--config`` file)."""
        values = settings_dict(self.run, self.data, self.evaluation, self.training)
        for switch in ("resume", "overwrite", "print_config"):
            values.pop(switch, None)
        return values

    def run_dir(self) -> Path:
        """``output_dir``, or ``runs/<model folder name>-<method>`` when unset."""
        if "output_dir" in self.explicit and self.training.output_dir:
            return Path(self.training.output_dir)
        return Path("runs") / f"{Path(str(self.run.model)).name}-{self.run.method}"


@dataclass
class SFTResult:
    """Outcome of :func:`run_sft`.

    Attributes:
        run_dir: the run folder.
        method: the method's :class:`~fura.recipes.loading.MethodInfo` (trainable parameters etc.).
        global_step: optimizer steps done (resumed runs included).
        train_loss: mean training loss over this invocation's steps.
        held_out_loss: loss on the held-out rows at the end (None without held-out rows).
        artifact: the saved adapter / dense model folder.
        evaluation: the evaluation summary (None when ``eval`` is ``none``).
        already_finished: the run folder held a finished run, so nothing was trained (``--resume`` of a finished run).
    """

    run_dir: Path
    method: MethodInfo
    global_step: int
    train_loss: float | None
    held_out_loss: float | None
    artifact: Path
    evaluation: dict[str, Any] | None
    already_finished: bool = False


class ListDataset(torch.utils.data.Dataset):
    """A map-style dataset over a list of tokenised rows."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> RecipeParser:
    """The ``fura train sft`` parser: run, data, evaluation and ``TrainingArguments`` flags (and ``--config``)."""
    parser = RecipeParser(
        [RunArguments, SFTDataConfig, EvalArguments, SFTTrainingArguments],
        prog="fura train sft",
        description="Supervised fine-tuning on LLM-Adapters data (commonsense, math) with any --method. Settings come "
        "from --config YAML (flat `name: value` lines, e.g. configs/commonsense.yaml) and flags (flags win).",
        epilog="Example: fura train sft --model smollm2 --method fura --data ../shared/data/commonsense/train "
        "--max_rows_per_file 200 --max_steps 100 --eval commonsense --eval_data ../shared/data/commonsense/test "
        "--output_dir runs/smollm2-fura. Resume a killed run with the same command plus --resume.",
    )
    parser.describe_methods()
    return parser


def parse_settings(argv: Sequence[str]) -> SFTSettings:
    """``fura train sft`` arguments (``--config`` YAML < flags) → :class:`SFTSettings`."""
    parsed = build_parser().parse(argv)
    run, data, evaluation, training = parsed.values
    return SFTSettings(run, data, evaluation, training, parsed.explicit)


def resolve_settings(settings: SFTSettings) -> SFTSettings:
    """A copy with the method's track defaults in every unset field, automatic mixed precision and the run folder."""
    resolved = copy.deepcopy(settings)
    spec = get_method(resolved.run.method)
    changes = unset_defaults(resolved.training, spec.defaults(resolved.run.track).training, resolved.explicit)
    changes.update(automatic_trainer_settings(resolved.explicit))
    quantized = spec.quantize_base or spec.kind == "qfura-nf4"
    if quantized and not torch.cuda.is_available() and resolved.training.eval_strategy != "no":
        # an eval-mode no-grad forward can repack bnb 4-bit CPU weights in place and silently stop their gradients
        logger.warning("periodic evaluation is off for 4-bit methods on CPU; the held-out loss is computed at the end")
        changes["eval_strategy"] = "no"
    changes["output_dir"] = str(resolved.run_dir())
    resolved.training = dataclasses.replace(resolved.training, **changes)
    return resolved


def trainer_arguments(training: TrainingArguments, run: RunFolder, has_val: bool) -> TrainingArguments:
    """The arguments the Trainer gets: checkpoints in the run folder, data seed = seed, several CPU processes in DDP."""
    return dataclasses.replace(
        training,
        output_dir=str(run.checkpoints_dir),
        data_seed=training.seed if training.data_seed is None else training.data_seed,
        eval_strategy=training.eval_strategy if has_val else "no",
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=training.use_cpu or distributed.use_cpu_backend(),
    )


def check_resume_compatible(run: RunFolder, resolved: SFTSettings) -> None:
    """Refuse to resume with settings that change the model or the data order (:data:`RESUME_INVARIANTS`)."""
    runs.check_resume_compatible(run, resolved.to_dict(), RESUME_INVARIANTS, "the same model and data order")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer; right padding for training (the eval harness switches to left padding itself)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # not a model folder, no tokenizer files, an unreachable Hub id
        raise FileNotFoundError(
            f"cannot load the tokenizer of --model {model}: {str(exc).splitlines()[0]} Fix: give a local model "
            "folder with its tokenizer files (tokenizer.json, tokenizer_config.json), or a Hub id with network access."
        ) from None
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


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


def run_sft(settings: SFTSettings, callbacks: Sequence[Any] = ()) -> SFTResult:
    """Train (or resume) one SFT run and write its run folder; see the module docstring.

    The data is read and checked before the run folder or the model is touched, so a bad data file or flag fails
    fast and leaves nothing behind. ``--resume`` of a finished run returns its recorded result without training.

    Args:
        settings: the run's settings (:func:`parse_settings`; the method's defaults fill the unset fields).
        callbacks: extra ``transformers`` callbacks (called after the run-folder callback).
    """
    from fura.recipes.data.sft import build_sft_datasets, load_sft_examples

    resolved = resolve_settings(settings)
    run = RunFolder(resolved.run_dir())
    if resolved.run.resume and run.is_finished():
        logger.info("%s holds a finished run: nothing to resume", run.root)
        return finished_result(run)
    examples = load_sft_examples(resolved.data, resolved.training.seed)
    check_eval_data(resolved.evaluation)  # before hours of training, not after
    inputs = (resolved.data.train_files, resolved.evaluation.eval_data)
    with runs.claim_run_folder(run, resolved.run, *inputs) as checkpoint, runs.main_process_log(run.log_path):
        if distributed.is_main_process():
            if checkpoint is not None:
                check_resume_compatible(run, resolved)
            run.write_config(dump_yaml(resolved.to_dict()))
        logger.info("run folder %s (%s)", run.root, f"resuming from {checkpoint.name}" if checkpoint else "new run")
        tokenizer = load_tokenizer(resolved.run.model, resolved.run.trust_remote_code)
        datasets = build_sft_datasets(resolved.data, tokenizer, resolved.training.seed, examples)
        _check_targets(datasets.train, resolved.data.max_seq_len)
        # before the model: sets up the process group / device, and DeepSpeed ZeRO-3 partitioned loading
        args = trainer_arguments(resolved.training, run, has_val=bool(datasets.val))
        seed_everything(resolved.training.seed)
        model, info = load_model_for_method(
            resolved.run.method,
            resolved.run.model,
            resolved.run.dtype,
            resolved.run.track,
            resolved.run.method_args(),
            trust_remote_code=resolved.run.trust_remote_code,
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
    resolved: SFTSettings,
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

    title = f"{info.method} on {Path(str(resolved.run.model)).name} ({info.trainable_params:,} trainable)"
    trainer = build_trainer(
        model, tokenizer, datasets, args, [RunFolderCallback(run, title, plot_at_end=False), *callbacks]
    )
    distributed.configure_trainer_for_fsdp(trainer)
    global_step, train_loss, train_metrics = runs.train_or_restore(trainer, checkpoint)
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
        global_step=global_step,
        train_loss=train_loss,
        held_out_loss=held_out.get("eval_loss"),
        artifact=artifact,
        evaluation=evaluation,
    )
    if distributed.is_main_process():
        run.write_json(run.results_path, _results_payload(result, train_metrics))  # written last: the run is done
    logger.info("done: %d steps, artifact %s", result.global_step, artifact)
    return result


def finished_result(run: RunFolder) -> SFTResult:
    """The :class:`SFTResult` recorded in a finished run folder's ``results.json``."""
    import json

    payload = json.loads(run.results_path.read_text(encoding="utf-8"))
    method = {k: v for k, v in payload["method"].items() if k != "trainable_percent"}
    return SFTResult(
        run_dir=run.root,
        method=MethodInfo(**method),
        global_step=int(payload["train"]["global_step"]),
        train_loss=payload["train"].get("train_loss"),
        held_out_loss=payload.get("held_out_loss"),
        artifact=Path(payload["artifact"]),
        evaluation=payload.get("eval"),
        already_finished=True,
    )


def _evaluate(trainer: Any, tokenizer: Any, resolved: SFTSettings, run: RunFolder) -> dict[str, Any] | None:
    """The evaluation after training (main process only; skipped with a warning for a sharded model)."""
    from fura.recipes.evaluation import run_evaluation

    if resolved.evaluation.eval != "none" and distributed.sharding(trainer):
        logger.warning("no evaluation inside a sharded run: evaluate with `fura eval %s` afterwards", run.root)
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    return run_evaluation(model, tokenizer, resolved.evaluation, resolved.data.prompt_style, run.eval_dir)


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


def main(argv: Sequence[str]) -> int:
    """Entry point of ``fura train sft ARGS``; returns the exit status."""
    settings = parse_settings(argv)
    if settings.run.print_config:
        print(dump_yaml(resolve_settings(settings).to_dict()), end="")
        return 0
    result = run_sft(settings)
    print(f"{result.method.summary()}")
    if result.already_finished:
        print(f"{result.run_dir} holds a finished run ({result.global_step} steps): nothing to resume")
        return 0
    print(f"trained {result.global_step} steps; run folder: {result.run_dir}; saved: {result.artifact}")
    if result.evaluation and result.evaluation.get("average") is not None:
        print(f"commonsense average accuracy: {100 * result.evaluation['average']:.1f}%")
    elif result.evaluation and result.evaluation.get("accuracy") is not None:
        print(f"math accuracy: {100 * result.evaluation['accuracy']:.1f}%")
    return 0
