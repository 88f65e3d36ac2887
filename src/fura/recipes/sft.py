"""Supervised fine-tuning (``fura train sft``): LLM-Adapters rows as prompt–completion data → any registered method →
TRL's ``SFTTrainer`` with completion-only loss → a run folder. Details: ``docs/recipes/sft.md``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import SFTConfig

from fura.integrations import distributed
from fura.recipes import artifacts
from fura.recipes.args import RunArguments, TrlConfigDefaults
from fura.recipes.base_models import resolve_model_path
from fura.recipes.data.sft import SFTDataConfig, load_sft_examples, sft_dataset, sft_tokenizer
from fura.recipes.evaluation import EvalArguments, check_eval_data, run_evaluation
from fura.recipes.loading import MethodInfo, load_model_for_method
from fura.recipes.registry import MethodSpec, get_method
from fura.recipes.runs import RunFolder
from fura.recipes.skeleton import (
    BATCH_INVARIANTS,
    MODEL_INVARIANTS,
    Recipe,
    RecipeSettings,
    RunResult,
    Session,
    method_title,
)

logger = logging.getLogger(__name__)

#: Settings that must not change when a run is resumed (the data order and the model would differ).
RESUME_INVARIANTS = (
    *MODEL_INVARIANTS,
    *("train_files", "prompt_style", "max_seq_len", "val_set_size", "max_rows_per_file"),
    *BATCH_INVARIANTS,
)


@dataclass
class SFTTrainingArguments(TrlConfigDefaults, SFTConfig):
    """TRL's ``SFTConfig`` with the reference commonsense launcher's defaults: only the fields below and
    :class:`~fura.recipes.args.TrlConfigDefaults`' have other defaults than TRL's (``docs/recipes/sft.md``); every
    other field keeps its meaning and its flag. Not flags: ``max_length`` (``--max_seq_len``), ``completion_only_loss``
    (on), ``packing`` (off). ``eval_steps`` alone turns on the periodic held-out loss (``eval_strategy`` steps)."""

    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate (default: the method's)"})
    num_train_epochs: float = field(default=3.0, metadata={"help": "epochs over the training rows"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "micro-batch size"})
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    warmup_steps: float = field(default=0.03, metadata={"help": "warm-up steps, or a fraction of the steps if < 1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient norm (0: no clipping)"})
    seed: int = field(default=43, metadata={"help": "seed of the init, the data order and the held-out split"})
    logging_steps: float = field(default=10, metadata={"help": "write a metrics line every N optimizer steps"})
    save_steps: float = field(default=500, metadata={"help": "save a resumable checkpoint every N steps"})
    max_length: int | None = field(default=2048, init=False, metadata={"help": "set by --max_seq_len"})
    completion_only_loss: bool | None = field(default=True, init=False, metadata={"help": "loss on the answer only"})
    packing: bool = field(default=False, init=False, metadata={"help": "one row per sequence"})


@dataclass
class SFTSettings(RecipeSettings):
    """The settings of ``fura train sft``: the run, its data, the evaluation after it and TRL's ``SFTConfig``."""

    run: RunArguments
    data: SFTDataConfig
    evaluation: EvalArguments
    training: SFTTrainingArguments


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


def trained_model_saver(trainer: Any, info: MethodInfo, run: RunFolder, tokenizer: Any) -> Callable[[], Path]:
    """A :class:`~fura.recipes.skeleton.Session`'s ``save``: the trained adapter or dense model and the tokenizer into
    the run folder; for PiSSA the adapter as initialised is kept first (``adapter_init/``), to convert the trained one
    for the original base."""
    initial = None
    if get_method(info.method).converts_on_save:
        initial = run.root / "adapter_init"
        if distributed.is_main_process() and not (initial / "adapter_config.json").exists():
            artifacts.save_initial_adapter(trainer.model, initial)
    folder = run.trained_dir(info.save_format)
    return functools.partial(artifacts.save_trained_model_distributed, trainer, info, folder, tokenizer, initial)


