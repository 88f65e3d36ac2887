"""Distributed training with FuRA: ranks, main-process-only run folders, sharding FuRA models, gathering adapters.

Launch any pipeline with ``accelerate launch`` (ready configs in ``configs/accelerate/``, commands in
``docs/distributed.md``) or ``torchrun``. What this module provides, and why:

* **Ranks before any process group exists** (:func:`rank`, :func:`world_size`, :func:`is_main_process`): read from the
  launcher's environment (``RANK``/``WORLD_SIZE``), so the run folder can be prepared before ``transformers`` sets up
  the process group.
* **CPU multi-process runs** (:func:`use_cpu_backend`): under ``torchrun`` / ``accelerate launch --multi_gpu`` on a
  machine without an accelerator, ``transformers`` and ``accelerate`` silently run *N independent single-process
  trainings* unless told to use the CPU; the SFT pipeline then passes ``use_cpu=True`` so that ``accelerate`` picks the
  gloo backend and real DDP. (``accelerate launch --cpu --num_processes N`` starts only one process without an MPI
  hostfile: use ``configs/accelerate/ddp.yaml`` or ``torchrun`` instead.)
* **Only the main process writes the run folder** (:func:`prepare_run_folder`, :func:`main_process_log`,
  :func:`save_trained_model_distributed`).
* **Sharding FuRA models.** FuRA's tensors live in :class:`~fura.tuner.layer.FuraCore` (trainable, read by calling the
  module) and :class:`~fura.tuner.layer.FuraBasis` (frozen, read *directly* by :class:`~fura.tuner.layer.FuraLayer`, so
  its own ``forward`` is never called) sub-modules. FSDP and ZeRO-3 only gather a module's parameters around that
  module's forward, so a FuRA layer must be sharded *together with* the block that runs it:

  - FSDP2 (:func:`fully_shard_peft_model`): one ``fully_shard`` unit per decoder layer plus the root; FSDP2 accepts
    frozen and trainable parameters in one unit.
  - FSDP1 (:func:`fsdp_auto_wrap_policy`): PEFT's policy *minus* ``FuraCore``, so the cores stay in their decoder
    layer's unit (one all-gather per block instead of one more per adapted module). PEFT's own
    ``peft.utils.other.fsdp_auto_wrap_policy`` also works (the layer reads its core by calling the ``FuraCore``
    module). The decoder-layer unit mixes frozen and trainable parameters, so FSDP1 needs ``use_orig_params=True``.
  - DeepSpeed ZeRO-3 (:func:`prepare_model_for_sharding`): FuRA layers are marked as ZeRO-3 *leaf modules*, so the
    whole layer (base weight, core, basis) is gathered around the layer's forward.
* **Saving from a sharded run** (:func:`full_state_dict`, :func:`gathered_state_dict`): every rank takes part in
  gathering the full state dict, the main process writes the same adapter file a single-process run writes.
* **Gradient norm under sharding** (:func:`global_grad_norm`): the norm of the full gradient, not of this rank's shard.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Launcher environment variables that hold the global rank / the number of processes.
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


# ----------------------------------------------------------------------------------------------------------------
# Ranks
# ----------------------------------------------------------------------------------------------------------------


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def world_size() -> int:
    """Number of processes: the process group's size once it exists, else the launcher's ``WORLD_SIZE`` (1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return _env_int(_WORLD_VARS, 1)


def rank() -> int:
    """Global rank of this process (0 outside a distributed launch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return _env_int(_RANK_VARS, 0)


def is_main_process() -> bool:
    """Whether this process is global rank 0 (the one that writes run folders and files)."""
    return rank() == 0


def is_distributed() -> bool:
    """Whether this process is one of several (launched by ``accelerate launch`` / ``torchrun`` / MPI)."""
    return world_size() > 1


def has_accelerator() -> bool:
    """Whether a GPU-like accelerator (CUDA, XPU, ...) is visible to this process."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def use_cpu_backend() -> bool:
    """A multi-process launch on a machine without an accelerator: train with DDP on the CPU (gloo).

    Without ``TrainingArguments(use_cpu=True)`` such a launch gives every process its own single-process training
    (``accelerate``'s state says ``DistributedType.NO``), with no error.
    """
    return is_distributed() and not has_accelerator()


# ----------------------------------------------------------------------------------------------------------------
# Sharding FuRA / PEFT models
# ----------------------------------------------------------------------------------------------------------------


def _fura_layer_types() -> tuple[type, ...]:
    from fura.tuner.layer import FuraLayer

    return (FuraLayer,)


def has_fura_layers(model: nn.Module) -> bool:
    """Whether the model holds FuRA tuner layers."""
    return any(isinstance(module, _fura_layer_types()) for module in model.modules())


def block_classes(model: nn.Module) -> tuple[type, ...]:
    """The transformer-block classes of a (PEFT) model, from its ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(module) for module in model.modules() if type(module).__name__ in names}
    return tuple(sorted(found, key=lambda cls: cls.__name__))


def fsdp_auto_wrap_policy(model: nn.Module) -> Callable[..., bool]:
    """FSDP1 auto-wrap policy: PEFT's ``fsdp_auto_wrap_policy`` without separate units for :class:`FuraCore`.

    Transformer blocks (``_no_split_modules``) get their own unit, as do the leaf adapter modules of other PEFT
    methods (LoRA's ``lora_A`` / ``lora_B``, which are called as modules). FuRA's cores stay in their block's unit,
    which then holds frozen and trainable parameters: wrap with ``use_orig_params=True``.
    """
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    from fura.tuner.layer import FuraCore

    def is_adapter_leaf(module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        leaf = next(module.children(), None) is None
        return leaf and weight is not None and weight.requires_grad and not isinstance(module, FuraCore)

    blocks = _wrapped_block_classes(model)
    policies = [
        functools.partial(lambda_auto_wrap_policy, lambda_fn=is_adapter_leaf),
        functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=blocks),
    ]
    return functools.partial(_or_policy, policies=policies)


def _wrapped_block_classes(model: nn.Module) -> set[type]:
    """Block classes plus PEFT's prompt-learning encoders (what PEFT's own policy wraps as transformer layers)."""
    from peft.tuners import PrefixEncoder, PromptEmbedding, PromptEncoder

    return {*block_classes(model), PrefixEncoder, PromptEncoder, PromptEmbedding}


def device_mesh(device_type: str | None = None) -> Any:
    """A 1-D device mesh over every process: ``cuda`` when available, else ``cpu`` (gloo)."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (world_size(),))


def fully_shard_peft_model(model: nn.Module, mesh: Any = None, **kwargs: Any) -> nn.Module:
    """Shard a (PEFT) model with FSDP2 ``fully_shard``: one unit per transformer block, then the root.

    FuRA's cores and bases stay in their block's unit (see the module docstring). ``kwargs`` go to ``fully_shard``
    (``reshard_after_forward``, ``mp_policy``, ``offload_policy``). Needs an initialised process group; ``mesh``
    defaults to :func:`device_mesh`. Returns the model (sharded in place).
    """
    from torch.distributed.fsdp import fully_shard

    mesh = mesh if mesh is not None else device_mesh()
    blocks = block_classes(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} names no transformer block classes (_no_split_modules), so there is nothing to "
            "shard per block. Fix: shard the model's blocks yourself with torch.distributed.fsdp.fully_shard."
        )
    for module in model.modules():
        if isinstance(module, blocks):
            fully_shard(module, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def prepare_model_for_sharding(model: nn.Module) -> nn.Module:
    """Under DeepSpeed ZeRO-3, mark FuRA layers as ZeRO-3 leaf modules (gathered as a whole around their forward).

    A no-op without ZeRO-3 or without FuRA layers. Call it after the model is built, before the Trainer prepares it.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled() or not has_fura_layers(model):
        return model
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(m) for m in model.modules() if isinstance(m, _fura_layer_types())}, key=str)
    set_z3_leaf_modules(model, classes)
    logger.info("ZeRO-3: %s gathered as leaf modules", ", ".join(cls.__name__ for cls in classes))
    return model


def configure_trainer_for_fsdp(trainer: Any) -> None:
    """Make an FSDP1 Trainer wrap FuRA models correctly (a no-op for FSDP2, DDP and single-process runs).

    Sets :func:`fsdp_auto_wrap_policy` on ``accelerate``'s FSDP plugin (PEFT's documented recipe, with FuRA's cores
    kept in their block) and refuses ``use_orig_params=False`` for FuRA models, which FSDP1 would reject later with a
    less helpful message. Call it after building the Trainer, before ``train()``.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            logger.warning(
                "an FSDP launch without GPUs: accelerate enables FSDP only on GPU-type devices, so this run is plain "
                "DDP (every process holds the whole model)"
            )
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 1:
        return
    model = trainer.model
    if has_fura_layers(model) and not plugin.use_orig_params:
        raise ValueError(
            "FSDP1 with a FuRA model needs use_orig_params=True: FuRA's trainable cores share an FSDP unit with the "
            "frozen weights of their block. Fix: set fsdp_use_orig_params: true in the accelerate config "
            "(configs/accelerate/fsdp.yaml uses FSDP2, which needs neither)."
        )
    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


