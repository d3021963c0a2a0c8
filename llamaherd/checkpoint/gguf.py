"""GGUF files: a fast header reader with memory-mapped tensors, dequantization and a writer.

The header is parsed here rather than with `gguf.GGUFReader`, which builds a Python object per
array element and takes seconds on a large vocabulary (docs/performance.md). Type codes,
block sizes, dequantization and writing come from the `gguf` package, maintained with llama.cpp.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from llamaherd.checkpoint.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}
FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
# Types this project reads (the gguf package can dequantize more; these are the ones we test).
SUPPORTED_TYPES = FLOAT_TYPES | {
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
}


@dataclass
class GGUFTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch order (outermost first), e.g. (out_features, in_features)
    data: np.ndarray  # memory-mapped raw bytes: (rows, bytes_per_row) uint8, or float array
    offset: int = 0  # where the bytes start in the file

    @property
    def is_float(self) -> bool:
        return self.qtype in FLOAT_TYPES


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    # key -> (value type, element type for arrays): what a writer needs to copy a key unchanged
    value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = field(default_factory=dict)
    mapping: mmap.mmap | None = None  # the memory map the tensors' data points into

    def release(self, tensor: GGUFTensor) -> None:
        """Drop a tensor's pages from memory once its data has been copied (e.g. repacked), so a
        load holds about one copy of the model at a time; touched again, they are re-read."""
        if self.mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        begin = -(-tensor.offset // page) * page  # whole pages inside the tensor only
        end = (tensor.offset + tensor.data.nbytes) // page * page
        if end > begin:
            self.mapping.madvise(mmap.MADV_DONTNEED, begin, end - begin)


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CheckpointError(self.path, "file is truncated (header runs past the end)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        buf, pos, out = self.buf, self.pos, []
        unpack = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                out.append(bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"))
                pos += 8 + n
        except struct.error:
            raise CheckpointError(self.path, "file is truncated (header runs past the end)") from None
        if pos > len(buf):
            raise CheckpointError(self.path, "file is truncated (header runs past the end)")
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype, count = GGUFValueType(self.unpack("<I")), self.unpack("<Q")
            if etype in _SCALAR:  # numeric arrays in one numpy read
                dt = np.dtype(_SCALAR[etype])
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).tolist()
            if etype == GGUFValueType.STRING:  # vocabularies: a tight loop, ~100k strings
                return self.strings(count)
            return [self.value(etype) for _ in range(count)]
        raise CheckpointError(self.path, f"unknown metadata value type {vtype}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Only the key/value metadata of a GGUF file (for a vocabulary: tens of milliseconds)."""
    return read_gguf(path, with_tensors=False).metadata


def read_gguf(path: str | Path, with_tensors: bool = True) -> GGUFFile:
    """Parse a GGUF v2/v3 file's header and memory-map its tensors (no tensor data is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        mm = np.frombuffer(mapping, dtype=np.uint8)
    except (OSError, ValueError) as e:
        reason = "empty file" if path.exists() and path.stat().st_size == 0 else f"cannot open: {e}"
        raise CheckpointError(path, reason) from None
    cur = _Cursor(memoryview(mm), path)
    if bytes(cur.take(4)) != GGUF_MAGIC:
        raise CheckpointError(path, "not a GGUF file (wrong magic number)")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise CheckpointError(path, f"unsupported GGUF version {version} (need 2 or 3)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    try:
        metadata: dict[str, Any] = {}
        value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = GGUFValueType(cur.unpack("<I"))
            etype = None
            if vtype == GGUFValueType.ARRAY:  # peek at the element type that follows
                etype = GGUFValueType(struct.unpack_from("<I", cur.buf, cur.pos)[0])
            value_types[key] = (vtype, etype)
            metadata[key] = cur.value(vtype)
        if not with_tensors:
            return GGUFFile(path, version, metadata, {}, value_types, mapping)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(path, f"corrupt header: {e}") from None
    align = int(metadata.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, code, offset in infos:
        try:
            qtype = GGMLQuantizationType(code)
        except ValueError:
            raise CheckpointError(path, f"tensor {name}: unknown tensor type {code}") from None
        if qtype not in SUPPORTED_TYPES:
            raise CheckpointError(path, f"tensor {name}: unsupported tensor type {qtype.name}")
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(dims))
        cols = shape[-1]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        if cols % block:
            raise CheckpointError(path, f"tensor {name}: row length {cols} is not a multiple of "
                                        f"the {qtype.name} block size {block}")
        row_bytes = cols // block * block_bytes
        begin = start + offset
        if begin + rows * row_bytes > len(mm):
            raise CheckpointError(path, f"file is truncated (tensor {name} runs past the end)")
        raw = mm[begin:begin + rows * row_bytes]
        if qtype == GGMLQuantizationType.F32:
            data = raw.view(np.float32).reshape(shape)
        elif qtype == GGMLQuantizationType.F16:
            data = raw.view(np.float16).reshape(shape)
        else:
            data = raw.reshape(rows, row_bytes)
        tensors[name] = GGUFTensor(name, qtype, shape, data, begin)
    return GGUFFile(path, version, metadata, tensors, value_types, mapping)


def dequantize(t: GGUFTensor) -> np.ndarray:
    """A tensor as float32 numpy in its PyTorch shape."""
    from gguf.quants import dequantize as gguf_dequantize

    if t.qtype == GGMLQuantizationType.F32:
        return np.asarray(t.data)
    if t.qtype == GGMLQuantizationType.F16:
        return t.data.astype(np.float32)
    return gguf_dequantize(np.asarray(t.data), t.qtype).reshape(t.shape)
