"""Fact recall as a cloze multiple choice (``offline_facts``): for each prompt, which of its candidate
continuations the model finds likeliest. The data is yours (or the quickstart's fact world), one
JSON object per line in ``facts/test.jsonl`` of the evaluation data directory::

    {"prompt": "The capital of Veldria is", "choices": [" Oskar", " Ternel", " Myra"], "answer": 1}

Choices are continuations, their leading space included; ``answer`` is the index of the true one.
Masking Engram (``engram-hf eval --compare-mask``) shows how much of the recall lives in the memory.
"""

from __future__ import annotations

from pathlib import Path

from . import data

FIELDS = ("prompt", "choices", "answer")


def questions(path: Path) -> list[dict]:
    """The rows of a facts file, checked: a string prompt, two or more string choices, a valid answer."""
    rows = data.read_jsonl(path, FIELDS)
    for n, row in enumerate(rows, 1):
        choices, answer = row["choices"], row["answer"]
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"{path}: row {n} has no prompt text.")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{path}: row {n} needs 'choices', a list of two or more non-empty strings.")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{path}: row {n} has answer {answer!r}; it must index 'choices' (0..{len(choices) - 1}).")
    return [{k: row[k] for k in FIELDS} for row in rows]


def dataset(task: str = "offline_facts", data_dir=None, **_metadata):
    """lm-eval ``custom_dataset`` entry."""
    import datasets

    return {"test": datasets.Dataset.from_list(questions(data.require(data.FACTS, task, data_dir)))}
