"""Safety: the Llama Guard 3 and Prompt Guard protocols, the hazard category table, and guards
of llamaherd's own built from labelled data in PyPI packages.

    categories.py   S1-S14, their OpenAI moderation names, the canned refusals
    llama_guard.py  the classification prompt, its answer, its score; LlamaGuard over any model
    prompt_guard.py jailbreak and injection scores of a 3-way classifier over a text's windows
"""

from llamaherd.safety.categories import (
                                         CATEGORIES,
                                         LLAMA_GUARD_REFUSAL,
                                         PROMPT_GUARD_REFUSAL,
                                         openai_categories,
)
from llamaherd.safety.llama_guard import GuardAnswerError, LlamaGuard, Verdict, parse, render
from llamaherd.safety.prompt_guard import PromptGuard, PromptVerdict, load_prompt_guard

__all__ = ["CATEGORIES", "LLAMA_GUARD_REFUSAL", "PROMPT_GUARD_REFUSAL", "GuardAnswerError",
           "LlamaGuard", "PromptGuard", "PromptVerdict", "Verdict", "load_prompt_guard",
           "openai_categories", "parse", "render"]
