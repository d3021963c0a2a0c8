"""Weight-only quantization of float models: int8, int4 and fp8 linear layers and the swap function.

Each layer keeps a compressed weight and computes `x @ W^T` with activations left in floating
point. quantize_model() replaces every nn.Linear of a built model by one of them (gpt-fast style:
swap modules after building, no subclassing of the model).

- int8: int8 weights, symmetric, one bfloat16 scale per output row; torch's int8 GEMM in
  bfloat16 when decoding, a float32 GEMM over the converted weight for long prompts.
- int4: 4-bit weights in groups of 32 inputs with a bfloat16 scale and zero per group; torch's
  int4 GEMM in bfloat16 (for long prompts about 2x float32's time: unpacking the kernel's
  4-bit layout on every call would cost more than it saves). The output projection gets int8.
- fp8: float8_e4m3fn weights with one float32 scale per output row (the form in which Llama 3.1
  405B FP8 ships), dequantized on every call and multiplied in float32. It saves memory, not
  time: a CPU has no fp8 arithmetic.

The int8 and int4 kernels take bfloat16 activations (their float32 paths are about ten times
slower on a CPU), so those layers round the input to bfloat16 and return the input's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZE = 32  # weights per (scale, zero) pair; 32 and 64 run equally fast here
# From this many input rows on (long prompts), Int8Linear converts its weight to float32 and
# runs a float32 GEMM: the bfloat16 int8 kernel costs about twice float32's time per row, while
# the conversion is paid once per call. Below it (decoding) the kernel is the fastest path.
INT8_DEQUANTIZE_ROWS = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _matrix(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x (..., in) as a contiguous (rows, in) matrix."""
    return x.reshape(-1, in_features)


