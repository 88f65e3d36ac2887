"""LLaVA-style visual instruction tuning (``fura train vlm``): FuRA / LoRA / DoRA / full on the language model.

Pipeline (the structure of :mod:`fura.recipes.sft`): resolve the config (YAML < flags, the method's ``vlm`` track
defaults) → prepare the run folder (new, or resume from its last complete checkpoint) → load a transformers
``LlavaForConditionalGeneration`` and its processor → apply the method to the **language model only** → LLaVA-format
data (:mod:`fura.recipes.data.llava`) → :class:`VLMTrainer` (a ``transformers.Trainer`` whose optimizer gives the
multi-modal projector its own learning rate) → save the adapter + projector (or the dense model) and the processor.

What trains (reference-spec §4.3):

* ``fura`` / ``lora`` / ``dora``: PEFT adapters on the language model's linear layers. The targets are a regex
  scoped to ``...language_model.`` so that the vision tower (whose CLIP layers are also called ``q_proj``...) and
  the projector are never adapted: FuRA targets the seven projections, LoRA its track's list (five projections),
  and ``all-linear`` (DoRA's ``vlm`` default) means every ``nn.Linear`` of the language model, as the reference's
  ``find_all_linear_names`` (no ``lm_head``, vision tower or projector). FuRA uses the ``vlm`` track's
  ``factorize_by_head=False`` and ``bias="none"`` (§7.27). After injection :func:`check_vlm_trainability` refuses
  any adapted module outside the language model.
* the multi-modal projector trains fully, at ``training.mm_projector_lr`` (reference 2e-5), through PEFT's
  ``modules_to_save``: its trained copy is stored in the adapter file, so ``PeftModel.from_pretrained(base,
  adapter)`` restores it; it is also written alone as ``mm_projector.safetensors``. The copy trains in float32
  over a bf16 base (as the adapter weights; the reference had DeepSpeed's fp32 master weights).
* ``full``: every language-model parameter (embeddings, norms, ``lm_head`` too) and the projector train, in the
  storage dtype as ``fura train sft``'s full fine-tuning (no fp32 master copy: use ``--dtype float32
  --mixed-precision bf16`` for one).
* always frozen: the vision tower; for PEFT methods the language model's base weights, embeddings, norms, lm_head.

Run folder: as :mod:`fura.recipes.runs` (``config.yaml``, ``method.json``, ``metrics.jsonl``, ``loss.png``,
``train.log``, ``checkpoints/``, ``results.json``), with ``adapter/`` (PEFT adapter with the projector +
``mm_projector.safetensors`` + processor) or ``model/`` (dense LLaVA folder + ``mm_projector.safetensors`` +
processor). Reload: :func:`load_vlm` (or ``PeftModel.from_pretrained(LlavaForConditionalGeneration
.from_pretrained(base), "<run>/adapter")``); dense: :func:`merge_vlm`.

Reference defaults kept (§4.3): 1 epoch, per-device batch 4 × gradient accumulation 8 (× the number of processes;
the reference's 8 GPUs give 256), lr 2e-4, projector lr 2e-5, weight decay 0, warm-up 3 %, cosine schedule,
``model_max_length`` 2048, gradient checkpointing, checkpoints every 1000 steps (2 kept), 4 data-loader workers,
logging every step, bf16 (``dtype``/``mixed_precision`` ``auto`` on a GPU), the vicuna_v1 conversation template,
``image_aspect_ratio pad``. Values the reference inherits from the ``transformers`` Trainer of its time are kept as
such: AdamW β = (0.9, 0.999), ε 1e-8, gradient clipping at norm 1.0, seed 42.

Deliberate differences from the reference:

* **Environment.** Current torch / transformers / PEFT instead of the pinned torch 2.0.1, transformers 4.31,
  DeepSpeed 0.9.5 and the vendored DoRA-fork PEFT. No DeepSpeed ZeRO-2 (FuRA) / ZeRO-3 (DoRA): this pipeline is
  single-process (the run folder is written without rank-0 guards, so do not launch it with ``torchrun`` yet).
  No flash-attn monkey patch: the model's ``attn_implementation`` (``sdpa`` by default). No tf32 switch (set
  ``torch.backends.cuda.matmul.allow_tf32`` yourself), no W&B (``metrics.jsonl`` + ``loss.png``).
* **The base is a transformers LLaVA folder.** The reference assembles its model on the fly from
  ``lmsys/vicuna-7b-v1.5`` + ``openai/clip-vit-large-patch14-336`` + the stage-1 projector (``--pretrain_mm_mlp_adapter
  mm_projector.bin``, ``mlp2x_gelu``, select layer −2, no im_start/end tokens). Here ``--model`` must be a
  ``LlavaForConditionalGeneration`` folder with its processor; to reproduce the paper, convert the stage-1 result
  (vicuna + CLIP + pretrained projector) with transformers' ``convert_llava_weights_to_hf.py`` -- note that
  ``llava-hf/llava-1.5-7b-hf`` is already instruction-tuned (stage 2 done).
* **FuRA is a PEFT adapter** (implicit form ``W0·blockdiag(T)``, base weights untouched, R and S train) and the
  result is saved as an adapter + projector, where the reference converts to explicit BTT layers and saves a dense
  merged ``LlavaLlamaForCausalLM``. ``merge_vlm(load_vlm(run)[0])`` gives the dense model (``fura merge`` loads
  causal LMs only).
* **DoRA is PEFT's** ``use_dora=True`` (r 128, α 256, dropout 0.05 on every language-model linear) instead of the
  vendored ``DoraConfig`` fork.
* **Image tokens are expanded in the text by the processor** (one ``<image>`` token per visual feature), not
  spliced in by the model from a single ``-200`` index. The reference truncates the text to 2048 tokens and then
  the expanded embeddings to 2048; here the expanded sequence is truncated once to ``max_seq_len`` (same final
  length) and a limit that would cut into the image tokens is refused.
* **Exact label masks** from the tokenizer's offset mapping (:mod:`fura.recipes.data.llava`) instead of per-round length
  arithmetic (whose mismatches mask a whole row in the reference).
* **No ``group_by_modality_length``**: batches are drawn at random and may mix text-only and image rows; text-only
  rows carry no image at all (the reference feeds a zero image whose features are never used: same loss).
* **Loss normalisation across gradient accumulation**: over all target tokens of the accumulated batch
  (``transformers`` ≥ 4.46), not per micro-batch.
* **Registry fallbacks**: ``lora`` and ``full`` have no ``vlm`` values in :mod:`fura.recipes.methods`, so they use their
  ``commonsense`` ones (LoRA r 64, α 128 on five projections; lr 2e-4). Upstream LLaVA-1.5 used LoRA r 128 / α 256
  on all linears and lr 2e-5 for full fine-tuning: pass ``--method-arg`` / ``--lr`` to match it.
* **No VLM benchmark evaluation** (reference-spec §5.3: VQAv2, GQA, VizWiz, ScienceQA, TextVQA, POPE, MMBench):
  only a held-out loss when ``val_set_size`` > 0.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fura.io.files import atomic_directory
from fura.recipes.cli_args import add_config_flag, add_run_arguments, config_overrides
from fura.recipes.config import MIXED_PRECISION, TrainingConfig, build_config, config_to_dict, dump_yaml
from fura.recipes.data.llava import LlavaDataConfig, LlavaDatasets, build_llava_datasets
from fura.recipes.methods import (
    METHODS,
    TRACKS,
    MethodInfo,
    apply_method,
    count_parameters,
    get_method,
    jsonable,
    resolve_dtype,
    resolve_model_path,
)
from fura.recipes.runs import RunFolder, log_to_file
from fura.tuner.factorize import ALL_PROJECTIONS

logger = logging.getLogger(__name__)

#: Methods ``fura train vlm`` supports (4-bit, SVD and PiSSA variants are not wired for LLaVA).
VLM_METHODS: tuple[str, ...] = ("fura", "lora", "dora", "full")
#: The projector's weights, saved beside the adapter / model (keys of the projector module's state dict).
PROJECTOR_FILE = "mm_projector.safetensors"
#: Reference projector learning rate (reference-spec §4.3) when the method's track has none.
DEFAULT_PROJECTOR_LR = 2e-5


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VLMTrainingConfig(TrainingConfig):
    """Optimisation of a VLM run: :class:`~fura.recipes.config.TrainingConfig` with the LLaVA-1.5 defaults.

    Fields not listed here are documented in :class:`~fura.recipes.config.TrainingConfig`.

    Attributes:
        num_train_epochs: epochs over the rows (reference: 1).
        per_device_train_batch_size: micro-batch size (reference: 4).
        gradient_accumulation_steps: micro-batches per optimizer step (reference: 8, × 8 GPUs → 256).
        lr_scheduler_type: reference: ``cosine``.
        adam_beta2: AdamW β2 (reference: the Trainer default 0.999).
        max_grad_norm: gradient clipping (reference: the Trainer default 1.0).
        gradient_checkpointing: None = on (reference), unless the method's track says otherwise.
        seed: seed of the adapter init, the data order and dropout (reference: the Trainer default 42).
        logging_steps: reference: 1.
        save_steps: reference: 1000.
        dataloader_num_workers: image-loading worker processes (reference: 4).
        mm_projector_lr: learning rate of the multi-modal projector; None = the method's ``vlm`` value (2e-5).
    """

    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 8
    lr_scheduler_type: str = "cosine"
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 1000
    dataloader_num_workers: int = 4
    mm_projector_lr: float | None = None


@dataclass
class VLMRunConfig:
    """One visual instruction tuning run (``fura train vlm``).

    Attributes:
        model: a local ``LlavaForConditionalGeneration`` folder with its processor (or a Hub id, online only).
        method: ``fura``, ``lora``, ``dora`` or ``full`` (see :data:`VLM_METHODS`).
        track: whose reference defaults the method uses (default ``vlm``).
        method_args: method arguments overriding the track defaults (PEFT config fields such as ``r``);
            ``target_modules`` is always scoped to the language model.
        dtype: storage dtype of the base model: ``auto`` (bf16 on a GPU that supports it, else float32), ``float32``,
            ``bfloat16`` or ``float16``.
        output_dir: the run folder; None = ``runs/<model name>-vlm-<method>``.
        trust_remote_code: allow model code from the model folder / Hub.
        data: the LLaVA-format data (:class:`fura.recipes.data.llava.LlavaDataConfig`).
        training: optimisation and checkpointing (:class:`VLMTrainingConfig`).
    """

    model: str = ""
    method: str = "fura"
    track: str = "vlm"
    method_args: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    output_dir: str | None = None
    trust_remote_code: bool = False
    data: LlavaDataConfig = field(default_factory=LlavaDataConfig)
    training: VLMTrainingConfig = field(default_factory=VLMTrainingConfig)

    def validate(self) -> None:
        """Raise ``ValueError`` with a fix for any inconsistent setting."""
        if not self.model:
            raise ValueError("no model: set model (flag --model LLAVA_FOLDER)")
        if self.method not in VLM_METHODS:
            known = "a known method" if self.method in METHODS else "not a method"
            raise ValueError(f"method {self.method!r} ({known}) is not supported for VLM; use one of {VLM_METHODS}")
        if self.track not in TRACKS:
            raise ValueError(f"unknown track {self.track!r}; use one of {', '.join(TRACKS)}")
        self.data.validate()
        if self.training.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"training.mixed_precision must be one of {MIXED_PRECISION}")
        if not 0.0 <= self.training.warmup_ratio < 1.0:
            raise ValueError(f"training.warmup_ratio must be in [0, 1), got {self.training.warmup_ratio}")
        if self.training.eval_steps and self.data.val_set_size <= 0:
            raise ValueError("training.eval_steps needs held-out rows: set data.val_set_size > 0")

    def run_dir(self) -> Path:
        """``output_dir``, or ``runs/<model folder name>-vlm-<method>`` when unset."""
        if self.output_dir:
            return Path(self.output_dir)
        return Path("runs") / f"{Path(str(self.model)).name}-vlm-{self.method}"


@dataclass
class VLMResult:
    """Outcome of :func:`run_vlm`.

    Attributes:
        run_dir: the run folder.
        method: the method's :class:`~fura.recipes.methods.MethodInfo` (counts include the projector).
        global_step: optimizer steps done (resumed runs included).
        train_loss: mean training loss over this invocation's steps.
        held_out_loss: loss on the held-out rows at the end (None without held-out rows).
        artifact: the saved adapter / dense model folder.
        model: the trained model (a ``PeftModel`` for PEFT methods), in eval mode.
    """

    run_dir: Path
    method: MethodInfo
    global_step: int
    train_loss: float | None
    held_out_loss: float | None
    artifact: Path
    model: Any = None


def resolve_config(config: VLMRunConfig) -> VLMRunConfig:
    """A validated copy with the method's track defaults where the user left ``None``, and a run folder."""
    resolved = copy.deepcopy(config)
    resolved.validate()
    defaults = get_method(resolved.method).defaults(resolved.track).training
    fallbacks = {
        "learning_rate": 2e-4,
        "mm_projector_lr": DEFAULT_PROJECTOR_LR,
        "optim": "adamw_torch",
        "gradient_checkpointing": True,
    }
    for key, fallback in fallbacks.items():
        if getattr(resolved.training, key) is None:
            setattr(resolved.training, key, defaults.get(key, fallback))
    resolved.output_dir = str(resolved.run_dir())
    return resolved


