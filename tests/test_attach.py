"""Engram attached to pretrained causal LMs: identity at init, cached generation, adapters, bad input.

Generated tokens are compared with ``greedy_by_recompute`` (full forward at every step, no cache, no
``generate``) on models with sharp logits, and Engram's silent-at-init parts are woken up first so
that its conv state and n-gram history actually matter.
"""

import pytest
import torch
from transformers import DynamicCache

from engram_hf import EngramSpec, attach_engram, detach_engram
from engram_hf.attach import UnsupportedModelError, attachment_of
from engram_hf.compat import CACHE_NAME

from conftest import (
    TINY_ARCHS,
    greedy_by_recompute,
    random_ids,
    tiny_causal_lm,
    tiny_compression,
    tiny_spec,
    wake_engram,
)

ARCHS = list(TINY_ARCHS)
# The default run generates on one of each kind (dense, sliding window, positional cache argument, MoE);
# the slow run covers every architecture.
QUICK = {"llama", "gemma2", "gpt2", "qwen3_moe"}
ARCHS_GEN = [a if a in QUICK else pytest.param(a, marks=pytest.mark.slow) for a in TINY_ARCHS]


def attached(arch="llama", sharp=False, spec=None, **kw):
    model = tiny_causal_lm(arch, sharp=sharp)
    return attach_engram(model, spec or tiny_spec(), compression_table=tiny_compression(), **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_bit_exact(arch):
    model = tiny_causal_lm(arch)
    ids = random_ids(2, 13, vocab=101)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        base = model(ids).logits
        base_masked = model(ids, attention_mask=mask).logits
        base_hidden = model(ids, output_hidden_states=True).hidden_states
    attach_engram(model, tiny_spec(), compression_table=tiny_compression())
    with torch.no_grad():
        out = model(ids)
        assert torch.equal(out.logits, base), f"{arch}: attached logits differ from the base model's"
        assert torch.equal(model(ids, attention_mask=mask).logits, base_masked)
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(hidden, base_hidden))
    # ... and the gate is not trivially closed: once the value projection moves, the output changes.
    wake_engram(model)
    with torch.no_grad():
        assert (model(ids).logits - base).abs().max() > 1e-3


def test_identity_in_bfloat16_base():
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    ids = random_ids(2, 9, vocab=101)
    with torch.no_grad():
        base = model(ids).logits
    attach_engram(model, tiny_spec(), compression_table=tiny_compression())
    assert model.engram.adapter().dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_float32_engram_on_bfloat16_base_stays_identity():
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    ids = random_ids(2, 9, vocab=101)
    with torch.no_grad():
        base = model(ids).logits
    attach_engram(model, tiny_spec(), compression_table=tiny_compression(), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("arch", ARCHS_GEN)
def test_generation_with_cache_equals_full_recompute(arch):
    """Greedy, left-padded greedy and beam search, per architecture."""
    model = attached(arch, sharp=True)
    wake_engram(model)
    ids = random_ids(2, 5, seed=4, vocab=101)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), greedy_by_recompute(model, ids, 8)), f"{arch}: greedy"

    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    padded = random_ids(2, 7, seed=5, vocab=101)
    padded[0, :3] = 0
    expected = greedy_by_recompute(model, padded, 8, attention_mask=mask)
    assert torch.equal(model.generate(padded, attention_mask=mask, **kw), expected), f"{arch}: left padding"

    beams = dict(kw, num_beams=3, max_new_tokens=6)
    cached = model.generate(ids, use_cache=True, **beams)
    uncached = model.generate(ids, use_cache=False, **beams)
    assert torch.equal(cached, uncached), f"{arch}: beam search with cache differs from without"


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("prefill", [1, 11])
def test_chunked_prefill_then_decode_equals_full_forward(arch, prefill):
    """Prompts shorter and longer than the conv state ((K-1)*N = 9) and the n-gram context; a
    sliding-window architecture (gemma2) and one that takes its cache positionally (gpt2)."""
    model = attached(arch)
    wake_engram(model)
    ids = random_ids(2, 16, seed=2, vocab=101)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :prefill], **{CACHE_NAME: cache}).logits
        rest = [model(ids[:, t : t + 1], **{CACHE_NAME: cache}).logits for t in range(prefill, 16)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, rtol=0, atol=1e-5)


