"""The fused decode step (every layer of a T = 1 step in one C++ call) against the layer-by-layer
forward on the same packed weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llamaherd
from llamaherd import runtime
from llamaherd.checkpoint import load_checkpoint
from llamaherd.checkpoint.gguf_write import write_gguf
from llamaherd.runtime import Runner
from llamaherd.runtime import runner as runner_module
from tests.support.cases import attention_case, reference_attention, rewrite_gguf
from tests.support.models import TINY, make_tiny_model


def decode_logits(runner: Runner, fast: bool, prompt: list[list[int]], steps: list[list[int]],
                  rows: list[int], cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Prefill `prompt` (B, P) into cache rows `rows` (through the layers either way, so both
    start from the same cache), then feed the given tokens one step at a time, each row at its
    own position (row b starts b tokens later); logits (steps, B, V)."""
    decoder = runner.decoder
    assert decoder is not None, "the packed GGUF model should have a fused decoder"
    runner.decoder = None
    try:
        B, P = len(prompt), len(prompt[0])
        runner.model.setup_cache(max(rows) + 1, 64, cache_dtype or runner.kv_dtype)
        cache_rows = torch.tensor(rows)
        out = []
        with torch.inference_mode():
            runner.forward(torch.tensor(prompt), torch.arange(P).expand(B, P), cache_rows)
            runner.decoder = decoder if fast else None
            for t, tokens in enumerate(steps):
                pos = torch.tensor([[P + t + b] for b in range(B)])  # rows at different positions
                out.append(runner.forward(torch.tensor(tokens)[:, None], pos, cache_rows)[:, -1])
        return torch.stack(out)
    finally:
        runner.decoder = decoder


def packed(path) -> Runner:
    """A GGUF file loaded with its weights packed and prepared for inference."""
    return runtime.prepare(load_checkpoint(path, packed=True).model)


@pytest.fixture(scope="module", params=["Q4_1", "Q8_0", "Q4_0"])
def tiny_packed(request, tmp_path_factory) -> Runner:
    path = tmp_path_factory.mktemp("fused") / f"tiny-{request.param}.gguf"
    write_gguf(make_tiny_model(), path, weight_type=request.param)
    return packed(path)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
def test_fused_decode_matches_the_layers_on_a_tiny_model(tiny_packed, cache_dtype):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, TINY.vocab_size, (3, 7), generator=g).tolist()
    steps = torch.randint(0, TINY.vocab_size, (5, 3), generator=g).tolist()
    rows = [2, 0, 3]  # not consecutive: the decoder must write and read each token's own row
    fast = decode_logits(tiny_packed, True, prompt, steps, rows, cache_dtype)
    slow = decode_logits(tiny_packed, False, prompt, steps, rows, cache_dtype)
    assert (fast - slow).abs().max() < 1e-4 * slow.abs().max()


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_decode_attention_over_blocks_of_keys(tmp_path, head_dim):
    # head_dim 64 and 128 take the blocked attention (16 keys at a time); 37+ positions give
    # whole blocks and a remainder, 3 query heads per kv head more than one pass of output rows
    args = TINY.replace(dim=6 * head_dim, n_heads=6, n_kv_heads=2, head_dim=head_dim,
                        hidden_dim=256)
    path = write_gguf(make_tiny_model(args), tmp_path / "wide.gguf", weight_type="Q8_0")
    model = packed(path)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab_size, (3, 37), generator=g).tolist()
    steps = torch.randint(0, args.vocab_size, (4, 3), generator=g).tolist()
    errors = []
    for rows in ([1, 0, 2], [0]):  # 6 tasks of 3 heads; 2 tasks split into one head each
        fast = decode_logits(model, True, prompt[:len(rows)], [s[:len(rows)] for s in steps], rows)
        slow = decode_logits(model, False, prompt[:len(rows)], [s[:len(rows)] for s in steps],
                             rows)
        errors += ((fast - slow).abs().amax(dim=(1, 2)) / slow.abs().max()).tolist()
    # Summation order differs in the last bits; now and then that moves one activation across an
    # 8-bit rounding boundary, an error of ~1e-3 in that step only (the old per-key loops too).
    assert max(errors) < 1e-2, errors
    assert sum(e < 1e-5 for e in errors) >= len(errors) - 2, errors


