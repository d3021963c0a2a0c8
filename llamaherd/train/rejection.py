"""Rejection sampling (Llama 2 and 3): K answers a prompt drawn through the engine, each judged by
a reward model or a verifier function, the best kept as a new SFT set.

    llamaherd sample-best --model M --data prompts.jsonl --out best.jsonl -k 8 --verifier math

The engine draws the K answers of a prompt as one request (`n=K`: the prompt is prefilled once
and its cache rows copied), many prompts at a time, on whatever weights the model loads with (a
GGUF file's packed blocks on the C++ kernels). Prompt rows are JSONL with "prompt" (a message
list, or a string taken as the user's message) or "messages" (ending with the user's turn); the
other fields of a row (an "answer" a verifier reads) travel with it into the output.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llamaherd.datasets import write_jsonl
from llamaherd.train.data import DataError, read_rows

Judge = Callable[[list[dict[str, Any]], list[str]], list[float]]  # rows, replies -> rewards


@dataclass
class SampleReport:
    prompts: int
    k: int
    samples: int
    generate_s: float
    samples_per_s: float
    tokens_per_s: float
    mean_reward: float  # over every sample: what one draw gives on average
    mean_best: float  # over the kept answers
    max_reward: float
    pairs: int  # preference pairs written (best against worst, where they differ)


def prompt_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation a row asks the model to continue."""
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and prompt:
            return prompt
        raise DataError("prompt must be a string or a non-empty list of messages")
    if "messages" in row and isinstance(row["messages"], list) and row["messages"]:
        messages = row["messages"]
        if messages[-1].get("role") == "assistant":  # a finished chat: answer its last question
            messages = messages[:-1]
        if not messages:
            raise DataError("messages holds no turn to answer")
        return messages
    raise DataError("a prompt row needs a prompt (messages or a string) or messages")


def reward_model_judge(reward_model: Any) -> Judge:
    """Rewards from a RewardModel: each prompt with its reply, scored as one conversation."""
    def judge(rows: list[dict[str, Any]], replies: list[str]) -> list[float]:
        return reward_model.score([prompt_messages(r) + [{"role": "assistant", "content": a}]
                                   for r, a in zip(rows, replies, strict=True)])
    return judge


def verifier_judge(verifier: Callable[[dict[str, Any], str], float]) -> Judge:
    """Rewards from a function of (row, reply), e.g. a checker of the row's answer."""
    def judge(rows: list[dict[str, Any]], replies: list[str]) -> list[float]:
        return [float(verifier(r, a)) for r, a in zip(rows, replies, strict=True)]
    return judge


def make_judge(verifier: str | None, reward_model: str | None) -> Judge:
    """The judge of exactly one of: a verifier (a name in VERIFIERS or "module:function") and a
    reward model directory."""
    if (verifier is None) == (reward_model is None):
        raise ValueError("give one of a verifier and a reward model")
    if verifier is not None:
        from llamaherd.train.verifiers import load_verifier

        return verifier_judge(load_verifier(verifier))
    from llamaherd.train.reward_model import RewardModel

    return reward_model_judge(RewardModel.load(reward_model))  # type: ignore[arg-type]


def greedy_reward(llm: Any, rows: Sequence[dict[str, Any]], judge: Judge,
                  max_new_tokens: int) -> float:
    """The mean reward of `llm`'s greedy answers to the rows' prompts."""
    from llamaherd.chat import build_prompt

    prompts = [build_prompt(llm.chat_format, prompt_messages(r)) for r in rows]
    done = llm.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    return statistics.fmean(judge(list(rows), [c.text.strip() for c in done]))


def sample_best(llm: Any, rows: Sequence[dict[str, Any]], judge: Judge, k: int = 8,
                out: str | Path | None = None, pairs_out: str | Path | None = None,
                temperature: float = 0.8, top_p: float = 1.0, max_new_tokens: int = 256,
                seed: int | None = 0, prompts_per_call: int = 16,
                keep_all: bool = False) -> tuple[list[dict[str, Any]], SampleReport]:
    """Draw k answers to every row's prompt with `llm` (a llamaherd.LLM), judge them, and keep
    each prompt's best (ties: the first drawn) as {"messages": prompt + [answer], "reward": r,
    ...the row's other fields}. Writes those rows to `out` and, to `pairs_out`, a preference pair
    (best as chosen, worst as rejected) for each prompt whose answers' rewards differ."""
    from llamaherd.chat import build_prompt

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kept: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    rewards_all: list[float] = []
    generate_s, new_tokens = 0.0, 0
    bar = tqdm(total=len(rows) * k, unit="sample", dynamic_ncols=True)
    with bar:
        for start in range(0, len(rows), prompts_per_call):
            group = rows[start:start + prompts_per_call]
            prompts = [build_prompt(llm.chat_format, prompt_messages(r)) for r in group]
            t0 = time.perf_counter()
            done = llm.generate(prompts, n=k, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens,
                                seed=None if seed is None else seed + start * k)
            generate_s += time.perf_counter() - t0
            new_tokens += sum(len(c.token_ids) for c in done)
            for i, row in enumerate(group):
                replies = [c.text.strip() for c in done if c.prompt_index == i]
                rewards = judge([row] * len(replies), replies)
                rewards_all += rewards
                best = max(range(len(replies)), key=lambda j: (rewards[j], -j))
                worst = min(range(len(replies)), key=lambda j: (rewards[j], j))
                messages = prompt_messages(row)
                extra = {key: v for key, v in row.items() if key not in ("prompt", "messages")}
                item = {"messages": messages + [{"role": "assistant", "content": replies[best]}],
                        "reward": rewards[best], **extra}
                if keep_all:
                    item["samples"] = [{"reply": a, "reward": r}
                                       for a, r in zip(replies, rewards, strict=True)]
                kept.append(item)
                if rewards[best] > rewards[worst]:
                    pairs.append({"prompt": messages,
                                  "chosen": [{"role": "assistant", "content": replies[best]}],
                                  "rejected": [{"role": "assistant", "content": replies[worst]}],
                                  "margin_reward": rewards[best] - rewards[worst], **extra})
            bar.update(len(group) * k)
    if out is not None:
        write_jsonl(kept, out)
    if pairs_out is not None:
        write_jsonl(pairs, pairs_out)
    samples = len(rewards_all)
    report = SampleReport(
        prompts=len(rows), k=k, samples=samples, generate_s=generate_s,
        samples_per_s=samples / max(generate_s, 1e-9),
        tokens_per_s=new_tokens / max(generate_s, 1e-9),
        mean_reward=statistics.fmean(rewards_all) if rewards_all else 0.0,
        mean_best=statistics.fmean(r["reward"] for r in kept) if kept else 0.0,
        max_reward=max(rewards_all, default=0.0), pairs=len(pairs))
    return kept, report


def read_prompt_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a prompt JSONL file, each checked to hold a prompt (errors name the line)."""
    rows = []
    for where, row in read_rows(path):
        try:
            prompt_messages(row)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no prompt rows")
    return rows


def report_dict(report: SampleReport) -> dict[str, Any]:
    return asdict(report)
