r"""The FuRA tuner layer: block-wise SVD adaptation in the implicit form ``W = W0 · blockdiag(T)``.

Math (``output_one_block``, the default). The weight ``W0: (out, in)`` is cut into ``n`` column
blocks ``W0_j: (out, b)`` with thin SVDs ``W0_j = U_j diag(σ_j) V_jᵀ`` (``U_j: (out, r)``,
``V_j: (b, r)``). FuRA trains ``W_j = U_j diag(s_j) R_j`` with ``U_j`` frozen and ``s_j: (r,)``,
``R_j: (r, b)`` trainable, initialised at ``s_j = σ_j``, ``R_j = V_jᵀ``. Because
``U_j = W0_j V_j diag(1/σ_j)``,

    W_j = W0_j (I + Δ_j),   Δ_j = V_j (diag(s_j/σ_j) R_j − V_jᵀ)      (b × b)

so the layer computes ``y = base_layer(x + blockdiag(Δ) x)``: the large core ``U`` is never
stored, the base layer (possibly quantised) is never touched, and ``Δ`` is exactly zero at
initialisation, so the adapted model starts bit-identical to the base model in any dtype.
``input_one_block`` is the mirror image on ``m`` row blocks ``W0_i: (a, in)``: the trained core is
the output side, ``W_i = (I + Δ_iᵀ) W0_i`` and ``y = z + blockdiag(Δᵀ)(z − bias)`` with
``z = base_layer(x)``.

The other ``s_merged_to`` placements only change which scalings sit on the trained core:
``W_j = U_j diag(f) R_j`` with ``R_j`` initialised at ``diag(g) V_jᵀ`` and ``f·g = σ``
(``keep_trainable``: ``f = s`` trainable, ``g = 1``; ``frozen``: ``f = σ``, ``g = 1``;
``trainable``: ``f = 1``, ``g = σ``; ``split``: ``f = g = √σ``). In every case

    Δ_j = V_j (diag(c) R_j − diag(c₀) diag(g) V_jᵀ),   c = f/σ,  c₀ = f_init/σ,

and both terms are computed by the same floating-point operations, so ``Δ`` is exactly 0 at init.

Stored per adapter (all small): the trainable core ``R`` as ``fura_core[name].weight: (k, r, d)``,
the trainable ``s`` as ``fura_core[name].scale: (k, r)`` (``keep_trainable`` only), and the frozen
``V`` / ``σ`` as ``fura_basis[name].basis: (k, d, r)`` / ``.sigma: (k, r)``, where ``k`` blocks of
width ``d`` tile the transformed side. For truncated ranks (``r < min(a, b)``) the delta form
keeps the residual ``W0_j − W0_j V_j V_jᵀ`` frozen and reparameterises the top-``r`` part, where
the reference truncates the weight itself.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from fura.tuner import base_weight
from fura.tuner.factorize import BlockPlan, block_qr, block_svd, decomposition_dtype

#: Relative tolerance below which a singular value counts as zero (times max block dimension).
ZERO_SIGMA_RTOL = torch.finfo(torch.float32).eps
#: Base check (see :meth:`FuraLayer.base_mismatch`): the median over blocks of ``| ||W0_j v_j1|| / σ_j1 − 1 |``.
#: Measured on tall (8192×64), wide (64×8192) and square random layers (asserted in
#: ``tests/tuner/test_peft_conventions.py``) and on SmolLM2-135M's q/k/up/down projections (layer 3's adapter on
#: layer 20's weight as the foreign base): the same base gives ≤ 6e-5 after bf16 rounding and ≤ 5.1e-3 after NF4
#: quantisation; a foreign base of the same shape gives ≥ 3.2e-2 (the tall random layer, SmolLM2's up_proj) and up to
#: 0.58. Above :data:`BASE_MISMATCH_RTOL` an adapter is refused; between :data:`BASE_APPROXIMATE_RTOL` and it, it is
#: accepted with a warning (e.g. a 4-bit copy of its base).
BASE_MISMATCH_RTOL = 1.5e-2
BASE_APPROXIMATE_RTOL = 2e-3
#: Relative scale of PEFT's ``init_weights=False`` perturbation of the trainable tensors.
PERTURBATION_SCALE = 0.1
#: Slices a merged weight is computed in (:meth:`FuraLayer._merged_weight`): temporaries of ~1/64 of the weight each.
MERGE_CHUNKS = 64
#: Value of ``adapter_names`` that routes a row of a mixed batch through the base model only (PEFT's convention).
BASE_ROW = "__base__"


class FuraWeightsMissingError(RuntimeError):
    """An adapter created without its decomposition (``weights_in_file``) ran before its weights were loaded."""


class FuraBaseMismatchError(ValueError):
    """Loaded adapter weights do not belong to this base model."""


class FuraCore(nn.Module):
    """The trainable tensors of one adapter on one layer.

    ``weight: (k, r, d)`` is the small core (``R_j`` per input block for ``output_one_block``,
    ``L_iᵀ`` per output block for ``input_one_block``); ``scale: (k, r)`` holds the trainable
    singular values under ``keep_trainable``. The name ``weight`` lets PEFT's FSDP auto-wrap policy
    find this module, and the layer reads these tensors only through :meth:`forward`, so an FSDP
    unit around this module is gathered when it is used.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.scale = nn.Parameter(scale) if scale is not None else None

    def forward(
        self,
        initial: torch.Tensor,
        row: torch.Tensor | None,
        initial_row: torch.Tensor,
        valid: torch.Tensor,
        safe_sigma: torch.Tensor,
    ) -> torch.Tensor:
        """``D = diag(c)·core − diag(c₀)·initial``, shape ``(k, r, d)``.

        ``c = row`` for fixed placements; under ``keep_trainable`` ``c = s/σ`` from the trainable
        ``scale`` (0 for numerically zero σ). ``initial`` is the core's bit-exact initial value, so
        ``D`` is exactly 0 before training.
        """
        if self.scale is not None:
            row = torch.where(valid, self.scale / safe_sigma, torch.zeros_like(safe_sigma))
        return self.weight * row.unsqueeze(-1) - initial * initial_row.unsqueeze(-1)


