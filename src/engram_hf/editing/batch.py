"""Many edits from a file: CounterFact-like request files, a run of sequential (or batched) edits scored
as they accumulate, and its report (``report.md``, a PNG of the curves, the raw JSON).

A request file is JSON lines, one request each, either flat::

    {"prompt": "The capital of {} is", "subject": "Zorbania", "target": " Vlaith", "true_target": " Kezou",
     "relation": "capital", "paraphrases": [...], "locality": [...],
     "eval_paraphrases": ["Zorbania is governed from"], "neighbours": [["The capital of Kelania is", " Brou"]]}

(``paraphrases`` and ``locality`` are optimised, as in ``EditRequest``; ``eval_paraphrases`` and
``neighbours`` are only scored), or a CounterFact record (``requested_rewrite`` with ``prompt``,
``subject``, ``target_new.str``, ``target_true.str``, ``relation_id``; ``paraphrase_prompts`` and
``neighborhood_prompts`` scored, the neighbours against ``target_true``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..utils import iter_jsonl_records
from .editor import EditRequest, EngramEditor
from .evaluate import ScoreCase, counterfact_scores
from .patch import EngramPatch
from .rows import EditInputError


@dataclass
class EditCase:
    """A request and what it is scored on (held-out paraphrases, neighbours), as read from a file."""

    request: EditRequest
    eval_paraphrases: list[str] = field(default_factory=list)
    neighbours: list[tuple[str, str]] = field(default_factory=list)

    def score_case(self) -> ScoreCase:
        r = self.request
        groups = {"held_out": list(self.eval_paraphrases)} if self.eval_paraphrases else {}
        return ScoreCase(r.prompt, r.target, r.true_target, groups, list(self.neighbours))


def _spaced(s) -> str:
    if not isinstance(s, str):
        raise EditInputError(f"expected a string, got {s!r}")
    return s if s[:1].isspace() else " " + s


def _counterfact(x: dict) -> EditCase:
    rw = x["requested_rewrite"]
    try:
        subject, true = rw["subject"], _spaced(rw["target_true"]["str"])
        request = EditRequest(
            rw["prompt"],
            _spaced(rw["target_new"]["str"]),
            true_target=true,
            subject=subject,
            relation=rw.get("relation_id"),
        )
    except (KeyError, TypeError) as e:
        raise EditInputError(f"a CounterFact record's requested_rewrite lacks {e}") from None
    fill = lambda p: p.replace("{}", subject)
    return EditCase(
        request,
        [fill(p) for p in x.get("paraphrase_prompts", [])],
        [(fill(p), true) for p in x.get("neighborhood_prompts", [])],
    )


def _flat(x: dict) -> EditCase:
    x = dict(x)
    held = x.pop("eval_paraphrases", []) or []
    neigh = x.pop("neighbours", []) or []
    request = EditRequest.coerce(x)
    if not isinstance(held, list) or not all(isinstance(p, str) for p in held):
        raise EditInputError("'eval_paraphrases' must be a list of prompts")
    pairs = []
    for n in neigh:
        if not (isinstance(n, (list, tuple)) and len(n) == 2 and all(isinstance(t, str) for t in n)):
            raise EditInputError(f"each neighbour is a [prompt, true answer] pair, got {n!r}")
        pairs.append((n[0].replace("{}", request.subject or "{}"), n[1]))
    held = [p.replace("{}", request.subject) if request.subject else p for p in held]
    return EditCase(request, held, pairs)


def load_requests(path: str | os.PathLike) -> list[EditCase]:
    """Read a request file (see the module docstring); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No request file {path}.")
    cases = []
    for n, x in iter_jsonl_records(path, EditInputError):
        try:
            cases.append(_counterfact(x) if "requested_rewrite" in x else _flat(x))
        except EditInputError as e:
            raise EditInputError(f"{path}:{n}: {e}") from None
    if not cases:
        raise EditInputError(f"{path} holds no requests.")
    return cases


def checkpoints_for(n: int, points: int) -> list[int]:
    """About ``points`` edit counts from 1 to ``n``, roughly evenly spaced, always including both ends."""
    if points <= 1 or n <= 1:
        return [n]
    return sorted({1, n} | {max(1, round(n * i / (points - 1))) for i in range(1, points - 1)})


