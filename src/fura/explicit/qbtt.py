r"""QFuRA: a :class:`~fura.explicit.btt.BlockTTLinear` whose frozen core is stored in 4 bits (NF4 / FP4).

With FuRA's default (``output_one_block``, train the small core) the frozen core is ``btt_l``, the
block bases ``[U_1 … U_n]``: ``in·out`` numbers, as many as the dense weight. Storing it as
bitsandbytes 4-bit blocks (64 values share one absmax; with double quantisation the absmaxes are
themselves 8-bit quantised in groups of 256) cuts it to about 0.5 byte per number, while ``btt_r``,
``btt_s`` and the bias keep their dtype and train as before.

The forward dequantises the whole frozen core to ``compute_dtype`` (``(m, n·r, a)`` for ``btt_l``)
and runs the same two batched products as the dense layer; there is no fused 4-bit GEMM. Quantised
data and statistics are plain buffers (``QuantState.as_dict(packed=True)`` with the packed
metadata under ``quant_state``), so ``state_dict`` / safetensors save and load work on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fura.explicit.btt import BlockTTLinear, btt_forward

LAYOUTS = ("flat", "per_core_block")
_QUANTISABLE = (torch.float32, torch.bfloat16, torch.float16)


def _bnb() -> Any:
    """``bitsandbytes.functional``, imported on first use so that ``import fura`` works without it."""
    try:
        import bitsandbytes.functional as functional
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("QFuRA's NF4 core needs bitsandbytes. Fix: pip install 'fura[quant]'.") from exc
    return functional


class Packed4bit(nn.Module):
    """One bitsandbytes 4-bit tensor: ``packed`` data (two values per byte) plus its quant state as buffers.

    Buffers: ``packed (⌈numel/2⌉, 1) uint8``, ``absmax`` (uint8 with double quantisation, else fp32, one per
    ``blocksize`` values), ``quant_map (16,)``, and with double quantisation ``nested_absmax`` /
    ``nested_quant_map``; ``quant_state`` holds the non-tensor metadata packed as uint8 bytes. The
    buffers follow device moves but never dtype casts (``model.half()`` leaves them intact).
    """

    def __init__(self, values: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64):
        super().__init__()
        if values.dtype not in _QUANTISABLE:
            values = values.float()
        # 1-D input: bitsandbytes' native CPU dequantisation kernel needs an even last dimension
        packed, state = _bnb().quantize_4bit(
            values.reshape(-1).contiguous(),
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )
        self.register_buffer("packed", packed)
        for key, tensor in state.as_dict(packed=True).items():
            # clone: bitsandbytes may share code tensors between states, which safetensors refuses to save
            self.register_buffer(key.split(".")[0], tensor.clone())
        self._meta = _bnb().unpack_tensor_to_dict(self.quant_state)

    @classmethod
    def empty(
        cls, buffers: Mapping[str, tuple[torch.Size, torch.dtype]], device: str | torch.device = "meta"
    ) -> Packed4bit:
        """A placeholder with the given buffer shapes, to be filled by ``load_state_dict`` (no quantisation)."""
        blob = cls.__new__(cls)
        nn.Module.__init__(blob)
        for key, (shape, dtype) in buffers.items():
            blob.register_buffer(key, torch.empty(shape, dtype=dtype, device=device))
        blob._meta = {}
        return blob

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # the packed metadata (JSON bytes) may differ in length from the placeholder's; take the incoming size
        incoming = state_dict.get(prefix + "quant_state")
        if incoming is not None and incoming.shape != self.quant_state.shape:
            self.quant_state = torch.empty(incoming.shape, dtype=torch.uint8, device=self.packed.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if incoming is not None:  # partial (strict=False) loads without our keys leave the metadata alone
            self._meta = _bnb().unpack_tensor_to_dict(self.quant_state)

    @property
    def quant_type(self) -> str:
        """``"nf4"`` or ``"fp4"``."""
        return self._meta["quant_type"]

    def quant_state_object(self) -> Any:
        """The bitsandbytes ``QuantState`` rebuilt from the buffers (on their device)."""
        tensors = {k: v for k, v in self._buffers.items() if k not in ("packed", "quant_state")}
        return _bnb().QuantState.from_dict({**self._meta, **tensors}, device=self.packed.device)

    def dequantize(self) -> torch.Tensor:
        """The values as a flat ``(numel,)`` tensor in the dtype they were quantised from."""
        return _bnb().dequantize_4bit(self.packed, self.quant_state_object()).reshape(-1)

    def _apply(self, fn, recurse: bool = True):
        # follow device moves only: probe fn with an integer tensor, which dtype casts leave alone
        device = fn(torch.empty(0, dtype=torch.uint8, device=self.packed.device)).device
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = buf.to(device)
        return self

    def nbytes(self) -> int:
        """Bytes of data plus statistics (absmax, quant maps, metadata)."""
        return sum(buf.numel() * buf.element_size() for buf in self._buffers.values() if buf is not None)


class QBlockTTLinear(BlockTTLinear):
    """A :class:`BlockTTLinear` with its frozen core in 4 bits; made by :func:`quantize_frozen_core_`.

    Attributes:
        quantized_side: ``"left"`` (``btt_l``) or ``"right"`` (``btt_r``).
        frozen_shape: shape of the quantised core.
        compute_dtype: dtype of the forward computation (the dequantised core, the input and the trained tensors).
        quant_layout: ``flat`` (one 4-bit tensor) or ``per_core_block`` (one per index of the core's dim 0).
        qbtt_frozen: ``nn.ModuleList`` of :class:`Packed4bit`.
    """

    quantized_side: str
    frozen_shape: torch.Size
    compute_dtype: torch.dtype
    quant_layout: str

    def _dequantized_core(self) -> torch.Tensor:
        parts = [blob.dequantize() for blob in self.qbtt_frozen]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return flat.reshape(self.frozen_shape).to(self.compute_dtype)

    def left_core(self) -> torch.Tensor:
        return self._dequantized_core() if self.quantized_side == "left" else self.btt_l

    def right_core(self) -> torch.Tensor:
        return self._dequantized_core() if self.quantized_side == "right" else self.btt_r

    def _set_cores_trainable(self, train_left: bool, train_right: bool) -> int:
        """Only the non-quantised core can train; asking for the quantised one is an error."""
        quantized_left = self.quantized_side == "left"
        wants_quantized, wants_other = (train_left, train_right) if quantized_left else (train_right, train_left)
        if wants_quantized:
            raise ValueError(
                f"module '{self.module_name}': the {self.quantized_side} core is quantised and cannot train. Fix: use "
                "the train_position that was set before quantising, or convert the model again without quantisation."
            )
        core = self.btt_r if quantized_left else self.btt_l
        core.requires_grad_(wants_other)
        return core.numel() * wants_other

    def init_from_linear_weight(self, *args: Any, **kwargs: Any) -> BlockTTLinear:
        raise NotImplementedError(
            f"module '{self.module_name}': a quantised layer cannot be re-initialised. Fix: initialise the "
            "BlockTTLinear first, then call quantize_frozen_core_."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantise the frozen core, cast everything to ``compute_dtype``, run the two-step product."""
        self._check_input(x)
        cdt = self.compute_dtype
        s = None if self.btt_s is None else self.btt_s.to(cdt)
        bias = None if self.bias is None else self.bias.to(cdt)
        y = btt_forward(x.to(cdt), self.right_core().to(cdt), self.left_core().to(cdt), s, self.plan, bias)
        return y.to(x.dtype)

    def quantized_nbytes(self) -> int:
        """Bytes of the 4-bit core including all statistics."""
        return sum(blob.nbytes() for blob in self.qbtt_frozen)

    def extra_repr(self) -> str:
        core = "btt_l" if self.quantized_side == "left" else "btt_r"
        quant_type = self.qbtt_frozen[0].quant_type
        return f"{super().extra_repr()}, {core}={quant_type}/{self.quant_layout}, compute_dtype={self.compute_dtype}"


def _pick_frozen_side(layer: BlockTTLinear) -> str:
    left_frozen, right_frozen = not layer.btt_l.requires_grad, not layer.btt_r.requires_grad
    if left_frozen == right_frozen:
        state = "both frozen" if left_frozen else "both trainable"
        raise ValueError(
            f"module '{layer.module_name}': exactly one core must be frozen to be quantised, but btt_l and btt_r are "
            f"{state}. Fix: call configure_blocktt_trainability(model, train_position='small') (or 'large') first; "
            "train_position='both' leaves nothing to quantise."
        )
    return "left" if left_frozen else "right"


def quantize_frozen_core_(
    layer: BlockTTLinear,
    layout: str = "flat",
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    blocksize: int = 64,
) -> QBlockTTLinear:
    """Store the frozen core of ``layer`` in 4 bits, in place (the layer becomes a :class:`QBlockTTLinear`).

    The frozen core is the one with ``requires_grad=False``; exactly one must be frozen. ``flat``
    quantises the whole core as one vector; ``per_core_block`` quantises each index of its dim 0
    (``m`` for ``btt_l``, ``n`` for ``btt_r``) separately — identical for ``output_one_block`` (``m = 1``).
    Quantisation runs on the core's device (CPU or CUDA); float64 cores are quantised from float32.
    """
    if isinstance(layer, QBlockTTLinear):
        raise ValueError(f"module '{layer.module_name}' is already quantised")
    if layout not in LAYOUTS:
        raise ValueError(f"module '{layer.module_name}': unknown layout {layout!r}; use one of {LAYOUTS}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"module '{layer.module_name}': unknown quant_type {quant_type!r}; use 'nf4' or 'fp4'")
    side = _pick_frozen_side(layer)
    name = "btt_l" if side == "left" else "btt_r"
    core = getattr(layer, name).detach()
    chunks = [core] if layout == "flat" else list(core.unbind(0))
    blobs = [Packed4bit(chunk, quant_type, double_quant, blocksize) for chunk in chunks]
    return as_quantized_(layer, side=side, layout=layout, compute_dtype=compute_dtype, blobs=blobs)


def as_quantized_(
    layer: BlockTTLinear, *, side: str, layout: str, compute_dtype: torch.dtype, blobs: Sequence[Packed4bit]
) -> QBlockTTLinear:
    """Turn ``layer`` into a :class:`QBlockTTLinear` whose frozen ``side`` core is held by ``blobs``.

    Used by :func:`quantize_frozen_core_` and by loaders that fill empty :meth:`Packed4bit.empty` blobs.
    """
    name = "btt_l" if side == "left" else "btt_r"
    shape = getattr(layer, name).shape
    delattr(layer, name)
    layer.__class__ = QBlockTTLinear
    layer.qbtt_frozen = nn.ModuleList(blobs)
    layer.quantized_side, layer.frozen_shape, layer.quant_layout = side, shape, layout
    layer.compute_dtype = compute_dtype
    return layer


def convert_btt_to_qbtt_(
    model: nn.Module,
    layout: str = "flat",
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    blocksize: int = 64,
) -> int:
    """Quantise the frozen core of every :class:`BlockTTLinear` with exactly one trainable core.

    Returns:
        Bytes saved: the frozen cores' original bytes minus the 4-bit data *and* its statistics
        (absmax, quant maps, packed metadata).
    """
    saved = 0
    for module in list(model.modules()):
        if isinstance(module, QBlockTTLinear) or not isinstance(module, BlockTTLinear):
            continue
        if module.btt_l.requires_grad == module.btt_r.requires_grad:
            continue
        frozen = module.btt_r if module.btt_l.requires_grad else module.btt_l
        before = frozen.numel() * frozen.element_size()
        quantize_frozen_core_(module, layout, quant_type, double_quant, compute_dtype, blocksize)
        saved += before - module.quantized_nbytes()
    return saved
