"""From a validated request to engine input: prompt ids, sampling settings and grammar constraints."""

from __future__ import annotations

from llamaherd.chat import ChatFormat, ToolSyntax, build_prompt
from llamaherd.generation.constraints import GrammarError, Guidance
from llamaherd.generation.sampling import SamplingParams
from llamaherd.serve.errors import APIError
from llamaherd.serve.schemas import ChatCompletionRequest, NamedToolChoice, _Sampling
from llamaherd.tokenizer import Tokenizer


def chat_prompt_ids(fmt: ChatFormat, req: ChatCompletionRequest) -> list[int]:
    """The prompt in the model's chat format (chat.build_prompt); tools are offered unless
    tool_choice is "none"."""
    try:
        return build_prompt(fmt, [m.to_message() for m in req.messages], req.offered_tools())
    except ValueError as e:  # ChatFormatError, TokenizerError, bad tool-call JSON
        raise APIError(f"messages: {e}", param="messages") from e


def completion_prompt_ids(tokenizer: Tokenizer, prompt: str | list[int], vocab: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError("prompt: must not be empty", param="prompt")
        return tokenizer.encode_prompt(prompt)
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise APIError(f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                       param="prompt")
    return list(prompt)


def output_budget(prompt_len: int, requested: int | None, context: int,
                  param: str = "messages") -> int:
    """max_tokens for a prompt: as asked if it fits the context window, else an error (`param`:
    the field holding the prompt)."""
    room = context - prompt_len
    if room < 1:
        raise APIError(f"{param}: the prompt has {prompt_len} tokens but the context window is "
                       f"{context} tokens (at least one must be left for the answer); shorten "
                       f"the {param}", param=param, code="context_length_exceeded")
    if requested is None:
        return room
    if requested > room:
        raise APIError(f"max_tokens: {requested} but only {room} tokens fit after the "
                       f"{prompt_len}-token prompt (context window {context})",
                       param="max_tokens", code="context_length_exceeded")
    return requested


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None, vocab: int,
                    seed_offset: int = 0) -> SamplingParams:
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    bias = req.token_bias()
    if any(t >= vocab for t in bias):
        raise APIError(f"logit_bias: names a token id outside the vocabulary (size {vocab})",
                       param="logit_bias")
    if req.min_tokens > max_tokens:
        raise APIError(f"min_tokens: {req.min_tokens} but at most {max_tokens} tokens may be "
                       "generated", param="min_tokens")
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=top_k, top_p=1.0 if req.top_p is None else req.top_p,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=None if req.seed is None else req.seed + seed_offset,
            stop=req.stop_list(), logprobs=logprobs, logit_bias=bias,
            min_tokens=req.min_tokens)
    except ValueError as e:
        raise APIError(str(e)) from e


def chat_grammar(req: ChatCompletionRequest, guidance: Guidance,
                 syntax: ToolSyntax | None) -> str | None:
    """The grammar that must hold for every choice, or None for free text (fails closed: a schema
    the engine cannot enforce raises APIError). syntax: how the model writes tool calls (None:
    it has no tool calling)."""
    choice, fmt = req.effective_tool_choice(), req.response_format
    if choice != "none" and syntax is None:
        raise APIError("tools: this model's chat format has no tool calling", param="tools")
    try:
        if choice == "required" or isinstance(choice, NamedToolChoice):
            tools = req.tools or []
            if isinstance(choice, NamedToolChoice):
                tools = [t for t in tools if t.function.name == choice.function.name]
            return guidance.tool_call([(t.function.name, t.function.parameters) for t in tools],
                                      syntax)
        if fmt is None or fmt.type == "text":
            if choice == "auto" and req.tools:  # text, or a call whose arguments fit its tool
                return guidance.text_or_tool_call(
                    [(t.function.name, t.function.parameters) for t in req.tools], syntax)
            return None
        if fmt.type == "json_object":
            return guidance.json_schema(None)
        return guidance.json_schema(fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None
                                    else True)
    except GrammarError as e:
        param = "tools" if req.tools and choice != "none" and (
            choice != "auto" or fmt is None or fmt.type == "text") else "response_format"
        raise APIError(f"{param}: the engine cannot enforce this schema: {e}", param=param,
                       code="unsupported_schema") from e
