"""The evaluation data directory, its imports, and the task suite's files."""

import filecmp
import json

import pytest

from conftest import EVAL_DATA, REPO, need_shared


def test_data_dir_is_chosen_by_argument_then_environment_then_default(monkeypatch, tmp_path):
    from engram_hf.evaluation.data import DATA_ENV, resolve_data_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_data_dir()[0] == tmp_path / "cache" / "engram-hf" / "eval"
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert resolve_data_dir()[0] == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg")[0] == tmp_path / "arg"


def test_missing_data_fails_at_once_saying_how_to_get_it(tmp_path, capsys):
    from engram_hf.cli import main
    from engram_hf.evaluation import bbh, mmlu
    from engram_hf.evaluation.data import MissingEvalData

    with pytest.raises(MissingEvalData) as e:
        mmlu.dataset("anatomy", task="offline_mmlu_anatomy", data_dir=tmp_path)
    message = str(e.value)
    assert "offline_mmlu_anatomy needs mmlu/test.jsonl" in message and str(tmp_path) in message
    assert "prepare-data --from-dir" in message and "--from-hub --benchmarks mmlu" in message
    with pytest.raises(MissingEvalData, match="bbh/navigate.json"):
        bbh.dataset("navigate", data_dir=tmp_path)
    # The CLI checks before loading anything (the checkpoint need not even exist): one line, rc 1.
    assert main(["eval", str(tmp_path / "no-model"), "--tasks", "bbh", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "offline_bbh_cot_fewshot_boolean_expressions needs bbh/boolean_expressions.json" in err[0]


def test_eval_cli_rejects_what_it_cannot_honour(tmp_path, capsys):
    from engram_hf.cli import main

    need_shared(EVAL_DATA, "The evaluation data")
    base = ["eval", str(tmp_path), "--data-dir", str(EVAL_DATA), "--tasks"]
    cases = {
        ("mmlu", "--num-fewshot", "5"): "use offline_mmlu_5shot",
        ("bbh", "--num-fewshot", "4"): "has 3 few-shot exemplar(s)",
        ("humaneval",): "--confirm-run-unsafe-code",
        ("ruler",): "needs ruler/squad_dev_v2.0.json",
        ("niah_single_1", "--max-seq-lengths", "3000"): "powers of two",
        ("mmlu", "--engram-mask", "--compare-mask"): "drop --engram-mask",
        ("mmlu", "--engram-cache-rows", "8"): "add --engram-offload",
    }
    for args, expected in cases.items():
        assert main([*base, *args]) == 1, args
        assert expected in capsys.readouterr().err, args


@pytest.mark.slow  # indexing lm-eval's own tasks to know a name is unknown takes ~10 s
def test_eval_cli_rejects_unknown_tasks_before_loading(tmp_path, capsys):
    from engram_hf.cli import main

    pytest.importorskip("lm_eval")
    assert main(["eval", str(tmp_path), "--tasks", "mmlu", "no_such_task"]) == 1
    assert "Unknown task(s) ['no_such_task']" in capsys.readouterr().err


def test_mmlu_stray_rows_are_excluded():
    from engram_hf.evaluation.data import MMLU_SUBJECTS, mmlu_questions

    path = need_shared(EVAL_DATA / "mmlu" / "test.jsonl", "MMLU")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    strays = [r for r in lines if r["correct_answer"] == "answer"]
    assert len(lines) == 14_044 and len(strays) == 2  # the known export: two header rows mid-file
    questions = mmlu_questions(path)
    assert set(questions) == set(MMLU_SUBJECTS)
    assert sum(map(len, questions.values())) == 14_042
    assert len(questions["elementary_mathematics"]) == 378 and len(questions["college_mathematics"]) == 100
    assert not any(q["question"] == "question" for qs in questions.values() for q in qs)


def test_mmlu_rejects_a_bad_answer_key(tmp_path):
    from engram_hf.evaluation.data import mmlu_questions

    row = dict(question="q", answer_a="a", answer_b="b", answer_c="c", answer_d="d", topic="anatomy")
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(dict(row, correct_answer=k)) for k in ("A", "E")))
    with pytest.raises(ValueError, match="row 2 has correct_answer 'E'"):
        mmlu_questions(path)


