"""Knowledge editing on a tiny EngramMoE that has learned invented facts: locate, edit, patch,
revert, evaluate, offloaded tables, checkpoints, CLI and bad input."""

import hashlib
import json
import math
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engram_hf import build_compression_table
from engram_hf.cli import main as cli_main
from engram_hf.data import builtin_text
from engram_hf.editing import (
    CorpusIndex,
    EditInputError,
    EditRequest,
    EngramEditor,
    EngramPatch,
    PatchMismatchError,
    RowSet,
    apply_to_checkpoint,
    evaluate_edit,
    locate,
)
from engram_hf.editing.evaluate import ScoreCase, counterfact_scores, exact_locality
from engram_hf.editing.facts import RELATIONS, FactWorld, train_fact_model
from engram_hf.editing.rows import reachable, reads
from engram_hf.testing import ReferenceEngram

from conftest import SHAKESPEARE, tiny_config, word_tokenizer


def _filler() -> str:
    """Ordinary text the facts are mixed into: the shared Shakespeare corpus, else the built-in sonnets."""
    path = SHAKESPEARE / "sonnets_gut.txt"
    return path.read_text(encoding="utf-8") if path.exists() else builtin_text()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny and dispatch-bound: one thread is as fast, and on a busy machine a second,
    spinning OpenMP thread makes every step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    """A fact world, a model trained on it (saved with its tokenizer) and the training corpus."""
    torch.manual_seed(0)
    world = FactWorld(n_subjects=8, n_languages=3, n_currencies=3, seed=0)
    model, tokenizer = train_fact_model(world, _filler(), steps=140, lr=1e-2, progress=False)
    path = tmp_path_factory.mktemp("facts") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return world, path, tokenizer, world.corpus(_filler())


def _load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@torch.no_grad()
def _greedy(model, tokenizer, prompt, n):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    for _ in range(n):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -n:].tolist()


def _target_ids(tokenizer, target):
    return tokenizer(target, add_special_tokens=False).input_ids


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _check_untouched(model, patch, x, full_before, full_now) -> int:
    """The positions of ``x`` before its first reader of an edited row: bit-identical in a forward of
    their own (the same computation before and after, unless something outside the patch changed),
    and equal to float rounding in the full forward, where the routed experts group tokens anew."""
    free = ~reachable(reads(model, patch.rowset(), x))[0]
    f = int(free.sum())
    if f:
        now = model(x[:, :f]).logits
        patch.revert(model)
        before = model(x[:, :f]).logits
        patch.apply(model)
        assert torch.equal(now, before)
        torch.testing.assert_close(full_now[0, :f], full_before[0, :f], rtol=0, atol=1e-4)
    return f


def _case(world, tokenizer, model, index=0):
    """A counterfactual whose true fact the model has learned."""
    for c in world.counterfactuals(seed=3)[index:]:
        if _greedy(model, tokenizer, c.prompt, len(_target_ids(tokenizer, c.true_target))) == _target_ids(
            tokenizer, c.true_target
        ):
            return c
    raise AssertionError("the fact model learned none of its facts")


def test_fact_model_learned_its_facts(facts):
    world, path, tokenizer, _ = facts
    model = _load(path)
    known = [
        _greedy(model, tokenizer, world.prompt(f), len(_target_ids(tokenizer, " " + f.object)))
        == _target_ids(tokenizer, " " + f.object)
        for f in world.facts
    ]
    assert sum(known) >= 0.9 * len(known), f"learned {sum(known)} of {len(known)} facts"


