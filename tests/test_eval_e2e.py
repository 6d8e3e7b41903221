"""engram-hf eval end to end: every benchmark through lm-eval on a tiny checkpoint, Engram masked and
not, resident and offloaded, batching, the CLI, the model card, and plain `lm_eval --model hf`."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import EVAL_DATA, REPO, float_tolerance, need_shared, save_tiny_checkpoint  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("eval") / "tiny")


def _run(ckpt, tasks, tmp_path, **kw):
    from engram_hf.evaluation.runner import EvalSpec, run_eval

    need_shared(EVAL_DATA, "The evaluation data (MMLU, BBH, MATH)")
    kw.setdefault("limit", 2)
    kw.setdefault("gen_kwargs", "max_gen_toks=6")
    spec = EvalSpec(
        model=str(ckpt),
        tasks=tasks,
        data_dir=str(EVAL_DATA),
        out=str(tmp_path / "out"),
        log_samples=True,
        device="cpu",
        **kw,
    )
    return run_eval(spec, progress=lambda line: None)


def _loglikelihoods(out, task):
    return [[float(r[0][0]) for r in s["resps"]] for s in out["samples"][task]]


@pytest.mark.slow
def test_each_benchmark_runs_end_to_end(ckpt, tmp_path):
    tasks = [
        "offline_mmlu_anatomy",
        "offline_mmlu_5shot_anatomy",
        "offline_bbh_cot_fewshot_navigate",
        "offline_bbh_fewshot_sports_understanding",
        "offline_humaneval",
        "offline_minerva_math500",
        "offline_niah_single_1",
        "offline_niah_single_2",
        "offline_ruler_vt",
        "offline_ruler_cwe",
        "offline_ruler_fwe",
    ]
    result = _run(
        ckpt, tasks, tmp_path, confirm_run_unsafe_code=True, max_seq_lengths=[1024], ruler_samples=2, batch_size=4
    )
    out = result["outputs"][False]
    expected = {
        "offline_mmlu_anatomy": ["acc,none"],
        "offline_mmlu_5shot_anatomy": ["acc,none"],
        "offline_bbh_cot_fewshot_navigate": ["exact_match,get-answer"],
        "offline_bbh_fewshot_sports_understanding": ["exact_match,get-answer"],
        "offline_humaneval": ["pass@1,none"],
        "offline_minerva_math500": ["exact_match,none", "math_verify,none"],
        **{t: ["score,none", "1024,none"] for t in tasks if "niah" in t or "ruler" in t},
    }
    for task, metrics in expected.items():
        for metric in metrics:
            value = out["results"][task][metric]
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (task, metric, value)
        assert out["n-samples"][task]["effective"] == 2, task
    # The prompts are the benchmarks': 5 MMLU exemplars, 3 BBH chains, 4 Minerva solutions, RULER needles.
    prompt = lambda task: out["samples"][task][0]["arguments"][0][0]  # noqa: E731
    assert prompt("offline_mmlu_5shot_anatomy").count("\nAnswer:") == 6
    assert prompt("offline_mmlu_anatomy").count("\nAnswer:") == 1
    assert prompt("offline_bbh_cot_fewshot_navigate").count("Let's think step by step.") == 4
    assert prompt("offline_bbh_fewshot_sports_understanding").count("\nA:") == 4
    assert prompt("offline_minerva_math500").count("Problem:") == 5
    doc = out["samples"]["offline_niah_single_2"][0]["doc"]
    assert all(answer in doc["input"] for answer in doc["outputs"]) and doc["max_length"] == 1024
    # The generation filter really extracted answers: each filtered response is a short string.
    for s in out["samples"]["offline_bbh_cot_fewshot_navigate"]:
        assert s["filtered_resps"][0] == "[invalid]" or "answer is" not in s["filtered_resps"][0]
    assert (tmp_path / "out" / "results.json").exists() and (tmp_path / "out" / "results.md").exists()


def test_masked_and_unmasked_differ_and_retained_is_their_ratio(ckpt, tmp_path):
    result = _run(ckpt, ["offline_mmlu_anatomy"], tmp_path, compare_mask=True, limit=4)
    on, off = result["outputs"][False], result["outputs"][True]
    for task in ("offline_mmlu_anatomy",):
        assert _loglikelihoods(on, task) != _loglikelihoods(off, task)
        a, m = on["results"][task]["acc,none"], off["results"][task]["acc,none"]
        kept = result["info"]["retained"][task]["acc"]
        assert kept == (None if a == 0 else pytest.approx(m / a))
    assert (tmp_path / "out" / "results_masked.json").exists()
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| Engram | Engram masked | retained |" in md


def test_resident_and_disk_offloaded_give_identical_scores(ckpt, tmp_path):
    tasks = ["offline_mmlu_anatomy", "offline_bbh_fewshot_navigate"]
    resident = _run(ckpt, tasks, tmp_path / "r", limit=3)["outputs"][False]
    disk = _run(ckpt, tasks, tmp_path / "d", limit=3, engram_offload="disk", engram_cache_rows=64)
    offloaded = disk["outputs"][False]
    for task in tasks:
        assert [s["resps"] for s in offloaded["samples"][task]] == [s["resps"] for s in resident["samples"][task]]
        assert offloaded["results"][task] == resident["results"][task]
    assert disk["info"]["engram_offload_stats"], "the offloaded run did not read offloaded tables"


def test_one_forward_per_loglikelihood_batch_and_batching_changes_nothing(ckpt):
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from engram_hf.evaluation import TASKS_DIR
    from engram_hf.evaluation.lm import EngramLM

    need_shared(EVAL_DATA, "The evaluation data (MMLU)")
    docs = 6

    def run(batch_size):
        lm = EngramLM(pretrained=str(ckpt), batch_size=batch_size, device="cpu")
        calls = []
        lm.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape if args else None))
        tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(EVAL_DATA)})
        out = lm_eval.simple_evaluate(
            model=lm, tasks=["offline_mmlu_anatomy"], limit=docs, task_manager=tm, log_samples=True
        )
        return out, calls

    batched, calls = run(4)
    single, calls1 = run(1)
    # With batch size 1 every row (HFLM sends a question's one-token answers as one row) is a forward;
    # with 4, the same rows go four at a time: one forward per batch.
    rows = len(calls1)
    assert docs <= rows <= 4 * docs
    assert len(calls) == math.ceil(rows / 4) and sum(c[0] for c in calls) == rows
    a = torch.tensor(_loglikelihoods(batched, "offline_mmlu_anatomy"))
    b = torch.tensor(_loglikelihoods(single, "offline_mmlu_anatomy"))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_unsafe_code_needs_confirmation_in_lm_eval_too(ckpt):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from engram_hf.evaluation import TASKS_DIR
    from engram_hf.evaluation.lm import EngramLM
    from engram_hf.evaluation.runner import EvalSpec, plan

    with pytest.raises(ValueError, match="--confirm-run-unsafe-code"):
        plan(EvalSpec(model=str(ckpt), tasks=["humaneval"]))
    lm = EngramLM(pretrained=str(ckpt), device="cpu")
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    with pytest.raises(ValueError, match="unsafe"):
        lm_eval.simple_evaluate(model=lm, tasks=["offline_humaneval"], limit=1, task_manager=tm)


def test_cli_eval_writes_results_and_updates_the_model_card(ckpt, tmp_path, capsys):
    from engram_hf.cli import main
    from engram_hf.evaluation.report import CARD_BEGIN

    need_shared(EVAL_DATA, "The evaluation data (MMLU)")
    card = ckpt / "README.md"
    card.write_text("---\nlicense: apache-2.0\n---\n\n# tiny\n\nHand-written notes.\n")
    args = ["eval", str(ckpt), "--tasks", "mmlu_anatomy", "--limit", "2", "--data-dir", str(EVAL_DATA)]
    args += ["--out", str(tmp_path / "cli"), "--update-card", "--device", "cpu"]
    assert main(args) == 0
    assert main([*args, "--engram-mask"]) == 0  # a second run replaces the section
    text = card.read_text()
    assert text.startswith("---\nlicense: apache-2.0\n---\n\n# tiny\n\nHand-written notes.\n")
    assert text.count(CARD_BEGIN) == 1 and "Engram masked" in text and "offline_mmlu_anatomy" in text
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert results["engram_hf"]["engram_mask"] is True
    row = f"| offline_mmlu_anatomy | acc | {results['results']['offline_mmlu_anatomy']['acc,none']:.4f} |"
    assert row in (tmp_path / "cli" / "results.md").read_text() and row in text
    assert "engram-hf eval: [1/1] evaluating with Engram masked" in capsys.readouterr().out


@pytest.mark.slow
def test_plain_lm_eval_hf_on_a_saved_checkpoint(ckpt, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --include_path eval_tasks`
    from the repository root, in a fresh offline process, scores as the in-process run does."""
    need_shared(EVAL_DATA, "The evaluation data (MMLU)")
    env = dict(os.environ, **OFFLINE, ENGRAM_HF_EVAL_DATA=str(EVAL_DATA))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args"]
    cmd += [f"pretrained={ckpt},trust_remote_code=True", "--include_path", "eval_tasks"]
    cmd += ["--tasks", "offline_mmlu_anatomy", "--limit", "4", "--device", "cpu", "--output_path", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = list((tmp_path / "o").rglob("results_*.json"))
    acc = json.loads(path.read_text())["results"]["offline_mmlu_anatomy"]["acc,none"]
    ours = _run(ckpt, ["offline_mmlu_anatomy"], tmp_path, limit=4)["outputs"][False]
    assert acc == ours["results"]["offline_mmlu_anatomy"]["acc,none"]


def test_ruler_longer_than_the_model_is_refused(ckpt, tmp_path):
    from engram_hf.evaluation.runner import EvalSpec, run_eval

    spec = EvalSpec(model=str(ckpt), tasks=["niah_single_1"], max_seq_lengths=[8192], out=str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="RULER length 8192 exceeds the model's maximum sequence length 4096"):
        run_eval(spec, progress=lambda line: None)


@pytest.mark.slow
def test_python_m_engram_hf_evaluation_is_lm_evals_cli_with_the_engram_model(ckpt, tmp_path):
    need_shared(EVAL_DATA, "The evaluation data (MMLU)")
    env = dict(os.environ, **OFFLINE, ENGRAM_HF_EVAL_DATA=str(EVAL_DATA))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    results = {}
    for masked in ("False", "True"):
        cmd = [sys.executable, "-m", "engram_hf.evaluation", "--model", "engram", "--model_args"]
        cmd += [f"pretrained={ckpt},engram_mask={masked},engram_offload=disk", "--tasks", "offline_mmlu_anatomy"]
        cmd += ["--limit", "3", "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / masked)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (path,) = list((tmp_path / masked).rglob("samples_offline_mmlu_anatomy_*.jsonl"))
        lines = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
        results[masked] = [s["resps"] for s in lines]
    assert results["False"] != results["True"]
    ours = _run(ckpt, ["offline_mmlu_anatomy"], tmp_path, limit=3, engram_mask=True)["outputs"][True]
    in_process = [s["resps"] for s in sorted(ours["samples"]["offline_mmlu_anatomy"], key=lambda s: s["doc_id"])]
    # lm-eval writes each (log-likelihood, is-greedy) pair as strings. The two runs may batch the
    # requests differently (so the experts' matmuls group and round differently): greedy flags must
    # agree exactly, log-likelihoods to float32 rounding of a sum over the vocabulary.
    cli = [[(float(r[0][0]), r[0][1]) for r in doc] for doc in results["True"]]
    ours = [[(float(r[0][0]), str(r[0][1])) for r in doc] for doc in in_process]
    assert [[g for _, g in doc] for doc in cli] == [[g for _, g in doc] for doc in ours]
    torch.testing.assert_close(
        torch.tensor([[v for v, _ in doc] for doc in cli]),
        torch.tensor([[v for v, _ in doc] for doc in ours]),
        **float_tolerance(torch.float32, reduction=384, scale=12.0),
    )


def test_eval_refuses_bad_numbers_and_outputs_it_did_not_write(ckpt, tmp_path, capsys):
    from engram_hf.cli import main

    need_shared(EVAL_DATA, "The evaluation data (MMLU)")
    base = ["eval", str(ckpt), "--tasks", "mmlu_anatomy", "--limit", "1", "--data-dir", str(EVAL_DATA)]
    base += ["--device", "cpu"]

    def refused(extra, message):
        assert main([*base, *extra]) == 1, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)

    new = ["--out", str(tmp_path / "new")]
    refused(["--num-fewshot", "-3", *new], "--num-fewshot must be an integer >= 0, got -3")
    refused(["--batch-size", "0", *new], "--batch-size must be a positive integer or 'auto', got 0")
    refused(["--batch-size", "many", *new], "--batch-size must be a positive integer or 'auto', got 'many'")
    refused(["--ruler-samples", "-1", *new], "--ruler-samples must be a positive integer")
    assert not (tmp_path / "new").exists()

    from engram_hf.utils import claim_output_dir

    afile = tmp_path / "afile"
    afile.write_text("mine")
    refused(["--out", str(afile)], "is a file, and engram-hf eval writes a directory")
    refused(["--out", str(afile), "--overwrite"], "is a file")
    refused(["--out", str(ckpt)], "which engram-hf eval reads")
    other = tmp_path / "other"
    claim_output_dir(other, "eval", source=str(tmp_path / "elsewhere" / "model")).write(
        lambda tmp: (tmp / "results.md").write_text("their results")
    )
    refused(["--out", str(other)], f"holds the output of engram-hf eval for {tmp_path / 'elsewhere' / 'model'}")
    assert afile.read_text() == "mine" and (other / "results.md").read_text() == "their results"


def test_default_eval_output_names_the_checkpoints_folder_too(tmp_path):
    from engram_hf.evaluation.runner import EvalSpec, default_out

    ham, demo = (EvalSpec(model=str(tmp_path / run / "model"), tasks=["mmlu"]) for run in ("ham", "demo"))
    assert default_out(ham) == default_out(EvalSpec(model=str(tmp_path / "ham" / "model") + "/", tasks=[]))
    assert default_out(ham).parts[:2] == ("runs", "eval") and default_out(ham).name == "ham-model"
    assert default_out(ham) != default_out(demo)
    assert default_out(EvalSpec(model="org/name", tasks=[])).name == "org-name"
