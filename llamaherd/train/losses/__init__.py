"""Training losses as small functions: each takes the model and a batch (or the per-sequence
values made from one) and returns sums or per-example values for the trainer to normalize."""

from llamaherd.train.losses.cross_entropy import linear_cross_entropy, linear_log_probs
from llamaherd.train.losses.dpo import dpo_loss, sequence_log_probs
from llamaherd.train.losses.reward import last_token_scores, ranking_loss
from llamaherd.train.losses.sft import sft_loss

__all__ = ["dpo_loss", "last_token_scores", "linear_cross_entropy", "linear_log_probs",
           "ranking_loss", "sequence_log_probs", "sft_loss"]
