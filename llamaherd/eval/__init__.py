"""Evaluation of loaded models: perplexity on a fixed text."""

from llamaherd.eval.perplexity import eval_text, perplexity, perplexity_of_ids, token_nlls

__all__ = ["eval_text", "perplexity", "perplexity_of_ids", "token_nlls"]
