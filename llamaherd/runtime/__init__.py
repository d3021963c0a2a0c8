"""What makes inference fast, applied to a loaded model by one call: `prepare(model) -> Runner`.

    modules.py   fused projections and the kernels' norm, SwiGLU and attention, swapped in
    decoder.py   the fused decode step (every layer in one C++ call)
    kv_cache.py  cache memory taken as it is written; copying rows between cache slots
    runner.py    Runner (forward passes over the cache on the fastest path) and prepare()

The compiled kernels themselves live in llamaherd.kernels, shared with llamaherd.quant.
"""

from llamaherd.runtime.runner import FUSED_PREFILL_LEN, FUSED_PREFILL_TOKENS, Runner, prepare

__all__ = ["FUSED_PREFILL_LEN", "FUSED_PREFILL_TOKENS", "Runner", "prepare"]
