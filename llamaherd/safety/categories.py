"""The hazard categories of Llama Guard 3 (S1-S14), their names in the classification prompt,
and their OpenAI moderation names; the canned refusals Llama Stack answers a flagged request with.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    code: str  # "S1"
    name: str  # as the classification prompt writes it, without the final period
    title: str  # the MLCommons hazard name of Meta's model card
    openai: tuple[str, ...]  # OpenAI moderation categories it maps to (llamaherd's table)


# The prompt's names are the ones Meta's Llama Guard 3 chat templates and Llama Stack write
# ("S3: Sex Crimes."); the model card's longer titles ("Sex-Related Crimes") are for people.
CATEGORIES: dict[str, Category] = {c.code: c for c in (
    Category("S1", "Violent Crimes", "Violent Crimes", ("violence",)),
    Category("S2", "Non-Violent Crimes", "Non-Violent Crimes", ("illicit",)),
    Category("S3", "Sex Crimes", "Sex-Related Crimes", ("sexual",)),
    Category("S4", "Child Exploitation", "Child Sexual Exploitation", ("sexual/minors",)),
    Category("S5", "Defamation", "Defamation", ("harassment",)),
    Category("S6", "Specialized Advice", "Specialized Advice", ("custom/specialized_advice",)),
    Category("S7", "Privacy", "Privacy", ("custom/privacy",)),
    Category("S8", "Intellectual Property", "Intellectual Property",
             ("custom/intellectual_property",)),
    Category("S9", "Indiscriminate Weapons", "Indiscriminate Weapons", ("illicit/violent",)),
    Category("S10", "Hate", "Hate", ("hate",)),
    Category("S11", "Self-Harm", "Suicide & Self-Harm", ("self-harm",)),
    Category("S12", "Sexual Content", "Sexual Content", ("sexual",)),
    Category("S13", "Elections", "Elections", ("custom/elections",)),
    Category("S14", "Code Interpreter Abuse", "Code Interpreter Abuse",
             ("custom/code_interpreter_abuse",)),
)}

# Llama Guard 3 8B knows all fourteen; the 1B (and guards of that size) S1-S13.
LLAMA_GUARD_3_8B = tuple(CATEGORIES)
LLAMA_GUARD_3_1B = LLAMA_GUARD_3_8B[:13]

# OpenAI's moderation categories (the `categories` keys of /v1/moderations), then llamaherd's
# custom ones for the Llama Guard categories OpenAI has no name for.
OPENAI_CATEGORIES: tuple[str, ...] = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic",
    "custom/specialized_advice", "custom/privacy", "custom/intellectual_property",
    "custom/elections", "custom/code_interpreter_abuse",
)

LLAMA_GUARD_REFUSAL = "I can't answer that. Can I help with something else?"
PROMPT_GUARD_REFUSAL = "Sorry, I cannot do this."


def check_codes(codes: list[str] | tuple[str, ...], what: str = "categories") -> list[str]:
    """The codes, each checked to be one of S1-S14; a clear error otherwise."""
    unknown = [c for c in codes if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}: expected codes S1-S14")
    return list(codes)


def openai_categories(codes: list[str]) -> list[str]:
    """The OpenAI moderation categories that Llama Guard codes map to, in OPENAI_CATEGORIES
    order."""
    named = {name for code in codes for name in CATEGORIES[code].openai}
    return [name for name in OPENAI_CATEGORIES if name in named]
