// The C++ kernels' Python module (built by llamaherd/kernels/__init__.py). Its parts:
//   format.h       the packed panel layout, instruction-set selection
//   packing.h      GGUF rows <-> panels
//   kquants.h      k-quant rows rewritten as kernel types
//   activations.h  8-bit activation blocks
//   simd.h         float vector helpers: dot, max, axpy, exp, SwiGLU
//   tile_*.h       one tile per instruction set (AVX-512 VNNI, AMX-INT8, AMX-BF16, AVX2, scalar)
//   matmul.h       matmuls over panels, RMSNorm, SwiGLU
//   decode.h       attention over the KV cache, the fused decode step
//   sampling.h     drawing tokens from softmax(logits / temperature)

#include "decode.h"
#include "kquants.h"
#include "matmul.h"
#include "packing.h"
#include "sampling.h"

namespace {

std::string simd() {
#if defined(LH_AMX_BF16)
  return amx_ready() ? "avx512_vnni+amx+bf16" : "avx512_vnni";
#elif defined(LH_AMX)
  return amx_ready() ? "avx512_vnni+amx" : "avx512_vnni";
#elif defined(LH_AVX512)
  return "avx512_vnni";
#elif defined(LH_AVX_VNNI)
  return "avx_vnni";
#elif defined(LH_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

int64_t bf16_min_rows() {
#if defined(LH_AMX_BF16)
  return amx_ready() ? BF16_MIN_ROWS : 0;
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while the kernels run, so other Python threads (a server's event loop)
  // go on meanwhile.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "Integer-dot matmul kernels for GGUF Q4_0, Q4_1 and Q8_0 weights";
  m.def("repack", &repack, nogil, "GGUF rows uint8 [N_i, bytes] of stacked matrices -> 16-row panels");
  m.def("unpack", &unpack, nogil, "16-row panels -> the first `rows` GGUF rows");
  m.def("dequantize_rows", &dequantize_rows, nogil, "rows `ids` of packed weights -> float32 [n, K]");
  m.def("kquant_to_kernel", &kquant_to_kernel, nogil,
        "k-quant GGUF rows -> rows of Q4_1 (from Q4_K) or Q8_0 (from Q5_K, Q6_K)");
  m.def("matmul", &matmul, nogil, "x float32 [..., K] @ packed W^T (N rows) -> float32 [..., N]");
  m.def("rms_norm", &rms_norm, nogil, "RMSNorm of float32 rows [..., K] with weight [K]");
  m.def("swiglu", &swiglu, nogil, "silu(gate) * up of float32 rows [..., 2H] (gate | up)");
  m.def("draw", &draw, nogil,
        "one token a row of logits float32 [B, V] from softmax(logits / temperature) by inverse CDF");
  m.def("copy_rows", &copy_rows, nogil,
        "positions start..n-1 of cache row src into row dst, in every cache [rows, heads, max_len, D]");
  m.def("attention", &attention, nogil,
        "causal attention of queries float32 [B, T, H, D] over their cache rows, positions [B, T]");
  m.def("simd", &simd, "the instruction set the kernels were compiled for");
  m.def("bf16_min_rows", &bf16_min_rows,
        "rows from which matmuls take AMX-BF16 (bfloat16 products), 0 where they never do");
  py::class_<Decoder>(m, "Decoder", "every layer of a packed model for one new token per sequence")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, torch::Tensor>(),
           py::arg("dim"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"),
           py::arg("hidden_dim"), py::arg("eps"), py::arg("freqs"))
      .def("add_layer", &Decoder::add_layer)
      .def("forward", &Decoder::forward, nogil, py::arg("h"), py::arg("rows"), py::arg("pos"),
           py::arg("k"), py::arg("v"));
}
