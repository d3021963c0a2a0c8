"""The step-wise generation engine: R cache rows, sequences added and removed at any step.

Every entry point (Python API, CLI, transformers-style wrapper, HTTP server) drives this one
engine. A step prefills the sequences added since the last step (one right-padded forward) and
decodes one token for every running sequence (one forward over all rows, each at its own
position), so requests can join and leave between steps (continuous batching).

Prefix caching: the engine remembers which tokens each row's cache holds, also after its sequence
has finished. A new prompt takes the free row sharing the longest prefix with it (or gets a longer
prefix copied from a running sequence's row) and only the rest of the prompt is prefilled.
"""

from __future__ import annotations

from typing import Any

import torch

from llamaherd.generation.sampling import SamplingParams, sample_rows
from llamaherd.generation.scoring import PromptLogprobs, prompt_logprobs
from llamaherd.generation.sequence import Event, Sequence
from llamaherd.runtime import FUSED_PREFILL_LEN, Runner
from llamaherd.tokenizer import Tokenizer

# A prefix is copied from a running sequence's row only if that saves at least this many prefill
# tokens: the copy costs about as much as a few more tokens in the batched prefill. (A free row's own prefix is reused at any length: it is already there.)
MIN_COPY_TOKENS = 16


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# Prompts are prefilled this many positions per forward: long prompts then need attention scores
# of chunk x context instead of context x context (2.4 GB at 8k tokens and 9 heads), and the
# layers' activations stay small; it is no slower than larger chunks (docs/performance.md).
PREFILL_CHUNK = 256


class ContextWindowError(ValueError):
    """A prompt does not fit the context window."""