# ----------------------------------------------------------------------------------------------------------------
# Gathering state dicts and gradient norms of sharded models
# ----------------------------------------------------------------------------------------------------------------


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP1/FSDP2 model, on the CPU: complete on rank 0, empty elsewhere.

    A collective: every rank must call it. Keys are those of the unwrapped model (no FSDP prefixes), so
    ``peft_model.save_pretrained(folder, state_dict=...)`` writes the same file as a single-process run.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # FSDP1's rank-0 CPU offload of a model that already lives on the CPU segfaults (torch 2.13): there every rank
    # gathers the full state dict instead; accelerator-resident models are gathered into rank 0's CPU memory.
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu)
    state = get_model_state_dict(model, options=options)
    return state if is_main_process() or not on_cpu else {}


def sharding(trainer: Any) -> str | None:
    """``"fsdp"`` or ``"zero3"`` when the Trainer's model is sharded over the processes, else None."""
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_deepspeed and accelerator.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        return "zero3"
    return None


def gathered_state_dict(trainer: Any) -> dict[str, torch.Tensor] | None:
    """The Trainer's full state dict when its model is sharded (FSDP, DeepSpeed ZeRO-3), else None.

    A collective under sharding: call it on every rank. None means the model is whole on every process (single
    process, DDP, ZeRO-1/2) and can be saved as it is. ZeRO-3 gives the consolidated 16-bit state dict
    (``stage3_gather_16bit_weights_on_model_save``).
    """
    kind = sharding(trainer)
    if kind == "fsdp":
        return full_state_dict(trainer.model)
    if kind == "zero3":
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return None