# ----------------------------------------------------------------------------------------------------------------
# Model: parts, targets, method
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlavaParts:
    """Dotted module names of a LLaVA model's three parts (in the unwrapped model).

    Attributes:
        language_model: the decoder (``model.language_model``).
        vision_tower: the CLIP encoder (``model.vision_tower``).
        projector: the multi-modal projector (``model.multi_modal_projector``).
    """

    language_model: str
    vision_tower: str
    projector: str

    @staticmethod
    def leaf(name: str) -> str:
        """The last component of a dotted name."""
        return name.rsplit(".", 1)[-1]

    def owner(self, name: str) -> str | None:
        """``"language_model"``, ``"vision_tower"``, ``"projector"`` or None for a (possibly PEFT-wrapped) name."""
        parts = name.split(".")
        for label, module in (("vision_tower", self.vision_tower), ("projector", self.projector)):
            if self.leaf(module) in parts:
                return label
        return "language_model" if self.leaf(self.language_model) in parts else None


def locate_parts(model: nn.Module) -> LlavaParts:
    """Find the language model, vision tower and projector of a LLaVA model (raises ``ValueError`` if absent)."""
    wanted = {"language_model": None, "vision_tower": None, "multi_modal_projector": None}
    for name, _ in model.named_modules():
        leaf = LlavaParts.leaf(name)
        if leaf in wanted and wanted[leaf] is None:
            wanted[leaf] = name
    missing = [k for k, v in wanted.items() if v is None]
    if missing:
        raise ValueError(f"{type(model).__name__} is not a LLaVA model: no {', '.join(missing)} module")
    return LlavaParts(wanted["language_model"], wanted["vision_tower"], wanted["multi_modal_projector"])


