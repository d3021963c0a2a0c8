"""What the sub-commands share: one-line errors for the mistakes a user can make, and the
sampling flags of `run` and `generate`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click


class UserError(Exception):
    """An error whose message is meant for the user as it is."""


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into one line on stderr and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from llamaherd.checkpoint.errors import CheckpointError
        from llamaherd.hub import HubError
        from llamaherd.tokenizer import TokenizerError

        expected = (UserError, CheckpointError, HubError, TokenizerError, FileNotFoundError,
                    ValueError, OSError)
        try:
            return fn(*args, **kwargs)
        except expected as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper


def sampling_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The sampling flags shared by `run` and `generate`."""
    options = [
        click.option("--max-new-tokens", type=int, default=512, show_default=True),
        click.option("--temperature", type=float, default=0.6, show_default=True,
                     help="0 for greedy decoding."),
        click.option("--top-k", type=int, default=0, help="Keep the k most likely tokens (0: off)."),
        click.option("--top-p", type=float, default=0.9, show_default=True),
        click.option("--min-p", type=float, default=0.05, show_default=True),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True),
        click.option("--presence-penalty", type=float, default=0.0, show_default=True),
        click.option("--frequency-penalty", type=float, default=0.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Make sampling reproducible."),
        click.option("--stop", multiple=True, help="Stop string (repeatable); never printed."),
        click.option("--truncate", is_flag=True,
                     help="Drop the oldest prompt tokens when the prompt overflows the window."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
                     default=None, help="Dequantize weights to this type (default: fastest)."),
        click.option("--quant", type=click.Choice(["int8", "int4", "fp8", "q8_0"]), default=None,
                     help="Quantize float weights at load time: weight-only int8 / int4 / fp8, "
                          "or q8_0 packed for the C++ kernels (fast)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def to_sampling(opts: dict[str, Any]) -> dict[str, Any]:
    """CLI flag values -> SamplingParams keyword arguments."""
    return {"max_new_tokens": opts["max_new_tokens"], "temperature": opts["temperature"],
            "top_k": opts["top_k"], "top_p": opts["top_p"], "min_p": opts["min_p"],
            "repetition_penalty": opts["repeat_penalty"],
            "presence_penalty": opts["presence_penalty"],
            "frequency_penalty": opts["frequency_penalty"], "seed": opts["seed"],
            "stop": list(opts["stop"]), "truncate_prompt": opts["truncate"]}
