"""Response objects and stream chunks in the exact shapes of OpenAI's API, as plain dicts."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from llamaherd.generation.sampling import TokenLogprob
from llamaherd.tokenizer import Tokenizer

SYSTEM_FINGERPRINT = "llamaherd"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def sse(obj: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying JSON (or the literal [DONE])."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"),
                                                       ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """The `usage` object; cached_tokens: prompt tokens reused from the KV cache (prefix caching)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class TokenText:
    """Token id -> (text, UTF-8 bytes) for logprob entries, cached per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self.tokenizer.decode_bytes([token_id])
            hit = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = hit
        return hit


def chat_logprob_entries(text: TokenText, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
    """`choices[].logprobs.content` of a chat completion."""
    out = []
    for lp in logprobs:
        token, raw = text(lp.token_id)
        top = []
        for tid, value in lp.top:
            t, b = text(tid)
            top.append({"token": t, "logprob": value, "bytes": b})
        out.append({"token": token, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return out


def completion_logprobs(text: TokenText, logprobs: list[TokenLogprob],
                        start_offset: int = 0) -> dict[str, Any]:
    """`choices[].logprobs` of a legacy text completion."""
    tokens, values, tops, offsets = [], [], [], []
    offset = start_offset
    for lp in logprobs:
        token, _ = text(lp.token_id)
        tokens.append(token)
        values.append(lp.logprob)
        tops.append({text(tid)[0]: v for tid, v in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def echo_logprobs(text: TokenText, ids: list[int], entries: list[TokenLogprob | None],
                  skip: int = 0) -> dict[str, Any]:
    """`choices[].logprobs` of an echoed prompt (a legacy text completion with echo): every
    prompt token, its log-probability given those before it (the first one's null, as OpenAI's
    was) and its top alternatives, and its offset in the echoed text. The first `skip` tokens
    (a BOS the tokenizer put before a text prompt) are not part of that text: offset 0."""
    decoder = text.tokenizer.stream_decoder(start_of_text=True)
    tokens, values, tops, offsets = [], [], [], []
    at = 0
    for i, (token_id, lp) in enumerate(zip(ids, entries)):
        tokens.append(text(token_id)[0])
        values.append(None if lp is None else lp.logprob)
        tops.append({text(t)[0]: v for t, v in lp.top} if lp is not None and lp.top else None)
        offsets.append(at)
        if i >= skip:  # a token finishing a character split across tokens brings all of it
            at += len(decoder.push(token_id))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def join_logprobs(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Two legacy `logprobs` objects as one (an echoed prompt's, then the answer's)."""
    return {key: first[key] + then[key] for key in first}


class ChatChunks:
    """Builds `chat.completion.chunk` events for one streamed request."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = new_id("chatcmpl")
        self.created = now()
        self.model = model
        self.include_usage = include_usage
        self._content: dict[int, tuple[bytes, bytes]] = {}  # choice -> bytes around the text

    def content(self, index: int, text: str) -> bytes:
        """chunk(index, {"content": text}), byte for byte, from the bytes around the text: one
        json.dumps of the text rather than of the whole chunk, for nearly every token."""
        parts = self._content.get(index)
        if parts is None:  # "\x00" is written \u0000, which nothing else in a chunk can be
            head, tail = self.chunk(index, {"content": "\x00"}).split(b'"\\u0000"')
            parts = self._content[index] = (head, tail)
        return parts[0] + json.dumps(text, ensure_ascii=False).encode() + parts[1]

    def chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None = None,
              logprobs: list[dict[str, Any]] | None = None,
              extra: dict[str, Any] | None = None) -> bytes:
        """One choice's chunk; `extra`: llamaherd's own fields of the choice (a shield's
        `safety_violation`)."""
        choice = {"index": index, "delta": delta,
                  "logprobs": None if logprobs is None else {"content": logprobs,
                                                             "refusal": None},
                  "finish_reason": finish_reason, **(extra or {})}
        obj: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk",
                               "created": self.created, "model": self.model,
                               "system_fingerprint": SYSTEM_FINGERPRINT, "choices": [choice]}
        if self.include_usage:
            obj["usage"] = None
        return sse(obj)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int,
                    cached_tokens: int = 0) -> bytes:
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens, cached_tokens)})


def chat_completion(model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                    completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(),
            "model": model, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def text_completion(model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                    completion_tokens: int, completion_id: str | None = None,
                    created: int | None = None, with_usage: bool = True,
                    cached_tokens: int = 0) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": completion_id or new_id("cmpl"), "object": "text_completion",
                           "created": created or now(), "model": model,
                           "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
    if with_usage:
        obj["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
    return obj


def tool_call_dict(call_id: str, name: str, arguments: dict[str, Any] | str,
                   index: int | None = None) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    out: dict[str, Any] = {"id": call_id, "type": "function",
                           "function": {"name": name, "arguments": args}}
    if index is not None:
        out = {"index": index, **out}
    return out