class FuraBasis(nn.Module):
    """The frozen tensors of one adapter: ``basis: (k, d, r)`` (``V`` or ``U``) and ``sigma: (k, r)``.

    They are frozen ``nn.Parameter`` s (not buffers) so that code which copies adapters parameter by
    parameter, such as TRL's reference-adapter copy, carries them along.
    """

    def __init__(self, basis: torch.Tensor, sigma: torch.Tensor) -> None:
        super().__init__()
        self.basis = nn.Parameter(basis, requires_grad=False)
        self.sigma = nn.Parameter(sigma, requires_grad=False)


def apply_block_transform(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, source: torch.Tensor | None = None
) -> torch.Tensor:
    """``x + source_blocks @ (left @ right)`` block by block, for ``x, source: (..., k·d)``.

    ``left: (k, d, r)`` and ``right: (k, r, d)``; ``source`` defaults to ``x``. The cheaper
    association is picked: the dense ``(k, d, d)`` product for many tokens, two thin matmuls for
    few (decoding); both give the same result up to rounding and exactly ``x`` when the factors
    are zero.
    """
    num_blocks, block, rank = left.shape
    tokens = x.numel() // (num_blocks * block)
    source = x if source is None else source
    batched = source.reshape(tokens, num_blocks, block).transpose(0, 1)  # (k, T, d) view, no copy
    if tokens * block + block * rank < 2 * tokens * rank:
        delta = torch.bmm(batched, torch.bmm(left, right))
    else:
        delta = torch.bmm(torch.bmm(batched, left), right)
    return (x.reshape(tokens, num_blocks, block) + delta.transpose(0, 1)).reshape(x.shape)


