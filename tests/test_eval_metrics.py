"""The benchmarks' scoring on known answers, and RULER's offline data generation."""

import json

import pytest

pytest.importorskip("lm_eval")

from conftest import EVAL_DATA, need_shared  # noqa: E402

# ----------------------------------------------------------------------------- BBH


@pytest.mark.parametrize(
    "generation, answer",
    [
        ("There are 3 steps... So the answer is (A).", "(A)"),
        ("Since (0, 9) is not (0, 0). So the answer is No.\n\nQ: next question", "No"),
        ("The answer is valid.", "valid"),
        ("So the answer is ] ] ).\nMore text", "] ] )"),
        ("So the answer is -12.", "-12"),
        ("So the answer is arson aspect census.", "arson aspect census"),
        ("so the answer is 24", "24"),
        ("I do not know", "[invalid]"),
    ],
)
def test_bbh_cot_answer_extraction(generation, answer):
    from engram_hf.evaluation.bbh import cot_answer, cot_filter

    assert cot_answer(generation) == answer
    assert cot_filter([[generation, "x"]], [{}]) == [[answer, "[invalid]"]]


@pytest.mark.parametrize(
    "generation, answer",
    [(" No\n\nQ: more", "No"), (" (B).", "(B)"), ("valid", "valid"), ("\n] ] >\n", "] ] >"), ("", "")],
)
def test_bbh_direct_answer_extraction(generation, answer):
    from engram_hf.evaluation.bbh import direct_answer

    assert direct_answer(generation) == answer


def test_bbh_exemplars_parse_like_lm_evals_own_generator():
    """Our parse of the official cot-prompts gives, for every task, the same description, questions
    and final answers as lm-eval's BBH YAMLs (written by lm-eval's own generator from the same files)."""
    import yaml
    from lm_eval.tasks import bbh as lm_bbh  # noqa: F401  (a namespace package: its folder holds the YAMLs)

    from engram_hf.evaluation.data import BBH_TASKS
    from engram_hf.evaluation.suite import read_bbh_prompts

    need_shared(EVAL_DATA / "bbh" / "cot-prompts", "The official BBH cot-prompts")
    ours = read_bbh_prompts(EVAL_DATA / "bbh" / "cot-prompts")
    folder = __import__("pathlib").Path(list(lm_bbh.__path__)[0]) / "fewshot"
    for task in BBH_TASKS:
        theirs = yaml.safe_load((folder / f"{task}.yaml").read_text())
        description, exemplars = ours[task]
        assert theirs["description"] == description + "\n\n", task
        samples = theirs["fewshot_config"]["samples"]
        assert [s["input"] for s in samples] == [e["input"] for e in exemplars], task
        assert [s["target"] for s in samples] == [e["answer"] for e in exemplars], task


# ----------------------------------------------------------------------------- HumanEval
def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    from engram_hf.evaluation.humaneval import problems, process_results

    ps = problems()
    assert len(ps) == 164 and ps[0]["task_id"] == "HumanEval/0"
    for p in ps[:8]:
        assert process_results(p, [p["canonical_solution"]]) == {"pass@1": 1.0}
        assert process_results(p, [""]) == {"pass@1": 0.0}
        assert process_results(p, ["    pass\n"]) == {"pass@1": 0.0}
    # pass@1 over several generations is the unbiased estimator: here 1 of 2 correct.
    assert process_results(ps[0], [ps[0]["canonical_solution"], ""]) == {"pass@1": 0.5}


@pytest.mark.slow
def test_humaneval_all_canonical_solutions_pass():
    from engram_hf.evaluation.humaneval import problems, process_results

    assert all(process_results(p, [p["canonical_solution"]])["pass@1"] == 1.0 for p in problems())


# ----------------------------------------------------------------------------- MATH
def _gold_scores(path, n):
    import datasets

    from engram_hf.evaluation import minerva

    rows = [json.loads(line) for line in open(path, encoding="utf-8")][:n]
    docs = minerva.process_docs(
        datasets.Dataset.from_list([{"problem": r["problem"], "solution": r["solution"]} for r in rows])
    )
    scores = []
    for row, doc in zip(rows, docs):
        # The gold answer as MATH500 states it (independent of our extraction from the solution).
        text = f"We compute it.\nFinal Answer: The final answer is ${row['answer']}$. I hope it is correct."
        scores.append(minerva.process_results(doc, [text]))
    return scores