def test_cache_without_config_and_padding_does_not_leak_into_rows():
    model = attached()
    wake_engram(model)
    ids = random_ids(1, 8, seed=6, vocab=101)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(ids).logits
        with_pads = model(padded, attention_mask=mask).logits[:, 4:]
        # a cache built without a config grows its layers lazily; Engram fills in its slots
        cache = DynamicCache()
        steps = [model(ids[:, t : t + 1], **{CACHE_NAME: cache}).logits for t in range(8)]
    torch.testing.assert_close(with_pads, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), alone, rtol=0, atol=1e-5)
    assert model.engram.row_ids(padded, mask)[0][:, 4:].equal(model.engram.row_ids(ids)[0])


def test_cache_filled_without_engram_is_refused():
    model = attached()
    ids = random_ids(1, 6, vocab=101)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with model.engram.disabled():
            model(ids, **{CACHE_NAME: cache})
        with pytest.raises(ValueError, match="without Engram"):
            model(ids[:, :1], **{CACHE_NAME: cache})


def test_switching_adapter_mid_sequence_is_refused():
    model = attached()
    model.engram.add_adapter("other", tiny_spec(seed=1))
    ids = random_ids(1, 6, vocab=101)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{CACHE_NAME: cache})
        model.engram.set_adapter("other")
        with pytest.raises(ValueError, match="switching adapters"):
            model(ids[:, :1], **{CACHE_NAME: cache})


def test_assisted_decoding_is_refused():
    model = attached()
    assert model._is_stateful
    detach_engram(model)
    assert not model._is_stateful


# ----------------------------------------------------------------------------- named adapters
def test_named_adapters_add_switch_disable_delete():
    model = tiny_causal_lm("qwen3")
    ids = random_ids(2, 10, vocab=101)
    with torch.no_grad():
        base = model(ids).logits
    attach_engram(model, tiny_spec(), compression_table=tiny_compression())
    model.engram.add_adapter("code", tiny_spec(layer_ids=[1], seed=3))
    assert model.engram.adapter_names == ["default", "code"]
    assert model.engram.active_adapter == "default"  # adding does not switch
    wake_engram(model, seed=1, adapter="default")
    wake_engram(model, seed=2, adapter="code")
    with torch.no_grad():
        out_default = model(ids).logits
        model.engram.set_adapter("code")
        out_code = model(ids).logits
        with model.engram.disabled():
            assert torch.equal(model(ids).logits, base)
    assert not torch.allclose(out_default, out_code)

    # Each adapter alone on a fresh base gives the same logits: adapters do not interfere.
    solo = tiny_causal_lm("qwen3")
    attach_engram(solo, tiny_spec(layer_ids=[1], seed=3), compression_table=tiny_compression())
    solo.engram.adapter().load_state_dict(model.engram.adapter("code").state_dict())
    with torch.no_grad():
        assert torch.equal(solo(ids).logits, out_code)

    model.engram.delete_adapter("code")
    assert model.engram.active_adapter is None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    model.engram.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out_default)
    with pytest.raises(KeyError, match="code"):
        model.engram.set_adapter("code")
    with pytest.raises(ValueError, match="already attached"):
        model.engram.add_adapter("default", tiny_spec())


