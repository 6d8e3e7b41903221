"""DeepSeek-V4.1's Engram (the deepseek_v41 dialect, FP8 rows, V4.1 checkpoints), checked against a
restatement of the contract written here from ``../shared/notes/deepseek-v41-engram.md`` in plain
Python and numpy (``_note_*``), independently of ``engram_hf``'s hashing, decoding and fusion."""

import math
import re
import unicodedata

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engram_hf import EngramMoEForCausalLM
from engram_hf.deepseek_v41 import (
    V41StandIn,
    attach_v41_tables,
    is_v41_checkpoint,
    load_engram_v41,
    open_v41,
)
from engram_hf.editing import EngramPatch, apply_to_checkpoint, locate
from engram_hf.memory import HashContract, build_compression_table, layer_multipliers, table_primes
from engram_hf.optim import build_optimizer
from engram_hf.testing.deepseek_v41 import write_v41_checkpoint

from conftest import greedy_by_recompute, random_ids, tiny_causal_lm, tiny_model

INT64_MAX = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------- the note, restated
def _note_is_prime(n: int) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    return all(n % f for f in range(3, math.isqrt(n) + 1, 2))


def _note_primes(base: int, layer_ids, n_orders: int, heads: int) -> dict[int, list[int]]:
    """REF-E EngramLayout.from_args: one `seen` set; per (layer, order) restart at base - 1; each head
    takes the smallest unseen prime above `current`."""
    seen, out = set(), {}
    for layer in layer_ids:
        out[layer] = []
        for _ in range(n_orders):
            current = base - 1
            for _ in range(heads):
                p = current + 1
                while not _note_is_prime(p) or p in seen:
                    p += 1
                seen.add(p)
                out[layer].append(p)
                current = p
    return out