def _check_linear(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is not None:
        raise ValueError("weight-only quantization supports bias-free linear layers only")
    if linear.weight.device.type == "meta":
        raise ValueError("cannot quantize a linear layer on the meta device; load weights first")
    return linear.weight.detach().float()


class Int8Linear(nn.Module):
    """Symmetric per-output-row int8 weights: W ~ weight * scales[:, None]."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # int8 (out, in)
        self.register_buffer("scales", scales)  # bfloat16 (out,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = _check_linear(linear)
        # Round the scale to bfloat16 first and quantize with the rounded value, so the stored
        # integers absorb the scale's rounding instead of every weight inheriting it.
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
        q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scales)

    @classmethod
    def concat(cls, layers: Sequence[Int8Linear]) -> Int8Linear:
        """One layer whose outputs are those of `layers` side by side (fused projections)."""
        return cls(torch.cat([layer.weight for layer in layers]),
                   torch.cat([layer.scales for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _matrix(x, self.in_features)
        if x2.shape[0] >= INT8_DEQUANTIZE_ROWS:  # converting the weight once costs little here
            y = F.linear(x2.float(), self.weight.float()) * self.scales.float()
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 (out, in)."""
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4Linear(nn.Module):
    """Asymmetric 4-bit weights in groups of `group_size` inputs, packed for torch's CPU kernel.

    Per group, W ~ (q - 8) * scale + zero with q in 0..15 (the kernel's convention); `packed` is
    uint8 (out, in / 2) in the kernel's layout and `scale_zeros` bfloat16 (in / group, out, 2).
    """

    def __init__(self, packed: torch.Tensor, scale_zeros: torch.Tensor, in_features: int,
                 group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, packed.shape[0]
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zeros", scale_zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        w = _check_linear(linear)
        out_features, in_features = w.shape
        if in_features % group_size or out_features % 16:
            raise ValueError(f"int4 needs in_features divisible by {group_size} and out_features "
                             f"by 16, got a {out_features}x{in_features} weight")
        groups = w.view(out_features, in_features // group_size, group_size)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, groups)
        # Like int8: round scale and zero to bfloat16 first, then pick the integers against them.
        scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
        zero = (lo + 8 * scale).to(torch.bfloat16).float()
        low = (zero - 8 * scale)[..., None]  # value of q = 0
        q = ((groups - low) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        scale_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (groups, out, 2)
        return cls(_pack_int4(q.view(out_features, in_features)),
                   scale_zeros.to(torch.bfloat16).contiguous(), in_features, group_size)

    @classmethod
    def concat(cls, layers: Sequence[Int4Linear]) -> Int4Linear:
        """One layer whose outputs are those of `layers` side by side (fused projections)."""
        first = layers[0]
        # The kernel's layout interleaves blocks of rows, so repack the joined integers.
        q = torch.cat([layer.unpack() for layer in layers])
        return cls(_pack_int4(q), torch.cat([layer.scale_zeros for layer in layers], dim=1),
                   first.in_features, first.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _matrix(x, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                       self.scale_zeros)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def unpack(self) -> torch.Tensor:
        """The 4-bit integers as int32 (out, in)."""
        return _unpack_int4(self.packed, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 (out, in)."""
        q = self.unpack().view(self.out_features, -1, self.group_size).float()
        scale, zero = self.scale_zeros.float().transpose(0, 1).unbind(-1)  # (out, groups) each
        return ((q - 8) * scale[..., None] + zero[..., None]).view(self.out_features, -1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}")


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int32 (out, in) values 0..15 -> uint8 (out, in / 2) in the CPU kernel's layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)


@functools.lru_cache(maxsize=8)
def _int4_layout(out_features: int, in_features: int) -> torch.Tensor:
    """For each 4-bit slot of the kernel's layout (a byte's low, then high nibble, bytes in
    order), the flat index row * in_features + input of the weight stored there.

    The layout depends on the instruction set torch dispatches to (with AVX-512 rows go in
    blocks of 64, a byte holding rows j and j + 32; with AVX2 in blocks of 32) and may change
    between torch versions, so it is read off the packing itself: the weights' indices are
    packed one hexadecimal digit at a time."""
    n = out_features * in_features
    index = torch.arange(n, dtype=torch.int32).view(out_features, in_features)
    source = torch.zeros(n, dtype=torch.int32)
    for shift in range(0, max(n - 1, 1).bit_length(), 4):
        digit = _pack_int4((index >> shift) & 15)
        source |= _nibbles(digit).to(torch.int32) << shift
    return source


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> their low and high nibbles, flat, in that order."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten()


def _unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of _pack_int4: the int32 (out, in) values 0..15."""
    out_features = packed.shape[0]
    q = torch.empty(out_features * in_features, dtype=torch.int32)
    q[_int4_layout(out_features, in_features).long()] = _nibbles(packed).to(torch.int32)
    return q.view(out_features, in_features)


def e4m3_as_float16(weight: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float16 holding exactly value / 256, by moving bits (no rounding).

    An e4m3 byte is sign | 4 exponent bits (bias 7) | 3 mantissa bits. Shifted left by 7 inside
    16 bits, its exponent and mantissa land in float16's fields (5 exponent bits, bias 15), which
    reads them as the same number times 2^(7 - 15) = 1/256, subnormals included. The byte's sign
    bit, sign-extended into the int16, is moved to bit 15 by the shift and bit 14 cleared.
    torch's own float8 -> float conversion is element by element and about 50 times slower.
    NaN codes (never produced by quantization) become finite values.
    """
    bits = weight.view(torch.int8).to(torch.int16)
    bits.bitwise_left_shift_(7).bitwise_and_(~0x4000)
    return bits.view(torch.float16)


class Fp8Linear(nn.Module):
    """float8_e4m3fn weights with a float32 scale per output row: W ~ weight * scales[:, None]."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # float8_e4m3fn (out, in)
        self.register_buffer("scales", scales)  # float32 (out,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        w = _check_linear(linear)
        scales = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        q = (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return cls(q, scales)

    @classmethod
    def concat(cls, layers: Sequence[Fp8Linear]) -> Fp8Linear:
        """One layer whose outputs are those of `layers` side by side (fused projections)."""
        return cls(torch.cat([layer.weight for layer in layers]),
                   torch.cat([layer.scales for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = e4m3_as_float16(self.weight).float()  # weight / 256, exact, (out, in)
        y = F.linear(x.float(), w) * (self.scales * 256)
        return y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 (out, in)."""
        return e4m3_as_float16(self.weight).float() * (self.scales * 256)[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


LINEARS: dict[str, type[nn.Module]] = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear}
MODES = tuple(LINEARS)

# The output projection (Transformer.output) makes the logits, the part most sensitive to weight
# error, and in a small model it is the largest matrix (49152 x 576 in SmolLM2-135M). int4 gives
# it int8 instead, as llama.cpp's 4-bit mixes keep output.weight at 6 to 8 bits: on SmolLM2-135M
# an int4 output alone costs about 5% perplexity, an int8 one about 0.2%.
OUTPUT_MODE = {"int8": "int8", "int4": "int8", "fp8": "fp8"}
# A tied output projection shares the (float) embedding's weight, so quantizing it means a copy.
# int8 kernels multiply it faster than float32, so the copy pays for its memory; fp8
# dequantizes on every call, slower than the float32 matrix it would replace, so it stays float.
TIED_OUTPUT_MODE: dict[str, str | None] = {"int8": "int8", "int4": "int8", "fp8": None}


def check_mode(mode: str) -> str:
    """`mode` if it names a weight-only quantization, else ValueError."""
    if mode not in LINEARS:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace every nn.Linear in `model` by its `mode` ("int8", "int4" or "fp8") quantized form.

    Embeddings stay float. The output projection (the module named "output") follows
    OUTPUT_MODE, or TIED_OUTPUT_MODE when its weight is an embedding's (None: left as is). Works
    before or after runtime.modules.fuse_projections(). Returns `model`, changed in place.
    """
    check_mode(mode)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        target: str | None = mode
        if id(module.weight) in embedding_weights:
            target = TIED_OUTPUT_MODE[mode]
        elif name == "output":
            target = OUTPUT_MODE[mode]
        if target is not None:
            model.set_submodule(name, LINEARS[target].from_linear(module))
    return model
