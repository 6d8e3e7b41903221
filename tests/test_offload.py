"""Offloaded Engram tables: identical outputs on every tier, bounded memory for huge disk tables."""

import json
import os
import struct

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

import engram_hf.offload.loading as loading
from engram_hf import EngramMoEForCausalLM
from engram_hf.cli import main as cli_main

from conftest import tiny_config, tiny_model

TIERS = [
    dict(),
    dict(engram_offload="cpu"),
    dict(engram_offload="disk"),
    dict(engram_offload="disk", engram_cache_rows=64),
    dict(engram_offload="cpu", engram_cache_rows=16),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload")
    tiny_model().save_pretrained(path)
    return path


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 97, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return ids, mask


@pytest.mark.parametrize("kwargs", TIERS, ids=lambda k: "-".join(f"{v}" for v in k.values()) or "resident")
def test_tiers_are_bit_identical(ckpt, kwargs):
    ids, mask = _batch()
    resident = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    model = AutoModelForCausalLM.from_pretrained(ckpt, **kwargs).eval()
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for _ in range(2):  # twice, so that a cache serves hits the second time
            assert torch.equal(model(ids, attention_mask=mask).logits, resident(ids, attention_mask=mask).logits)
        assert torch.equal(
            model.generate(ids, attention_mask=mask, **gen), resident.generate(ids, attention_mask=mask, **gen)
        )
    stats = model.engram_offload_stats()
    if not kwargs:
        assert stats == {}
        return
    assert set(stats) == set(model.config.engram_layer_ids)
    for s in stats.values():
        assert s["tier"] == kwargs["engram_offload"]
        # CPU compute: no transfer to hide, so lookups are synchronous (prefetch is for accelerators).
        assert s["prefetched_lookups"] == 0 and s["synchronous_lookups"] > 0
        if kwargs.get("engram_cache_rows"):
            assert s["cache"]["hits"] > 0 and s["cache"]["misses"] > 0
            assert 0 < s["cache"]["hit_rate"] < 1


def test_prefetch_path_matches_synchronous_path(ckpt, monkeypatch):
    """The background path (used with accelerators) gives the same rows; exercised here by
    pretending CPU tensors need a transfer."""
    from engram_hf.offload import table as table_mod

    ids, mask = _batch()
    ref = AutoModelForCausalLM.from_pretrained(ckpt, engram_offload="disk").eval()
    model = AutoModelForCausalLM.from_pretrained(ckpt, engram_offload="disk", engram_cache_rows=32).eval()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
    monkeypatch.setattr(table_mod.OffloadedTable, "background_fetch", staticmethod(lambda device: True))
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    assert all(s["prefetched_lookups"] > 0 for s in model.engram_offload_stats().values())


def test_offloaded_model_has_no_table_parameters_and_saves_by_streaming(ckpt, tmp_path):
    m = EngramMoEForCausalLM.from_pretrained(ckpt, engram_offload="disk")
    assert not any("table" in n for n, _ in m.named_parameters())
    assert "engram_offload" not in m.config.to_dict()
    m.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x" / "model.safetensors").exists(), "a lone file would hide the table shards"
    again = EngramMoEForCausalLM.from_pretrained(tmp_path / "x")
    original = EngramMoEForCausalLM.from_pretrained(ckpt)
    for layer, engram in again.engram_layers().items():
        assert torch.equal(engram.table.weight, original.engram_layers()[layer].table.weight)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_table_files_never_reach_transformers_loader(ckpt, tmp_path, tier, monkeypatch):
    """transformers memory-maps every file it is given, copy-on-write: a table file larger than RAM
    fails there (ENOMEM) although its keys are skipped. Offloaded tables' own files must not go."""
    import transformers.modeling_utils as mu

    streamed = tmp_path / "streamed"
    EngramMoEForCausalLM.from_pretrained(ckpt, engram_offload="disk").save_pretrained(streamed)
    table_files = {p.name for p in streamed.glob("*.safetensors") if "table" in p.name}
    assert table_files, "the streamed checkpoint keeps its tables in files of their own"
    opened = []
    real = mu.safe_open

    def recording(file, *args, **kwargs):
        opened.append(os.path.basename(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(mu, "safe_open", recording)
    model = EngramMoEForCausalLM.from_pretrained(streamed, engram_offload=tier)
    assert opened and not table_files & set(opened)
    resident = EngramMoEForCausalLM.from_pretrained(streamed)
    assert table_files <= set(opened)  # resident tables are loaded by transformers, as before
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, resident(ids, attention_mask=mask).logits)


def test_offloaded_model_with_patched_rows_refuses_to_save(ckpt, tmp_path):
    m = EngramMoEForCausalLM.from_pretrained(ckpt, engram_offload="cpu")
    m.engram_layers()[0].write_rows(torch.tensor([3]), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="patched rows"):
        m.save_pretrained(tmp_path / "x")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(engram_offload="gpu"), "engram_offload must be"),
        (dict(engram_cache_rows=10), "needs engram_offload"),
        (dict(engram_offload="disk", engram_cache_rows=1.5), "engram_cache_rows must be an integer"),
        (dict(engram_offload="disk", engram_cache_rows=-3), "engram_cache_rows must be an integer"),
    ],
)
def test_bad_offload_arguments(ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngramMoEForCausalLM.from_pretrained(ckpt, **kwargs)


def test_too_large_for_tier_fails_before_loading(ckpt, monkeypatch):
    monkeypatch.setattr(loading, "_available_ram", lambda: 1000)
    for kwargs in (dict(), dict(engram_offload="cpu"), dict(engram_offload="disk", engram_cache_rows=10_000)):
        with pytest.raises(MemoryError, match="GiB of RAM"):
            EngramMoEForCausalLM.from_pretrained(ckpt, **kwargs)
    EngramMoEForCausalLM.from_pretrained(ckpt, engram_offload="disk")  # needs no RAM for the tables


def test_inspect_cli(ckpt, capsys):
    assert cli_main(["inspect", str(ckpt), "--engram-offload", "disk", "--cache-rows", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [t["layer"] for t in d["tables"]] == [0, 2]
    assert d["memory"]["disk (read on demand)"] == d["table_bytes"] > 0
    assert d["memory"]["host RAM"] == 2 * 8 * 8 * 4


def _write_big_checkpoint(path, rows_base, dim_embed):
    """A checkpoint whose tables are several GB, written in chunks: never whole in memory."""
    config = tiny_config(
        engram_vocab_size=[rows_base, rows_base],
        engram_n_head_per_ngram=2,
        engram_n_embed_per_ngram=dim_embed,
        engram_offload="disk",
    )
    small = EngramMoEForCausalLM(config)
    state = {k: v.contiguous() for k, v in small.state_dict().items()}
    big = {
        f"model.layers.{i}.engram.table.weight": (e.table.num_embeddings, e.table.embedding_dim)
        for i, e in small.engram_layers().items()
    }
    header, offset = {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        header[k] = {
            "dtype": {torch.float32: "F32", torch.int64: "I64"}[v.dtype],
            "shape": list(v.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    for k, (r, d) in big.items():
        header[k] = {"dtype": "F32", "shape": [r, d], "data_offsets": [offset, offset + r * d * 4]}
        offset += r * d * 4
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    chunk = (torch.randn(1 << 22) * 0.02).numpy().tobytes()  # 16 MiB of row data, repeated
    file = path / "model.safetensors"
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for v in state.values():
            f.write(v.numpy().tobytes())
        for r, d in big.values():
            left = r * d * 4
            while left:
                f.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
        f.flush()
        os.fsync(f.fileno())
        # Evict the freshly written pages so the test sees what a cold load sees.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    config.engram_offload = None
    config.save_pretrained(path)
    return sum(r * d * 4 for r, d in big.values())


@pytest.mark.slow
def test_disk_tier_with_multi_gb_table_keeps_memory_small(tmp_path):
    table_bytes = _write_big_checkpoint(tmp_path, rows_base=1_600_000, dim_embed=256)  # 2 x 3.2M rows x 128 dims
    assert table_bytes > 3 * 2**30
    proc = psutil.Process()
    before = proc.memory_info().rss
    model = EngramMoEForCausalLM.from_pretrained(tmp_path, engram_offload="disk", engram_cache_rows=4096).eval()
    ids = torch.randint(2, 97, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out1 = model(ids).logits
        out2 = model(ids).logits
    grown = proc.memory_info().rss - before
    assert torch.isfinite(out1).all() and torch.equal(out1, out2)
    assert grown < 0.05 * table_bytes, f"RSS grew by {grown / 2**20:.0f} MiB for a {table_bytes / 2**30:.1f} GiB table"
    stats = model.engram_offload_stats()
    assert sum(s["bytes"] for s in stats.values()) == table_bytes
    assert all(s["cache"]["hits"] > 0 for s in stats.values())  # the second forward hits


@pytest.mark.parametrize("use", ["forward", "save"])
@pytest.mark.parametrize("change", ["rewrite", "truncate"])
def test_disk_table_changed_after_load_fails_clearly(ckpt, tmp_path, change, use):
    """Rewriting the file would silently change rows, truncating it would kill the process with SIGBUS
    on the next read: both are detected before any row is read, by a forward and by a save (which
    streams the rows into the new checkpoint: it must neither copy tampered rows nor fault)."""
    import shutil

    local = tmp_path / "ckpt"
    shutil.copytree(ckpt, local)
    model = EngramMoEForCausalLM.from_pretrained(local, engram_offload="disk").eval()
    ids, mask = _batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    weights = local / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # in place: the same inode the model has mapped
        if change == "truncate":
            f.truncate(size // 2)
        else:
            f.seek(size - 64)
            f.write(bytes(64))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock must still see it
    with pytest.raises(RuntimeError, match="changed on disk"), torch.no_grad():
        if use == "forward":
            model(ids, attention_mask=mask)
        else:
            model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".saved")], "no temp left behind"


def test_host_tier_holds_its_own_copy_of_the_table(ckpt, tmp_path):
    """engram_offload="cpu" reads the table into RAM once: a copy-on-write map of the file would fault
    a page in on every first touch and would show the file's later changes through its rows."""
    import shutil

    local = tmp_path / "ckpt"
    shutil.copytree(ckpt, local)
    model = EngramMoEForCausalLM.from_pretrained(local, engram_offload="cpu").eval()
    (layer, engram), *_ = model.engram_layers().items()
    rows = torch.arange(engram.table.store.num_rows)
    before = engram.read_rows(rows).clone()
    weights = local / "model.safetensors"
    with open(weights, "r+b") as f:  # in place: the same inode, every byte of the data changed
        header = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + header)
        data = f.read()
        f.seek(8 + header)
        f.write(bytes(255 - b for b in data))
    assert torch.equal(engram.read_rows(rows), before)


def test_corrupt_safetensors_header_names_the_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}")
    with pytest.raises(ValueError, match=r"model.safetensors is not a valid safetensors file \(corrupt header"):
        loading.checkpoint_tables(tmp_path)
    bad.write_bytes(b"\x01")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        loading.checkpoint_tables(tmp_path)


@pytest.mark.parametrize("damage", ["offsets", "json", "truncated", "dtype"])
def test_corrupt_checkpoint_file_is_named_by_from_pretrained(ckpt, tmp_path, damage):
    """Headers that parse as JSON but that safetensors would refuse (its message names no file), and
    truncated data, are caught with the file's name before transformers maps the file."""
    import shutil

    local = tmp_path / "ckpt"
    shutil.copytree(ckpt, local)
    weights = local / "model.safetensors"
    raw = weights.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    if damage == "truncated":
        weights.write_bytes(raw[: len(raw) - 100])
    elif damage == "json":
        weights.write_bytes(raw[:8] + b"x" + raw[9 : 8 + n] + raw[8 + n :])
    else:
        if damage == "offsets":
            header[key]["data_offsets"][1] += 4
        else:
            header[key]["dtype"] = "F16"
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        weights.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    for kwargs in ({}, {"engram_offload": "disk"}):
        with pytest.raises(ValueError, match=r"model\.safetensors (is not a valid safetensors file|is truncated)"):
            EngramMoEForCausalLM.from_pretrained(local, **kwargs)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["inspect", "{empty}"], "holds no safetensors checkpoint"),
        (
            ["inspect", "{ckpt}", "--engram-offload", "disk", "--cache-rows", "-3"],
            "engram_cache_rows must be an integer",
        ),
        (["inspect", "{ckpt}", "--cache-rows", "8"], "needs engram_offload"),
    ],
)
def test_inspect_cli_errors_are_one_line(ckpt, tmp_path, capsys, argv, message):
    argv = [a.format(empty=tmp_path, ckpt=ckpt) for a in argv]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_inspect_of_a_truncated_checkpoint_fails_in_one_line(ckpt, tmp_path, capsys):
    import shutil

    local = tmp_path / "ckpt"
    shutil.copytree(ckpt, local)
    weights = local / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert cli_main(["inspect", str(local)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors is truncated" in err[0], err


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """A checkpoint of about 1.2 MiB with ~300 KiB decoder layers, so that the 700 KiB budget below
    keeps some modules in RAM and offloads the rest to disk."""
    path = tmp_path_factory.mktemp("wide")
    model = tiny_model(sharp=True, hidden_size=64, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "engram",
    [dict(), dict(engram_offload="disk"), dict(engram_offload="cpu", engram_cache_rows=32)],
    ids=["resident-tables", "disk-tables", "cpu-tables"],
)
def test_accelerate_device_map_offload_is_exact(wide_ckpt, tmp_path, engram):
    """device_map/max_memory/offload_folder reach accelerate, which offloads the backbone as for any
    transformers model, alone or together with engram_offload; logits and generation stay exact."""
    resident = AutoModelForCausalLM.from_pretrained(wide_ckpt).eval()
    model = AutoModelForCausalLM.from_pretrained(
        wide_ckpt, device_map="auto", max_memory={"cpu": "700KiB"}, offload_folder=str(tmp_path / "offload"), **engram
    ).eval()
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}, model.hf_device_map
    assert any(p.device.type == "meta" for p in model.parameters()), "nothing was offloaded"
    ids, mask = _batch()
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, resident(ids, attention_mask=mask).logits)
        assert torch.equal(
            model.generate(ids, attention_mask=mask, **gen), resident.generate(ids, attention_mask=mask, **gen)
        )
    if engram:
        assert set(model.engram_offload_stats()) == set(model.config.engram_layer_ids)


def test_explicit_device_map_with_cpu_and_disk_layers(wide_ckpt, tmp_path):
    resident = AutoModelForCausalLM.from_pretrained(wide_ckpt).eval()
    device_map = {
        "model.embed_tokens": "cpu",
        "model.compressor": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.layers.3": "cpu",
        "model.norm": "disk",
        "lm_head": "disk",
    }
    model = AutoModelForCausalLM.from_pretrained(
        wide_ckpt, device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, resident(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("tier", [None, "cpu", "disk"])
def test_rows_read_and_written_alike_on_every_tier(ckpt, tier):
    """write_rows on an offloaded table serves the new rows (and nothing else changes); the stored
    file is never written, and clearing the patches restores the original logits exactly."""
    kwargs = dict(engram_offload=tier, engram_cache_rows=16) if tier == "disk" else dict(engram_offload=tier)
    resident = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    model = AutoModelForCausalLM.from_pretrained(ckpt, **kwargs).eval()
    ids, mask = _batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    rows = model.engram_row_ids(ids, mask)[2][0, 5]  # the rows one position of layer 2 reads
    new = torch.randn(rows.shape[0], 8, generator=torch.Generator().manual_seed(0))
    stored = resident.engram_layers()[2].table.weight[rows].detach().clone()
    for m in (model, resident):
        engram = m.engram_layers()[2]
        assert torch.equal(engram.read_rows(rows), stored)
        engram.write_rows(rows, new)
        assert torch.equal(engram.read_rows(rows), new)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, resident(ids, attention_mask=mask).logits)
        assert not torch.equal(model(ids, attention_mask=mask).logits, before)
    if tier is not None:
        model.engram_layers()[2].table.clear_patches()
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).logits, before)
