"""lm-evaluation-harness against `llamaherd serve`: its `local-completions` model (echo and
logprobs over token-id prompts, the server's own tokenizer through /tokenizer_info and
/tokenize) gives every answer of a small multiple-choice task the log-likelihood that lm-eval's
own `hf` backend computes on the same float32 weights, and the same accuracy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamaherd.convert import convert
from tests.support.server import llamaherd_server

lm_eval = pytest.importorskip("lm_eval")

DATA = Path(__file__).parent / "data" / "tiny_mc.jsonl"  # 8 questions, 2 to 4 answers each
TASK = "llamaherd_tiny_mc"
CONTEXT = 512


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Nothing may come from the network: the task reads a local JSON file, the hf backend a
    local directory."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        env.setenv("OPENAI_API_KEY", "unused")
        yield


@pytest.fixture(scope="module")
def served(tiny_chat_gguf: Path) -> Iterator[str]:
    """The tiny chat model (float32 weights, the default model's vocabulary) served in float32."""
    with llamaherd_server(str(tiny_chat_gguf), "--dtype", "float32", "--ctx-size", str(CONTEXT),
                          "--max-seqs", "8", threads=1) as s:
        yield s.url


def task_manager(tmp_path: Path) -> Any:
    """A TaskManager that knows the tiny task: a YAML file naming the local JSON data."""
    from lm_eval.tasks import TaskManager

    task = {"task": TASK, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(DATA)}},
            "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}", "target_delimiter": " ",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    folder = tmp_path / "tasks"
    folder.mkdir(parents=True)
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(task))
    return TaskManager(include_path=str(folder))


def evaluate(model: str, model_args: dict[str, Any], tmp_path: Path) -> tuple[float, list]:
    """(accuracy, per question: the log-likelihood of each answer), from lm-eval's samples."""
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK],
                                  batch_size=4, log_samples=True, bootstrap_iters=0,
                                  task_manager=task_manager(tmp_path))
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return (out["results"][TASK]["acc,none"],
            [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples])


@pytest.fixture(scope="module")
def hf_backend(tiny_chat_gguf: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[float, list]:
    """lm-eval's `hf` backend on the same weights, converted to a Hugging Face directory."""
    tmp = tmp_path_factory.mktemp("hf")
    hf_dir = convert(tiny_chat_gguf, tmp / "model", "hf")
    return evaluate("hf", {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"}, tmp)


# token ids (lm-eval tokenizes with the server's /tokenize), or texts that the server tokenizes
@pytest.mark.parametrize("tokenized", [True, False], ids=["token ids", "texts"])
def test_local_completions_matches_the_hf_backend(served: str, hf_backend: tuple[float, list],
                                                  tokenized: bool, tmp_path: Path) -> None:
    served_args = {"base_url": served + "/v1/completions", "model": "tiny-chat",
                   "tokenizer_backend": "remote", "tokenized_requests": tokenized,
                   "max_length": CONTEXT, "max_retries": 1}
    acc, ours = evaluate("local-completions", served_args, tmp_path)
    hf_acc, theirs = hf_backend
    assert len(ours) == len(theirs) == 8
    for question, (a, b) in enumerate(zip(ours, theirs)):
        assert len(a) == len(b), question
        for x, y in zip(a, b):
            assert abs(x - y) < 1e-3, (question, a, b)
    assert acc == hf_acc