def test_math_gold_answers_score_one_and_equivalent_forms_count():
    import datasets

    from engram_hf.evaluation import minerva

    path = need_shared(EVAL_DATA / "math" / "math500.jsonl", "MATH500")
    assert all(s == {"exact_match": 1, "math_verify": 1} for s in _gold_scores(path, 60))
    doc = minerva.process_docs(datasets.Dataset.from_list([{"problem": "p", "solution": "So $x=\\boxed{\\frac12}$."}]))[
        0
    ]
    answer = lambda a: [f"Final Answer: The final answer is ${a}$. I hope it is correct."]  # noqa: E731
    for equivalent in ("0.5", "\\frac12", "\\dfrac{1}{2}", "1/2"):
        assert minerva.process_results(doc, answer(equivalent))["math_verify"] == 1, equivalent
    assert minerva.process_results(doc, answer("0.5"))["exact_match"] == 1
    assert minerva.process_results(doc, answer("0.4")) == {"exact_match": 0, "math_verify": 0}


@pytest.mark.slow
def test_math500_all_gold_answers_score_one():
    path = need_shared(EVAL_DATA / "math" / "math500.jsonl", "MATH500")
    scores = _gold_scores(path, 500)
    assert len(scores) == 500 and all(s == {"exact_match": 1, "math_verify": 1} for s in scores)


def test_math_subject_tasks_split_the_full_set():
    from engram_hf.evaluation import minerva
    from engram_hf.evaluation.data import MATH_SUBJECTS

    need_shared(EVAL_DATA / "math" / "test.jsonl", "MATH")
    sizes = {s: len(minerva.rows(subject=s, data_dir=EVAL_DATA)) for s in MATH_SUBJECTS}
    assert sum(sizes.values()) == 5000 and min(sizes.values()) > 0
    assert len(minerva.rows(math500=True, data_dir=EVAL_DATA)) == 500
    assert minerva.fewshot_samples()[2]["solution"].count("\\\\\n") == 1  # the LaTeX line break is intact


# ----------------------------------------------------------------------------- RULER
@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from engram_hf.data import builtin_text
    from engram_hf.training.tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer([builtin_text()], 512).save_pretrained(path)
    return str(path)


@pytest.fixture
def no_downloads(monkeypatch):
    import nltk

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(nltk.data, "path", [])  # no punkt_tab anywhere


@pytest.mark.parametrize(
    "task", ["niah_single_1", "niah_single_3", "niah_multikey_2", "niah_multiquery", "vt", "cwe", "fwe"]
)
def test_ruler_samples_fit_hold_their_answers_and_are_reproducible(task, bpe_dir, tmp_path, no_downloads):
    from transformers import AutoTokenizer

    from engram_hf.evaluation import ruler

    md = {"tokenizer": bpe_dir, "max_seq_lengths": [1024], "ruler_samples": 3}
    first = ruler.samples(task, md, data_dir=tmp_path)
    again = ruler.samples(task, md, data_dir=tmp_path)
    other = ruler.samples(task, dict(md, ruler_seed=7), data_dir=tmp_path)
    assert first == again and first != other and len(first) == 3
    tok = AutoTokenizer.from_pretrained(bpe_dir)
    for s in first:
        assert s["max_length"] == 1024 and len(tok(s["input"]).input_ids) + ruler.MAX_GEN_TOKS[task] <= 1024
        assert s["length"] > 512, "the sample should fill most of its length"
        assert all(o in s["input"] for o in s["outputs"]) and s["gen_prefix"]
        full = " ".join(s["outputs"])
        assert ruler.process_results(s, [full]) == {"score": 1.0, "1024": 1.0}
        assert ruler.process_results(s, ["nothing"]) == {"score": 0.0, "1024": 0.0}


