"""The shields' own endpoints: OpenAI's POST /v1/moderations, and Llama Stack's GET /v1/shields
and POST /v1/safety/run-shield.

Moderation scores. Llama Guard gives one probability, P(unsafe) as its answer's first token, not
one per category. A result's `category_scores` holds that probability for each OpenAI category
the flagged Llama Guard categories map to (safety.categories.openai_categories), and 0 for every
other (also for every category when the text is safe); llamaherd's extra fields keep the rest:
`category_codes` (the S-codes) and `score` (P(unsafe) itself, whether flagged or not).
"""

from __future__ import annotations

from typing import Any

from llamaherd.safety.categories import OPENAI_CATEGORIES, openai_categories
from llamaherd.safety.llama_guard import Verdict
from llamaherd.serve.errors import APIError
from llamaherd.serve.openai_format import new_id
from llamaherd.serve.schemas import ModerationRequest, RunShieldRequest
from llamaherd.serve.shields import LlamaGuardShield, Shields

NO_SHIELDS = "this server has no shields; start it with --input-shield, --output-shield or " \
             "--prompt-shield"


def list_shields(shields: Shields | None) -> dict[str, Any]:
    """GET /v1/shields: Llama Stack's Shield objects, as `{"data": [...]}`."""
    return {"data": [s.card() for s in shields.all()] if shields is not None else []}


def get_shield(shields: Shields | None, identifier: str) -> dict[str, Any]:
    """GET /v1/shields/{identifier}."""
    if shields is None:
        raise APIError(f"the shield {identifier!r} does not exist; {NO_SHIELDS}", 404,
                       param="identifier", code="shield_not_found")
    return shields.get(identifier, "identifier").card()


async def run_shield(shields: Shields | None, req: RunShieldRequest) -> dict[str, Any]:
    """POST /v1/safety/run-shield: the shield's violation on the last message, or null."""
    if shields is None:
        raise APIError(f"the shield {req.shield_id!r} does not exist; {NO_SHIELDS}", 404,
                       param="shield_id", code="shield_not_found")
    shield = shields.get(req.shield_id)
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
    violation = await shield.violation(conversation, "run_shield")
    return {"violation": None if violation is None else violation.to_dict()}


def moderation_shield(shields: Shields | None, model: str | None) -> LlamaGuardShield:
    """The Llama Guard shield a moderation request names, else the input (or output) shield."""
    if shields is None or (shields.input is None and shields.output is None):
        raise APIError("moderations need a Llama Guard shield; start the server with "
                       "--input-shield or --output-shield", param="model")
    if model is None:
        return shields.input or shields.output  # type: ignore[return-value]
    shield = shields.get(model, "model")
    if not isinstance(shield, LlamaGuardShield):
        raise APIError(f"the shield {model!r} is a Prompt Guard classifier; moderations need a "
                       "Llama Guard shield", param="model")
    return shield


async def moderate(shields: Shields | None, req: ModerationRequest) -> dict[str, Any]:
    """POST /v1/moderations: one result per input text, all judged in one batch."""
    shield = moderation_shield(shields, req.model)
    verdicts = await shield.verdicts(req.texts(), "moderation")
    return {"id": new_id("modr"), "model": shield.identifier,
            "results": [moderation_result(v) for v in verdicts]}


def moderation_result(v: Verdict) -> dict[str, Any]:
    """One text's result in OpenAI's shape, with llamaherd's `category_codes` and `score`."""
    flagged = set() if v.safe else set(openai_categories(v.categories))
    return {"flagged": not v.safe,
            "categories": {name: name in flagged for name in OPENAI_CATEGORIES},
            "category_scores": {name: v.score if name in flagged else 0.0
                                for name in OPENAI_CATEGORIES},
            "category_applied_input_types": {name: ["text"] if name in flagged else []
                                             for name in OPENAI_CATEGORIES},
            "category_codes": list(v.categories), "score": v.score}
