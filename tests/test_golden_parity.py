"""Bit-faithfulness to DeepSeek's reference, driven entirely by the golden cases' JSON.

Every step runs through the production implementation: the compressor, the hash contract, the
one hashing op and the Engram layer.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engram_hf import EngramMemory, EngramMoEConfig, HashContract, load_reference_engram
from engram_hf.memory import TokenCompressor, compressed_vocab_size
from engram_hf.memory.hashing import HashBuffers
from engram_hf.ops import hash_rows

from conftest import GOLDEN_DIR, SHARED, engram_inputs_for, need_shared

CASES = sorted(p.with_suffix("") for p in GOLDEN_DIR.glob("*.json") if p.with_suffix(".safetensors").exists())


@pytest.fixture(params=CASES or [GOLDEN_DIR / "missing"], ids=lambda p: p.name)
def case(request):
    need_shared(request.param.with_suffix(".json"), "A golden reference case")
    meta = json.loads(request.param.with_suffix(".json").read_text())
    tensors = load_file(str(request.param.with_suffix(".safetensors")))
    return request.param.name, meta, tensors


def _table_for(meta, gpt2_compression):
    tok = meta.get("tokenizer")
    if tok and Path(SHARED.parent / tok).resolve() != Path(SHARED / "data/tokenizers/gpt2").resolve():
        from transformers import AutoTokenizer

        from engram_hf import build_compression_table

        return build_compression_table(AutoTokenizer.from_pretrained(str(SHARED.parent / tok)), progress=False)
    return gpt2_compression


def _config(meta, table):
    return EngramMoEConfig(
        vocab_size=len(table),
        hidden_size=meta.get("hidden_size", 8),
        num_hidden_layers=max(int(i) for i in meta["layer_ids"]) + 1,
        num_attention_heads=1,
        num_key_value_heads=1,
        hc_mult=meta.get("hc_mult", 1),
        first_k_dense_replace=0,
        engram_layer_ids=[int(i) for i in meta["layer_ids"]],
        engram_vocab_size=meta["engram_vocab_size"],
        engram_max_ngram_size=meta["max_ngram_size"],
        engram_n_head_per_ngram=meta["n_head_per_ngram"],
        engram_n_embed_per_ngram=meta.get("n_embed_per_ngram", meta["n_head_per_ngram"]),
        engram_kernel_size=meta.get("kernel_size", 4),
        engram_seed=meta["seed"],
        engram_pad_id=meta["pad_id"],
        compressed_vocab_size=compressed_vocab_size(table),
    )


def test_golden_dir_has_cases():
    need_shared(GOLDEN_DIR, "The golden reference vectors")
    assert CASES, f"no *.json/*.safetensors pairs in {GOLDEN_DIR}"


def test_case(case, gpt2_compression):
    name, meta, tensors = case
    table = _table_for(meta, gpt2_compression)

    if "lookup_table" in tensors:
        assert torch.equal(table, tensors["lookup_table"].long()), f"{name}: compression table differs"
        if "compressed_vocab_size" in meta:
            assert compressed_vocab_size(table) == meta["compressed_vocab_size"]
    if "engram_vocab_size" not in meta:
        return

    config = _config(meta, table)
    if "compressed_vocab_size" in meta:
        assert config.compressed_vocab_size == meta["compressed_vocab_size"]
    input_ids = tensors["input_ids"].long()
    compressor = TokenCompressor(len(table), config.compressed_vocab_size, meta["pad_id"])
    compressor.set_table(table)
    canonical, pad = compressor(input_ids)
    if "compressed_ids" in tensors:
        assert torch.equal(canonical, tensors["compressed_ids"].long()), f"{name}: compressed ids differ"
    if "compressed_pad_id" in meta:
        assert int(pad) == meta["compressed_pad_id"]

    contract = HashContract.from_config(config)
    inputs = engram_inputs_for(input_ids, table, meta["pad_id"], meta["max_ngram_size"] - 1)
    for layer_id in contract.layer_ids:
        layer = contract.layer(layer_id)
        if "multipliers" in meta:
            assert list(layer.multipliers) == meta["multipliers"][str(layer_id)]
        if "table_sizes" in meta:
            sizes = meta["table_sizes"][str(layer_id)]
            assert list(layer.primes) == [p for heads in sizes for p in heads]
        hash_ids = hash_rows(inputs, HashBuffers(layer).params())
        assert torch.equal(hash_ids, tensors[f"layer{layer_id}.hash_ids"].long()), f"{name}: layer {layer_id} hashes"

        prefix = f"layer{layer_id}.weights."
        weights = {key[len(prefix) :]: v for key, v in tensors.items() if key.startswith(prefix)}
        if not weights:
            continue
        engram = load_reference_engram(EngramMemory(config, layer), weights).eval()
        assert torch.equal(engram.row_ids(inputs) - engram.hasher.offsets, hash_ids)
        with torch.no_grad():
            hidden = tensors[f"layer{layer_id}.hidden_states"].float()
            out = engram(hidden, inputs) - hidden  # the reference's output is before the residual add
        expected = tensors[f"layer{layer_id}.output"].float()
        where = f"{name} layer {layer_id}"
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=lambda m, where=where: f"{where}: {m}")


def test_contract_fingerprint_tracks_addressing(gpt2_compression):
    meta = dict(
        layer_ids=[1, 3], engram_vocab_size=[101, 103], max_ngram_size=3, n_head_per_ngram=2, seed=0, pad_id=50256
    )
    base = HashContract.from_config(_config(meta, gpt2_compression))
    assert base.fingerprint() == HashContract.from_config(_config(meta, gpt2_compression)).fingerprint()
    for change in (dict(seed=1), dict(layer_ids=[3, 1]), dict(engram_vocab_size=[101, 107]), dict(pad_id=0)):
        other = HashContract.from_config(_config({**meta, **change}, gpt2_compression))
        assert other.fingerprint() != base.fingerprint(), change
    folded = gpt2_compression.clone()
    folded[folded == 5] = 6  # one fewer canonical id changes the multipliers' range
    assert base.fingerprint(gpt2_compression) != base.fingerprint(folded)