def trainer_arguments(
    training: Any, run: RunFolder, has_val: bool, replace: Callable[..., Any] = dataclasses.replace, **changes: Any
) -> Any:
    """The arguments the trainer gets: checkpoints in the run folder, data seed = seed, several CPU processes in DDP;
    ``replace`` copies ``training`` with changes, ``changes`` are set afterwards (fields that are no flags)."""
    args = replace(
        training,
        output_dir=str(run.checkpoints_dir),
        data_seed=training.seed if training.data_seed is None else training.data_seed,
        eval_strategy=training.eval_strategy if has_val else "no",
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=training.use_cpu or distributed.use_cpu_backend(),
    )
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def build_trainer(model: Any, tokenizer: Any, train: Any, val: Any, args: Any, callbacks: Sequence[Any]) -> Any:
    """A ``trl.SFTTrainer`` over prompt–completion rows (``model`` already carries the method); refuses data in which
    truncation removed every answer token (``SFTTrainer`` drops such rows)."""
    from trl import SFTTrainer

    with _trainable_dtypes_kept(model):
        trainer = SFTTrainer(
            model, args, train_dataset=train, eval_dataset=val, processing_class=tokenizer, callbacks=list(callbacks)
        )
    rows, kept = len(train), len(trainer.train_dataset)
    if rows and not kept:
        raise ValueError(
            f"every training row was truncated before its answer (max_seq_len={args.max_length}). Fix: raise "
            "--max-seq-len."
        )
    if kept < rows:
        logger.warning("%d of %d training rows have no answer token left after truncation", rows - kept, rows)
    return trainer


@contextlib.contextmanager
def _trainable_dtypes_kept(model: Any) -> Iterator[None]:
    """Put back the trainable tensors that ``SFTTrainer`` casts to bf16 on a 4-bit base (PEFT keeps them in fp32)."""
    saved = {name: param.data for name, param in model.named_parameters() if param.requires_grad}
    yield
    for name, param in model.named_parameters():
        if name in saved and param.data.dtype != saved[name].dtype:
            param.data = saved[name]