def test_fused_decode_uses_the_files_own_rope_divisors(tmp_path):
    # rope_freqs factors that no Llama 3.1 scaling explains are applied as they are
    divisors = np.linspace(1, 7, TINY.head_dim // 2).astype(np.float32)
    rewrite_gguf(write_gguf(make_tiny_model(), tmp_path / "q8.gguf", weight_type="Q8_0"),
                 tmp_path / "divided.gguf", extra={"rope_freqs.weight": divisors})
    model = packed(tmp_path / "divided.gguf")
    prompt, steps = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], [[11], [12], [13]]
    fast = decode_logits(model, True, prompt, steps, [0])
    slow = decode_logits(model, False, prompt, steps, [0])
    assert (fast - slow).abs().max() < 1e-4 * slow.abs().max()


def test_packed_models_keep_a_float16_cache(tiny_packed):
    tiny_packed.setup_cache(1, 8)
    assert tiny_packed.cache.k.dtype == torch.float16


def test_fused_decode_writes_the_cache_the_layers_would_write(tiny_packed):
    prompt, steps, rows = [[1, 2, 3]], [[4], [5]], [1]
    caches = []
    for fast in (True, False):
        decode_logits(tiny_packed, fast, prompt, steps, rows)
        caches.append([(layer.attention.cache.k.clone(), layer.attention.cache.v.clone())
                       for layer in tiny_packed.model.layers])
    for (k1, v1), (k2, v2) in zip(*caches):  # float16: equal up to its last bit
        assert torch.allclose(k1, k2, rtol=1e-3, atol=1e-3)
        assert torch.allclose(v1, v2, rtol=1e-3, atol=1e-3)
        assert k1[1, :, 3:5].abs().sum() > 0  # the decoded positions were written


def test_fused_decode_on_the_real_model(default_model_path):
    llm = llamaherd.load(default_model_path)
    ids = llm.tokenizer.encode("The lighthouse keeper opened the bottle and read the message:")
    # teacher-forced: both paths see the same tokens, so each step compares like with like
    steps = [[t] for t in llm.tokenizer.encode(" it was written in an old hand, and it said")]
    fast = decode_logits(llm.runner, True, [ids], steps, [0])[:, 0]
    slow = decode_logits(llm.runner, False, [ids], steps, [0])[:, 0]
    cos = torch.nn.functional.cosine_similarity(fast, slow, dim=-1)
    # The two paths differ only in float rounding (last bits), but the 8-bit rounding of every
    # projection's input turns some of those into one-step differences, which 30 layers and
    # then the cache carry on (the layer path does the same to a 1e-6 perturbation of its input).
    # The first step reads one prefilled cache on both paths; later ones read keys each wrote.
    assert cos[0] > 0.9995, cos.tolist()  # 0.99995 here; the sums' order varies by CPU
    assert cos.min() > 0.99, cos.tolist()
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.9


