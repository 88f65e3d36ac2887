"""Run configurations: dataclasses with documented fields, read from YAML and overridden by command-line flags.

Precedence, lowest first: the dataclass defaults, the YAML file (``--config run.yaml``), the flags. Nested sections
are nested mappings in YAML (``training: {learning_rate: 1e-4}``) and dotted keys in overrides
(``{"training.learning_rate": 1e-4}``). Unknown keys are errors that list the known ones, so a typo never goes
unnoticed. :func:`build_config` and :func:`config_to_dict` work for any dataclass tree, so the GRPO and VLM
pipelines can reuse them for their own configs.

The SFT pipeline's config is :class:`SFTRunConfig`; its defaults are the reference's commonsense launcher values
(reference-spec §4.1) except where :mod:`fura.recipes.sft` lists a deliberate difference.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from fura.recipes.data.sft import SFTDataConfig
from fura.recipes.methods import METHODS, TRACKS, jsonable

C = TypeVar("C")

MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
EVAL_KINDS = ("none", "commonsense", "math")


@dataclass
class TrainingConfig:
    """Optimisation and checkpointing (``transformers.TrainingArguments`` underneath).

    Attributes:
        learning_rate: peak learning rate; None = the method's reference value for the track (e.g. 2e-4).
        num_train_epochs: epochs over the training rows (reference: 3).
        max_steps: stop after this many optimizer steps (-1 = run all epochs); also sets the schedule length.
        per_device_train_batch_size: micro-batch size (reference: 8).
        gradient_accumulation_steps: micro-batches per optimizer step (reference: 2 → effective batch 16).
        warmup_ratio: linear warm-up as a fraction of the optimizer steps (reference: 0.03).
        lr_scheduler_type: a ``transformers`` scheduler name (reference: ``linear``).
        weight_decay: AdamW weight decay for every method, full fine-tuning included (reference launchers: 0).
        adam_beta1: AdamW β1 (reference: 0.9).
        adam_beta2: AdamW β2 (reference: 0.95).
        adam_epsilon: AdamW ε (torch default 1e-8).
        max_grad_norm: clip the global gradient norm to this value; 0 = no clipping (the reference's SFT does not
            clip). The gradient norm is logged either way.
        optim: a ``transformers`` optimizer name; None = the method's default (``adamw_torch``, or
            ``paged_adamw_8bit`` for the 4-bit methods as the reference's Track 4).
        gradient_checkpointing: recompute activations in the backward pass; None = the method's default (on for the
            4-bit methods, where the reference makes it mandatory; off otherwise).
        mixed_precision: ``auto`` (bf16 autocast on a GPU that supports it, none on CPU), ``bf16``, ``fp16`` or ``no``.
        seed: seed of the model init, the data order and dropout (reference: 43).
        logging_steps: write a metrics line every this many optimizer steps.
        save_steps: save a resumable checkpoint every this many optimizer steps.
        save_total_limit: keep at most this many checkpoints (None = all).
        eval_steps: compute the held-out loss every this many steps (None = only at the end); needs held-out rows.
        dataloader_num_workers: data-loading worker processes.
    """

    learning_rate: float | None = None
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 2
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 0.0
    optim: str | None = None
    gradient_checkpointing: bool | None = None
    mixed_precision: str = "auto"
    seed: int = 43
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    eval_steps: int | None = None
    dataloader_num_workers: int = 0


@dataclass
class EvalSettings:
    """Evaluation after training (and the ``fura eval`` command). None = the harness's own default.

    Attributes:
        kind: ``none``, ``commonsense`` (the 8-task benchmark, :func:`fura.recipes.eval.evaluate_commonsense`) or
        ``math``
            (:func:`fura.recipes.eval.evaluate_math`).
        data: commonsense: a folder of test files (``<task>.json`` or ``<task>/test.json``); math: a JSON/JSONL file
            or, with ``protocol``, a Hub id when online.
        tasks: commonsense tasks to run (None = all eight, in the reference's order; missing files are skipped).
        protocol: math: a :data:`fura.recipes.eval.MATH_PROTOCOLS` name (MATH-500, AIME-24, ...) for its sampling
        settings. grader: math: ``numeric`` (GSM8K-style numbers) or ``math_verify`` (LaTeX answers).
        max_examples: evaluate only the first N rows of each task / file.
        batch_size: prompts per ``generate`` call.
        num_beams: beam width (commonsense default 4, as the reference; math default greedy).
        max_new_tokens: new-token budget.
        n_samples: math: completions per problem (accuracy = correct / all completions).
        temperature: math: sampling temperature (0 = greedy).
    """

    kind: Literal["none", "commonsense", "math"] = "none"
    data: str | None = None
    tasks: list[str] | None = None
    protocol: str | None = None
    grader: str | None = None
    max_examples: int | None = None
    batch_size: int | None = None
    num_beams: int | None = None
    max_new_tokens: int | None = None
    n_samples: int | None = None
    temperature: float | None = None


@dataclass
class SFTRunConfig:
    """One supervised fine-tuning run (``fura train sft``).

    Attributes:
        model: base model: a local Hugging Face folder, a Hub id (online only) or the alias ``smollm2``.
        method: a key of :data:`fura.recipes.methods.METHODS` (``fura``, ``lora``, ``dora``, ``pissa``, ``full``,
        ``svd``,
            ``qlora``, ``qdora``, ``qfura``, ``qfura-nf4``).
        track: whose reference defaults the method uses (``commonsense``, ``rl``, ``vlm``).
        method_args: method arguments overriding the track defaults (PEFT config fields such as ``r``).
        dtype: storage dtype of the base model: ``auto`` (bf16 on a GPU that supports it, else float32), ``float32``,
            ``bfloat16`` or ``float16``.
        output_dir: the run folder; None = ``runs/<model name>-<method>``.
        trust_remote_code: allow model code from the model folder / Hub.
        data: training data and tokenisation (:class:`fura.recipes.data.SFTDataConfig`).
        training: optimisation and checkpointing (:class:`TrainingConfig`).
        eval: evaluation after training (:class:`EvalSettings`).
    """

    model: str = "smollm2"
    method: str = "fura"
    track: str = "commonsense"
    method_args: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    output_dir: str | None = None
    trust_remote_code: bool = False
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        """Raise ``ValueError`` with a fix for any inconsistent setting."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.track not in TRACKS:
            raise ValueError(f"unknown track {self.track!r}; use one of {', '.join(TRACKS)}")
        if isinstance(self.data.train_files, str):
            self.data.train_files = [self.data.train_files]
        if isinstance(self.eval.tasks, str):
            self.eval.tasks = [t.strip() for t in self.eval.tasks.split(",") if t.strip()]
        if not self.data.train_files:
            raise ValueError("no training data: set data.train_files (flag --data FILE_OR_DIR ...)")
        if self.training.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"training.mixed_precision must be one of {MIXED_PRECISION}")
        if self.eval.kind not in EVAL_KINDS:
            raise ValueError(f"eval.kind must be one of {EVAL_KINDS}, got {self.eval.kind!r}")
        if self.eval.kind != "none" and not (self.eval.data or self.eval.protocol):
            raise ValueError(f"eval.kind={self.eval.kind!r} needs eval.data (flag --eval-data)")
        if not 0.0 <= self.training.warmup_ratio < 1.0:
            raise ValueError(f"training.warmup_ratio must be in [0, 1), got {self.training.warmup_ratio}")
        if self.training.eval_steps and self.data.val_set_size <= 0:
            raise ValueError("training.eval_steps needs held-out rows: set data.val_set_size > 0")

    def run_dir(self) -> Path:
        """``output_dir``, or ``runs/<model folder name>-<method>`` when unset."""
        if self.output_dir:
            return Path(self.output_dir)
        return Path("runs") / f"{Path(str(self.model)).name}-{self.method}"


