"""From a validated request to engine input: prompt ids, sampling settings and grammar constraints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llamaherd.engine.guidance import GrammarError, Guidance
from llamaherd.generation.sampling import SamplingParams
from llamaherd.serve.errors import APIError
from llamaherd.serve.schemas import ChatCompletionRequest, NamedToolChoice, _Sampling


@dataclass(frozen=True)
class ToolSyntax:
    """How the model writes one tool call: begin + {"name": ..., key: {...}} + end."""

    begin: str
    end: str
    arguments_key: str

    def may_start(self, text: str) -> bool:
        """Whether output beginning with `text` may still turn out to be a tool call."""
        t = text.lstrip()
        if self.begin.strip():
            head = self.begin.strip()
            return head.startswith(t) or t.startswith(head)
        return t == "" or t.startswith(("{", "["))


def tool_syntax(fmt: Any) -> ToolSyntax:
    """The call syntax of a chat format: Llama 3's bare JSON with "parameters", or the
    <tool_call> blocks of ChatML models (both read back by tokenizer.toolcalls)."""
    declared = getattr(fmt, "tool_call_syntax", None)
    if declared is not None:
        return ToolSyntax(*declared)
    if fmt.tok.token_to_id("<|start_header_id|>") is not None:
        return ToolSyntax("", "", "parameters")
    return ToolSyntax("<tool_call>\n", "\n</tool_call>", "arguments")


def _tool_instructions(tools: list[dict[str, Any]], syntax: ToolSyntax) -> str:
    """A system-prompt paragraph offering `tools`, for chat templates that ignore them."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    example = (f'{syntax.begin}{{"name": <function name>, "{syntax.arguments_key}": '
               f'<JSON object of arguments>}}{syntax.end}')
    return (f"You may call functions to answer. Available functions:\n<tools>\n{listing}\n"
            f"</tools>\nTo call one, reply with only:\n{example}")


def _written_calls(calls: list[dict[str, Any]], syntax: ToolSyntax) -> str:
    out = []
    for c in calls:
        args = c["function"]["arguments"]
        args = json.loads(args) if isinstance(args, str) and args.strip() else args or {}
        body = json.dumps({"name": c["function"]["name"], syntax.arguments_key: args},
                          ensure_ascii=False)
        out.append(f"{syntax.begin}{body}{syntax.end}")
    return "\n".join(out)


def chat_prompt_ids(fmt: Any, req: ChatCompletionRequest) -> list[int]:
    """The prompt in the model's chat format; tools are shown unless tool_choice is "none".

    A chat template that ignores tools (it renders the same with and without them) gets them
    described in the system message, and earlier calls written out in the model's call syntax.
    """
    messages = []
    for m in req.messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                             "content": m.text()}
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        messages.append(d)
    tools = None
    if req.tools and req.effective_tool_choice() != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    try:
        if tools and fmt.render(messages, tools=tools) == fmt.render(messages):
            messages = _describe_tools(messages, tools, tool_syntax(fmt))
            tools = None
        return fmt.encode_dialog(messages, tools=tools, add_generation_prompt=True)
    except ValueError as e:  # ChatFormatError, TokenizerError, bad tool-call JSON
        raise APIError(f"messages: {e}", param="messages") from e


def _describe_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                    syntax: ToolSyntax) -> list[dict[str, Any]]:
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("tool_calls"):
            written = _written_calls(m.pop("tool_calls"), syntax)
            m["content"] = f"{m['content']}\n{written}" if m["content"] else written
    note = _tool_instructions(tools, syntax)
    if out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{note}"
    else:
        out.insert(0, {"role": "system", "content": note})
    return out


def completion_prompt_ids(tokenizer: Any, prompt: str | list[int], vocab: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError("prompt: must not be empty", param="prompt")
        return tokenizer.encode(prompt, bos=bool(getattr(tokenizer, "add_bos", False)))
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise APIError(f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                       param="prompt")
    return list(prompt)


def output_budget(prompt_len: int, requested: int | None, context: int) -> int:
    """max_tokens for a prompt: as asked if it fits the context window, else an error."""
    room = context - prompt_len
    if room < 1:
        raise APIError(f"the prompt has {prompt_len} tokens but the context window is {context} "
                       f"tokens; shorten the messages", param="messages",
                       code="context_length_exceeded")
    if requested is None:
        return room
    if requested > room:
        raise APIError(f"max_tokens is {requested} but only {room} tokens fit after the "
                       f"{prompt_len}-token prompt (context window {context})",
                       param="max_tokens", code="context_length_exceeded")
    return requested


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None, vocab: int,
                    seed_offset: int = 0) -> SamplingParams:
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    bias = req.token_bias()
    if any(t >= vocab for t in bias):
        raise APIError(f"logit_bias names a token id outside the vocabulary (size {vocab})",
                       param="logit_bias")
    if req.min_tokens > max_tokens:
        raise APIError(f"min_tokens is {req.min_tokens} but at most {max_tokens} tokens may be "
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
                 syntax: ToolSyntax) -> str | None:
    """The grammar that must hold for every choice, or None for free text (fails closed: a schema
    the engine cannot enforce raises APIError)."""
    choice, fmt = req.effective_tool_choice(), req.response_format
    try:
        if choice == "required" or isinstance(choice, NamedToolChoice):
            tools = req.tools or []
            if isinstance(choice, NamedToolChoice):
                tools = [t for t in tools if t.function.name == choice.function.name]
            return guidance.tool_call([(t.function.name, t.function.parameters) for t in tools],
                                      syntax.begin, syntax.end, syntax.arguments_key)
        if fmt is None or fmt.type == "text":
            if choice == "auto" and req.tools:  # text, or a call whose arguments fit its tool
                return guidance.text_or_tool_call(
                    [(t.function.name, t.function.parameters) for t in req.tools],
                    syntax.begin, syntax.end, syntax.arguments_key)
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