class FuraLayer(BaseTunerLayer):
    """State and math shared by FuRA layers (see the module docstring for the equations)."""

    adapter_layer_names = ("fura_core",)
    #: What the adapted weight belongs to, in messages (``parameter`` for :class:`fura.tuner.experts.ParamWrapper`).
    target_kind = "module"
    other_param_names = (
        "fura_basis",
        "fura_plan",
        "fura_placement",
        "fura_convert_mode",
        "fura_check_base",
        "fura_exact_unmerge",
    )

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        self.base_layer = base_layer
        self.fura_core = nn.ModuleDict({})
        self.fura_basis = nn.ModuleDict({})
        self.fura_plan: dict[str, BlockPlan] = {}
        self.fura_placement: dict[str, str] = {}
        self.fura_convert_mode: dict[str, str] = {}
        self.fura_check_base: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.module_name = module_name
        self.out_features, self.in_features = self._target_shape(base_layer, module_name)
        self._unverified: set[str] = set()
        self._merge_backup: base_weight.WeightBackup | None = None
        self.fura_exact_unmerge: dict[str, bool] = {}
        #: False while the model unloads (merge_and_unload): the layer is discarded, no original needs keeping
        self._keep_merge_backup = True
        self._just_loaded: set[str] = set()

    # ------------------------------------------------------------------ creation / init

    def _target_shape(self, base_layer: nn.Module, module_name: str) -> tuple[int, int]:
        """``(out, in)`` of the adapted weight; refuses unsupported layers (overridden for parameter targets)."""
        base_weight.check_supported(base_layer, module_name)
        return base_weight.layer_shape(base_layer)

    def target_weight(self) -> torch.Tensor:
        """The stored base tensor this adapter transforms (the layer's ``weight``; a fused expert stack for
        :class:`fura.tuner.experts.ParamWrapper`), read for its device and dtype."""
        return self.get_base_layer().weight

    def side(self, adapter_name: str) -> str:
        """``"input"`` if the adapter transforms the layer input (output_one_block), else ``"output"``."""
        return "input" if self.fura_plan[adapter_name].decomp_mode == "output_one_block" else "output"

    def block_layout(self, adapter_name: str) -> tuple[int, int, int]:
        """``(k, d, r)``: blocks on the transformed side, their width, and the rank."""
        plan = self.fura_plan[adapter_name]
        if plan.decomp_mode == "output_one_block":
            return plan.in_blocks, plan.in_block_size, plan.rank
        return plan.out_blocks, plan.out_block_size, plan.rank

    def update_layer(
        self,
        adapter_name: str,
        plan: BlockPlan,
        *,
        placement: str,
        convert_mode: str = "svd",
        init_weights: bool = True,
        decompose: bool = True,
        check_base_model: bool = True,
        exact_unmerge: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Create the adapter's tensors and, when ``decompose``, compute the block decomposition.

        ``plan`` and ``placement`` (:meth:`fura.tuner.config.ModuleSpecs.placement`) come from a validated
        :class:`~fura.tuner.config.FuraConfig`: an implicit-form mode, and no ``keep_trainable`` under ``qr``.
        ``init_weights=True`` starts at the exact identity (``Δ = 0``); ``False`` follows PEFT's convention: the
        decomposition is computed and the trainable tensors start at a random perturbation of the identity
        (:meth:`perturb`), so the adapter changes the layer (PEFT uses this to test merging and saving). Without
        ``decompose`` (the weights come from a file, ``FuraConfig.weights_in_file``) or on a meta base weight
        (``low_cpu_mem_usage``) nothing is computed: the tensors are an exact no-op placeholder (or on meta) and the
        adapter refuses to run until its weights are loaded.
        """
        self.fura_plan[adapter_name] = plan
        self.fura_placement[adapter_name] = placement
        self.fura_check_base[adapter_name] = check_base_model
        self.fura_convert_mode[adapter_name] = convert_mode
        self.fura_exact_unmerge[adapter_name] = exact_unmerge
        weight = self.target_weight()
        self._create_placeholder(adapter_name, weight.device, weight.device.type == "meta")
        # meta: a meta base weight, or adapter tensors created under low_cpu_mem_usage (accelerate's init_empty_weights)
        on_meta = self.fura_core[adapter_name].weight.device.type == "meta"
        if decompose and not on_meta:
            self.reset_from_base(adapter_name, convert_mode)
            if not init_weights:
                self.perturb(adapter_name)
        else:
            self._unverified.add(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _adapter_dtype(self) -> torch.dtype:
        weight = self.target_weight()
        return decomposition_dtype(weight.dtype) if weight.dtype.is_floating_point else torch.float32

    def _create_placeholder(self, adapter_name: str, device: torch.device, on_meta: bool) -> None:
        """Identity basis, unit σ and s, core = basisᵀ: ``Δ = 0`` exactly, no decomposition needed."""
        k, d, r = self.block_layout(adapter_name)
        dtype = self._adapter_dtype()
        device = torch.device("meta") if on_meta else device
        eye = torch.eye(d, r, dtype=dtype, device=device)
        basis = eye.expand(k, d, r).contiguous()
        sigma = torch.ones(k, r, dtype=dtype, device=device)
        core = basis.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # never a view of the basis
        scale = sigma.clone() if self.fura_placement[adapter_name] == "keep_trainable" else None
        self.fura_basis[adapter_name] = FuraBasis(basis, sigma)
        self.fura_core[adapter_name] = FuraCore(core, scale)

    def decompose_base(self, adapter_name: str, convert_mode: str = "svd") -> tuple[torch.Tensor, torch.Tensor]:
        """Block decomposition of the base weight on its own device: ``basis (k, d, r)``, ``σ (k, r)``."""
        plan = self.fura_plan[adapter_name]
        k, d, r = self.block_layout(adapter_name)
        base = self.get_base_layer()
        with base_weight.gathered(base):
            weight = base_weight.read_dense_weight(base)
            if self.side(adapter_name) == "input":
                blocks = weight.reshape(plan.out_features, k, d).transpose(0, 1)  # (k, out, d)
            else:
                blocks = weight.reshape(k, d, plan.in_features)  # (k, d, in)
            return decompose_blocks(blocks, r, self.side(adapter_name), convert_mode, self.module_name)

    def reset_from_base(self, adapter_name: str, convert_mode: str = "svd") -> None:
        """(Re)initialise the adapter from the block decomposition of the current base weight."""
        basis, sigma = self.decompose_base(adapter_name, convert_mode)
        self.load_decomposition(adapter_name, basis, sigma)

    def load_decomposition(self, adapter_name: str, basis: torch.Tensor, sigma: torch.Tensor) -> None:
        """Set ``basis``/``σ`` and put the trainable tensors at their exact-no-op initial values."""
        frozen, trainable = self.fura_basis[adapter_name], self.fura_core[adapter_name]
        dtype = frozen.basis.dtype
        with torch.no_grad():
            frozen.basis.data = basis.to(dtype).contiguous()
            frozen.sigma.data = sigma.to(dtype).contiguous()
            gain = self._scalings(adapter_name)[4]
            # a copy: for rank 1 (or blocks of width 1) the transpose is already contiguous and .contiguous() would
            # return a view, so training the core would move the frozen basis with it
            trainable.weight.data = self._initial_core(frozen.basis, gain).clone(memory_format=torch.contiguous_format)
            if trainable.scale is not None:
                trainable.scale.data = frozen.sigma.detach().clone()
        self._unverified.discard(adapter_name)
        self._warn_zero_singular_values(adapter_name)

    def perturb(self, adapter_name: str, scale: float = PERTURBATION_SCALE) -> None:
        """Move the trainable tensors to a random point near the identity (PEFT's ``init_weights=False``).

        ``core += scale · N(0, 1/d)`` entry-wise (each row of the initial core has unit norm, so each row moves by
        about ``scale`` relative) and, under ``keep_trainable``, ``s ← s · (1 + scale · N(0, 1))``. Draws come from
        torch's global generator, so a seeded run is reproducible; the frozen basis and σ are not touched.
        """
        trainable = self.fura_core[adapter_name]
        _, d, _ = self.block_layout(adapter_name)
        with torch.no_grad():
            noise = torch.randn(trainable.weight.shape, dtype=torch.float32).to(trainable.weight)
            trainable.weight.add_(noise, alpha=scale / d**0.5)
            if trainable.scale is not None:
                factor = torch.randn(trainable.scale.shape, dtype=torch.float32).to(trainable.scale)
                trainable.scale.mul_(1 + scale * factor)

    def cast_adapter(self, adapter_name: str, dtype: torch.dtype) -> None:
        """Store the adapter's tensors in ``dtype`` (PEFT's ``autocast_adapter_dtype=False`` keeps the base dtype).

        The core and its initial value are rounded by the same cast, so ``Δ`` stays exactly 0 at the identity.
        Parameters are replaced (not changed in place), as PEFT does, and keep their ``requires_grad``.
        """
        for owner in (self.fura_core[adapter_name], self.fura_basis[adapter_name]):
            for name, param in list(owner.named_parameters(recurse=False)):
                if param.dtype != dtype and param.dtype.is_floating_point:
                    setattr(owner, name, nn.Parameter(param.data.to(dtype), requires_grad=param.requires_grad))

    @staticmethod
    def _initial_core(basis: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
        """``diag(g) · basisᵀ``: the trained core at init (recomputed bit-identically in forward)."""
        transposed = basis.transpose(1, 2)
        return transposed * gain.unsqueeze(-1) if gain is not None else transposed

    def _warn_zero_singular_values(self, adapter_name: str) -> None:
        sigma = self.fura_basis[adapter_name].sigma
        dead = int((~self._valid_directions(sigma)).sum())
        if dead:
            warnings.warn(
                f"FuRA: module '{self.module_name}' has {dead} of {sigma.numel()} block singular values that are zero "
                "(rank-deficient blocks). Those directions cannot leave the base weight's column space in the "
                "implicit form and are frozen (their s and core rows get no gradient).",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ the transform

    def _valid_directions(self, sigma: torch.Tensor) -> torch.Tensor:
        """Directions whose singular value is not numerically zero (relative to the block's largest)."""
        largest = sigma.amax(dim=-1, keepdim=True)
        return sigma > largest * max(self.out_features, self.in_features) * ZERO_SIGMA_RTOL

    def _scalings(
        self, adapter_name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The frozen scalings of the placement: ``(valid, safe σ, c, c₀, g)``.

        ``c`` is ``None`` under ``keep_trainable`` (it comes from the trainable ``s``, see
        :meth:`FuraCore.forward`); ``g = None`` means 1. Zero singular values get ``c = c₀ = 0``.
        """
        sigma = self.fura_basis[adapter_name].sigma
        placement = self.fura_placement[adapter_name]
        valid = self._valid_directions(sigma)
        safe = torch.where(valid, sigma, torch.ones_like(sigma))
        zero = torch.zeros_like(sigma)
        if placement == "keep_trainable":
            return valid, safe, None, torch.where(valid, safe / safe, zero), None
        if placement == "frozen":
            c = valid.to(sigma.dtype)
            return valid, safe, c, c, None
        if placement == "trainable":
            c = torch.where(valid, 1.0 / safe, zero)
            return valid, safe, c, c, sigma
        c = torch.where(valid, 1.0 / safe.sqrt(), zero)
        return valid, safe, c, c, sigma.clamp_min(0).sqrt()

    def _core_delta(self, adapter_name: str) -> torch.Tensor:
        """``D = diag(c)·core − diag(c₀)·diag(g)·basisᵀ``, shape ``(k, r, d)``; exactly 0 at init."""
        valid, safe, row, initial_row, gain = self._scalings(adapter_name)
        initial = self._initial_core(self.fura_basis[adapter_name].basis, gain)
        return self.fura_core[adapter_name](initial, row, initial_row, valid, safe)

    def delta_blocks(self, adapter_name: str) -> torch.Tensor:
        """``Δ = basis @ D``, shape ``(k, d, d)``, in the adapter's dtype."""
        return torch.bmm(self.fura_basis[adapter_name].basis, self._core_delta(adapter_name))

    def _row_factors(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` with ``left @ right = G``, the right-multiplier of the row-vector blocks.

        Input side: ``x_j ← x_j + x_j Δ_jᵀ`` so ``G = Dᵀ · basisᵀ``; output side:
        ``z_i ← z_i + (z_i − bias_i) Δ_i`` so ``G = basis · D``.
        """
        delta = self._core_delta(adapter_name)
        basis = self.fura_basis[adapter_name].basis
        if self.side(adapter_name) == "input":
            left, right = delta.transpose(1, 2), basis.transpose(1, 2)
        else:
            left, right = basis, delta
        return left.to(dtype), right.to(dtype)

    def _check_ready(self, adapter_name: str) -> None:
        if adapter_name in self._unverified:
            self.verify_adapter(adapter_name)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer`` with the active adapters' block transforms around it.

        ``adapter_names`` (a list with one adapter name, or ``"__base__"``, per row of the batch; injected by
        :meth:`FuraModel._enable_peft_forward_hooks` from ``model(..., adapter_names=...)`` / ``generate``) routes each
        row through its own adapter instead (:meth:`mixed_batch_forward`).
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            return self.mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.fura_core]
        for name in active:
            self._check_ready(name)
        # input-side transforms compose right to left (W0 (I+Δa)(I+Δb) applies b first)
        for name in reversed(active):
            if self.side(name) == "input":
                self._check_input(x, name)
                x = apply_block_transform(x, *self._row_factors(name, x.dtype))
        result = self.base_layer(x, *args, **kwargs)
        outputs = [name for name in active if self.side(name) == "output"]
        if outputs:
            bias = self.get_base_layer().bias
            for name in outputs:
                centred = result - bias.to(result.dtype) if bias is not None else result
                result = apply_block_transform(result, *self._row_factors(name, result.dtype), source=centred)
        return result

    def mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        """Each row ``x[i]`` through adapter ``adapter_names[i]`` alone (``"__base__"``, or an adapter this layer does
        not have: the base layer only), with one base-layer call for the whole batch.

        Rows of an input-side adapter get ``x_i + blockdiag(Δ) x_i`` before the shared base-layer call; rows of an
        output-side adapter get their transform of the output after it. The result equals running each row with
        its adapter set active.
        """
        self._check_mixed_batch(adapter_names, x.shape[0], "row")
        groups: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(adapter_names):
            if name != BASE_ROW and name in self.fura_core:
                rows = [row for row, row_name in enumerate(adapter_names) if row_name == name]
                groups[name] = torch.tensor(rows, device=x.device)
                self._check_ready(name)
        inputs = x
        for name, rows in groups.items():
            if self.side(name) == "input":
                self._check_input(x, name)
                transformed = apply_block_transform(x[rows], *self._row_factors(name, x.dtype))
                inputs = inputs.index_copy(0, rows, transformed)
        result = self.base_layer(inputs, *args, **kwargs)
        bias = self.get_base_layer().bias
        for name, rows in groups.items():
            if self.side(name) == "output":
                sub = result[rows]
                centred = sub - bias.to(sub.dtype) if bias is not None else sub
                transformed = apply_block_transform(sub, *self._row_factors(name, sub.dtype), source=centred)
                result = result.index_copy(0, rows, transformed)
        return result

    def _check_mixed_batch(self, adapter_names: list[str], batch: int, unit: str) -> None:
        """``adapter_names`` must name one adapter per ``unit`` (row, image) of the batch, on an unmerged layer."""
        if len(adapter_names) != batch:
            raise ValueError(
                f"FuRA module '{self.module_name}': adapter_names has {len(adapter_names)} entries but the batch has "
                f"{batch} {unit}s. Fix: pass one adapter name (or '{BASE_ROW}') per {unit}."
            )
        if self.merged:
            raise ValueError(
                f"FuRA module '{self.module_name}': adapter_names cannot be used while adapters are merged "
                f"({self.merged_adapters}). Fix: call unmerge_adapter() first."
            )

    def _check_input(self, x: torch.Tensor, adapter_name: str) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"FuRA module '{self.module_name}': input has last dimension {x.shape[-1]}, but the layer expects "
                f"in_features={self.in_features}. Fix: pass inputs of shape (..., {self.in_features})."
            )

    # ------------------------------------------------------------------ verification

    def _is_placeholder(self, adapter_name: str) -> bool:
        basis = self.fura_basis[adapter_name].basis
        k, d, r = basis.shape
        eye = torch.eye(d, r, dtype=basis.dtype, device=basis.device)
        return bool(torch.equal(basis, eye.expand(k, d, r)))

    def verify_adapter(self, adapter_name: str) -> None:
        """Check loaded weights: present (not the placeholder) and made from this base weight."""
        frozen = self.fura_basis[adapter_name]
        if frozen.basis.device.type == "meta":
            raise FuraWeightsMissingError(
                f"FuRA adapter '{adapter_name}' on module '{self.module_name}' is still on the meta device: its "
                "weights were never loaded. Fix: load them (PeftModel.from_pretrained / load_adapter)."
            )
        if self._is_placeholder(adapter_name):
            raise FuraWeightsMissingError(
                f"FuRA adapter '{adapter_name}' on module '{self.module_name}' has no weights: it was created from a "
                "config with weights_in_file=True (saved adapter configs record this, because their file holds the "
                "block decomposition) and nothing was loaded into it. Fix: load the weights with "
                "PeftModel.from_pretrained / model.load_adapter, or set config.weights_in_file=False to start a "
                "fresh adapter from the block SVD."
            )
        if self.fura_check_base[adapter_name] and self.fura_convert_mode[adapter_name] == "svd":
            self._check_base_match(adapter_name)
        self._unverified.discard(adapter_name)

    def base_mismatch(self, adapter_name: str) -> float:
        """How far the stored decomposition is from this base weight: ``median_j | ||W0_j v_j1|| / σ_j1 − 1 |``.

        For the base the adapter was made on, ``W0_j v_j1 = σ_j1 u_j1`` exactly, so the statistic is rounding error
        (≈1e-8 in float32); see :data:`BASE_MISMATCH_RTOL` for what same and foreign bases measure. One matmul of
        the weight with the top stored direction of each block; no decomposition.
        """
        frozen = self.fura_basis[adapter_name]
        k, d, _ = self.block_layout(adapter_name)
        base = self.get_base_layer()
        with torch.no_grad(), base_weight.gathered(base):
            weight = self._unmerged_base_weight(base).to(torch.float32)
            top = frozen.basis[:, :, 0].to(torch.float32)  # (k, d)
            if self.side(adapter_name) == "input":
                norms = torch.einsum("okd,kd->ko", weight.reshape(-1, k, d), top).norm(dim=-1)
            else:
                norms = torch.einsum("kdi,kd->ki", weight.reshape(k, d, -1), top).norm(dim=-1)
        sigma = frozen.sigma[:, 0].to(torch.float32)
        return ((norms - sigma).abs() / sigma.clamp_min(torch.finfo(sigma.dtype).tiny)).median().item()

    def _unmerged_base_weight(self, base: nn.Module) -> torch.Tensor:
        """The base weight before any merge: the kept original while merged (``exact_unmerge``), else the current."""
        if self._merge_backup is not None:
            return base_weight.read_backup_weight(base, self._merge_backup)
        return base_weight.read_dense_weight(base)

    def _check_base_match(self, adapter_name: str) -> None:
        """Refuse an adapter made on another base; warn when it fits only approximately (a quantised copy)."""
        rel = self.base_mismatch(adapter_name)
        if not rel <= BASE_MISMATCH_RTOL:
            raise FuraBaseMismatchError(
                f"FuRA adapter '{adapter_name}' does not fit module '{self.module_name}' "
                f"(weight {self.out_features}x{self.in_features}): its stored singular vectors give "
                f"||W0 v|| off from the stored singular values by {rel:.2%} (median over blocks; the same base gives "
                f"< {BASE_APPROXIMATE_RTOL:.1%}, a 4-bit copy of it < {BASE_MISMATCH_RTOL:.1%}). The adapter was made "
                "on a different base model. Fix: load it onto the base model named in adapter_config.json "
                "(base_model_name_or_path), or set check_base_model=False in the config if this is intended."
            )
        rounding = BASE_APPROXIMATE_RTOL + torch.finfo(self.fura_basis[adapter_name].sigma.dtype).eps
        if rel > rounding:
            warnings.warn(
                f"FuRA adapter '{adapter_name}' fits module '{self.module_name}' only approximately ({rel:.2%} off, "
                f"where the base it was made on gives < {BASE_APPROXIMATE_RTOL:.1%}): is this a quantised copy of its "
                "base? The adapter is applied as is; results differ from those on the original base.",
                stacklevel=4,
            )

    def _note_loaded_adapters(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Note which adapters a state dict brings, so the post-load hook can check them."""
        marker = prefix + "fura_basis."
        for key in state_dict:
            if key.startswith(marker):
                self._just_loaded.add(key[len(marker) :].split(".", 1)[0])

    @staticmethod
    def _after_load(layer: FuraLayer, incompatible_keys: Any) -> None:
        """Post-load hook: check every adapter that was just loaded (raises on a foreign base)."""
        loaded, layer._just_loaded = layer._just_loaded, set()
        for name in loaded:
            if name in layer.fura_basis:
                layer._unverified.add(name)
                if not layer._is_placeholder(name):
                    layer.verify_adapter(name)

    # ------------------------------------------------------------------ merge

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """FuRA's update is the additive ``ΔW = W0·blockdiag(Δ)`` (:meth:`get_delta_weight`), so PEFT's
        ``convert_to_lora`` can approximate it by a truncated SVD (it has no exact low-rank form, see
        :mod:`fura.io.export`)."""
        return True

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        """``W' − W0`` in the adapter's dtype and the base layer's storage layout (PEFT's ``get_additive_delta``,
        which refuses while merged): ``(out, in)``, or ``(in, out)`` for a transformers ``Conv1D``."""
        delta = self.get_delta_weight(adapter_name)
        return delta.T if base_weight.is_conv1d(self.get_base_layer()) else delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``ΔW`` with ``W0 + ΔW`` the adapted weight (depends on the base weight)."""
        base = self.get_base_layer()
        with base_weight.gathered(base):
            weight = base_weight.read_dense_weight(base)
            return self._merged_weight(adapter_name, weight) - weight.to(self.fura_basis[adapter_name].basis.dtype)

    def _merged_weight(self, adapter_name: str, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W (I + blockdiag(Δ))`` (input side) or ``(I + blockdiag(Δᵀ)) W`` (output side), ``(out, in)``.

        Computed in the adapter's dtype, :data:`MERGE_CHUNKS` slices at a time (rows of ``W`` for the input side,
        columns for the output side: each slice's product is independent of the others), each slice rounded to
        ``dtype`` (default: the adapter's) as it is written: the temporaries stay a small fraction of the weight,
        and :meth:`merge` and :meth:`merged_weight` give the same bits because they run this same code.
        """
        delta = self.delta_blocks(adapter_name).detach()
        k, d, _ = self.block_layout(adapter_name)
        flat = weight.reshape(weight.shape[0], -1)  # a convolution's kernel as its (C_out, C_in·kh·kw) matrix
        merged = torch.empty(flat.shape, dtype=dtype or delta.dtype, device=weight.device)
        if self.side(adapter_name) == "input":
            for rows in _slices(flat.shape[0]):
                part = flat[rows].to(delta.dtype).reshape(-1, k, d)
                merged[rows] = (part + torch.einsum("okd,kde->oke", part, delta)).reshape(-1, k * d)
        else:
            view = merged.view(k, d, -1)
            for cols in _slices(flat.shape[1]):
                part = flat[:, cols].to(delta.dtype).reshape(k, d, -1)
                view[:, :, cols] = part + torch.bmm(delta.transpose(1, 2), part)
        return merged.view(weight.shape)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the active adapters folded in, exactly as :meth:`merge` writes it (storage layout and
        dtype, the adapters applied one after another), without changing the layer: one new tensor of the weight's
        size. This is what a weight sync to an inference engine reads, one module at a time, instead of merging the
        whole model (which keeps every targeted weight's original while merged)."""
        if self.merged:
            raise ValueError(f"FuRA module '{self.module_name}' is merged already; read its weight instead.")
        base = self.get_base_layer()
        if base_weight.bnb_kind(base) is not None:
            raise TypeError(
                f"FuRA module '{self.module_name}': merged_weight() is for full-precision base weights; a "
                f"{base_weight.bnb_kind(base)} base re-quantises on merge. Fix: merge_adapter() for quantised bases."
            )
        weight = base.weight
        with torch.no_grad(), base_weight.gathered(base):
            current = base_weight.read_dense_weight(base)
            for name in [name for name in self.active_adapters if name in self.fura_core]:
                self._check_ready(name)
                current = self._merged_weight(name, current, weight.dtype)
            return current.T if base_weight.is_conv1d(base) else current

    def _unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_merged_weight` through ``(I + Δ)⁻¹`` (used when ``exact_unmerge=False``)."""
        delta = self.delta_blocks(adapter_name).detach()
        eye = torch.eye(delta.shape[-1], dtype=delta.dtype, device=delta.device)
        work = weight.to(delta.dtype)
        k, d, _ = self.block_layout(adapter_name)
        inverse_dtype = torch.promote_types(delta.dtype, torch.float32)  # linalg.inv has no half-precision kernel
        if self.side(adapter_name) == "input":
            inverse = torch.linalg.inv((eye + delta).to(inverse_dtype)).to(delta.dtype)
            return torch.einsum("okd,kde->oke", work.reshape(-1, k, d), inverse).reshape(work.shape)
        inverse = torch.linalg.inv((eye + delta.transpose(1, 2)).to(inverse_dtype)).to(delta.dtype)
        return torch.bmm(inverse, work.reshape(k, d, -1)).reshape(work.shape)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base weight: ``W ← W·blockdiag(I + Δ)`` (input side).

        The first merge keeps the original weight (``exact_unmerge``) so :meth:`unmerge` restores
        it bit for bit. ``safe_merge`` computes the result first and refuses non-finite weights.
        """
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.fura_core:
                self._check_ready(name)
                self._merge_adapter(name, safe_merge)
                self.merged_adapters.append(name)

    def _merge_adapter(self, adapter_name: str, safe_merge: bool) -> None:
        """Write the base weight with one adapter folded in, keeping the original at the first merge."""
        base = self.get_base_layer()
        with base_weight.gathered(base):
            current = base_weight.read_dense_weight(base)
            new_weight = self._merged_weight(adapter_name, current, current.dtype)
            if safe_merge:
                self._check_finite(adapter_name, new_weight)
            keep = self._keeps_original()
            backup = base_weight.write_dense_weight(base, new_weight, keep_backup=keep)
            if keep:
                self._merge_backup = backup

    def _check_finite(self, adapter_name: str, merged: torch.Tensor) -> None:
        """``safe_merge``: refuse a merged weight that is not finite (PEFT's "NaNs detected" error), before writing."""
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"NaNs detected in the merged weights: FuRA adapter '{adapter_name}' on {self.target_kind} "
                f"'{self.module_name}' gives non-finite merged weights (shape {tuple(merged.shape)}); the adapter "
                "seems broken. The base weight was left as is. Fix: check the adapter's tensors with torch.isfinite, "
                "or retrain it with a lower learning rate."
            )

    def _keeps_original(self) -> bool:
        """Keep the original weight at the first merge when any adapter of the layer asks for an exact unmerge."""
        wanted = any(self.fura_exact_unmerge.get(name, True) for name in self.fura_core)
        return self._keep_merge_backup and wanted and not self.merged_adapters and self._merge_backup is None

    def unmerge(self) -> None:
        """Undo every merge: restore the kept original weight, or invert the transforms."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        if self._merge_backup is not None:
            base_weight.restore_weight(base, self._merge_backup)
            self._merge_backup = None
            self.merged_adapters.clear()
            return
        with base_weight.gathered(base):
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight = self._unmerged_weight(name, base_weight.read_dense_weight(base))
                base_weight.write_dense_weight(base, weight, keep_backup=False)


class FuraLinear(nn.Module, FuraLayer):
    """FuRA over a linear base layer (``nn.Linear`` or a bitsandbytes 4-/8-bit linear)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, plan: BlockPlan, module_name: str = "", **kwargs):
        super().__init__()
        FuraLayer.__init__(self, base_layer, module_name=module_name)
        self.register_load_state_dict_post_hook(FuraLayer._after_load)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, plan, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.adapted_forward(x, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._note_loaded_adapters(state_dict, prefix)

    def __repr__(self) -> str:
        return "fura." + super().__repr__()


def _slices(size: int) -> list[slice]:
    """``size`` cut into at most :data:`MERGE_CHUNKS` contiguous slices of equal length (the last may be shorter)."""
    step = -(-size // MERGE_CHUNKS)
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


def decompose_blocks(
    blocks: torch.Tensor, rank: int, side: str, convert_mode: str, module_name: str = "<module>"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Basis and σ of ``(k, rows, cols)`` blocks for the transformed ``side``.

    Input side (blocks ``(k, out, d)``): basis = right singular vectors ``V: (k, d, r)``.
    Output side (blocks ``(k, d, in)``): basis = left singular vectors ``U: (k, d, r)``.
    ``qr`` uses an orthonormal basis of the same space with ``σ = 1``.
    """
    if convert_mode == "svd":
        u, s, vh = block_svd(blocks, rank, factors="right" if side == "input" else "left")
        return (vh.transpose(1, 2) if side == "input" else u), s
    rows, cols = blocks.shape[-2:]
    if side == "input":
        if rows < cols:
            raise ValueError(
                f"module '{module_name}': convert_mode='qr' in the implicit form needs out_features >= block size "
                f"({rows} < {cols}). Fix: use convert_mode='svd' or a smaller input block."
            )
        _, right = block_qr(blocks, rank)  # right: (k, r, d) with orthonormal rows
        basis = right.transpose(1, 2)
    else:
        if rows > cols:
            raise ValueError(
                f"module '{module_name}': convert_mode='qr' in the implicit form needs in_features >= block size "
                f"({cols} < {rows}). Fix: use convert_mode='svd' or a smaller output block."
            )
        left, _ = block_qr(blocks, rank)  # left: (k, d, r) orthonormal columns
        basis = left
    ones = torch.ones(basis.shape[0], rank, dtype=basis.dtype, device=basis.device)
    return basis, ones