#: Module names that wrappers insert (FSDP1 units, activation checkpointing, torch.compile).
_WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def clean_module_name(name: str) -> str:
    """``name`` without the segments that FSDP1 / checkpointing / compile wrappers insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


@contextlib.contextmanager
def unwrapped_module_names(model: nn.Module) -> Iterator[nn.Module]:
    """While the block runs, ``model.named_modules()`` reports names without wrapper segments.

    PEFT 0.21 finds an adapter's entries in a state dict from the *module names* of the model and strips only a
    leading ``_fsdp_wrapped_module.``; with FSDP1 units nested inside the model (one per decoder layer), every adapter
    key misses and ``save_pretrained(state_dict=full)`` writes an empty adapter. A gathered full state dict has clean
    keys, so clean module names make them match again.
    """
    original = model.named_modules

    def named_modules(*args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        for name, module in original(*args, **kwargs):
            yield clean_module_name(name), module

    model.named_modules = named_modules  # instance attribute: shadows the method for this object only
    try:
        yield model
    finally:
        del model.named_modules


def global_grad_norm(model: nn.Module) -> float | None:
    """L2 norm of the full gradient of the trainable parameters (None before any gradient exists).

    Plain and DDP models: the local gradients (already averaged by DDP). FSDP2: gradients are sharded ``DTensor`` s,
    reduced across ranks. FSDP1: ``clip_grad_norm_(inf)``, whose clip factor is exactly 1. Under sharding this is a
    collective: call it on every rank.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(model, FullyShardedDataParallel):
        return float(model.clip_grad_norm_(float("inf")))
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return None
    total = torch.nn.utils.get_total_norm([g.detach().float() for g in grads])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return float(total)


@contextlib.contextmanager
def process_group(backend: str = "gloo") -> Iterator[None]:
    """Initialise the default process group from the launcher's environment for the block (scripts and tests)."""
    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group(backend)
    try:
        yield
    finally:
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