def run_edits(
    editor: EngramEditor,
    cases: list[EditCase],
    batch_size: int = 1,
    checkpoints: list[int] | None = None,
    progress: bool = True,
) -> dict:
    """Apply ``cases`` with ``editor.edit_many`` and score all edits made so far (``counterfact_scores``)
    whenever a batch ends at or past a checkpoint. Returns ``{"curve": [points], "results": [...]}``
    (the ``EditResult`` of every batch; their patches are in ``editor.history``)."""
    requests = [c.request for c in cases]
    checkpoints = sorted(set(checkpoints or [len(cases)]))
    curve, pending = [], list(checkpoints)
    seconds = [0.0]
    last = [time.perf_counter()]

    def score(done: int, result) -> None:
        now = time.perf_counter()
        seconds[0] += now - last[0]
        if pending and done >= pending[0]:
            while pending and done >= pending[0]:
                pending.pop(0)
            point = {"edits": done, "edit_seconds": seconds[0]}
            point.update(counterfact_scores(editor.model, editor.tokenizer, [c.score_case() for c in cases[:done]]))
            curve.append(point)
        last[0] = time.perf_counter()

    results = editor.edit_many(requests, batch_size=batch_size, callback=score, progress=progress)
    return {"curve": curve, "results": results, "edit_seconds": seconds[0]}


# ---------------------------------------------------------------------------- plots and reports
PANELS = [
    ("efficacy", "efficacy: p(new) > p(true), %"),
    ("generalisation", "generalisation (held-out paraphrases), %"),
    ("specificity", "specificity (neighbours keep p(true) > p(new)), %"),
]


def plot_curves(curves: dict[str, list[dict]], panels: list[tuple[str, str]], path, title: str, cols: int = 3):
    """One panel per metric, one line per method, against the number of edits; a PNG at ``path``
    (written atomically). Methods named ``unedited`` are drawn dotted grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_write_file

    panels = [(k, t) for k, t in panels if any(p.get(k) is not None for c in curves.values() for p in c)]
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.7 * cols, 3.8 * rows), dpi=110, squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        for name, curve in curves.items():
            pts = [(p["edits"], p[key]) for p in curve if p.get(key) is not None]
            style = dict(color="grey", ls=":") if name == "unedited" else dict(marker="o", ms=3)
            ax.plot([x for x, _ in pts], [y for _, y in pts], label=name, **style)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def write_report(out: Path, run: dict, title: str, settings: dict, stacked: EngramPatch | None) -> list[Path]:
    """``report.md``, ``metrics.png`` and ``results.json`` in ``out`` (each written atomically)."""
    from ..utils import atomic_write_file

    curve, results = run["curve"], run["results"]
    final = curve[-1] if curve else {}
    requests = [r for res in results for r in res.requests]
    failed = [r for r in requests if not r.success]
    lines = [
        f"# {title}",
        "",
        f"{len(requests)} requests in {len(results)} edit(s) of up to {settings.get('batch_size', 1)}, "
        f"{run['edit_seconds']:.1f} s of editing ({run['edit_seconds'] / max(1, len(requests)):.2f} s per request); "
        f"{sum(r.converged for r in requests)} converged, {sum(r.widened for r in requests)} needed the prompt's "
        f"last-position rows, {len(failed)} do not give their target greedily.",
        "",
        "![metrics](metrics.png)",
        "",
        "Scores over all edits made so far (CounterFact's definitions, %):",
        "",
        "| edits | efficacy | greedy | generalisation | specificity | neighbours greedy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in curve:
        lines.append(
            f"| {p['edits']} | {_fmt(p['efficacy'])} | {_fmt(p['efficacy_top1'])} | {_fmt(p['generalisation'])} | "
            f"{_fmt(p['specificity'])} | {_fmt(p['specificity_top1'])} |"
        )
    if stacked is not None:
        lines += ["", f"Rows changed: {stacked.changed_rows} of {stacked.num_rows} rows written, over all edits."]
    if "exact" in run:
        e = run["exact"]
        lines += [
            "",
            f"Locality on {e['texts']} texts: {e['untouched_positions']} of {e['positions']} positions read no edited "
            f"row (nor does any earlier position of their text); {e['untouched_bit_identical']} of them have "
            "bit-identical logits before and after all edits.",
        ]
    if failed:
        lines += ["", "Requests whose target is not the greedy continuation after the edits:", ""]
        lines += [f"- {r.prompt!r} -> {r.target!r}: greedy {r.greedy_after!r}" for r in failed[:50]]
    lines += ["", "Settings: `" + json.dumps(settings) + "`", ""]
    written = []
    written.append(atomic_write_file(out / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines), "utf-8")))
    if curve:
        panels = PANELS + [("efficacy_top1", "target is the greedy continuation, %")]
        plot_curves({"rows": curve}, panels, out / "metrics.png", title, cols=2)
        written.append(out / "metrics.png")
    raw = {
        "settings": settings,
        "final": final,
        "curve": curve,
        "edit_seconds": run["edit_seconds"],
        "exact": run.get("exact"),
        "requests": [asdict(r) for r in requests],
    }
    text = json.dumps(raw, indent=2, default=str)
    written.append(atomic_write_file(out / "results.json", lambda tmp: Path(tmp).write_text(text, "utf-8")))
    return written
