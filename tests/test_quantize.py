"""FP8 copies of checkpoints and adapters (``engram-hf quantize``): the error reported is the error
made, the copy addresses the same rows, and FP8 tables refuse training with the reason."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from engram_hf import EngramMoEForCausalLM, attach_engram, load_engram, save_engram
from engram_hf.cli import main as cli_main
from engram_hf.ops.fp8_rows import naive as fp8
from engram_hf.optim import build_optimizer
from engram_hf.quantize import quantize_checkpoint
from engram_hf.utils import OutputExistsError

from conftest import random_ids, tiny_causal_lm, tiny_compression, tiny_model, tiny_spec, wake_engram

FP8_ABLE = dict(engram_n_embed_per_ngram=64)  # rows of 32: one scale per row


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "ckpt"
    model = tiny_model(**FP8_ABLE)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text("{}")
    return path, model


def test_quantized_checkpoint_holds_the_encoded_rows_and_reports_their_error(ckpt, tmp_path):
    path, model = ckpt
    report = quantize_checkpoint(path, tmp_path / "fp8", progress=False)
    q = EngramMoEForCausalLM.from_pretrained(tmp_path / "fp8").eval()
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["engram_table_format"] == "fp8"
    assert (tmp_path / "fp8" / "tokenizer.json").read_text() == "{}", "other files come along"
    assert q.engram_fingerprint() == model.engram_fingerprint(), "the same rows, addressed the same way"
    for layer, engram in model.engram_layers().items():
        w = engram.table.weight.detach()
        served = q.engram_layers()[layer].read_rows(torch.arange(w.shape[0]))
        assert torch.equal(served, fp8.decode(fp8.encode(w), torch.float32)), "exactly the encoder's rows"
        err = served - w
        r = report["tables"][layer]
        assert r["relative_rms_error"] == pytest.approx(float(err.norm() / w.norm()), rel=1e-5)
        assert r["max_abs_error"] == pytest.approx(float(err.abs().max()), rel=1e-6)
        assert r["bytes_after"] * 4 * 32 == r["bytes_before"] * 33  # 33 bytes per 32 float32 values
    ids = random_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, model(ids).logits, rtol=0.05, atol=0.05)
    with pytest.raises(RuntimeError, match="FP8 Engram tables cannot be trained"):
        build_optimizer(q, lr=1e-3)
    build_optimizer(q, lr=1e-3, train_tables=False)  # everything else trains


def test_quantize_refuses_what_it_cannot_do(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(OutputExistsError, match="engram-hf quantize reads"):
        quantize_checkpoint(path, path / "inside", progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        quantize_checkpoint(path, tmp_path / "taken", progress=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    quantize_checkpoint(path, tmp_path / "once", progress=False)
    with pytest.raises(ValueError, match="already stores FP8 tables"):
        quantize_checkpoint(tmp_path / "once", tmp_path / "twice", progress=False)
    narrow = tmp_path / "narrow"
    tiny_model().save_pretrained(narrow)  # rows of 8: no whole block of 32
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_checkpoint(narrow, tmp_path / "narrow-fp8", progress=False)
    assert not (tmp_path / "narrow-fp8").exists()


def test_cli_quantize(ckpt, tmp_path, capsys):
    path, _ = ckpt
    assert cli_main(["quantize", str(path), "--out", str(tmp_path / "q"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["tables"]) == {"0", "2"}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert cli_main(["quantize", str(path), "--out", str(tmp_path / "mine")]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_quantized_adapter_loads_on_its_base(tmp_path):
    base = tiny_causal_lm("qwen3")
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    attach_engram(model, tiny_spec(n_embed_per_ngram=64), compression_table=tiny_compression())
    wake_engram(model, seed=1)
    save_engram(model, tmp_path / "adapter")
    report = quantize_checkpoint(tmp_path / "adapter", tmp_path / "adapter-fp8", progress=False)
    assert set(report["tables"]) == {0, 2}
    for tier in (None, "disk"):
        other = load_engram(
            AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval(),
            tmp_path / "adapter-fp8",
            engram_offload=tier,
        )
        assert other.engram.adapter().spec.table_format == "fp8"
        assert other.engram.fingerprint() == model.engram.fingerprint()
        ids = random_ids(2, 7, vocab=101)
        with torch.no_grad():
            torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0.05, atol=0.05)