class SFTRecipe(Recipe):
    """``fura train sft``."""

    prog = "fura train sft"
    description = (
        "Supervised fine-tuning on LLM-Adapters data (commonsense, math) with any --method, on TRL's SFTTrainer. "
        "Settings come from --config YAML (flat `name: value` lines, e.g. configs/commonsense.yaml) and flags (flags "
        "win)."
    )
    epilog = (
        "Example: fura train sft --model smollm2 --method fura --data ../shared/data/commonsense/train "
        "--max_rows_per_file 200 --max_steps 100 --eval commonsense --eval_data ../shared/data/commonsense/test "
        "--output_dir runs/smollm2-fura. Resume a killed run with the same command plus --resume."
    )
    settings_cls = SFTSettings
    resume_invariants = RESUME_INVARIANTS

    def check_settings(self, resolved: SFTSettings) -> None:
        """Refuse ``SFTConfig`` settings that do not fit the recipe's untokenised prompt–completion rows."""
        training = resolved.training
        dataset_kwargs = training.dataset_kwargs if isinstance(training.dataset_kwargs, dict) else {}
        refused = {
            "padding_free": (training.padding_free, "padding-free batches need packing, which the recipe keeps off"),
            "assistant_only_loss": (training.assistant_only_loss, "the rows are prompt–completion pairs, not chats"),
            "dataset_kwargs": (dataset_kwargs.get("skip_prepare_dataset"), "SFTTrainer must tokenise the rows"),
        }
        for name, (given, why) in refused.items():
            if given:
                raise ValueError(f"--{name}: {why}. Fix: drop --{name}.")

    def adjust(self, resolved: SFTSettings, spec: MethodSpec, changes: dict[str, Any]) -> None:
        """No periodic evaluation for a 4-bit method on CPU."""
        quantized = spec.quantize_base or spec.kind == "qfura-nf4"
        if quantized and not torch.cuda.is_available() and resolved.training.eval_strategy != "no":
            # an eval-mode no-grad forward can repack bnb 4-bit CPU weights in place and silently stop their gradients
            logger.warning(
                "periodic evaluation is off for 4-bit methods on CPU; the held-out loss is computed at the end"
            )
            changes["eval_strategy"] = "no"

    def check_inputs(self, resolved: SFTSettings) -> Any:
        """The training and held-out rows; the evaluation files are checked too (before hours of training)."""
        examples = load_sft_examples(resolved.data, resolved.training.seed)
        check_eval_data(resolved.evaluation)
        return examples

    def input_paths(self, resolved: SFTSettings) -> tuple[Any, ...]:
        """The training files and the evaluation data."""
        return resolved.data.train_files, resolved.evaluation.eval_data

    def start(
        self, resolved: SFTSettings, run: RunFolder, checkpoint: Path | None, inputs: Any, callbacks: Sequence[Any]
    ) -> Session:
        """Tokenizer, prompt–completion rows, the method's model and the ``SFTTrainer``."""
        from fura.recipes.callbacks import RunFolderCallback
        from fura.recipes.data.prompts import PromptFormatter

        tokenizer = load_tokenizer(resolved.run.model, resolved.run.trust_remote_code)
        formatter = PromptFormatter(resolved.data.prompt_style, tokenizer)
        train, val = (sft_dataset(rows, formatter) for rows in inputs)
        # before the model: sets up the process group / device, and DeepSpeed ZeRO-3 partitioned loading
        run_args = resolved.run
        args = trainer_arguments(
            resolved.training, run, bool(val), max_length=resolved.data.max_seq_len,
            trust_remote_code=run_args.trust_remote_code,
        )  # fmt: skip
        model, info = load_model_for_method(
            run_args.method, run_args.model, run_args.dtype, run_args.track, run_args.method_args(),
            trust_remote_code=run_args.trust_remote_code,
        )  # fmt: skip
        distributed.prepare_model_for_sharding(model)
        if distributed.is_main_process():
            run.write_json(run.method_path, info.to_dict())
        title = method_title(info, run_args.model)
        trainer = build_trainer(
            model, sft_tokenizer(formatter), train, val, args, [RunFolderCallback(run, title), *callbacks]
        )
        save = trained_model_saver(trainer, info, run, tokenizer)
        return Session(trainer, info, title, save, held_out=val is not None, context={"tokenizer": tokenizer})

    def after_training(
        self, session: Session, resolved: SFTSettings, run: RunFolder, result: RunResult
    ) -> dict[str, Any]:
        """The evaluation of ``--eval`` (skipped with a warning for a sharded model)."""
        trainer = session.trainer
        if resolved.evaluation.eval != "none" and distributed.sharding(trainer):
            logger.warning("no evaluation inside a sharded run: evaluate with `fura eval %s` afterwards", run.root)
            return {}
        model, tokenizer = trainer.accelerator.unwrap_model(trainer.model), session.context["tokenizer"]
        result.evaluation = run_evaluation(
            model, tokenizer, resolved.evaluation, resolved.data.prompt_style, run.eval_dir
        )
        return {}

    def report(self, result: RunResult) -> list[str]:
        """Steps, folders and the evaluation's accuracy."""
        lines = super().report(result)
        evaluation = result.evaluation or {}
        if evaluation.get("average") is not None:
            lines.append(f"commonsense average accuracy: {100 * evaluation['average']:.1f}%")
        elif evaluation.get("accuracy") is not None:
            lines.append(f"math accuracy: {100 * evaluation['accuracy']:.1f}%")
        return lines


RECIPE = SFTRecipe()
build_parser = RECIPE.build_parser
parse_settings = RECIPE.parse_settings
resolve_settings = RECIPE.resolve_settings
run_sft = RECIPE.run
main = RECIPE.main
