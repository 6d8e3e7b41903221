"""Saving and loading attached Engram: adapters apart from the base, merged checkpoints through
``AutoModelForCausalLM``, offloaded tables, and the one-call ``AutoEngramForCausalLM``."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as tf_logging

from engram_hf import AutoEngramForCausalLM, attach_engram, load_engram, save_engram
from engram_hf.attach import attachment_of
from engram_hf.offload.table import OffloadedTable

from conftest import REPO, random_ids, tiny_causal_lm, tiny_compression, tiny_spec, wake_engram


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A saved tiny base, and the same base with two woken Engram adapters attached."""
    base_dir = tmp_path_factory.mktemp("base")
    tiny_causal_lm("qwen3").save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    attach_engram(model, tiny_spec(), compression_table=tiny_compression())
    model.engram.add_adapter("second", tiny_spec(layer_ids=[1], seed=5))
    wake_engram(model, seed=1)
    wake_engram(model, seed=2, adapter="second")
    return base_dir, model


def fresh_base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


IDS = random_ids(2, 11, seed=9, vocab=101)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_adapter_round_trip(trained, tmp_path):
    base_dir, model = trained
    save_engram(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "engram.safetensors", "engram_config.json"]  # the card, the weights, the spec
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"
    meta = json.loads((tmp_path / "adapter" / "engram_config.json").read_text())
    assert meta["adapter_name"] == "default" and meta["spec"]["layer_ids"] == [0, 2]
    assert meta["base_model"]["model_type"] == "qwen3" and meta["base_model"]["vocab_rows"] == 101

    other = load_engram(fresh_base(base_dir), tmp_path / "adapter")
    assert other.engram.active_adapter == "default"
    assert other.engram.fingerprint() == model.engram.fingerprint("default")
    assert torch.equal(logits(other), logits(model))

    # A second adapter goes under its own name and becomes active.
    model.engram.save_adapter(tmp_path / "second", "second")
    load_engram(other, tmp_path / "second")
    model.engram.set_adapter("second")
    try:
        assert torch.equal(logits(other), logits(model))
    finally:
        model.engram.set_adapter("default")


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_adapter_with_offloaded_tables(trained, tmp_path, tier):
    base_dir, model = trained
    save_engram(model, tmp_path / "adapter")
    other = load_engram(fresh_base(base_dir), tmp_path / "adapter", engram_offload=tier, engram_cache_rows=16)
    assert all(isinstance(m.table, OffloadedTable) for m in other.engram.engram_layers().values())
    assert torch.equal(logits(other), logits(model))
    assert torch.equal(other.generate(IDS, max_new_tokens=5, do_sample=False), model.generate(IDS, max_new_tokens=5))
    stats = other.engram.offload_stats()
    assert set(stats) == {0, 2} and all(s["tier"] == tier and s["cache"]["capacity"] == 16 for s in stats.values())
    with pytest.raises(ValueError, match="offloaded tables"):
        save_engram(other, tmp_path / "again")


def test_adapter_for_another_base_is_refused(trained, tmp_path):
    _, model = trained
    save_engram(model, tmp_path / "adapter")
    wider = tiny_causal_lm("qwen3", hidden_size=48, head_dim=12)
    with pytest.raises(ValueError, match="hidden_size=32, but this Qwen3ForCausalLM has hidden_size=48"):
        load_engram(wider, tmp_path / "adapter")
    llama = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="model_type='qwen3'"):
        load_engram(llama, tmp_path / "adapter")


