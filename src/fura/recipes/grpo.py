"""GRPO math RL (``fura train grpo``): TRL's ``GRPOTrainer`` with math-verify rewards, for any registered method; the
evaluations are in :mod:`fura.recipes.grpo_eval`. Pipeline, defaults and objective: ``docs/recipes/grpo.md``."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fura.integrations import distributed
from fura.integrations.trl_sync import enable_memory_light_sync
from fura.recipes.args import RecipeParser, RunArguments
from fura.recipes.base_models import resolve_dtype, resolve_model_path
from fura.recipes.data.formats import load_rows
from fura.recipes.data.math_problems import (
    ProblemSets,
    build_problem_sets,
    grpo_prompt,
    grpo_rows,
    resolve_prompt_style,
    write_problems,
)
from fura.recipes.grpo_eval import GRPORunCallback, evaluate_after_training, in_loop_evaluator
from fura.recipes.grpo_settings import GENERATION_BATCH_FIELDS, FuraGRPOConfig, GRPOSettings, RolloutArguments
from fura.recipes.loading import MethodInfo, load_model_for_method
from fura.recipes.registry import MethodSpec, get_method
from fura.recipes.rewards import ACCURACY_REWARDS, RewardFunction, format_reward
from fura.recipes.runs import RunFolder
from fura.recipes.sft import load_tokenizer, trained_model_saver
from fura.recipes.sft import trainer_arguments as sft_trainer_arguments
from fura.recipes.skeleton import BATCH_INVARIANTS, MODEL_INVARIANTS, Recipe, RunResult, Session

logger = logging.getLogger(__name__)


#: Settings that must not change when a run is resumed (the policy, the problems or the batches would differ).
RESUME_INVARIANTS = (
    *MODEL_INVARIANTS,
    *("dataset", "train_size", "held_out_size", "held_out_dataset", "split", "held_out_split", "question_field"),
    *("answer_field", "prompt_style", "chat_template", "accuracy_reward_weight", "format_reward_weight"),
    *("answer_source", "prompts_per_step", "num_generations"),
    *BATCH_INVARIANTS,
)


def _null_in_yaml(config_file: Path | None, names: Sequence[str]) -> set[str]:
    """The ``names`` that the YAML config sets to null (TRL derives them: not the user's value)."""
    if config_file is None:
        return set()
    import yaml

    data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    return {name for name in names if name in data and data[name] is None}


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
    method = settings.run.method
    if training.use_vllm and get_method(method).has_explicit_layers:
        raise ValueError(
            f"--use_vllm cannot serve method {method!r}: its explicit factored layers have no dense weight for vLLM "
            "to load. Fix: generate with transformers (drop --use_vllm), or use a PEFT method (fura, lora, ...)."
        )
    if training.use_vllm and not (torch.cuda.is_available() and importlib.util.find_spec("vllm")):
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
    """:func:`fura.recipes.sft.trainer_arguments` for ``GRPOConfig`` (copied by :func:`replace_training`), with the
    rewards' weights."""
    replace = functools.partial(replace_training, explicit=resolved.explicit)
    changes = {"reward_weights": list(reward_weights), "trust_remote_code": resolved.run.trust_remote_code}
    return sft_trainer_arguments(resolved.training, run, False, replace, **changes)


def load_policy(run: RunArguments) -> tuple[Any, Any, MethodInfo | None]:
    """The model handed to ``GRPOTrainer`` as ``(model, peft_config, info)``: the base model and the PEFT config TRL
    applies (PEFT methods on a full-precision base; ``info`` None, built once TRL has wrapped the model), or the model
    built by the method registry and its :class:`MethodInfo` (the others; ``peft_config`` None)."""
    spec = get_method(run.method)
    if spec.kind != "peft" or spec.quantize_base:
        model, info = load_model_for_method(
            run.method, run.model, run.dtype, run.track, run.method_args(), run.trust_remote_code
        )
        return model, None, info
    from transformers import AutoModelForCausalLM

    peft_config = spec.peft_config_cls(task_type="CAUSAL_LM", **spec.resolve_args(run.track, run.method_args()))
    path = resolve_model_path(run.model)
    logger.info("loading %s; TRL applies %s via peft_config", path, type(peft_config).__name__)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(run.dtype), trust_remote_code=run.trust_remote_code
    )
    return model, peft_config, None


def reward_functions(
    rollouts: RolloutArguments, extra: Sequence[RewardFunction] = ()
) -> tuple[list[RewardFunction], list[float]]:
    """``(functions, weights)``: the accuracy reward (always logged), the format reward if weighted, then ``extra``
    functions (weight 1 each)."""
    functions: list[RewardFunction] = [ACCURACY_REWARDS[rollouts.answer_source]]
    weights = [rollouts.accuracy_reward_weight]
    if rollouts.format_reward_weight:
        functions.append(format_reward)
        weights.append(rollouts.format_reward_weight)
    functions.extend(extra)
    weights.extend([1.0] * len(extra))
    return functions, weights


