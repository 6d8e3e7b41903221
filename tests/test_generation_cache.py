"""Cached decoding must reproduce the full forward exactly; padding must not change any row.

Generated tokens are checked against ``greedy_by_recompute`` (an independent loop that runs the full
forward at every step, with no cache and no ``generate``) on a model whose logits are sharp, not
only against ``use_cache=False``, which can be wrong in the same way as the cached path.
"""

import logging
import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache

from engram_hf.compat import output_cache

from conftest import float_tolerance, greedy_by_recompute, random_ids, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(sharp=True)


@pytest.mark.parametrize("hc_mult,ngram,layers", [(2, 3, [0, 2]), (1, 2, [1]), (3, 4, [0, 1, 2])])
def test_token_by_token_equals_full_forward(hc_mult, ngram, layers):
    m = tiny_model(
        hc_mult=hc_mult, engram_max_ngram_size=ngram, engram_vocab_size=[53] * (ngram - 1), engram_layer_ids=layers
    )
    ids = random_ids(2, 19)
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        cache = DynamicCache(config=m.config)
        steps = [m(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
@pytest.mark.parametrize("prefill", [1, 2, 7, 15])
def test_chunked_prefill_then_decode_under_either_cache_name(model, prefill, name):
    """Prompts shorter and longer than the conv state ((K-1)*N = 9) and the n-gram context."""
    ids = random_ids(3, 20, seed=2)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :prefill], **{name: cache})
        assert output_cache(first) is cache
        rest = [model(ids[:, t : t + 1], **{name: cache}).logits for t in range(prefill, 20)]
    torch.testing.assert_close(torch.cat([first.logits, *rest], 1), full, rtol=0, atol=1e-5)


def test_greedy_generate_equals_full_recompute_loop(model):
    ids = random_ids(2, 6, seed=3)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = greedy_by_recompute(model, ids, 12)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, expected), "cached greedy generation differs from the full-recompute loop"
    assert torch.equal(uncached, expected)
    assert len(set(expected[0, 6:].tolist())) > 1, "the check is only meaningful if the output varies"


def test_beam_generate_cache_equals_no_cache(model):
    ids = random_ids(2, 5, seed=4)
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=True)
    with torch.no_grad():
        a = model.generate(ids, use_cache=True, **kw)
        b = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_left_padded_batch_matches_each_row_and_the_recompute_loop(model):
    rows = [random_ids(1, n, seed=10 + n)[0] for n in (9, 4, 1)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # pad id 0 (a real token id too)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    kw = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)
        assert torch.equal(batched, greedy_by_recompute(model, ids, 7, attention_mask=mask))
        full_logits = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = greedy_by_recompute(model, r[None], 7)
            assert torch.equal(batched[i, width:], alone[0, len(r) :]), f"row {i} differs when left-padded"
            torch.testing.assert_close(full_logits[i, width - len(r) :], model(r[None]).logits[0], rtol=0, atol=1e-5)


def test_generate_emits_no_deprecation_warning(model):
    """Our code speaks to transformers in the installed release's names: no rename warnings."""
    transformers.utils.logging.warning_once.cache_clear()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf_logger = transformers.utils.logging.get_logger("transformers")
    tf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                model.generate(random_ids(1, 4), max_new_tokens=3, do_sample=False, pad_token_id=0)
                model(random_ids(1, 4), cache=DynamicCache(config=model.config))
    finally:
        tf_logger.removeHandler(handler)
    messages = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    assert not [m for m in messages if "deprecated" in m.lower()], messages


def test_pad_values_do_not_matter(model):
    """Whatever sits under the mask (here: different junk ids) must not change real positions."""
    ids = random_ids(2, 12, seed=5)
    mask = torch.ones_like(ids)
    mask[:, :5] = 0
    junk = ids.clone()
    junk[:, :5] = random_ids(2, 5, seed=6)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits[:, 5:]
        b = model(junk, attention_mask=mask).logits[:, 5:]
        unmasked = model(junk).logits[:, 5:]
    # Not bitwise: the junk ids route to other experts, which regroups the experts' matmuls and
    # rounds the real positions differently. A leak through the mask would be orders larger.
    tol = float_tolerance(torch.float32, reduction=model.config.hidden_size, scale=float(a.abs().max()))
    torch.testing.assert_close(a, b, **tol)
    # ... and that bound is tight enough to see any leak: the same positions unmasked move far more.
    assert (unmasked - a).abs().max() > 100 * tol["atol"]


def test_engram_mask_switch_changes_output(model):
    ids = random_ids(1, 10, seed=7)
    with torch.no_grad():
        on = model(ids).logits
        model.engram_mask = True
        off = model(ids).logits
        model.engram_mask = False
    assert not torch.allclose(on, off)
    torch.testing.assert_close(model(ids).logits, on)


def test_two_different_caches_are_refused(model):
    ids = random_ids(1, 3)
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(cach=None), TypeError, "unexpected keyword argument"),
        (dict(token_type_ids=torch.zeros(1, 3, dtype=torch.long)), TypeError, "token_type_ids"),
        (dict(output_attentions=True), ValueError, "does not return attentions"),
        (dict(output_router_logits=True), ValueError, "does not return router_logits"),
    ],
)
def test_keywords_that_would_change_results_are_refused(model, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        model(random_ids(1, 3), **kwargs)


def test_return_dict_false_gives_a_tuple(model):
    ids = random_ids(1, 4)
    with torch.no_grad():
        out = model(ids, labels=ids, return_dict=False)
        ref = model(ids, labels=ids)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], ref.loss)