def test_fused_decode_is_only_used_where_it_applies(tiny_packed, tmp_path, monkeypatch):
    # a float32 load keeps the exact layer-by-layer path
    path = tmp_path / "tiny.gguf"
    write_gguf(make_tiny_model(), path, weight_type="Q8_0")
    assert runtime.prepare(load_checkpoint(path, dtype=torch.float32).model).decoder is None

    decoder, calls = tiny_packed.decoder, []

    class Counting:
        def usable(self) -> bool:
            return decoder.usable()

        def __call__(self, *args):
            calls.append(args)
            return decoder(*args)

    tiny_packed.decoder = Counting()
    forward = tiny_packed.forward
    try:
        tiny_packed.setup_cache(2, 16)
        with torch.inference_mode():
            forward(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])  # a short prefill
            forward(torch.tensor([[4]]), torch.tensor([[3]]))  # decode
        assert len(calls) == 2
        monkeypatch.setattr(runner_module, "FUSED_PREFILL_LEN", 2)
        with torch.inference_mode():  # longer than FUSED_PREFILL_LEN: the layers
            forward(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
        monkeypatch.setattr(runner_module, "FUSED_PREFILL_LEN", 3)
        monkeypatch.setattr(runner_module, "FUSED_PREFILL_TOKENS", 5)
        with torch.inference_mode():  # more tokens in all: the layers
            forward(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.arange(3).expand(2, 3))
        assert len(calls) == 2
        forward(torch.tensor([[5]]), torch.tensor([[4]]))  # gradients on: the layers run
        assert len(calls) == 2
    finally:
        tiny_packed.decoder = decoder


def test_fused_decode_refuses_out_of_range_rows_and_positions(tiny_packed):
    tiny_packed.setup_cache(2, 8)
    h = torch.zeros(1, 1, TINY.dim)
    with pytest.raises(RuntimeError, match="out of range"):
        tiny_packed.decoder(h, torch.tensor([[8]]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="out of range"):
        tiny_packed.decoder(h, torch.tensor([[0]]), torch.tensor([2]))


def test_kernel_feed_forward_matches_the_composed_one_in_blocks_of_rows(tiny_packed):
    """The packed model's feed-forward (w13, one-pass SwiGLU, w2, over blocks of ROWS tokens)
    gives what w2(silu(gate) * up) gives, for fewer rows than a block and for several blocks."""
    from llamaherd.runtime.modules import KernelFeedForward

    ffn = tiny_packed.model.layers[0].feed_forward
    assert isinstance(ffn, KernelFeedForward)
    dim = TINY.dim
    for T in (5, 2 * KernelFeedForward.ROWS + 44):
        x = torch.randn(2, T, dim, generator=torch.Generator().manual_seed(T))
        gate, up = ffn.w13(x).chunk(2, dim=-1)
        expected = ffn.w2(torch.nn.functional.silu(gate) * up)
        with torch.inference_mode():
            got = ffn(x)
        assert got.shape == (2, T, dim)
        assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


@pytest.mark.parametrize("head_dim", [64, 128, 48])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
def test_kernel_attention_over_the_cache_matches_sdpa(head_dim, cache_dtype):
    """Prefill attention on the kernels: each query sees its row's positions up to its own
    (prompts starting past a cached prefix, rows out of order, 3 query heads a kv head; 64 and
    128 take blocks of keys, 48 key by key)."""
    from llamaherd import kernels

    q, k, v, rows, pos = case = attention_case(head_dim, cache_dtype)
    got = kernels.load().attention(*case)
    expected = reference_attention(q, k, v, rows, pos)
    assert got.shape == q.shape
    assert (got - expected).abs().max() < 1e-5


def test_kernel_attention_refuses_out_of_range_rows_and_positions():
    from llamaherd import kernels

    k = v = torch.zeros(2, 1, 8, 64, dtype=torch.float16)
    q = torch.zeros(1, 2, 1, 64)
    attention = kernels.load().attention
    with pytest.raises(RuntimeError, match="out of range"):
        attention(q, k, v, torch.tensor([0]), torch.tensor([[7, 8]]))
    with pytest.raises(RuntimeError, match="out of range"):
        attention(q, k, v, torch.tensor([2]), torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="kv heads"):
        attention(torch.zeros(1, 2, 3, 64), torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 8, 64),
                  torch.tensor([0]), torch.tensor([[0, 1]]))


def test_packed_prefill_attention_runs_on_the_kernels_as_sdpa_would(tiny_packed):
    """The packed model's prefill (T > 1 over the cache) takes the kernels' attention, and gives
    the logits SDPA gives."""
    attentions = tiny_packed.attentions
    assert all(a.cached_attention is not None for a in attentions)
    prompt = torch.randint(0, TINY.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([[0], [5]]) + torch.arange(19)

    def logits() -> torch.Tensor:
        tiny_packed.setup_cache(3, 32)
        with torch.inference_mode():
            return tiny_packed.model(prompt, pos, torch.tensor([2, 0]))

    kernel = logits()
    saved = [a.cached_attention for a in attentions]
    try:
        for a in attentions:
            a.cached_attention = None
        sdpa = logits()
    finally:
        for a, f in zip(attentions, saved):
            a.cached_attention = f
    assert (kernel - sdpa).abs().max() < 1e-4 * sdpa.abs().max()


@pytest.mark.parametrize("B, T", [(2, 9), (3, 100)])
def test_a_short_prefill_through_the_fused_step_matches_the_layers(tiny_packed, monkeypatch, B, T):
    """Each prompt token a row of the fused step (rows out of order, the second prompt after 3
    cached positions): the logits and the cache the layers would give; 300 rows take the
    feed-forward in more than one pass (the step's FFN_ROWS is 256)."""
    prompt = torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[0], [3], [1]][:B]) + torch.arange(T)
    rows = torch.tensor([2, 0, 1][:B])

    def prefill(fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(runner_module, "FUSED_PREFILL_LEN", 128 if fused else 0)
        tiny_packed.setup_cache(3, T + 8)
        with torch.inference_mode():
            logits = tiny_packed.forward(prompt, pos, rows)
        cache = tiny_packed.attentions[-1].cache
        return logits, cache.k.float().clone(), cache.v.float().clone()

    fused, layers = prefill(True), prefill(False)
    for a, b in zip(fused, layers):  # the same kernels; sums in another order
        assert (a - b).abs().max() < 1e-3 * b.abs().max()


@pytest.fixture(scope="module")
def packed_llm():
    return llamaherd.load("smollm2-135m-instruct")


def test_a_prompt_joining_a_running_batch_rides_in_its_decode_pass(packed_llm, monkeypatch):
    """A short prompt added while others decode is prefilled in the same fused pass as their
    next tokens; every sequence's tokens and log-probabilities are those it gets alone (each row
    of the kernels' step is computed on its own, whatever else is in it)."""
    from llamaherd.generation.engine import Engine
    from llamaherd.generation.sampling import SamplingParams

    tok, runner = packed_llm.tokenizer, packed_llm.runner
    prompts = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):",
                                       "Once upon a time, in a small village,")]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=0, ignore_eos=True)

    def run(together: bool) -> list[list[tuple[int, float]]]:
        engine = Engine(runner, tok, rows=3, max_len=64)
        seqs, out = [], {}

        def step() -> None:
            for e in engine.step():
                out.setdefault(e.seq.id, []).append((e.token_id, e.logprob.logprob))

        for i, p in enumerate(prompts):
            if not together:
                while not engine.idle:
                    step()
            seqs.append(engine.add(p, greedy))
            for _ in range(i + 1):  # the next prompt joins after a step or two of decoding
                step()
        while not engine.idle:
            step()
        return [out[s.id] for s in seqs]

    joined = []  # the fused passes that decode some sequences and prefill others
    original = Engine._fused_pass
    monkeypatch.setattr(Engine, "_fused_pass",
                        lambda self, seqs, groups: (joined.append(len(seqs)) if seqs else None)
                        or original(self, seqs, groups))
    alone = run(False)
    assert joined == []  # nothing was running when each prompt came: the plain prefill
    together = run(True)
    assert joined == [1, 2]  # the second and third prompts joined a decode pass
    assert together == alone


