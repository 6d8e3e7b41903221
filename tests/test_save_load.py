"""Round trips through save_pretrained / from_pretrained, with and without the installed package."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from engram_hf import EngramMoEConfig, EngramMoEForCausalLM, EngramMoEModel

from conftest import REPO, tiny_model

COMPRESSED = 61


def _compressed_model():
    m = tiny_model(compressed_vocab_size=COMPRESSED)
    table = torch.arange(97) % COMPRESSED  # a non-identity table: ids 61..96 fold onto 0..35
    m.set_compression_table(table)
    return m, table


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m, table = _compressed_model()
    path = tmp_path_factory.mktemp("ckpt")
    m.save_pretrained(path)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = m(ids).logits
    return m, path, ids, logits, table


def test_reload_gives_identical_logits_and_buffers(saved):
    m, path, ids, logits, table = saved
    r = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(r) is EngramMoEForCausalLM
    with torch.no_grad():
        assert torch.equal(r(ids).logits, logits)
    mine, theirs = dict(m.named_buffers()), dict(r.named_buffers())
    assert mine.keys() == theirs.keys()
    for name, buf in mine.items():
        if name.endswith("expert_load"):
            continue  # running statistic, reset on load by design
        assert torch.equal(buf, theirs[name]), f"buffer {name} not restored"
    assert torch.equal(r.model.compressor.lookup_table, table)


def test_checkpoint_holds_table_and_auto_map(saved):
    _, path, *_ = saved
    state = load_file(str(path / "model.safetensors"))
    assert "model.compressor.lookup_table" in state
    assert not any("hasher" in k for k in state), "derived hash buffers should not be stored"
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "engram_moe"
    assert cfg["auto_map"]["AutoModelForCausalLM"].endswith("EngramMoEForCausalLM")
    assert (path / "modeling_engram_moe.py").exists() and (path / "configuration_engram_moe.py").exists()


def test_auto_classes_registered(saved):
    _, path, *_ = saved
    assert isinstance(AutoConfig.from_pretrained(path), EngramMoEConfig)
    assert type(AutoModel.from_pretrained(path)) is EngramMoEModel


@pytest.mark.slow
def test_trust_remote_code_without_importing_package(saved, tmp_path):
    _, path, ids, logits, _ = saved
    from safetensors.torch import save_file

    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    script = f"""
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
assert "engram_hf" not in type(m).__module__, type(m).__module__
ids = load_file({str(tmp_path / "ids.safetensors")!r})["ids"]
with torch.no_grad():
    save_file({{"logits": m(ids).logits.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["logits"], logits)


def test_mismatched_compressed_vocab_fails_at_load(saved, tmp_path):
    _, path, *_ = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["compressed_vocab_size"] = COMPRESSED + 5
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="canonical ids"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_fresh_model_without_table_refuses_to_run():
    m = tiny_model(compressed_vocab_size=COMPRESSED)
    with pytest.raises(ValueError, match="No compression table is set"):
        m(torch.tensor([[1, 2, 3]]))


def test_bf16_forward_runs_and_is_close(saved):
    m, _, ids, logits, _ = saved
    b = tiny_model(compressed_vocab_size=COMPRESSED)
    b.load_state_dict(m.state_dict())
    b = b.to(torch.bfloat16)
    with torch.no_grad():
        out = b(ids).logits.float()
    assert torch.isfinite(out).all()
    assert (out - logits).abs().max() < 0.5


def test_save_killed_mid_write_leaves_the_previous_checkpoint_loadable(saved, tmp_path):
    """A save over an existing checkpoint that dies while writing the weights (SIGKILL, no cleanup)
    must leave the old checkpoint loading exactly as before; the next save clears the debris."""
    m, _, ids, logits, _ = saved
    target = tmp_path / "ckpt"
    m.save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")  # a file the save does not produce
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO / "tests")!r})
import safetensors.torch as st
from conftest import REPO, tiny_model
real = st.save_file
def dying_save(tensors, filename, *a, **k):
    with open(filename, "wb") as f:
        f.write(b"partial" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
st.save_file = dying_save
import transformers.modeling_utils as mu
if hasattr(mu, "safe_save_file"):
    mu.safe_save_file = dying_save
tiny_model(seed=5, compressed_vocab_size={COMPRESSED}).save_pretrained({str(target)!r})
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    debris = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]
    assert debris, "the killed save should have been writing beside the target"
    r = AutoModelForCausalLM.from_pretrained(target).eval()
    with torch.no_grad():
        assert torch.equal(r(ids).logits, logits)
    assert (target / "tokenizer.json").read_text() == "{}"
    m.save_pretrained(target)  # the next save removes what the dead one left
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]
    assert (target / "tokenizer.json").exists(), "files the save does not produce are kept"


def test_saved_files_respect_the_umask(saved, tmp_path):
    m, *_ = saved
    old = os.umask(0o022)
    try:
        m.save_pretrained(tmp_path / "shared_ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "shared_ckpt").stat().st_mode & 0o777 == 0o755
    for f in (tmp_path / "shared_ckpt").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name


def test_save_leaves_no_code_it_did_not_write(saved, tmp_path):
    """transformers imports ``*.py`` from a checkpoint with trust_remote_code, and runs a
    ``custom_generate/generate.py`` in place of ``generate``: a save over a directory that held such
    code must drop it (at any depth), while keeping data files such as a tokenizer."""
    m, *_ = saved
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "custom_generate").mkdir()
    (target / "custom_generate" / "generate.py").write_text("def generate(model, *a, **k):\n    raise SystemExit\n")
    (target / "custom_generate" / "requirements.txt").write_text("\n")
    (target / "helpers").mkdir()
    (target / "helpers" / "evil.py").write_text("import os\n")
    (target / "helpers" / "notes.txt").write_text("kept")
    (target / "stray_module.py").write_text("import os\n")
    (target / "tokenizer.json").write_text("{}")
    m.save_pretrained(target)
    assert not (target / "custom_generate").exists()
    assert not (target / "helpers" / "evil.py").exists() and not (target / "stray_module.py").exists()
    assert (target / "helpers" / "notes.txt").read_text() == "kept"
    assert (target / "tokenizer.json").read_text() == "{}"
    ours = {p.name for p in target.rglob("*.py")}
    assert ours and all(name.endswith("_engram_moe.py") for name in ours), ours  # the auto_map model files


def test_nested_save_killed_leaves_no_debris_after_the_next_write(tmp_path):
    """``train`` writes its model with ``atomic_write_dir(out/model, model.save_pretrained)``, and the
    save is atomic itself, so a kill mid-write leaves a temp inside a temp's name
    (``..model.tmp-PID-x.tmp-PID-y``): the next write to ``out/model`` removes both."""
    target = tmp_path / "model"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO / "tests")!r})
import safetensors.torch as st
import transformers.modeling_utils as mu
from conftest import tiny_model
from engram_hf.utils import atomic_write_dir
def dying_save(tensors, filename, *a, **k):
    open(filename, "wb").write(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)
st.save_file = dying_save
if hasattr(mu, "safe_save_file"):
    mu.safe_save_file = dying_save
model = tiny_model()
atomic_write_dir({str(target)!r}, lambda tmp: model.save_pretrained(tmp))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    debris = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.startswith("..model.tmp-") for name in debris), debris
    from engram_hf.utils import atomic_write_dir

    atomic_write_dir(target, lambda tmp: (tmp / "x").write_text("ok"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