def _note_multipliers(layer: int, N: int, compressed: int) -> list[int]:
    bound = max(1, (INT64_MAX // compressed) // 2)
    return [int(x) * 2 + 1 for x in np.random.default_rng(10007 * layer).integers(0, bound, size=(N,), dtype=np.int64)]


def _note_key(text: str) -> str:
    """NFKC -> NFD -> strip accents -> lowercase -> collapse [ \\t\\r\\n]+ -> protect a lone space -> strip."""
    t = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    t = "".join(c for c in t if unicodedata.category(c) != "Mn").lower()
    t = re.sub(r"[ \t\r\n]+", " ", t)
    return " " if t == " " else t.strip()


def _note_token_map(tokenizer) -> list[int]:
    backend, keys, out = tokenizer.backend_tokenizer, {}, []
    for tid in range(len(tokenizer)):
        text = backend.decode([tid], skip_special_tokens=False)
        key = backend.id_to_token(tid) if "\ufffd" in text else (_note_key(text) or text)
        out.append(keys.setdefault(key, len(keys)))
    return out


def _note_hash_ids(v: list[int], pad: int, mult: list[int], primes: list[int], heads: int) -> list[list[int]]:
    """REF-E NgramHashState.forward on one sequence of compressed ids (DEAD = -1), offsets included."""
    offsets = [sum(primes[:j]) for j in range(len(primes))]
    out = []
    for p in range(len(v)):
        blocked, acc, ids = False, 0, [0] * len(primes)
        for s in range(len(mult)):
            blocked = blocked or p - s < 0 or v[p - s] == -1
            x = pad if blocked else v[p - s]
            acc ^= x * mult[s]
            if s >= 1:
                for j in range(heads):
                    col = (s - 1) * heads + j
                    ids[col] = acc % primes[col] + offsets[col]
        out.append(ids)
    return out


def _note_e4m3(byte: int) -> float:
    sign, e, m = byte >> 7, (byte >> 3) & 0xF, byte & 7
    if e == 15 and m == 7:
        return math.nan
    mag = m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -mag if sign else mag


def _note_row(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    vals = [_note_e4m3(int(c)) * 2.0 ** (int(scales[i // 32]) - 127) for i, c in enumerate(codes.tolist())]
    return torch.tensor(vals, dtype=torch.float64)


def _note_fusion(rows, wkv, q, k, h, dead, hc, D, eps):
    """REF-M Engram.forward: kv = wkv(x) in bf16; gate in fp32; out = (h + gate * v).to(bf16)."""
    kv = (rows.flatten(-2).double() @ wkv.double().T).to(torch.bfloat16)
    keys, value = kv[..., : hc * D].unflatten(-1, (hc, D)), kv[..., hc * D :]
    hf, kf, w = h.float(), keys.float(), q.float() * k.float()
    dot = (hf * w * kf).sum(-1) * torch.rsqrt(hf.square().mean(-1) + eps) * torch.rsqrt(kf.square().mean(-1) + eps)
    dot = dot / math.sqrt(D)
    root = torch.sqrt(dot.abs().clamp_min(1e-6))
    gate = torch.sigmoid(torch.where(dot < 0, -root, root))  # the positive root at 0
    gate = torch.where(dead[..., None], 0.0, gate)
    return kv, (hf + gate[..., None] * value.float()[..., None, :]).to(torch.bfloat16)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    mag = x.float().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def v41(tmp_path_factory, gpt2_tokenizer):
    path = tmp_path_factory.mktemp("v41") / "ckpt"
    write_v41_checkpoint(path, gpt2_tokenizer)
    return path


def _text_ids(tokenizer, texts):
    """Right-padded ids (with EOS) and their mask."""
    rows = [tokenizer(t).input_ids for t in texts]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.eos_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    return ids, mask


# ----------------------------------------------------------------------------- the released layout
def test_released_layout_and_multipliers():
    """The release's table sizes come out of the prime allocation exactly (one base for every order),
    and its multipliers out of the seeds; ours agree with the note's restatement."""
    ours = table_primes([16_000_000] * 3, 4, 8, [1, 14])
    note = _note_primes(16_000_000, [1, 14], 3, 8)
    assert {k: [p for o in v for p in o] for k, v in ours.items()} == note
    assert sum(note[1]) == 384_006_168 and sum(note[14]) == 384_016_682
    assert note[1][0] == 16_000_057 and note[1][-1] == 16_000_463 and note[14][0] == 16_000_477
    assert (INT64_MAX // 99092) // 2 == 46_539_438_283_891
    assert list(layer_multipliers(0, 1, 4, 99092)) == _note_multipliers(1, 4, 99092)
    assert _note_multipliers(1, 4, 99092) == [76632096046245, 4839876093313, 35959672319349, 73987337458391]
    assert list(layer_multipliers(0, 14, 4, 99092)) == [67716810739261, 51510806800915, 30921347202721, 82619226485591]


def test_token_map_is_the_raw_backend_decode(gpt2_tokenizer):
    table = build_compression_table(gpt2_tokenizer, progress=False, dialect="deepseek_v41")
    assert table.tolist() == _note_token_map(gpt2_tokenizer)
    with pytest.raises(ValueError, match="canonical ids under the deepseek_v41 token map"):
        build_compression_table(gpt2_tokenizer, progress=False, dialect="deepseek_v41", expected_size=99092)


# ----------------------------------------------------------------------------- a V4.1 checkpoint
def test_checkpoint_is_read_by_headers_and_described(v41):
    assert is_v41_checkpoint(v41)
    ckpt = open_v41(v41)
    d = ckpt.describe()
    assert d["layer_ids"] == [1, 3] and all(t["bytes_per_row"] == 33 for t in d["tables"])
    tables = ckpt.tables()
    assert all(t.quantized and t.dtype == "F8_E4M3" for t in tables.values())


def test_hashes_rows_and_fusion_match_the_note(v41, gpt2_tokenizer):
    engram = load_engram_v41(v41, gpt2_tokenizer)
    cfg = open_v41(v41).config
    texts = ["The capital of France is Paris, and", "Hello world"]
    ids, mask = _text_ids(gpt2_tokenizer, texts)
    mask[0, 3] = 0  # a DEAD position in the middle (an image span, in V4.1)
    token_map = _note_token_map(gpt2_tokenizer)
    pad = token_map[cfg.pad_token_id]
    got = engram.row_ids(ids, mask)
    inputs = engram.engram_inputs(ids, mask)
    ckpt = open_v41(v41)
    for layer in cfg.layer_ids:
        primes = _note_primes(cfg.vocab_size, cfg.layer_ids, cfg.max_ngram_size - 1, cfg.n_heads)[layer]
        mult = _note_multipliers(layer, cfg.max_ngram_size, cfg.compressed_vocab_size)
        for b in range(ids.shape[0]):
            v = [token_map[t] if m else -1 for t, m in zip(ids[b].tolist(), mask[b].tolist())]
            assert got[layer][b].tolist() == _note_hash_ids(v, pad, mult, primes, cfg.n_heads), (layer, b)
        # Rows: decoded exactly as the note's formula.
        memory = engram.layers[str(layer)]
        rows = got[layer][0, 5]
        stored = ckpt._tensor(layer, "embed.weight").view(torch.uint8)[rows]
        scales = ckpt._tensor(layer, "embed.scale").view(torch.uint8)[rows]
        note_rows = torch.stack([_note_row(c, s) for c, s in zip(stored, scales)])
        assert torch.equal(memory.read_rows(rows).double(), note_rows)
        # Fusion: kv and the output within one bf16 ulp of the note's, dead positions untouched.
        g = torch.Generator().manual_seed(layer)
        h = (torch.randn(*ids.shape, cfg.hc_mult, cfg.hidden_size, generator=g) * 3).to(torch.bfloat16)
        gathered = memory.lookup(inputs)[0].unflatten(-1, (-1, cfg.head_dim))
        q, k = ckpt.norm_weights(layer)
        kv, expected = _note_fusion(
            gathered, ckpt.projection(layer), q, k, h, mask == 0, cfg.hc_mult, cfg.hidden_size, cfg.rms_norm_eps
        )
        ours_kv = torch.cat([memory.key_proj(gathered.flatten(-2)), memory.value_proj(gathered.flatten(-2))], -1)
        assert ((ours_kv.float() - kv.float()).abs() <= _bf16_ulp(kv)).all()
        with torch.no_grad():
            out = memory(h, inputs)
        assert ((out.float() - expected.float()).abs() <= _bf16_ulp(expected)).all()
        assert torch.equal(out[0, 3], h[0, 3]), "a dead position's streams pass through untouched"


def test_every_tier_and_the_stand_in_gates(v41, gpt2_tokenizer):
    ids, mask = _text_ids(gpt2_tokenizer, ["Rows depend on token ids only", "so every tier agrees"])
    outs = []
    for kwargs in (dict(engram_offload="cpu"), dict(engram_offload="disk"), dict(engram_cache_rows=8)):
        engram = load_engram_v41(v41, gpt2_tokenizer, **kwargs)
        inputs = engram.engram_inputs(ids, mask)
        outs.append({layer: m.lookup(inputs)[0] for layer, m in engram.memories().items()})
    assert all(torch.equal(o[k], outs[0][k]) for o in outs for k in o)
    stand_in = V41StandIn(engram, open_v41(v41))
    where = locate(stand_in, gpt2_tokenizer, "The capital of France is", progress=False)
    assert len(where.positions) == 5
    first = where.positions[0]
    assert {h.layer for h in first.rows} == {1, 3} and set(first.gates) == {1, 3}
    assert all(len(g) == 4 and all(0 < a < 1 for a in g) for g in first.gates.values())


def test_patch_on_a_v41_checkpoint_rewrites_bytes_and_scales_and_reverts_bit_exactly(v41, gpt2_tokenizer, tmp_path):
    import hashlib

    from engram_hf.utils import OUTPUT_MARKER

    def digest(d):  # the checkpoint's files (the output marker names the command that wrote it)
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in d.iterdir() if f.name != OUTPUT_MARKER}

    before = digest(v41)
    engram = load_engram_v41(v41, gpt2_tokenizer)
    ids, _ = _text_ids(gpt2_tokenizer, ["Paris is the capital of France"])
    rows = engram.row_ids(ids)[1][0, -1]
    new = engram.layers["1"].read_rows(rows) * 3.0 + 0.01  # new values need new codes and new scales
    patch = EngramPatch.from_values(engram, {1: (rows, new)})
    stored = patch.new[1]
    assert stored.dtype == torch.uint8 and stored.shape == (rows.numel(), 33)
    assert (patch.old[1][:, 32:] != stored[:, 32:]).any(), "the scales change too"
    patch.save(tmp_path / "fix.safetensors")
    patch = EngramPatch.load(tmp_path / "fix.safetensors")
    out = apply_to_checkpoint(patch, v41, tmp_path / "patched")
    reread = load_engram_v41(out, gpt2_tokenizer).layers["1"]
    torch.testing.assert_close(reread.read_rows(rows), new, rtol=2**-3, atol=0)  # within E4M3's rounding
    assert torch.equal(reread.read_stored_rows(rows), stored)
    back = apply_to_checkpoint(patch, out, tmp_path / "back", revert=True)
    assert digest(back) == before and digest(v41) == before


def test_attach_v41_tables_to_a_causal_lm(v41, gpt2_tokenizer):
    base = tiny_causal_lm("llama", vocab_size=len(gpt2_tokenizer), num_hidden_layers=4)
    ids, mask = _text_ids(gpt2_tokenizer, ["The quick brown fox jumps", "over the dog"])
    with torch.no_grad():
        before = base(ids, attention_mask=mask).logits
    attach_v41_tables(base, v41, gpt2_tokenizer)
    with torch.no_grad():
        assert torch.equal(base(ids, attention_mask=mask).logits, before), "silent at attach"
    alone = load_engram_v41(v41, gpt2_tokenizer)
    got = base.engram.adapter().row_ids(ids, mask)
    assert all(torch.equal(got[k], alone.row_ids(ids, mask)[k]) for k in got), "V4.1's rows, read as in V4.1"
    with pytest.raises(RuntimeError, match="FP8 Engram tables cannot be trained.*train_tables=False"):
        build_optimizer(base, lr=1e-2)
    opt = build_optimizer(base, lr=1e-2, train_tables=False)
    base.train()
    for _ in range(2):
        base(ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert not torch.equal(base.eval()(ids, attention_mask=mask).logits, before)
    short = tiny_causal_lm("llama", vocab_size=len(gpt2_tokenizer), num_hidden_layers=3)
    with pytest.raises(ValueError, match="out of range"):
        attach_v41_tables(short, v41, gpt2_tokenizer)


# ----------------------------------------------------------------------------- the dialect in EngramMoE
V41_MODEL = dict(
    engram_dialect="deepseek_v41", engram_n_embed_per_ngram=64, engram_max_ngram_size=4, engram_vocab_size=53
)


@pytest.mark.parametrize("fmt", ["float", "fp8"])
def test_cached_decoding_equals_recompute_under_left_padding(fmt):
    model = tiny_model(sharp=True, engram_table_format=fmt, **V41_MODEL)
    assert model.model.layers[0].engram.conv is None
    ids = random_ids(3, 7, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_by_recompute(model, ids, 6, mask))
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    assert beams.shape == (3, 11)


def test_chunked_prefill_reads_the_same_rows_as_one_pass():
    """The look-back (last N-1 canonical ids, DEAD flags included) carries across chunks in the cache."""
    from transformers import DynamicCache

    model = tiny_model(engram_table_format="fp8", **V41_MODEL).eval()
    ids = random_ids(2, 12, seed=4)
    mask = torch.ones_like(ids)
    mask[0, 5] = 0  # DEAD just before the chunk boundary: it must still block the next chunk's n-grams
    base = model.model
    full = {k: v for k, v in base.engram_row_ids(ids, mask).items()}
    cache = DynamicCache(config=model.config)
    parts = {k: [] for k in full}
    for a, b in ((0, 6), (6, 9), (9, 12)):
        inputs = base.engram_inputs(ids[:, a:b], mask[:, a:b], cache)
        for layer, e in base._engram_layers().items():
            parts[layer].append(e.row_ids(inputs))
    for layer in full:
        assert torch.equal(torch.cat(parts[layer], 1), full[layer])
    # ... and the logits of a chunked prefill equal one pass (to float rounding: attention splits).
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        chunks = [model(ids[:, a:b], attention_mask=mask[:, :b], cache=cache).logits for a, b in ((0, 6), (6, 12))]
        torch.testing.assert_close(torch.cat(chunks, 1), model(ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(engram_offload="cpu"), dict(engram_offload="disk", engram_cache_rows=8)]
)
def test_fp8_checkpoint_tiers_are_bit_identical(tmp_path, kwargs):
    model = tiny_model(engram_table_format="fp8", **V41_MODEL)
    model.save_pretrained(tmp_path / "ckpt")
    ids, mask = random_ids(2, 9, seed=3), torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", **kwargs).eval()
        assert torch.equal(loaded(ids, attention_mask=mask).logits, expected)
    if kwargs:  # a save of the offloaded model streams both tensors of every table
        loaded.save_pretrained(tmp_path / "again")
        again = EngramMoEForCausalLM.from_pretrained(tmp_path / "again").eval()
        with torch.no_grad():
            assert torch.equal(again(ids, attention_mask=mask).logits, expected)


def test_fp8_tables_keep_their_bytes_through_dtype_casts():
    model = tiny_model(engram_table_format="fp8", **V41_MODEL)
    table = model.model.layers[0].engram.table
    before = table.weight.view(torch.uint8).clone(), table.scale.view(torch.uint8).clone()
    model.to(torch.bfloat16)
    assert table.weight.dtype == torch.float8_e4m3fn and table.scale.dtype == torch.float8_e8m0fnu
    assert torch.equal(table.weight.view(torch.uint8), before[0]) and torch.equal(
        table.scale.view(torch.uint8), before[1]
    )
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 5)).logits).all()


def test_config_validates_dialect_and_format():
    from engram_hf import EngramMoEConfig

    with pytest.raises(ValueError, match="engram_dialect must be one of"):
        EngramMoEConfig(engram_dialect="v5")
    with pytest.raises(ValueError, match="engram_table_format must be one of"):
        EngramMoEConfig(engram_table_format="int4")
    with pytest.raises(ValueError, match="multiple of 32"):
        EngramMoEConfig(engram_table_format="fp8", engram_n_embed_per_ngram=80, engram_n_head_per_ngram=8)
    EngramMoEConfig(engram_dialect="deepseek_v41", engram_kernel_size=0)  # no conv: no kernel size needed
    contract = HashContract.from_config(EngramMoEConfig(engram_dialect="deepseek_v41", **{"engram_vocab_size": 101}))
    assert contract.engram_vocab_size == (101, 101)


def test_cli_inspect_and_locate_a_v41_checkpoint(v41, tmp_path, capsys):
    import json

    from safetensors.torch import save_file

    from engram_hf.cli import main as cli_main

    assert cli_main(["inspect", str(v41), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dialect"] == "deepseek_v41"
    text = "The capital of France"
    assert cli_main(["locate", str(v41), "--text", text, "--json"]) == 0
    stand_in = json.loads(capsys.readouterr().out)
    # Given hidden states (as a V4.1 run would capture them) replace the stand-in: other gates, same rows.
    cfg = open_v41(v41).config
    T = len(stand_in["positions"])
    hidden = {f"layer.{i}": torch.ones(1, T, cfg.hc_mult, cfg.hidden_size) for i in cfg.layer_ids}
    save_file(hidden, str(tmp_path / "hidden.safetensors"))
    assert (
        cli_main(
            ["locate", str(v41), "--text", text, "--json", "--hidden-states", str(tmp_path / "hidden.safetensors")]
        )
        == 0
    )
    given = json.loads(capsys.readouterr().out)
    assert [p["rows"] for p in given["positions"]] == [p["rows"] for p in stand_in["positions"]]
    assert [p["gates"] for p in given["positions"]] != [p["gates"] for p in stand_in["positions"]]
    assert cli_main(["locate", str(v41), "--text", text, "--hidden-states", str(tmp_path / "missing.safetensors")]) == 1
