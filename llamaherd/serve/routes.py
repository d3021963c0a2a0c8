"""The server's endpoints: OpenAI's chat and text completions, models and moderations, Llama
Stack's shields, tokenizer helpers, health, metrics and the web page. Each handler finds the
server's state on the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from llamaherd.serve.chat_api import ChatRun
from llamaherd.serve.completions_api import CompletionRun
from llamaherd.serve.errors import APIError
from llamaherd.serve.metrics import CONTENT_TYPE
from llamaherd.serve.prompting import chat_prompt_ids
from llamaherd.serve.run import Run
from llamaherd.serve.safety_api import get_shield, list_shields, moderate, run_shield
from llamaherd.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModerationRequest,
    RunShieldRequest,
    TokenizeRequest,
)
from llamaherd.serve.state import ServerState

STATIC = Path(__file__).parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

router = APIRouter()


def server(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    s = server(request)
    return {"status": "ok", "model": s.model_id, "queue_depth": s.scheduler.queue_depth}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(server(request).metrics.render(), media_type=CONTENT_TYPE)


def model_card(s: ServerState) -> dict[str, Any]:
    return {"id": s.model_id, "object": "model", "created": s.created,
            "owned_by": "llamaherd", "max_model_len": s.context}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(server(request))]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    s = server(request)
    s.check_model(model)
    return model_card(s)


async def respond(run: Run, stream: bool, request: Request) -> Response:
    if stream:
        chunks = await run.stream()
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **run.headers()})
    body = await run.complete(request)
    return JSONResponse(body, headers=run.headers())


@router.post("/v1/chat/completions", response_model=None)
async def chat(body: ChatCompletionRequest, request: Request) -> Response:
    return await respond(ChatRun(server(request), body), bool(body.stream), request)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await respond(CompletionRun(server(request), body), bool(body.stream), request)


@router.post("/v1/moderations")
async def moderations(body: ModerationRequest, request: Request) -> dict[str, Any]:
    return await moderate(server(request).shields, body)


@router.get("/v1/shields")
async def shields(request: Request) -> dict[str, Any]:
    return list_shields(server(request).shields)


@router.get("/v1/shields/{identifier:path}")
async def shield(identifier: str, request: Request) -> dict[str, Any]:
    return get_shield(server(request).shields, identifier)


@router.post("/v1/safety/run-shield")
async def safety_run_shield(body: RunShieldRequest, request: Request) -> dict[str, Any]:
    return await run_shield(server(request).shields, body)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """A prompt's token ids as vLLM's /tokenize gives them (lm-evaluation-harness's remote
    tokenizer calls it): special-token text ("<|im_end|>") becomes the special token, as Hugging
    Face tokenizers do, and add_special_tokens puts the BOS first where the model expects one;
    or the ids of chat messages in the model's chat format."""
    s = server(request)
    if body.model is not None:
        s.check_model(body.model)
    if body.messages is not None:
        chat_req = ChatCompletionRequest.model_validate(
            {"model": s.model_id, "messages": [m.model_dump() for m in body.messages]})
        ids = chat_prompt_ids(s.chat, chat_req)
    else:
        tok = s.tokenizer
        ids = tok.encode(body.prompt or "", bos=body.add_special_tokens and tok.add_bos,
                         allow_special=True)
    return {"tokens": ids, "count": len(ids), "max_model_len": s.context}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    """The served tokenizer's special tokens and chat template, as vLLM's /tokenizer_info
    reports them (lm-evaluation-harness probes it, with /tokenize, before using the server's
    tokenizer): a token is given as its text; null where the vocabulary has none."""
    s = server(request)
    tok = s.tokenizer

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tok.id_to_piece(token_id)

    return {"tokenizer_class": type(tok).__name__, "vocab_size": tok.vocab_size,
            "model_max_length": s.context, "add_bos_token": tok.add_bos,
            "bos_token": text(tok.bos_id), "bos_token_id": tok.bos_id,
            "eos_token": text(tok.eos_id), "eos_token_id": tok.eos_id,
            "pad_token": text(tok.pad_id), "pad_token_id": tok.pad_id,
            "unk_token": text(tok.unk_id), "unk_token_id": tok.unk_id,
            "chat_template": tok.chat_template}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    s = server(request)
    if body.model is not None:
        s.check_model(body.model)
    bad = [t for t in body.tokens if not 0 <= t < s.tokenizer.vocab_size]
    if bad:
        raise APIError(f"tokens: id {bad[0]} is outside the vocabulary "
                       f"(0..{s.tokenizer.vocab_size - 1})", param="tokens")
    return {"prompt": s.tokenizer.decode(body.tokens)}
