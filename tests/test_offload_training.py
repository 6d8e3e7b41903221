"""Training with offloaded tables equals resident training bit for bit, and never writes the
checkpoint it was loaded from."""

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from engram_hf.optim import build_optimizer
from engram_hf.optim.rowwise import optimizer_state_bytes_per_row

from conftest import corpus_blocks, cpu_training_args, tiny_model

TIERS = [dict(engram_offload="cpu"), dict(engram_offload="disk"), dict(engram_offload="disk", engram_cache_rows=64)]
TIER_IDS = ["cpu", "disk", "disk-cache"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-offload")
    tiny_model().save_pretrained(path)
    return path


def _digest(path):
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(path.glob("*.safetensors")))).hexdigest()


def _table(model, layer):
    engram = model.engram_layers()[layer]
    if engram.offloaded:
        return engram.table.store.rows.read_range(0, engram.num_table_rows).clone()
    return engram.table.weight.detach().clone()


def _assert_same_dense(a, b):
    """Every parameter both models have (an offloaded table is no parameter) is bit-identical."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    common = pa.keys() & pb.keys()
    assert len(common) >= len(pb) - 2 and common
    for name in sorted(common):
        assert torch.equal(pa[name], pb[name]), name


def _train(model, opt, steps, accumulate=1):
    blocks = corpus_blocks()
    losses = []
    for step in range(steps):
        opt.zero_grad()
        total = 0.0
        for micro in range(accumulate):
            ids = torch.stack([blocks[(step * accumulate + micro) * 2 + j]["input_ids"] for j in range(2)])
            loss = model(ids, labels=ids).loss
            (loss / accumulate).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        losses.append(total)
    return losses


@pytest.mark.parametrize("mode", ["adagrad", pytest.param("adam", marks=pytest.mark.slow)])
@pytest.mark.parametrize("tier", TIERS, ids=TIER_IDS)
def test_offloaded_training_equals_resident_bit_for_bit(ckpt, tmp_path, tier, mode):
    before = _digest(ckpt)
    resident = AutoModelForCausalLM.from_pretrained(ckpt).train()
    model = AutoModelForCausalLM.from_pretrained(ckpt, **tier).train()
    opt_r = build_optimizer(resident, lr=1e-2, table_optimizer=mode)
    opt_o = build_optimizer(model, lr=1e-2, table_optimizer=mode, offload_dir=tmp_path / "work")
    losses_r = _train(resident, opt_r, 4, accumulate=2)
    losses_o = _train(model, opt_o, 4, accumulate=2)
    assert losses_o == losses_r, "the loss curves differ"
    for layer in model.config.engram_layer_ids:
        assert torch.equal(_table(model, layer), _table(resident, layer)), f"layer {layer} table differs"
        assert not torch.equal(_table(model, layer), _table(AutoModelForCausalLM.from_pretrained(ckpt), layer))
    _assert_same_dense(resident, model)
    assert _digest(ckpt) == before, "training must never write the checkpoint it was loaded from"


def test_trained_offloaded_model_saves_and_reloads(ckpt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_offload="disk").train()
    opt = build_optimizer(model, lr=1e-2, offload_dir=tmp_path / "work")
    _train(model, opt, 2)
    model.save_pretrained(tmp_path / "saved")
    names = sorted(p.name for p in (tmp_path / "saved").glob("*.safetensors"))
    assert names == ["model-dense.safetensors", "model-engram-table-0.safetensors", "model-engram-table-1.safetensors"]
    resident = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", engram_offload="disk").eval()
    ids = torch.randint(2, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval()
        expected = model(ids).logits
        assert torch.equal(resident(ids).logits, expected)
        assert torch.equal(offloaded(ids).logits, expected)
    for layer in model.config.engram_layer_ids:
        assert torch.equal(_table(resident, layer), _table(model, layer))


def test_disk_training_needs_a_work_directory(ckpt):
    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_offload="disk")
    with pytest.raises(ValueError, match="pass a work directory"):
        build_optimizer(model, lr=1e-2)


def test_default_table_optimizer_state_is_small(ckpt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_offload="disk")
    opt = build_optimizer(model, lr=1e-2, offload_dir=tmp_path / "work")
    for engram in model.engram_layers().values():
        assert optimizer_state_bytes_per_row(opt, engram.table.grad_anchor) == 4.0  # row-wise Adagrad
    resident = tiny_model()
    opt = build_optimizer(resident, lr=1e-2)
    for engram in resident.engram_layers().values():
        assert optimizer_state_bytes_per_row(opt, engram.table.weight) == 4.0


def test_frozen_offloaded_tables_collect_no_gradients(ckpt):
    """Without a table optimizer (e.g. LoRA on the rest), an offloaded table is inference-only."""
    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_offload="cpu").train()
    ids = corpus_blocks()[0]["input_ids"][None]
    model(ids, labels=ids).loss.backward()
    assert all(not e.table.take_row_gradients() for e in model.engram_layers().values())


@pytest.mark.parametrize(
    "tier",
    [dict(), TIERS[0], pytest.param(TIERS[1], marks=pytest.mark.slow), pytest.param(TIERS[2], marks=pytest.mark.slow)],
    ids=["resident", *TIER_IDS],
)
def test_engram_trainer_resumes_exactly(ckpt, tmp_path, tier):
    from engram_hf.training import EngramTrainer

    blocks = corpus_blocks()

    def run(out, steps, resume=None, save_steps=None):
        path = resume or ckpt
        model = AutoModelForCausalLM.from_pretrained(path, **tier).train()
        args = cpu_training_args(
            out,
            steps,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_grad_norm=1.0,
            save_strategy="steps" if save_steps else "no",
            save_steps=save_steps or 500,
        )
        opt = build_optimizer(model, lr=args.learning_rate, offload_dir=out / "engram-work")
        trainer = EngramTrainer(model=model, args=args, train_dataset=blocks, optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        return trainer, model

    _, full = run(tmp_path / "full", 6)
    run(tmp_path / "part", 6, save_steps=3)
    checkpoint = tmp_path / "part" / "checkpoint-3"
    _, resumed = run(tmp_path / "part", 6, resume=checkpoint)
    for layer in full.config.engram_layer_ids:
        assert torch.equal(_table(resumed, layer), _table(full, layer)), layer
    _assert_same_dense(full, resumed)


def test_background_updates_equal_inline_updates(ckpt, tmp_path, monkeypatch):
    """With an accelerator, table updates run on the fetch worker and overlap the next forward; the
    rows every forward reads must still be the updated ones. Exercised on CPU by pretending the
    compute device needs transfers."""
    from engram_hf.offload import table as table_mod

    inline = AutoModelForCausalLM.from_pretrained(ckpt, engram_offload="disk").train()
    losses_inline = _train(inline, build_optimizer(inline, lr=1e-2, offload_dir=tmp_path / "a"), 3)
    monkeypatch.setattr(table_mod.OffloadedTable, "background_fetch", staticmethod(lambda device: True))
    background = AutoModelForCausalLM.from_pretrained(ckpt, engram_offload="disk").train()
    losses_background = _train(background, build_optimizer(background, lr=1e-2, offload_dir=tmp_path / "b"), 3)
    assert losses_background == losses_inline
    for layer in inline.config.engram_layer_ids:
        background.engram_layers()[layer].table.wait_updates()
        assert torch.equal(_table(background, layer), _table(inline, layer))


def test_new_checkpoint_with_streamed_tables_loads_on_every_tier(tmp_path):
    from engram_hf import EngramMoEForCausalLM
    from engram_hf.offload.create import save_new_checkpoint

    from conftest import tiny_config

    path = save_new_checkpoint(EngramMoEForCausalLM, tiny_config(), tmp_path / "new", seed=3)
    resident = AutoModelForCausalLM.from_pretrained(path).eval()
    std = resident.engram_layers()[0].table.weight.std().item()
    assert 0.015 < std < 0.025  # initializer_range 0.02, drawn block by block
    ids = torch.randint(2, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = resident(ids).logits
        for tier in ("cpu", "disk"):
            assert torch.equal(
                AutoModelForCausalLM.from_pretrained(path, engram_offload=tier).eval()(ids).logits, expected
            )


@pytest.mark.slow
def test_train_cli_with_disk_tables_and_resume(tmp_path):
    from engram_hf.cli import main

    (tmp_path / "a.txt").write_text(corpus_text := ("Shall I compare thee to a summer's day? " * 300))
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(tmp_path / "a.txt"),
        "--out",
        str(out),
        "--steps",
        "4",
        "--block-size",
        "32",
        "--batch-size",
        "4",
        "--vocab-size",
        "300",
        "--engram-offload",
        "disk",
        "--engram-cache-rows",
        "64",
        "--save-steps",
        "2",
        "--set",
        "hc_mult=1",
    ]
    assert main(args) == 0
    assert not (out / "engram-work").exists() and not (out / "initial").exists()
    assert (out / "checkpoints" / "checkpoint-2" / "model.safetensors.index.json").exists()
    assert main(args + ["--resume", str(out / "checkpoints" / "checkpoint-2")]) == 0
    model = AutoModelForCausalLM.from_pretrained(out / "model", engram_offload="disk")
    assert len(corpus_text) and model.engram_table_parameters() > 0


def test_offloaded_tables_train_under_bf16_autocast(ckpt, tmp_path):
    from engram_hf.training import EngramTrainer

    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_offload="cpu").train()
    before = _table(model, 0)
    args = cpu_training_args(tmp_path, 2, per_device_train_batch_size=4, bf16=True)
    opt = build_optimizer(model, lr=1e-2)
    EngramTrainer(model=model, args=args, train_dataset=corpus_blocks(), optimizers=(opt, None)).train()
    after = _table(model, 0)
    assert after.dtype == torch.float32 and not torch.equal(after, before)
