"""llamaherd: a complete, readable Llama stack.

    import llamaherd
    llm = llamaherd.load("smollm2-135m-instruct")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamaherd.api import LLM, load

__all__ = ["LLM", "load"]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `llamaherd --help` does not pay for importing torch.
    if name in __all__:
        from llamaherd import api

        return getattr(api, name)
    raise AttributeError(f"module 'llamaherd' has no attribute {name!r}")
