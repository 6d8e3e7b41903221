"""Plots people look at instead of reading logs."""

from __future__ import annotations

from pathlib import Path

from ..utils import atomic_write_file


def with_held_out(log_history: list[dict], before: float | None, after: float | None, step: int) -> list[dict]:
    """A Trainer log history with the held-out loss measured before (step 0) and after (``step``)
    training, where the history lacks them (short runs evaluate only then)."""
    if before is None:
        return log_history
    evals = [h["step"] for h in log_history if "eval_loss" in h]
    tail = [{"step": step, "eval_loss": after}] if after is not None and step not in evals else []
    return [{"step": 0, "eval_loss": before}, *log_history, *tail]


def plot_loss_curve(log_history: list[dict], path: str | Path, title: str = "training loss") -> Path | None:
    """Write a PNG of ``loss`` (and ``eval_loss`` if logged) against step from a Trainer log history.

    Returns the path, or None if matplotlib is not installed (``pip install engram-hf[train]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        raise ValueError("The log history holds no 'loss' or 'eval_loss' entries to plot.")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out