def language_model_targets(model: nn.Module, parts: LlavaParts, targets: Any) -> str:
    """A PEFT ``target_modules`` regex matching ``targets`` inside the language model only.

    Args:
        model: the (unwrapped) LLaVA model.
        parts: its :class:`LlavaParts`.
        targets: None (the seven projections), ``"all-linear"`` (every ``nn.Linear`` of the language model), a list
            of leaf names, or a regex string (returned unchanged; :func:`check_vlm_trainability` still checks it).
    """
    decoder = model.get_submodule(parts.language_model)
    linear = sorted({LlavaParts.leaf(n) for n, m in decoder.named_modules() if isinstance(m, nn.Linear)})
    if isinstance(targets, str) and targets != "all-linear":
        return targets
    if targets is None:
        names = [n for n in ALL_PROJECTIONS if n in linear]
    elif targets == "all-linear":
        names = linear
    else:
        names = sorted(set(targets))
        unknown = [n for n in names if n not in linear]
        if unknown:
            raise ValueError(f"target_modules {unknown} are not linear layers of the language model ({linear})")
    if not names:
        raise ValueError(f"no target module in the language model (its linear layers: {linear})")
    return rf"{re.escape(parts.language_model)}\..*\.(?:{'|'.join(map(re.escape, names))})"