def test_mmlu_5shot_uses_dev_when_present_and_a_stated_holdout_otherwise(tmp_path, caplog):
    from engram_hf.evaluation import mmlu

    need_shared(EVAL_DATA / "mmlu" / "test.jsonl", "MMLU")
    mmlu._warned.clear()  # the fallback is announced once per data directory
    held = mmlu.splits("anatomy", 5, EVAL_DATA)
    assert "first 5 test questions" in caplog.text
    full = mmlu.splits("anatomy", 0, EVAL_DATA)["test"]
    assert [q["question"] for q in held["dev"]] == [q["question"] for q in full[:5]]
    assert [q["question"] for q in held["test"]] == [q["question"] for q in full[5:]]
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "test.jsonl").symlink_to(EVAL_DATA / "mmlu" / "test.jsonl")
    row = dict(answer_a="a", answer_b="b", answer_c="c", answer_d="d", correct_answer="B", topic="anatomy")
    rows = [dict(row, question=f"dev {i}") for i in range(6)]
    (tmp_path / "mmlu" / "dev.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with_dev = mmlu.splits("anatomy", 5, tmp_path)
    assert len(with_dev["test"]) == len(full) and [d["question"] for d in with_dev["dev"]] == [
        f"dev {i}" for i in range(5)
    ]
    assert [d["answer"] for d in with_dev["dev"]] == [1] * 5


def test_prepare_from_dir_validates_then_imports_atomically(tmp_path):
    from engram_hf.evaluation.data import prepare_from_dir

    need_shared(EVAL_DATA, "The evaluation data")
    target = tmp_path / "data"
    plan = prepare_from_dir(EVAL_DATA, target, progress=False)
    assert set(plan) == {"mmlu", "bbh", "math"}  # gsm8k is no benchmark of the suite; no ruler/ there
    assert plan["mmlu"]["mmlu/test.jsonl"] == "14,042 questions in 57 subjects"
    assert filecmp.cmp(EVAL_DATA / "mmlu" / "test.jsonl", target / "mmlu" / "test.jsonl", shallow=False)
    assert (target / "bbh" / "navigate.json").exists() and (target / "math" / "math500.jsonl").exists()

    # A broken source is refused before anything is written; a good partial import keeps other files.
    (target / "mmlu" / "dev.jsonl").write_text("kept\n")
    bad = tmp_path / "bad"
    (bad / "mmlu").mkdir(parents=True)
    (bad / "mmlu" / "test.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="lacks the field"):
        prepare_from_dir(bad, target, progress=False)
    assert filecmp.cmp(EVAL_DATA / "mmlu" / "test.jsonl", target / "mmlu" / "test.jsonl", shallow=False)
    prepare_from_dir(EVAL_DATA, target, ["mmlu"], progress=False)
    assert (target / "mmlu" / "dev.jsonl").read_text() == "kept\n"
    with pytest.raises(FileNotFoundError, match="no ruler/ folder"):
        prepare_from_dir(EVAL_DATA, target, ["ruler"], progress=False)


class FakeHub:
    """Stands in for the hub: a few rows in each official set's schema."""

    def mmlu(self, split):
        from engram_hf.evaluation.data import MMLU_SUBJECTS

        n = 5 if split == "dev" else 1
        return [
            {"question": f"{s} {split} {i}?", "subject": s, "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for s in MMLU_SUBJECTS
            for i in range(n)
        ]

    def bbh(self, task):
        return [{"input": f"{task} question", "target": "(A)"}]

    def math(self):
        return [{"problem": "1+1?", "solution": "$\\boxed{2}$", "type": "Algebra", "level": "Level 1", "extra": 0}]

    def math500(self):
        return [{"problem": "1+1?", "solution": "$\\boxed{2}$", "answer": "2", "subject": "Algebra", "level": 1}]

    def essays(self):
        return [{"text": "An essay."}, {"text": "Another."}]

    def squad(self):
        return [
            {
                "id": "1",
                "title": "T",
                "context": "C1",
                "question": "Q1",
                "answers": {"text": ["a"], "answer_start": [0]},
            },
            {"id": "2", "title": "T", "context": "C1", "question": "Q2", "answers": {"text": [], "answer_start": []}},
            {"id": "3", "title": "U", "context": "C2", "question": "Q3", "answers": {"text": ["b", "b"]}},
        ]

    def hotpotqa(self):
        ctx = {"title": ["A", "B"], "sentences": [["a1 ", "a2"], ["b1"]]}
        return [{"id": "h1", "question": "Q?", "answer": "yes", "context": ctx}]


def test_prepare_from_hub_writes_the_layout(tmp_path):
    from engram_hf.evaluation import data, ruler
    from engram_hf.evaluation.hub import prepare_from_hub

    with pytest.raises(ValueError, match="cannot be fetched from the hub"):
        prepare_from_hub(tmp_path, ["facts"], source=FakeHub(), progress=False)
    plan = prepare_from_hub(tmp_path, source=FakeHub(), progress=False)
    assert set(plan) == {"mmlu", "bbh", "math", "ruler"}
    q = data.mmlu_questions(tmp_path / data.MMLU_TEST)
    assert len(q) == 57 and q["high_school_us_history"][0]["answer"] == 0
    first = json.loads((tmp_path / data.MMLU_TEST).read_text().splitlines()[0])
    assert first["topic"] == "abstract algebra" and first["correct_answer"] == "A" and first["answer_d"] == "z"
    assert len(data.mmlu_questions(tmp_path / data.MMLU_DEV)["anatomy"]) == 5
    assert data.bbh_examples(tmp_path / data.bbh_file("navigate")) == [{"input": "navigate question", "target": "(A)"}]
    assert json.loads((tmp_path / data.MATH_TEST).read_text()) == {
        "problem": "1+1?",
        "solution": "$\\boxed{2}$",
        "type": "Algebra",
        "level": "Level 1",
    }
    qas, docs = ruler.read_squad(tmp_path / data.SQUAD)
    assert docs == ["C1", "C2"] and [q["outputs"] for q in qas] == [["a"], ["b", "b"]]
    qas, docs = ruler.read_hotpotqa(tmp_path / data.HOTPOTQA)
    assert docs == ["A\na1 a2", "B\nb1"] and qas[0]["outputs"] == ["yes"] and qas[0]["context"] == [0, 1]
    assert ruler.essay_text(tmp_path) == ("An essay. Another.", "paul_graham_essays")
    assert not list(tmp_path.glob(".hub-*")), "the scratch folder is removed"


def test_committed_tasks_equal_a_fresh_generation():
    from engram_hf.evaluation.suite import TASKS_DIR, read_bbh_prompts, task_files

    prompts = read_bbh_prompts(need_shared(EVAL_DATA / "bbh" / "cot-prompts", "The official BBH cot-prompts"))
    expected = task_files(prompts)
    on_disk = {
        str(p.relative_to(TASKS_DIR)): p.read_text(encoding="utf-8")
        for p in TASKS_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert on_disk.keys() == expected.keys()
    stale = [k for k in expected if on_disk[k] != expected[k]]
    assert not stale, f"regenerate with python -m engram_hf.evaluation.suite: {stale[:5]}"


def test_eval_tasks_at_the_repo_root_is_the_packaged_suite():
    from engram_hf.evaluation import TASKS_DIR

    assert (REPO / "eval_tasks").resolve() == TASKS_DIR


def test_lm_eval_indexes_every_task_and_group_of_the_suite():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from engram_hf.evaluation.suite import TASKS_DIR, catalog

    entries = catalog()
    leaves = [n for n, e in entries.items() if not e.members]
    assert len(leaves) == 57 * 2 + 27 * 2 + 1 + 8 + 13 + 1  # ... RULER, offline_facts
    groups = {n: e for n, e in entries.items() if e.members}
    assert len(groups["offline_mmlu"].members) == 57 and len(groups["offline_ruler"].members) == 13
    assert len(groups["offline_bbh"].members) == 27 and len(groups["offline_minerva_math"].members) == 7
    indexed = set(TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks)
    assert set(entries) <= indexed