def test_ruler_with_a_limit_builds_only_the_samples_lm_eval_reads(bpe_dir, tmp_path, no_downloads):
    """``--limit N`` reads N documents of a task: RULER builds those N (shared out over the lengths, so
    each length is still scored), not ``ruler_samples`` (500 by default) per length."""
    from engram_hf.evaluation import ruler
    from engram_hf.evaluation.runner import EvalSpec, metadata

    md = {"tokenizer": bpe_dir, "max_seq_lengths": [512, 1024], "ruler_samples": 5}
    built = ruler.samples("niah_single_1", dict(md, ruler_limit=3), data_dir=tmp_path)
    assert [s["max_length"] for s in built] == [512, 512, 1024]
    assert built == [s for s in ruler.samples("niah_single_1", md, data_dir=tmp_path) if s in built]
    assert ruler.sample_counts({"ruler_limit": 2}) == {4096: 2}
    assert ruler.sample_counts({"max_seq_lengths": [512, 1024]}) == {512: 500, 1024: 500}
    assert ruler.sample_counts({"max_seq_lengths": [512, 1024], "ruler_limit": 1}) == {512: 1}
    spec = lambda limit: EvalSpec(model="m", tasks=["ruler"], limit=limit)  # noqa: E731
    assert metadata(spec(2.0))["ruler_limit"] == 2 and "ruler_limit" not in metadata(spec(0.5))


def test_ruler_scoring_on_known_strings():
    from engram_hf.evaluation import ruler

    doc = {"outputs": ["1234567", "7654321"], "max_length": 4096}
    assert ruler.process_results(doc, [" 1234567 and 7654321."]) == {"score": 1.0, "4096": 1.0}
    assert ruler.process_results(doc, ["\x00 1234567"]) == {"score": 0.5, "4096": 0.5}
    qa = {"outputs": ["Paris", "the city of Paris"], "max_length": 4096}
    assert ruler.process_results_part(qa, ["paris"]) == {"score": 1.0, "4096": 1.0}  # any accepted answer


def test_ruler_essay_haystack_falls_back_to_shipped_text_and_says_when_too_short(bpe_dir, tmp_path, no_downloads):
    from engram_hf.evaluation import ruler

    text, source = ruler.essay_text(tmp_path)
    assert "Shakespeare" in text[:200] and "differs from upstream" in source
    (tmp_path / "ruler").mkdir()
    (tmp_path / "ruler" / "essays.jsonl").write_text(json.dumps({"text": "An essay. " * 3000}) + "\n")
    assert ruler.essay_text(tmp_path) == (" ".join(["An essay. " * 3000]), "paul_graham_essays")
    with pytest.raises(ValueError, match="too short to fill"):
        ruler.samples("niah_single_2", {"tokenizer": bpe_dir, "max_seq_lengths": [65536], "ruler_samples": 1}, tmp_path)


def test_ruler_rejects_odd_lengths_and_missing_qa_data(tmp_path):
    from engram_hf.evaluation import ruler
    from engram_hf.evaluation.data import MissingEvalData

    with pytest.raises(ValueError, match="powers of two"):
        ruler.lengths_from({"max_seq_lengths": [3000]})
    with pytest.raises(MissingEvalData, match="ruler/squad_dev_v2.0.json.*prepare-data"):
        ruler.samples("qa_squad", {}, data_dir=tmp_path)


def test_ruler_qa_reads_the_official_files(bpe_dir, tmp_path):
    from engram_hf.evaluation import ruler

    squad = {
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": f"Paragraph {i} says the code is {1000 + i}.",
                        "qas": [
                            {
                                "question": f"What code does paragraph {i} give?",
                                "answers": [{"text": str(1000 + i)}],
                                "is_impossible": False,
                            },
                            {"question": "Unanswerable?", "answers": [], "is_impossible": True},
                        ],
                    }
                    for i in range(40)
                ],
            }
        ]
    }
    (tmp_path / "ruler").mkdir()
    (tmp_path / "ruler" / "squad_dev_v2.0.json").write_text(json.dumps(squad))
    out = ruler.samples("qa_squad", {"tokenizer": bpe_dir, "max_seq_lengths": [1024], "ruler_samples": 3}, tmp_path)
    assert len(out) == 3
    for i, s in enumerate(out):
        assert s["outputs"] == [str(1000 + i)] and f"says the code is {1000 + i}." in s["input"]
        assert s["input"].count("Document ") > 1 and s["gen_prefix"] == "Answer:"
