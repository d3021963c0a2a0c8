"""Training data: JSONL rows in the common shapes, tokenized with loss masks.

Row shapes (one JSON object a line):
- `{"messages": [...], "tools": [...]?}`: a conversation in the model's own chat format; the loss
  covers every assistant turn (its text and its end-of-turn token), never the headers around it
  nor any other turn.
- `{"prompt": ..., "completion": ...}`: strings (plain text: BOS, prompt, completion, EOS; loss
  on the completion and EOS) or message lists (a conversation: loss on the completion's turns).
- `{"text": ...}`: continued pre-training: BOS, text, EOS, loss on every token but BOS.

Every error names the file and line. Examples longer than the row length are truncated (their
trained tokens past the limit are lost) or dropped, and counted.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaherd.chat import ChatFormat, ChatFormatError, Message
from llamaherd.chat.messages import as_messages, as_tools
from llamaherd.tokenizer import Tokenizer, TokenizerError

OVERLONG = ("truncate", "drop")


class DataError(ValueError):
    """A training file that cannot be read: the message names the file and line."""


@dataclass
class Example:
    """One tokenized example: `labels[i]` says whether token i is trained (predicted from the
    tokens before it)."""

    tokens: list[int]
    labels: list[bool]
    where: str  # "file:line"

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def trained(self) -> int:
        """Tokens that carry a loss (the first token has nothing before it to predict it)."""
        return sum(self.labels[1:])


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.rows} rows, {self.tokens} tokens ({self.trained_tokens} trained)")
        if self.truncated or self.dropped:
            text += f"; {self.truncated} truncated, {self.dropped} dropped as too long"
        return text


def read_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", row) for every non-blank line of a JSONL file."""
    path = Path(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    for n, raw in enumerate(lines, 1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: invalid UTF-8 at byte {e.start}") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        yield where, row


def encode_row(row: dict[str, Any], fmt: ChatFormat, tokenizer: Tokenizer,
               where: str = "") -> Example:
    """Tokens and loss mask of one row (see the module docstring for the shapes)."""
    try:
        if "messages" in row:
            tokens, labels = encode_chat(fmt, row["messages"], row.get("tools"))
        elif "prompt" in row and "completion" in row:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str) and isinstance(completion, str):
                tokens, labels = _encode_plain(tokenizer, prompt, completion)
            elif isinstance(prompt, list) and isinstance(completion, list):
                tokens, labels = encode_chat(fmt, prompt + completion, row.get("tools"),
                                             trained_from=len(prompt))
            else:
                raise DataError("prompt and completion must both be strings or both be "
                                "lists of messages")
        elif "text" in row:
            if not isinstance(row["text"], str) or not row["text"]:
                raise DataError("text must be a non-empty string")
            tokens, labels = _encode_plain(tokenizer, "", row["text"])
        else:
            raise DataError(f"expected a messages, prompt/completion or text field; got "
                            f"{', '.join(sorted(row)) or 'an empty object'}")
    except (ChatFormatError, TokenizerError, DataError) as e:
        raise DataError(f"{where}: {e}" if where else str(e)) from None
    return Example(tokens, labels, where)


def encode_chat(fmt: ChatFormat, messages: Sequence[Any], tools: Any = None,
                trained_from: int = 0) -> tuple[list[int], list[bool]]:
    """The conversation's ids, and a mask over each assistant turn from message `trained_from`
    on: the turn's tokens after its header up to and including its end-of-turn token."""
    msgs: list[Message] = as_messages(messages)
    offered = as_tools(tools)
    ids = fmt.encode_dialog(msgs, offered, add_generation_prompt=False)
    labels = [False] * len(ids)
    turns = [i for i, m in enumerate(msgs) if m.role == "assistant" and i >= trained_from]
    if not turns:
        raise DataError("no assistant turn to train on")
    for i in turns:
        if i == 0:
            raise DataError("the conversation starts with an assistant turn")
        start = len(fmt.encode_dialog(msgs[:i], offered, add_generation_prompt=True))
        end = len(fmt.encode_dialog(msgs[:i + 1], offered, add_generation_prompt=False))
        if end > len(ids) or start >= end:
            raise DataError("the chat template does not render the earlier turns of a "
                            "conversation the same way, so its assistant turns cannot be found")
        stop = next((j for j in range(start, end) if ids[j] in fmt.stop_ids), end - 1)
        for j in range(start, stop + 1):
            labels[j] = True
    return ids, labels


def _encode_plain(tokenizer: Tokenizer, prompt: str, completion: str
                  ) -> tuple[list[int], list[bool]]:
    if tokenizer.eos_id is None:
        raise DataError("the vocabulary has no end-of-sequence token")
    head = tokenizer.encode_prompt(prompt) if prompt else (
        [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else [])
    body = tokenizer.encode(completion) + [tokenizer.eos_id]
    return head + body, [False] * len(head) + [True] * len(body)


def load_examples(path: str | Path, fmt: ChatFormat, tokenizer: Tokenizer, max_len: int,
                  overlong: str = "truncate") -> tuple[list[Example], DataStats]:
    """Every row of a JSONL file, tokenized; examples over `max_len` tokens truncated or dropped
    (`overlong`), as are examples left with no trained token."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    stats, examples = DataStats(), []
    for where, row in read_rows(path):
        stats.rows += 1
        ex = encode_row(row, fmt, tokenizer, where)
        if len(ex) > max_len:
            if overlong == "drop":
                stats.dropped += 1
                continue
            ex = Example(ex.tokens[:max_len], ex.labels[:max_len], ex.where)
            stats.truncated += 1
            if not any(ex.labels[1:]):
                stats.dropped += 1
                continue
        stats.tokens += len(ex)
        stats.trained_tokens += ex.trained
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no example to train on ({stats.summary()})")
    return examples, stats


def split(examples: list[Example], fraction: float, seed: int
          ) -> tuple[list[Example], list[Example]]:
    """(train, validation): a `fraction` of the examples, picked at random with `seed`, held out
    (at least one when fraction > 0 and there are two or more)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
    n = round(len(examples) * fraction)
    if fraction > 0 and len(examples) > 1:
        n = max(n, 1)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])
