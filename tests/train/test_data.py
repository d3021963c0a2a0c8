"""Training data: loss masks against hand-written expectations in two chat formats, the other row
shapes, over-long examples, and one-line errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaherd.chat import chat_format
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.data import DataError, encode_row, load_examples, read_rows, split


def trained_text(tok: Tokenizer, row: dict) -> tuple[str, str]:
    """(the text of the trained tokens, the text of all tokens) of one encoded row."""
    ex = encode_row(row, chat_format(tok), tok)
    assert len(ex.tokens) == len(ex.labels)
    return (tok.decode([t for t, keep in zip(ex.tokens, ex.labels) if keep]),
            tok.decode(ex.tokens))


CHAT = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."}]}


def test_chatml_trains_each_assistant_turn_and_its_end_of_turn_only(smollm: Tokenizer) -> None:
    trained, whole = trained_text(smollm, CHAT)
    assert trained == "Paris.<|im_end|>Rome.<|im_end|>"  # no header, no "\n" after <|im_end|>
    assert whole == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nCapital "
                     "of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>"
                     "user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\nRome.<|im_end|>\n")


def test_llama31_trains_each_assistant_turn_and_eot(llama31: Tokenizer) -> None:
    trained, whole = trained_text(llama31, CHAT)
    assert trained == "Paris.<|eot_id|>Rome.<|eot_id|>"
    assert whole.count("<|start_header_id|>assistant<|end_header_id|>") == 2
    # a tool call and its result: the call is trained, the tool's answer is not
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    row = {"tools": tools, "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
            "name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}
    trained, whole = trained_text(llama31, row)
    assert trained == '{"name": "weather", "parameters": {"city": "Oslo"}}<|eot_id|>Sunny.<|eot_id|>'
    assert "sunny" in whole and "Given the following functions" in whole


def test_prompt_completion_and_text_rows(smollm: Tokenizer, llama31: Tokenizer) -> None:
    row = {"prompt": [{"role": "user", "content": "Hi"}],
           "completion": [{"role": "assistant", "content": "Hello!"}]}
    assert trained_text(smollm, row)[0] == "Hello!<|im_end|>"
    # plain strings: BOS (where the model takes one), prompt, completion, EOS; loss on the last two
    ex = encode_row({"prompt": "The sky is", "completion": " blue."}, chat_format(llama31),
                    llama31)
    assert ex.tokens[0] == llama31.bos_id and ex.tokens[-1] == llama31.eos_id
    assert llama31.decode([t for t, k in zip(ex.tokens, ex.labels) if k]) == \
        " blue.<|end_of_text|>"
    ex = encode_row({"text": "Once upon a time."}, chat_format(llama31), llama31)
    assert ex.labels == [False] + [True] * (len(ex.tokens) - 1)
    assert ex.trained == len(ex.tokens) - 1


def write(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n"
                              for x in lines))
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]})


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [', "malformed JSON"),
    ('[1, 2]', "each line must be a JSON object"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "unknown role 'wizard'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"question": "x"}', "expected a messages, prompt/completion or text field"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8 at byte 13"),
])
def test_bad_rows_are_one_line_errors_naming_file_and_line(smollm: Tokenizer, tmp_path: Path,
                                                           bad: str | bytes, message: str) -> None:
    path = write(tmp_path / "data.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(DataError, match=message) as err:
        load_examples(path, chat_format(smollm), smollm, max_len=256)
    assert str(err.value).startswith(f"{path}:3: ") and "\n" not in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.jsonl: cannot read"):
        list(read_rows(tmp_path / "nowhere.jsonl"))


def test_overlong_examples_are_truncated_or_dropped_and_counted(smollm: Tokenizer,
                                                                tmp_path: Path) -> None:
    long = json.dumps({"messages": [{"role": "user", "content": "word " * 200},
                                    {"role": "assistant", "content": "ok " * 50}]})
    prompt_only = json.dumps({"messages": [{"role": "user", "content": "word " * 400},
                                           {"role": "assistant", "content": "ok"}]})
    path = write(tmp_path / "d.jsonl", [GOOD, long, prompt_only])
    fmt = chat_format(smollm)
    kept, stats = load_examples(path, fmt, smollm, max_len=256, overlong="truncate")
    assert len(kept) == 2 and stats.truncated == 2 and stats.dropped == 1  # no label left
    assert all(len(e) <= 256 for e in kept) and kept[1].trained > 0
    kept, stats = load_examples(path, fmt, smollm, max_len=256, overlong="drop")
    assert len(kept) == 1 and stats.dropped == 2 and stats.truncated == 0


def test_validation_split_is_seeded_and_disjoint(smollm: Tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [json.dumps({"text": f"line {i}"}) for i in range(40)])
    examples, _ = load_examples(path, chat_format(smollm), smollm, max_len=64)
    train, val = split(examples, 0.1, seed=3)
    assert len(val) == 4 and len(train) == 36
    assert {e.where for e in train}.isdisjoint(e.where for e in val)
    assert [e.where for e in split(examples, 0.1, seed=3)[1]] == [e.where for e in val]
