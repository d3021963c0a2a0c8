"""Weight-only int8/int4/fp8 layers against float math, the swap function, and load(quant=)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llamaherd.api import load
from llamaherd.quant.weight_only import (
    INT8_DEQUANTIZE_ROWS,
    LINEARS,
    MODES,
    OUTPUT_MODE,
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    e4m3_as_float16,
    quantize_model,
)
from llamaherd.runtime.modules import fuse_projections
from tests.support.models import TINY, make_tiny_model

# Relative error bounds (Frobenius norm) of a quantized weight on Gaussian data: int8 keeps
# about 0.5% error, fp8 e4m3 (3 mantissa bits) about 2.5%, int4 in groups of 32 about 6-7%.
WEIGHT_TOLERANCE = {"int8": 0.01, "int4": 0.09, "fp8": 0.04}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_linear(out_features: int = 96, in_features: int = 128, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
    return linear


@pytest.mark.parametrize("mode", MODES)
def test_quantized_weight_is_close_to_the_float_weight(mode: str) -> None:
    linear = random_linear()
    layer = LINEARS[mode].from_linear(linear)
    assert layer.dequantize().shape == linear.weight.shape
    assert rel_err(layer.dequantize(), linear.weight) < WEIGHT_TOLERANCE[mode]


@pytest.mark.parametrize("rows", [5, INT8_DEQUANTIZE_ROWS])  # decode and long-prompt paths
@pytest.mark.parametrize("mode", MODES)
def test_forward_is_the_product_with_the_dequantized_weight(mode: str, rows: int) -> None:
    linear = random_linear()
    layer = LINEARS[mode].from_linear(linear)
    x = torch.randn(1, rows, 128)
    y = layer(x)
    assert y.shape == (1, rows, 96) and y.dtype == torch.float32
    # The kernels round activations to bfloat16 (relative error 2^-9 each); the float32 paths
    # (fp8, int8 on long prompts) only reorder float32 sums.
    exact = x @ layer.dequantize().T
    float32_path = mode == "fp8" or (mode == "int8" and rows >= INT8_DEQUANTIZE_ROWS)
    assert rel_err(y, exact) < (1e-6 if float32_path else 6e-3)
    assert rel_err(y, linear(x)) < WEIGHT_TOLERANCE[mode]


@pytest.mark.parametrize("mode", MODES)
def test_forward_keeps_the_input_dtype(mode: str) -> None:
    layer = LINEARS[mode].from_linear(random_linear())
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_int8_stores_one_byte_per_weight_and_one_scale_per_row() -> None:
    layer = Int8Linear.from_linear(random_linear())
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (96, 128)
    assert layer.scales.shape == (96,)
    assert int(layer.weight.abs().max()) == 127  # the scale maps each row's largest weight to 127


def test_int4_stores_half_a_byte_per_weight_in_groups_of_32() -> None:
    linear = random_linear()
    layer = Int4Linear.from_linear(linear)
    assert layer.packed.dtype == torch.uint8 and layer.packed.shape == (96, 64)
    assert layer.scale_zeros.shape == (128 // 32, 96, 2)
    q = layer.unpack()
    assert int(q.min()) == 0 and int(q.max()) == 15
    # Each group's extremes land on the ends of the 4-bit range.
    groups = q.view(96, 4, 32)
    assert (groups.amin(-1) == 0).all() and (groups.amax(-1) == 15).all()


@pytest.mark.parametrize("out_features", [16, 80, 192, 208])
def test_int4_unpacking_reads_the_kernel_layout(out_features: int) -> None:
    layer = Int4Linear.from_linear(random_linear(out_features, 96))
    # Independent read-back: the kernel multiplying the identity with scale 1 and zero 8 returns
    # (q - 8) * 1 + 8 = q for every weight.
    scale_zeros = torch.ones_like(layer.scale_zeros)
    scale_zeros[..., 1] = 8
    eye = torch.eye(96, dtype=torch.bfloat16)
    q_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.packed, 32, scale_zeros)
    assert torch.equal(layer.unpack(), q_t.T.to(torch.int32))


def test_int4_rejects_shapes_the_kernel_cannot_take() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4Linear.from_linear(random_linear(96, 100))


def test_fp8_storage_is_float8_e4m3() -> None:
    layer = Fp8Linear.from_linear(random_linear())
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight.element_size() == 1
    assert layer.scales.dtype == torch.float32 and layer.scales.shape == (96,)
    # Each row's largest weight uses the largest finite e4m3 value.
    assert torch.equal(layer.weight.float().abs().amax(1), torch.full((96,), 448.0))


def test_fp8_bit_conversion_is_exact_for_every_code() -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    reference = codes.float()
    converted = e4m3_as_float16(codes).float() * 256
    finite = ~reference.isnan()
    assert finite.sum() == 254  # e4m3fn has two NaN codes and no infinities
    assert torch.equal(converted[finite], reference[finite])


@pytest.mark.parametrize("mode", MODES)
def test_concat_joins_outputs_side_by_side(mode: str) -> None:
    cls = LINEARS[mode]
    parts = [cls.from_linear(random_linear(n, 128, seed=n)) for n in (64, 32, 32)]
    fused = cls.concat(parts)
    x = torch.randn(4, 128)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert torch.allclose(fused(x), torch.cat([p(x) for p in parts], dim=-1), atol=1e-5)


def test_bias_is_rejected() -> None:
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.from_linear(nn.Linear(64, 32))


# The tiny model: dim 64 and hidden 192 are multiples of 32 (int4 groups); vocab 256.
def tiny_model(tied: bool = False) -> nn.Module:
    return make_tiny_model(TINY.replace(tie_embeddings=tied))


def linear_names(model: nn.Module, kind: type[nn.Module]) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, kind)}


@pytest.mark.parametrize("mode", MODES)
def test_quantize_model_replaces_every_linear_and_keeps_logits_close(mode: str) -> None:
    model = tiny_model()
    names = linear_names(model, nn.Linear)
    assert len(names) == 7 * TINY.n_layers + 1
    tokens = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(tokens)
        assert quantize_model(model, mode) is model
        got = model(tokens)
    assert linear_names(model, nn.Linear) == set()
    assert linear_names(model, LINEARS[mode]) | {"output"} == names
    assert isinstance(model.output, LINEARS[OUTPUT_MODE[mode]])
    assert isinstance(model.tok_embeddings, nn.Embedding)
    assert rel_err(got, expected) < 2 * WEIGHT_TOLERANCE[mode]
    # The same greedy next token almost everywhere.
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.75


def test_int4_gives_the_output_projection_int8() -> None:
    model = quantize_model(tiny_model(), "int4")
    assert isinstance(model.layers[0].feed_forward.w2, Int4Linear)
    assert isinstance(model.output, Int8Linear)


@pytest.mark.parametrize("mode", MODES)
def test_quantizing_fused_projections_equals_quantizing_them_separately(mode: str) -> None:
    # Scales are per output row (or per row group), so fusing first changes nothing.
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (1, 10))
    with torch.no_grad():
        separate = quantize_model(tiny_model(), mode)(tokens)
        fuse_projections(model)
        fused = quantize_model(model, mode)(tokens)
    assert isinstance(model.layers[0].attention.wqkv, LINEARS[mode])
    assert torch.allclose(fused, separate, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_fused_quantized_layers_compute_what_separate_ones_do(mode: str) -> None:
    model = quantize_model(tiny_model(), mode)
    tokens = torch.randint(0, TINY.vocab_size, (1, 10))
    with torch.no_grad():
        before = model(tokens)
        fuse_projections(model)
        after = model(tokens)
    assert isinstance(model.layers[1].feed_forward.w13, LINEARS[mode])
    assert torch.allclose(after, before, atol=1e-5)


@pytest.mark.parametrize("mode, copy", [("int8", Int8Linear), ("int4", Int8Linear), ("fp8", None)])
def test_tied_output_gets_a_quantized_copy_only_where_faster(mode: str, copy: type | None) -> None:
    model = tiny_model(tied=True)
    embedding = model.tok_embeddings.weight.detach().clone()
    quantize_model(model, mode)
    if copy is None:
        assert model.output.weight is model.tok_embeddings.weight
    else:
        assert isinstance(model.output, copy)
    assert torch.equal(model.tok_embeddings.weight, embedding)  # the embedding stays float


def test_unknown_mode_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown quantization 'int3'; choose one of int8, "
                                         "int4, fp8"):
        quantize_model(tiny_model(), "int3")


def test_load_quantizes_a_gguf_after_the_float32_load(tiny_gguf_with_vocab) -> None:
    exact = load(tiny_gguf_with_vocab, dtype="float32")
    llm = load(tiny_gguf_with_vocab, quant="int8")
    assert linear_names(llm.model, nn.Linear) == set()
    assert len(linear_names(llm.model, Int8Linear)) == 7 * TINY.n_layers + 1
    ids = llm.tokenizer.encode("The lighthouse keeper cleaned the glass.")
    assert rel_err(llm.logits(ids), exact.logits(ids)) < 0.02


def test_load_rejects_an_unknown_quant_before_reading_anything() -> None:
    with pytest.raises(ValueError, match="unknown quantization 'q4'"):
        load("no-such-file.gguf", quant="q4")