def test_prompts_prefilled_together_take_one_unpadded_fused_pass(packed_llm, monkeypatch):
    """Short prompts added at once are prefilled in one fused pass, each token one row (no padding
    to the longest); every sequence gets the tokens and log-probabilities it gets alone."""
    from llamaherd.generation.engine import Engine
    from llamaherd.generation.sampling import SamplingParams

    tok, runner = packed_llm.tokenizer, packed_llm.runner
    prompts = [tok.encode(p) for p in ("Hi", "The capital of France is",
                                       "Once upon a time, in a small village, there lived")]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    rows = []
    original = runner.forward_tokens
    monkeypatch.setattr(runner, "forward_tokens", lambda *a: rows.append(len(a[0])) or original(*a))

    def run(batch: list[list[int]]) -> list[list[tuple[int, float]]]:
        engine = Engine(runner, tok, rows=3, max_len=64, prefix_cache=False)
        seqs = [engine.add(p, greedy) for p in batch]
        out: dict[int, list] = {}
        while not engine.idle:
            for e in engine.step():
                out.setdefault(e.seq.id, []).append((e.token_id, e.logprob.logprob))
        return [out[s.id] for s in seqs]

    alone = [run([p])[0] for p in prompts]
    rows.clear()
    together = run(prompts)
    assert rows[0] == sum(len(p) for p in prompts)  # the first pass: every prompt token, no pad
    assert together == alone
