"""A thin transformers-style front for code written against `AutoModelForCausalLM.generate`.

    import torch
    from llamaherd.hf_compat import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained("smollm2-135m-instruct")
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    output = model.generate(input_ids, max_length=50, num_return_sequences=5)
    print(tokenizer.batch_decode(output, skip_special_tokens=True))

    torch.manual_seed(0)  # five different samples, reproducibly
    output = model.generate(input_ids, max_length=50, num_return_sequences=5, do_sample=True)

`generate` returns prompt + new tokens for each row (num_return_sequences rows per prompt), every
row padded to the same length with the pad token (the EOS token when the vocabulary has none), as
transformers does. It runs on llamaherd's one generation engine; only the argument names differ.
Sampling follows transformers' defaults: do_sample=False is greedy (so the first example gives
five equal rows); with do_sample=True, top_k=50, temperature=1, top_p=1. Unseeded sampling draws its seed from torch's global generator, so
`torch.manual_seed` makes it reproducible.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llamaherd.chat import ChatFormat, chat_format
from llamaherd.generation.sampling import SamplingParams
from llamaherd.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llamaherd.api import LLM


class CausalLMOutput:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits  # (B, T, V)


class AutoModelForCausalLM:
    """`from_pretrained(name_or_path)` -> a model with `.generate` and `__call__(input_ids)`."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        tok = llm.tokenizer
        self.eos_token_id: int | None = tok.eos_id
        self.pad_token_id: int | None = tok.pad_id if tok.pad_id is not None else tok.eos_id

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: Any = None,
                        **_ignored: Any) -> AutoModelForCausalLM:
        from llamaherd.api import load

        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        return cls(load(name_or_path, dtype=dtype))

    def eval(self) -> AutoModelForCausalLM:
        return self

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, **_ignored: Any) -> CausalLMOutput:
        ids = torch.as_tensor(input_ids)
        ids = ids[None] if ids.dim() == 1 else ids
        return CausalLMOutput(torch.stack([self.llm.logits(row.tolist()) for row in ids]))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_length: int | None = None, max_new_tokens: int | None = None,
                 num_return_sequences: int = 1, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                 min_p: float | None = None, repetition_penalty: float = 1.0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 **_ignored: Any) -> torch.Tensor:
        """Prompt + generated ids, (B * num_return_sequences, L), padded with pad_token_id."""
        ids = torch.as_tensor(input_ids)
        ids = ids[None] if ids.dim() == 1 else ids
        prompts = _unpad(ids, attention_mask)
        if max_new_tokens is None:
            max_new_tokens = (max_length if max_length is not None else 20) - ids.shape[1]
        if max_new_tokens < 1:
            raise ValueError(f"input_ids has {ids.shape[1]} tokens, so max_length={max_length} "
                             f"leaves no room for new tokens; raise it or pass max_new_tokens")
        stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        params = SamplingParams(
            max_new_tokens=max_new_tokens, n=num_return_sequences,
            temperature=temperature if do_sample else 0.0, top_k=top_k if do_sample else 0,
            top_p=top_p if do_sample else 1.0, min_p=(min_p or 0.0) if do_sample else 0.0,
            repetition_penalty=repetition_penalty, stop_token_ids=stops,
            seed=int(torch.randint(0, 2**62, ())) if do_sample else None)
        rows = []
        for c in self.llm.generate(prompts, **vars(params)):
            new = c.token_ids + ([c.stop_reason] if isinstance(c.stop_reason, int) else [])
            rows.append(ids[c.prompt_index].tolist() + new)  # left padding kept, as transformers
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return out


def _unpad(ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    if attention_mask is None:
        return [row.tolist() for row in ids]
    return [row[mask.bool()].tolist() for row, mask in zip(ids, torch.as_tensor(attention_mask))]


class BatchEncoding(dict):
    """input_ids and attention_mask, readable as keys or attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class AutoTokenizer:
    """`from_pretrained(name_or_path)` -> a callable tokenizer with decode and chat templates."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bos_token_id: int | None = tokenizer.bos_id
        self.eos_token_id: int | None = tokenizer.eos_id
        self.pad_token_id: int | None = (tokenizer.pad_id if tokenizer.pad_id is not None
                                         else tokenizer.eos_id)
        self.padding_side = "left"

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **_ignored: Any) -> AutoTokenizer:
        from llamaherd import tokenizer as tok
        from llamaherd.hub import resolve_path

        return cls(tok.load(resolve_path(name_or_path)))

    def __len__(self) -> int:
        return self.tokenizer.vocab_size

    @cached_property
    def chat_format(self) -> ChatFormat:
        return chat_format(self.tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if add_special_tokens:
            return self.tokenizer.encode_prompt(text)
        return self.tokenizer.encode(text)

    def __call__(self, text: str | list[str], return_tensors: str | None = None,
                 add_special_tokens: bool = True, padding: bool | str = False,
                 **_ignored: Any) -> BatchEncoding:
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, add_special_tokens) for t in texts]
        if return_tensors is None:
            masks = [[1] * len(i) for i in ids]
            one = isinstance(text, str)
            return BatchEncoding(input_ids=ids[0] if one else ids,
                                 attention_mask=masks[0] if one else masks)
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        width = max(len(i) for i in ids)
        if not padding and any(len(i) != width for i in ids):
            raise ValueError("texts of different lengths need padding=True")
        out = torch.full((len(ids), width), self.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, i in enumerate(ids):  # left padding, as generation wants
            out[r, width - len(i):] = torch.tensor(i, dtype=torch.long)
            mask[r, width - len(i):] = 1
        return BatchEncoding(input_ids=out, attention_mask=mask)

    def decode(self, ids: Any, skip_special_tokens: bool = False, **_ignored: Any) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.tokenizer.decode(ids, skip_special=skip_special_tokens)

    def batch_decode(self, rows: Any, skip_special_tokens: bool = False,
                     **_ignored: Any) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def apply_chat_template(self, messages: list[Any], tools: list[Any] | None = None,
                            tokenize: bool = True, add_generation_prompt: bool = False,
                            return_tensors: str | None = None, **_ignored: Any) -> Any:
        fmt = self.chat_format
        if not tokenize:
            return fmt.render(messages, tools, add_generation_prompt)
        ids = fmt.encode_dialog(messages, tools, add_generation_prompt)
        return torch.tensor([ids]) if return_tensors == "pt" else ids
