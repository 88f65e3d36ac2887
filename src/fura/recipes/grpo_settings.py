"""The settings of ``fura train grpo``: the problem set, the rollouts, the evaluations and TRL's ``GRPOConfig`` with
the reference's defaults, gathered in :class:`GRPOSettings`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trl import GRPOConfig

from fura.recipes.args import RunArguments, TrlConfigDefaults, repeatable
from fura.recipes.data.math_problems import MathProblemsConfig
from fura.recipes.eval.math import MATH_PROTOCOLS
from fura.recipes.skeleton import RecipeSettings

#: ``GRPOConfig`` fields that TRL derives from each other (and from the batch size) in ``__post_init__``.
GENERATION_BATCH_FIELDS = ("generation_batch_size", "steps_per_generation")


@dataclass
class ProblemArguments(MathProblemsConfig):
    """The problems and the prompt: :class:`~fura.recipes.data.math_problems.MathProblemsConfig`, each field a flag of
    its own name but ``seed``: the run's ``--seed`` (``GRPOConfig.seed``) also generates the reasoning-gym sets."""

    seed: int = field(default=42, init=False, metadata={"help": "the run's --seed (set by resolve_settings)"})


@dataclass
class RolloutArguments:
    """How many problems one GRPO step rolls out, and how the completions are rewarded (not in ``GRPOConfig``; the
    fields in full: ``docs/recipes/grpo.md``)."""

    prompts_per_step: int = field(
        default=32, metadata={"help": "problems per GRPO step (sets gradient_accumulation_steps)"}
    )
    accuracy_reward_weight: float = field(default=1.0, metadata={"help": "weight of the math-verify reward"})
    format_reward_weight: float = field(
        default=0.0, metadata={"help": "weight of the \\boxed{} format reward (0: off)"}
    )
    answer_source: str = field(
        default="boxed",
        metadata={"help": "accuracy reward on the last \\boxed{} (boxed) or the final answer anywhere (completion)",
                  "choices": ["boxed", "completion"]},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")


@dataclass
class GRPOEvalArguments:
    """Greedy evaluation of the policy during and after training (:func:`fura.recipes.eval.evaluate_math`; the fields
    in full: ``docs/recipes/grpo.md``)."""

    held_out_eval: bool = field(default=True, metadata={"help": "held-out accuracy after training"})
    held_out_eval_steps: int | None = field(
        default=None, metadata={"help": "also every N steps and before the first (reference: 5)"}
    )
    eval_data: list[str] = field(
        default_factory=list, metadata={"help": "GSM8K-format files graded numerically after training"}
    )
    eval_protocol: list[str] = field(
        default_factory=list,
        metadata=repeatable(
            "MATH-500, AIME-24, AIME-25 or AMC23 on a local FILE (or the Hub id online)", "NAME[=FILE]"
        ),
    )
    eval_max_examples: int | None = field(default=None, metadata={"help": "problems per evaluation set; None: all"})
    eval_batch_size: int = field(default=64, metadata={"help": "prompts per generate call"})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "new tokens; None: max_completion_length (protocols: 2048)"}
    )

    def __post_init__(self) -> None:
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
class FuraGRPOConfig(TrlConfigDefaults, GRPOConfig):
    """TRL's ``GRPOConfig`` with the reference RL recipe's defaults (the reference's rl/run_rl.py): only the fields
    below and :class:`~fura.recipes.args.TrlConfigDefaults`' have other defaults than TRL's; every field keeps its
    meaning and its flag. TRL's values and why: ``docs/recipes/grpo.md``."""

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
    logging_steps: float = field(default=1, metadata={"help": "write a metrics line every N GRPO steps"})
    save_steps: float = field(default=10, metadata={"help": "save a resumable checkpoint every N GRPO steps"})
    vllm_gpu_memory_utilization: float = field(default=0.4, metadata={"help": "GPU memory share of colocated vLLM"})
    vllm_max_model_length: int | None = field(default=2048, metadata={"help": "vLLM context length"})


@dataclass
class GRPOSettings(RecipeSettings):
    """The settings of ``fura train grpo``: the run, the problem sets and prompt, the rollouts and rewards, the
    held-out and post-training evaluation, and TRL's ``GRPOConfig``."""

    folder_tag: ClassVar[str] = "grpo-"
    run: RunArguments
    problems: ProblemArguments
    rollouts: RolloutArguments
    evaluation: GRPOEvalArguments
    training: FuraGRPOConfig

    def to_dict(self) -> dict[str, Any]:
        """:meth:`RecipeSettings.to_dict`, with TRL's derived batch fields (:data:`GENERATION_BATCH_FIELDS`) null
        unless the user set them, so that reading the file derives them again."""
        values = super().to_dict()
        values.update({name: None for name in GENERATION_BATCH_FIELDS if name not in self.explicit})
        return values
