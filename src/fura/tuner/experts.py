r"""FuRA on parameters that are not ``nn.Linear`` weights, e.g. fused expert stacks (PEFT's ``target_parameters``).

transformers 5 stores the experts of Mixtral, Qwen3-MoE, gpt-oss … as one parameter per projection holding every
expert: ``gate_up_proj: (E, 2I, H)`` and ``down_proj: (E, H, I)`` in PyTorch's ``(out, in)`` layout per expert
(``y_e = x W_eᵀ``), or ``(E, in, out)`` when the experts module says ``is_transposed`` (gpt-oss: ``y_e = x W_e + b_e``).
A 2-D parameter (e.g. a router ``gate.weight: (E, H)``) is one ``(out, in)`` weight.

Math. Each expert ``e`` is an ordinary linear weight ``W_e: (out, in)`` and gets its own block decomposition with
the plan of :mod:`fura.tuner.layer`: for ``output_one_block``, ``n`` column blocks ``W_e,j = U_e,j diag(σ_e,j)
V_e,jᵀ`` and the implicit form

    W_e' = W_e · blockdiag(I + Δ_e,1 … I + Δ_e,n),   Δ_e,j = V_e,j (diag(c) R_e,j − diag(c₀) V_e,jᵀ)   (b × b)

(``input_one_block``: ``W_e' = blockdiag(I + Δ_e,iᵀ) · W_e`` on ``m`` row blocks). The ``E`` experts' blocks are
stored as one batch: ``fura_core[name].weight: (E·k, r, d)``, ``fura_basis[name].basis: (E·k, d, r)``, with block
``j`` of expert ``e`` at index ``e·k + j``. ``Δ`` is exactly 0 at initialisation, so ``W_e' = W_e + W_e·0 = W_e``
bit for bit.

Where the transform acts. Two equivalent ways exist: on each expert's input inside the expert loop
(``x_e ← x_e + blockdiag(Δ_e) x_e`` for the tokens routed to ``e``, ``O(T·k·in·d)`` for ``T`` tokens and top-``k``
routing) or on the weight (``W_e·blockdiag(I + Δ_e)`` once per forward, ``O(E·out·in·d)``, amortised over all tokens
routed to ``e``). This layer uses the weight form through ``torch.nn.utils.parametrize``, as PEFT's LoRA
``ParamWrapper`` does, because (1) it leaves the experts module's own forward untouched, so it works with every
experts implementation transformers dispatches to (the eager loop, ``grouped_mm``, ``batched_mm``, hub kernels) and
every layout (gpt-oss's transposed, interleaved gate/up with biases) — the input form would mean rewriting each
architecture's expert loop; (2) forward and merge are then the same computation, so merged and unmerged models agree
to rounding. The price, measured on a small MoE on CPU (``benchmarks/moe_transform.py``: E=8, top-2, hidden 256,
intermediate 512): a training step of the experts block takes 141 ms (weight form, ``grouped_mm``) vs 101 ms (input
form, a hand-written expert loop) at 1024 tokens, and 322 vs 263 ms at 4096 tokens — the weight form's extra work is
fixed per step (``E·out·in·d``) while the input form's grows with the tokens (``T·k·in·d``), so the gap closes as
batches grow. Relative to the experts' own matmuls (``T·k·out·in``) the weight form adds ``E·d / (T·k)`` and the
input form ``d / out``: for Mixtral (E=8, top-2, d=64) at 8k tokens 3 % vs 0.2 %, for Qwen3-30B-A3B (E=128, top-8,
d=64) 12 % vs 4 % — an input-form fast path for the common (E, out, in) eager layout is the next optimisation for
many-expert models. The weight form also keeps one adapted copy of each layer's stack for backward (as LoRA's
``ParamWrapper`` does); with gradient checkpointing that is one layer's stack at a time.

PEFT's targeting machinery (``BaseTuner._inject_parameters``) finds the parameters, nests one wrapper per parameter of
the same module, and recognises an existing wrapper by the class name ``ParamWrapper`` — hence this class's name.
Mixed-adapter batches (``adapter_names``) are refused: every row would need its own copy of the expert weights
(PEFT's LoRA refuses them for parameter targets too).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.utils.integrations import gather_params_ctx
from torch import nn
from torch.nn.utils import parametrize

from fura.tuner.layer import FuraLayer, decompose_blocks


class FuraParameterTargetError(TypeError):
    """A ``target_parameters`` entry names a parameter FuRA cannot adapt."""


def expert_view(stack: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The ``(E, out, in)`` view of a stored parameter (``(E, out, in)``, ``(E, in, out)`` or a 2-D ``(out, in)``)."""
    if stack.ndim == 2:
        return stack.unsqueeze(0)
    return stack.transpose(1, 2) if transposed else stack


