r"""FuRA on ``nn.Conv2d``: a block transform of the output channels (the ``input_one_block`` form).

Math. A convolution with weight ``W: (C_out, C_in, kh, kw)`` is a linear map on unfolded input patches with the
matrix ``W_mat: (C_out, P)``, ``P = C_in·kh·kw``: ``z[n, :, h, w] = W_mat · patch(x)[n, h, w] + bias``. The input-side
form of :mod:`fura.tuner.layer` (``W_mat · blockdiag(T)``) would act on patches, i.e. it would need the unfolded input
(``P·H·W`` numbers per image). The output side needs nothing of the kind: cut ``W_mat`` into ``m`` row blocks
``W_i: (a, P)`` (``C_out = m·a``) with thin SVDs ``W_i = U_i diag(σ_i) V_iᵀ`` (``U_i: (a, r)``), train
``W_i = L_i diag(s_i) V_iᵀ`` with ``L_i`` initialised at ``U_i``; since ``V_iᵀ = diag(1/σ_i) U_iᵀ W_i``,

    W_i' = (I + Δ_iᵀ) W_i,   Δ_i = U_i (diag(c) L_iᵀ − diag(c₀) U_iᵀ)                       (a × a)

exactly as for a linear layer's ``input_one_block``. Applied to the output, this is a per-pixel mixing of the output
channels inside each block — a grouped 1×1 convolution with ``m`` groups:

    y[n, :, h, w] = z + blockdiag(Δᵀ) (z − bias),    z = conv(x)          (channels of block i only)

So FuRA's properties hold unchanged: ``Δ`` is exactly 0 at initialisation (the same floating-point operations compute
both terms), merging writes ``blockdiag(I + Δᵀ)·W_mat`` into the kernel (reshaped back to ``(C_out, C_in, kh, kw)``) and
unmerging restores the kept original bit for bit, and every updated filter stays in the span of its block's pretrained
filters (the row space of ``W_i``: the output-side mirror of the linear layer's column-space property). Convolutions
are therefore always planned as ``input_one_block`` (the block split applies to ``C_out``).

Grouped convolutions (``groups > 1``, e.g. depthwise) are refused: an output channel of one group cannot take another
group's filter (it sees other inputs), so the channel mixing would not be a weight of the same convolution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fura.tuner.layer import BASE_ROW, FuraLayer, apply_block_transform


class FuraConv2d(nn.Module, FuraLayer):
    """FuRA over an ``nn.Conv2d`` (see the module docstring): ``y = z + blockdiag(Δᵀ)(z − bias)`` on channels."""

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """False: PEFT's LoRA conversion handles linear layers only."""
        return False

    def __init__(self, base_layer: nn.Module, adapter_name: str, plan: Any, module_name: str = "", **kwargs) -> None:
        super().__init__()
        FuraLayer.__init__(self, base_layer, module_name=module_name)
        self.register_load_state_dict_post_hook(FuraLayer._after_load)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, plan, **kwargs)

    @staticmethod
    def conv_shape(layer: nn.Module, module_name: str) -> tuple[int, int]:
        """``(C_out, C_in·kh·kw)`` of a supported convolution; a clear error for grouped ones."""
        if layer.groups != 1:
            raise TypeError(
                f"FuRA cannot adapt Conv2d '{module_name}' with groups={layer.groups} (grouped / depthwise): mixing "
                "output channels across groups is no weight of the same convolution. Fix: leave it out of "
                "target_modules (or add it to exclude_modules)."
            )
        out_channels, *patch = layer.weight.shape
        return int(out_channels), int(torch.Size(patch).numel())

    def _target_shape(self, base_layer: nn.Module, module_name: str) -> tuple[int, int]:
        return self.conv_shape(base_layer, module_name)

    def _transform_channels(self, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """``z + blockdiag(Δᵀ)(z − bias)`` over the channel axis (dim 1) for each adapter in turn."""
        bias = self.get_base_layer().bias
        channels_last = result.movedim(1, -1)
        for name in adapter_names:
            centred = channels_last - bias.to(channels_last.dtype) if bias is not None else channels_last
            factors = self._row_factors(name, channels_last.dtype)
            channels_last = apply_block_transform(channels_last, *factors, source=centred)
        transformed = channels_last.movedim(-1, 1)
        # keep the base output's memory layout: later convolutions pick their kernels (and summation order) by it
        layout = torch.channels_last if result.is_contiguous(memory_format=torch.channels_last) else None
        if layout is not None and not result.is_contiguous():
            return transformed.contiguous(memory_format=layout)
        return transformed.contiguous()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch(x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.fura_core]
        for name in active:
            self._check_ready(name)
        return self._transform_channels(self.base_layer(x, *args, **kwargs), active)

    def _mixed_batch(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each image through its own adapter (``"__base__"``: the base layer), one convolution for the batch."""
        self._check_mixed_batch(adapter_names, x.shape[0], "image")
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            if name == BASE_ROW or name not in self.fura_core:
                continue
            self._check_ready(name)
            rows = torch.tensor([i for i, row in enumerate(adapter_names) if row == name], device=x.device)
            result = result.index_copy(0, rows, self._transform_channels(result[rows], [name]))
        return result

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._note_loaded_adapters(state_dict, prefix)

    def __repr__(self) -> str:
        return "fura." + super().__repr__()
