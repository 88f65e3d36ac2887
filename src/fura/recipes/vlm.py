"""LLaVA visual instruction tuning (``fura train vlm``): any registered method on the language model, the projector
trained in full, on transformers' ``Trainer``.

The pipeline, the run folder and the deliberate differences from the reference's LLaVA scripts:
``docs/recipes/vlm.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoProcessor, Trainer, TrainingArguments
from transformers.trainer_utils import SchedulerType

from fura.integrations import distributed
from fura.recipes.args import CHECKPOINTING, RunArguments
from fura.recipes.artifacts import resolve_trained, save_trained_model
from fura.recipes.base_models import count_parameters, resolve_dtype, resolve_model_path
from fura.recipes.callbacks import RunFolderCallback
from fura.recipes.data.llava import LlavaDataConfig, LlavaDatasets, build_llava_datasets, load_llava_data
from fura.recipes.loading import MethodInfo, apply_method
from fura.recipes.registry import METHODS, MethodSpec, get_method
from fura.recipes.runs import RunFolder
from fura.recipes.sft import trainer_arguments
from fura.recipes.skeleton import BATCH_INVARIANTS, MODEL_INVARIANTS, Recipe, RecipeSettings, Session, method_title
from fura.tuner.factorize import ALL_PROJECTIONS

logger = logging.getLogger(__name__)

#: Methods ``fura train vlm`` supports (4-bit, SVD and PiSSA variants are not wired for LLaVA).
VLM_METHODS: tuple[str, ...] = ("fura", "lora", "dora", "full")
#: The projector's weights, saved beside the adapter / model (keys of the projector module's state dict).
PROJECTOR_FILE = "mm_projector.safetensors"

#: Settings that must not change when a run is resumed: the model, and the data and its order (every data field but
#: the pre-flight ``check_images``).
RESUME_INVARIANTS: tuple[str, ...] = (
    *MODEL_INVARIANTS,
    *(f.name for f in dataclasses.fields(LlavaDataConfig) if f.name != "check_images"),
    *BATCH_INVARIANTS,
)


@dataclass
class VLMRunArguments(RunArguments):
    """:class:`~fura.recipes.args.RunArguments` with this recipe's defaults: no default model (a
    ``LlavaForConditionalGeneration`` folder with its processor, or a Hub id online, is required), the ``vlm`` track."""

    model: str = field(
        default="", metadata={"help": "a LlavaForConditionalGeneration folder with its processor (required)"}
    )
    track: str = field(default="vlm", metadata={"help": "whose reference defaults fill unset settings"})


@dataclass
class VLMTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with the reference LLaVA-1.5 fine-tuning defaults (``docs/recipes/vlm.md``).

    Only the defaults of the fields declared here differ from transformers' (every field keeps its meaning and its
    flag); ``learning_rate`` and the one field of its own, ``mm_projector_lr`` (the projector's peak learning rate,
    scaled by the schedule like ``learning_rate``), take the method's ``vlm`` values unless set.
    :func:`resolve_settings` turns on ``activation_checkpointing`` and (on a GPU that supports it) ``bf16`` unless set;
    ``eval_steps`` alone turns on the periodic held-out loss.
    """

    output_dir: str | None = field(
        default=None, metadata={"help": "the run folder (default runs/<model>-vlm-<method>)"}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate (unless set: the method's)"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs over the rows"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "micro-batch size"})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "held-out micro-batch size"})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "micro-batches per optimizer step"})
    warmup_steps: float = field(default=0.03, metadata={"help": "warm-up steps, or a fraction of the steps if < 1"})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "learning-rate schedule"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer (one with plain parameter groups)"})
    logging_steps: float = field(default=1, metadata={"help": "write a metrics line every N optimizer steps"})
    save_steps: float = field(default=1000, metadata={"help": "save a resumable checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept"})
    dataloader_num_workers: int = field(default=4, metadata={"help": "image-loading worker processes"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the collator's columns"})
    mm_projector_lr: float = field(
        default=2e-5, metadata={"help": "peak learning rate of the projector (unless set: the method's)"}
    )

    def __post_init__(self) -> None:
        if self.mm_projector_lr < 0:
            raise ValueError(f"mm_projector_lr must be 0 or more, got {self.mm_projector_lr}")
        super().__post_init__()


@dataclass
class VLMSettings(RecipeSettings):
    """The settings of ``fura train vlm``: the run, the LLaVA data and the ``TrainingArguments``."""

    folder_tag: ClassVar[str] = "vlm-"
    run: VLMRunArguments
    data: LlavaDataConfig
    training: VLMTrainingArguments


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
    found: dict[str, str] = {}
    for name, _ in model.named_modules():
        found.setdefault(LlavaParts.leaf(name), name)
    leaves = ("language_model", "vision_tower", "multi_modal_projector")
    missing = [leaf for leaf in leaves if leaf not in found]
    if missing:
        raise ValueError(f"{type(model).__name__} is not a LLaVA model: no {', '.join(missing)} module")
    return LlavaParts(*(found[leaf] for leaf in leaves))


def language_model_targets(model: nn.Module, parts: LlavaParts, targets: Any) -> str:
    """A PEFT ``target_modules`` regex matching ``targets`` inside the language model of ``model`` (unwrapped) only.

    ``targets``: None (the seven projections), ``"all-linear"`` (every ``nn.Linear`` of the language model), a list of
    leaf names, or a regex string (returned unchanged; :func:`check_vlm_trainability` still checks it).
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
    model: nn.Module, method: str, *, track: str = "vlm", method_args: dict[str, Any] | None = None, dtype: Any = None
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
    _unwrap(model).get_submodule(parts.vision_tower).requires_grad_(False)
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
    """Train the projector copy in float32 over a half-precision base (its inputs are cast on the way in, its output
    back by the model)."""
    module = projector_module(model, parts)
    if any(p.dtype != torch.float32 for p in module.parameters()):
        module.float()
        module.register_forward_pre_hook(_cast_to_float32)


def _cast_to_float32(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def projector_state(model: nn.Module, parts: LlavaParts) -> dict[str, torch.Tensor]:
    """The projector's weights (``linear_1.weight``, ...) as contiguous CPU tensors."""
    return {k: v.detach().cpu().contiguous() for k, v in projector_module(model, parts).state_dict().items()}


def load_processor(model: str, trust_remote_code: bool = False) -> Any:
    """The model's processor, right padding for training; it must expand ``<image>`` (``patch_size`` set)."""
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


def projector_param_groups(
    model: nn.Module, parts: LlavaParts, decay_names: Iterable[str], args: VLMTrainingArguments
) -> list[dict[str, Any]]:
    """Optimizer groups: (language model | projector) × (decay | no decay), each with its ``lr`` and a ``name``."""
    decay = set(decay_names)
    groups = []
    for label, lr in (("language_model", args.learning_rate), ("projector", args.mm_projector_lr)):
        for decayed in (True, False):
            params = [
                p
                for n, p in model.named_parameters()
                if p.requires_grad
                and (parts.owner(n) == "projector") == (label == "projector")
                and (n in decay) == decayed
            ]
            if params:
                name, weight_decay = (label, args.weight_decay) if decayed else (f"{label}_no_decay", 0.0)
                groups.append({"params": params, "lr": lr, "weight_decay": weight_decay, "name": name})
    return groups


class VLMTrainer(Trainer):
    """A ``Trainer`` whose optimizer runs the multi-modal projector (of ``parts``, the model's :class:`LlavaParts`) at
    ``args.mm_projector_lr``."""

    def __init__(self, *args: Any, parts: LlavaParts, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parts = parts

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if {"params", "model", "optimizer_dict"} & set(kwargs):
            raise ValueError(f"optimizer {self.args.optim!r} builds its own parameter groups; use adamw_torch")
        groups = projector_param_groups(opt_model, self.parts, self.get_decay_parameter_names(opt_model), self.args)
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer


def build_trainer(
    model: nn.Module,
    parts: LlavaParts,
    processor: Any,
    datasets: LlavaDatasets,
    args: Any,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A :class:`VLMTrainer` over the LLaVA datasets with their collator."""
    return VLMTrainer(
        model=model,
        args=args,
        train_dataset=datasets.train,
        eval_dataset=datasets.val,
        data_collator=datasets.collator,
        processing_class=processor,
        callbacks=list(callbacks),
        parts=parts,
    )


def merge_vlm(model: nn.Module) -> nn.Module:
    """``merge_and_unload()`` of a VLM adapter: a plain LLaVA model whose projector is the trained copy (FuRA and LoRA
    alike); a fully fine-tuned model is returned as it is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def load_vlm(
    model: str | Path, adapter: str | Path | None = None, dtype: str | torch.dtype = "auto"
) -> tuple[nn.Module, Any]:
    """Load ``(model, processor)`` for inference from a run folder, an adapter folder, or a base (+ adapter).

    The adapter brings its projector (PEFT ``modules_to_save``); the model is in eval mode.
    """
    resolved = resolve_trained(model, adapter)
    loaded = load_llava(resolved.base, dtype)
    if resolved.adapter:
        loaded = PeftModel.from_pretrained(loaded, resolved.adapter)
    return loaded.eval(), AutoProcessor.from_pretrained(resolved.source("processor_config.json"))


class VLMRecipe(Recipe):
    """``fura train vlm``."""

    prog = "fura train vlm"
    description = (
        "LLaVA-style visual instruction tuning: --method fura, lora, dora or full on the language model, the projector "
        "at --mm_projector_lr, the vision tower frozen. Settings come from --config YAML (flat `name: value` lines) "
        "and flags (flags win)."
    )
    epilog = (
        "Example: fura train vlm --model llava-stage1-hf --method fura --data llava_v1_5_mix665k.json --image-folder "
        "playground/data --output_dir runs/llava-fura. Resume a killed run with the same command plus --resume."
    )
    settings_cls = VLMSettings
    resume_invariants = RESUME_INVARIANTS

    def check_settings(self, resolved: VLMSettings) -> None:
        """A model, a method wired for LLaVA, and held-out rows for ``eval_steps``."""
        if not resolved.run.model:
            raise ValueError(
                "no model: set --model LLAVA_FOLDER (a LlavaForConditionalGeneration folder and processor)."
            )
        if resolved.run.method not in VLM_METHODS:
            known = "a known method" if resolved.run.method in METHODS else "not a method"
            raise ValueError(
                f"method {resolved.run.method!r} ({known}) is not supported for VLM. Fix: --method one of "
                f"{', '.join(VLM_METHODS)}."
            )
        if resolved.training.eval_steps and resolved.data.val_set_size <= 0:
            raise ValueError("eval_steps needs held-out rows. Fix: set --val_set_size > 0, or drop --eval_steps.")

    def adjust(self, resolved: VLMSettings, spec: MethodSpec, changes: dict[str, Any]) -> None:
        """Activation checkpointing unless set (under either name)."""
        if not CHECKPOINTING & resolved.explicit:
            changes.setdefault("activation_checkpointing", True)

    def check_inputs(self, resolved: VLMSettings) -> Any:
        """The training and held-out rows (images checked when ``check_images``)."""
        return load_llava_data(resolved.data, resolved.training.seed)

    def start(
        self, resolved: VLMSettings, run: RunFolder, checkpoint: Path | None, inputs: Any, callbacks: Sequence[Any]
    ) -> Session:
        """The processor, the LLaVA model with the method on its language model, the datasets and the trainer."""
        args = trainer_arguments(resolved.training, run, has_val=bool(inputs[1]))
        run_args = resolved.run
        processor = load_processor(run_args.model, run_args.trust_remote_code)
        model = load_llava(run_args.model, run_args.dtype, run_args.trust_remote_code)
        model, info, parts = apply_vlm_method(
            model, run_args.method, track=run_args.track, method_args=run_args.method_args(), dtype=run_args.dtype
        )
        if distributed.is_main_process():
            lrs = {"learning_rate": args.learning_rate, "mm_projector_lr": args.mm_projector_lr}
            summary = {**check_vlm_trainability(model, parts), **lrs, "parts": dataclasses.asdict(parts)}
            run.write_json(run.method_path, {**info.to_dict(), "vlm": summary})
        datasets = build_llava_datasets(resolved.data, processor, resolved.training.seed, inputs)
        check_image_tokens(model, datasets)
        title = method_title(info, run_args.model)
        own = RunFolderCallback(run, title)
        trainer = build_trainer(model, parts, processor, datasets, args, callbacks=[own, *callbacks])

        def save() -> Path:  # the adapter (with the projector) or dense model, the projector file and the processor
            projector = {PROJECTOR_FILE: projector_state(trainer.model, parts)}
            return save_trained_model(
                trainer.model, info, run.trained_dir(info.save_format), processor, tensor_files=projector
            )

        return Session(trainer, info, title, save, held_out=datasets.val is not None)


RECIPE = VLMRecipe()
parse_settings = RECIPE.parse_settings
build_parser = RECIPE.build_parser
resolve_settings = RECIPE.resolve_settings
run_vlm = RECIPE.run
main = RECIPE.main
