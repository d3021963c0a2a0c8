"""The loss curve of a run, drawn from its metrics.jsonl into a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics: Path, png: Path) -> Path | None:
    """Training loss by step, with the validation losses as points; None if nothing was logged."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()
            if line.strip()] if metrics.exists() else []
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss", lw=1)
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean NLL per trained token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
