"""GGUFLinear and GGUFEmbedding: layers whose GGUF-quantized weights stay packed in memory.

With the C++ kernels (`llamaherd.kernels`), Q4_0, Q4_1 and Q8_0 weights are repacked once
into panels of 16 interleaved rows (same size, plus padding to a multiple of 16 rows) and
multiplied with 8-bit integer dot products; k-quants are first rewritten as one of those types
(`llamaherd.quant.kquants`). A machine without the kernels dequantizes the layer in torch on
every call.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from llamaherd import kernels
from llamaherd.quant.dequant import dequantize, row_bytes
from llamaherd.quant.kquants import KERNEL_TYPE, convert

PANEL = 16  # rows interleaved in one packed panel (the kernels' layout)
KERNEL_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                          GGMLQuantizationType.Q8_0})


def _tensor(data: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(data, np.ndarray):
        with warnings.catch_warnings():  # a read-only memmap is fine: the bytes are only read
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(data)
    return data


class _KernelMatmul(torch.autograd.Function):
    """x @ W^T through the kernels, with the input gradient through the dequantized weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: GGUFLinear) -> torch.Tensor:
        ctx.layer = layer
        return kernels.load().matmul(x, layer.data, layer.qtype_id, layer.out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantize(), None


class GGUFLinear(nn.Module):
    """A bias-free linear layer over GGUF rows: data is uint8 [out_features, bytes_per_row].

    kernels: None uses the C++ kernels where they exist for the type, False never, True requires
    them. The weight is kept as the buffer `data`: packed panels, or the GGUF rows as given.
    """

    def __init__(self, data: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
                 qtype: int | GGMLQuantizationType, in_features: int, out_features: int, *,
                 kernels: bool | None = None) -> None:
        """data: the GGUF rows, or a list of row blocks stacked in order (e.g. the q, k and v
        projections as one fused layer, packed without first copying them together)."""
        super().__init__()
        qtype = GGMLQuantizationType(qtype)
        parts = [_tensor(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
        width = row_bytes(qtype, in_features)
        if (any(p.dtype != torch.uint8 or p.dim() != 2 or p.shape[1] != width for p in parts)
                or sum(p.shape[0] for p in parts) != out_features):
            got = ", ".join(f"{p.dtype} {tuple(p.shape)}" for p in parts)
            raise ValueError(f"{qtype.name} weight of {out_features}x{in_features} needs uint8 "
                             f"data of shape {(out_features, width)}, got {got}")
        ops = _kernels_for(qtype, kernels)
        source = qtype  # the file's type; k-quants are packed as a kernel type
        if ops is not None and qtype in KERNEL_TYPE:
            converted = [convert(p.numpy(), qtype) for p in parts]
            parts, qtype = [_tensor(c) for c, _ in converted], converted[0][1]
        if ops is not None:
            data = ops.repack(parts, int(qtype))
        else:
            data = parts[0] if len(parts) == 1 else torch.from_numpy(
                np.concatenate([p.numpy() for p in parts]))
        self._setup(data, qtype, in_features, out_features, ops is not None, source)

    def _setup(self, data: torch.Tensor, qtype: GGMLQuantizationType, in_features: int,
               out_features: int, packed: bool, source_qtype: GGMLQuantizationType) -> None:
        self.qtype, self.qtype_id = qtype, int(qtype)
        self.source_qtype = source_qtype
        self.in_features, self.out_features = in_features, out_features
        self.packed = packed  # True: `data` is in the kernels' layout, else GGUF's
        self.register_buffer("data", data, persistent=False)

    @classmethod
    def from_gguf(cls, tensor, *, kernels: bool | None = None) -> GGUFLinear:
        """From a `gguf.ReaderTensor` (its shape lists the input features first)."""
        in_features, out_features = (int(n) for n in tensor.shape[:2])
        return cls(tensor.data, tensor.tensor_type, in_features, out_features, kernels=kernels)

    @classmethod
    def concat(cls, layers: Sequence[GGUFLinear]) -> GGUFLinear:
        """One layer computing the outputs of `layers` side by side (e.g. fused wq|wk|wv).
        Layers that `split` made from one packed layer join back into it without a copy."""
        first = layers[0]
        for layer in layers[1:]:
            if (layer.qtype, layer.in_features, layer.packed) != (first.qtype, first.in_features,
                                                                  first.packed):
                raise ValueError("GGUFLinear.concat needs layers of one qtype, in_features and "
                                 "layout")
        out_features = sum(layer.out_features for layer in layers)
        joined = _adjacent(layers)
        if joined is None:
            datas = [layer.data for layer in layers]
            if first.packed and any(layer.out_features % PANEL for layer in layers[:-1]):
                # padded 16-row panels inside the result: back to GGUF rows and pack them again
                ops = kernels.load()
                datas = [ops.repack([ops.unpack(layer.data, layer.qtype_id, layer.out_features)
                                     for layer in layers], first.qtype_id)]
            # numpy's single-threaded memcpy: torch.cat of uint8 with 2 threads is much slower
            joined = torch.from_numpy(np.concatenate([d.numpy() for d in datas]))
        return cls._made(joined, first, out_features)

    def split(self, sizes: Sequence[int]) -> list[GGUFLinear]:
        """Layers computing consecutive blocks of `sizes` outputs each. Packed blocks that start
        on a panel boundary are views of this layer's bytes (`concat` joins them back without a
        copy); otherwise each block is packed again on its own."""
        if sum(sizes) != self.out_features:
            raise ValueError(f"sizes {list(sizes)} do not add up to {self.out_features} outputs")
        starts = np.cumsum([0, *sizes[:-1]]).tolist()
        if self.packed and all(n % PANEL == 0 for n in sizes[:-1]):
            return [self._made(self.data[a:a + -(-n // PANEL) * PANEL], self, n)
                    for a, n in zip(starts, sizes)]
        rows = (kernels.load().unpack(self.data, self.qtype_id, self.out_features)
                if self.packed else self.data)
        return [GGUFLinear(rows[a:a + n], self.qtype, self.in_features, n,
                           kernels=self.packed) for a, n in zip(starts, sizes)]

    @classmethod
    def _made(cls, data: torch.Tensor, like: GGUFLinear, out_features: int) -> GGUFLinear:
        """A layer over `data`, laid out and typed as `like`, with `out_features` outputs."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(data, like.qtype, like.in_features, out_features, like.packed,
                     like.source_qtype)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed and x.dtype == torch.float32 and not (x.requires_grad
                                                             and torch.is_grad_enabled()):
            return kernels.load().matmul(x, self.data, self.qtype_id, self.out_features)
        x2 = x.reshape(-1, self.in_features).float()  # (B*T, in)
        if self.packed:
            y = _KernelMatmul.apply(x2, self)
        else:
            y = x2 @ self.dequantize().T
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [out_features, in_features]."""
        if self.packed:
            return self.dequantize_rows(torch.arange(self.out_features))
        return dequantize(self.data, self.qtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (int64 [n]) of the weight as float32 [n, in_features]."""
        if self.packed:
            return kernels.load().dequantize_rows(self.data, self.qtype_id, rows,
                                                  self.out_features)
        return dequantize(self.data.index_select(0, rows), self.qtype)

    def extra_repr(self) -> str:
        path = "kernels" if self.packed else "dequantize"
        source = self.source_qtype
        qtype = self.qtype.name if source == self.qtype else f"{source.name} as {self.qtype.name}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={qtype}, path={path}")


class GGUFEmbedding(nn.Module):
    """Token embedding lookup over GGUF rows (uint8 [num_embeddings, bytes_per_row]); only the
    looked-up rows are dequantized. `as_linear()` is the tied output projection over the same
    bytes."""

    def __init__(self, data: torch.Tensor | np.ndarray, qtype: int | GGMLQuantizationType,
                 embedding_dim: int, num_embeddings: int, *, kernels: bool | None = None) -> None:
        super().__init__()
        self.table = GGUFLinear(data, qtype, embedding_dim, num_embeddings, kernels=kernels)
        self.embedding_dim, self.num_embeddings = embedding_dim, num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantize_rows(ids.reshape(-1).long())
        return rows.reshape(*ids.shape, self.embedding_dim)

    @property
    def packed(self) -> bool:
        """Whether the rows are in the kernels' layout (a copy) rather than GGUF's."""
        return self.table.packed

    def as_linear(self) -> GGUFLinear:
        """The same packed rows as a linear layer dim -> num_embeddings (tied output)."""
        return self.table


def _adjacent(layers: Sequence[GGUFLinear]) -> torch.Tensor | None:
    """The packed bytes of `layers` as one tensor when they already lie one after another in one
    buffer (as `split` leaves them), else None."""
    datas = [layer.data for layer in layers]
    if not layers[0].packed or any(layer.out_features % PANEL for layer in layers[:-1]):
        return None
    storage = datas[0].untyped_storage()
    for a, b in zip(datas, datas[1:]):
        if (b.untyped_storage().data_ptr() != storage.data_ptr()
                or b.data_ptr() != a.data_ptr() + a.nbytes):
            return None
    rows = sum(d.shape[0] for d in datas)
    return datas[0].new_empty(0).set_(storage, datas[0].storage_offset(),
                                      (rows, datas[0].shape[1]))


def _kernels_for(qtype: GGMLQuantizationType, wanted: bool | None):
    """The kernels module if this layer should use it, else None."""
    if wanted is False:
        return None
    if qtype not in KERNEL_TYPES and qtype not in KERNEL_TYPE:
        if wanted:
            raise ValueError(f"no GGUF kernel for {qtype.name}; kernels exist for "
                             f"{', '.join(sorted(t.name for t in KERNEL_TYPES))} (and "
                             f"{', '.join(sorted(t.name for t in KERNEL_TYPE))} through them)")
        return None
    ops = kernels.load()
    if ops is None and wanted:
        raise RuntimeError("GGUF kernels were requested but could not be built or loaded")
    return ops
