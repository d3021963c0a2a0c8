"""`llamaherd train sft|reward|dpo|distill`, `llamaherd score` and `llamaherd sample-best`: post-training from the command line
(the same under torchrun), every recipe with the same flags and output directory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from llamaherd.cli.common import friendly
from llamaherd.hub import DEFAULT_MODEL


@click.group()
def train() -> None:
    """Post-train a model: supervised fine-tuning, reward models, DPO, distillation (full or
    LoRA), on one process or under torchrun."""


def train_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The flags every recipe shares (each sets the TrainConfig field of its name)."""
    options = [
        click.option("--model", default=None,
                     help=f"Base model: a name, GGUF, HF or Meta directory "
                          f"(default {DEFAULT_MODEL})."),
        click.option("--data", default=None, help="Training JSONL."),
        click.option("--out", default=None, help="Output directory."),
        click.option("--config", "config_file", default=None,
                     help="TOML or JSON file with any TrainConfig setting; flags override it."),
        click.option("--val-data", default=None,
                     help="Validation JSONL (default: a share of --data)."),
        click.option("--lora/--full", default=None, help="LoRA adapters or every weight."),
        click.option("--lora-rank", type=int, default=None),
        click.option("--steps", type=int, default=None, help="Optimizer steps."),
        click.option("--epochs", type=float, default=None, help="Passes over the data (default 1)."),
        click.option("--lr", type=float, default=None,
                     help="Peak learning rate (2e-5; 2e-4 LoRA)."),
        click.option("--batch-size", type=int, default=None,
                     help="Examples (pairs) per optimizer step, across all processes (8)."),
        click.option("--grad-accum", type=int, default=None, help="Micro-steps per optimizer step."),
        click.option("--max-len", type=int, default=None,
                     help="Tokens per packed row (default 512)."),
        click.option("--share-prefix/--no-share-prefix", default=None,
                     help="Compute the examples' common untrained prefix once a packed row."),
        click.option("--micro-tokens", type=int, default=None,
                     help="Tokens per forward/backward pass (default 512): bounds activation "
                          "memory."),
        click.option("--precision", type=click.Choice(["auto", "float32", "bf16"]), default=None,
                     help="bf16 autocast, float32, or auto (bf16 where the CPU has it)."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None),
        click.option("--save-every", type=int, default=None, help="Steps between checkpoints."),
        click.option("--eval-every", type=int, default=None,
                     help="Steps between validation losses."),
        click.option("--seed", type=int, default=None),
        click.option("--threads", type=int, default=None, help="torch threads per process."),
        click.option("--resume", is_flag=True, default=None,
                     help="Continue from the newest checkpoint in --out."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return friendly(fn)


def run(recipe: str, config_file: str | None, flags: dict[str, Any]) -> None:
    from llamaherd.train import TrainConfig
    from llamaherd.train.recipes import RECIPES

    settings = {k: v for k, v in flags.items() if v is not None}
    config = (TrainConfig.from_file(config_file, **settings) if config_file
              else TrainConfig.make(**settings))
    if not config.data or not config.out:
        raise click.UsageError("--data and --out are required (or set in --config)")
    RECIPES[recipe](config)


@train.command()
@train_options
def sft(config_file: str | None, **flags: Any) -> None:
    """Supervised fine-tuning: loss on the assistant's turns (or completions), examples packed
    into rows. Data: messages, prompt/completion or text rows."""
    run("sft", config_file, flags)


@train.command()
@train_options
@click.option("--margin-scale", type=click.Choice(["large", "small", "none"]), default=None,
              help="Margins from a row's strength label: Llama 2's large (3/2/1/0) or small "
                   "scale, or none (Llama 3). A row's own margin is used as given.")
def reward(config_file: str | None, **flags: Any) -> None:
    """A reward model: a scalar head on the last token, trained with the ranking loss on
    preference pairs (prompt, chosen, rejected)."""
    run("reward", config_file, flags)


@train.command()
@train_options
@click.option("--beta", type=float, default=None, help="Pull toward the reference (0.1).")
@click.option("--nll", type=float, default=None,
              help="Weight of the chosen answer's NLL term (0.2, Llama 3's recipe; 0 for none).")
def dpo(config_file: str | None, **flags: Any) -> None:
    """Direct preference optimization on preference pairs (prompt, chosen, rejected), the
    starting model as the reference."""
    run("dpo", config_file, flags)


@train.command()
@train_options
@click.option("--teacher", default=None,
              help="The teacher: any model llamaherd loads, sharing the vocabulary (default: "
                   "--model itself).")
@click.option("--kd-ratio", type=float, default=None,
              help="Weight of the distillation term; the NLL term gets 1 minus it (0.5).")
@click.option("--kd-temperature", type=float, default=None,
              help="Softmax temperature of teacher and student (1.0).")
@click.option("--kd-top-k", type=int, default=None,
              help="Teacher logits cached at each position (32).")
@click.option("--prune-keep", type=int, default=None,
              help="Layers the student keeps: the first, the last, the rest evenly spaced "
                   "(default: all).")
def distill(config_file: str | None, **flags: Any) -> None:
    """Knowledge distillation: the model (optionally pruned) learns the teacher's top-k logits,
    computed once and cached in --out, mixed with the NLL. Data as for sft."""
    run("distill", config_file, flags)


@train.command()
@train_options
@click.option("--labels", default=None,
              help="Comma-separated class names, index order (benign,injection,jailbreak).")
@click.option("--prune-keep", type=int, default=None,
              help="Layers the classifier keeps: the first, the last, the rest evenly spaced "
                   "(default: all).")
def classify(config_file: str | None, labels: str | None, **flags: Any) -> None:
    """A text classifier: a class head on the last token (the reward model's architecture),
    trained with cross-entropy on {"text", "label"} rows. Prompt Guard's classes by default."""
    if labels is not None:
        flags["labels"] = tuple(name.strip() for name in labels.split(",") if name.strip())
    run("classify", config_file, flags)


def online_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The flags GRPO and PPO share (--data is a prompt JSONL there)."""
    options = [
        click.option("--verifier", default=None,
                     help="Judge answers with f(row, reply): a name (math) or module:function."),
        click.option("--reward-model", default=None,
                     help="... or with this reward model (llamaherd train reward)."),
        click.option("--group-size", type=int, default=None,
                     help="Answers sampled a prompt each step (8)."),
        click.option("--max-new-tokens", type=int, default=None,
                     help="The longest answer sampled (256)."),
        click.option("--temperature", type=float, default=None, help="Rollout temperature (1.0)."),
        click.option("--clip-epsilon", type=float, default=None, help="PPO clipping (0.2)."),
        click.option("--kl-coef", type=float, default=None,
                     help="Weight of KL(policy || starting model) (0.01; 0 for none)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@train.command()
@train_options
@online_options
def grpo(config_file: str | None, **flags: Any) -> None:
    """GRPO: group_size answers a prompt drawn by the engine, judged, each scored against its
    group; the engine refreshed from the policy after every step. --data: prompt rows."""
    run("grpo", config_file, flags)


@train.command()
@train_options
@online_options
@click.option("--value-coef", type=float, default=None, help="Weight of the value loss (0.1).")
@click.option("--gae-lambda", type=float, default=None, help="GAE's lambda (0.95).")
def ppo(config_file: str | None, **flags: Any) -> None:
    """PPO as Llama 2: a value head, per-token KL penalties with the judged reward at the end,
    GAE, clipped policy and value losses; rollouts from the engine. --data: prompt rows."""
    run("ppo", config_file, flags)


@train.command()
@train_options
@online_options
@click.option("--rounds", "n_rounds", type=int, default=2, show_default=True)
@click.option("-k", "k", type=int, default=8, show_default=True, help="Samples a prompt.")
@click.option("--dpo-lr", type=float, default=None, help="DPO's learning rate (default: --lr).")
@click.option("--beta", type=float, default=None, help="DPO's beta (0.1).")
def rounds(config_file: str | None, n_rounds: int, k: int, dpo_lr: float | None,
           **flags: Any) -> None:
    """Rounds of rejection sampling -> SFT on the kept answers -> DPO on best/worst pairs, each
    round's model sampling the next (Llama 3). --data: prompt rows; --val-data: held-out prompts
    scored each round."""
    from llamaherd.train import TrainConfig
    from llamaherd.train.recipes.rounds import run_rounds

    settings = {key: v for key, v in flags.items() if v is not None}
    config = (TrainConfig.from_file(config_file, **settings) if config_file
              else TrainConfig.make(**settings))
    if not config.data or not config.out:
        raise click.UsageError("--data and --out are required (or set in --config)")
    run_rounds(config, n_rounds, k, dpo_settings={"lr": dpo_lr} if dpo_lr else None)


@click.command()
@click.option("--model", required=True, help="A reward model directory (llamaherd train reward).")
@click.option("--data", required=True,
              help="JSONL: conversations (messages), prompt/completion rows, or preference rows "
                   "(both answers scored).")
@click.option("--safety-model", default=None,
              help="A second (safety) reward model: the reward becomes Llama 2's combination.")
@friendly
def score(model: str, data: str, safety_model: str | None) -> None:
    """Print one JSON line per row with its reward (preference rows: both rewards)."""
    import json

    from llamaherd.train.reward_model import RewardModel, score_rows

    models = [RewardModel.load(model)] + ([RewardModel.load(safety_model)] if safety_model
                                          else [])
    for line in score_rows(models, data):
        click.echo(json.dumps(line))


@click.command("sample-best")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="The model that draws the answers (a GGUF file runs on the packed kernels).")
@click.option("--data", required=True, help="Prompt JSONL: prompt (messages or a string) or "
                                            "messages, plus any fields a verifier reads.")
@click.option("--out", required=True, help="JSONL of the best answers (an SFT set).")
@click.option("-k", "k", type=int, default=8, show_default=True, help="Answers per prompt.")
@click.option("--reward-model", default=None, help="Judge with this reward model ...")
@click.option("--verifier", default=None,
              help="... or with this function of (row, reply): a name (math) or module:function.")
@click.option("--pairs", default=None,
              help="Also write preference pairs (best against worst) to this JSONL, for DPO.")
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Dequantize a GGUF's weights (default: keep them packed, the fastest).")
@friendly
def sample_best(model: str, data: str, out: str, k: int, reward_model: str | None,
                verifier: str | None, pairs: str | None, temperature: float, top_p: float,
                max_new_tokens: int, seed: int, dtype: str | None) -> None:
    """Rejection sampling: k answers per prompt, judged, the best kept. Prints a report."""
    import json

    import llamaherd
    from llamaherd.train import rejection

    if (reward_model is None) == (verifier is None):
        raise click.UsageError("give one of --reward-model and --verifier")
    judge = rejection.make_judge(verifier, reward_model)
    rows = rejection.read_prompt_rows(data)
    llm = llamaherd.load(model, dtype=dtype)
    _, report = rejection.sample_best(llm, rows, judge, k=k, out=out, pairs_out=pairs,
                                      temperature=temperature, top_p=top_p,
                                      max_new_tokens=max_new_tokens, seed=seed)
    click.echo(json.dumps(rejection.report_dict(report)))