class Engine:
    """Owns the model's KV cache: `rows` independent slots of `max_len` positions each.

    runner: the model as llamaherd.runtime prepared it (runtime.prepare, or Runner(model) for a
    plain float model). prefix_cache: reuse the keys and values of a prompt prefix already in
    the cache (see above).
    """

    def __init__(self, runner: Runner, tokenizer: Tokenizer, rows: int = 1,
                 max_len: int | None = None, prefix_cache: bool = True,
                 prefill_chunk: int = PREFILL_CHUNK) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.runner = runner
        self.model = runner.model
        self.prefill_chunk = prefill_chunk
        self.tokenizer = tokenizer
        self.rows = rows
        window = self.model.args.max_seq_len
        self.max_len = min(max_len or window, window)
        self.device = runner.device
        self.prefix_cache = prefix_cache
        self._free = list(range(rows))  # least recently freed first
        self._waiting: list[list[Sequence]] = []  # groups sharing one prompt, not prefilled yet
        self._running: list[Sequence] = []
        self._holders: dict[int, Sequence] = {}  # sequence id -> sequence, for each held row
        # the tokens whose keys/values a free row holds at positions 0, 1, ...; a held row's are
        # its holder's all_ids[:pos], and the list is rewritten when the row is freed again
        self._row_ids: list[list[int]] = [[] for _ in range(rows)]
        # the last step's logit biases (see _bias) and their index and value tensors
        self._bias_tensors: tuple[tuple, Any] = ((), None)
        self._cache = None
        self._setup_cache()

    def _setup_cache(self) -> None:
        self.runner.setup_cache(self.rows, self.max_len)
        self._cache = self.runner.cache
        self._row_ids = [[] for _ in range(self.rows)]

    def _check_cache(self) -> None:
        """Re-create the cache if someone else replaced it (only possible while idle)."""
        if self.runner.cache is not self._cache:
            if not self.idle:
                raise RuntimeError("the model's KV cache was replaced while sequences were running")
            self._setup_cache()

    # ----- adding and removing sequences -----

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def fit_prompt(self, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], int]:
        """The prompt, truncated if asked and needed, and how many tokens were dropped."""
        n, window = len(prompt_ids), self.max_len
        if n == 0:
            raise ValueError("the prompt is empty")
        if n < window:
            return list(prompt_ids), 0
        if not params.truncate_prompt:
            raise ContextWindowError(
                f"the prompt has {n} tokens but the context window is {window} tokens "
                f"(at least one must be left for the answer); shorten the prompt or allow "
                f"truncation (truncate_prompt=True, or --truncate)")
        keep = window - min(params.max_new_tokens, window // 2)
        bos = self.tokenizer.bos_id
        if bos is not None and prompt_ids[0] == bos:  # keep the BOS, drop the oldest after it
            kept = [bos] + list(prompt_ids[n - keep + 1:])
        else:
            kept = list(prompt_ids[n - keep:])
        return kept, n - len(kept)

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue one sequence (params.n must be 1; see add_group); it is prefilled next step."""
        if params.n != 1:
            raise ValueError("Engine.add takes n=1; use add_group for several completions")
        return self.add_group(prompt_ids, params)[0]

    def add_group(self, prompt_ids: list[int], params: SamplingParams) -> list[Sequence]:
        """Queue params.n sequences sharing one prompt; the prompt is prefilled once and its cache
        row copied to the others. Seeds are seed, seed+1, ... when a seed is given."""
        self._check_cache()
        vocab = self.model.args.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias names a token id outside the vocabulary (size {vocab})")
        if params.n > len(self._free):
            raise RuntimeError(f"{params.n} cache rows needed but only {len(self._free)} of "
                               f"{self.rows} are free")
        ids, dropped = self.fit_prompt(prompt_ids, params)
        row, cached = self._claim_row(ids)
        group = []
        for i in range(params.n):
            seq = Sequence(ids, params, self.tokenizer, self.max_len, seed_offset=i,
                           truncated=dropped)
            if i == 0:  # the leader is prefilled from `cached` on
                seq.row, seq.pos = row, cached
            else:  # the others get the leader's row copied after its prefill
                seq.row = self._free.pop(0)
            seq.cached_tokens = cached
            self._holders[seq.id] = seq
            group.append(seq)
        self._waiting.append(group)
        return group

    def _claim_row(self, ids: list[int]) -> tuple[int, int]:
        """Take a free row for the prompt `ids` with as long a prefix of it in place as the cache
        has; returns (row, prefix length). The last prompt token is always left to prefill (its
        logits give the first output token)."""
        if not self.prefix_cache:
            return self._free.pop(0), 0
        limit = len(ids) - 1
        # ties (no match at all, typically) go to the least recently freed row
        row = max(self._free, key=lambda r: common_prefix(self._row_ids[r], ids))
        self._free.remove(row)
        cached = min(common_prefix(self._row_ids[row], ids), limit)
        held = [(min(common_prefix(s.all_ids[:s.pos], ids), limit), s.row)
                for s in self._holders.values()]
        n, src = max(held, default=(0, -1))  # a running sequence may hold a longer prefix
        if n - cached >= MIN_COPY_TOKENS:
            self._copy_row(src, row, n, start=cached)
            cached = n
        return row, cached

    def cancel(self, seq: Sequence) -> Event | None:
        """Stop a sequence and free its row; returns its final event (None if already done)."""
        if self._holders.pop(seq.id, None) is not None:
            self._free.append(seq.row)
            self._row_ids[seq.row] = seq.all_ids[:seq.pos]
            for group in self._waiting:
                if seq in group:
                    group.remove(seq)
                    if not group:
                        self._waiting.remove(group)
                    for s in group:  # a new leader is prefilled from its pos, 0
                        s.cached_tokens = group[0].pos
                    break
            if seq in self._running:
                self._running.remove(seq)
        return None if seq.finished else seq.cancel()

    # ----- scoring prompts (echo) -----

    def score(self, prompts: list[list[int]], top: int = 0) -> list[PromptLogprobs]:
        """Every prompt token's log-probability given those before it, with the `top` most likely
        tokens at each position (generation/scoring.py). It runs without the KV cache, which is
        set aside meanwhile: the cache rows, the prefixes they hold and the running sequences
        are left exactly as they were, so it can run between two steps."""
        for p in prompts:
            if not p:
                raise ValueError("the prompt is empty")
            if len(p) > self.max_len:
                raise ContextWindowError(f"the prompt has {len(p)} tokens but the context window "
                                         f"is {self.max_len} tokens")
        saved = [layer.attention.cache for layer in self.model.layers]
        self.model.drop_cache()
        try:
            return prompt_logprobs(self.model, prompts, top)
        finally:
            for layer, cache in zip(self.model.layers, saved):
                layer.attention.cache = cache

    # ----- one step -----

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Prefill newly added sequences and decode one token for every running one."""
        events: list[Event] = []
        groups, self._waiting = self._waiting, []
        if self._running:
            joining = self._joining(groups)  # short prompts that ride along in the decode pass
            groups = groups[len(joining):]
            events += self._decode(self._running, joining)
        if groups:
            events += self._prefill(groups)
        for e in events:
            if e.finish_reason is not None:
                self.cancel(e.seq)
        return events

    def _joining(self, groups: list[list[Sequence]]) -> list[list[Sequence]]:
        """The first waiting groups whose prompts the decode step can take along (the model's
        fused step, each prompt token one more row of it): in order, while they fit."""
        joining, tokens = [], len(self._running)
        for group in groups:
            rest = len(group[0].prompt_ids) - group[0].pos
            if rest > FUSED_PREFILL_LEN or not self.runner.fits(tokens + rest):
                break
            joining.append(group)
            tokens += rest
        return joining

    def _decode(self, seqs: list[Sequence],
                joining: list[list[Sequence]] | None = None) -> list[Event]:
        """One token for every sequence in `seqs`; with `joining`, the decode step's pass also
        prefills those groups' prompts (see _joining)."""
        B = len(seqs)
        if joining:
            logits = self._fused_pass(seqs, joining)
        else:
            tokens = torch.tensor([[s.next_input] for s in seqs], device=self.device)
            pos = torch.tensor([[s.pos] for s in seqs], device=self.device)
            rows = None if B == 1 and seqs[0].row == 0 else torch.tensor(
                [s.row for s in seqs], device=self.device)
            logits = self.runner.forward(tokens, pos, rows)[:, -1]  # (B, V)
        for s in seqs:
            s.pos += 1
        events = self._sample(seqs, logits[:B])
        if joining:
            events += self._start(joining, logits[B:])
        return events

    def _fused_pass(self, seqs: list[Sequence], groups: list[list[Sequence]]) -> torch.Tensor:
        """One fused step (Runner.forward_tokens) over a decode token for each of `seqs` and the
        uncached prompt tokens of each group's leader, every token a row of its own (no
        padding): logits (len(seqs) + len(groups), V), the decode rows' then each prompt's last
        token's."""
        ids = [s.next_input for s in seqs]
        at, rows = [s.pos for s in seqs], [s.row for s in seqs]
        keep = list(range(len(seqs)))  # every decode token, and each prompt's last token
        for s in (g[0] for g in groups):
            rest = range(s.pos, len(s.prompt_ids))
            ids += s.prompt_ids[s.pos:]
            at += rest
            rows += [s.row] * len(rest)
            keep.append(len(ids) - 1)
        return self.runner.forward_tokens(*(torch.tensor(x, device=self.device)
                                            for x in (ids, at, rows, keep)))

    def _prefill(self, groups: list[list[Sequence]]) -> list[Event]:
        """Prefill each group leader's prompt from its pos on (the tokens not cached yet)."""
        leaders = [g[0] for g in groups]
        starts = [s.pos for s in leaders]
        rests = [s.prompt_ids[s.pos:] for s in leaders]  # never empty (see _claim_row)
        T = max(len(r) for r in rests)
        if (T <= min(FUSED_PREFILL_LEN, self.prefill_chunk)
                and self.runner.fits(sum(len(r) for r in rests))):
            # short prompts: their tokens side by side in one fused step, no padding
            return self._start(groups, self._fused_pass([], groups))
        pad = 0
        tokens = torch.tensor([r + [pad] * (T - len(r)) for r in rests], device=self.device)
        # row b's tokens sit at positions starts[b] + t. Padding writes junk keys past each
        # prompt (clamped into the cache, still past the prompt, which is shorter than the
        # window); decoding overwrites them before any query can see them, since a query sees
        # only positions <= its own
        pos = torch.tensor(starts, device=self.device)[:, None] + torch.arange(T, device=self.device)
        pos = pos.clamp(max=self.max_len - 1)  # (G, T)
        rows = torch.tensor([s.row for s in leaders], device=self.device)
        last = torch.tensor([len(r) - 1 for r in rests], device=self.device)
        logits = torch.empty(0)
        for c0 in range(0, T, self.prefill_chunk):  # chunk by chunk, each seeing the ones before
            c1 = min(T, c0 + self.prefill_chunk)
            out = self.runner.forward(tokens[:, c0:c1], pos[:, c0:c1], rows,
                                      output_index=last.clamp(c0, c1 - 1) - c0)  # (G, V)
            ends_here = ((last >= c0) & (last < c1))[:, None]  # rows whose prompt ends here
            logits = out if c0 == 0 else torch.where(ends_here, out, logits)
        return self._start(groups, logits)

    def _start(self, groups: list[list[Sequence]], logits: torch.Tensor) -> list[Event]:
        """After the groups' prompts are prefilled (logits: each leader's last prompt token):
        copy each leader's row to its group, sample every first token, and start them running."""
        seqs: list[Sequence] = []
        row_logits: list[torch.Tensor] = []
        for g, group in enumerate(groups):
            n = len(group[0].prompt_ids)
            for s in group:
                if s is not group[0]:
                    self._copy_row(group[0].row, s.row, n)
                s.pos = n
                seqs.append(s)
                row_logits.append(logits[g])
        events = self._sample(seqs, torch.stack(row_logits))
        self._running += [s for s in seqs if not s.finished]
        return events

    @torch.inference_mode()
    def extend(self, seq: Sequence, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` into seq's row at positions seq.pos, seq.pos+1, ...; logits (T, V).

        seq.pos is left to the caller (speculative decoding keeps only the accepted prefix).
        """
        T = len(tokens)
        if seq.pos + T > self.max_len:
            raise ValueError(f"{T} tokens at position {seq.pos} overflow the cache ({self.max_len})")
        pos = torch.arange(seq.pos, seq.pos + T, device=self.device)[None]
        rows = None if seq.row == 0 else torch.tensor([seq.row], device=self.device)
        return self.runner.forward(torch.tensor([tokens], device=self.device), pos, rows)[0]

    def _copy_row(self, src: int, dst: int, n: int, start: int = 0) -> None:
        """Copy positions start..n-1 of cache row src into row dst."""
        self.runner.copy_rows(src, dst, n, start)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Event]:
        """One event per sequence from its logits row. Rows are sampled together, one pass per
        set of top-k/top-p/min-p settings (each row with its own temperature and generator)."""
        raw = list(logits)  # the log-probabilities are the model's own (see _bias)
        biased = self._bias(seqs, logits)
        views = raw if biased is logits else list(biased)
        logits = biased
        rows = [s.adjust(view) for s, view in zip(seqs, views)]
        changed = any(row is not view for row, view in zip(rows, views))
        logits_in = torch.stack(rows) if changed else logits  # penalized or constrained rows
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            p = s.params
            groups.setdefault((p.top_k, p.top_p, p.min_p), []).append(i)
        tokens = [0] * len(seqs)
        for idx in groups.values():
            part = logits_in if len(idx) == len(seqs) else logits_in[idx]
            picked = sample_rows(part.float(), [seqs[i].params for i in idx],
                                 [seqs[i].generator for i in idx])
            for i, token in zip(idx, picked):
                tokens[i] = token
        return [s.append(token, s.logprob(view, token))
                for s, view, token in zip(seqs, raw, tokens)]

    def _bias(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) with every sequence's biases added (logit_bias; stop tokens banned
        before min_tokens) in one indexed add: in place (each row is its sequence's own), or on a
        copy where a biased sequence asks for log-probabilities, which stay the model's own."""
        entries = tuple((i, t, b) for i, s in enumerate(seqs) for t, b in s.biases())
        if not entries:
            return logits
        if any(seqs[i].params.logprobs is not None for i, _, _ in entries):
            logits = logits.clone()
        if self._bias_tensors[0] != entries:  # most steps repeat the last one's
            rows, ids, values = zip(*entries)
            self._bias_tensors = (entries, (
                (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)),
                torch.tensor(values, dtype=logits.dtype, device=logits.device)))
        index, values = self._bias_tensors[1]
        logits.index_put_(index, values, accumulate=True)
        return logits
