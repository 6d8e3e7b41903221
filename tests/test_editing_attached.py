"""Row edits on the tables of an Engram adapter attached to a pretrained-architecture model: the
editing tools read the active adapter's rows and run the whole model's forward; the base model's
weights never change; offloaded adapter tables serve the same patch as an overlay."""

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from engram_hf import attach_engram, load_engram
from engram_hf.editing import (
    CorpusIndex,
    EditInputError,
    EditRequest,
    EngramEditor,
    PatchMismatchError,
    evaluate_edit,
    locate,
)
from engram_hf.editing.rows import reachable, reads

from conftest import single_thread, tiny_causal_lm, tiny_compression, tiny_spec, wake_engram, word_tokenizer

WORDS = "the capital of zorbania is vlaith kezou brou people in speak drafish toulish and a city river".split()


def _tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny, dispatch-bound models: one thread is as fast, and a second spinning one slows a busy machine."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def attached(tmp_path_factory):
    """A tiny Qwen3 with a woken Engram adapter (and a second, inactive one), saved apart."""
    tok = _tokenizer()
    base = tiny_causal_lm("qwen3", seed=3, sharp=True)
    base_dir = tmp_path_factory.mktemp("base")
    base.save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    attach_engram(model, tiny_spec(table_size=[211, 223]), compression_table=tiny_compression())
    model.engram.add_adapter("other", tiny_spec(layer_ids=[1], seed=5))
    wake_engram(model, seed=1, scale=0.5)
    adapter_dir = tmp_path_factory.mktemp("adapter")
    model.engram.save_adapter(adapter_dir)
    return tok, base_dir, adapter_dir, model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ids(tok, text):
    return torch.tensor([tok(text)["input_ids"]])


@torch.no_grad()
def _greedy(model, tok, prompt, n):
    x = _ids(tok, prompt)
    for _ in range(n):
        x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, -n:].tolist()


def test_attached_edit_changes_only_the_active_adapters_rows(attached):
    tok, _, _, model = attached
    original = _state(model)
    prompt, target = "the capital of zorbania is", " kezou"
    want = tok(target, add_special_tokens=False)["input_ids"]
    assert _greedy(model, tok, prompt, 1) != want
    probes = ["people in zorbania speak", "the city of a river is", "and the river speak toulish"]
    with torch.no_grad():
        before = [model(_ids(tok, p)).logits for p in probes]
    editor = EngramEditor(model, tok, progress=False)
    result = editor.edit(EditRequest(prompt, target, subject="zorbania", true_target=" vlaith"))
    assert result.converged and result.requests[0].success
    assert _greedy(model, tok, prompt, 1) == want
    patch = result.patch
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert changed and all(
        k.startswith("engram.adapters.default.layers.") and k.endswith("table.weight") for k in changed
    )
    assert patch.layout.keys() == model.engram.adapter().memories().keys()
    # Positions before any reader of an edited row: bit-identical logits in their own forward.
    exact = 0
    with torch.no_grad():
        for p, b in zip(probes, before):
            x = _ids(tok, p)
            free = int((~reachable(reads(model, patch.rowset(), x))[0]).sum())
            if free:
                assert torch.equal(model(x[:, :free]).logits, b[:, :free])
                exact += free
    assert exact >= 3
    # The editing tools see the same adapter: locate, a corpus index, evaluate_edit.
    where = locate(model, tok, prompt, corpus=CorpusIndex(model, tok, probes + [prompt], progress=False))
    assert {h.layer for p in where.positions for h in p.rows} == {0, 2}
    summary = evaluate_edit(model, tok, patch, locality=probes).summary
    assert summary["efficacy"] == 1.0 and summary["untouched_bit_identical"]
    # Another adapter addresses other rows: the patch is refused there.
    model.engram.set_adapter("other")
    try:
        with pytest.raises(PatchMismatchError, match="another model"):
            patch.revert(model)
    finally:
        model.engram.set_adapter("default")
    editor.undo()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_attached_offloaded_adapter_serves_the_patch_as_an_overlay(attached):
    tok, base_dir, adapter_dir, model = attached
    weights = adapter_dir / "engram.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    patch = (
        EngramEditor(model, tok, progress=False)
        .edit(EditRequest("people in zorbania speak", " drafish", subject="zorbania"), apply=False)
        .patch
    )
    probes = [_ids(tok, p) for p in ("people in zorbania speak", "the capital of zorbania is", "and a city")]
    patch.apply(model)
    with torch.no_grad():
        resident = [model(x).logits for x in probes]
    patch.revert(model)
    for tier in ("cpu", "disk"):
        other = load_engram(AutoModelForCausalLM.from_pretrained(base_dir).eval(), adapter_dir, engram_offload=tier)
        with torch.no_grad():
            before = [other(x).logits for x in probes]
        patch.apply(other)
        with torch.no_grad():
            for x, want in zip(probes, resident):
                torch.testing.assert_close(other(x).logits, want, rtol=0, atol=0)
        patch.revert(other)
        with torch.no_grad():
            assert all(torch.equal(other(x).logits, b) for x, b in zip(probes, before))
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest


def test_attached_model_without_an_active_adapter_is_refused(attached):
    tok, _, _, model = attached
    with model.engram.disabled():
        with pytest.raises(EditInputError, match="disabled"):
            EngramEditor(model, tok)
    plain = tiny_causal_lm("qwen3")
    with pytest.raises(EditInputError, match="no Engram memory"):
        EngramEditor(plain, tok)
