"""Preference rows: both answers after one shared prompt with the answer's tokens trained, the
formatting tokens DPO leaves out, margins from strength labels, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaherd.chat import chat_format
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.data import DataError
from llamaherd.train.preference import encode_pair, load_pairs, margin_of
from llamaherd.train.recipes.dpo import formatting_ids

ROW = {"prompt": [{"role": "user", "content": "2+2?"}],
       "chosen": [{"role": "assistant", "content": "4"}],
       "rejected": [{"role": "assistant", "content": "5, I think"}]}


def trained(tok: Tokenizer, ex) -> str:
    return tok.decode([t for t, keep in zip(ex.tokens, ex.labels, strict=True) if keep])


def test_both_sides_share_the_prompt_and_train_only_the_answer(smollm: Tokenizer) -> None:
    fmt = chat_format(smollm)
    pair = encode_pair(ROW, fmt, smollm)
    assert trained(smollm, pair.chosen) == "4<|im_end|>"
    assert trained(smollm, pair.rejected) == "5, I think<|im_end|>"
    shared = pair.chosen.labels.index(True)
    assert pair.chosen.tokens[:shared] == pair.rejected.tokens[:shared]
    assert smollm.decode(pair.chosen.tokens[:shared]).endswith("<|im_start|>assistant\n")
    # DPO leaves the end-of-turn token out of both log-probabilities
    skip = formatting_ids(fmt, smollm)
    scored = [t for t, keep in zip(pair.chosen.tokens, pair.chosen.labels, strict=True)
              if keep and t not in skip]
    assert smollm.decode(scored) == "4"


def test_plain_strings_are_plain_text(smollm: Tokenizer) -> None:
    pair = encode_pair({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
                       chat_format(smollm), smollm)
    assert trained(smollm, pair.chosen) == " 4" + smollm.decode([smollm.eos_id])
    assert "<|im_start|>" not in smollm.decode(pair.chosen.tokens)


@pytest.mark.parametrize(("row", "scale", "margin"), [
    ({}, "large", 0.0), ({"margin": 1.5}, "small", 1.5),
    ({"strength": 3}, "large", 3.0), ({"strength": "better"}, "large", 2.0),
    ({"strength": "significantly better"}, "small", 1.0), ({"strength": 1}, "small", 1 / 3),
    ({"strength": "negligibly better"}, "large", 0.0)])
def test_margins_from_strength_labels(row: dict, scale: str, margin: float) -> None:
    assert margin_of(row, scale) == pytest.approx(margin)


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "x", "chosen": "y"}, "missing rejected"),
    ({**ROW, "chosen": [{"role": "user", "content": "4"}]}, "chosen must hold assistant"),
    ({**ROW, "chosen": "4"}, "chosen must both be strings or both be lists"),
    ({**ROW, "strength": 7}, "strength must be 0-3"),
    ({**ROW, "margin": "big"}, "margin must be a number"),
])
def test_bad_rows_name_the_file_and_line(smollm: Tokenizer, tmp_path: Path, row: dict,
                                         message: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"pairs.jsonl:2: .*{message}"):
        load_pairs(path, chat_format(smollm), smollm, max_len=64)


def test_overlong_pairs_are_truncated_or_dropped(smollm: Tokenizer, tmp_path: Path) -> None:
    long = {**ROW, "rejected": [{"role": "assistant", "content": "no " * 80}]}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(long) + "\n")
    fmt = chat_format(smollm)
    pairs, stats = load_pairs(path, fmt, smollm, max_len=40)
    assert len(pairs) == 2 and stats.truncated == 1 and len(pairs[1].rejected) == 40
    pairs, stats = load_pairs(path, fmt, smollm, max_len=40, overlong="drop")
    assert len(pairs) == 1 and stats.dropped == 1
