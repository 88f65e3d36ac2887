"""GRPO math RL (``fura train grpo``): TRL's ``GRPOTrainer`` with math-verify rewards, any registered method.

Pipeline (the same shape as :mod:`fura.recipes.sft`): resolve the config (YAML < flags, the method's ``rl`` track
defaults) → prepare the run folder (new, or resume from its last complete checkpoint) → load the tokenizer and build
the problem sets (:mod:`fura.recipes.data.math_problems`) → build the policy → ``trl.GRPOTrainer``
(``resume_from_checkpoint`` restores weights, optimizer, scheduler, RNG states and the data position) → save the adapter
/ dense model → held-out accuracy and optional evaluations with :mod:`fura.recipes.eval`.

How the method is applied. PEFT methods on a full-precision base (``fura``, ``lora``, ``dora``, ``pissa``) go the way
a TRL user writes it: the plain base model plus ``peft_config=FuraConfig(...)`` (or ``LoraConfig``) handed to
``GRPOTrainer``, which wraps the model itself. This is the point of FuRA being a PEFT method — it drops into TRL exactly
like LoRA — and it leaves TRL in charge of what it does for PEFT models (seeding before the adapter init, input grads
for gradient checkpointing, a reference policy = adapters disabled when ``beta > 0``). Every other method (``full``,
``svd``, the 4-bit ones) is built by :func:`fura.recipes.methods.load_model_for_method` and passed as a ready model.
Both routes take their arguments from the method registry (``rl`` track defaults + ``--method-arg``), so the same flags
give the same adapter either way.

Reference defaults kept (reference-spec §4.2): 50 GRPO steps of 32 prompts × 8 completions (256 rollouts, ONE
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
accumulation). "True" GRPO / DAPO / Dr. GRPO are one flag away: ``--scale-rewards group``, ``--loss-type dapo`` or
``dr_grpo``, ``--num-iterations 2``, ``--beta 0.04``.

Deliberate differences from the reference (reference-spec §4.2, §5.2, §7.24):

* **EOS is trained.** TRL's completion mask covers the completion up to and *including* its first EOS (any EOS id of
  the model's generation config), so the policy learns to stop; the reference never appended EOS to the trained
  sequences. Truncated completions are still trained with their reward (``mask_truncated_completions`` off), as the
  reference.
* **Thinking mode / chat template**: the tokenizer's chat template is used as is (Qwen3: thinking mode on, as the
  reference); ``--chat-template FILE`` replaces it for training *and* evaluation (e.g. a template without thinking).
  Models without a chat template get the project's ``fura`` text template (``--prompt-style``).
* **Prompt backslashes**: single ``\\boxed{}`` in the prompt (:data:`fura.recipes.data.prompts.BOXED_MATH_INSTRUCTION`);
the
  reference's file had literal double backslashes.
* **Reward grading**: math-verify on the last boxed answer (:mod:`fura.recipes.rewards`) instead of the MATH string
  normaliser; a missing box still earns 0.
* **Data**: by default reasoning-gym ``gsm_symbolic`` (offline, numeric answers, a fixed-seed training set and a
  disjoint held-out set) instead of MATH from the Hub; ``--dataset qwedsacf/competition_math`` (online) reproduces the
  reference's MATH split; local JSON/JSONL files work too.
* **Prompt sampling**: TRL draws each step's prompts from a seeded shuffle of the training set (no repeats within an
  epoch) instead of ``random.sample`` per step.
* **Generation**: ``transformers`` ``generate`` by default (vLLM is optional, ``--use-vllm``, GPU only); both roll out
  with the current weights, so there is no weight-sync step to get wrong.
* **Precision**: PEFT keeps the adapter in fp32 over a bf16 base (the reference updated bf16 tensors, §7.5).
* **In-loop evaluation** is off by default (the reference scored 1,000 MATH-test problems greedily every 5 steps);
  ``--held-out-eval-steps 5`` restores it on the held-out set. Held-out accuracy uses :mod:`fura.recipes.eval`'s
  math-verify grader (the whole completion parsed, as the reference's post-training evaluation), greedy,
  ``max_completion_length`` new tokens; it is always computed once after training.
* **Post-training evaluation** (GSM8K-format files graded numerically; MATH-500 / AIME / AMC protocols when their data
  is given) generates with ``transformers`` and the same prompt; protocols get 2,048 new tokens without the
  reference's ``max_model_len 2048`` cap on prompt + completion (§7.24).
* **Saving**: resumable checkpoints every ``save_steps`` (default 10, the last 2 kept; the reference saved steps 10, 30
  and the end only when asked) and the adapter (PEFT methods) or a dense folder (``full``, ``svd``) at the end instead
  of a merged checkpoint (``fura merge`` makes one).
* **Seeding**: ``transformers.set_seed`` (Python, NumPy, torch) instead of ``random.seed`` + ``torch.manual_seed``.

Run folder (:mod:`fura.recipes.runs`): ``config.yaml``, ``method.json``, ``metrics.jsonl`` (per step: loss, reward,
reward_std, ``rewards/<function>/mean``, ``completions/mean_length``, lr, grad_norm, ...; ``held_out_accuracy`` lines),
``loss.png``, ``rewards.png``, ``train.log``, ``checkpoints/``, ``adapter/`` or ``model/``, ``data/held_out.jsonl``,
``eval/math/`` (predictions and summaries) and ``results.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from fura.integrations import distributed
from fura.recipes import artifacts, runs
from fura.recipes.cli_args import add_config_flag, add_run_arguments, config_overrides
from fura.recipes.config import MIXED_PRECISION, build_config, config_to_dict, dump_yaml
from fura.recipes.data.formats import load_rows
from fura.recipes.data.math_problems import (
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
    METHODS,
    TRACKS,
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
from fura.recipes.sft import (
    checkpointing_args,
    load_tokenizer,
    mixed_precision_flags,
    prepare_initial_adapter,
)

logger = logging.getLogger(__name__)

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo")
SCALE_REWARDS = ("none", "group", "batch")
#: New-token budget of the MATH-500 / AIME / AMC protocols (reference ``--math-verify-max-tokens``).
PROTOCOL_MAX_NEW_TOKENS = 2048

#: Settings that must not change when a run is resumed (the policy, the problems or the batches would differ).
RESUME_INVARIANTS = (
    "model",
    "method",
    "track",
    "method_args",
    "dtype",
    "data",
    "reward",
    "training.seed",
    "training.prompts_per_step",
    "training.num_generations",
    "training.per_device_train_batch_size",
)


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class GRPOTrainingConfig:
    """Rollouts, the policy-gradient objective, optimisation and checkpointing (``trl.GRPOConfig`` underneath).

    Attributes:
        learning_rate: learning rate; None = the method's ``rl`` value (9e-5 for PEFT-style methods, 1e-5 ``full``).
        max_steps: GRPO steps; each is one batch of rollouts and one optimizer step (reference: 50).
        prompts_per_step: problems per GRPO step (reference ``--n-prompts-per-step``: 32).
        num_generations: completions per problem, the group of the baseline (reference ``--group-size``: 8).
        per_device_train_batch_size: completions per forward/backward micro-batch; None = the method's ``rl`` value
            (2, ``full``: 4). Must divide ``prompts_per_step × num_generations``.
        gradient_accumulation_steps: derived, ``prompts_per_step × num_generations / per_device_train_batch_size``, so
            that one GRPO step is one optimizer step; leave None (a value that disagrees is an error).
        max_completion_length: new-token budget of a rollout (reference: 1024).
        temperature: sampling temperature of the rollouts (reference: 1.0).
        top_p: nucleus mass of the rollouts (reference: 1.0 = off).
        beta: KL coefficient against the initial policy (reference: 0 = no KL and no reference model).
        loss_type: TRL's token aggregation: ``grpo`` (per-sequence mean, then mean over sequences — the reference),
            ``dapo``, ``dr_grpo``, ``bnpo``, ``cispo`` or ``sapo``.
        scale_rewards: advantage scaling: ``none`` (``r − group mean``, the reference), ``group`` (÷ group std,
            GRPO paper) or ``batch``.
        num_iterations: optimisation passes per batch of rollouts (reference: 1, i.e. on-policy, ratio ≡ 1).
        epsilon: PPO clip range (inactive with ``num_iterations`` 1).
        mask_truncated_completions: drop completions cut at ``max_completion_length`` from the loss (reference: no).
        lr_scheduler_type: a ``transformers`` scheduler name (reference: ``constant``).
        warmup_ratio: linear warm-up as a fraction of the steps (reference: 0; used by ``*_with_warmup``/``linear``/
            ``cosine`` schedules).
        weight_decay: AdamW weight decay (reference: 0).
        adam_beta1: AdamW β1 (torch default 0.9, as the reference).
        adam_beta2: AdamW β2 (torch default 0.999, as the reference).
        adam_epsilon: AdamW ε (1e-8).
        max_grad_norm: clip the global gradient norm (reference: 1.0; 0 = off).
        optim: a ``transformers`` optimizer name; None = the method's default (``adamw_torch``).
        gradient_checkpointing: recompute activations in the backward pass; None = the method's default (off, as the
            reference; on for the 4-bit methods).
        mixed_precision: ``auto`` (bf16 autocast on a GPU that supports it, none on CPU), ``bf16``, ``fp16``, ``no``.
        seed: seed of the adapter init, the prompt order and the sampling (reference: 42).
        logging_steps: write a metrics line every this many steps.
        save_steps: save a resumable checkpoint every this many steps.
        save_total_limit: keep at most this many checkpoints (None = all).
        use_vllm: generate the rollouts with vLLM (TRL's ``use_vllm``; needs a GPU and the ``vllm`` package).
        vllm_mode: ``colocate`` (in-process, the reference's setup) or ``server`` (a ``trl vllm-serve`` process).
        vllm_gpu_memory_utilization: GPU memory share of colocated vLLM (reference: 0.4).
        vllm_max_model_length: vLLM context length (reference ``--max-model-len``: 2048).
        log_completions: let TRL print a sample of prompts / completions / rewards at every logging step.
    """

    learning_rate: float | None = None
    max_steps: int = 50
    prompts_per_step: int = 32
    num_generations: int = 8
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    max_completion_length: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    loss_type: str = "grpo"
    scale_rewards: str = "none"
    num_iterations: int = 1
    epsilon: float = 0.2
    mask_truncated_completions: bool = False
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optim: str | None = None
    gradient_checkpointing: bool | None = None
    mixed_precision: str = "auto"
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 10
    save_total_limit: int | None = 2
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_gpu_memory_utilization: float = 0.4
    vllm_max_model_length: int | None = 2048
    log_completions: bool = False

    @property
    def rollouts_per_step(self) -> int:
        """Completions generated (and trained on) per GRPO step."""
        return self.prompts_per_step * self.num_generations


@dataclass
class RewardConfig:
    """The reward: a weighted sum of reward functions (:mod:`fura.recipes.rewards`).

    Attributes:
        accuracy_weight: weight of the math-verify correctness reward (1/0 on the last ``\\boxed{}``; reference: 1).
        format_weight: weight of the format reward (1 for a closed non-empty ``\\boxed{}``); 0 = off (reference).
    """

    accuracy_weight: float = 1.0
    format_weight: float = 0.0


@dataclass
class GRPOEvalConfig:
    """Evaluation of the policy during and after training (:func:`fura.recipes.eval.evaluate_math`, greedy).

    Attributes:
        held_out: score the held-out problems after training (math-verify grading, the training prompt).
        held_out_steps: also score them every this many steps and before the first (None = off; reference: 5).
        data: GSM8K-format files (``instruction``/``question``/``problem`` + numeric ``answer``, e.g.
            ``../shared/data/math/test/gsm8k.json``), graded numerically after training.
        protocols: ``{protocol: file}`` for the reference's post-training benchmarks (``MATH-500``, ``AIME-24``,
            ``AIME-25``, ``AMC23``: their sampling settings, math-verify grading); a None file = the Hub id (online).
        max_examples: evaluate at most the first N problems of each set (held-out set included; None = all).
        batch_size: prompts per ``generate`` call (64: 1,000 held-out problems × 1,024 tokens is 16 calls).
        max_new_tokens: new-token budget; None = ``training.max_completion_length`` (held-out set, data files) and
            2,048 for the protocols (the reference's ``--math-verify-max-tokens``).
    """

    held_out: bool = True
    held_out_steps: int | None = None
    data: list[str] = field(default_factory=list)
    protocols: dict[str, str | None] = field(default_factory=dict)
    max_examples: int | None = None
    batch_size: int = 64
    max_new_tokens: int | None = None


@dataclass
class GRPORunConfig:
    """One GRPO math RL run (``fura train grpo``).

    Attributes:
        model: base model: a local Hugging Face folder, a Hub id (online only) or the alias ``smollm2``.
        method: a key of :data:`fura.recipes.methods.METHODS` (``fura``, ``lora``, ``full``, ``svd``, ...).
        track: whose reference defaults the method uses (default ``rl``: reference-spec §4.2).
        method_args: method arguments overriding the track defaults (PEFT config fields such as ``r``).
        dtype: storage dtype of the base model: ``auto`` (bf16 on a GPU that supports it, else float32), ``float32``,
            ``bfloat16`` or ``float16``.
        output_dir: the run folder; None = ``runs/<model name>-grpo-<method>``.
        trust_remote_code: allow model code from the model folder / Hub.
        data: the problems and the prompt (:class:`fura.recipes.data.math_problems.MathProblemsConfig`).
        training: rollouts, objective and optimisation (:class:`GRPOTrainingConfig`).
        reward: the reward functions and their weights (:class:`RewardConfig`).
        eval: evaluation during and after training (:class:`GRPOEvalConfig`).
    """

    model: str = "smollm2"
    method: str = "fura"
    track: str = "rl"
    method_args: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    output_dir: str | None = None
    trust_remote_code: bool = False
    data: MathProblemsConfig = field(default_factory=MathProblemsConfig)
    training: GRPOTrainingConfig = field(default_factory=GRPOTrainingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: GRPOEvalConfig = field(default_factory=GRPOEvalConfig)

    def validate(self) -> None:
        """Raise ``ValueError`` with a fix for any inconsistent setting."""
        from fura.recipes.eval.math import MATH_PROTOCOLS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.track not in TRACKS:
            raise ValueError(f"unknown track {self.track!r}; use one of {', '.join(TRACKS)}")
        self.data.validate()
        _validate_training(self.training)
        if self.training.use_vllm:
            _validate_vllm(self.method)
        if isinstance(self.eval.data, str):
            self.eval.data = [self.eval.data]
        unknown = sorted(set(self.eval.protocols) - set(MATH_PROTOCOLS))
        if unknown:
            raise ValueError(f"unknown evaluation protocol(s) {unknown}; use {', '.join(MATH_PROTOCOLS)}")
        if self.eval.held_out_steps is not None and self.eval.held_out_steps < 1:
            raise ValueError("eval.held_out_steps must be >= 1 (or None for no in-loop evaluation)")

    def run_dir(self) -> Path:
        """``output_dir``, or ``runs/<model folder name>-grpo-<method>`` when unset."""
        if self.output_dir:
            return Path(self.output_dir)
        return Path("runs") / f"{Path(str(self.model)).name}-grpo-{self.method}"


def _validate_training(training: GRPOTrainingConfig) -> None:
    if training.num_generations < 2:
        raise ValueError("training.num_generations must be >= 2: the baseline is the mean of each group")
    if training.prompts_per_step < 1 or training.max_steps < 1:
        raise ValueError("training.prompts_per_step and training.max_steps must be >= 1")
    if training.loss_type not in LOSS_TYPES:
        raise ValueError(f"training.loss_type must be one of {LOSS_TYPES}, got {training.loss_type!r}")
    if training.scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"training.scale_rewards must be one of {SCALE_REWARDS}, got {training.scale_rewards!r}")
    if training.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"training.mixed_precision must be one of {MIXED_PRECISION}")


def _validate_vllm(method: str) -> None:
    if get_method(method).kind in ("svd", "qfura-nf4"):
        raise ValueError(
            f"--use-vllm cannot serve method {method!r}: its explicit factored layers have no dense weight for vLLM "
            "to load. Fix: generate with transformers (drop --use-vllm), or use a PEFT method (fura, lora, ...)."
        )
    if not (torch.cuda.is_available() and importlib.util.find_spec("vllm")):
        raise ValueError("--use-vllm needs a CUDA GPU and the vllm package; leave it off to generate with transformers")


# ----------------------------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------------------------


def resolve_config(config: GRPORunConfig) -> GRPORunConfig:
    """A validated copy with the method's track defaults where the user left ``None``, the derived gradient
    accumulation and a run folder."""
    resolved = copy.deepcopy(config)
    resolved.validate()
    training = resolved.training
    defaults = get_method(resolved.method).defaults(resolved.track).training
    fallbacks = {
        "learning_rate": 9e-5,
        "per_device_train_batch_size": 2,
        "optim": "adamw_torch",
        "gradient_checkpointing": False,
    }
    for key, fallback in fallbacks.items():
        if getattr(training, key) is None:
            setattr(training, key, defaults.get(key, fallback))
    training.gradient_accumulation_steps = _accumulation(training)
    resolved.output_dir = str(resolved.run_dir())
    return resolved


def _accumulation(training: GRPOTrainingConfig) -> int:
    """Micro-batches per optimizer step such that one optimizer step consumes exactly one GRPO step's rollouts."""
    micro = training.per_device_train_batch_size
    rollouts = training.rollouts_per_step
    if micro is None or micro < 1 or rollouts % micro:
        raise ValueError(
            f"training.per_device_train_batch_size ({micro}) must divide prompts_per_step × num_generations "
            f"({training.prompts_per_step} × {training.num_generations} = {rollouts})"
        )
    derived = rollouts // micro
    given = training.gradient_accumulation_steps
    if given is not None and given != derived:
        raise ValueError(
            f"training.gradient_accumulation_steps={given} disagrees with {rollouts} rollouts per step / micro-batch "
            f"{micro} = {derived}; leave it unset (it is derived so that one GRPO step is one optimizer step)"
        )
    return derived


def grpo_arguments(config: GRPORunConfig, run: RunFolder, reward_weights: Sequence[float]) -> Any:
    """The ``trl.GRPOConfig`` of a resolved run; checkpoints go to ``<run>/checkpoints``."""
    from trl import GRPOConfig

    t = config.training
    return GRPOConfig(
        output_dir=str(run.checkpoints_dir),
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_generations=t.num_generations,
        max_completion_length=t.max_completion_length,
        temperature=t.temperature,
        top_p=t.top_p,
        beta=t.beta,
        loss_type=t.loss_type,
        scale_rewards=t.scale_rewards,
        num_iterations=t.num_iterations,
        epsilon=t.epsilon,
        mask_truncated_completions=t.mask_truncated_completions,
        reward_weights=list(reward_weights),
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=distributed.use_cpu_backend(),  # several CPU processes: DDP over gloo, not N separate runs
        use_vllm=t.use_vllm,
        vllm_mode=t.vllm_mode,
        vllm_gpu_memory_utilization=t.vllm_gpu_memory_utilization,
        vllm_max_model_length=t.vllm_max_model_length,
        log_completions=t.log_completions,
        **mixed_precision_flags(t),  # type: ignore[arg-type]  # reads only .mixed_precision
        **checkpointing_args(GRPOConfig, bool(t.gradient_checkpointing)),
    )


def check_resume_compatible(run: RunFolder, resolved: GRPORunConfig) -> None:
    """Refuse to resume with settings that change the policy or the problems (:data:`RESUME_INVARIANTS`)."""
    consequence = "the same policy on the same problems"
    runs.check_resume_compatible(run, config_to_dict(resolved), RESUME_INVARIANTS, consequence)


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


def load_policy(config: GRPORunConfig) -> Policy:
    """The base model + PEFT config (PEFT methods), or the model built by the method registry (the others)."""
    if not uses_peft_config(config.method):
        model, info = load_model_for_method(
            config.method, config.model, config.dtype, config.track, config.method_args, config.trust_remote_code
        )
        return Policy(model, None, info)
    from transformers import AutoModelForCausalLM

    spec = get_method(config.method)
    peft_config = spec.peft_config_cls(task_type="CAUSAL_LM", **spec.resolve_args(config.track, config.method_args))
    path = resolve_model_path(config.model)
    logger.info("loading %s; TRL applies %s via peft_config", path, type(peft_config).__name__)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(config.dtype), trust_remote_code=config.trust_remote_code
    )
    return Policy(model, peft_config)


def method_info(model: Any, config: GRPORunConfig) -> MethodInfo:
    """The :class:`MethodInfo` of a model TRL wrapped with ``peft_config`` (counts taken after wrapping)."""
    spec = get_method(config.method)
    trainable, total = count_parameters(model)
    return MethodInfo(
        method=config.method,
        track=config.track,
        kind=spec.kind,
        trainable_params=trainable,
        total_params=total,
        method_args=jsonable(spec.resolve_args(config.track, config.method_args)),
        training_defaults=dict(spec.defaults(config.track).training),
        save_format=spec.save_format,
        quantized=False,
    )


def reward_functions(reward: RewardConfig, extra: Sequence[Callable[..., list[float]]] = ()) -> tuple[list, list]:
    """``(functions, weights)``: the accuracy reward (always logged), the format reward if weighted, then ``extra``
    functions (weight 1 each)."""
    functions: list[Callable[..., list[float]]] = [accuracy_reward]
    weights = [reward.accuracy_weight]
    if reward.format_weight:
        functions.append(format_reward)
        weights.append(reward.format_weight)
    functions.extend(extra)
    weights.extend([1.0] * len(extra))
    return functions, weights


def load_grpo_tokenizer(config: GRPORunConfig) -> Any:
    """The model's tokenizer, with the chat template of ``data.chat_template`` when one is given."""
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    if config.data.chat_template:
        tokenizer.chat_template = Path(config.data.chat_template).read_text(encoding="utf-8")
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

    return GRPOTrainer(
        model=policy.model,
        reward_funcs=list(rewards),
        args=args,
        train_dataset=Dataset.from_list(list(rows)),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=policy.peft_config,
    )


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def _question_field(path: str) -> str | None:
    """The question field of a local file's first row (None for Hub ids: the protocol's own field)."""
    if not Path(path).exists():
        return None
    rows = load_rows(path)
    return next((name for name in QUESTION_FIELDS if rows and name in rows[0]), None)


def held_out_eval_config(config: GRPORunConfig, path: Path, style: str, output: Path | None) -> Any:
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
        max_new_tokens=config.eval.max_new_tokens or config.training.max_completion_length,
        batch_size=config.eval.batch_size,
        max_examples=config.eval.max_examples,
        output_dir=None if output is None else str(output),
    )


