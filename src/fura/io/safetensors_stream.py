"""Tensor-by-tensor access to safetensors files: read one tensor of a sharded checkpoint, write a file as you go.

A safetensors file is ``[u64 little-endian N][N bytes of JSON header][data]``. The header maps every
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (byte offsets into the data
section, which the tensors tile without gaps) plus an optional ``"__metadata__"`` dict of strings.

Because names, shapes and dtypes fix every offset, a file can be written before its tensors exist:
:class:`StreamingSafetensorsWriter` writes the header first and then each tensor's bytes as soon
as it is computed, so at most one tensor is ever held — the basis of the streaming conversions in
:mod:`fura.io.streaming`. :class:`CheckpointReader` is the reading side: it resolves a Hugging Face
checkpoint folder (``model.safetensors`` or shards + ``model.safetensors.index.json``) and hands out
one tensor at a time (``safe_open(...).get_tensor``, memory-mapped: pages are resident only while
the returned tensor lives) or copies a tensor's raw bytes in bounded chunks.
"""

from __future__ import annotations

import difflib
import json
import os
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from safetensors import safe_open

#: safetensors dtype names ↔ torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Bytes moved per read/write when a tensor is copied without being materialised.
COPY_CHUNK_BYTES = 16 << 20


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` → ``"BF16"``)."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"safetensors cannot store dtype {dtype}; supported: {sorted(DTYPES)}")
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor to be written (everything a header needs)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty(0, dtype=self.dtype).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        """The spec of an existing (possibly meta) tensor."""
        return cls(name, tensor.dtype, tuple(tensor.shape))


@dataclass(frozen=True)
class TensorInfo:
    """Where a stored tensor lives: its spec, its file, and the absolute byte range of its data."""

    spec: TensorSpec
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header without touching the data: ``({name: TensorInfo}, metadata)``."""
    path = Path(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > os.fstat(handle.fileno()).st_size - 8:  # bounded before reading: no 4 GiB allocation
            raise ValueError(f"{path}: the header claims {length:,} bytes, more than the file holds")
        header = json.loads(handle.read(length))
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    infos = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which fura cannot read")
        begin, end = entry["data_offsets"]
        spec = TensorSpec(name, DTYPES[entry["dtype"]], tuple(entry["shape"]))
        infos[name] = TensorInfo(spec, path, data_start + begin, data_start + end)
    return infos, metadata


def check_file(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Check that a safetensors file is whole (header readable, every tensor's bytes present) without reading them.

    A copy or download cut short otherwise fails deep inside the loader, or loads as a shorter tensor list.
    Raises ``ValueError`` naming the file, what is wrong and the fix; returns the header on success.
    """
    path = Path(path)
    size = path.stat().st_size
    fix = "Fix: copy or save the file again (it was probably cut short)."
    try:
        infos, _ = read_header(path)
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}). {fix}") from None
    needed = max((info.end for info in infos.values()), default=0)
    if size < needed:
        raise ValueError(f"{path} is truncated: its tensors need {needed:,} bytes, the file has {size:,}. {fix}")
    return infos


def iter_bytes(info: TensorInfo, chunk_bytes: int = COPY_CHUNK_BYTES) -> Iterator[bytes]:
    """The raw bytes of a stored tensor in chunks (plain reads: nothing stays resident)."""
    with open(info.path, "rb") as handle:
        handle.seek(info.start)
        left = info.nbytes
        while left:
            chunk = handle.read(min(chunk_bytes, left))
            if not chunk:
                raise OSError(f"{info.path}: file ends inside tensor {info.spec.name!r}")
            left -= len(chunk)
            yield chunk


class CheckpointReader:
    """Read a Hugging Face safetensors checkpoint folder one tensor at a time.

    Handles a single ``model.safetensors`` and sharded checkpoints with ``model.safetensors.index.json``.
    Only headers are read up front; :meth:`get_tensor` memory-maps one tensor (resident while the
    returned tensor lives, copy-on-write if modified) and :meth:`iter_bytes` streams raw bytes.
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self._shard_files():
            infos, _ = read_header(shard)
            self.tensors.update(infos)

    def _shard_files(self) -> list[Path]:
        index, single = self.model_dir / INDEX_FILE, self.model_dir / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [self.model_dir / name for name in dict.fromkeys(weight_map.values())]
        if single.is_file():
            return [single]
        found = sorted(p.name for p in self.model_dir.glob("*")) if self.model_dir.is_dir() else "no such folder"
        raise FileNotFoundError(
            f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found}). Streaming conversion reads "
            "safetensors checkpoints. Fix: point at a Hugging Face model folder saved with safetensors, or "
            "convert a pytorch_model.bin checkpoint once with save_pretrained(..., safe_serialization=True)."
        )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def keys(self) -> list[str]:
        """Every tensor name, in shard order."""
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        """Spec and location of one tensor (``KeyError`` with a hint if absent)."""
        if name not in self.tensors:
            close = difflib.get_close_matches(name, list(self.tensors), n=3)
            raise KeyError(f"{self.model_dir}: checkpoint has no tensor {name!r} (closest: {close})")
        return self.tensors[name]

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, on CPU."""
        info = self.info(name)
        with safe_open(str(info.path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    def iter_bytes(self, name: str, chunk_bytes: int = COPY_CHUNK_BYTES) -> Iterator[bytes]:
        """Raw bytes of one tensor in bounded chunks (for copying without materialising it)."""
        return iter_bytes(self.info(name), chunk_bytes)


class StreamingSafetensorsWriter:
    """Write a valid safetensors file whose tensors arrive one at a time.

    The header is written from the specs on entry; :meth:`write` / :meth:`write_bytes` then put
    each tensor at its reserved offset (any order; each exactly once). Data goes to a temporary file
    in the target folder, which replaces ``path`` atomically on a clean exit, after a check that every
    tensor was written; on an error the temporary file is removed and ``path`` is left untouched.

    Usage::

        with StreamingSafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer:
            for spec in specs:
                writer.write(spec.name, compute(spec))
    """

    def __init__(
        self, path: str | os.PathLike, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self.specs = {spec.name: spec for spec in specs}
        if len(self.specs) != len(specs):
            raise ValueError(f"{self.path}: duplicate tensor names in the specs")
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.offsets: dict[str, tuple[int, int]] = {}
        self._written: set[str] = set()
        self._handle = None
        self._temp: Path | None = None
        self.data_start = 0
        self.bytes_written = 0

    def _header(self) -> bytes:
        header: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        cursor = 0
        for name, spec in self.specs.items():
            self.offsets[name] = (cursor, cursor + spec.nbytes)
            header[name] = {
                "dtype": dtype_name(spec.dtype),
                "shape": list(spec.shape),
                "data_offsets": [cursor, cursor + spec.nbytes],
            }
            cursor += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the reference writer aligns the data section to 8 bytes
        return struct.pack("<Q", len(encoded)) + encoded

    def __enter__(self) -> StreamingSafetensorsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a unique name opened exclusively: unlike mkstemp (0600) the file gets the usual umask permissions
        self._temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        self._handle = open(self._temp, "xb")
        header = self._header()
        self._handle.write(header)
        self.data_start = len(header)
        total = sum(spec.nbytes for spec in self.specs.values())
        self._handle.truncate(self.data_start + total)  # sparse until written; makes seeks past the end safe
        self.bytes_written = len(header)
        return self

    def _seek(self, name: str) -> int:
        if self._handle is None:
            raise RuntimeError("StreamingSafetensorsWriter: use it as a context manager (with ... as writer)")
        if name not in self.specs:
            raise KeyError(f"{self.path}: tensor {name!r} is not in the header")
        if name in self._written:
            raise ValueError(f"{self.path}: tensor {name!r} was already written")
        begin, _ = self.offsets[name]
        self._handle.seek(self.data_start + begin)
        return self.specs[name].nbytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor; its dtype and shape must equal the spec's."""
        spec = self.specs.get(name)
        if spec is not None and (tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape):
            raise ValueError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} but the header says "
                f"{spec.dtype} {spec.shape}"
            )
        expected = self._seek(name)
        if expected:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._handle.write(memoryview(data.numpy()))
        self._written.add(name)
        self.bytes_written += expected

    def write_bytes(self, name: str, chunks: Iterable[bytes]) -> None:
        """Write one tensor from raw little-endian bytes (e.g. :meth:`CheckpointReader.iter_bytes`)."""
        expected = self._seek(name)
        count = 0
        for chunk in chunks:
            self._handle.write(chunk)
            count += len(chunk)
        if count != expected:
            raise ValueError(f"{self.path}: tensor {name!r} got {count} bytes, expected {expected}")
        self._written.add(name)
        self.bytes_written += expected

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        handle, temp = self._handle, self._temp
        self._handle = None
        try:
            missing = [name for name in self.specs if name not in self._written]
            if exc_type is None and missing:
                raise RuntimeError(f"{self.path}: {len(missing)} tensors were never written, e.g. {missing[:3]}")
            if exc_type is None:
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            temp.unlink(missing_ok=True)
            raise
        handle.close()
        if exc_type is not None:
            temp.unlink(missing_ok=True)
            return
        os.replace(temp, self.path)


def write_index(
    model_dir: str | os.PathLike, weight_map: Mapping[str, str], total_size: int, name: str = INDEX_FILE
) -> Path:
    """Write a Hugging Face shard index ``{"metadata": {"total_size"}, "weight_map": {tensor: file}}``."""
    path = Path(model_dir) / name
    payload = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(weight_map)}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
