"""load() and the LLM object: the one front door for Python users."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llamaherd import hub, runtime
from llamaherd.checkpoint import Checkpoint, load_checkpoint
from llamaherd.config import ModelArgs
from llamaherd.model import Transformer
from llamaherd.runtime import Runner
from llamaherd.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llamaherd.chat import ChatFormat, Message, Tool
    from llamaherd.generation.chat import ChatCompletion
    from llamaherd.generation.engine import Engine
    from llamaherd.generation.generate import Completion
    from llamaherd.generation.sampling import SamplingParams
    from llamaherd.generation.sequence import Event

Messages = Iterable["Message | Mapping[str, Any]"]
Tools = Iterable["str | Mapping[str, Any] | Tool"] | None

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class LLM:
    """A loaded model with its tokenizer, run by `runner` (llamaherd.runtime)."""

    def __init__(self, checkpoint: Checkpoint, tokenizer: Tokenizer, runner: Runner) -> None:
        self.checkpoint = checkpoint
        self.model: Transformer = checkpoint.model
        self.args: ModelArgs = checkpoint.args
        self.tokenizer = tokenizer
        self.runner = runner
        self._engine: Engine | None = None

    @cached_property
    def chat_format(self) -> ChatFormat:
        """The tokenizer's chat format (llamaherd.chat.chat_format)."""
        from llamaherd.chat import chat_format

        return chat_format(self.tokenizer)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits of every position, shape [len(token_ids), vocab]; no cache involved."""
        if not token_ids:
            raise ValueError("token_ids is empty")
        if len(token_ids) > self.args.max_seq_len:
            raise ValueError(f"{len(token_ids)} tokens exceed the context window of "
                             f"{self.args.max_seq_len}")
        saved = [layer.attention.cache for layer in self.model.layers]
        self.model.drop_cache()
        try:
            return self.model(torch.tensor([token_ids]))[0].float()
        finally:
            for layer, cache in zip(self.model.layers, saved):
                layer.attention.cache = cache

    # ----- generation: every method below drives llamaherd.generation's one engine -----

    def events(self, prompts: list[list[int]], draft: str | LLM | None = None,
               draft_k: int = 4, **sampling: Any) -> Iterator[Event]:
        """Engine events for token-id prompts (the loop the other methods share).

        draft: None, "ngram" (prompt lookup) or a smaller LLM sharing the vocabulary, for greedy
        speculative decoding with draft_k tokens checked per forward.
        """
        from llamaherd.generation.generate import generate_stream, sized_engine
        from llamaherd.generation.sampling import SamplingParams

        params = SamplingParams(**sampling)
        self._engine = sized_engine(self._engine, self.runner, self.tokenizer, prompts, params)
        if draft is None:
            return generate_stream(self._engine, prompts, params)
        from llamaherd.generation.speculative import speculative_stream

        return speculative_stream(self._engine, prompts, params,
                                  draft if isinstance(draft, str) else draft.runner, draft_k)

    def events_each(self, prompts: list[list[int]],
                    params: list[SamplingParams]) -> Iterator[Event]:
        """Engine events for token-id prompts, each with its own SamplingParams."""
        from llamaherd.generation.generate import generate_stream, sized_engine

        self._engine = sized_engine(self._engine, self.runner, self.tokenizer, prompts, params)
        return generate_stream(self._engine, prompts, params)

    def generate(self, prompt_or_prompts: str | list[int] | list[str] | list[list[int]],
                 **sampling: Any) -> list[Completion]:
        """Complete a prompt (str or list of token ids) or a list of prompts.

        Returns n completions per prompt, prompt by prompt. Keyword arguments are SamplingParams
        fields (max_new_tokens, temperature=0 for greedy, top_k, top_p, min_p, seed, stop, ...),
        and draft= / draft_k= for speculative decoding (see `events`).
        """
        from llamaherd.generation.generate import collect, to_token_ids

        batch = to_token_ids(self.tokenizer, prompt_or_prompts)
        return collect(self.events(batch.ids, **sampling))

    def stream(self, prompt: str | list[int], **sampling: Any) -> Iterator[str]:
        """Text deltas of one completion as they are generated."""
        from llamaherd.generation.generate import to_token_ids

        batch = to_token_ids(self.tokenizer, prompt)
        if not batch.single or sampling.get("n", 1) != 1:
            raise ValueError("stream() takes one prompt and n=1")
        for e in self.events(batch.ids, **sampling):
            if e.text:
                yield e.text

    def chat_events(self, messages: Messages, tools: Tools = None,
                    **sampling: Any) -> Iterator[Event]:
        """Engine events of one assistant reply to `messages` in the model's chat format."""
        from llamaherd.chat import build_prompt

        return self.events([build_prompt(self.chat_format, messages, tools)], **sampling)

    def chat(self, messages: Messages, tools: Tools = None, **sampling: Any) -> ChatCompletion:
        """The assistant's reply (text or tool calls) to `messages` (dicts or Message objects)."""
        from llamaherd.chat.messages import as_tools
        from llamaherd.generation.chat import chat_completion

        tools = as_tools(tools)
        events = list(self.chat_events(messages, tools, **sampling))
        return chat_completion(self.chat_format, events, [t.name for t in tools])

    def stream_chat(self, messages: Messages, tools: Tools = None,
                    **sampling: Any) -> Iterator[str]:
        """Text deltas of the assistant's reply as they are generated."""
        for e in self.chat_events(messages, tools, **sampling):
            if e.text:
                yield e.text

    def __repr__(self) -> str:
        a = self.args
        return (f"LLM({self.checkpoint.path.name}, {self.checkpoint.format}, dim={a.dim}, "
                f"layers={a.n_layers}, vocab={a.vocab_size})")