def data_eval_config(config: GRPORunConfig, path: str, style: str, output: Path) -> Any:
    """Numeric accuracy on a GSM8K-format file, with the training prompt."""
    from fura.recipes.eval.math import MathEvalConfig

    return MathEvalConfig(
        data_path=path,
        grader="numeric",
        question_field=_question_field(path) or "instruction",
        answer_field="answer",
        question_template=BOXED_MATH_INSTRUCTION,
        prompt_style=style,
        max_new_tokens=config.eval.max_new_tokens or config.training.max_completion_length,
        batch_size=config.eval.batch_size,
        max_examples=config.eval.max_examples,
        output_dir=str(output),
    )


def protocol_eval_config(config: GRPORunConfig, protocol: str, path: str | None, style: str, output: Path) -> Any:
    """A MATH-500 / AIME / AMC protocol (its sampling settings, math-verify) on a local file or the Hub id."""
    from fura.recipes.eval.math import MathEvalConfig

    overrides: dict[str, Any] = {
        "prompt_style": style,
        "batch_size": config.eval.batch_size,
        "max_new_tokens": config.eval.max_new_tokens or PROTOCOL_MAX_NEW_TOKENS,
        "max_examples": config.eval.max_examples,
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
    model: Any, tokenizer: Any, config: GRPORunConfig, run: RunFolder, style: str, held_out: Path | None, step: int
) -> dict[str, Any]:
    """Held-out accuracy (also logged to ``metrics.jsonl``), then the data files and protocols of ``config.eval``."""
    from fura.recipes.eval.math import evaluate_math

    out = run.eval_dir / "math"
    results: dict[str, Any] = {}
    if config.eval.held_out and held_out is not None:
        result = evaluate_math(model, tokenizer, held_out_eval_config(config, held_out, style, out))
        run.metrics.append(_held_out_record(step, result))
        results["held_out"] = _summary(result)
    for path in config.eval.data:
        result = evaluate_math(model, tokenizer, data_eval_config(config, path, style, out))
        results[result.name] = _summary(result)
    for protocol, path in config.eval.protocols.items():
        result = evaluate_math(model, tokenizer, protocol_eval_config(config, protocol, path, style, out))
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