def stored_layout(view: torch.Tensor, like: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Inverse of :func:`expert_view`: back to the shape the parameter is stored in."""
    if like.ndim == 2:
        return view.squeeze(0)
    return view.transpose(1, 2) if transposed else view


def find_expert_parameters(model: nn.Module) -> list[str]:
    """``target_parameters`` names (``"<module leaf>.<parameter>"``) of every fused expert stack in ``model``.

    A fused stack is a 3-D floating parameter whose first dimension is the ``num_experts`` of the module holding it
    (transformers' experts modules). Routers (2-D) and biases (2-D) are not included.
    """
    names = set()
    for module_name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        if not isinstance(experts, int) or isinstance(module, FuraLayer):
            continue
        unwrapped = module_name.replace(".base_layer", "")  # inside existing wrappers (a second adapter)
        leaf = unwrapped.rsplit(".", 1)[-1] if unwrapped else ""
        for param_name, param in module.named_parameters(recurse=False):
            if param.ndim == 3 and param.shape[0] == experts and param.dtype.is_floating_point and leaf:
                names.add(f"{leaf}.{param_name}")
    return sorted(names)


class _AdaptedStack(nn.Module):
    """Parametrization ``W ↦ W'`` (the adapted stack) registered on the experts module during a forward."""

    def __init__(self, transform: Any) -> None:
        super().__init__()
        self.transform = transform  # a bound method of the wrapper, not a submodule (no cycle in the module tree)

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        return self.transform(stack)


class ParamWrapper(nn.Module, FuraLayer):
    """FuRA on one parameter of a module, e.g. the ``gate_up_proj`` stack of an experts module (see module docstring).

    Each wrapper adapts exactly one parameter; several parameters of one module are adapted by nested wrappers, as
    PEFT's ``target_parameters`` machinery builds them. ``self.out_features`` / ``self.in_features`` are one expert's.
    """

    target_kind = "parameter"

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """False: a fused expert stack (E, out, in) is no single matrix that a LoRA adapter could replace."""
        return False

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        parameter_name: str,
        plan: Any,
        module_name: str = "",
        **kwargs: Any,
    ) -> None:
        self.parameter_name = parameter_name
        super().__init__()
        FuraLayer.__init__(self, base_layer, module_name=module_name)
        self.register_load_state_dict_post_hook(FuraLayer._after_load)
        self._stack_backup: torch.Tensor | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, plan, **kwargs)

    # ------------------------------------------------------------------ the parameter

    @staticmethod
    def expert_shape(module: nn.Module, parameter_name: str, module_name: str) -> tuple[int, int]:
        """``(out, in)`` of one expert of ``module.<parameter_name>``; a clear error for what FuRA cannot adapt."""
        holder = _innermost(module)
        param = getattr(holder, parameter_name, None)
        usable = isinstance(param, torch.Tensor) and param.ndim in (2, 3) and param.dtype.is_floating_point
        if not usable or "bias" in parameter_name:  # a per-expert bias (E, out) is 2-D but no weight
            shape = None if param is None else tuple(param.shape)
            raise FuraParameterTargetError(
                f"FuRA cannot adapt parameter '{module_name}' (shape {shape}): target_parameters must name 2-D "
                "(out, in) weights or 3-D (experts, out, in) / (experts, in, out) stacks of floating point numbers, "
                "not biases. Fix: leave it out of target_parameters."
            )
        _, out_features, in_features = expert_view(param, bool(getattr(holder, "is_transposed", False))).shape
        return int(out_features), int(in_features)

    def _target_shape(self, base_layer: nn.Module, module_name: str) -> tuple[int, int]:
        shape = self.expert_shape(base_layer, self.parameter_name, module_name)
        holder = _innermost(base_layer)
        self.is_transposed = bool(getattr(holder, "is_transposed", False))
        param = getattr(holder, self.parameter_name)
        self.num_experts = 1 if param.ndim == 2 else int(param.shape[0])
        return shape

    def target_weight(self) -> torch.Tensor:
        """The stored parameter itself (never its parametrized value)."""
        base = self.get_base_layer()
        if parametrize.is_parametrized(base, self.parameter_name):
            return base.parametrizations[self.parameter_name].original
        return getattr(base, self.parameter_name)

    def block_layout(self, adapter_name: str) -> tuple[int, int, int]:
        """``(E·k, d, r)``: the blocks of all experts, expert-major."""
        k, d, r = FuraLayer.block_layout(self, adapter_name)
        return self.num_experts * k, d, r

    def _per_expert_blocks(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``(E, k, out, d)`` (input side) or ``(E, k, d, in)`` (output side) views of an ``(E, out, in)`` stack."""
        k, d, _ = FuraLayer.block_layout(self, adapter_name)
        experts = weight.shape[0]
        if self.side(adapter_name) == "input":
            return weight.reshape(experts, self.out_features, k, d).transpose(1, 2)
        return weight.reshape(experts, k, d, self.in_features)

    def decompose_base(self, adapter_name: str, convert_mode: str = "svd") -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's block decomposition, one expert at a time (bounded memory), stacked expert-major."""
        _, _, r = self.block_layout(adapter_name)
        param = self.target_weight()
        bases, sigmas = [], []
        with torch.no_grad(), gather_params_ctx(param, modifier_rank=None):
            view = expert_view(param.data, self.is_transposed)
            for expert in range(self.num_experts):
                blocks = self._per_expert_blocks(view[expert : expert + 1], adapter_name)[0]
                basis, sigma = decompose_blocks(
                    blocks, r, self.side(adapter_name), convert_mode, f"{self.module_name}[expert {expert}]"
                )
                bases.append(basis)
                sigmas.append(sigma)
        return torch.cat(bases), torch.cat(sigmas)

    def base_mismatch(self, adapter_name: str) -> float:
        """:meth:`FuraLayer.base_mismatch` over the blocks of every expert."""
        frozen = self.fura_basis[adapter_name]
        param = self.target_weight()
        with torch.no_grad(), gather_params_ctx(param, modifier_rank=None):
            view = expert_view(param.data, self.is_transposed).to(torch.float32)
            blocks = self._per_expert_blocks(view, adapter_name).flatten(0, 1)  # (E·k, out, d) or (E·k, d, in)
            top = frozen.basis[:, :, 0].to(torch.float32)  # (E·k, d)
            if self.side(adapter_name) == "input":
                norms = torch.einsum("bod,bd->bo", blocks, top).norm(dim=-1)
            else:
                norms = torch.einsum("bdi,bd->bi", blocks, top).norm(dim=-1)
        sigma = frozen.sigma[:, 0].to(torch.float32)
        return ((norms - sigma).abs() / sigma.clamp_min(torch.finfo(sigma.dtype).tiny)).median().item()

    # ------------------------------------------------------------------ the transform

    def _transform_view(self, view: torch.Tensor, adapter_name: str, *, inverse: bool = False) -> torch.Tensor:
        """``W_e (I + blockdiag(Δ_e))`` (input side) or ``(I + blockdiag(Δ_eᵀ)) W_e`` of an ``(E, out, in)`` view.

        ``inverse`` applies ``(I + Δ)⁻¹`` instead (unmerging without a kept copy). Computed in the view's dtype.
        """
        k, d, _ = FuraLayer.block_layout(self, adapter_name)
        delta = self.delta_blocks(adapter_name).reshape(self.num_experts, k, d, d)
        if inverse:
            eye = torch.eye(d, dtype=delta.dtype, device=delta.device)
            inverse_dtype = torch.promote_types(delta.dtype, torch.float32)
            factor = delta if self.side(adapter_name) == "input" else delta.transpose(-1, -2)
            delta = torch.linalg.inv((eye + factor).to(inverse_dtype)) - eye
            delta = delta if self.side(adapter_name) == "input" else delta.transpose(-1, -2)
        delta = delta.to(view.dtype)
        blocks = self._per_expert_blocks(view, adapter_name)
        if self.side(adapter_name) == "input":
            moved = blocks + torch.einsum("ekod,ekdf->ekof", blocks, delta)  # (E, k, out, d)
            return moved.transpose(1, 2).reshape(view.shape)
        moved = blocks + torch.einsum("ekfd,ekfi->ekdi", delta, blocks)  # (E, k, d, in)
        return moved.reshape(view.shape)

    def adapted_stack(self, stack: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """The stored parameter with the adapters applied in order (as :meth:`merge` would leave it)."""
        view = expert_view(stack, self.is_transposed)
        for name in adapter_names:
            view = self._transform_view(view, name)
        return stored_layout(view, stack, self.is_transposed)

    @contextmanager
    def _parametrized(self, adapter_names: list[str]) -> Iterator[None]:
        """Make the experts module see the adapted stack for the duration of one forward (gradients flow to FuRA)."""
        base = self.get_base_layer()
        original = self.target_weight()
        proxy = _AdaptedStack(lambda stack: self.adapted_stack(stack, adapter_names))
        requires_grad = original.requires_grad
        parametrize.register_parametrization(base, self.parameter_name, proxy)
        base.parametrizations[self.parameter_name].original.requires_grad_(requires_grad)
        try:
            with parametrize.cached():
                yield
        finally:
            chain = base.parametrizations[self.parameter_name]
            if len(chain) == 1:
                parametrize.remove_parametrizations(base, self.parameter_name, leave_parametrized=False)
            else:
                del chain[next(index for index, item in enumerate(chain) if item is proxy)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                f"FuRA parameter target '{self.module_name}': mixed-adapter batches (adapter_names) are not supported "
                "for target_parameters (every row would need its own copy of the expert weights). Fix: run one "
                "adapter per batch (set_adapter)."
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        active = [name for name in self.active_adapters if name in self.fura_core]
        if self.merged or not active:
            return self.base_layer(*args, **kwargs)
        for name in active:
            self._check_ready(name)
        with self._parametrized(active):
            return self.base_layer(*args, **kwargs)

    # ------------------------------------------------------------------ merge

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``ΔW`` in the parameter's stored layout: the adapted stack minus the stored one."""
        param = self.target_weight()
        with torch.no_grad():
            return self.adapted_stack(param.data, [adapter_name]) - param.data

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        """Write the adapted stack into the parameter; the first merge keeps the original for a bit-exact unmerge."""
        param = self.target_weight()
        with torch.no_grad(), gather_params_ctx(param, modifier_rank=None):
            new_stack = self.adapted_stack(param.data, [adapter_name])
            if safe_merge:
                self._check_finite(adapter_name, new_stack)
            if self._stack_backup is None and self._keeps_original():
                self._stack_backup = param.data.clone()
            param.data.copy_(new_stack)

    def unmerge(self) -> None:
        """Restore the kept original bit for bit, or apply the inverse transforms in reverse order."""
        if not self.merged:
            return
        param = self.target_weight()
        with torch.no_grad(), gather_params_ctx(param, modifier_rank=None):
            if self._stack_backup is not None:
                param.data.copy_(self._stack_backup)
                self._stack_backup = None
                self.merged_adapters.clear()
                return
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                view = self._transform_view(expert_view(param.data, self.is_transposed), name, inverse=True)
                param.data.copy_(stored_layout(view, param.data, self.is_transposed))

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """PEFT's unload hook: merge this wrapper and every nested one, return the original module."""
        layer: nn.Module = self
        while isinstance(layer, ParamWrapper):
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            layer = layer.base_layer
        return layer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._note_loaded_adapters(state_dict, prefix)

    def __repr__(self) -> str:
        rep = super().__repr__()
        cut = rep.find("(") + 1
        return f"fura.{rep[:cut]}\n  parameter_name='{self.parameter_name}',{rep[cut:]}"


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, ParamWrapper):
        module = module.base_layer
    return module