def open_checkpoint(name_or_path: str | Path, *, dtype: str | torch.dtype | None = None,
                    packed: bool = False) -> tuple[Checkpoint, Tokenizer]:
    """The checkpoint (a pure Transformer, nothing applied to it yet) and its tokenizer: what
    load() starts from, and what training starts from. dtype and packed as for
    load_checkpoint; dtype may be a name ("float32", "bfloat16")."""
    from llamaherd import tokenizer as tok

    path = hub.resolve_path(name_or_path)
    ckpt = load_checkpoint(path, dtype=_parse_dtype(dtype), packed=packed,
                           read_tokenizer=lambda file, meta: tok.load(file, metadata=meta))
    tokenizer = ckpt.tokenizer if ckpt.tokenizer is not None else tok.load(ckpt.path)
    return ckpt, tokenizer


PACKED_Q8_0 = "q8_0"


def load(name_or_path: str | Path, *, dtype: str | torch.dtype | None = None,
         quant: str | None = None) -> LLM:
    """Load a registered name, a .gguf file, a Hugging Face directory or a Meta directory.

    dtype=None keeps a GGUF file's quantized weights packed, in their own blocks (the fastest
    path); dtype="float32" always selects the exact float32 path (GGUF weights dequantized).
    quant ("int8", "int4" or "fp8") quantizes the float weights after loading them (in float32
    unless dtype says otherwise; GGUF files are dequantized first); see llamaherd.quant.weight_only.
    quant="q8_0" instead packs them as Q8_0 blocks for the C++ kernels: a float checkpoint (a
    trained model's directory) then runs at a packed GGUF file's speed.
    Then runtime.prepare readies the model for inference.
    """
    from llamaherd.quant.weight_only import check_mode, quantize_model

    if quant is not None:
        if quant != PACKED_Q8_0:
            check_mode(quant)
        dtype = "float32" if dtype is None else dtype
    ckpt, tokenizer = open_checkpoint(name_or_path, dtype=dtype, packed=dtype is None)
    if quant == PACKED_Q8_0:  # float weights packed for the C++ kernels, as a Q8_0 GGUF would be
        from llamaherd.checkpoint.packed import packed_model

        ckpt.model = packed_model(ckpt.args, ckpt.model.state_dict())
    elif quant is not None:
        quantize_model(ckpt.model, quant)
    return LLM(ckpt, tokenizer, runtime.prepare(ckpt.model))
