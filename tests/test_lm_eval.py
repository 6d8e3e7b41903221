"""lm-eval (HFLM) runs EngramMoE, resident and with disk-offloaded tables, with identical results
that equal an independent computation of each choice's log-likelihood."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from conftest import GPT2_DIR, need_shared, tiny_model  # noqa: E402

QUESTIONS = [
    ("The capital of France is", ["Paris", "Rome", "Berlin", "Madrid"], 0),
    ("Two plus two equals", ["three", "four", "five", "six"], 1),
    ("The colour of the sky is", ["green", "red", "blue", "black"], 2),
    ("Shakespeare wrote", ["Hamlet", "Faust", "Ulysses", "Dracula"], 0),
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS))
    (d / "engram_tiny_mc.yaml").write_text(
        "task: engram_tiny_mc\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return d


def _evaluate(model, tokenizer, task_dir):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["engram_tiny_mc"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
    )
    samples = sorted(out["samples"]["engram_tiny_mc"], key=lambda s: s["doc_id"])
    return out["results"]["engram_tiny_mc"]["acc,none"], [s["resps"] for s in samples]


@torch.no_grad()
def _direct_loglikelihoods(model, tok, question, choice):
    """log P(" choice" | question), summed over the choice's tokens, by one plain forward."""
    ctx = tok(question)["input_ids"]
    cont = tok(question + " " + choice)["input_ids"][len(ctx) :]
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_lm_eval_resident_and_disk_offloaded_agree(task_dir, tmp_path, monkeypatch):
    need_shared(GPT2_DIR, "The GPT-2 tokenizer")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GPT2_DIR))
    tiny_model(
        vocab_size=len(tok), pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id
    ).save_pretrained(tmp_path / "m")
    resident = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", engram_offload="disk", engram_cache_rows=256
    ).eval()
    acc_r, resps_r = _evaluate(resident, tok, task_dir)
    acc_o, resps_o = _evaluate(offloaded, tok, task_dir)

    # lm-eval's numbers equal a direct computation: each choice's log-likelihood, then the argmax.
    expected = [[_direct_loglikelihoods(resident, tok, q, c) for c in choices] for q, choices, _ in QUESTIONS]
    got = [[r[0][0] for r in doc] for doc in resps_r]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=1e-5)
    picks = [max(range(4), key=lambda i, ll=ll: ll[i]) for ll in expected]
    assert acc_r == sum(p == a for p, (_, _, a) in zip(picks, QUESTIONS)) / len(QUESTIONS)

    assert acc_o == acc_r and resps_o == resps_r
    assert all(s["synchronous_lookups"] > 0 for s in offloaded.engram_offload_stats().values())
