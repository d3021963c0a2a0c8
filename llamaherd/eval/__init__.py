"""Evaluation of loaded models: perplexity, multiple choice by log-likelihood, the task files.

    llamaherd eval mc --task arc-easy --dtype float32      # or llamaherd.eval.multiple_choice
    llamaherd eval ppl --data book.txt --window 1024

Each evaluation is one module (perplexity.py, multiple_choice.py; needle-in-a-haystack goes in
niah.py) and one `llamaherd eval` sub-command (llamaherd/cli/eval.py).
"""

from llamaherd.eval.loglikelihood import LogLikelihood, encode_pair, loglikelihoods
from llamaherd.eval.multiple_choice import Item, MCResult, mean_stderr, multiple_choice
from llamaherd.eval.perplexity import (
    Perplexity,
    corpus_perplexity,
    eval_text,
    perplexity,
    perplexity_of_ids,
    token_nlls,
)
from llamaherd.eval.tasks import TASKS, Task, load_items

__all__ = ["TASKS", "Item", "LogLikelihood", "MCResult", "Perplexity", "Task",
           "corpus_perplexity", "encode_pair", "eval_text", "load_items", "loglikelihoods",
           "mean_stderr", "multiple_choice", "perplexity", "perplexity_of_ids", "token_nlls"]