def build_trainer(
    policy: tuple[Any, Any, MethodInfo | None],
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    args: Any,
    rewards: Sequence[RewardFunction],
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ``trl.GRPOTrainer`` over the prompt rows for a :func:`load_policy` policy; with vLLM, a FuRA policy's
    weights are synced one merged module at a time (:func:`fura.integrations.trl_sync.enable_memory_light_sync`)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    model, peft_config, _ = policy
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=list(rewards),
        args=args,
        train_dataset=Dataset.from_list(list(rows)),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=peft_config,
    )
    enable_memory_light_sync(trainer)  # vLLM gets FuRA's merged weights module by module, no second copy
    return trainer


class GRPORecipe(Recipe):
    """``fura train grpo``."""

    prog = "fura train grpo"
    description = (
        "GRPO math RL with math-verify rewards and any --method. Settings come from --config YAML (flat `name: value` "
        "lines, every field below) and flags (flags win); every TRL GRPOConfig field is a flag."
    )
    epilog = (
        "Example: fura train grpo --model Qwen/Qwen3-1.7B --method fura --output_dir runs/qwen3-grpo-fura --eval_data "
        "../shared/data/math/test/gsm8k.json. Tiny CPU smoke run: --model smollm2 --max_steps 2 --prompts_per_step 2 "
        "--num_generations 2 --max_completion_length 16 --held_out_size 4. Resume a killed run with the same command "
        "plus --resume."
    )
    settings_cls = GRPOSettings
    resume_invariants = RESUME_INVARIANTS
    keeps = "the same policy on the same problems"
    steps = "GRPO steps"

    def __init__(self, extra_rewards: Sequence[RewardFunction] = ()) -> None:
        self.extra_rewards = tuple(extra_rewards)

    def build_parser(self) -> RecipeParser:
        """:meth:`Recipe.build_parser`, with the ``rl`` track as the default."""
        parser = super().build_parser()
        parser.set_defaults(track="rl")
        return parser

    def make_settings(self, values: Sequence[Any], explicit: set[str], config_file: Path | None) -> GRPOSettings:
        """:class:`GRPOSettings`; TRL's derived batch fields that the YAML sets to null are not the user's."""
        return GRPOSettings(*values, explicit=explicit - _null_in_yaml(config_file, GENERATION_BATCH_FIELDS))

    def check_settings(self, resolved: GRPOSettings) -> None:
        """The track, the method arguments (before any model is loaded), the problem settings and the trainer's."""
        run = resolved.run
        spec = get_method(run.method)
        spec.defaults(run.track)  # an unknown track fails here
        spec.resolve_args(run.track, run.method_args())
        resolved.problems.seed = resolved.training.seed
        resolved.problems.validate()
        _check_trainer_fields(resolved)

    def adjust(self, resolved: GRPOSettings, spec: MethodSpec, changes: dict[str, Any]) -> None:
        """``gradient_accumulation_steps`` and ``prompts_per_step`` that make one GRPO step one optimizer step."""
        training = resolved.training
        batch = changes.get("per_device_train_batch_size", training.per_device_train_batch_size)
        changes["gradient_accumulation_steps"], resolved.rollouts.prompts_per_step = rollout_shape(
            resolved.rollouts.prompts_per_step,
            training.num_generations,
            batch,
            training.gradient_accumulation_steps,
            resolved.explicit,
        )

    def replace_training(self, resolved: GRPOSettings, changes: dict[str, Any]) -> FuraGRPOConfig:
        """See :func:`replace_training`."""
        return replace_training(resolved.training, resolved.explicit, **changes)

    def check_inputs(self, resolved: GRPOSettings) -> tuple[ProblemSets, Any]:
        """The problem sets and the tokenizer (with ``--chat_template``'s template; it decides the ``auto`` prompt
        style); a missing or empty chat-template or evaluation file fails here, before the run folder or the model is
        touched."""
        template = resolved.problems.chat_template
        if template and not Path(template).is_file():
            raise FileNotFoundError(f"--chat_template {template}: no such file. Fix: give a Jinja chat-template file.")
        problems = build_problem_sets(resolved.problems)
        evaluation = resolved.evaluation
        for path in [*evaluation.eval_data, *filter(None, evaluation.protocols().values())]:
            if Path(path).exists() and not load_rows(path):  # else a Hub id (online), read when evaluating
                raise ValueError(f"{path}: the evaluation file holds no rows. Fix: evaluate on a file with rows.")
        tokenizer = load_tokenizer(resolved.run.model, resolved.run.trust_remote_code)
        if template:
            tokenizer.chat_template = Path(template).read_text(encoding="utf-8")
        resolved.problems.prompt_style = resolve_prompt_style(resolved.problems.prompt_style, tokenizer)
        return problems, tokenizer

    def start(
        self, resolved: GRPOSettings, run: RunFolder, checkpoint: Path | None, inputs: Any, callbacks: Sequence[Any]
    ) -> Session:
        """The held-out problems file, the rewards, the policy and the ``GRPOTrainer``."""
        from fura.recipes.callbacks import RunFolderCallback

        problems, tokenizer = inputs
        logger.info(
            "%s: %d training, %d held-out problems", problems.source, len(problems.train), len(problems.held_out)
        )
        held_out = run.root / "data" / "held_out.jsonl" if problems.held_out else None
        if held_out and distributed.is_main_process():
            write_problems(problems.held_out, held_out)
        style = resolved.problems.prompt_style
        rewards, weights = reward_functions(resolved.rollouts, self.extra_rewards)
        args = trainer_arguments(resolved, run, weights)  # before the model: sets up the process group / device
        policy = load_policy(resolved.run)
        title = f"GRPO {resolved.run.method} on {Path(str(resolved.run.model)).name}"
        evaluate = in_loop_evaluator(resolved, run, tokenizer, style, held_out) if held_out else None
        progress = GRPORunCallback(run, title, evaluate, resolved.evaluation.held_out_eval_steps)
        own = [RunFolderCallback(run, title), progress]
        rows = grpo_rows(problems.train, style, tokenizer)
        trainer = build_trainer(policy, tokenizer, rows, args, rewards, [*own, *callbacks])
        _, peft_config, info = policy
        if info is None:  # the PEFT route: counted once TRL has wrapped the model
            spec, track = get_method(resolved.run.method), resolved.run.track
            info = MethodInfo.of(trainer.model, spec, track, spec.resolve_args(track, resolved.run.method_args()))
        logger.info("%s", info.summary())
        if distributed.is_main_process():
            route = "peft_config" if peft_config else "registry"
            run.write_json(run.method_path, {**info.to_dict(), "route": route})
        save = trained_model_saver(trainer, info, run, tokenizer)
        context = {"tokenizer": tokenizer, "problems": problems, "held_out": held_out, "progress": progress}
        return Session(trainer, info, title, save, context=context)

    def after_training(
        self, session: Session, resolved: GRPOSettings, run: RunFolder, result: RunResult
    ) -> dict[str, Any]:
        """The held-out and post-training evaluations, the last reward, and the problems' summary."""
        context, style = session.context, resolved.problems.prompt_style
        tokenizer, problems = context["tokenizer"], context["problems"]
        result.evaluation = evaluate_after_training(
            session.trainer.model, tokenizer, resolved, run, style, context["held_out"], result.global_step
        )
        context["progress"].plot()
        rewards = [r["reward"] for r in run.metrics.records() if r.get("reward") is not None and "loss" in r]
        result.reward = rewards[-1] if rewards else None
        example = grpo_prompt(problems.train[0].problem, style, tokenizer) if problems.train else None
        data = {
            "source": problems.source,
            "train_problems": len(problems.train),
            "held_out_problems": len(problems.held_out),
            "prompt_style": style,
            "example_prompt": example,
        }
        return {"data": data}

    def report(self, result: RunResult) -> list[str]:
        """Steps, the last reward, folders and each evaluation's accuracy."""
        reward = "n/a" if result.reward is None else f"{result.reward:.3f}"
        lines = [
            f"trained {result.global_step} GRPO steps (last reward {reward}); run folder: {result.run_dir}; "
            f"saved: {result.artifact}"
        ]
        for name, summary in (result.evaluation or {}).items():
            lines.append(f"{name}: accuracy {100 * summary['accuracy']:.1f}% ({summary['correct']}/{summary['total']})")
        return lines


def run_grpo(
    settings: GRPOSettings, callbacks: Sequence[Any] = (), extra_rewards: Sequence[RewardFunction] = ()
) -> RunResult:
    """Train (or resume) one GRPO run (:meth:`Recipe.run`); ``extra_rewards`` are more TRL reward functions (weight 1
    each), added after the configured ones."""
    return GRPORecipe(extra_rewards).run(settings, callbacks)


RECIPE = GRPORecipe()
parse_settings = RECIPE.parse_settings
build_parser = RECIPE.build_parser
resolve_settings = RECIPE.resolve_settings
main = RECIPE.main