# ----------------------------------------------------------------------------------------------------------------
# Generic loading / merging
# ----------------------------------------------------------------------------------------------------------------


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (an empty file is an empty mapping)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def _dataclass_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints.get(f.name)) for f in dataclasses.fields(cls) if f.init}


def _merge_mapping(obj: Any, values: Mapping[str, Any], where: str) -> None:
    fields = _dataclass_fields(type(obj))
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"unknown setting {where}{key!r}; known in this section: {', '.join(fields)}")
        _, hint = fields[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            _merge_mapping(current, value, f"{where}{key}.")
        elif isinstance(current, dict) and isinstance(value, Mapping):
            setattr(obj, key, {**current, **value})  # free-form mappings (method_args) merge key by key
        elif dataclasses.is_dataclass(hint) and value is not None:
            raise ValueError(f"setting {where}{key} is a section: give a mapping, not {value!r}")
        else:
            setattr(obj, key, value)


def apply_overrides(obj: C, overrides: Mapping[str, Any]) -> C:
    """Set dotted keys (``"training.learning_rate"``) on a dataclass tree, in place; returns ``obj``."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        nested: Any = {leaf: value}
        for parent in reversed(parents):
            nested = {parent: nested}
        _merge_mapping(obj, nested, "")
    return obj


def build_config(cls: type[C], yaml_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """``cls()`` updated by the YAML file, then by dotted ``overrides`` (flags win)."""
    config = cls()
    if yaml_path is not None:
        _merge_mapping(config, load_yaml(yaml_path), "")
    apply_overrides(config, overrides or {})
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (lists, no tuples/sets) of a dataclass tree, ready for YAML or JSON."""
    return jsonable(dataclasses.asdict(config))


def dump_yaml(payload: Mapping[str, Any]) -> str:
    """YAML text of a mapping, keys in insertion order."""
    import yaml

    return yaml.safe_dump(jsonable(dict(payload)), sort_keys=False, allow_unicode=True)
