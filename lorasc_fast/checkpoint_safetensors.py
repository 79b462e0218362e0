"""Streaming safetensors I/O for the out-of-core merge: check a header, read row blocks,
write a file whose header is known up front one block at a time.

Format (huggingface/safetensors): an 8-byte little-endian header length ``N``, ``N`` bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer; offsets are relative to the buffer, tensors row-major little-endian.

Nothing here unpickles or memory-maps: blocks are read with ``readinto`` into fresh
buffers, so resident memory is the block being worked on, not the pages of the file
(``mmap`` would keep every touched page of a multi-GB shard in RSS).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .checkpoint_errors import MergeError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what --dtype converts
MAX_HEADER = 100_000_000  # the reference implementation's limit

if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
    raise ImportError("lorasc_fast.checkpoint_safetensors needs a little-endian host")


def _unique_pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise MergeError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def load_json(path: Path):
    """Parse a JSON file, rejecting duplicate keys (a silently dropped entry is a corrupt file)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_unique_pairs)
    except MergeError as e:
        raise MergeError(f"{path}: {e}") from None
    except (OSError, ValueError) as e:
        raise MergeError(f"{path}: cannot read JSON ({e})") from None


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``begin``/``end`` are offsets into the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def rows(self) -> int:
        """Leading dimension (1 for a scalar): the unit of block reads."""
        return self.shape[0] if self.shape else 1


@dataclass(frozen=True)
class Header:
    """A parsed, checked header: tensors in data order, metadata, where the data starts."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> Header:
    """Parse and check ``path``'s header: known dtypes, sizes matching shapes, tensors tiling
    the data buffer exactly (no gaps, overlaps or bytes past the end). Reads only the header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_n = f.read(8)
            if len(raw_n) != 8:
                raise MergeError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(raw_n, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise MergeError(f"{path}: not a safetensors file (header length {n} out of range)")
            raw = f.read(n)
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e})") from None
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_pairs)
    except ValueError as e:  # MergeError (duplicate keys) included
        raise MergeError(f"{path}: bad safetensors header ({e})") from None
    if not isinstance(doc, dict):
        raise MergeError(f"{path}: bad safetensors header (not a JSON object)")
    metadata = doc.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in metadata.items())):
        raise MergeError(f"{path}: __metadata__ must map strings to strings")
    infos = []
    for name, entry in doc.items():
        try:
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            begin, end = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise MergeError(f"{path}: bad header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise MergeError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape + (begin, end)):
            raise MergeError(f"{path}: bad shape/offsets for {name!r}")
        info = TensorInfo(name, dtype, shape, begin, end)
        if info.nbytes != info.numel * info.itemsize:
            raise MergeError(f"{path}: tensor {name!r} offsets do not match its shape and dtype")
        infos.append(info)
    infos.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for info in infos:
        if info.begin != pos:
            raise MergeError(f"{path}: tensor {info.name!r} does not follow the previous one "
                             f"(gap or overlap at byte {pos})")
        pos = info.end
    if 8 + n + pos != size:
        raise MergeError(f"{path}: data buffer is {size - 8 - n} bytes, header describes {pos}")
    return Header(path, {t.name: t for t in infos}, dict(metadata), 8 + n)


def read_rows(f: BinaryIO, header: Header, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a tensor (along its first dimension) as a new CPU tensor.
    Memory: exactly the block's bytes."""
    row_bytes = info.nbytes // info.rows if info.rows else 0
    count = (stop - start) * row_bytes
    buf = torch.empty(count, dtype=torch.uint8)
    f.seek(header.data_start + info.begin + start * row_bytes)
    if count and f.readinto(memoryview(buf.numpy())) != count:
        raise MergeError(f"{header.path}: truncated data for {info.name!r}")
    shape = ((stop - start),) + info.shape[1:] if info.shape else ()
    return buf.view(info.torch_dtype).reshape(shape)


def read_tensor(f: BinaryIO, header: Header, info: TensorInfo) -> torch.Tensor:
    return read_rows(f, header, info, 0, info.rows)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = t.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class Writer:
    """Writes one safetensors file whose tensors (name, dtype, shape, in data order) are known
    before any data: the header goes first, then ``write`` appends data blocks in order.
    ``close`` checks that every byte was written and fsyncs. Memory: the block passed in."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str]):
        doc, pos = {"__metadata__": dict(metadata)}, 0
        for name, dtype, shape in entries:
            end = pos + math.prod(shape) * DTYPES[dtype].itemsize
            doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, end]}
            pos = end
        raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
        self.path, self.total, self.written = Path(path), pos, 0
        self.f = open(self.path, "xb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, data) -> int:
        data = tensor_bytes(data) if isinstance(data, torch.Tensor) else memoryview(data)
        if self.written + data.nbytes > self.total:
            raise MergeError(f"{self.path}: more data than the header describes")
        self.f.write(data)
        self.written += data.nbytes
        return data.nbytes

    def close(self) -> None:
        if self.written != self.total:
            raise MergeError(f"{self.path}: wrote {self.written} of {self.total} data bytes")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def abort(self) -> None:
        self.f.close()
