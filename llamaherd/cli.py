"""The `llamaherd` command: one table from sub-command to the function that does the work."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from llamaherd.hub import DEFAULT_MODEL


class UserError(Exception):
    """An error whose message is meant for the user as it is."""


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into one line on stderr and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from llamaherd.checkpoint.errors import CheckpointError
        from llamaherd.hub import HubError

        expected: tuple[type[BaseException], ...] = (
            UserError, CheckpointError, HubError, FileNotFoundError, ValueError, OSError)
        try:
            from llamaherd.tokenizer import TokenizerError

            expected += (TokenizerError,)
        except ImportError:
            pass
        try:
            return fn(*args, **kwargs)
        except expected as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llamaherd")
def main() -> None:
    """llamaherd: run, serve and convert Llama-architecture models."""


@main.command()
@click.argument("name")
@_friendly
def pull(name: str) -> None:
    """Fetch a registered model into the local cache."""
    from llamaherd import hub

    if name not in hub.REGISTRY:
        raise hub.HubError(f"unknown model name {name!r}; known names: "
                           f"{', '.join(sorted(hub.REGISTRY))}")
    click.echo(str(hub.pull(name)))


@main.command(name="list")
def list_models() -> None:
    """List the registered model names and whether each is cached."""
    from llamaherd import hub

    for name, art in sorted(hub.REGISTRY.items()):
        mark = "cached" if hub.is_cached(name) else "      "
        click.echo(f"{name:28s} {mark}  {art.description}")


@main.command()
@click.argument("model", default=DEFAULT_MODEL)
@_friendly
def info(model: str) -> None:
    """Architecture, parameter count, tensor types, context length and chat template of MODEL."""
    from llamaherd.checkpoint.info import describe

    click.echo(describe(model))


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--to", "fmt", type=click.Choice(["hf", "gguf", "meta"]), required=True)
@click.option("--type", "qtype", default="F32", show_default=True,
              help="GGUF tensor type for weight matrices: F32, F16, BF16, Q8_0, Q4_1 or Q4_0.")
@_friendly
def convert(src: str, dst: str, fmt: str, qtype: str) -> None:
    """Convert a checkpoint between GGUF, Hugging Face and Meta layouts."""
    from llamaherd.checkpoint.convert import convert as do_convert

    click.echo(str(do_convert(src, dst, fmt, gguf_type=qtype)))


@main.command()
@click.argument("model")
@click.argument("text")
@click.option("--bos", is_flag=True, help="Prepend the beginning-of-sequence token.")
@_friendly
def tokenize(model: str, text: str, bos: bool) -> None:
    """Print TEXT's token ids under MODEL's (or a tokenizer file's) vocabulary as JSON."""
    from llamaherd import tokenizer as tok
    from llamaherd.api import resolve_path

    click.echo(json.dumps(tok.load(resolve_path(model)).encode(text, bos=bos)))


def _register_optional(module: str) -> None:
    """Sub-commands that live beside their feature (generation, serving, benchmarks)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # a real missing dependency inside the module: say so
            raise
        return
    for cmd in getattr(mod, "COMMANDS", []):
        main.add_command(cmd)


for _m in ("llamaherd.generation.cli", "llamaherd.serve.cli", "llamaherd.bench_cli"):
    _register_optional(_m)


if __name__ == "__main__":
    main()
