"""Cached decoding must reproduce the full forward exactly; padding must not change any row."""

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _ids(b, t, seed=1, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (b, t), generator=g)


@pytest.mark.parametrize("hc_mult,ngram,layers", [(2, 3, [0, 2]), (1, 2, [1]), (3, 4, [0, 1, 2])])
def test_token_by_token_equals_full_forward(hc_mult, ngram, layers):
    m = tiny_model(hc_mult=hc_mult, engram_max_ngram_size=ngram, engram_vocab_size=[53] * (ngram - 1),
                   engram_layer_ids=layers)
    ids = _ids(2, 19)
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        cache = DynamicCache(config=m.config)
        steps = [m(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefill", [1, 2, 7, 15])
def test_chunked_prefill_then_decode(model, prefill):
    """Prompts shorter and longer than the conv state ((K-1)*N = 9) and the n-gram context."""
    ids = _ids(3, 20, seed=2)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :prefill], past_key_values=cache).logits
        rest = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(prefill, 20)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, rtol=0, atol=1e-5)


def test_greedy_generate_cache_equals_no_cache(model):
    ids = _ids(2, 6, seed=3)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = model.generate(ids, use_cache=True, **kw)
        b = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_beam_generate_cache_equals_no_cache(model):
    ids = _ids(2, 5, seed=4)
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=True)
    with torch.no_grad():
        a = model.generate(ids, use_cache=True, **kw)
        b = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_left_padded_batch_matches_each_row_alone(model):
    rows = [_ids(1, n, seed=10 + n)[0] for n in (9, 4, 1)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # pad id 0 (a real token id too)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    kw = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)[:, width:]
        full_logits = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **kw)
            assert torch.equal(batched[i], alone[0, len(r):]), f"row {i} differs when left-padded"
            torch.testing.assert_close(full_logits[i, width - len(r):], model(r[None]).logits[0], rtol=0, atol=1e-5)


def test_pad_values_do_not_matter(model):
    """Whatever sits under the mask (here: different junk ids) must not change real positions."""
    ids = _ids(2, 12, seed=5)
    mask = torch.ones_like(ids)
    mask[:, :5] = 0
    junk = ids.clone()
    junk[:, :5] = _ids(2, 5, seed=6)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits[:, 5:]
        b = model(junk, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_engram_mask_switch_changes_output(model):
    ids = _ids(1, 10, seed=7)
    with torch.no_grad():
        on = model(ids).logits
        model.engram_mask = True
        off = model(ids).logits
        model.engram_mask = False
    assert not torch.allclose(on, off)
    torch.testing.assert_close(model(ids).logits, on)