def test_changed_compression_table_is_detected(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    base_dir, model = trained
    save_engram(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "engram.safetensors"
    tensors = load_file(weights)
    table = tensors["compressor.lookup_table"]
    tensors["compressor.lookup_table"] = torch.cat([table[1:2], table[:1], table[2:]])  # swap two ids
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="addresses rows differently"):
        load_engram(fresh_base(base_dir), tmp_path / "adapter")


def test_merged_checkpoint_loads_with_automodel(trained, tmp_path, caplog):
    base_dir, model = trained
    model.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "engram_attached"
    assert config["base_config"]["model_type"] == "qwen3"
    assert set(config["engram"]["adapters"]) == {"default", "second"}
    tf_logging.enable_propagation()  # transformers' load report, where caplog sees it
    try:
        with caplog.at_level(logging.WARNING):
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    finally:
        tf_logging.disable_propagation()
    report = caplog.text.lower()
    assert "unexpected" not in report and "missing" not in report, report
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert loaded.engram.adapter_names == ["default", "second"] and loaded.engram.active_adapter == "default"
    assert torch.equal(logits(loaded.eval()), logits(model))
    loaded.engram.set_adapter("second")
    model.engram.set_adapter("second")
    try:
        assert torch.equal(logits(loaded), logits(model))
    finally:
        model.engram.set_adapter("default")
    # The base weights are the base's, under the base's own names.
    with torch.no_grad():
        base = fresh_base(base_dir)
        with loaded.engram.disabled():
            assert torch.equal(logits(loaded), logits(base))

    disk = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", engram_offload="disk")
    assert all(isinstance(m.table, OffloadedTable) for m in disk.engram.engram_layers().values())
    assert torch.equal(logits(disk.eval()), logits(model))


@pytest.mark.slow  # two fresh interpreters importing torch: ~20 s on 2 cores
def test_merged_checkpoint_in_a_fresh_process(trained, tmp_path):
    _, model = trained
    model.save_pretrained(tmp_path / "merged")
    expected = logits(model)
    code = (
        "import json, sys, torch; {imp}from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "ids = torch.tensor(json.loads(sys.argv[2]))\n"
        "with torch.no_grad(): print(json.dumps(m(ids).logits.tolist()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    args = [str(tmp_path / "merged"), json.dumps(IDS.tolist())]
    ok = subprocess.run(
        [sys.executable, "-c", code.format(imp="import engram_hf; "), *args], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert torch.equal(torch.tensor(json.loads(ok.stdout.strip().splitlines()[-1])), expected)
    bare = subprocess.run([sys.executable, "-c", code.format(imp=""), *args], capture_output=True, text=True, env=env)
    assert bare.returncode != 0 and "engram_attached" in bare.stderr


def test_auto_engram_every_way(trained, tmp_path):
    base_dir, model = trained
    save_engram(model, tmp_path / "adapter")
    model.save_pretrained(tmp_path / "merged")
    want = logits(model)

    on_base = AutoEngramForCausalLM.from_pretrained(base_dir, engram=tmp_path / "adapter")
    assert torch.equal(logits(on_base.eval()), want)
    alone = AutoEngramForCausalLM.from_pretrained(tmp_path / "adapter")  # base read from the adapter config
    assert torch.equal(logits(alone.eval()), want)
    merged = AutoEngramForCausalLM.from_pretrained(tmp_path / "merged", engram_offload="cpu")
    assert torch.equal(logits(merged.eval()), want)
    with pytest.raises(ValueError, match="plain qwen3 checkpoint"):
        AutoEngramForCausalLM.from_pretrained(base_dir)


def test_auto_engram_with_a_new_spec(gpt2_tokenizer, tmp_path):
    base = tiny_causal_lm("gpt2", vocab_size=len(gpt2_tokenizer), eos_token_id=50256, bos_token_id=50256)
    base.save_pretrained(tmp_path / "base")
    gpt2_tokenizer.save_pretrained(tmp_path / "base")
    ids = gpt2_tokenizer(["To be, or not to be"], return_tensors="pt").input_ids
    model = AutoEngramForCausalLM.from_pretrained(tmp_path / "base", engram=tiny_spec())
    assert attachment_of(model) is not None and model.engram.adapter().spec.pad_id == 50256
    assert torch.equal(logits(model.eval(), ids), logits(base.eval(), ids))


def test_saving_keeps_other_files_and_is_atomic(trained, tmp_path):
    _, model = trained
    target = tmp_path / "merged"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    model.save_pretrained(target)
    assert (target / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()


def test_adapter_on_a_base_with_other_weights_is_refused(trained, tmp_path):
    """Same architecture and shapes, other weights (another seed): the adapter's memory was fitted to
    the first base's hidden states, so loading it elsewhere needs allow_other_base=True."""
    base_dir, model = trained
    save_engram(model, tmp_path / "adapter")
    other = tiny_causal_lm("qwen3", seed=7)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="trained on a base with other weights"):
        load_engram(other, tmp_path / "adapter")
    assert attachment_of(other) is None
    loaded = load_engram(other, tmp_path / "adapter", allow_other_base=True)
    assert attachment_of(loaded) is not None
    with pytest.raises(ValueError, match="other weights"):
        AutoEngramForCausalLM.from_pretrained(tmp_path / "other", engram=tmp_path / "adapter")
    AutoEngramForCausalLM.from_pretrained(tmp_path / "other", engram=tmp_path / "adapter", allow_other_base=True)
    # The same base in another dtype is the same base.
    half = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    load_engram(half, tmp_path / "adapter")


def test_adapter_alone_finds_its_base_from_any_directory(tmp_path, monkeypatch):
    """A base given by a relative path is recorded absolutely: loading the adapter alone from another
    working directory finds it. A base that has gone says so, with the path it looked at."""
    monkeypatch.chdir(tmp_path)
    tiny_causal_lm("qwen3").save_pretrained("base")
    model = AutoModelForCausalLM.from_pretrained("base").eval()
    attach_engram(model, tiny_spec(), compression_table=tiny_compression())
    wake_engram(model)
    save_engram(model, "adapter")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    alone = AutoEngramForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(alone.eval()), logits(model))
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=f"not found at {tmp_path / 'base'}"):
        AutoEngramForCausalLM.from_pretrained(tmp_path / "adapter")


def test_merged_checkpoint_in_a_dtype_casts_engram_too(trained, tmp_path):
    _, model = trained
    model.save_pretrained(tmp_path / "merged")
    for load in (AutoModelForCausalLM.from_pretrained, AutoEngramForCausalLM.from_pretrained):
        loaded = load(tmp_path / "merged", dtype=torch.bfloat16)
        dtypes = {p.dtype for p in loaded.parameters()}
        assert dtypes == {torch.bfloat16}, dtypes
    adapter = save_engram(model, tmp_path / "adapter") or tmp_path / "adapter"
    on_base = AutoEngramForCausalLM.from_pretrained(trained[0], engram=adapter, dtype="bfloat16")
    assert {p.dtype for p in on_base.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("path", ["/no/such/dir", "./no/such", "~/no-such-dir-here"])
def test_missing_local_directory_is_named(path):
    from engram_hf import EngramMoEForCausalLM

    for load in (EngramMoEForCausalLM.from_pretrained, AutoEngramForCausalLM.from_pretrained):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load(path)
