"""`llamaherd guard`: Llama Guard's verdict on a text, on an answer to it, or on every line of a
JSONL file (batched through the engine); Prompt Guard's with --prompt-guard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from llamaherd.cli.common import UserError, friendly

DEFAULT_GUARD = "llamaherd-guard"


@click.command()
@click.argument("text", required=False)
@click.option("--model", "-m", default=DEFAULT_GUARD, show_default=True,
              help="The Llama Guard model: a registered name or a path.")
@click.option("--response", default=None,
              help="Judge this assistant answer to TEXT (Llama Guard's Agent role).")
@click.option("--file", "file_", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='A JSONL file, one {"text": ...} or {"messages": [...]} a line: one JSON '
                   "verdict a line out.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the --file verdicts here (default: stdout).")
@click.option("--prompt-guard", metavar="CLASSIFIER", default=None,
              help="Run this Prompt Guard classifier instead: label, jailbreak and injection "
                   "scores of each text (of a conversation: its last message).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Dequantize the guard's weights to this type (default: fastest).")
@friendly
def guard(text: str | None, model: str, response: str | None, file_: Path | None,
          output: Path | None, prompt_guard: str | None, dtype: str | None) -> None:
    """Is TEXT safe? Llama Guard's answer (safe or unsafe), its categories and P(unsafe)."""
    if (text is None) == (file_ is None):
        raise click.UsageError("give a TEXT to judge or --file, one of them")
    if response is not None and text is None:
        raise click.UsageError("--response judges an answer to TEXT; give the TEXT too")
    if response is not None and prompt_guard is not None:
        raise click.UsageError("--response needs Llama Guard; Prompt Guard judges one text")
    if output is not None and file_ is None:
        raise click.UsageError("--output writes the verdicts of --file")
    _judge(text, model, response, file_, output, prompt_guard, dtype)


def _judge(text: str | None, model: str, response: str | None, file_: Path | None,
           output: Path | None, prompt_guard: str | None, dtype: str | None) -> None:
    if file_ is not None:
        rows = read_rows(file_)
        verdicts = _verdicts(rows, model, prompt_guard, dtype)
        text = "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in verdicts)
        if output is None:
            click.echo(text, nl=False)
        else:
            output.write_text(text, encoding="utf-8")
        return
    conversation: Any = text
    if response is not None:
        conversation = [{"role": "user", "content": text},
                        {"role": "assistant", "content": response}]
    (verdict,) = _verdicts([conversation], model, prompt_guard, dtype)
    if prompt_guard is not None:
        flag = " (flagged)" if verdict["flagged"] else ""
        click.echo(f"label: {verdict['label']}{flag}\n"
                   f"jailbreak score: {verdict['jailbreak_score']:.4f}\n"
                   f"injection score: {verdict['injection_score']:.4f}")
        return
    from llamaherd.safety.categories import CATEGORIES

    names = ", ".join(f"{c} ({CATEGORIES[c].name})" for c in verdict["categories"]) or "none"
    click.echo(f"{'safe' if verdict['safe'] else 'unsafe'}\ncategories: {names}\n"
               f"score: {verdict['score']:.4f}")


def _verdicts(conversations: list[Any], model: str, prompt_guard: str | None,
              dtype: str | None) -> list[dict[str, Any]]:
    """Each conversation's verdict as a dict, all judged in one batch."""
    if prompt_guard is not None:
        from llamaherd.safety.prompt_guard import load_prompt_guard

        classifier = load_prompt_guard(prompt_guard)
        texts = [c if isinstance(c, str) else str(c[-1].get("content") or "")
                 for c in conversations]
        return [v.to_dict() for v in classifier.check_many(texts)]
    from llamaherd.api import load
    from llamaherd.safety import LlamaGuard

    llama_guard = LlamaGuard(load(model, dtype=dtype))
    return [v.to_dict() for v in llama_guard.check_many(conversations)]


def read_rows(path: Path) -> list[Any]:
    """The conversations of a JSONL file (a text is one user message), each line checked; a bad
    one is a UserError naming it. Blank lines are skipped."""
    from llamaherd.safety.llama_guard import as_conversation

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    rows: list[Any] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            rows.append(row["text"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            try:
                as_conversation(row["messages"])
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise UserError(f"{where}: bad messages: {e}") from None
            rows.append(row["messages"])
        else:
            raise UserError(f'{where}: expected {{"text": "..."}} or {{"messages": [...]}}')
    if not rows:
        raise UserError(f"{path}: no lines to judge")
    return rows

