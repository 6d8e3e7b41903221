"""Markdown tables of lm-eval results (one run, or Engram on vs masked) and the model-card section."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..utils import atomic_write_file

CARD_BEGIN = "<!-- engram-hf eval: begin -->"
CARD_END = "<!-- engram-hf eval: end -->"


@dataclass
class Row:
    task: str
    metric: str  # "acc" or "exact_match (get-answer)"
    value: float
    stderr: float | None
    higher_is_better: bool | None


def _number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def rows(out: dict, tasks: list[str] | None = None) -> list[Row]:
    """One row per (task or group, metric, filter) of an lm-eval output, in lm-eval's order;
    only ``tasks`` (and not their subtasks) when given."""
    results = out.get("results", {})
    names = [t for t in tasks if t in results] if tasks is not None else _hierarchy(out)
    out_rows = []
    for task in names:
        hib = out.get("higher_is_better", {}).get(task, {})
        for key, value in results[task].items():
            if key == "alias" or "," not in key or "_stderr," in key:
                continue
            value = _number(value)
            if value is None:
                continue
            metric, filt = key.split(",", 1)
            stderr = _number(results[task].get(f"{metric}_stderr,{filt}"))
            label = metric if filt == "none" else f"{metric} ({filt})"
            out_rows.append(Row(task, label, value, stderr, hib.get(metric)))
    return out_rows


def _hierarchy(out: dict) -> list[str]:
    """Every task of an lm-eval output, each group followed by its members (depth first)."""
    results, children = out.get("results", {}), out.get("group_subtasks", {})
    members = {c for cs in children.values() for c in cs}
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            order.append(name)
            for child in children.get(name, []):
                visit(child)

    for name in [n for n in results if n not in members]:
        visit(name)
    return [n for n in order if n in results] + [n for n in results if n not in order]


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def retained(engram: float, masked: float) -> float | None:
    """The share of the score kept with Engram masked (the paper's functional-sensitivity view)."""
    return None if engram == 0 else masked / engram


def table(out: dict, tasks: list[str] | None = None) -> str:
    lines = ["| task | metric | value | ± stderr |", "|---|---|---:|---:|"]
    for r in rows(out, tasks):
        lines.append(f"| {r.task} | {r.metric} | {_fmt(r.value)} | {_fmt(r.stderr)} |")
    return "\n".join(lines)


def compare_table(engram: dict, masked: dict, tasks: list[str] | None = None) -> str:
    masked_rows = {(r.task, r.metric): r for r in rows(masked, tasks)}
    lines = [
        "| task | metric | Engram | Engram masked | retained |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows(engram, tasks):
        m = masked_rows.get((r.task, r.metric))
        kept = retained(r.value, m.value) if m is not None else None
        lines.append(
            f"| {r.task} | {r.metric} | {_fmt(r.value)} | {_fmt(m.value if m else None)} | "
            f"{'—' if kept is None else f'{kept:.1%}'} |"
        )
    return "\n".join(lines)


def retained_by_task(engram: dict, masked: dict, tasks: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    masked_rows = {(r.task, r.metric): r for r in rows(masked, tasks)}
    out: dict[str, dict[str, float | None]] = {}
    for r in rows(engram, tasks):
        m = masked_rows.get((r.task, r.metric))
        out.setdefault(r.task, {})[r.metric] = retained(r.value, m.value) if m is not None else None
    return out


def plot_compare(engram: dict, masked: dict, tasks: list[str], path, title: str = "") -> Path | None:
    """A bar chart of each task's score with Engram on and masked, and the share retained (PNG,
    atomically); None when there is nothing to plot."""
    masked_rows = {(r.task, r.metric): r for r in rows(masked, tasks)}
    pairs = [(r, masked_rows.get((r.task, r.metric))) for r in rows(engram, tasks)]
    pairs = [(r, m) for r, m in pairs if m is not None]
    if not pairs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.task.removeprefix("offline_") + ("" if r.metric == "acc" else f"\n{r.metric}") for r, _ in pairs]
    x = range(len(pairs))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(pairs) + 1.5), 3.6))
    on = ax.bar([i - 0.2 for i in x], [r.value for r, _ in pairs], 0.4, label="Engram on", color="#d95f02")
    ax.bar([i + 0.2 for i in x], [m.value for _, m in pairs], 0.4, label="Engram masked", color="#7570b3")
    for i, (r, m) in enumerate(pairs):
        kept = retained(r.value, m.value)
        if kept is not None:
            ax.annotate(f"{kept:.0%} kept", (i, max(r.value, m.value)), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(0, max(1.0, max(r.value for r, _ in pairs) * 1.15))
    ax.set_title(title or "Scores with Engram on and masked", fontsize=10)
    ax.legend(fontsize=8, handles=[on, ax.containers[1]])
    fig.tight_layout()
    out = atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return out


def card_section(body: str) -> str:
    return f"{CARD_BEGIN}\n{body.strip()}\n{CARD_END}\n"


def update_card(model_dir: str | Path, body: str) -> Path:
    """Put ``body`` into the checkpoint's model card (``README.md``) between the engram-hf eval markers,
    replacing an earlier section and keeping everything else; atomically."""
    path = Path(model_dir) / "README.md"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir} is not a local checkpoint directory; --update-card needs one.")
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    section = card_section(body)
    pattern = re.compile(re.escape(CARD_BEGIN) + r".*?" + re.escape(CARD_END) + r"\n?", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: section, old, count=1)
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + ("\n" if old else "") + section
    return atomic_write_file(path, lambda tmp: tmp.write_text(new, encoding="utf-8"))
