"""``engram-hf prepare-data --from-hub``: fetch the official sets once, on a machine that can reach
the Hugging Face hub, and write them in the data directory's layout (see ``data.py``).

The fetching (``HubSource``, through ``datasets``) and the writing (``write_*``) are separate: the
writers take any object with ``HubSource``'s methods, so they are tested with a local fake source.
What is written goes through the same validation and atomic import as ``--from-dir``.

Sources (dataset ids on the hub):

* MMLU: ``cais/mmlu`` (config ``all``), splits ``test`` and ``dev``.
* BBH: ``lukaemon/bbh``, one config per task, split ``test``.
* MATH: ``EleutherAI/hendrycks_math``, one config per subject, split ``test``; MATH500:
  ``HuggingFaceH4/MATH-500``.
* RULER: ``baber/paul_graham_essays`` (the haystack lm-eval's RULER used), ``rajpurkar/squad_v2``
  (validation), ``hotpotqa/hotpot_qa`` (config ``distractor``, validation), converted back to the
  official JSON files' structure.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from . import data

MATH_CONFIGS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


class HubSource:
    """The official sets, read from the hub with ``datasets`` (cached by ``datasets`` as usual)."""

    def _load(self, path: str, name: str | None, split: str):
        import datasets

        return datasets.load_dataset(path, name, split=split)

    def mmlu(self, split: str) -> Iterable[dict]:
        """Rows ``{question, subject, choices, answer (int)}`` of one split of all subjects."""
        return self._load("cais/mmlu", "all", split)

    def bbh(self, task: str) -> Iterable[dict]:
        return self._load("lukaemon/bbh", task, "test")

    def math(self) -> Iterable[dict]:
        for config in MATH_CONFIGS:
            yield from self._load("EleutherAI/hendrycks_math", config, "test")

    def math500(self) -> Iterable[dict]:
        return self._load("HuggingFaceH4/MATH-500", None, "test")

    def essays(self) -> Iterable[dict]:
        return self._load("baber/paul_graham_essays", None, "train")

    def squad(self) -> Iterable[dict]:
        """Rows ``{title, context, question, answers: {text: [...]}}``; no answer texts = impossible."""
        return self._load("rajpurkar/squad_v2", None, "validation")

    def hotpotqa(self) -> Iterable[dict]:
        """Rows ``{_id|id, question, answer, context: {title: [...], sentences: [[...]]}}``."""
        return self._load("hotpotqa/hotpot_qa", "distractor", "validation")


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def _mmlu_row(row: dict) -> dict:
    choices = list(row["choices"])
    if len(choices) != 4 or not 0 <= int(row["answer"]) < 4:
        raise ValueError(f"Unexpected MMLU row from the hub: {row}")
    return {
        "question": row["question"],
        **{f"answer_{k}": c for k, c in zip("abcd", choices)},
        "correct_answer": "ABCD"[int(row["answer"])],
        "topic": row["subject"].replace("_", " "),
    }


def write_mmlu(source, root: Path) -> None:
    _write_jsonl(root / data.MMLU_TEST, map(_mmlu_row, source.mmlu("test")))
    _write_jsonl(root / data.MMLU_DEV, map(_mmlu_row, source.mmlu("dev")))


def write_bbh(source, root: Path) -> None:
    for task in data.BBH_TASKS:
        examples = [{"input": r["input"], "target": r["target"]} for r in source.bbh(task)]
        _write_json(root / data.bbh_file(task), {"examples": examples})


def write_math(source, root: Path) -> None:
    keep = ("problem", "solution", "type", "level")
    _write_jsonl(root / data.MATH_TEST, ({k: r[k] for k in keep} for r in source.math()))
    keep500 = ("problem", "solution", "answer", "subject", "level", "unique_id")
    _write_jsonl(root / data.MATH500, ({k: r[k] for k in keep500 if k in r} for r in source.math500()))


def squad_json(rows: Iterable[dict]) -> dict:
    """Rows of ``rajpurkar/squad_v2`` back in the official file's structure (articles, paragraphs, qas)."""
    articles: dict[str, dict[str, list]] = {}
    for r in rows:
        paragraphs = articles.setdefault(r["title"], {})
        texts = list(r["answers"]["text"])
        paragraphs.setdefault(r["context"], []).append(
            {
                "id": r.get("id"),
                "question": r["question"],
                "answers": [{"text": t} for t in texts],
                "is_impossible": not texts,
            }
        )
    return {
        "version": "v2.0",
        "data": [
            {"title": title, "paragraphs": [{"context": c, "qas": qas} for c, qas in paragraphs.items()]}
            for title, paragraphs in articles.items()
        ],
    }


def hotpotqa_json(rows: Iterable[dict]) -> list[dict]:
    """Rows of ``hotpotqa/hotpot_qa`` back in the official file's structure (context as [title, sentences])."""
    out = []
    for r in rows:
        ctx = r["context"]
        out.append(
            {
                "_id": r.get("_id", r.get("id")),
                "question": r["question"],
                "answer": r["answer"],
                "context": [[t, list(s)] for t, s in zip(ctx["title"], ctx["sentences"])],
            }
        )
    return out


def write_ruler(source, root: Path) -> None:
    _write_jsonl(root / data.RULER_ESSAYS, ({"text": r["text"]} for r in source.essays()))
    _write_json(root / data.SQUAD, squad_json(source.squad()))
    _write_json(root / data.HOTPOTQA, hotpotqa_json(source.hotpotqa()))


WRITERS = {"mmlu": write_mmlu, "bbh": write_bbh, "math": write_math, "ruler": write_ruler}


def prepare_from_hub(
    data_dir: str | os.PathLike | None = None, benchmarks=None, source=None, progress: bool = True
) -> dict:
    """Fetch ``benchmarks`` (default: all) from ``source`` (default: the hub) into a scratch folder in
    the data directory's layout, then validate and import it like ``prepare_from_dir``."""
    from tqdm.auto import tqdm

    # Fact-recall questions are the user's own (or the quickstart's): no hub dataset holds them.
    benchmarks = data.check_benchmarks(benchmarks or tuple(WRITERS))
    if missing := [b for b in benchmarks if b not in WRITERS]:
        raise ValueError(
            f"{missing} cannot be fetched from the hub: write your questions to {data.FACTS} in the data directory "
            "(or import them with prepare-data --from-dir DIR)."
        )
    source = HubSource() if source is None else source
    root, _ = data.resolve_data_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".hub-") as tmp:
        for benchmark in tqdm(benchmarks, desc="fetching", disable=not progress):
            WRITERS[benchmark](source, Path(tmp))
        return data.prepare_from_dir(tmp, root, benchmarks, progress=progress)
