"""Bit-faithfulness to DeepSeek's reference, driven entirely by the golden cases' JSON."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engram_hf import EngramMemory, EngramMoEConfig, TokenCompressor, load_reference_engram
from engram_hf.memory.cache import EngramInputs
from engram_hf.memory.hashing import NgramHasher, layer_multipliers, table_primes

from conftest import GOLDEN_DIR, SHARED

CASES = sorted(p.with_suffix("") for p in GOLDEN_DIR.glob("*.json") if p.with_suffix(".safetensors").exists())


def _case_id(p: Path) -> str:
    return p.name


@pytest.fixture(params=CASES, ids=_case_id)
def case(request):
    meta = json.loads(request.param.with_suffix(".json").read_text())
    tensors = load_file(str(request.param.with_suffix(".safetensors")))
    return request.param.name, meta, tensors


def _table_for(meta, gpt2_compression, gpt2_tokenizer):
    tok = meta.get("tokenizer")
    if tok and Path(SHARED.parent / tok).resolve() != Path(SHARED / "data/tokenizers/gpt2").resolve():
        from transformers import AutoTokenizer

        from engram_hf import build_compression_table

        return build_compression_table(AutoTokenizer.from_pretrained(str(SHARED.parent / tok)), progress=False)
    return gpt2_compression


def test_golden_dir_has_cases():
    assert CASES, f"no *.json/*.safetensors pairs in {GOLDEN_DIR}"


def test_case(case, gpt2_compression, gpt2_tokenizer):
    name, meta, tensors = case
    table = _table_for(meta, gpt2_compression, gpt2_tokenizer)

    if "lookup_table" in tensors:
        assert torch.equal(table, tensors["lookup_table"].long()), f"{name}: compression table differs"
        if "compressed_vocab_size" in meta:
            assert int(table.max()) + 1 == meta["compressed_vocab_size"]

    if "engram_vocab_size" not in meta:
        return
    n = meta["max_ngram_size"]
    k = meta["n_head_per_ngram"]
    layer_ids = [int(i) for i in meta["layer_ids"]]
    compressed_vocab = int(table.max()) + 1
    if "compressed_vocab_size" in meta:
        assert compressed_vocab == meta["compressed_vocab_size"]

    compressor = TokenCompressor(len(table), compressed_vocab)
    compressor.set_table(table)
    input_ids = tensors["input_ids"].long()
    compressed = compressor(input_ids)
    if "compressed_ids" in tensors:
        assert torch.equal(compressed, tensors["compressed_ids"].long()), f"{name}: compressed ids differ"
    pad = int(table[meta["pad_id"]])
    if "compressed_pad_id" in meta:
        assert pad == meta["compressed_pad_id"]

    primes = table_primes(meta["engram_vocab_size"], n, k, layer_ids)
    history = torch.cat([torch.full((input_ids.shape[0], n - 1), pad), compressed], dim=1)
    inputs = EngramInputs.build(input_ids, table, table[meta["pad_id"]], n - 1)
    for layer_id in layer_ids:
        mult = layer_multipliers(meta["seed"], layer_id, n, compressed_vocab)
        if "multipliers" in meta:
            assert [int(m) for m in mult] == meta["multipliers"][str(layer_id)]
        if "table_sizes" in meta:
            assert primes[layer_id] == meta["table_sizes"][str(layer_id)]
        hash_ids = NgramHasher(mult, primes[layer_id])(history)
        assert torch.equal(hash_ids, tensors[f"layer{layer_id}.hash_ids"].long()), f"{name}: layer {layer_id} hashes"

        prefix = f"layer{layer_id}.weights."
        weights = {key[len(prefix):]: v for key, v in tensors.items() if key.startswith(prefix)}
        if not weights:
            continue
        hidden, hc = meta["hidden_size"], meta["hc_mult"]
        config = EngramMoEConfig(
            vocab_size=len(table),
            hidden_size=hidden,
            num_hidden_layers=max(layer_ids) + 1,
            num_attention_heads=1,
            num_key_value_heads=1,
            hc_mult=hc,
            first_k_dense_replace=0,
            engram_layer_ids=layer_ids,
            engram_vocab_size=meta["engram_vocab_size"],
            engram_max_ngram_size=n,
            engram_n_head_per_ngram=k,
            engram_n_embed_per_ngram=meta["n_embed_per_ngram"],
            engram_kernel_size=meta["kernel_size"],
            engram_seed=meta["seed"],
            engram_pad_id=meta["pad_id"],
            compressed_vocab_size=compressed_vocab,
        )
        engram = load_reference_engram(EngramMemory(config, layer_id), weights).eval()
        assert torch.equal(engram.hash(inputs), hash_ids)
        with torch.no_grad():
            out = engram(tensors[f"layer{layer_id}.hidden_states"].float(), inputs)
        expected = tensors[f"layer{layer_id}.output"].float()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} layer {layer_id}: {m}")