def test_detach_restores_the_base_model():
    model = tiny_causal_lm("llama")
    ids = random_ids(2, 8, vocab=101)
    keys = set(model.state_dict())
    with torch.no_grad():
        base = model(ids).logits
    attach_engram(model, tiny_spec(), compression_table=tiny_compression())
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("engram."))
    assert all(p.requires_grad for p in model.engram.parameters())
    wake_engram(model)
    detach_engram(model)
    assert attachment_of(model) is None and not hasattr(model, "engram")
    assert set(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())
    assert "save_pretrained" not in model.__dict__
    assert not any(m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_base_stays_trainable_when_asked():
    model = attached(freeze_base=False)
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- bad input
def test_tokenizer_that_does_not_match_the_model(gpt2_tokenizer):
    model = tiny_causal_lm("llama")  # 101 token ids; GPT-2's tokenizer has 50257
    with pytest.raises(ValueError, match="tokenizer has 50257 tokens but LlamaForCausalLM embeds only 101"):
        attach_engram(model, tiny_spec(), gpt2_tokenizer)
    # Same size, other family: the special tokens give it away.
    big = tiny_causal_lm("llama", vocab_size=len(gpt2_tokenizer), eos_token_id=2, bos_token_id=1)
    with pytest.raises(ValueError, match="eos_token_id is 50256 but LlamaForCausalLM's config declares \\[2\\]"):
        attach_engram(big, tiny_spec(), gpt2_tokenizer)
    assert attachment_of(big) is None  # nothing half-attached


def test_gpt2_tokenizer_on_gpt2_model(gpt2_tokenizer, gpt2_compression):
    model = tiny_causal_lm("gpt2", vocab_size=len(gpt2_tokenizer), eos_token_id=50256, bos_token_id=50256)
    words = [[" the", " king", " is", " dead"], [" The", " King", " IS", " Dead"]]
    ids = torch.tensor([[gpt2_tokenizer.convert_tokens_to_ids(w.replace(" ", "\u0120")) for w in row] for row in words])
    assert gpt2_tokenizer.unk_token_id not in ids.tolist()
    with torch.no_grad():
        base = model(ids).logits
    attach_engram(model, tiny_spec(), gpt2_tokenizer)
    adapter = model.engram.adapter()
    assert torch.equal(adapter.compressor.lookup_table.cpu(), gpt2_compression)
    assert adapter.spec.pad_id == 50256 and adapter.spec.compressed_vocab_size < 50257
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    # Case variants share canonical ids, hence rows.
    rows = model.engram.row_ids(ids)
    assert torch.equal(rows[0][0], rows[0][1])


@pytest.mark.parametrize("layer_ids", [[3], [0, 7], [-1]])
def test_layer_ids_out_of_range(layer_ids):
    model = tiny_causal_lm("llama")
    if min(layer_ids) < 0:
        with pytest.raises(ValueError, match="layer_ids must be >= 0"):
            tiny_spec(layer_ids=layer_ids)
        return
    with pytest.raises(ValueError, match=r"out of range: LlamaForCausalLM has 3 decoder layers \(valid ids 0..2\)"):
        attach_engram(model, tiny_spec(layer_ids=layer_ids), compression_table=tiny_compression())
    assert attachment_of(model) is None


def test_attaching_twice():
    model = attached()
    with pytest.raises(ValueError, match="already has Engram attached .*add_adapter"):
        attach_engram(model, tiny_spec(), compression_table=tiny_compression())


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("layer_ids", [], "non-empty list"),
        ("layer_ids", [1, 1], "duplicates"),
        ("table_size", [53], "one size per n-gram order"),
        ("n_embed_per_ngram", 15, "not divisible"),
        ("kernel_size", 1, "kernel_size must be an integer >= 2"),
        ("max_ngram_size", 1, "max_ngram_size must be an integer >= 2"),
    ],
)
def test_bad_spec_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_spec(**{field: value})


def test_needs_a_tokenizer_or_table():
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        attach_engram(tiny_causal_lm("llama"), tiny_spec())


def test_inputs_embeds_alone_is_refused():
    model = attached()
    emb = model.get_input_embeddings()(random_ids(1, 4, vocab=101))
    with pytest.raises(ValueError, match="without input_ids"):
        model(inputs_embeds=emb)
    with model.engram.disabled():
        model(inputs_embeds=emb)


def test_unsupported_architectures_are_named():
    from transformers import AutoConfig, AutoModelForCausalLM

    mamba = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("mamba", vocab_size=101, hidden_size=16, num_hidden_layers=2, state_size=4)
    )
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM"):
        attach_engram(mamba, EngramSpec(layer_ids=[0]), compression_table=tiny_compression())
    model = tiny_causal_lm("qwen3", layer_types=["full_attention", "linear_attention", "full_attention"])
    with pytest.raises(
        UnsupportedModelError, match=r"Qwen3ForCausalLM layer\(s\) \[1\] are of type \['linear_attention'\]"
    ):
        attach_engram(model, tiny_spec(layer_ids=[1]), compression_table=tiny_compression())
    with pytest.raises(TypeError, match="PreTrainedModel"):
        attach_engram(torch.nn.Linear(2, 2), tiny_spec(), compression_table=tiny_compression())


def test_precomputed_masks_are_refused_not_guessed():
    """A 4-D mask (or generate's dict of them with a static cache) no longer says which tokens are
    padding; Engram refuses it rather than hash pads as tokens."""
    model = attached("gemma2")
    ids = random_ids(1, 5, vocab=101)
    with pytest.raises(ValueError, match="2-D attention mask .* static cache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static")
    with pytest.raises(ValueError, match="got a 4-D mask"):
        model(ids, attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))
