"""Sampling settings and the pure functions that turn one row of logits into the next token."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, for one request.

    temperature 0 means greedy. Filters apply in the order temperature, top-k, top-p, min-p;
    penalties apply to the raw logits before all of them (repetition penalty over the prompt and the
    output, presence and frequency penalties over the output only, as OpenAI defines them).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the sequence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, never emitted
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's stop ids
    ignore_eos: bool = False  # keep going past the tokenizer's stop ids
    min_tokens: int = 0  # no stop token (the tokenizer's or stop_token_ids) before this many
    # token id -> a bias added to its logit before sampling (OpenAI's logit_bias): -100 bans it,
    # 100 all but forces it
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus k alternatives
    n: int = 1  # completions per prompt
    truncate_prompt: bool = False  # drop the oldest prompt tokens instead of failing on overflow
    # f(output_ids, logits (V,)) -> logits, applied after the penalties (grammar constraints);
    # a stateful processor belongs to one sequence, so give each sequence its own params (n=1)
    logits_processors: list[Callable[[list[int], torch.Tensor], torch.Tensor]] = field(
        default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = dict(self.logit_bias)
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"),
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0, got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0,
             f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}"),
            (all(isinstance(s, str) and s for s in self.stop),
             "stop strings must be non-empty strings"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_new_tokens,
             f"min_tokens must be an integer in [0, max_new_tokens], got {self.min_tokens!r}"),
            (all(isinstance(t, int) and t >= 0 and -100 <= b <= 100
                 for t, b in self.logit_bias.items()),
             "logit_bias maps token ids >= 0 to biases in [-100, 100]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
                    repetition: float = 1.0, presence: float = 0.0,
                    frequency: float = 0.0) -> torch.Tensor:
    """Penalized copy of `logits` (V,).

    seen: (V,) bool, tokens anywhere in the sequence so far (prompt included): a positive logit is
    divided by `repetition`, a negative one multiplied by it (the CTRL paper's rule).
    counts: (V,) how often each token was generated: `logit -= presence * (count > 0) +
    frequency * count`.
    """
    out = logits.clone()
    if repetition != 1.0 and seen is not None:
        penalized = torch.where(out > 0, out / repetition, out * repetition)
        out = torch.where(seen, penalized, out)
    if counts is not None and (presence or frequency):
        out -= presence * (counts > 0).to(out.dtype) + frequency * counts.to(out.dtype)
    return out


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value kept too); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly ahead of each token
    drop_sorted = before >= p  # the first token is always kept since its `before` is 0
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, -math.inf)


def argmax(logits: torch.Tensor) -> list[int]:
    """The index of the largest logit of each row (the first of equals, as torch.argmax), for
    logits (..., V). On the CPU through numpy, whose argmax over long rows is several times
    faster than torch's (a visible share of a batched decode step otherwise)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return logits.detach().numpy().argmax(-1).reshape(-1).tolist()
    return logits.argmax(-1).reshape(-1).tolist()


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled and filtered logits (V,); the distribution that `sample` draws from."""
    return _filtered(logits[None], [params])[0]


def _filtered(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """filtered_logits for rows (B, V) whose params share top_k, top_p and min_p."""
    temperature = torch.tensor([[p.temperature] for p in params], dtype=logits.dtype)
    logits = logits / temperature
    logits = top_k_filter(logits, params[0].top_k)
    logits = top_p_filter(logits, params[0].top_p)
    return min_p_filter(logits, params[0].min_p)


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> int:
    """The next token id from one row of (already penalized) logits (V,)."""
    return sample_rows(logits[None], [params], [generator])[0]


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """`sample` for each row of logits (B, V) with its own params and generator, in one pass:
    the same tokens as row by row (sample is this function on one row). Rows that sample rather
    than take the argmax must share top_k, top_p and min_p (temperatures may differ)."""
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    greedy = [i for i, p in enumerate(params) if p.greedy]
    tokens = [0] * len(params)
    if greedy:
        for i, token in zip(greedy, argmax(logits if not drawn else logits[greedy])):
            tokens[i] = token
    if not drawn:
        return tokens
    first = params[drawn[0]]
    if any((params[i].top_k, params[i].top_p, params[i].min_p) != (first.top_k, first.top_p,
                                                                  first.min_p) for i in drawn):
        raise ValueError("sample_rows: sampled rows must share top_k, top_p and min_p")
    rows = logits if not greedy else logits[drawn]
    temperatures = torch.tensor([params[i].temperature for i in drawn], dtype=torch.float32)
    if first.top_k or first.top_p < 1 or first.min_p:
        rows, temperatures = _filtered(rows, [params[i] for i in drawn]), torch.ones(len(drawn))
    # Inverse-CDF draw: one uniform number per row. (torch.multinomial draws an exponential per
    # vocabulary entry, which costs more than a decode step can spare.)
    u = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64) for i in drawn])
    for i, token in zip(drawn, _draw(rows.float(), temperatures, u)):
        if token < 0:
            raise ValueError("sample_rows: every token of a row has probability 0")
        tokens[i] = token
    return tokens


def _draw(logits: torch.Tensor, temperatures: torch.Tensor, u: torch.Tensor) -> list[int]:
    """For each row of logits (B, V), the first token whose running sum of softmax(logits / t)
    passes u (a uniform number in [0, 1)), so a token of probability 0 is never drawn; -1 where
    every logit is -inf. The C++ kernel does it in one pass without temporaries (torch's
    softmax, cumsum and search tensors are each a vocabulary-sized allocation); torch is the
    fallback."""
    from llamaherd import kernels

    ext = kernels.load() if logits.device.type == "cpu" else None
    if ext is not None:
        return ext.draw(logits, temperatures, u).tolist()
    return draw_torch(logits, temperatures, u).tolist()


def draw_torch(logits: torch.Tensor, temperatures: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """_draw in torch (float64 sums): the fallback, and the reference the kernel is tested on."""
    allowed = (logits > -math.inf).any(-1)
    t, u = temperatures.to(logits.device, torch.float64), u.to(logits.device, torch.float64)
    probs = (logits.double() / t[:, None]).softmax(-1)
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    last = cdf.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)  # the last possible token
    picked = torch.minimum(picked, last)  # u * total rounded up to the total
    return torch.where(allowed, picked, -1)


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the `top` most likely alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprob(logits: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """Log-probability of `token_id` under the model's raw distribution, plus the top-k tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(logp, k)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id, float(logp[token_id]), top)
