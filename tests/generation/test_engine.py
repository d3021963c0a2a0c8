"""The generation engine and generate_stream on tiny random models (real tokenizer for text)."""

from __future__ import annotations

import pytest
import torch

from llamaherd import hub
from llamaherd import tokenizer as tok
from llamaherd.generation import (
    ContextWindowError,
    Engine,
    SamplingParams,
    collect,
    generate_stream,
)
from llamaherd.model import Transformer
from llamaherd.runtime import Runner
from tests.support.models import TINY, make_tiny_model, reference_greedy

torch.set_num_threads(2)

PROMPTS = [[5, 6, 7, 8, 9], [100, 200], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [300]]
VOCAB = 512  # ids below 512 are ordinary tokens of the real tokenizer used for the text
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tokenizer() -> tok.Tokenizer:
    return tok.load(hub.pull("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def model(tokenizer: tok.Tokenizer) -> Transformer:
    return make_tiny_model(TINY.replace(vocab_size=VOCAB, max_seq_len=64), seed=0, logit_scale=4)


def run(engine: Engine, prompts: list[list[int]], **kw: object) -> list:
    return collect(generate_stream(engine, prompts, SamplingParams(**kw)))


def test_greedy_decoding_matches_the_no_cache_reference(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=1)
    for p in PROMPTS:
        [c] = run(engine, [p], max_new_tokens=12, **GREEDY)
        assert c.token_ids == reference_greedy(model, p, 12)
        assert c.finish_reason == "length" and c.prompt_tokens == len(p)


def test_batched_greedy_equals_one_at_a_time(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=4)
    batched = run(engine, PROMPTS, max_new_tokens=12, **GREEDY)
    alone = [run(Engine(Runner(model), tokenizer, rows=1), [p], max_new_tokens=12, **GREEDY)[0]
             for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.prompt_index for c in batched] == [0, 1, 2, 3]


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunked_prefill_gives_the_same_tokens(model, tokenizer, chunk) -> None:
    # prompts of 5, 2, 11 and 1 tokens in one prefill, `chunk` positions per forward: rows end
    # in different chunks, and later chunks attend to the keys earlier ones wrote
    engine = Engine(Runner(model), tokenizer, rows=4, prefill_chunk=chunk)
    chunked = run(engine, PROMPTS, max_new_tokens=12, logprobs=3, **GREEDY)
    whole = run(Engine(Runner(model), tokenizer, rows=4), PROMPTS, max_new_tokens=12, logprobs=3,
                **GREEDY)
    assert [c.token_ids for c in chunked] == [reference_greedy(model, p, 12) for p in PROMPTS]
    for a, b in zip(chunked, whole):
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(Runner(model), tokenizer, prefill_chunk=0)


def test_more_prompts_than_rows_queue_and_all_finish(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=2)
    out = run(engine, PROMPTS, max_new_tokens=6, **GREEDY)
    assert [c.token_ids for c in out] == [reference_greedy(model, p, 6) for p in PROMPTS]
    assert engine.idle and engine.free_rows == 2


def test_sequences_join_and_leave_between_steps(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=3)
    params = SamplingParams(max_new_tokens=10, **GREEDY)
    a = engine.add(PROMPTS[0], params)
    for _ in range(4):
        engine.step()
    b = engine.add(PROMPTS[2], params)  # joins while a is half way
    c = engine.add(PROMPTS[1], params)
    engine.step()
    engine.cancel(c)  # leaves early; its row is free again
    assert engine.free_rows == 1 and c.finish_reason == "cancelled"
    while not engine.idle:
        engine.step()
    assert a.output_ids == reference_greedy(model, PROMPTS[0], 10)
    assert b.output_ids == reference_greedy(model, PROMPTS[2], 10)
    assert engine.free_rows == 3


def test_each_sequence_keeps_its_own_rng(model, tokenizer) -> None:
    sampled = {"temperature": 1.0, "seed": 123, "max_new_tokens": 15, "ignore_eos": True}
    alone = run(Engine(Runner(model), tokenizer, rows=1), [PROMPTS[0]], **sampled)[0].token_ids
    engine = Engine(Runner(model), tokenizer, rows=4)
    batch = run(engine, [PROMPTS[1], PROMPTS[0], PROMPTS[2]], **sampled)
    assert batch[1].token_ids == alone
    assert run(engine, [PROMPTS[0]], **sampled)[0].token_ids == alone  # seed reproducible
    other = run(engine, [PROMPTS[0]], **{**sampled, "seed": 124})[0].token_ids
    assert other != alone
    assert alone != reference_greedy(model, PROMPTS[0], 15)  # it really sampled


def test_n_completions_share_the_prefill(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=4)
    greedy = run(engine, [PROMPTS[2]], n=3, max_new_tokens=8, **GREEDY)
    expected = reference_greedy(model, PROMPTS[2], 8)
    assert [c.token_ids for c in greedy] == [expected] * 3  # copied cache rows are right
    sampled = run(engine, [PROMPTS[2], PROMPTS[0]], n=2, temperature=1.0, seed=5,
                  max_new_tokens=8, ignore_eos=True)
    assert [c.prompt_index for c in sampled] == [0, 0, 1, 1]
    assert sampled[0].token_ids != sampled[1].token_ids  # seeds 5 and 6


def test_max_new_tokens_finishes_with_length(model, tokenizer) -> None:
    [c] = run(Engine(Runner(model), tokenizer), [PROMPTS[0]], max_new_tokens=3, **GREEDY)
    assert len(c.token_ids) == 3 and c.finish_reason == "length"


def test_stop_token_ends_the_sequence_and_is_not_returned(model, tokenizer) -> None:
    expected = reference_greedy(model, PROMPTS[0], 10)
    stop = expected[4]
    first = expected.index(stop)
    [c] = run(Engine(Runner(model), tokenizer), [PROMPTS[0]], max_new_tokens=10, stop_token_ids=[stop],
              **GREEDY)
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.token_ids == expected[:first]


def test_tokenizer_stop_ids_apply_unless_ignore_eos(model, tokenizer) -> None:
    expected = reference_greedy(model, PROMPTS[1], 10)
    engine = Engine(Runner(model), tokenizer)
    forced = SamplingParams(max_new_tokens=10, temperature=0.0,
                            logits_processors=[_force_after(3, tokenizer.eos_id)])
    [c] = collect(generate_stream(engine, [PROMPTS[1]], forced))
    assert c.finish_reason == "stop" and c.token_ids == expected[:3]
    forced.ignore_eos = True
    [c] = collect(generate_stream(engine, [PROMPTS[1]], forced))
    assert c.finish_reason == "length" and tokenizer.eos_id in c.token_ids


def test_logit_bias_and_min_tokens(model, tokenizer) -> None:
    """+100 on a stop token ends the answer at once, unless min_tokens holds it off: then the
    first tokens are the unbiased greedy ones and the stop token comes right after them.
    -100 keeps the greedy choice out; the log-probabilities stay the model's own."""
    expected = reference_greedy(model, PROMPTS[0], 6)
    stop = tokenizer.eos_id
    assert stop not in expected
    engine = Engine(Runner(model), tokenizer)
    [c] = run(engine, [PROMPTS[0]], max_new_tokens=6, temperature=0.0, logit_bias={stop: 100})
    assert c.finish_reason == "stop" and c.token_ids == []
    [c] = run(engine, [PROMPTS[0]], max_new_tokens=6, temperature=0.0, logit_bias={stop: 100},
              min_tokens=4, logprobs=0)
    assert c.finish_reason == "stop" and c.token_ids == expected[:4]
    [plain] = run(engine, [PROMPTS[0]], max_new_tokens=4, temperature=0.0, logprobs=0)
    assert [lp.logprob for lp in c.logprobs[:4]] == [lp.logprob for lp in plain.logprobs]
    [c] = run(engine, [PROMPTS[0]], max_new_tokens=1, logit_bias={expected[0]: -100}, **GREEDY)
    assert c.token_ids != expected[:1]
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add(PROMPTS[0], SamplingParams(logit_bias={VOCAB: 1.0}))
    for bad in ({"min_tokens": 7, "max_new_tokens": 6}, {"logit_bias": {1: 101.0}}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def _force_after(n: int, token: int):
    def processor(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) != n:
            return logits
        forced = torch.full_like(logits, -float("inf"))
        forced[token] = 0.0
        return forced
    return processor


def test_stop_string_cuts_text_and_stream(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer)
    [full] = run(engine, [PROMPTS[0]], max_new_tokens=12, **GREEDY)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert len(stop) == 3 and full.text.index(stop) > 0
    events = list(generate_stream(engine, [PROMPTS[0]], SamplingParams(
        max_new_tokens=12, stop=[stop], **GREEDY)))
    streamed = "".join(e.text for e in events)
    assert streamed == events[-1].seq.text == full.text[:full.text.index(stop)]
    assert events[-1].finish_reason == "stop" and events[-1].seq.stop_reason == stop


def test_context_overflow_is_an_error_with_the_numbers(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer)
    with pytest.raises(ContextWindowError, match="70 tokens but the context window is 64"):
        run(engine, [list(range(1, 71))], max_new_tokens=4, **GREEDY)
    assert engine.idle and engine.free_rows == 1


def test_truncation_when_asked_is_reported(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer)
    prompt = list(range(1, 71))
    [c] = run(engine, [prompt], max_new_tokens=4, truncate_prompt=True, **GREEDY)
    assert c.prompt_tokens == 60 and c.truncated == 10
    assert c.token_ids == reference_greedy(model, prompt[10:], 4)


def test_reaching_the_window_finishes_with_length(model, tokenizer) -> None:
    [c] = run(Engine(Runner(model), tokenizer), [PROMPTS[2]], max_new_tokens=500, **GREEDY)
    assert c.finish_reason == "length"
    assert c.prompt_tokens + len(c.token_ids) == 64


def test_logprobs_are_log_softmax_of_the_model_logits(model, tokenizer) -> None:
    [c] = run(Engine(Runner(model), tokenizer), [PROMPTS[0]], max_new_tokens=5, logprobs=3,
              temperature=1.0, seed=0, ignore_eos=True)
    ids = PROMPTS[0] + c.token_ids
    saved = [layer.attention.cache for layer in model.layers]
    model.drop_cache()
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    for layer, cache in zip(model.layers, saved):
        layer.attention.cache = cache
    assert len(c.logprobs) == 5
    for i, info in enumerate(c.logprobs):
        row = logp[len(PROMPTS[0]) - 1 + i]
        assert info.token_id == c.token_ids[i]
        assert info.logprob == pytest.approx(float(row[info.token_id]), abs=1e-4)
        assert [t for t, _ in info.top] == torch.topk(row, 3).indices.tolist()


def test_penalties_in_the_engine_match_the_reference_loop(tokenizer) -> None:
    small = make_tiny_model(TINY.replace(vocab_size=12, max_seq_len=64), seed=1, logit_scale=4)  # 12 tokens: 20 steps must repeat some
    prompt = [3, 4, 5]
    pen = {"repetition": 1.5, "presence": 0.7, "frequency": 0.4}
    [c] = run(Engine(Runner(small), tokenizer), [prompt], max_new_tokens=20,
              repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.4, **GREEDY)
    assert c.token_ids == reference_greedy(small, prompt, 20, **pen)
    assert c.token_ids != reference_greedy(small, prompt, 20)  # the penalties mattered


def test_closing_the_stream_cancels_and_frees_rows(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=2)
    stream = generate_stream(engine, PROMPTS[:2], SamplingParams(max_new_tokens=20, **GREEDY))
    next(stream)
    stream.close()
    assert engine.idle and engine.free_rows == 2


def test_n_larger_than_the_rows_is_refused(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="n=3 completions need 3 cache rows"):
        run(Engine(Runner(model), tokenizer, rows=2), [PROMPTS[0]], n=3)
