"""Request bodies of the OpenAI-compatible API, validated strictly (wrong types are errors)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llamaherd import chat
from llamaherd.serve.errors import FieldError

MAX_N = 8  # choices per request
MAX_STOP = 8  # stop strings per request
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # tokens a request may bias
MAX_PROMPTS = 64  # prompts in one text-completion request (a list of texts or of token-id lists)
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path ("messages[0].content") of the first string (or key) in decoded JSON that holds
    a lone UTF-16 surrogate (JSON's "\\ud800" escape unpaired): such a string is not text, and
    would fail wherever it is encoded. None if there is none."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            name = str(key).encode("utf-8", "backslashreplace").decode()  # a key may be one
            here = f"{path}.{name}" if path else name
            if isinstance(key, str) and _SURROGATE.search(key):
                return here
            found = lone_surrogate(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


class _Strict(BaseModel):
    # Unknown fields are ignored (clients send vendor extras); known ones must have the right type.
    model_config = ConfigDict(strict=True, extra="ignore")


class _Body(_Strict):
    """A request body: besides its fields' types, every string in it must be text."""

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        where = lone_surrogate(data) if isinstance(data, dict) else None
        if where is not None:
            raise FieldError(where, "holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                    "escape), which is not valid Unicode text")
        return data


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.role == "assistant":
            if self.content is None and not self.tool_calls:
                raise FieldError("content", "an assistant message needs content or tool_calls")
        elif self.content is None:
            raise FieldError("content", f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise FieldError("tool_call_id", "a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise FieldError("tool_calls", "only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def to_message(self) -> chat.Message:
        """The library's message ("developer" is a system message; arguments parsed from JSON:
        bad JSON is a chat.ChatFormatError)."""
        calls = [chat.ToolCall.from_dict(c.model_dump()) for c in self.tool_calls or ()]
        role = "system" if self.role == "developer" else self.role
        return chat.Message(role, self.text(), calls or None, self.tool_call_id, self.name)


class FunctionDef(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef

    def to_tool(self) -> chat.Tool:
        return chat.Tool.from_any(self.model_dump(exclude_none=True))


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JSONSchemaSpec(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class TextFormat(_Strict):
    type: Literal["text"]


class JSONObjectFormat(_Strict):
    type: Literal["json_object"]


class JSONSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat,
                           Field(discriminator="type")]


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    seed: int | None = None
    # token id (as a string, as in OpenAI's API) -> bias in [-100, 100] added to its logit
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0  # no stop token before this many (as vLLM's)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check_common(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "only allowed when stream is true")
        if any(s == "" for s in self.stop_list()):
            raise FieldError("stop", "stop strings must not be empty")
        if any(not (k.isascii() and k.isdigit()) for k in self.logit_bias or {}):
            raise FieldError("logit_bias", "keys must be token ids (decimal integers)")
        return self

    def token_bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "requires logprobs to be true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise FieldError("tools", "tool names must be unique")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise FieldError("tool_choice", "needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise FieldError("tool_choice",
                             f"names an unknown function {choice.function.name!r}")
        if self.tools and self.response_format is not None and \
                self.response_format.type != "text" and choice not in (None, "none"):
            raise FieldError("response_format", "json cannot be combined with tool calls")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def effective_tool_choice(self) -> str | NamedToolChoice:
        if not self.tools:
            return "none"
        return self.tool_choice if self.tool_choice is not None else "auto"

    def offered_tools(self) -> list[chat.Tool]:
        """The tools the model is shown: none when tool_choice is "none"."""
        if self.effective_tool_choice() == "none":
            return []
        return [t.to_tool() for t in self.tools or ()]


PROMPT_FORMS = ("a string, a list of strings, a list of token ids or a list of lists of "
                "token ids")


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        type(t) is int for t in value)


class CompletionRequest(_Sampling):
    """OpenAI's legacy text completion. `prompt`: a text, a list of token ids, or a batch (a
    list of texts or of token-id lists), each prompt n choices. `echo`: each choice's text (and
    with `logprobs` its log-probabilities) starts with its prompt's, the first prompt token's
    log-probability null; with `max_tokens` 0 nothing is generated (the prompt is scored)."""

    prompt: (str | Annotated[list[int], Field(min_length=1)]
             | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # the legacy API's default
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_form(cls, value: Any) -> Any:
        """One message for every wrong shape, instead of one per member of the union."""
        if isinstance(value, str) or _is_token_ids(value):
            return value
        if isinstance(value, list) and value and (all(isinstance(p, str) for p in value)
                                                  or all(_is_token_ids(p) for p in value)):
            if len(value) > MAX_PROMPTS:
                raise FieldError("", f"{len(value)} prompts are more than the {MAX_PROMPTS} "
                                     "a request may hold")
            return value
        if isinstance(value, list) and not value:
            raise FieldError("", "must not be empty")
        raise FieldError("", f"must be {PROMPT_FORMS}")

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "0 is only allowed with echo (scoring the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


MAX_MODERATION_INPUTS = 32


class ModerationRequest(_Body):
    """OpenAI's POST /v1/moderations: a text or a list of texts; `model` names a Llama Guard
    shield (default: the input shield, else the output shield)."""

    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_MODERATION_INPUTS)]
    model: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class RunShieldRequest(_Body):
    """Llama Stack's POST /v1/safety/run-shield: a conversation whose last message the shield
    judges (`params`, which older clients send, is accepted and unused)."""

    shield_id: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    params: dict[str, Any] | None = None
