"""MMLU from the data directory: lm-eval's default MMLU prompt (the original paper's), 0-shot or 5-shot.

5-shot takes the first five questions of each subject's dev split (lm-eval's ``first_n`` sampler, as
the original evaluation). Without ``mmlu/dev.jsonl`` the 5-shot tasks fall back, loudly, to holding
out the first five *test* questions of each subject as the exemplars and scoring the rest: no
question is both an exemplar and scored, but the scored set is 285 questions smaller than the
official one, so such scores are not comparable to published 5-shot MMLU. The fallback is logged,
stamped on every document (``fewshot_source``) and named in ``engram-hf eval``'s report.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from . import data

SHOTS = 5
FALLBACK_NOTE = (
    "no mmlu/dev.jsonl: each subject's first 5 test questions are its 5-shot exemplars and are not "
    "scored (285 fewer questions than official 5-shot MMLU; not comparable to published numbers)"
)
log = logging.getLogger(__name__)
_warned: set[str] = set()


@lru_cache(maxsize=4)
def _questions(path: str, _mtime: int) -> dict[str, list[dict]]:
    return data.mmlu_questions(Path(path))


def questions(relpath: str, task: str, data_dir=None) -> dict[str, list[dict]]:
    path = data.require(relpath, task, data_dir)
    return _questions(str(path.resolve()), path.stat().st_mtime_ns)


def splits(subject: str, shots: int = 0, data_dir=None, task: str | None = None) -> dict[str, list[dict]]:
    """The test docs of ``subject`` and, for few-shot, its exemplars (``dev``)."""
    if subject not in data.MMLU_SUBJECTS:
        raise ValueError(f"Unknown MMLU subject {subject!r}.")
    task = task or f"offline_mmlu_{subject}"
    test = questions(data.MMLU_TEST, task, data_dir)[subject]
    if shots == 0:
        return {"test": test}
    if data.has_data(data.MMLU_DEV, data_dir):
        dev = questions(data.MMLU_DEV, task, data_dir)[subject][:shots]
        return {"test": test, "dev": [dict(d, fewshot_source="dev") for d in dev]}
    if str(data.resolve_data_dir(data_dir)[0]) not in _warned:  # once per data directory, not per subject
        _warned.add(str(data.resolve_data_dir(data_dir)[0]))
        log.warning("offline_mmlu_5shot: %s.", FALLBACK_NOTE)
    if len(test) <= shots:
        raise ValueError(f"{task}: {len(test)} test questions are too few to hold out {shots} exemplars.")
    return {
        "test": [dict(d, fewshot_source="held-out test questions") for d in test[shots:]],
        "dev": [dict(d, fewshot_source="held-out test questions") for d in test[:shots]],
    }


def dataset(subject: str, shots: int = 0, task: str | None = None, data_dir=None, **_metadata):
    """lm-eval ``custom_dataset`` entry: ``{split: datasets.Dataset}``."""
    import datasets

    return {k: datasets.Dataset.from_list(v) for k, v in splits(subject, shots, data_dir, task).items()}