def in_loop_evaluator(config: GRPORunConfig, run: RunFolder, tokenizer: Any, style: str, held_out: Path) -> Callable:
    """``(model, step) -> accuracy``: greedy held-out accuracy, appended to ``metrics.jsonl`` (no predictions file)."""
    from fura.recipes.eval.math import evaluate_math

    def evaluate(model: Any, step: int) -> float:
        result = evaluate_math(model, tokenizer, held_out_eval_config(config, held_out, style, None))
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
    """

    run_dir: Path
    method: MethodInfo
    global_step: int
    train_loss: float | None
    reward: float | None
    artifact: Path
    evaluation: dict[str, Any]


def run_grpo(
    config: GRPORunConfig,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
    extra_rewards: Sequence[Callable[..., list[float]]] = (),
) -> GRPOResult:
    """Train (or resume) one GRPO run and write its run folder; see the module docstring.

    Args:
        config: the run's settings (method defaults fill the ``None`` fields).
        resume: continue from the last complete checkpoint in the run folder.
        overwrite: delete a previous run in the run folder first.
        callbacks: extra ``transformers`` callbacks (called after the run's own).
        extra_rewards: more TRL reward functions (weight 1 each), added after the configured ones.
    """
    resolved = resolve_config(config)
    run = RunFolder(Path(resolved.output_dir))
    checkpoint = runs.prepare_run_folder(run, resume=resume, overwrite=overwrite)
    with runs.main_process_log(run.log_path):
        tokenizer = load_grpo_tokenizer(resolved)
        resolved.data.prompt_style = resolve_prompt_style(resolved.data.prompt_style, tokenizer)
        if distributed.is_main_process():
            if checkpoint is not None:
                check_resume_compatible(run, resolved)
            run.write_config(dump_yaml(config_to_dict(resolved)))
        logger.info("run folder %s (%s)", run.root, f"resuming from {checkpoint.name}" if checkpoint else "new run")
        from transformers import set_seed

        set_seed(resolved.training.seed)
        problems = build_problem_sets(resolved.data)
        held_out = None
        if problems.held_out:
            held_out = run.root / "data" / "held_out.jsonl"
            if distributed.is_main_process():
                write_problems(problems.held_out, held_out)
        logger.info(
            "%s: %d training, %d held-out problems", problems.source, len(problems.train), len(problems.held_out)
        )
        return _train_and_finish(resolved, run, tokenizer, problems, held_out, checkpoint, callbacks, extra_rewards)


def _train_and_finish(
    resolved: GRPORunConfig,
    run: RunFolder,
    tokenizer: Any,
    problems: ProblemSets,
    held_out: Path | None,
    checkpoint: Path | None,
    callbacks: Sequence[Any],
    extra_rewards: Sequence[Callable[..., list[float]]],
) -> GRPOResult:
    from fura.recipes.callbacks import RunFolderCallback

    style = resolved.data.prompt_style
    rewards, weights = reward_functions(resolved.reward, extra_rewards)
    policy = load_policy(resolved)
    title = f"GRPO {resolved.method} on {Path(str(resolved.model)).name}"
    evaluate = in_loop_evaluator(resolved, run, tokenizer, style, held_out) if held_out else None
    progress = GRPORunCallback(run, title, evaluate, resolved.eval.held_out_steps, plot_at_end=False)
    trainer = build_trainer(
        policy,
        tokenizer,
        grpo_rows(problems.train, style, tokenizer),
        grpo_arguments(resolved, run, weights),
        rewards,
        [RunFolderCallback(run, title, plot_at_end=False), progress, *callbacks],
    )
    distributed.configure_trainer_for_fsdp(trainer)
    info = policy.info or method_info(trainer.model, resolved)
    logger.info("%s", info.summary())
    main = distributed.is_main_process()
    if main:
        route = "peft_config" if policy.peft_config else "registry"
        run.write_json(run.method_path, {**info.to_dict(), "route": route})
    initial_adapter = prepare_initial_adapter(trainer.model, info, run)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    folder = run.adapter_dir if info.save_format == "adapter" else run.model_dir
    artifact = artifacts.save_trained_model_distributed(trainer, info, folder, tokenizer, initial_adapter)
    evaluation: dict[str, Any] = {}
    if main:
        evaluation = evaluate_after_training(
            trainer.model, tokenizer, resolved, run, style, held_out, output.global_step
        )
        run.plot(title)  # after the final evaluation, so that the plots show it
        progress.plot()
    result = GRPOResult(
        run.root, info, output.global_step, output.training_loss, _last_reward(run), artifact, evaluation
    )
    if main:
        run.write_json(run.results_path, _results_payload(result, output.metrics, problems, style, tokenizer))
    logger.info("done: %d steps, artifact %s", result.global_step, artifact)
    return result


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fura train grpo`` (each overrides the matching YAML setting)."""
    parser.epilog = (
        "Example: fura train grpo --model Qwen/Qwen3-1.7B --method fura -o runs/qwen3-grpo-fura "
        "--eval-data ../shared/data/math/test/gsm8k.json. Tiny CPU smoke run: --model smollm2 --max-steps 2 "
        "--prompts-per-step 2 --num-generations 2 --max-completion-length 16 --held-out-size 4. "
        "Resume a killed run with the same command plus --resume."
    )
    add_run_arguments(parser, default_track="rl")
    _add_data_flags(parser.add_argument_group("data"))
    _add_rollout_flags(parser.add_argument_group("rollouts and objective"))
    _add_optimisation_flags(parser.add_argument_group("optimisation and checkpoints"))
    _add_eval_flags(parser.add_argument_group("evaluation"))


def _add_data_flags(group: Any) -> None:
    add_config_flag(
        group,
        "--dataset",
        key="data.dataset",
        metavar="NAME|FILE|HUB_ID",
        help="reasoning-gym dataset (default gsm_symbolic), a JSON/JSONL file with problem/answer fields, or a Hub "
        "id when online (e.g. qwedsacf/competition_math)",
    )
    add_config_flag(group, "--train-size", key="data.train_size", type=int, help="training problems (default 7500)")
    add_config_flag(
        group, "--held-out-size", key="data.held_out_size", type=int, help="held-out problems (default 1000)"
    )
    add_config_flag(
        group,
        "--held-out-data",
        key="data.held_out_dataset",
        metavar="FILE|HUB_ID",
        help="separate held-out problems (default: split off --dataset)",
    )
    add_config_flag(group, "--split", key="data.split", help="Hub split of --dataset (default train)")
    add_config_flag(group, "--question-field", key="data.question_field", help="default: problem/question/instruction")
    add_config_flag(group, "--answer-field", key="data.answer_field", help="default: answer, else boxed solution")
    add_config_flag(
        group,
        "--prompt-style",
        key="data.prompt_style",
        choices=["auto", "chat", "fura"],
        help="auto (default): the chat template when the tokenizer has one, else the fura text template",
    )
    add_config_flag(
        group,
        "--chat-template",
        key="data.chat_template",
        metavar="FILE",
        help="Jinja chat template replacing the tokenizer's (training and evaluation)",
    )


def _add_rollout_flags(group: Any) -> None:
    add_config_flag(group, "--max-steps", key="training.max_steps", type=int, help="GRPO steps (default 50)")
    add_config_flag(group, "--prompts-per-step", key="training.prompts_per_step", type=int, help="default 32")
    add_config_flag(
        group,
        "--num-generations",
        "--group-size",
        key="training.num_generations",
        type=int,
        help="completions per problem (default 8)",
    )
    add_config_flag(
        group,
        "--max-completion-length",
        key="training.max_completion_length",
        type=int,
        help="new tokens per rollout (default 1024)",
    )
    add_config_flag(group, "--temperature", key="training.temperature", type=float, help="default 1.0")
    add_config_flag(group, "--top-p", key="training.top_p", type=float, help="default 1.0")
    add_config_flag(group, "--beta", key="training.beta", type=float, help="KL coefficient (default 0: no KL)")
    add_config_flag(
        group,
        "--loss-type",
        key="training.loss_type",
        choices=list(LOSS_TYPES),
        help="token aggregation (default grpo: the reference's per-sequence mean)",
    )
    add_config_flag(
        group,
        "--scale-rewards",
        key="training.scale_rewards",
        choices=list(SCALE_REWARDS),
        help="advantage scaling (default none: reward minus group mean, the reference)",
    )
    add_config_flag(
        group,
        "--num-iterations",
        key="training.num_iterations",
        type=int,
        help="passes per rollout batch (default 1: on-policy)",
    )
    add_config_flag(group, "--epsilon", key="training.epsilon", type=float, help="PPO clip range (default 0.2)")
    add_config_flag(
        group,
        "--mask-truncated-completions",
        key="training.mask_truncated_completions",
        action=argparse.BooleanOptionalAction,
        help="drop truncated rollouts from the loss (default off)",
    )
    add_config_flag(
        group,
        "--format-reward-weight",
        key="reward.format_weight",
        type=float,
        help="weight of the \\boxed{} format reward (default 0 = off)",
    )
    add_config_flag(
        group,
        "--use-vllm",
        key="training.use_vllm",
        action=argparse.BooleanOptionalAction,
        help="generate with vLLM (GPU + vllm package; default off)",
    )
    add_config_flag(
        group, "--vllm-mode", key="training.vllm_mode", choices=["colocate", "server"], help="default colocate"
    )
    add_config_flag(
        group,
        "--vllm-gpu-memory-utilization",
        key="training.vllm_gpu_memory_utilization",
        type=float,
        help="default 0.4",
    )
    add_config_flag(
        group,
        "--log-completions",
        key="training.log_completions",
        action=argparse.BooleanOptionalAction,
        help="print sample completions at each log (default off)",
    )


def _add_optimisation_flags(group: Any) -> None:
    add_config_flag(
        group,
        "--learning-rate",
        "--lr",
        key="training.learning_rate",
        type=float,
        help="default: the method's rl value (9e-5 PEFT-style, 1e-5 full)",
    )
    add_config_flag(
        group,
        "--batch-size",
        key="training.per_device_train_batch_size",
        type=int,
        help="completions per micro-batch (default: the method's rl value, 2 or 4); gradient "
        "accumulation = rollouts per step / batch size",
    )
    add_config_flag(group, "--lr-scheduler", key="training.lr_scheduler_type", help="default constant")
    add_config_flag(group, "--warmup-ratio", key="training.warmup_ratio", type=float, help="default 0")
    add_config_flag(group, "--weight-decay", key="training.weight_decay", type=float, help="default 0")
    add_config_flag(group, "--max-grad-norm", key="training.max_grad_norm", type=float, help="default 1.0")
    add_config_flag(group, "--optim", key="training.optim", help="transformers optimizer (default adamw_torch)")
    add_config_flag(
        group,
        "--gradient-checkpointing",
        key="training.gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        help="default off (on for 4-bit methods)",
    )
    add_config_flag(
        group,
        "--mixed-precision",
        key="training.mixed_precision",
        choices=list(MIXED_PRECISION),
        help="autocast (default auto: bf16 on a GPU that supports it)",
    )
    add_config_flag(group, "--seed", key="seed", type=int, help="seed of init, problems, order, sampling (default 42)")
    add_config_flag(group, "--logging-steps", key="training.logging_steps", type=int, help="default 1")
    add_config_flag(group, "--save-steps", key="training.save_steps", type=int, help="checkpoint period (default 10)")
    add_config_flag(group, "--save-total-limit", key="training.save_total_limit", type=int, help="default 2")


def _add_eval_flags(group: Any) -> None:
    add_config_flag(
        group,
        "--held-out-eval",
        key="eval.held_out",
        action=argparse.BooleanOptionalAction,
        help="held-out accuracy after training (default on)",
    )
    add_config_flag(
        group,
        "--held-out-eval-steps",
        key="eval.held_out_steps",
        type=int,
        help="also every N steps and before the first (default off; reference 5)",
    )
    add_config_flag(
        group,
        "--eval-data",
        key="eval.data",
        nargs="+",
        metavar="FILE",
        help="GSM8K-format files graded numerically after training",
    )
    add_config_flag(
        group,
        "--eval-protocol",
        key="eval.protocols",
        action="append",
        metavar="NAME[=FILE]",
        help="MATH-500, AIME-24, AIME-25 or AMC23 on a local file (or the Hub id online); repeatable",
    )
    add_config_flag(group, "--eval-max-examples", key="eval.max_examples", type=int, help="problems per set")
    add_config_flag(group, "--eval-batch-size", key="eval.batch_size", type=int, help="default 64")
    add_config_flag(
        group,
        "--eval-max-new-tokens",
        key="eval.max_new_tokens",
        type=int,
        help="default: --max-completion-length (2048 for protocols)",
    )


def parse_protocols(values: Sequence[str]) -> dict[str, str | None]:
    """``["MATH-500=math500.jsonl", "AIME-24"]`` → ``{"MATH-500": "math500.jsonl", "AIME-24": None}``."""
    protocols: dict[str, str | None] = {}
    for value in values:
        name, sep, path = value.partition("=")
        protocols[name.strip()] = path.strip() if sep and path.strip() else None
    return protocols


def config_from_args(args: argparse.Namespace) -> GRPORunConfig:
    """Defaults < ``--config`` YAML < flags."""
    overrides = config_overrides(args)
    seed = overrides.pop("seed", None)
    if seed is not None:
        overrides["training.seed"] = overrides["data.seed"] = seed
    if "eval.protocols" in overrides:
        overrides["eval.protocols"] = parse_protocols(overrides["eval.protocols"])
    return build_config(GRPORunConfig, getattr(args, "config", None), overrides)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``fura train grpo``; returns the exit status."""
    config = config_from_args(args)
    if getattr(args, "print_config", False):
        print(dump_yaml(config_to_dict(resolve_config(config))), end="")
        return 0
    result = run_grpo(config, resume=args.resume, overwrite=args.overwrite)
    print(result.method.summary())
    reward = "n/a" if result.reward is None else f"{result.reward:.3f}"
    print(
        f"trained {result.global_step} GRPO steps (last reward {reward}); run folder: {result.run_dir}; "
        f"saved: {result.artifact}"
    )
    for name, summary in result.evaluation.items():
        print(f"{name}: accuracy {100 * summary['accuracy']:.1f}% ({summary['correct']}/{summary['total']})")
    return 0
