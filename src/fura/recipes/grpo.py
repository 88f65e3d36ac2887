"""GRPO math RL (``fura train grpo``): TRL's ``GRPOTrainer`` with math-verify rewards, any registered method.

Pipeline (the same shape as :mod:`fura.recipes.sft`): parse the settings (:class:`GRPOSettings`: ``--config`` YAML <
flags, through TRL's ``TrlParser``; TRL's own ``GRPOConfig`` with the reference's defaults, :class:`FuraGRPOConfig`; the
method's ``rl`` track defaults fill what the user left unset) → build the problem sets
(:mod:`fura.recipes.data.math_problems`) and check the evaluation files → load the tokenizer → prepare the run folder
(new, or resume from its last complete checkpoint) → build the policy → ``trl.GRPOTrainer`` (``resume_from_checkpoint``
restores weights, optimizer, scheduler, RNG states and the data position) → save the adapter / dense model → held-out
accuracy and optional evaluations with :mod:`fura.recipes.eval`.

How the method is applied. PEFT methods on a full-precision base (``fura``, ``lora``, ``dora``, ``pissa``) go the way
a TRL user writes it: the plain base model plus ``peft_config=FuraConfig(...)`` (or ``LoraConfig``) handed to
``GRPOTrainer``, which wraps the model itself. This is the point of FuRA being a PEFT method — it drops into TRL exactly
like LoRA — and it leaves TRL in charge of what it does for PEFT models (seeding before the adapter init, input grads
for gradient checkpointing, a reference policy = adapters disabled when ``beta > 0``). Every other method (``full``,
``svd``, the 4-bit ones) is built by :func:`fura.recipes.methods.load_model_for_method` and passed as a ready model.
Both routes take their arguments from the method registry (``rl`` track defaults + ``--method_arg``), so the same flags
give the same adapter either way.

Reference defaults kept (the reference's rl/run_rl.py): 50 GRPO steps of 32 prompts × 8 completions (256 rollouts, ONE
optimizer step per GRPO step), sampling at temperature 1.0 (top-p 1, no top-k) with at most 1,024 new tokens,
learning rate 9e-5 for the PEFT-style methods and 1e-5 for ``full``, micro-batch 2 (``full``: 4) completions, hence
gradient accumulation 128 (64), AdamW (β 0.9 / 0.999, ε 1e-8, weight decay 0), constant learning rate, gradient
clipping at 1.0, no KL penalty (``beta 0``: no reference model is loaded), seed 42, the boxed prompt through the chat
template, reward 1/0 on the last ``\\boxed{}`` answer, gradient checkpointing off.

The objective. The reference's "GRPO" is on-policy REINFORCE with a group-mean baseline: advantage ``r − mean_group(r)``
(no std scaling), per-token loss ``−ratio·A`` with ``ratio ≡ 1`` (one epoch per batch), averaged over each
completion's tokens, then over completions. TRL's settings that give the same gradient are the defaults here:
``scale_rewards="none"`` (no std normalisation), ``num_iterations=1`` (the clipped ratio is exactly 1, so the PPO clip
never acts) and ``loss_type="grpo"`` (per-sequence token mean, then the mean over sequences, divided by the gradient
accumulation). "True" GRPO / DAPO / Dr. GRPO are one flag away: ``--scale_rewards group``, ``--loss_type dapo`` or
``dr_grpo``, ``--num_iterations 2``, ``--beta 0.04``; every other ``GRPOConfig`` field is a flag of its own name too.

Deliberate differences from the reference (its rl/run_rl.py):

* **EOS is trained.** TRL's completion mask covers the completion up to and *including* its first EOS (any EOS id of
  the model's generation config), so the policy learns to stop; the reference never appended EOS to the trained
  sequences. Truncated completions are still trained with their reward (``mask_truncated_completions`` off), as the
  reference.
* **Thinking mode / chat template**: the tokenizer's chat template is used as is (Qwen3: thinking mode on, as the
  reference); ``--chat_template FILE`` replaces it for training *and* evaluation (e.g. a template without thinking).
  Models without a chat template get the project's ``fura`` text template (``--prompt_style``).
* **Prompt backslashes**: single ``\\boxed{}`` in the prompt (:data:`fura.recipes.data.prompts.BOXED_MATH_INSTRUCTION`);
  the reference's file had literal double backslashes.
* **Reward grading**: math-verify on the last boxed answer (:mod:`fura.recipes.rewards`) instead of the MATH string
  normaliser; a missing box still earns 0.
* **Data**: by default reasoning-gym ``gsm_symbolic`` (offline, numeric answers, a fixed-seed training set and a
  disjoint held-out set) instead of MATH from the Hub; ``--dataset qwedsacf/competition_math`` (online) reproduces the
  reference's MATH split; local JSON/JSONL files work too.
* **Prompt sampling**: TRL draws each step's prompts from a seeded shuffle of the training set (no repeats within an
  epoch) instead of ``random.sample`` per step.
* **Generation**: ``transformers`` ``generate`` by default (vLLM is optional, ``--use_vllm``, GPU only); both roll out
  with the current weights, so there is no weight-sync step to get wrong.
* **Precision**: PEFT keeps the adapter in fp32 over a bf16 base (the reference updated bf16 tensors).
* **In-loop evaluation** is off by default (the reference scored 1,000 MATH-test problems greedily every 5 steps);
  ``--held_out_eval_steps 5`` restores it on the held-out set. Held-out accuracy uses :mod:`fura.recipes.eval`'s
  math-verify grader (the whole completion parsed, as the reference's post-training evaluation), greedy,
  ``max_completion_length`` new tokens; it is always computed once after training.
* **Post-training evaluation** (GSM8K-format files graded numerically; MATH-500 / AIME / AMC protocols when their data
  is given) generates with ``transformers`` and the same prompt; protocols get 2,048 new tokens without the
  reference's ``max_model_len 2048`` cap on prompt + completion.
* **Saving**: resumable checkpoints every ``save_steps`` (default 10, the last 2 kept; the reference saved steps 10, 30
  and the end only when asked) and the adapter (PEFT methods) or a dense folder (``full``, ``svd``) at the end instead
  of a merged checkpoint (``fura merge`` makes one).
* **Seeding**: ``transformers.set_seed`` (Python, NumPy, torch) instead of ``random.seed`` + ``torch.manual_seed``.

Run folder (:mod:`fura.recipes.runs`): ``config.yaml`` (flat, a valid ``--config`` file), ``method.json``,
``metrics.jsonl`` (per step: loss, reward, reward_std, ``rewards/<function>/mean``, ``completions/mean_length``, lr,
grad_norm, ...; ``held_out_accuracy`` lines), ``loss.png``, ``rewards.png``, ``train.log``, ``checkpoints/``,
``adapter/`` or ``model/``, ``data/held_out.jsonl``, ``eval/math/`` (predictions and summaries) and ``results.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from trl import GRPOConfig

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
from fura.recipes.data.formats import load_rows
from fura.recipes.data.math_problems import (
    GRPO_PROMPT_STYLES,
    QUESTION_FIELDS,
    MathProblemsConfig,
    ProblemSets,
    build_problem_sets,
    grpo_prompt,
    grpo_rows,
    resolve_prompt_style,
    write_problems,
)
from fura.recipes.data.prompts import BOXED_MATH_INSTRUCTION
from fura.recipes.methods import (
    MethodInfo,
    count_parameters,
    get_method,
    jsonable,
    load_model_for_method,
    resolve_dtype,
    resolve_model_path,
)
from fura.recipes.rewards import accuracy_reward, format_reward
from fura.recipes.runs import RunFolder
from fura.recipes.sft import load_tokenizer, prepare_initial_adapter

logger = logging.getLogger(__name__)

#: New-token budget of the MATH-500 / AIME / AMC protocols (reference ``--math-verify-max-tokens``).
PROTOCOL_MAX_NEW_TOKENS = 2048

#: Settings that must not change when a run is resumed (the policy, the problems or the batches would differ).
RESUME_INVARIANTS = (
    "model",
    "method",
    "track",
    "method_arg",
    "dtype",
    "dataset",
    "train_size",
    "held_out_size",
    "held_out_dataset",
    "split",
    "held_out_split",
    "question_field",
    "answer_field",
    "prompt_style",
    "chat_template",
    "accuracy_reward_weight",
    "format_reward_weight",
    "seed",
    "prompts_per_step",
    "num_generations",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
)

#: Flags of earlier fura releases that are not a field's own name, kept as aliases of the fields they set.
ALIASES = {
    "learning_rate": ["--lr"],
    "per_device_train_batch_size": ["--batch-size"],
    "lr_scheduler_type": ["--lr-scheduler"],
    "warmup_steps": ["--warmup-ratio"],
    "num_generations": ["--group-size"],
    "held_out_dataset": ["--held-out-data"],
    "output_dir": ["-o"],
}

#: ``GRPOConfig`` fields that TRL derives from each other (and from the batch size) in ``__post_init__``.
GENERATION_BATCH_FIELDS = ("generation_batch_size", "steps_per_generation")

#: Help of the problem-set flags (:class:`~fura.recipes.data.math_problems.MathProblemsConfig` documents its fields in
#: its docstring only).
PROBLEM_HELP = {
    "dataset": "reasoning-gym dataset (gsm_symbolic), a JSON/JSONL file of problem/answer rows, or a Hub id (online)",
    "train_size": "training problems",
    "held_out_size": "held-out problems, disjoint from the training ones",
    "held_out_dataset": "separate held-out problems: a file or a Hub id; None: split off --dataset",
    "split": "Hub split of --dataset",
    "held_out_split": "Hub split of --held_out_dataset",
    "question_field": "row field of the question; None: the first of problem, question, instruction",
    "answer_field": "row field of the gold answer; None: answer, else the last \\boxed{} of solution",
    "prompt_style": "auto: the chat template when the tokenizer has one, else the fura text template",
    "chat_template": "Jinja chat-template file replacing the tokenizer's (training and evaluation)",
}


@dataclass
class ProblemArguments(MathProblemsConfig):
    """The problems and the prompt: :class:`~fura.recipes.data.math_problems.MathProblemsConfig`, each field a flag of
    its own name (``--dataset``, ``--train_size``, ``--held_out_size``, ``--held_out_dataset``, ``--split``,
    ``--held_out_split``, ``--question_field``, ``--answer_field``, ``--prompt_style``, ``--chat_template``).

    Attributes:
        seed: not a flag of its own: the run's ``--seed`` (``GRPOConfig.seed``) also generates the reasoning-gym sets.
    """

    seed: int = field(default=42, init=False, metadata={"help": "the run's --seed (set by resolve_settings)"})


@dataclass
class RolloutArguments:
    """How many problems one GRPO step rolls out, and how the completions are rewarded (not in ``GRPOConfig``).

    Attributes:
        prompts_per_step: problems per GRPO step (reference ``--n-prompts-per-step``: 32). One GRPO step is one
            optimizer step over ``prompts_per_step × num_generations`` completions, so this sets
            ``gradient_accumulation_steps`` to that number / (``per_device_train_batch_size`` × processes), whatever
            the micro-batch. Set ``gradient_accumulation_steps`` instead and this is derived from it; set both and they
            must agree.
        accuracy_reward_weight: weight of the math-verify correctness reward (1/0 on the last ``\\boxed{}``; reference:
            1). Always computed and logged.
        format_reward_weight: weight of the format reward (1 for a closed, non-empty ``\\boxed{}``); 0 = off
            (reference).
    """

    prompts_per_step: int = field(
        default=32, metadata={"help": "problems per GRPO step (sets gradient_accumulation_steps)"}
    )
    accuracy_reward_weight: float = field(default=1.0, metadata={"help": "weight of the math-verify reward"})
    format_reward_weight: float = field(
        default=0.0, metadata={"help": "weight of the \\boxed{} format reward (0: off)"}
    )

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")


@dataclass
class GRPOEvalArguments:
    """Greedy evaluation of the policy during and after training (:func:`fura.recipes.eval.evaluate_math`).

    Attributes:
        held_out_eval: score the held-out problems after training (the training prompt, math-verify grading).
        held_out_eval_steps: also score them every N steps and before the first (None = off; reference: 5).
        eval_data: GSM8K-format files (``instruction``/``question``/``problem`` + numeric ``answer``, e.g.
            ``../shared/data/math/test/gsm8k.json``), graded numerically after training.
        eval_protocol: the reference's post-training benchmarks as ``NAME[=FILE]`` (``MATH-500``, ``AIME-24``,
            ``AIME-25``, ``AMC23``: their sampling settings, math-verify grading); without a file, the Hub id
            (online). Repeatable; in a YAML config a list, or a mapping ``{NAME: FILE}``.
        eval_max_examples: evaluate at most the first N problems of each set (held-out set included; None = all).
        eval_batch_size: prompts per ``generate`` call (64: 1,000 held-out problems × 1,024 tokens is 16 calls).
        eval_max_new_tokens: new-token budget; None = ``max_completion_length`` (held-out set, data files) and 2,048
            for the protocols (the reference's ``--math-verify-max-tokens``).
    """

    held_out_eval: bool = field(default=True, metadata={"help": "held-out accuracy after training"})
    held_out_eval_steps: int | None = field(
        default=None, metadata={"help": "also every N steps and before the first (reference: 5)"}
    )
    eval_data: list[str] = field(
        default_factory=list, metadata={"help": "GSM8K-format files graded numerically after training"}
    )
    eval_protocol: list[str] = field(
        default_factory=list,
        metadata={
            "help": "MATH-500, AIME-24, AIME-25 or AMC23 on a local FILE (or the Hub id online); repeatable",
            "action": "extend",
            "metavar": "NAME[=FILE]",
        },
    )
    eval_max_examples: int | None = field(default=None, metadata={"help": "problems per evaluation set; None: all"})
    eval_batch_size: int = field(default=64, metadata={"help": "prompts per generate call"})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "new tokens; None: max_completion_length (protocols: 2048)"}
    )

    def __post_init__(self) -> None:
        from fura.recipes.eval.math import MATH_PROTOCOLS

        if isinstance(self.eval_protocol, Mapping):  # a YAML mapping {NAME: FILE}
            self.eval_protocol = [
                name if path is None else f"{name}={path}" for name, path in self.eval_protocol.items()
            ]
        unknown = sorted(set(self.protocols()) - set(MATH_PROTOCOLS))
        if unknown:
            raise ValueError(
                f"eval_protocol: unknown protocol(s) {', '.join(unknown)}; use {', '.join(MATH_PROTOCOLS)}"
            )
        if self.held_out_eval_steps is not None and self.held_out_eval_steps < 1:
            raise ValueError("held_out_eval_steps must be >= 1 (leave it unset for no in-loop evaluation)")

    def protocols(self) -> dict[str, str | None]:
        """``["MATH-500=math500.jsonl", "AIME-24"]`` → ``{"MATH-500": "math500.jsonl", "AIME-24": None}``."""
        protocols: dict[str, str | None] = {}
        for value in self.eval_protocol:
            name, sep, path = str(value).partition("=")
            protocols[name.strip()] = path.strip() if sep and path.strip() else None
        return protocols


@dataclass
class FuraGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` with the reference RL recipe's defaults (the reference's rl/run_rl.py).

    Only the defaults below differ from TRL's (every field keeps its meaning and its flag):

    * ``output_dir``: the run folder (default ``runs/<model>-grpo-<method>``); the trainer's checkpoints go to its
      ``checkpoints/``;
    * ``learning_rate`` 9e-5 — unless set, the method's ``rl`` value (1e-5 for ``full``; ``fura methods --track rl``);
    * ``per_device_train_batch_size`` 2 completions — unless set, the method's ``rl`` value (``full``: 4);
    * ``gradient_accumulation_steps`` 128 — unless set, derived from ``prompts_per_step`` (:class:`RolloutArguments`):
      32 prompts × 8 completions / micro-batch 2 = 128 (the method's ``rl`` value is what this gives at its
      micro-batch), so that one GRPO step is one optimizer step;
    * ``max_steps`` 50 GRPO steps; ``max_completion_length`` 1,024 new tokens;
    * ``loss_type`` ``grpo`` (TRL: ``dapo``) and ``scale_rewards`` ``none`` (TRL: ``group``): the reference's objective
      (``beta`` 0, ``num_iterations`` 1, ``num_generations`` 8, ``temperature`` / ``top_p`` 1 are TRL's defaults);
    * ``lr_scheduler_type`` ``constant``; ``optim`` ``adamw_torch`` (4-bit methods: ``paged_adamw_8bit`` unless set);
      AdamW β, ε, weight decay 0, ``max_grad_norm`` 1 and ``seed`` 42 are transformers' defaults;
    * ``gradient_checkpointing`` unset, i.e. off (TRL: on; 4-bit methods: on unless set);
    * ``bf16`` off unless set; :func:`resolve_settings` turns it on on a GPU that supports it (TRL: on everywhere);
    * ``logging_steps`` 1, ``save_steps`` 10, ``save_total_limit`` 2, ``report_to`` none;
    * ``vllm_gpu_memory_utilization`` 0.4 and ``vllm_max_model_length`` 2,048 (the reference's colocated vLLM);
    * ``trust_remote_code`` is no flag of its own here: ``--trust_remote_code`` (:class:`RunArguments`) sets it.
    """

    output_dir: str | None = field(default=None, metadata={"help": "the run folder; None: runs/<model>-grpo-<method>"})
    learning_rate: float = field(default=9e-5, metadata={"help": "learning rate; unless set, the method's rl value"})
    per_device_train_batch_size: int = field(
        default=2, metadata={"help": "completions per micro-batch; unless set, the method's rl value"}
    )
    gradient_accumulation_steps: int = field(
        default=128, metadata={"help": "micro-batches per GRPO step; unless set, derived from prompts_per_step"}
    )
    max_steps: int = field(default=50, metadata={"help": "GRPO steps (one batch of rollouts, one optimizer step)"})
    max_completion_length: int | None = field(default=1024, metadata={"help": "new tokens per rollout"})
    loss_type: str = field(
        default="grpo",
        metadata={
            "help": "token aggregation (grpo: per-sequence mean, then the mean over sequences, as the reference)",
            "choices": ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"],
        },
    )
    scale_rewards: str = field(
        default="none",
        metadata={
            "help": "advantage scaling (none: reward minus group mean, as the reference)",
            "choices": ["none", "group", "batch"],
        },
    )
    lr_scheduler_type: str = field(default="constant", metadata={"help": "a transformers scheduler name"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer (4-bit methods: paged_adamw_8bit)"})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "deprecated alias of activation_checkpointing (off unless set)", "nargs": "?", "const": True},
    )
    bf16: bool | None = field(default=False, metadata={"help": "bf16 autocast; unless set, on a GPU that supports it"})
    logging_steps: float = field(default=1, metadata={"help": "write a metrics line every N GRPO steps"})
    save_steps: float = field(default=10, metadata={"help": "save a resumable checkpoint every N GRPO steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept"})
    # None first: TRL's parser tests isinstance(None, <second member>), which fails for list[str]
    report_to: None | str | list[str] = field(default="none", metadata={"help": "experiment trackers"})  # noqa: RUF036
    vllm_gpu_memory_utilization: float = field(default=0.4, metadata={"help": "GPU memory share of colocated vLLM"})
    vllm_max_model_length: int | None = field(default=2048, metadata={"help": "vLLM context length"})
    trust_remote_code: bool = field(default=False, init=False, metadata={"help": "set by --trust_remote_code"})


@dataclass
class GRPOSettings:
    """Everything one ``fura train grpo`` run reads (see :func:`parse_settings`).

    Attributes:
        run: model, method and run-folder switches.
        problems: the problem sets and the prompt.
        rollouts: problems per step and the reward weights.
        evaluation: the held-out and post-training evaluation.
        training: TRL's ``GRPOConfig`` (the reference's defaults, :class:`FuraGRPOConfig`).
        explicit: names of the fields the user set (YAML or flags); the method's track defaults fill the others.
    """

    run: RunArguments
    problems: ProblemArguments
    rollouts: RolloutArguments
    evaluation: GRPOEvalArguments
    training: FuraGRPOConfig
    explicit: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        """One flat mapping of every setting: what ``config.yaml`` holds (a valid ``--config`` file).

        TRL's derived batch fields (:data:`GENERATION_BATCH_FIELDS`) are written as null unless the user set them,
        so that reading the file derives them again.
        """
        values = settings_dict(self.run, self.problems, self.rollouts, self.evaluation, self.training)
        for switch in ("resume", "overwrite", "print_config"):
            values.pop(switch, None)
        for name in GENERATION_BATCH_FIELDS:
            if name not in self.explicit:
                values[name] = None
        return values

    def run_dir(self) -> Path:
        """``output_dir``, or ``runs/<model folder name>-grpo-<method>`` when unset."""
        if "output_dir" in self.explicit and self.training.output_dir:
            return Path(self.training.output_dir)
        return Path("runs") / f"{Path(str(self.run.model)).name}-grpo-{self.run.method}"


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> RecipeParser:
    """The ``fura train grpo`` parser: run, problem, rollout, evaluation and ``GRPOConfig`` flags (and ``--config``)."""
    parser = RecipeParser(
        [RunArguments, ProblemArguments, RolloutArguments, GRPOEvalArguments, FuraGRPOConfig],
        prog="fura train grpo",
        description="GRPO math RL with math-verify rewards and any --method. Settings come from --config YAML (flat "
        "`name: value` lines, every field below) and flags (flags win); every TRL GRPOConfig field is a flag.",
        epilog="Example: fura train grpo --model Qwen/Qwen3-1.7B --method fura -o runs/qwen3-grpo-fura "
        "--eval_data ../shared/data/math/test/gsm8k.json. Tiny CPU smoke run: --model smollm2 --max_steps 2 "
        "--prompts_per_step 2 --num_generations 2 --max_completion_length 16 --held_out_size 4. "
        "Resume a killed run with the same command plus --resume.",
    )
    parser.set_defaults(track="rl")
    parser.add_aliases(ALIASES)
    parser.describe_methods()
    for action in parser._actions:
        if action.dest in PROBLEM_HELP:
            action.help = PROBLEM_HELP[action.dest]
        if action.dest == "prompt_style":
            action.choices = list(GRPO_PROMPT_STYLES)
    return parser


def parse_settings(argv: Sequence[str]) -> GRPOSettings:
    """``fura train grpo`` arguments (``--config`` YAML < flags) → :class:`GRPOSettings`."""
    parsed = build_parser().parse(argv)
    run, problems, rollouts, evaluation, training = parsed.values
    explicit = parsed.explicit - _null_in_yaml(parsed.config_file, GENERATION_BATCH_FIELDS)
    return GRPOSettings(run, problems, rollouts, evaluation, training, explicit)


def _null_in_yaml(config_file: Path | None, names: Sequence[str]) -> set[str]:
    """The ``names`` that the YAML config sets to null (TRL derives them: not the user's value)."""
    if config_file is None:
        return set()
    import yaml

    data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    return {name for name in names if name in data and data[name] is None}


def resolve_settings(settings: GRPOSettings) -> GRPOSettings:
    """A checked copy with the method's ``rl`` defaults in every unset field, the gradient accumulation of
    ``prompts_per_step``, automatic mixed precision and the run folder."""
    resolved = copy.deepcopy(settings)
    run, training, explicit = resolved.run, resolved.training, resolved.explicit
    spec = get_method(run.method)
    track = spec.defaults(run.track)  # an unknown track fails here
    spec.resolve_args(run.track, run.method_args())  # so do unknown method arguments, before any model is loaded
    resolved.problems.seed = training.seed
    resolved.problems.validate()
    _check_trainer_fields(resolved)
    changes = unset_defaults(training, track.training, explicit)
    changes.update(automatic_trainer_settings(explicit))
    batch = changes.get("per_device_train_batch_size", training.per_device_train_batch_size)
    changes["gradient_accumulation_steps"], resolved.rollouts.prompts_per_step = rollout_shape(
        resolved.rollouts.prompts_per_step,
        training.num_generations,
        batch,
        training.gradient_accumulation_steps,
        explicit,
    )
    changes["output_dir"] = str(resolved.run_dir())
    resolved.training = replace_training(training, resolved.explicit, **changes)
    return resolved


def _check_trainer_fields(settings: GRPOSettings) -> None:
    """Refuse ``GRPOConfig`` settings that the recipe sets itself, and vLLM where it cannot work."""
    training = settings.training
    if training.reward_weights is not None:
        raise ValueError(
            "reward_weights: the recipe weighs its rewards itself. Fix: use --accuracy_reward_weight and "
            "--format_reward_weight instead."
        )
    if training.eval_strategy != "no":
        raise ValueError(
            "eval_strategy: GRPO runs have no evaluation dataset for the trainer. Fix: use --held_out_eval_steps N "
            "for the held-out accuracy during training."
        )
    if training.use_vllm:
        _validate_vllm(settings.run.method)


def _validate_vllm(method: str) -> None:
    if get_method(method).has_explicit_layers:
        raise ValueError(
            f"--use_vllm cannot serve method {method!r}: its explicit factored layers have no dense weight for vLLM "
            "to load. Fix: generate with transformers (drop --use_vllm), or use a PEFT method (fura, lora, ...)."
        )
    if not (torch.cuda.is_available() and importlib.util.find_spec("vllm")):
        raise ValueError(
            "--use_vllm needs a CUDA GPU and the vllm package. Fix: drop it to generate with transformers."
        )


def rollout_shape(
    prompts_per_step: int, num_generations: int, batch: int, accumulation: int, explicit: set[str]
) -> tuple[int, int]:
    """``(gradient_accumulation_steps, prompts_per_step)`` such that one optimizer step consumes exactly one GRPO
    step's ``prompts_per_step × num_generations`` completions, over ``batch`` completions per process and micro-batch.

    ``gradient_accumulation_steps`` is derived from ``prompts_per_step`` unless only the former was set (then the
    latter is derived from it); both set, they must agree.
    """
    processes = distributed.world_size()
    per_micro_step = batch * processes
    if "gradient_accumulation_steps" in explicit and "prompts_per_step" not in explicit:
        rollouts = per_micro_step * accumulation
        if rollouts % num_generations:
            raise ValueError(
                f"per_device_train_batch_size × processes × gradient_accumulation_steps = {batch} × {processes} × "
                f"{accumulation} completions is not a whole number of groups of num_generations={num_generations}. "
                "Fix: set --prompts_per_step instead of --gradient_accumulation_steps."
            )
        return accumulation, rollouts // num_generations
    rollouts = prompts_per_step * num_generations
    if rollouts % per_micro_step:
        raise ValueError(
            f"per_device_train_batch_size × processes = {batch} × {processes} must divide prompts_per_step × "
            f"num_generations = {prompts_per_step} × {num_generations} = {rollouts}. Fix: choose a divisor as "
            "--per_device_train_batch_size."
        )
    derived = rollouts // per_micro_step
    if "gradient_accumulation_steps" in explicit and accumulation != derived:
        raise ValueError(
            f"gradient_accumulation_steps={accumulation} disagrees with prompts_per_step × num_generations / "
            f"(per_device_train_batch_size × processes) = {rollouts} / {per_micro_step} = {derived}. Fix: set only "
            "one of --prompts_per_step and --gradient_accumulation_steps."
        )
    return derived, prompts_per_step


def replace_training(training: FuraGRPOConfig, explicit: set[str], **changes: Any) -> FuraGRPOConfig:
    """``dataclasses.replace`` for ``GRPOConfig``: TRL derives ``generation_batch_size`` / ``steps_per_generation``
    from each other in ``__post_init__`` and refuses both, so the ones the user did not set are derived again."""
    derived = {name: None for name in GENERATION_BATCH_FIELDS if name not in explicit}
    return dataclasses.replace(training, **{**derived, **changes})


def trainer_arguments(resolved: GRPOSettings, run: RunFolder, reward_weights: Sequence[float]) -> FuraGRPOConfig:
    """The ``GRPOConfig`` the trainer gets: checkpoints in the run folder, the rewards' weights, data seed = seed,
    several CPU processes in DDP."""
    training = resolved.training
    args = replace_training(
        training,
        resolved.explicit,
        output_dir=str(run.checkpoints_dir),
        reward_weights=list(reward_weights),
        data_seed=training.seed if training.data_seed is None else training.data_seed,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=training.use_cpu or distributed.use_cpu_backend(),  # several CPU processes: DDP over gloo
    )
    args.trust_remote_code = resolved.run.trust_remote_code
    return args


def check_resume_compatible(run: RunFolder, resolved: GRPOSettings) -> None:
    """Refuse to resume with settings that change the policy or the problems (:data:`RESUME_INVARIANTS`)."""
    runs.check_resume_compatible(run, resolved.to_dict(), RESUME_INVARIANTS, "the same policy on the same problems")


def check_data(resolved: GRPOSettings) -> ProblemSets:
    """The problem sets, after checking the chat template and the evaluation files: a missing or empty file fails
    here, before the run folder or the model is touched."""
    template = resolved.problems.chat_template
    if template and not Path(template).is_file():
        raise FileNotFoundError(f"--chat_template {template}: no such file. Fix: give a Jinja chat-template file.")
    problems = build_problem_sets(resolved.problems)
    evaluation = resolved.evaluation
    for path in [*evaluation.eval_data, *filter(None, evaluation.protocols().values())]:
        if Path(path).exists() and not load_rows(path):  # else a Hub id (online), read when evaluating
            raise ValueError(f"{path}: the evaluation file holds no rows. Fix: evaluate on a file with rows.")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Policy:
    """The model handed to ``GRPOTrainer``.

    Attributes:
        model: the base model (PEFT route) or the ready model (registry route).
        peft_config: the PEFT config TRL applies (PEFT route), else None.
        info: the registry's :class:`MethodInfo` (registry route), else None (built after TRL wraps the model).
    """

    model: Any
    peft_config: Any = None
    info: MethodInfo | None = None


def uses_peft_config(method: str) -> bool:
    """Whether ``method`` is handed to TRL as ``peft_config`` (a PEFT method on a full-precision base)."""
    spec = get_method(method)
    return spec.kind == "peft" and not spec.quantize_base


def load_policy(run: RunArguments) -> Policy:
    """The base model + PEFT config (PEFT methods), or the model built by the method registry (the others)."""
    if not uses_peft_config(run.method):
        model, info = load_model_for_method(
            run.method, run.model, run.dtype, run.track, run.method_args(), run.trust_remote_code
        )
        return Policy(model, None, info)
    from transformers import AutoModelForCausalLM

    spec = get_method(run.method)
    peft_config = spec.peft_config_cls(task_type="CAUSAL_LM", **spec.resolve_args(run.track, run.method_args()))
    path = resolve_model_path(run.model)
    logger.info("loading %s; TRL applies %s via peft_config", path, type(peft_config).__name__)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(run.dtype), trust_remote_code=run.trust_remote_code
    )
    return Policy(model, peft_config)


def method_info(model: Any, run: RunArguments) -> MethodInfo:
    """The :class:`MethodInfo` of a model TRL wrapped with ``peft_config`` (counts taken after wrapping)."""
    spec = get_method(run.method)
    trainable, total = count_parameters(model)
    return MethodInfo(
        method=run.method,
        track=run.track,
        kind=spec.kind,
        trainable_params=trainable,
        total_params=total,
        method_args=jsonable(spec.resolve_args(run.track, run.method_args())),
        training_defaults=dict(spec.defaults(run.track).training),
        save_format=spec.save_format,
        quantized=False,
    )


def reward_functions(
    rollouts: RolloutArguments, extra: Sequence[Callable[..., list[float]]] = ()
) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """``(functions, weights)``: the accuracy reward (always logged), the format reward if weighted, then ``extra``
    functions (weight 1 each)."""
    functions: list[Callable[..., list[float]]] = [accuracy_reward]
    weights = [rollouts.accuracy_reward_weight]
    if rollouts.format_reward_weight:
        functions.append(format_reward)
        weights.append(rollouts.format_reward_weight)
    functions.extend(extra)
    weights.extend([1.0] * len(extra))
    return functions, weights


def load_grpo_tokenizer(settings: GRPOSettings) -> Any:
    """The model's tokenizer, with the chat template of ``chat_template`` when one is given."""
    tokenizer = load_tokenizer(settings.run.model, settings.run.trust_remote_code)
    if settings.problems.chat_template:
        tokenizer.chat_template = Path(settings.problems.chat_template).read_text(encoding="utf-8")
    return tokenizer


def build_trainer(
    policy: Policy,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    args: Any,
    rewards: Sequence[Callable[..., list[float]]],
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ``trl.GRPOTrainer`` over the prompt rows (``peft_config`` for the PEFT route)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    from fura.integrations.trl_sync import enable_memory_light_sync

    trainer = GRPOTrainer(
        model=policy.model,
        reward_funcs=list(rewards),
        args=args,
        train_dataset=Dataset.from_list(list(rows)),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=policy.peft_config,
    )
    enable_memory_light_sync(trainer)  # vLLM gets merged weights module by module, no second copy (FuRA models)
    return trainer


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def _question_field(path: str) -> str | None:
    """The question field of a local file's first row (None for Hub ids: the protocol's own field)."""
    if not Path(path).exists():
        return None
    rows = load_rows(path)
    return next((name for name in QUESTION_FIELDS if rows and name in rows[0]), None)


def _max_new_tokens(settings: GRPOSettings) -> int:
    """The new-token budget of the held-out set and the data files."""
    return settings.evaluation.eval_max_new_tokens or settings.training.max_completion_length


def held_out_eval_config(settings: GRPOSettings, path: Path, style: str, output: Path | None) -> Any:
    """Greedy math-verify accuracy on the held-out JSONL, with the training prompt."""
    from fura.recipes.eval.math import MathEvalConfig

    return MathEvalConfig(
        data_path=str(path),
        name="held_out",
        grader="math_verify",
        question_field="problem",
        answer_field="answer",
        question_template=BOXED_MATH_INSTRUCTION,
        prompt_style=style,
        max_new_tokens=_max_new_tokens(settings),
        batch_size=settings.evaluation.eval_batch_size,
        max_examples=settings.evaluation.eval_max_examples,
        output_dir=None if output is None else str(output),
    )


def data_eval_config(settings: GRPOSettings, path: str, style: str, output: Path) -> Any:
    """Numeric accuracy on a GSM8K-format file, with the training prompt."""
    from fura.recipes.eval.math import MathEvalConfig

    return MathEvalConfig(
        data_path=path,
        grader="numeric",
        question_field=_question_field(path) or "instruction",
        answer_field="answer",
        question_template=BOXED_MATH_INSTRUCTION,
        prompt_style=style,
        max_new_tokens=_max_new_tokens(settings),
        batch_size=settings.evaluation.eval_batch_size,
        max_examples=settings.evaluation.eval_max_examples,
        output_dir=str(output),
    )


def protocol_eval_config(settings: GRPOSettings, protocol: str, path: str | None, style: str, output: Path) -> Any:
    """A MATH-500 / AIME / AMC protocol (its sampling settings, math-verify) on a local file or the Hub id."""
    from fura.recipes.eval.math import MathEvalConfig

    evaluation = settings.evaluation
    overrides: dict[str, Any] = {
        "prompt_style": style,
        "batch_size": evaluation.eval_batch_size,
        "max_new_tokens": evaluation.eval_max_new_tokens or PROTOCOL_MAX_NEW_TOKENS,
        "max_examples": evaluation.eval_max_examples,
        "output_dir": str(output),
    }
    field_name = _question_field(path) if path else None
    if field_name is not None:
        overrides["question_field"] = field_name
    return MathEvalConfig.for_protocol(protocol, path, **overrides)


def _summary(result: Any) -> dict[str, Any]:
    return {
        "accuracy": result.accuracy,
        "correct": result.correct,
        "total": result.total,
        "problems": result.problems,
        "predictions_path": result.predictions_path,
    }


def evaluate_after_training(
    model: Any, tokenizer: Any, settings: GRPOSettings, run: RunFolder, style: str, held_out: Path | None, step: int
) -> dict[str, Any]:
    """Held-out accuracy (also logged to ``metrics.jsonl``), then the data files and protocols of the settings."""
    from fura.recipes.eval.math import evaluate_math

    out = run.eval_dir / "math"
    results: dict[str, Any] = {}
    if settings.evaluation.held_out_eval and held_out is not None:
        result = evaluate_math(model, tokenizer, held_out_eval_config(settings, held_out, style, out))
        run.metrics.append(_held_out_record(step, result))
        results["held_out"] = _summary(result)
    for path in settings.evaluation.eval_data:
        result = evaluate_math(model, tokenizer, data_eval_config(settings, path, style, out))
        results[result.name] = _summary(result)
    for protocol, path in settings.evaluation.protocols().items():
        result = evaluate_math(model, tokenizer, protocol_eval_config(settings, protocol, path, style, out))
        results[protocol] = _summary(result)
    return results


def _held_out_record(step: int, result: Any) -> dict[str, Any]:
    return {
        "step": step,
        "held_out_accuracy": result.accuracy,
        "held_out_correct": result.correct,
        "held_out_total": result.total,
    }


# ----------------------------------------------------------------------------------------------------------------
# Reward curve and the run callback
# ----------------------------------------------------------------------------------------------------------------


def plot_reward_curve(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Draw the mean reward (± its std across completions), held-out accuracy and the mean completion length.

    Written to a temporary file and renamed, so the PNG is always complete. Returns None when there is nothing to draw.
    """
    train = [r for r in records if r.get("reward") is not None and r.get("loss") is not None]
    held_out = [(r["step"], r["held_out_accuracy"]) for r in records if r.get("held_out_accuracy") is not None]
    if not train and not held_out:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        _draw_rewards(ax, train, held_out)
        ax.set_title(title or "GRPO rewards", fontsize=10)
        fig.subplots_adjust(left=0.12, right=0.87, bottom=0.13, top=0.9)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def _draw_rewards(ax: Any, train: Sequence[Mapping[str, Any]], held_out: Sequence[tuple[int, float]]) -> None:
    if train:
        steps = [r["step"] for r in train]
        mean = [r["reward"] for r in train]
        std = [r.get("reward_std") or 0.0 for r in train]
        ax.plot(steps, mean, label="train reward (mean)", color="tab:blue", lw=1.2)
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(steps, low, high, color="tab:blue", alpha=0.15, lw=0)
    if held_out:
        ax.plot(*zip(*held_out, strict=True), "o-", label="held-out accuracy", color="tab:orange", lw=1.2)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward / accuracy")
    ax.grid(alpha=0.3)
    lengths = [(r["step"], r["completions/mean_length"]) for r in train if r.get("completions/mean_length")]
    if lengths:
        length_axis = ax.twinx()
        length_axis.plot(*zip(*lengths, strict=True), color="tab:gray", lw=0.8, ls="--")
        length_axis.set_ylabel("mean completion length (tokens)", color="tab:gray")
    ax.legend(loc="upper left")


class GRPORunCallback(TrainerCallback):
    """Log one line per step, redraw ``rewards.png`` at every save and at the end, and run the in-loop held-out
    evaluation (every ``every`` steps and before the first; the final step is left to the post-training evaluation).

    Args:
        run: the run folder.
        title: plot title.
        evaluate: ``(model, step) -> accuracy`` for the in-loop evaluation (None = none).
        every: evaluation period in steps (None = none).
        plot_at_end: redraw the plot when training ends (off when the caller redraws it after the final evaluation).
    """

    def __init__(
        self,
        run: RunFolder,
        title: str = "",
        evaluate: Callable[[Any, int], float] | None = None,
        every: int | None = None,
        plot_at_end: bool = True,
    ) -> None:
        self.run = run
        self.title = title
        self.evaluate = evaluate if every else None
        self.every = every
        self.plot_at_end = plot_at_end

    @property
    def plot_path(self) -> Path:
        """``<run>/rewards.png``."""
        return self.run.root / "rewards.png"

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.evaluate is not None and state.global_step == 0 and state.max_steps > 0:
            self.evaluate(kwargs["model"], 0)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        step = state.global_step
        if self.evaluate is not None and step % self.every == 0 and step < state.max_steps:
            self.evaluate(kwargs["model"], step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and "reward" in logs and state.is_world_process_zero:
            logger.info(
                "step %d/%d: reward %.3f ± %.3f, completion length %.0f, lr %.2e",
                state.global_step,
                state.max_steps,
                logs["reward"],
                logs.get("reward_std") or 0.0,
                logs.get("completions/mean_length") or 0.0,
                logs.get("learning_rate") or 0.0,
            )

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if state.is_world_process_zero:
            self.plot()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if state.is_world_process_zero and self.plot_at_end:
            self.plot()

    def plot(self) -> Path | None:
        """Redraw ``rewards.png`` from ``metrics.jsonl``."""
        return plot_reward_curve(self.run.metrics.records(), self.plot_path, self.title)


def in_loop_evaluator(settings: GRPOSettings, run: RunFolder, tokenizer: Any, style: str, held_out: Path) -> Callable:
    """``(model, step) -> accuracy``: greedy held-out accuracy, appended to ``metrics.jsonl`` (no predictions file)."""
    from fura.recipes.eval.math import evaluate_math

    def evaluate(model: Any, step: int) -> float:
        result = evaluate_math(model, tokenizer, held_out_eval_config(settings, held_out, style, None))
        run.metrics.append(_held_out_record(step, result))
        logger.info(
            "step %d: held-out accuracy %.1f%% (%d/%d)", step, 100 * result.accuracy, result.correct, result.total
        )
        return result.accuracy

    return evaluate


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class GRPOResult:
    """Outcome of :func:`run_grpo`.

    Attributes:
        run_dir: the run folder.
        method: the method's :class:`~fura.recipes.methods.MethodInfo` (trainable parameters etc.).
        global_step: GRPO steps done (resumed runs included).
        train_loss: mean training loss over this invocation's steps (≈ 0 for on-policy REINFORCE: the advantages of
            each group sum to zero; follow the reward instead).
        reward: the mean reward of the last logged step (None when nothing was logged).
        artifact: the saved adapter / dense model folder.
        evaluation: accuracy per evaluation set (``held_out``, data file stems, protocol names).
        already_finished: the run folder held a finished run, so nothing was trained (``--resume`` of a finished run).
    """

    run_dir: Path
    method: MethodInfo
    global_step: int
    train_loss: float | None
    reward: float | None
    artifact: Path
    evaluation: dict[str, Any]
    already_finished: bool = False


def run_grpo(
    settings: GRPOSettings,
    callbacks: Sequence[Any] = (),
    extra_rewards: Sequence[Callable[..., list[float]]] = (),
) -> GRPOResult:
    """Train (or resume) one GRPO run and write its run folder; see the module docstring.

    The problems, the evaluation files and the tokenizer are read and checked before the run folder or the model is
    touched, so a bad file or flag fails fast and leaves nothing behind. ``--resume`` of a finished run returns its
    recorded result without training.

    Args:
        settings: the run's settings (:func:`parse_settings`; the method's defaults fill the unset fields).
        callbacks: extra ``transformers`` callbacks (called after the run's own).
        extra_rewards: more TRL reward functions (weight 1 each), added after the configured ones.
    """
    resolved = resolve_settings(settings)
    run = RunFolder(resolved.run_dir())
    if resolved.run.resume and run.is_finished():
        logger.info("%s holds a finished run: nothing to resume", run.root)
        return finished_result(run)
    problems = check_data(resolved)
    tokenizer = load_grpo_tokenizer(resolved)
    resolved.problems.prompt_style = resolve_prompt_style(resolved.problems.prompt_style, tokenizer)
    checkpoint = runs.prepare_run_folder(run, resume=resolved.run.resume, overwrite=resolved.run.overwrite)
    with runs.main_process_log(run.log_path):
        if distributed.is_main_process():
            if checkpoint is not None:
                check_resume_compatible(run, resolved)
            run.write_config(dump_yaml(resolved.to_dict()))
        logger.info("run folder %s (%s)", run.root, f"resuming from {checkpoint.name}" if checkpoint else "new run")
        logger.info(
            "%s: %d training, %d held-out problems", problems.source, len(problems.train), len(problems.held_out)
        )
        held_out = None
        if problems.held_out:
            held_out = run.root / "data" / "held_out.jsonl"
            if distributed.is_main_process():
                write_problems(problems.held_out, held_out)
        from transformers import set_seed

        set_seed(resolved.training.seed)
        return _train_and_finish(resolved, run, tokenizer, problems, held_out, checkpoint, callbacks, extra_rewards)


def _train_and_finish(
    resolved: GRPOSettings,
    run: RunFolder,
    tokenizer: Any,
    problems: ProblemSets,
    held_out: Path | None,
    checkpoint: Path | None,
    callbacks: Sequence[Any],
    extra_rewards: Sequence[Callable[..., list[float]]],
) -> GRPOResult:
    from fura.recipes.callbacks import RunFolderCallback

    style = resolved.problems.prompt_style
    rewards, weights = reward_functions(resolved.rollouts, extra_rewards)
    args = trainer_arguments(resolved, run, weights)  # before the model: sets up the process group / device
    policy = load_policy(resolved.run)
    title = f"GRPO {resolved.run.method} on {Path(str(resolved.run.model)).name}"
    evaluate = in_loop_evaluator(resolved, run, tokenizer, style, held_out) if held_out else None
    progress = GRPORunCallback(run, title, evaluate, resolved.evaluation.held_out_eval_steps, plot_at_end=False)
    trainer = build_trainer(
        policy,
        tokenizer,
        grpo_rows(problems.train, style, tokenizer),
        args,
        rewards,
        [RunFolderCallback(run, title, plot_at_end=False), progress, *callbacks],
    )
    distributed.configure_trainer_for_fsdp(trainer)
    info = policy.info or method_info(trainer.model, resolved.run)
    logger.info("%s", info.summary())
    main = distributed.is_main_process()
    if main:
        route = "peft_config" if policy.peft_config else "registry"
        run.write_json(run.method_path, {**info.to_dict(), "route": route})
    initial_adapter = prepare_initial_adapter(trainer.model, info, run)
    global_step, train_loss, train_metrics = runs.train_or_restore(trainer, checkpoint)
    folder = run.adapter_dir if info.save_format == "adapter" else run.model_dir
    artifact = artifacts.save_trained_model_distributed(trainer, info, folder, tokenizer, initial_adapter)
    evaluation: dict[str, Any] = {}
    if main:
        evaluation = evaluate_after_training(trainer.model, tokenizer, resolved, run, style, held_out, global_step)
        run.plot(title)  # after the final evaluation, so that the plots show it
        progress.plot()
    result = GRPOResult(run.root, info, global_step, train_loss, _last_reward(run), artifact, evaluation)
    if main:  # written last: the run is done
        run.write_json(run.results_path, _results_payload(result, train_metrics, problems, style, tokenizer))
    logger.info("done: %d steps, artifact %s", result.global_step, artifact)
    return result


def finished_result(run: RunFolder) -> GRPOResult:
    """The :class:`GRPOResult` recorded in a finished run folder's ``results.json``."""
    payload = json.loads(run.results_path.read_text(encoding="utf-8"))
    method = {k: v for k, v in payload["method"].items() if k != "trainable_percent"}
    return GRPOResult(
        run_dir=run.root,
        method=MethodInfo(**method),
        global_step=int(payload["train"]["global_step"]),
        train_loss=payload["train"].get("train_loss"),
        reward=payload["train"].get("last_reward"),
        artifact=Path(payload["artifact"]),
        evaluation=payload.get("eval") or {},
        already_finished=True,
    )


def _last_reward(run: RunFolder) -> float | None:
    rewards = [r["reward"] for r in run.metrics.records() if r.get("reward") is not None and "loss" in r]
    return rewards[-1] if rewards else None


def _results_payload(
    result: GRPOResult, train_metrics: Mapping[str, Any], problems: ProblemSets, style: str, tokenizer: Any
) -> dict[str, Any]:
    example = grpo_prompt(problems.train[0].problem, style, tokenizer) if problems.train else None
    return {
        "method": result.method.to_dict(),
        "train": {
            "global_step": result.global_step,
            "train_loss": result.train_loss,
            "last_reward": result.reward,
            **train_metrics,
        },
        "data": {
            "source": problems.source,
            "train_problems": len(problems.train),
            "held_out_problems": len(problems.held_out),
            "prompt_style": style,
            "example_prompt": example,
        },
        "artifact": str(result.artifact),
        "eval": result.evaluation,
    }


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    """Entry point of ``fura train grpo ARGS``; returns the exit status."""
    settings = parse_settings(argv)
    if settings.run.print_config:
        print(dump_yaml(resolve_settings(settings).to_dict()), end="")
        return 0
    result = run_grpo(settings)
    print(result.method.summary())
    if result.already_finished:
        print(f"{result.run_dir} holds a finished run ({result.global_step} GRPO steps): nothing to resume")
        return 0
    reward = "n/a" if result.reward is None else f"{result.reward:.3f}"
    print(
        f"trained {result.global_step} GRPO steps (last reward {reward}); run folder: {result.run_dir}; "
        f"saved: {result.artifact}"
    )
    for name, summary in result.evaluation.items():
        print(f"{name}: accuracy {100 * summary['accuracy']:.1f}% ({summary['correct']}/{summary['total']})")
    return 0