def test_locate_matches_an_independent_hash_and_gate(facts):
    """Rows (order, head, index) against the reference's numpy hash; gates against a step-by-step
    restatement of the formula; corpus counts against brute force over every document."""
    world, path, tokenizer, corpus = facts
    model = _load(path)
    config = model.config
    text = world.prompt(world.facts[0])
    index = CorpusIndex(model, tokenizer, corpus[:40], progress=False)
    loc = locate(model, tokenizer, text, corpus=index, examples=2)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert loc.tokens == [tokenizer.decode([i]) for i in ids[0].tolist()]
    assert len(loc.positions) == ids.shape[1]

    table = build_compression_table(tokenizer, progress=False).numpy()
    hidden_in = {}
    hooks = [
        e.register_forward_pre_hook(lambda m, a, i=i: hidden_in.__setitem__(i, a[0]))
        for i, e in model.engram_layers().items()
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()

    K = config.engram_n_head_per_ngram
    for layer, engram in model.engram_layers().items():
        ref = ReferenceEngram(
            layer_id=layer,
            layer_ids=list(config.engram_layer_ids),
            engram_vocab_size=list(config.engram_vocab_size),
            max_ngram_size=config.engram_max_ngram_size,
            n_embed_per_ngram=config.engram_n_embed_per_ngram,
            n_head_per_ngram=K,
            hidden_size=config.hidden_size,
            hc_mult=config.hc_mult,
            kernel_size=config.engram_kernel_size,
            seed=config.engram_seed,
            lookup_table=table,
            pad_id=config.engram_pad_id,
        )
        local = ref.hash(ids.numpy())[0]  # [T, heads], rows inside each head's table
        offsets = ref.multi_head_embedding.offsets
        w = engram.table.weight.detach()
        e = w[torch.from_numpy(local) + offsets].flatten(-2)  # [T, E]
        D, M = config.hidden_size, config.hc_mult
        key = engram.key_proj(e).view(-1, M, D).detach()
        h = hidden_in[layer][0]
        for p in loc.positions:
            hits = [x for x in p.rows if x.layer == layer]
            assert [x.index for x in hits] == local[p.position].tolist()
            assert [x.order for x in hits] == [hd // K + 2 for hd in range(len(hits))]
            for x in hits:
                assert len(x.ngram) == x.order and x.ngram[-1] == loc.tokens[p.position]
            for m in range(M):
                k = torch.nn.functional.rms_norm(key[p.position, m], (D,), engram.key_norm.weight[m].detach())
                q = torch.nn.functional.rms_norm(h[p.position, m], (D,), engram.query_norm.weight[m].detach())
                g = float((k * q).sum() / math.sqrt(D))
                alpha = 1 / (1 + math.exp(-math.copysign(math.sqrt(max(abs(g), 1e-6)), g)))
                assert p.gates[layer][m] == pytest.approx(alpha, abs=1e-5)

    # Corpus sharing, by brute force: every document's rows from the model, compared one by one.
    per_doc = []
    for doc in corpus[:40]:
        d = tokenizer(doc, return_tensors="pt").input_ids
        per_doc.append((d[0], model.engram_row_ids(d)))
    last = loc.positions[-1]
    for hit in last.rows:
        readers = [
            (di, t)
            for di, (_, rows) in enumerate(per_doc)
            for t in (rows[hit.layer][0] == hit.row).any(-1).nonzero()[:, 0]
        ]
        assert hit.corpus_same + hit.corpus_collisions == len(readers)
        same = 0
        for di, t in readers:
            d, t = per_doc[di][0], int(t)
            grams = d[max(0, t - hit.order + 1) : t + 1].tolist()
            mine = ids[0, -hit.order :].tolist()
            same += len(grams) == hit.order and (table[grams] == table[mine]).all()
        assert hit.corpus_same == same
    json.loads(loc.to_json())
    assert "gate per branch" in loc.report()


def test_edit_changes_the_fact_and_nothing_but_its_rows(facts):
    world, path, tokenizer, _ = facts
    model = _load(path)
    case = _case(world, tokenizer, model)
    original = _state(model)
    others = [world.prompt(f) for f in world.facts if f.subject != case.fact.subject]
    other_ids = [tokenizer(p, return_tensors="pt").input_ids for p in others]
    with torch.no_grad():
        other_before = [model(x).logits for x in other_ids]
    text_ids = tokenizer(_filler()[:1500], return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        text_before = model(text_ids).logits

    editor = EngramEditor(model, tokenizer, progress=False)
    result = editor.edit(EditRequest(case.prompt, case.target, paraphrases=case.near[:1], true_target=case.true_target))
    patch = result.patch
    assert result.converged and result.requests[0].success
    n = len(_target_ids(tokenizer, case.target))
    assert _greedy(model, tokenizer, case.prompt, n) == _target_ids(tokenizer, case.target)
    # A held-out paraphrase that shares the prompt's last n-grams follows the edit.
    assert _greedy(model, tokenizer, case.near[1], n) == _target_ids(tokenizer, case.target)

    # Every tensor but the edited rows keeps its exact bits.
    after = model.state_dict()
    for name, value in original.items():
        if name.endswith("engram.table.weight"):
            layer = int(name.split(".")[2])
            changed = (after[name] != value).any(-1).nonzero()[:, 0]
            assert set(changed.tolist()) <= set(patch.rows.get(layer, torch.empty(0)).tolist())
            assert changed.numel() > 0
        else:
            assert torch.equal(after[name], value), name

    # Prompts and text whose positions read no edited row (by row ids) have bit-identical logits.
    exact = 0
    with torch.no_grad():
        for x, before in zip(other_ids + [text_ids], other_before + [text_before]):
            exact += _check_untouched(model, patch, x, before, model(x).logits)
    assert exact > 100  # the check is not vacuous

    editor.undo()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_batch_sequential_stack_and_revert_order(facts, tmp_path):
    world, path, tokenizer, _ = facts
    model = _load(path)
    original = _state(model)
    cases = world.counterfactuals(seed=5)[:3]
    editor = EngramEditor(model, tokenizer, progress=False)
    batch = editor.edit([EditRequest(c.prompt, c.target) for c in cases])
    assert batch.converged and all(r.success for r in batch.requests)
    for c in cases:
        n = len(_target_ids(tokenizer, c.target))
        assert _greedy(model, tokenizer, c.prompt, n) == _target_ids(tokenizer, c.target)

    # The same fact edited again: the second patch overwrites the first one's rows.
    again = [o for o in world.objects(cases[0].fact.relation) if o not in (cases[0].new_object, cases[0].fact.object)]
    second = editor.edit(EditRequest(cases[0].prompt, " " + again[0]))
    assert second.requests[0].success
    assert set(second.patch.rows) & set(batch.patch.rows)
    with pytest.raises(PatchMismatchError, match="later patch"):
        batch.patch.revert(model)
    stacked = EngramPatch.stack([batch.patch, second.patch])
    with pytest.raises(PatchMismatchError, match="not made on top"):
        EngramPatch.stack([second.patch, batch.patch])
    stacked.save(tmp_path / "stacked.safetensors")
    EngramPatch.load(tmp_path / "stacked.safetensors").revert(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    # Undo in order works too (from the applied state).
    stacked.apply(model)
    editor.undo()
    editor.undo()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_subject_edits_go_through_the_subjects_own_rows(facts):
    world, path, tokenizer, _ = facts
    model = _load(path)
    case = _case(world, tokenizer, model)
    enc = tokenizer(case.prompt, return_offsets_mapping=True)
    start = case.prompt.rfind(case.fact.subject)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < start + len(case.fact.subject)]
    subject_tokens = [tokenizer.decode([enc["input_ids"][i]]) for i in inside]
    request = EditRequest(case.prompt, case.target, subject=case.fact.subject)
    editor = EngramEditor(model, tokenizer, positions="subject", progress=False)
    result = editor.edit(request, apply=False)
    report = result.requests[0]
    # The subject's rows alone move the answer (without the last position's rows, and at target
    # positions only n-grams inside the target, they need not reach target_prob).
    assert report.prob_after > 5 * report.prob_before
    at_subject = [g for g in report.ngrams if g["at"] == "subject"]
    assert at_subject
    for g in at_subject:
        if len(inside) > 1:  # n-grams lying inside the subject's tokens
            assert all(t in subject_tokens for t in g["ngram"])
        else:  # a one-token subject: the n-grams ending on it
            assert g["ngram"][-1] == subject_tokens[0]
    # The rows the last prompt position reads stay as they were.
    ids = tokenizer(case.prompt, return_tensors="pt").input_ids
    for layer, rows in model.engram_row_ids(ids).items():
        assert not result.patch.rowset().contains(layer, rows[0, -1]).any()
    # The default ("auto") widens to the last position's rows only if the subject's are not enough.
    auto = EngramEditor(model, tokenizer, progress=False).edit(request)
    assert auto.requests[0].success and auto.converged
    assert auto.widened == (not result.converged)
    with pytest.raises(EditInputError, match="does not occur in the prompt"):
        editor.edit(EditRequest(case.prompt, case.target, subject="Atlantis"))
    with pytest.raises(EditInputError, match="does not occur in the paraphrase"):
        editor.edit(EditRequest(case.prompt, case.target, paraphrases=["Nobody knows"], subject=case.fact.subject))


def test_later_edits_keep_earlier_ones_that_share_rows(facts):
    """Two relations of one subject end in the same n-grams ("of X is"): the second edit changes rows
    the first one wrote, and keeps the first in its objective."""
    world, path, tokenizer, _ = facts
    model = _load(path)
    subject = world.subjects[1]
    cases = {c.fact.relation: c for c in world.counterfactuals(seed=6) if c.fact.subject == subject}
    first, second = cases["language"], cases["capital"]
    editor = EngramEditor(model, tokenizer, progress=False)
    editor.edit(EditRequest(first.prompt, first.target))
    result = editor.edit(EditRequest(second.prompt, second.target))
    assert set(result.patch.rows[0].tolist()) & set(editor.history[0].rows[0].tolist())  # shared rows
    assert result.kept_previous >= 1
    for c in (first, second):
        n = len(_target_ids(tokenizer, c.target))
        assert _greedy(model, tokenizer, c.prompt, n) == _target_ids(tokenizer, c.target)


def test_max_kept_keeps_the_earlier_sequences_closest_to_losing_their_target(facts):
    """An earlier edit with paraphrases leaves several sequences that read the subject's rows; a
    later edit of another relation of the subject keeps them all, or at most ``max_kept``: those with
    the smallest margin over the target floor, computed here independently."""
    world, path, tokenizer, _ = facts
    subject = world.subjects[1]
    cases = {c.fact.relation: c for c in world.counterfactuals(seed=6) if c.fact.subject == subject}
    first, second = cases["language"], cases["capital"]
    requests = [
        EditRequest(first.prompt, first.target, subject=subject, paraphrases=first.near),
        EditRequest(second.prompt, second.target, subject=subject),
    ]
    kept = {}
    for cap in (None, 2):
        model = _load(path)
        editor = EngramEditor(model, tokenizer, keep_related=False, max_kept=cap, progress=False)
        editor.edit(requests[0])
        encoded = editor._encode([requests[1]])
        editor._find_needed(encoded)
        rowset = editor._request_rows(encoded[0])[0]
        chosen = editor._previous_to_keep(encoded, rowset)
        editor.max_kept = None
        candidates = editor._previous_to_keep(encoded, rowset)
        editor.max_kept = cap
        with torch.no_grad():
            margins = []
            for seq in candidates:
                x = torch.tensor([seq.ids])
                logp = model(x).logits[0].log_softmax(-1)
                lp = logp[torch.arange(seq.first - 1, len(seq.ids) - 1), x[0, seq.first :]]
                margins.append(float((lp - math.log(0.9)).min()))
        fragile = sorted(range(len(candidates)), key=lambda i: margins[i])[: cap or len(candidates)]
        assert sorted(s.ids for s in chosen) == sorted(candidates[i].ids for i in fragile)
        kept[cap] = (editor.edit(requests[1]).kept_previous, len(candidates))
    assert kept[None][0] == kept[None][1] >= 3  # the prompt and both paraphrases read the subject's rows
    assert kept[2][0] == 2
    with pytest.raises(ValueError, match="max_kept"):
        EngramEditor(_load(path), tokenizer, max_kept=0)


def test_patch_file_roundtrip_and_refusals(facts, tmp_path):
    world, path, tokenizer, _ = facts
    model = _load(path)
    case = _case(world, tokenizer, model)
    result = EngramEditor(model, tokenizer, progress=False).edit(EditRequest(case.prompt, case.target))
    file = result.patch.save(tmp_path / "edit.safetensors")
    loaded = EngramPatch.load(file)
    for layer in result.patch.rows:
        assert torch.equal(loaded.rows[layer], result.patch.rows[layer])
        assert torch.equal(loaded.new[layer], result.patch.new[layer])
        assert torch.equal(loaded.old[layer], result.patch.old[layer])
    assert loaded.requests[0]["target"] == case.target

    fresh = _load(path)
    loaded.apply(fresh)
    ids = tokenizer(case.prompt, return_tensors="pt").input_ids
    # Bit-identical weights (two model objects need not round a forward alike: a CPU matmul's kernel
    # can depend on where its operands lie in memory), and the same prediction.
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # noqa: E731
    assert same(fresh, model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(PatchMismatchError, match="do not hold the patch's old values"):
        loaded.apply(fresh)  # already applied
    # A patched resident model saves as a normal checkpoint.
    fresh.save_pretrained(tmp_path / "saved")
    assert same(_load(tmp_path / "saved"), model)
    assert loaded.state(_load(tmp_path / "saved")) == "applied"

    # Another compression table: two token ids swap their canonical ids.
    other = _load(path)
    table = other.model.compressor.lookup_table.clone()
    a, b = int(table[5]), int(table[6])
    table[5], table[6] = b, a
    other.set_compression_table(table)
    with pytest.raises(PatchMismatchError, match="compression table"):
        loaded.apply(other)
    # Another hash contract (seed) and another table layout (row width).
    from engram_hf import EngramMoEForCausalLM

    cfg = _load(path).config
    with pytest.raises(PatchMismatchError, match="seed"):
        loaded.apply(EngramMoEForCausalLM(type(cfg)(**{**cfg.to_dict(), "engram_seed": 1})))
    wide = EngramMoEForCausalLM(type(cfg)(**{**cfg.to_dict(), "engram_n_embed_per_ngram": 64}))
    wide.set_compression_table(_load(path).model.compressor.lookup_table)
    with pytest.raises(PatchMismatchError, match="table layout"):
        loaded.apply(wide)

    # Not a patch / corrupt files get a clear message.
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match="not a safetensors file"):
        EngramPatch.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an engram-hf patch"):
        EngramPatch.load(tmp_path / "plain.safetensors")


def test_patch_save_is_atomic(facts, tmp_path, monkeypatch):
    world, path, tokenizer, _ = facts
    model = _load(path)
    case = _case(world, tokenizer, model)
    patch = EngramEditor(model, tokenizer, progress=False).edit(EditRequest(case.prompt, case.target)).patch
    target = tmp_path / "p.safetensors"
    patch.save(target)
    before = target.read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        patch.save(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_disk_offloaded_edit_is_an_overlay(facts, tmp_path):
    """On a disk-tier table the edit is served as an overlay: same logits as the resident model with
    the same patch, the checkpoint file never written, revert restores the original logits exactly."""
    world, path, tokenizer, _ = facts
    sha = lambda: hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    digest = sha()
    disk = _load(path, engram_offload="disk", engram_cache_rows=64)
    resident = _load(path)
    case = _case(world, tokenizer, resident)
    probes = [case.prompt, case.near[0]] + [world.prompt(f) for f in world.facts[:6]]
    ids = [tokenizer(p, return_tensors="pt").input_ids for p in probes]
    with torch.no_grad():
        before = [disk(x).logits for x in ids]
    editor = EngramEditor(disk, tokenizer, progress=False)
    result = editor.edit(EditRequest(case.prompt, case.target))
    assert result.requests[0].success
    n = len(_target_ids(tokenizer, case.target))
    assert _greedy(disk, tokenizer, case.prompt, n) == _target_ids(tokenizer, case.target)
    assert _greedy(disk, tokenizer, case.near[0], n) == _target_ids(tokenizer, case.target)
    result.patch.apply(resident)
    with torch.no_grad():
        for x, b in zip(ids, before):
            now = disk(x).logits
            assert torch.equal(now, resident(x).logits)
            _check_untouched(disk, result.patch, x, b, now)
    assert sha() == digest
    editor.undo()
    with torch.no_grad():
        for x, b in zip(ids, before):
            assert torch.equal(disk(x).logits, b)
    assert sha() == digest


def test_apply_to_checkpoint_writes_a_patched_copy(facts, tmp_path):
    world, path, tokenizer, _ = facts
    sha = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()
    digest = sha(path)
    model = _load(path, engram_offload="disk")
    case = _case(world, tokenizer, _load(path))
    patch = EngramEditor(model, tokenizer, progress=False).edit(EditRequest(case.prompt, case.target)).patch
    out = apply_to_checkpoint(patch, path, tmp_path / "patched")
    assert sha(path) == digest
    patched = _load(out)
    ids = tokenizer(case.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, model(ids).logits)
    assert (out / "tokenizer.json").exists()
    with pytest.raises(PatchMismatchError, match="old values"):
        apply_to_checkpoint(patch, out, tmp_path / "twice")
    back = apply_to_checkpoint(patch, out, tmp_path / "reverted", revert=True)
    assert sha(back) == digest
    # The copy shares nothing a later write can reach: an ordinary save into it (here the tokenizer,
    # grown by a token) leaves the source's files as they were.
    source_files = {f.name: f.read_bytes() for f in path.iterdir() if f.is_file()}
    for f in out.iterdir():
        if f.is_file() and (path / f.name).exists():  # the copy also holds its output marker
            assert not os.path.samefile(f, path / f.name), f"{f.name} is the source's own file"
    grown = AutoTokenizer.from_pretrained(out)
    grown.add_tokens(["<never-seen-before>"])
    grown.save_pretrained(out)
    assert {f.name: f.read_bytes() for f in path.iterdir() if f.is_file()} == source_files


def test_evaluate_edit_separates_exact_and_colliding(facts):
    world, path, tokenizer, corpus = facts
    model = _load(path)
    case = _case(world, tokenizer, model)
    state = _state(model)
    index = CorpusIndex(model, tokenizer, corpus, progress=False)
    result = EngramEditor(model, tokenizer, corpus=index, progress=False).edit(
        EditRequest(case.prompt, case.target, true_target=case.true_target)
    )
    report = result.requests[0].corpus
    assert 0 < report["positions_reading_edited_rows"] <= report["positions_reachable"] < report["corpus_tokens"]
    applied = _state(model)
    request = EditRequest(case.prompt, case.target, paraphrases=case.near + case.far, true_target=case.true_target)
    # A colliding locality prompt: it holds the edited n-grams in another sentence.
    collide = f"Scholars say that {case.fact.subject} is"
    locality = [world.prompt(f) for f in world.facts if f.subject != case.fact.subject][:8] + [collide]
    ev = evaluate_edit(
        model,
        tokenizer,
        result.patch,
        [request],
        neighbours=[case.neighbours],
        locality=locality,
        fluency=[_filler()[:800]],
        generation_tokens=12,
    )
    s = ev.summary
    assert s["efficacy"] == 1.0 and s["efficacy_before"] == 0.0 and s["efficacy_score"] == 1.0
    # Generalisation as an independent greedy loop sees it, paraphrase by paraphrase (whether one
    # small model follows a single edit on each paraphrase is its behaviour, not evaluate_edit's:
    # bench_edit measures that over many facts).
    n = len(_target_ids(tokenizer, case.target))
    expected = [_greedy(model, tokenizer, p, n) == _target_ids(tokenizer, case.target) for p in request.paraphrases]
    assert [x["success"] for x in ev.requests[0]["paraphrases"]] == expected
    assert s["generalisation"] == pytest.approx(sum(expected) / len(expected))
    # The neighbours read none of the edited rows here, so their scores cannot move at all.
    assert s["specificity"] == s["specificity_before"]
    assert s["untouched_bit_identical"] and s["untouched_positions"] > 50
    assert any(c["prompt"] == collide for c in ev.colliding)
    assert s["touched_positions"] > 0
    assert "nll_before" in ev.fluency and "generation_entropy_after" in ev.fluency
    assert "bit-identical: True" in ev.report()
    # evaluate_edit leaves the model as it found it
    assert all(torch.equal(v, applied[k]) for k, v in model.state_dict().items())
    result.patch.revert(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_corpus_reach_is_the_exact_blast_radius(facts):
    """Every corpus position the index calls unreachable keeps bit-identical logits after the edit."""
    world, path, tokenizer, corpus = facts
    model = _load(path)
    docs = corpus[:24]
    index = CorpusIndex(model, tokenizer, docs, progress=False)
    case = _case(world, tokenizer, model)
    encoded = [tokenizer(d, return_tensors="pt").input_ids for d in docs]
    with torch.no_grad():
        before = [model(x).logits for x in encoded]
    patch = EngramEditor(model, tokenizer, progress=False).edit(EditRequest(case.prompt, case.target)).patch
    reach = index.reach(patch.rowset())
    unreachable = changed = 0
    with torch.no_grad():
        for x, b in zip(encoded, before):
            r = reachable(reads(model, patch.rowset(), x))[0]
            now = model(x).logits
            unreachable += _check_untouched(model, patch, x, b, now)
            changed += int((now[0, r] != b[0, r]).any(-1).sum())
    assert reach["positions_reachable"] == index.n_tokens - unreachable
    assert changed > 0 and unreachable > 0


def test_gate_key_edits_are_dense_and_revert_exactly(facts):
    world, path, tokenizer, _ = facts
    model = _load(path)
    original = _state(model)
    case = _case(world, tokenizer, model)
    result = EngramEditor(model, tokenizer, edit_keys=True, progress=False).edit(EditRequest(case.prompt, case.target))
    assert result.requests[0].success
    assert any("key_proj" in n for n in result.patch.dense_new)
    ev = evaluate_edit(model, tokenizer, result.patch, locality=[world.prompt(world.facts[-1])])
    assert ev.summary["untouched_positions"] == 0  # dense: nothing is guaranteed untouched
    result.patch.revert(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_orders_restrict_rows_and_blast_radius(facts):
    world, path, tokenizer, corpus = facts
    model = _load(path)
    state = _state(model)
    index = CorpusIndex(model, tokenizer, corpus, progress=False)
    case = _case(world, tokenizer, model)
    request = EditRequest(case.prompt, case.target)
    full = EngramEditor(model, tokenizer, corpus=index, progress=False).plan(request)["requests"][0]
    top = EngramEditor(model, tokenizer, orders=(3,), corpus=index, progress=False).plan(request)["requests"][0]
    assert top["rows"] < full["rows"]
    assert {g["order"] for g in top["ngrams"]} == {3}
    assert top["corpus"]["positions_reading_edited_rows"] <= full["corpus"]["positions_reading_edited_rows"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # planning changes nothing


def test_preserve_protects_other_readers_of_the_edited_rows(facts):
    """Other facts of the subject read the same rows ("of X is" ends the capital, language and
    currency prompts alike). With a corpus index, preserve=k keeps their predictions closer."""
    world, path, tokenizer, corpus = facts
    case = next(c for c in world.counterfactuals(seed=4) if c.fact.relation == "language")
    sibling = world.prompt(world.fact(case.fact.subject, "capital"))
    ids = tokenizer(sibling, return_tensors="pt").input_ids
    drift = {}
    for preserve in (0, 16):
        model = _load(path)
        with torch.no_grad():
            before = model(ids).logits[0, -1].log_softmax(-1)
        index = CorpusIndex(model, tokenizer, corpus, progress=False) if preserve else None
        editor = EngramEditor(model, tokenizer, corpus=index, preserve=preserve, progress=False)
        result = editor.edit(EditRequest(case.prompt, case.target))
        assert result.requests[0].success
        assert bool(reads(model, result.patch.rowset(), ids).any())  # the sibling reads edited rows
        with torch.no_grad():
            after = model(ids).logits[0, -1].log_softmax(-1)
        drift[preserve] = float(torch.nn.functional.kl_div(after, before, log_target=True, reduction="sum"))
    assert drift[16] < drift[0], drift


def test_exclusive_edits_only_rows_no_other_context_reads(facts):
    """exclusive=True leaves out every row another context of the corpus reads. Checked on raw token
    ids, apart from the editor's canonical n-grams: each corpus position reading an edited row has
    the subject's tokens ending at most two tokens before it (an n-gram of order 3 reaches that far)."""
    world, path, tokenizer, corpus = facts
    model = _load(path)
    index = CorpusIndex(model, tokenizer, corpus, progress=False)
    case = _case(world, tokenizer, model)
    request = EditRequest(case.prompt, case.target, subject=case.fact.subject)
    subject = tokenizer(" " + case.fact.subject, add_special_tokens=False).input_ids

    def foreign(rowset) -> int:
        """Corpus positions reading ``rowset`` with no mention of the subject ending within 2 tokens."""
        out = 0
        for layer, rows in rowset.rows.items():
            for row in rows.tolist():
                for p in index.positions(layer, row).tolist():
                    doc, _ = index.locate_position(p)
                    start = int(index.doc_start[doc])
                    ends = range(max(start + len(subject) - 1, p - 2), p + len(subject))
                    out += not any(index.ids[e - len(subject) + 1 : e + 1].tolist() == subject for e in ends)
        return out

    # Every position's rows: the prompt's words ("The capital of") are read by every subject's prompt.
    plain = EngramEditor(model, tokenizer, positions="all", progress=False).edit(request, apply=False)
    assert foreign(plain.patch.rowset()) > 0
    editor = EngramEditor(model, tokenizer, positions="all", corpus=index, exclusive=True, progress=False)
    result = editor.edit(request, apply=False)
    assert 0 < result.patch.num_rows < plain.patch.num_rows
    assert foreign(result.patch.rowset()) == 0
    assert result.requests[0].success
    with pytest.raises(ValueError, match="exclusive=True .* pass corpus"):
        EngramEditor(model, tokenizer, exclusive=True)


def test_bad_input_gets_clear_messages(facts):
    world, path, tokenizer, _ = facts
    model = _load(path)
    case = world.counterfactuals(seed=3)[0]
    editor = EngramEditor(model, tokenizer, progress=False)
    with pytest.raises(EditInputError, match="No edit requests"):
        editor.edit([])
    with pytest.raises(EditInputError, match="prompt is empty"):
        editor.edit(EditRequest("  ", case.target))
    with pytest.raises(EditInputError, match="target is empty"):
        editor.edit(EditRequest(case.prompt, ""))
    with pytest.raises(EditInputError, match="needs a 'prompt' and a 'target'"):
        editor.edit({"prompt": case.prompt})
    words = word_tokenizer(case.prompt.split() + ["Nowhere"])
    with pytest.raises(EditInputError, match=r"does not know \('Blorptania'\)"):
        EngramEditor(model, words, progress=False).edit(EditRequest("The capital of Blorptania is", " Nowhere"))
    big = word_tokenizer([f"w{i}" for i in range(model.config.vocab_size + 5)])
    with pytest.raises(EditInputError, match="outside the model's vocabulary"):
        EngramEditor(model, big, progress=False).edit(EditRequest("w1 w2", f" w{model.config.vocab_size + 2}"))
    # No Engram row to edit: Engram masked, a model without Engram layers, impossible orders.
    model.engram_mask = True
    with pytest.raises(EditInputError, match="masked"):
        EngramEditor(model, tokenizer)
    model.engram_mask = False
    from engram_hf import EngramMoEForCausalLM

    with pytest.raises(EditInputError, match="no Engram layers"):
        EngramEditor(EngramMoEForCausalLM(tiny_config(engram_layer_ids=[])), tokenizer)
    with pytest.raises(ValueError, match="orders must be n-gram orders in 2..3"):
        EngramEditor(model, tokenizer, orders=(4,))
    with pytest.raises(EditInputError, match="empty"):
        locate(model, tokenizer, "")


def test_cli_locate_edit_and_patch_commands(facts, tmp_path, capsys):
    world, path, tokenizer, corpus = facts
    case = _case(world, tokenizer, _load(path))
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(corpus[:20]), encoding="utf-8")
    assert cli_main(["locate", str(path), "--text", case.prompt, "--corpus", str(corpus_file)]) == 0
    assert "gate per branch" in capsys.readouterr().out
    assert cli_main(["locate", str(path), "--text", case.prompt, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"]

    patch_file = tmp_path / "fix.safetensors"
    argv = ["edit", str(path), "--prompt", case.prompt, "--target", case.target, "--out", str(patch_file)]
    assert (
        cli_main([*argv, "--paraphrase", case.near[0], "--subject", case.fact.subject, "--engram-offload", "disk"]) == 0
    )
    out = capsys.readouterr().out
    assert "efficacy (target is the greedy completion): 0.0% -> 100.0%" in out
    assert patch_file.exists()
    assert cli_main(["patch", "show", str(patch_file)]) == 0
    assert case.target in capsys.readouterr().out
    assert cli_main(["patch", "apply", str(path), str(patch_file), "--out", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    patched = _load(tmp_path / "ckpt")
    n = len(_target_ids(tokenizer, case.target))
    assert _greedy(patched, tokenizer, case.prompt, n) == _target_ids(tokenizer, case.target)
    assert cli_main(["patch", "stack", str(patch_file), str(patch_file), "--out", str(tmp_path / "s.safetensors")]) == 1
    assert "not made on top" in capsys.readouterr().err
    assert cli_main(["patch", "revert", str(path), str(patch_file), "--out", str(tmp_path / "r")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("engram-hf patch: error:") and "new values" in last
    assert cli_main(["edit", str(path), "--prompt", case.prompt, "--target", ""]) == 1
    assert "target is empty" in capsys.readouterr().err
    assert cli_main([*argv[:-2], "--exclusive"]) == 1  # exclusive rows are judged against a corpus
    assert "exclusive=True" in capsys.readouterr().err
    argv = [*argv[:-1], str(tmp_path / "excl.safetensors"), "--subject", case.fact.subject]
    assert cli_main([*argv, "--exclusive", "--corpus", str(corpus_file)]) == 0
    assert "efficacy (target is the greedy completion): 0.0% -> 100.0%" in capsys.readouterr().out
    assert cli_main(["patch", "show", str(path / "config.json")]) == 1
    assert "not a safetensors file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fp8_facts(tmp_path_factory):
    """The fact world learned by a model of DeepSeek-V4.1's dialect (rows of 32, so FP8-able),
    trained in float and quantised to FP8 tables by ``quantize_checkpoint``."""
    from engram_hf.quantize import quantize_checkpoint

    torch.manual_seed(0)
    world = FactWorld(n_subjects=8, n_languages=3, n_currencies=3, seed=0)
    model, tokenizer = train_fact_model(
        world, _filler(), steps=140, lr=1e-2, progress=False, engram_dialect="deepseek_v41", engram_n_embed_per_ngram=64
    )
    root = tmp_path_factory.mktemp("fp8_facts")
    model.save_pretrained(root / "float")
    tokenizer.save_pretrained(root / "float")
    report = quantize_checkpoint(root / "float", root / "fp8", progress=False)
    return world, root / "fp8", tokenizer, report


def test_fp8_edits_rewrite_bytes_and_scales_and_revert_bit_exactly(fp8_facts, tmp_path):
    world, path, tokenizer, report = fp8_facts
    assert all(0 < t["relative_rms_error"] < 0.05 for t in report["tables"].values())
    model = _load(path)
    assert model.model.layers[0].engram.quantized
    case = _case(world, tokenizer, model)
    original = {
        k: v.view(torch.uint8) if v.dtype.itemsize == 1 and v.is_floating_point() else v
        for k, v in _state(model).items()
    }
    editor = EngramEditor(model, tokenizer, progress=False)
    result = editor.edit(EditRequest(case.prompt, case.target, true_target=case.true_target))
    assert result.converged and result.requests[0].success, "optimised through the FP8 rounding it is served with"
    n = len(_target_ids(tokenizer, case.target))
    assert _greedy(model, tokenizer, case.prompt, n) == _target_ids(tokenizer, case.target)
    patch = result.patch
    layer = next(iter(patch.rows))
    assert patch.new[layer].dtype == torch.uint8 and patch.new[layer].shape[1] == 32 + 1
    # The disk tier serves the same patch as an overlay, the file untouched; the served rows agree.
    disk = _load(path, engram_offload="disk")
    patch.apply(disk)
    ids = tokenizer(case.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(disk(ids).logits, model(ids).logits)
    # ... and on a checkpoint copy; reverting restores every byte and scale.
    out = apply_to_checkpoint(patch, path, tmp_path / "patched")
    assert torch.equal(_load(out).model.layers[layer].engram.read_stored_rows(patch.rows[layer]), patch.new[layer])
    editor.undo()
    for k, v in model.state_dict().items():
        v = v.view(torch.uint8) if v.dtype.itemsize == 1 and v.is_floating_point() else v
        assert torch.equal(v, original[k]), k


def _texts(tokenizer, seqs):
    return [tokenizer.decode(ids[:first], skip_special_tokens=True) for ids, first, _ in seqs]


def test_templates_and_prefixes_are_contexts_through_the_subjects_rows(facts):
    world, path, tokenizer, _ = facts
    model = _load(path)
    case = _case(world, tokenizer, model)
    request = EditRequest(case.prompt, case.target, subject=case.subject, relation=case.relation)
    templates = world.templates()
    editor = EngramEditor(model, tokenizer, templates=templates, prefixes=2, progress=False)
    seqs = editor.sequences(request)[0]
    # The relation's phrasings, the prompt's own among them: it is the prompt, not a second context.
    filled = [t.replace("{}", case.subject) for t in templates[case.relation]]
    assert case.prompt in filled
    filled = [t for t in filled if t != case.prompt]
    texts = _texts(tokenizer, seqs)
    assert texts[: 1 + len(filled)] == [case.prompt, *filled]
    assert [exact for _, _, exact in seqs] == [True] + [False] * (len(seqs) - 1)
    prefixes = editor.prefix_texts()
    assert len(prefixes) == 2 and len(seqs) == (1 + len(filled)) * 3
    assert all(t.endswith(base) for t, base in zip(texts[1 + len(filled) :], [case.prompt, *filled] * 2))
    assert EngramEditor(model, tokenizer, prefixes=2, progress=False).prefix_texts() == prefixes  # seeded
    assert EngramEditor(model, tokenizer, prefixes=2, seed=1, progress=False).prefix_texts() != prefixes
    # No held-out phrasing is among them.
    assert not set(texts) & set(case.far + case.near)
    # The rows a template's last position reads (the relation's words) are not edited.
    rowset = editor.plan(request)
    rows = {}
    for g in rowset["requests"][0]["ngrams"]:
        rows.setdefault(g["layer"], []).append(g["row"])
    plan_rows = RowSet({k: torch.tensor(v) for k, v in rows.items()})
    for text in filled:
        ids = tokenizer(text, return_tensors="pt").input_ids
        for layer, r in model.engram_row_ids(ids).items():
            at_subject = {g["row"] for g in rowset["requests"][0]["ngrams"] if g["at"] == "subject"}
            last = [x for x in r[0, -1].tolist() if x not in at_subject]
            assert not plan_rows.contains(layer, torch.tensor(last)).any()
    # After the edit every context gives the target at context_prob or more (checked independently).
    result = editor.edit(request)
    assert result.converged
    with torch.no_grad():
        for ids, first, exact in seqs:
            x = torch.tensor([ids])
            logp = model(x).logits[0].log_softmax(-1)
            p = logp[torch.arange(first - 1, len(ids) - 1), x[0, first:]].exp()
            assert bool((p >= (0.9 if exact else 0.5)).all()), (tokenizer.decode(ids), p)
    with pytest.raises(EditInputError, match=r"exactly once, as \{\}"):
        EngramEditor(model, tokenizer, templates={"capital": ["The capital is"]})


def test_keep_related_holds_the_subjects_other_relations(facts):
    """An edit through the subject's rows moves everything said of the subject; with templates for
    the other relations, keep_related holds them. Measured on the other relations' prompts, which
    are not among the templates."""
    world, path, tokenizer, _ = facts
    case = next(c for c in world.counterfactuals(seed=4) if c.relation == "language")
    others = [world.prompt(world.fact(case.subject, r)) for r in world.relations if r != case.relation]
    ids = [tokenizer(p, return_tensors="pt").input_ids for p in others]
    drift = {}
    for keep in (False, True):
        model = _load(path)
        with torch.no_grad():
            before = [model(x).logits[0, -1].log_softmax(-1) for x in ids]
        editor = EngramEditor(model, tokenizer, templates=world.templates(), keep_related=keep, progress=False)
        result = editor.edit(EditRequest(case.prompt, case.target, subject=case.subject, relation=case.relation))
        assert result.requests[0].success
        with torch.no_grad():
            after = [model(x).logits[0, -1].log_softmax(-1) for x in ids]
        drift[keep] = sum(
            float(torch.nn.functional.kl_div(a, b, log_target=True, reduction="sum")) for a, b in zip(after, before)
        )
    assert drift[True] < drift[False], drift


def test_edit_many_and_revert_in_any_order_the_patches_allow(facts):
    world, path, tokenizer, _ = facts
    model = _load(path)
    original = _state(model)
    subject = world.subjects[2]
    same = [c for c in world.counterfactuals(seed=7) if c.subject == subject][:2]
    other = [c for c in world.counterfactuals(seed=7) if c.subject not in (subject,)][:2]
    cases = [same[0], *other, same[1]]
    requests = [EditRequest(c.prompt, c.target, subject=c.subject) for c in cases]
    editor = EngramEditor(model, tokenizer, progress=False)
    seen = []
    results = editor.edit_many(requests, callback=lambda done, r: seen.append(done), progress=False)
    assert seen == [1, 2, 3, 4] and len(editor.history) == 4
    assert all(r.requests[0].success for r in results[1:])
    # The two edits of one subject share its rows: the first cannot go before the last.
    assert 0 not in editor.revertible() and 3 in editor.revertible()
    with pytest.raises(PatchMismatchError, match=r"later patches \[3\]"):
        editor.revert(0)
    order = []
    rng = random.Random(0)
    while editor.history:
        i = rng.choice(editor.revertible())
        order.append(editor.history[i])
        editor.revert(i)
    assert order[0] is not results[0].patch
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    # Batched: one patch per batch, every request of it met.
    results = editor.edit_many(requests[1:3], batch_size=2, progress=False)
    assert len(results) == 1 and len(results[0].requests) == 2 and results[0].converged
    assert len(editor.history) == 1 and editor.history[0] is results[0].patch
    editor.undo()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_counterfact_scores_match_an_independent_count(facts):
    world, path, tokenizer, corpus = facts
    model = _load(path)
    cases = [c for c in world.counterfactuals(seed=8)][:3]
    editor = EngramEditor(model, tokenizer, templates=world.templates(), progress=False)
    editor.edit_many([EditRequest(c.prompt, c.target, subject=c.subject, relation=c.relation) for c in cases])
    score_cases = [
        ScoreCase(c.prompt, c.target, c.true_target, {"near": c.near, "far": c.far}, c.neighbours[:3]) for c in cases
    ]
    got = counterfact_scores(model, tokenizer, score_cases, batch_size=5)

    @torch.no_grad()
    def logp(prompt, answer):
        p, a = tokenizer(prompt).input_ids, _target_ids(tokenizer, answer)
        x = torch.tensor([p + a])
        lp = model(x).logits[0].log_softmax(-1)
        return float(lp[torch.arange(len(p) - 1, len(x[0]) - 1), x[0, len(p) :]].sum())

    greedy_ok = lambda p, a: _greedy(model, tokenizer, p, len(_target_ids(tokenizer, a))) == _target_ids(tokenizer, a)
    pct = lambda xs: 100 * sum(xs) / len(xs)
    assert got["efficacy"] == pytest.approx(
        pct([logp(c.prompt, c.target) > logp(c.prompt, c.true_target) for c in cases])
    )
    assert got["efficacy_top1"] == pytest.approx(pct([greedy_ok(c.prompt, c.target) for c in cases]))
    for group in ("near", "far"):
        ok = [logp(p, c.target) > logp(p, c.true_target) for c in cases for p in getattr(c, group)]
        assert got[f"generalisation_{group}"] == pytest.approx(pct(ok))
    spec = [logp(p, a) > logp(p, c.target) for c in cases for p, a in c.neighbours[:3]]
    assert got["specificity"] == pytest.approx(pct(spec)) and got["neighbours"] == len(spec)
    assert got["specificity_top1"] == pytest.approx(pct([greedy_ok(p, a) for c in cases for p, a in c.neighbours[:3]]))
    # Exact locality of all the edits together, on corpus text: every untouched position bit-identical.
    stacked = EngramPatch.stack(editor.history)
    exact = exact_locality(model, tokenizer, stacked, corpus[:10])
    assert 0 < exact["untouched_positions"] == exact["untouched_bit_identical"] < exact["positions"]


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_cli_edit_requests_file_writes_patches_and_a_report(facts, tmp_path, capsys):
    world, path, tokenizer, _ = facts
    cases = [c for c in world.counterfactuals(seed=9)][:3]
    rows = [
        {
            "prompt": RELATIONS[c.relation].prompt.replace("{s}", "{}"),
            "subject": c.subject,
            "target": c.target,
            "true_target": c.true_target,
            "relation": c.relation,
            "eval_paraphrases": c.far,
            "neighbours": [list(n) for n in c.neighbours[:2]],
        }
        for c in cases[:2]
    ]
    c = cases[2]
    rows.append(  # a CounterFact record (targets without their leading space, as CounterFact writes them)
        {
            "case_id": 7,
            "requested_rewrite": {
                "prompt": RELATIONS[c.relation].prompt.replace("{s}", "{}"),
                "subject": c.subject,
                "relation_id": c.relation,
                "target_new": {"str": c.new_object},
                "target_true": {"str": c.fact.object},
            },
            "paraphrase_prompts": c.near,
            "neighborhood_prompts": [p for p, _ in c.neighbours[:2]],
        }
    )
    requests = _jsonl(tmp_path / "edits.jsonl", rows)
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(world.templates()))
    out = tmp_path / "run"
    argv = ["edit", str(path), "--requests", str(requests), "--out", str(out), "--checkpoints", "2"]
    assert cli_main([*argv, "--templates", str(templates)]) == 0
    printed = capsys.readouterr().out
    assert "3 requests" in printed and "untouched positions bit-identical" in printed
    results = json.loads((out / "results.json").read_text())
    assert [p["edits"] for p in results["curve"]] == [1, 3]
    assert results["final"]["efficacy"] == 100.0 and results["final"]["cases"] == 3
    assert results["final"]["paraphrases"] == len(cases[0].far) + len(cases[1].far) + len(c.near)
    assert results["exact"]["untouched_bit_identical"] == results["exact"]["untouched_positions"] > 0
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "![metrics](metrics.png)" in report and "| 3 |" in report
    patches = sorted((out / "patches").iterdir())
    assert [p.name for p in patches] == ["00000.safetensors", "00001.safetensors", "00002.safetensors"]
    # The patches, applied in order to a fresh copy, give every new target; stacked, they revert it.
    model = _load(path)
    original = _state(model)
    loaded = [EngramPatch.load(p) for p in patches]
    for p in loaded:
        p.apply(model)
    for case in cases:
        n = len(_target_ids(tokenizer, case.target))
        assert _greedy(model, tokenizer, case.prompt, n) == _target_ids(tokenizer, case.target)
    EngramPatch.stack(loaded).revert(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

    # A directory the command did not write is refused, before any work, and left as it is; so are the
    # checkpoint and a directory holding the requests.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    base = ["edit", str(path), "--requests", str(requests), "--templates", str(templates), "--out"]
    for target, message in [
        (mine, "already holds notes.txt"),
        (path, "which engram-hf edit reads"),
        (tmp_path, "holds"),
    ]:
        capsys.readouterr()
        assert cli_main([*base, str(target)]) == 1
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # Its own earlier output is replaced whole (the per-request patches go: one stacked patch now); the
    # user's file beside it is kept.
    (out / "notes.txt").write_text("mine")
    assert cli_main([*base, str(out), "--stack", "--batch-size", "3"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "metrics.png",
        "notes.txt",
        "patch.safetensors",
        "report.md",
        "results.json",
    ]
    stacked = EngramPatch.load(out / "patch.safetensors")
    assert len(stacked.requests) == 3
    assert json.loads((out / "results.json").read_text())["settings"]["batch_size"] == 3
    assert cli_main([*base, str(mine), "--overwrite", "--checkpoints", "1"]) == 0
    capsys.readouterr()
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "report.md").exists()
    # Bad lines are named.
    bad = _jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": "x", "target": " y", "colour": 1}])
    assert cli_main(["edit", str(path), "--requests", str(bad)]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_edit_request_fields_after_target_are_keyword_only_and_typed():
    with pytest.raises(TypeError):
        EditRequest("The capital of Zorbania is", " Quelth", "Zorbania")  # a subject given by position
    for kwargs, message in [
        (dict(paraphrases="The capital is"), "paraphrases must be a list of strings"),
        (dict(locality=[3]), "locality must be a list of strings"),
        (dict(subject=["Zorbania"]), "subject must be a string or None"),
        (dict(true_target=5), "true_target must be a string or None"),
    ]:
        with pytest.raises(EditInputError, match=message):
            EditRequest("The capital of Zorbania is", " Quelth", **kwargs)
    with pytest.raises(EditInputError, match="paraphrases must be a list of strings"):
        EditRequest.coerce({"prompt": "p", "target": " t", "paraphrases": "one prompt"})
    assert EditRequest("p", " t", paraphrases=("a", "b")).paraphrases == ["a", "b"]


def test_locate_and_edit_name_rows_alike(facts):
    """The rows ``locate`` prints for a prompt's last position are the global row ids ``edit`` prints."""
    import re

    world, path, tokenizer, _ = facts
    model = _load(path)
    case = _case(world, tokenizer, model)
    loc = locate(model, tokenizer, case.prompt, progress=False)
    last = loc.report().split(f"[{len(loc.tokens) - 1}]")[1]
    located = {int(r) for r in re.findall(r" row +(\d+) \(head", last)}
    assert located == {h.row for h in loc.positions[-1].rows}
    result = EngramEditor(model, tokenizer, positions="needed", progress=False).edit(
        EditRequest(case.prompt, case.target)
    )
    edited = {int(r) for r in re.findall(r"-gram .* row (\d+)$", result.report(), re.M)}
    assert edited and edited <= located
    assert any(h.row != h.index for h in loc.positions[-1].rows)  # the two numberings differ here


def test_cli_corpus_txt_is_one_context_per_line(facts, tmp_path, capsys):
    world, path, tokenizer, corpus = facts
    lines = [world.prompt(f) + " " + f.object + "." for f in world.facts[:5]]
    corpus_file = tmp_path / "facts.txt"
    corpus_file.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n", encoding="utf-8")
    assert cli_main(["locate", str(path), "--text", lines[0], "--corpus", str(corpus_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["corpus"]["documents"] == 5


def test_cli_outputs_never_replace_what_the_command_did_not_write(facts, tmp_path, capsys):
    """patch apply/revert/stack and edit: the source checkpoint, a user's directory or file, an existing
    patch are never replaced (or only with --overwrite, keeping the user's other files)."""
    world, path, tokenizer, _ = facts
    sha = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    digest = sha(path)
    model = _load(path)
    case = _case(world, tokenizer, model)
    patch_file = tmp_path / "fix.safetensors"
    EngramEditor(model, tokenizer, progress=False).edit(EditRequest(case.prompt, case.target)).patch.save(patch_file)
    patch_bytes = patch_file.read_bytes()

    def refused(argv, message):
        capsys.readouterr()
        assert cli_main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    apply = ["patch", "apply", str(path), str(patch_file), "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused([*apply, str(mine)], "already holds notes.txt")
    refused([*apply, str(path)], f"is {path}, which engram-hf patch apply reads")
    refused([*apply, str(path), "--overwrite"], "which engram-hf patch apply reads")
    refused([*apply, str(path / "patched")], "lies inside")
    refused([*apply, str(path.parent)], "holds")
    refused([*apply, str(patch_file)], "is a file")
    assert sha(path) == digest and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    assert cli_main([*apply, str(mine), "--overwrite"]) == 0
    assert (mine / "notes.txt").read_text() == "mine" and sha(mine) != digest
    out = tmp_path / "patched"
    assert cli_main([*apply, str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert cli_main([*apply, str(out)]) == 0  # its own earlier output: replaced, the user's notes kept
    assert (out / "notes.txt").read_text() == "mine" and sha(out) == sha(mine)
    refused(["patch", "revert", str(out), str(patch_file), "--out", str(mine)], "engram-hf patch apply wrote them")

    refused(
        ["edit", str(path), "--prompt", case.prompt, "--target", case.target, "--out", str(patch_file)],
        "already exists: choose a new name, or pass --overwrite",
    )
    refused(["patch", "stack", str(patch_file), "--out", str(patch_file), "--overwrite"], "patch stack reads")
    assert patch_file.read_bytes() == patch_bytes
    capsys.readouterr()