def apply_vlm_method(
    model: nn.Module,
    method: str,
    track: str = "vlm",
    method_args: dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[nn.Module, MethodInfo, LlavaParts]:
    """Apply ``method`` to the language model of a LLaVA model; the projector trains, the vision tower is frozen.

    Returns ``(model, info, parts)``; ``info`` counts the projector among the trainable parameters.
    """
    spec = get_method(method)
    if method not in VLM_METHODS:
        raise ValueError(f"method {method!r} is not supported for VLM; use one of {VLM_METHODS}")
    parts = locate_parts(model)
    overrides = dict(method_args or {})
    if spec.kind == "peft":
        resolved = spec.resolve_args(track, overrides)
        overrides["target_modules"] = language_model_targets(model, parts, resolved.get("target_modules"))
        extra = [m for m in resolved.get("modules_to_save") or [] if m != LlavaParts.leaf(parts.projector)]
        overrides["modules_to_save"] = [*extra, LlavaParts.leaf(parts.projector)]
    model, info = apply_method(model, method, track=track, overrides=overrides, dtype=dtype)
    base = _unwrap(model)
    base.get_submodule(parts.vision_tower).requires_grad_(False)
    if spec.kind == "peft":
        upcast_projector_(model, parts)
    check_vlm_trainability(model, parts)
    info.trainable_params, info.total_params = count_parameters(model)
    logger.info("%s (vision tower frozen, projector trained)", info.summary())
    return model, info, parts


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_vlm_trainability(model: nn.Module, parts: LlavaParts) -> dict[str, int]:
    """Refuse adapters outside the language model, a trainable vision tower or a frozen projector.

    Returns ``{"adapted_modules", "projector_params", "vision_tower_params", "trainable_params"}``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    outside = [n for n in adapted if parts.owner(n) != "language_model"]
    if outside:
        raise RuntimeError(f"adapters outside the language model: {outside[:5]}; check target_modules")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    vision = [n for n in trainable if parts.owner(n) == "vision_tower"]
    if vision:
        raise RuntimeError(f"vision tower parameters are trainable: {vision[:5]}")
    projector = sum(p.numel() for n, p in trainable.items() if parts.owner(n) == "projector")
    if projector == 0:
        raise RuntimeError("the multi-modal projector has no trainable parameter")
    vision_total = sum(p.numel() for n, p in model.named_parameters() if parts.owner(n) == "vision_tower")
    return {
        "adapted_modules": len(adapted),
        "projector_params": projector,
        "vision_tower_params": vision_total,
        "trainable_params": sum(p.numel() for p in trainable.values()),
    }


def projector_module(model: nn.Module, parts: LlavaParts) -> nn.Module:
    """The projector the model runs (PEFT's trained ``modules_to_save`` copy when wrapped)."""
    module = _unwrap(model).get_submodule(parts.projector)
    if hasattr(module, "modules_to_save"):
        module = module.modules_to_save[module.active_adapters[0]]
    return module


def upcast_projector_(model: nn.Module, parts: LlavaParts) -> None:
    """Train the projector copy in float32 over a half-precision base (its inputs are cast on the way in).

    PEFT keeps adapter weights in float32 but its ``modules_to_save`` copy in the base dtype, where plain bf16 AdamW
    updates of size ~lr (2e-5) would mostly round away; the reference's DeepSpeed run kept fp32 master weights.
    The projector's output is cast back to the embeddings' dtype by the model.
    """
    module = projector_module(model, parts)
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return
    module.float()
    module.register_forward_pre_hook(_cast_to_float32)


def _cast_to_float32(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def projector_state(model: nn.Module, parts: LlavaParts) -> dict[str, torch.Tensor]:
    """The projector's weights (``linear_1.weight``, ...) as contiguous CPU tensors."""
    return {k: v.detach().cpu().contiguous() for k, v in projector_module(model, parts).state_dict().items()}


def load_processor(model: str, trust_remote_code: bool = False) -> Any:
    """The model's processor, right padding for training; it must expand ``<image>`` (``patch_size`` set)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    if getattr(processor, "image_token_id", None) is None or getattr(processor, "patch_size", 0) is None:
        raise ValueError(
            f"the processor of {model} does not expand image tokens (no image_token_id / patch_size). Fix: save a "
            "LlavaProcessor(image_processor, tokenizer, patch_size=..., vision_feature_select_strategy=...) with it."
        )
    processor.tokenizer.padding_side = "right"
    return processor


def load_llava(model: str, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False) -> nn.Module:
    """``LlavaForConditionalGeneration.from_pretrained`` in ``dtype``."""
    from transformers import LlavaForConditionalGeneration

    path = resolve_model_path(model)
    torch_dtype = resolve_dtype(dtype)
    logger.info("loading %s (%s)", path, str(torch_dtype).removeprefix("torch."))
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)


def check_image_tokens(model: nn.Module, datasets: LlavaDatasets) -> None:
    """Encode the first image row and compare its image-token count with the vision tower's feature count."""
    row = next((r for r in datasets.train.rows if r.get("image") is not None), None)
    if row is None:
        return
    config = _unwrap(model).config
    vision = config.vision_config
    expected = (vision.image_size // vision.patch_size) ** 2
    expected += 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
    found = datasets.encoder(row)["input_ids"].count(datasets.encoder.image_token_id)
    if found != expected:
        raise ValueError(
            f"the processor expands an image to {found} tokens but the vision tower gives {expected} features. Fix: "
            "the processor's patch_size / crop size / vision_feature_select_strategy must match the model config."
        )


# ----------------------------------------------------------------------------------------------------------------
# Trainer with a projector learning rate
# ----------------------------------------------------------------------------------------------------------------


def projector_param_groups(
    model: nn.Module,
    parts: LlavaParts,
    decay_names: Iterable[str],
    learning_rate: float,
    projector_lr: float,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Optimizer groups: (language model | projector) × (decay | no decay), each with its ``lr`` and a ``name``."""
    decay = set(decay_names)
    groups = []
    for label, is_projector, lr in (("language_model", False, learning_rate), ("projector", True, projector_lr)):
        for decayed in (True, False):
            params = [
                p
                for n, p in model.named_parameters()
                if p.requires_grad and (parts.owner(n) == "projector") == is_projector and (n in decay) == decayed
            ]
            if params:
                name = label if decayed else f"{label}_no_decay"
                groups.append(
                    {"params": params, "lr": lr, "weight_decay": weight_decay if decayed else 0.0, "name": name}
                )
    return groups


def _trainer_class() -> type:
    from transformers import Trainer

    class VLMTrainer(Trainer):
        """A ``Trainer`` whose optimizer runs the multi-modal projector at its own learning rate.

        Args:
            parts: the model's :class:`LlavaParts`.
            projector_lr: the projector's peak learning rate (the schedule scales it like the main one).
        """

        def __init__(self, *args: Any, parts: LlavaParts, projector_lr: float, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.parts = parts
            self.projector_lr = projector_lr

        def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
            if self.optimizer is not None:
                return self.optimizer
            opt_model = self.model if model is None else model
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if {"params", "model", "optimizer_dict"} & set(kwargs):
                raise ValueError(f"optimizer {self.args.optim!r} builds its own parameter groups; use adamw_torch")
            groups = projector_param_groups(
                opt_model,
                self.parts,
                self.get_decay_parameter_names(opt_model),
                self.args.learning_rate,
                self.projector_lr,
                self.args.weight_decay,
            )
            self.optimizer = optimizer_cls(groups, **kwargs)
            return self.optimizer

    return VLMTrainer


def build_trainer(
    model: nn.Module,
    parts: LlavaParts,
    processor: Any,
    datasets: LlavaDatasets,
    args: Any,
    projector_lr: float,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A :class:`VLMTrainer` over the LLaVA datasets with their collator."""
    return _trainer_class()(
        model=model,
        args=args,
        train_dataset=datasets.train,
        eval_dataset=datasets.val,
        data_collator=datasets.collator,
        processing_class=processor,
        callbacks=list(callbacks),
        parts=parts,
        projector_lr=projector_lr,
    )


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------


def save_vlm_artifact(model: nn.Module, info: MethodInfo, parts: LlavaParts, processor: Any, run: RunFolder) -> Path:
    """Save the adapter (with the projector) or the dense model, ``mm_projector.safetensors`` and the processor."""
    from safetensors.torch import save_file

    from fura.recipes.artifacts import save_dense_model

    folder = run.adapter_dir if info.save_format == "adapter" else run.model_dir
    with atomic_directory(folder, force=True) as staging:
        if info.save_format == "adapter":
            model.save_pretrained(staging)
        else:
            save_dense_model(model, staging)
        save_file(projector_state(model, parts), str(staging / PROJECTOR_FILE))
        processor.save_pretrained(staging)
    logger.info("saved the trained %s and the projector to %s", info.save_format, folder)
    return folder


def merge_vlm(model: nn.Module) -> nn.Module:
    """``merge_and_unload()`` of a VLM adapter, giving a plain LLaVA model with the trained projector.

    The trained projector copy is put in place of its ``modules_to_save`` wrapper first: PEFT's generic
    ``BaseTuner._replace_module`` (which FuRA's tuner inherits; LoRA overrides it) fails to unload a wrapper around a
    module that has no ``weight`` of its own, such as the two-layer projector.
    """
    from peft.utils.other import ModulesToSaveWrapper

    base = _unwrap(model)
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, module.modules_to_save[module.active_adapters[0]])
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def load_vlm(
    model: str | Path, adapter: str | Path | None = None, dtype: str | torch.dtype = "auto"
) -> tuple[nn.Module, Any]:
    """Load ``(model, processor)`` for inference from a run folder, an adapter folder, or a base (+ adapter).

    The adapter brings its projector (PEFT ``modules_to_save``); the model is in eval mode.
    """
    from peft import PeftModel
    from transformers import AutoProcessor

    from fura.recipes.artifacts import resolve_trained

    resolved = resolve_trained(model, adapter)
    loaded = load_llava(resolved.base, dtype)
    if resolved.adapter:
        loaded = PeftModel.from_pretrained(loaded, resolved.adapter)
    source = resolved.base
    if resolved.adapter and (Path(resolved.adapter) / "processor_config.json").is_file():
        source = resolved.adapter
    return loaded.eval(), AutoProcessor.from_pretrained(source)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


def run_vlm(
    config: VLMRunConfig, resume: bool = False, overwrite: bool = False, callbacks: Sequence[Any] = ()
) -> VLMResult:
    """Train (or resume) one VLM run and write its run folder; see the module docstring.

    Args:
        config: the run's settings (method defaults fill the ``None`` fields).
        resume: continue from the last complete checkpoint in the run folder.
        overwrite: delete a previous run in the run folder first.
        callbacks: extra ``transformers`` callbacks (called after the run-folder callback).
    """
    from fura.recipes.sft import check_resume_compatible, seed_everything

    resolved = resolve_config(config)
    run = RunFolder(Path(resolved.output_dir))
    checkpoint = run.prepare(resume=resume, overwrite=overwrite)
    with log_to_file(run.log_path):
        if checkpoint is not None:
            check_resume_compatible(run, resolved)
        run.write_config(dump_yaml(config_to_dict(resolved)))
        logger.info("run folder %s (%s)", run.root, f"resuming from {checkpoint.name}" if checkpoint else "new run")
        seed_everything(resolved.training.seed)
        processor = load_processor(resolved.model, resolved.trust_remote_code)
        model = load_llava(resolved.model, resolved.dtype, resolved.trust_remote_code)
        model, info, parts = apply_vlm_method(
            model, resolved.method, resolved.track, resolved.method_args, resolved.dtype
        )
        run.write_json(run.method_path, {**info.to_dict(), "vlm": _vlm_summary(model, parts, resolved)})
        datasets = build_llava_datasets(resolved.data, processor)
        check_image_tokens(model, datasets)
        return _train_and_finish(resolved, run, model, info, parts, processor, datasets, checkpoint, callbacks)


def _vlm_summary(model: nn.Module, parts: LlavaParts, resolved: VLMRunConfig) -> dict[str, Any]:
    return {
        **check_vlm_trainability(model, parts),
        "learning_rate": resolved.training.learning_rate,
        "mm_projector_lr": resolved.training.mm_projector_lr,
        "parts": jsonable(parts.__dict__),
    }


def _train_and_finish(
    resolved: VLMRunConfig,
    run: RunFolder,
    model: nn.Module,
    info: MethodInfo,
    parts: LlavaParts,
    processor: Any,
    datasets: LlavaDatasets,
    checkpoint: Path | None,
    callbacks: Sequence[Any],
) -> VLMResult:
    from fura.recipes.callbacks import RunFolderCallback
    from fura.recipes.sft import training_arguments

    title = f"{info.method} on {Path(str(resolved.model)).name} ({info.trainable_params:,} trainable)"
    args = training_arguments(resolved.training, run, has_val=datasets.val is not None)
    trainer = build_trainer(
        model,
        parts,
        processor,
        datasets,
        args,
        resolved.training.mm_projector_lr,
        callbacks=[RunFolderCallback(run, title, plot_at_end=False), *callbacks],
    )
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    held_out = trainer.evaluate() if datasets.val is not None else {}
    artifact = save_vlm_artifact(trainer.model, info, parts, processor, run)
    run.plot(title)
    result = VLMResult(
        run_dir=run.root,
        method=info,
        global_step=output.global_step,
        train_loss=output.training_loss,
        held_out_loss=held_out.get("eval_loss"),
        artifact=artifact,
        model=trainer.model.eval(),
    )
    payload = {
        "method": info.to_dict(),
        "train": {"global_step": result.global_step, "train_loss": result.train_loss, **output.metrics},
        "held_out_loss": result.held_out_loss,
        "artifact": str(artifact),
    }
    run.write_json(run.results_path, payload)
    logger.info("done: %d steps, artifact %s", result.global_step, artifact)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

#: ``(flags, config key, argparse keyword arguments)`` of the data and training flags.
_DATA_FLAGS: tuple[tuple[tuple[str, ...], str, dict[str, Any]], ...] = (
    (("--data",), "data.train_files", {"nargs": "+", "metavar": "JSON", "help": "LLaVA-format JSON / JSONL files"}),
    (("--image-folder",), "data.image_folder", {"metavar": "DIR", "help": "folder the rows' image paths are under"}),
    (("--template",), "data.template", {"choices": ["vicuna_v1", "chat"], "help": "default vicuna_v1 (LLaVA-1.5)"}),
    (("--system-prompt",), "data.system_prompt", {"help": "system text (default: the template's; '' = none)"}),
    (("--max-seq-len",), "data.max_seq_len", {"type": int, "help": "tokens after image expansion (default 2048)"}),
    (("--image-aspect-ratio",), "data.image_aspect_ratio", {"choices": ["pad", "crop"], "help": "default pad"}),
    (("--val-set-size",), "data.val_set_size", {"type": int, "help": "held-out rows (default 0)"}),
    (("--max-rows",), "data.max_rows", {"type": int, "help": "seeded random subset of the rows (default: all)"}),
    (
        ("--check-images",),
        "data.check_images",
        {"action": argparse.BooleanOptionalAction, "help": "check image files exist first (default on)"},
    ),
)
_TRAINING_FLAGS: tuple[tuple[tuple[str, ...], str, dict[str, Any]], ...] = (
    (("--learning-rate", "--lr"), "training.learning_rate", {"type": float, "help": "default: the method's (2e-4)"}),
    (("--mm-projector-lr",), "training.mm_projector_lr", {"type": float, "help": "projector lr (default 2e-5)"}),
    (("--epochs",), "training.num_train_epochs", {"type": float, "help": "default 1"}),
    (("--max-steps",), "training.max_steps", {"type": int, "help": "stop after N optimizer steps (default: epochs)"}),
    (("--batch-size",), "training.per_device_train_batch_size", {"type": int, "help": "micro-batch (default 4)"}),
    (("--grad-accum",), "training.gradient_accumulation_steps", {"type": int, "help": "default 8"}),
    (("--warmup-ratio",), "training.warmup_ratio", {"type": float, "help": "default 0.03"}),
    (("--lr-scheduler",), "training.lr_scheduler_type", {"help": "default cosine"}),
    (("--weight-decay",), "training.weight_decay", {"type": float, "help": "default 0"}),
    (("--max-grad-norm",), "training.max_grad_norm", {"type": float, "help": "clip norm (default 1.0; 0 = off)"}),
    (("--optim",), "training.optim", {"help": "transformers optimizer name (default adamw_torch)"}),
    (
        ("--gradient-checkpointing",),
        "training.gradient_checkpointing",
        {"action": argparse.BooleanOptionalAction, "help": "default on"},
    ),
    (
        ("--mixed-precision",),
        "training.mixed_precision",
        {"choices": ["auto", "bf16", "fp16", "no"], "help": "default auto (bf16 on a GPU)"},
    ),
    (("--seed",), "seed", {"type": int, "help": "seed of init, data order, subset and split (default 42)"}),
    (("--logging-steps",), "training.logging_steps", {"type": int, "help": "default 1"}),
    (("--save-steps",), "training.save_steps", {"type": int, "help": "checkpoint period (default 1000)"}),
    (("--save-total-limit",), "training.save_total_limit", {"type": int, "help": "checkpoints kept (default 2)"}),
    (("--eval-steps",), "training.eval_steps", {"type": int, "help": "held-out loss every N steps"}),
    (("--num-workers",), "training.dataloader_num_workers", {"type": int, "help": "data-loader workers (default 4)"}),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fura train vlm`` (each overrides the matching YAML setting)."""
    parser.epilog = (
        "Example: fura train vlm --model llava-stage1-hf --method fura --data llava_v1_5_mix665k.json "
        "--image-folder playground/data -o runs/llava-fura. Resume a killed run with the same command plus --resume."
    )
    add_run_arguments(parser, default_track="vlm")
    for title, flags in (("data", _DATA_FLAGS), ("training", _TRAINING_FLAGS)):
        group = parser.add_argument_group(title)
        for names, key, kwargs in flags:
            add_config_flag(group, *names, key=key, **kwargs)


def config_from_args(args: argparse.Namespace) -> VLMRunConfig:
    """Defaults < ``--config`` YAML < flags (``--seed`` sets the training and the data seed)."""
    overrides = config_overrides(args)
    seed = overrides.pop("seed", None)
    if seed is not None:
        overrides["training.seed"] = overrides["data.seed"] = seed
    return build_config(VLMRunConfig, getattr(args, "config", None), overrides)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``fura train vlm``; returns the exit status."""
    config = config_from_args(args)
    if getattr(args, "print_config", False):
        print(dump_yaml(config_to_dict(resolve_config(config))), end="")
        return 0
    result = run_vlm(config, resume=args.resume, overwrite=args.overwrite)
    print(result.method.summary())
    print(f"trained {result.global_step} steps; run folder: {result.run_dir}; saved: {result.artifact}")
    return 0
