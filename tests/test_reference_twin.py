"""Randomized parity against an independent restatement of the reference (engram_hf.testing),
over configurations the golden files do not cover, outputs and gradients."""

import numpy as np
import pytest
import torch

from engram_hf import EngramMemory, EngramMoEConfig, HashContract, load_reference_engram
from engram_hf.memory.hashing import layer_multipliers, table_primes
from engram_hf.testing import ReferenceEngram

from conftest import engram_inputs_for

CASES = [
    # hc_mult, N, K heads, n_embed, kernel, layer_ids, layer, seed, vocab sizes
    (1, 3, 2, 8, 4, [1, 3], 3, 0, [101, 97]),
    (2, 2, 3, 12, 4, [0], 0, 7, [211]),
    (3, 4, 1, 4, 3, [2, 0, 5], 0, 123, [61, 67, 71]),
    (4, 3, 4, 16, 2, [1, 15], 15, 0, [257, 263]),
    (1, 5, 2, 6, 5, [4], 4, 2**31, [31, 37, 41, 43]),
]


def _build(case, vocab=300, compressed=180):
    hc, n, k, emb, kernel, layer_ids, layer, seed, sizes = case
    rng = np.random.default_rng(0)
    table = np.concatenate([np.arange(compressed), rng.integers(0, compressed, vocab - compressed)])
    hidden = 16
    torch.manual_seed(0)
    ref = ReferenceEngram(
        layer_id=layer,
        layer_ids=layer_ids,
        engram_vocab_size=sizes,
        max_ngram_size=n,
        n_embed_per_ngram=emb,
        n_head_per_ngram=k,
        hidden_size=hidden,
        hc_mult=hc,
        kernel_size=kernel,
        seed=seed,
        lookup_table=table,
        pad_id=5,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 and p.shape[0] == hidden else 0.0))
    config = EngramMoEConfig(
        vocab_size=vocab,
        compressed_vocab_size=compressed,
        hidden_size=hidden,
        num_hidden_layers=max(layer_ids) + 1,
        num_attention_heads=2,
        num_key_value_heads=2,
        hc_mult=hc,
        first_k_dense_replace=0,
        engram_layer_ids=layer_ids,
        engram_vocab_size=sizes,
        engram_max_ngram_size=n,
        engram_n_head_per_ngram=k,
        engram_n_embed_per_ngram=emb,
        engram_kernel_size=kernel,
        engram_seed=seed,
        engram_pad_id=5,
    )
    ours = load_reference_engram(EngramMemory(config, HashContract.from_config(config).layer(layer)), ref.state_dict())
    return ref, ours, torch.from_numpy(table), hidden


def _inputs(ours, table, ids, pad_raw=5):
    return engram_inputs_for(ids, table, pad_raw, ours.max_ngram_size - 1)


@pytest.mark.parametrize("case", CASES, ids=[f"hc{c[0]}-N{c[1]}-K{c[2]}-k{c[4]}-L{c[6]}" for c in CASES])
def test_outputs_and_gradients_match_reference(case):
    ref, ours, table, hidden = _build(case)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(table), (3, 23), generator=g)
    h = torch.randn(3, 23, case[0], hidden, generator=g)

    local_rows = ours.row_ids(_inputs(ours, table, ids)) - ours.hasher.offsets
    assert np.array_equal(local_rows.numpy(), ref.hash(ids.numpy()))

    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    out_ref = ref(h1, ids)
    out = ours(h2, _inputs(ours, table, ids)) - h2  # ours adds the residual; the reference leaves it to the caller
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)

    # Gradients pass through d/dg ssqrt(g) = 1/(2 sqrt|g|), which amplifies fp32 rounding where |g|
    # is small; ours reduces in a different order than the reference, hence a looser tolerance.
    tol = dict(rtol=1e-3, atol=1e-4)
    w = torch.randn_like(out)
    (out_ref * w).sum().backward()
    (out * w).sum().backward()
    torch.testing.assert_close(h2.grad, h1.grad, **tol)
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    torch.testing.assert_close(ours_grads["table.weight"], ref.multi_head_embedding.embedding.weight.grad, **tol)
    torch.testing.assert_close(ours_grads["value_proj.weight"], ref.value_proj.weight.grad, **tol)
    torch.testing.assert_close(ours_grads["key_proj.weight"], torch.cat([p.weight.grad for p in ref.key_projs]), **tol)
    torch.testing.assert_close(ours_grads["conv.weight"], ref.short_conv.conv.weight.grad, **tol)
    torch.testing.assert_close(
        ours_grads["conv_norm.weight"], torch.stack([n.weight.grad for n in ref.short_conv.norms]), **tol
    )


def test_prime_search_matches_trial_division_twin():
    """Miller-Rabin prime allocation equals the twin's trial division, incl. cross-layer sharing."""
    sizes = [1000, 1000, 5000]
    ref = ReferenceEngram(
        layer_id=9,
        layer_ids=[2, 9],
        engram_vocab_size=sizes,
        max_ngram_size=4,
        n_embed_per_ngram=4,
        n_head_per_ngram=5,
        hidden_size=4,
        hc_mult=1,
        kernel_size=4,
        seed=0,
        lookup_table=np.arange(10),
        pad_id=0,
    )
    assert [p for o in table_primes(sizes, 4, 5, [2, 9])[9] for p in o] == ref.head_sizes
    assert list(layer_multipliers(0, 9, 4, 10)) == list(ref.multipliers)
