"""Prefix caching: a prompt prefix still in the KV cache is reused, and the output is exactly what a
full prefill gives (tiny random model and the real default model, float32; a live server)."""

from __future__ import annotations

import httpx
import openai  # the test extras: pip install -e ".[test]"
import pytest
import torch

from llamaherd import hub
from llamaherd import tokenizer as tok
from llamaherd.api import LLM, load
from llamaherd.chat import build_prompt
from llamaherd.generation import (
    Completion,
    Engine,
    NgramDrafter,
    SamplingParams,
    SpeculativeDecoder,
    collect,
    generate_stream,
)
from llamaherd.generation.engine import MIN_COPY_TOKENS, common_prefix
from llamaherd.hub import DEFAULT_MODEL
from llamaherd.runtime import Runner
from tests.support.models import TINY, make_tiny_model, reference_greedy
from tests.support.server import llamaherd_server

torch.set_num_threads(2)

SYSTEM = list(range(40, 80))  # 40 tokens shared by the prompts below
Q1, Q2, Q3 = [300, 301, 302], [310, 311], [320, 321, 322, 323]
GREEDY = {"temperature": 0.0, "ignore_eos": True, "logprobs": 5}


@pytest.fixture(scope="module")
def tokenizer() -> tok.Tokenizer:
    return tok.load(hub.pull("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(TINY.replace(vocab_size=512, max_seq_len=64), seed=0, logit_scale=4)


def complete(engine: Engine, prompt: list[int], max_new_tokens: int = 8,
             **kw: object) -> list[Completion]:
    params = SamplingParams(**{"max_new_tokens": max_new_tokens, **GREEDY, **kw})
    return collect(generate_stream(engine, [prompt], params))


def uncached(model, tokenizer, prompt: list[int], **kw: object) -> list[Completion]:
    runner = model if isinstance(model, Runner) else Runner(model)
    engine = Engine(runner, tokenizer, rows=4, max_len=512, prefix_cache=False)
    return complete(engine, prompt, **kw)


def assert_same(got: Completion, want: Completion, tol: float = 1e-4) -> None:
    """The same tokens, and top-5 log-probabilities equal within float tolerance."""
    assert got.token_ids == want.token_ids
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=tol)


def drain(engine: Engine) -> None:
    while not engine.idle:
        engine.step()


# ---- the engine, tiny random model --------------------------------------------------------------

def test_a_second_prompt_with_the_same_system_prompt_reuses_it(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=2)
    [first] = complete(engine, SYSTEM + Q1)
    [second] = complete(engine, SYSTEM + Q2)
    assert first.cached_tokens == 0 and second.cached_tokens == len(SYSTEM)
    assert_same(second, uncached(model, tokenizer, SYSTEM + Q2)[0])
    assert second.token_ids == reference_greedy(model, SYSTEM + Q2, 8)


def test_a_follow_up_turn_reuses_the_previous_answer_too(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=2)
    [first] = complete(engine, SYSTEM + Q1)
    follow_up = SYSTEM + Q1 + first.token_ids + Q2
    [second] = complete(engine, follow_up)
    # the last answer token was sampled but never fed to the model, so it is not in the cache
    assert second.cached_tokens == len(SYSTEM + Q1) + len(first.token_ids) - 1
    assert_same(second, uncached(model, tokenizer, follow_up)[0])


def test_a_running_sequence_lends_its_prefix_to_a_new_row(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=3)
    a = engine.add(SYSTEM + Q1, SamplingParams(max_new_tokens=16, **GREEDY))
    for _ in range(4):
        engine.step()
    b = engine.add(SYSTEM + Q2, SamplingParams(max_new_tokens=8, **GREEDY))
    extends = a.all_ids[:a.pos] + Q3  # continues a's prompt and its first answer tokens
    c = engine.add(extends, SamplingParams(max_new_tokens=8, **GREEDY))
    assert b.cached_tokens == len(SYSTEM) and c.cached_tokens == a.pos
    assert len({a.row, b.row, c.row}) == 3
    drain(engine)
    assert a.output_ids == reference_greedy(model, SYSTEM + Q1, 16)
    assert b.output_ids == reference_greedy(model, SYSTEM + Q2, 8)
    assert c.output_ids == reference_greedy(model, extends, 8)


def test_a_short_shared_prefix_is_not_copied_from_a_running_row(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=2)
    short = SYSTEM[:MIN_COPY_TOKENS - 1]
    engine.add(short + Q1, SamplingParams(max_new_tokens=16, **GREEDY))
    engine.step()
    b = engine.add(short + Q2, SamplingParams(max_new_tokens=8, **GREEDY))
    assert b.cached_tokens == 0
    drain(engine)
    assert b.output_ids == reference_greedy(model, short + Q2, 8)


def test_a_row_overwritten_by_another_prompt_keeps_only_what_it_still_holds(model,
                                                                            tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=1)
    complete(engine, SYSTEM + Q1)
    other = SYSTEM[:5] + list(range(400, 430))  # shares 5 tokens, then overwrites the rest
    [c] = complete(engine, other)
    assert c.cached_tokens == 5
    [d] = complete(engine, SYSTEM + Q2)
    assert d.cached_tokens == 5
    assert_same(d, uncached(model, tokenizer, SYSTEM + Q2)[0])


def test_n_completions_of_a_cached_prompt_all_match(model, tokenizer) -> None:
    # (an engine's cache is the model's: a second engine on the model empties the first one's)
    want = uncached(model, tokenizer, SYSTEM + Q2)[0]
    fresh = uncached(model, tokenizer, SYSTEM + Q3, n=3, temperature=0.8, seed=3)
    engine = Engine(Runner(model), tokenizer, rows=4)
    complete(engine, SYSTEM + Q1)
    group = complete(engine, SYSTEM + Q2, n=3)
    assert [c.cached_tokens for c in group] == [len(SYSTEM)] * 3
    for c in group:
        assert_same(c, want)
    sampled = complete(engine, SYSTEM + Q3, n=3, temperature=0.8, seed=3)  # from a member's row
    assert [c.cached_tokens for c in sampled] == [len(SYSTEM)] * 3
    assert [c.token_ids for c in sampled] == [c.token_ids for c in fresh]


def test_a_group_whose_leader_is_cancelled_before_prefill_starts_afresh(model,
                                                                       tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=3)
    complete(engine, SYSTEM + Q1)
    leader, member = engine.add_group(SYSTEM + Q2, SamplingParams(n=2, max_new_tokens=8,
                                                                  **GREEDY))
    assert leader.cached_tokens == member.cached_tokens == len(SYSTEM)
    engine.cancel(leader)
    assert member.cached_tokens == 0
    drain(engine)
    assert member.output_ids == reference_greedy(model, SYSTEM + Q2, 8)


def test_an_identical_prompt_still_prefills_its_last_token(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=1)
    [first] = complete(engine, SYSTEM + Q1)
    [again] = complete(engine, SYSTEM + Q1)
    assert again.cached_tokens == len(SYSTEM + Q1) - 1
    assert_same(again, first)
    [one] = complete(engine, [7])  # nothing can be reused from a one-token prompt
    assert one.cached_tokens == 0


def test_suffixes_at_different_positions_prefill_in_one_batch(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=2, max_len=64)
    long, fresh = list(range(100, 150)), list(range(200, 230))
    complete(engine, long)
    params = SamplingParams(max_new_tokens=8, **GREEDY)
    # one forward: `long` from position 49 (its padding would run past the window's 64
    # positions) and `fresh` from 0
    a, b = engine.add(long, params), engine.add(fresh, params)
    assert (a.pos, b.pos) == (49, 0)
    drain(engine)
    assert a.output_ids == reference_greedy(model, long, 8)
    assert b.output_ids == reference_greedy(model, fresh, 8)


def test_switched_off_nothing_is_reused(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=2, prefix_cache=False)
    complete(engine, SYSTEM + Q1)
    [again] = complete(engine, SYSTEM + Q1)
    assert again.cached_tokens == 0


def test_speculative_decoding_starts_from_a_cached_prefix(model, tokenizer) -> None:
    engine = Engine(Runner(model), tokenizer, rows=1)
    complete(engine, SYSTEM + Q1)
    decoder = SpeculativeDecoder(engine, NgramDrafter(), k=3)
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    [out] = collect(decoder.stream(SYSTEM + Q2, params))
    assert out.cached_tokens == len(SYSTEM)
    assert out.token_ids == reference_greedy(model, SYSTEM + Q2, 16)


def test_common_prefix_counts_the_shared_leading_tokens() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([9], [1]) == 0


# ---- the real default model (float32) ------------------------------------------------------------

LONG_SYSTEM = ("You are a careful assistant for a small public library. Answer in one or two short "
               "sentences, politely, and never invent facts. If a question is about opening "
               "hours, say that the library opens at nine and closes at six on weekdays, and "
               "opens at ten and closes at four on Saturdays; it is closed on Sundays. If a "
               "question is about borrowing, say that members may borrow up to eight books for "
               "three weeks and renew them twice online. ") * 2


@pytest.fixture(scope="module")
def llm() -> LLM:
    return load("smollm2-135m-instruct", dtype="float32")


def test_real_model_gives_the_same_answer_with_a_reused_system_prompt(llm: LLM) -> None:
    def ask(question: str) -> list[int]:
        return build_prompt(llm.chat_format, [{"role": "system", "content": LONG_SYSTEM},
                                              {"role": "user", "content": question}])

    p1, p2 = ask("What is the capital of France?"), ask("When do you open on Saturday?")
    shared = common_prefix(p1, p2)
    assert shared > 150
    want = uncached(llm.runner, llm.tokenizer, p2, max_new_tokens=12)[0]

    engine = Engine(llm.runner, llm.tokenizer, rows=2, max_len=512)
    [first] = complete(engine, p1, max_new_tokens=12)
    [second] = complete(engine, p2, max_new_tokens=12)  # from the free row p1 left
    assert first.cached_tokens == 0 and second.cached_tokens == shared
    assert_same(second, want, tol=1e-3)

    engine = Engine(llm.runner, llm.tokenizer, rows=2, max_len=512)
    engine.add(p1, SamplingParams(max_new_tokens=12, **GREEDY))
    engine.step()
    b = engine.add(p2, SamplingParams(max_new_tokens=12, **GREEDY))  # copied from a's row
    assert b.cached_tokens == shared
    drain(engine)
    assert b.output_ids == want.token_ids


# ---- the server switch ---------------------------------------------------------------------------

def test_serve_no_prefix_cache_reports_nothing_cached() -> None:
    with llamaherd_server(None, "--max-seqs", "2", "--ctx-size", "512", "--dtype", "float32",
                          "--no-prefix-cache", threads=2) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", timeout=120,
                               max_retries=0)
        messages = [{"role": "system", "content": LONG_SYSTEM},
                    {"role": "user", "content": "Hello"}]
        for _ in range(2):
            r = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages,
                                               max_tokens=2, temperature=0)
            assert r.usage.prompt_tokens_details.cached_tokens == 0
        assert "llamaherd_prompt_tokens_cached_total 0.0" in httpx.get(s.url + "/metrics").text
