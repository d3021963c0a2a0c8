"""GGUF-quantized layers: C++ integer-dot kernels with a pure-torch fallback."""
