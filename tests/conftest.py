"""Shared fixtures and helpers. Tests import helpers from here only, never from each other."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

# Without a GPU, Triton kernels are tested under Triton's interpreter; it must be switched on
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# CI reruns the quick suite with one thread (ENGRAM_HF_TEST_THREADS=1, beside OMP_NUM_THREADS=1).
if os.environ.get("ENGRAM_HF_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["ENGRAM_HF_TEST_THREADS"]))

import engram_hf  # noqa: E402,F401  (registers the Auto classes)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENGRAM_HF_SHARED_DIR", REPO.parent / "shared"))
GOLDEN_DIR = Path(os.environ.get("ENGRAM_HF_GOLDEN_DIR", SHARED / "golden"))
GPT2_DIR = SHARED / "data" / "tokenizers" / "gpt2"
SHAKESPEARE = SHARED / "data" / "corpus" / "shakespeare"
EVAL_DATA = SHARED / "data" / "eval"
SHARED_HINT = (
    "The reference data lives in the shared/ folder beside this checkout (the project's steering "
    "repository); point ENGRAM_HF_SHARED_DIR (or ENGRAM_HF_GOLDEN_DIR for the golden vectors) at a copy."
)


def need_shared(path: Path, what: str) -> Path:
    """Skip the calling test, saying where to get the data, when a shared reference file is missing."""
    if not path.exists():
        pytest.skip(f"{what} not found at {path}. {SHARED_HINT}")
    return path


@contextmanager
def single_thread():
    """Run the block with one intra-op thread, as the distributed test workers do: a matmul's
    rounding depends on how many threads split its reduction, so bitwise comparisons between a
    worker and the parent need the same thread count on both sides."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def float_tolerance(dtype=torch.float32, reduction=1, scale=1.0):
    """``assert_close`` tolerances for two computations of the same quantity that may round
    differently (other thread counts, batch compositions, CPUs): a few ulps of ``dtype`` per
    accumulated term, growing with the square root of the reduction length, at magnitude ``scale``."""
    eps = torch.finfo(dtype).eps
    tol = 8 * eps * max(1.0, float(reduction)) ** 0.5
    return dict(rtol=tol, atol=tol * scale)


def tiny_config(**overrides):
    from engram_hf import EngramMoEConfig

    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        hc_mult=2,
        engram_layer_ids=[0, 2],
        engram_vocab_size=[53, 59],
        engram_max_ngram_size=3,
        engram_n_head_per_ngram=2,
        engram_n_embed_per_ngram=16,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    kwargs.update(overrides)
    return EngramMoEConfig(**kwargs)


def tiny_model(seed=0, sharp=False, **overrides):
    """A tiny EngramMoE. ``sharp=True`` scales the LM head so the greedy choice wins by a wide margin
    at every step: equality tests of generated tokens then cannot flip on float rounding."""
    from engram_hf import EngramMoEForCausalLM

    torch.manual_seed(seed)
    model = EngramMoEForCausalLM(tiny_config(**overrides)).eval()
    # Give the silent-at-init parts (conv, hyper-connection mixes) non-trivial values so that every
    # path, the cached conv state included, is actually exercised by the equality tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv.weight") or "_hc." in name:
                p.add_(torch.randn_like(p) * 0.3)
        if sharp:
            model.lm_head.weight.mul_(40.0)
    return model


def save_tiny_checkpoint(path, vocab_size=384, seed=0, **overrides):
    """A tiny EngramMoE saved with its own byte-level BPE tokenizer (trained on the built-in
    Sonnets) and compression table: a complete checkpoint for from_pretrained and lm-eval, with a
    small vocabulary so full-sequence logits stay cheap."""
    from engram_hf import build_compression_table
    from engram_hf.data import builtin_text
    from engram_hf.training.run import tokenizer_fields
    from engram_hf.training.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer([builtin_text()], vocab_size)
    table = build_compression_table(tok, progress=False)
    model = tiny_model(seed=seed, **tokenizer_fields(tok, table), **overrides)
    model.set_compression_table(table)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def random_ids(b, t, seed=1, vocab=97, low=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (b, t), generator=g)


@torch.no_grad()
def greedy_by_recompute(model, ids, new_tokens, attention_mask=None):
    """Greedy decoding written independently of ``generate`` and of any cache: every step runs the
    full forward over the whole sequence and takes the argmax of the last position."""
    ids = ids.clone()
    mask = attention_mask.clone() if attention_mask is not None else None
    for _ in range(new_tokens):
        logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


def corpus_blocks(vocab=97, block=32, n_tokens=4096):
    """Real text (Shakespeare's sonnets) as bytes folded into the tiny vocab: learnable structure.

    Falls back to a repeated sentence without the shared corpus, so tests that only need some
    learnable text still run."""
    from engram_hf.training import PackedBlocks

    path = SHAKESPEARE / "sonnets_gut.txt"
    data = path.read_bytes()[:n_tokens] if path.exists() else (b"the quick brown fox jumps over the lazy dog " * 100)
    ids = torch.tensor([2 + b % (vocab - 2) for b in data], dtype=torch.long)
    return PackedBlocks(ids, block)


def cpu_training_args(output_dir, steps, **overrides):
    """TrainingArguments for the short CPU runs of the tests."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def engram_inputs_for(ids, lookup_table, pad_id, n_ctx, mask=None):
    """EngramInputs built by the production path (compressor, then the cache-aware builder)."""
    from engram_hf.memory import TokenCompressor, compressed_vocab_size
    from engram_hf.memory.cache import engram_inputs

    table = torch.as_tensor(lookup_table)
    compressor = TokenCompressor(len(table), compressed_vocab_size(table), int(pad_id))
    compressor.set_table(table)
    canonical, pad = compressor(ids, mask)
    return engram_inputs(canonical, pad, n_ctx, mask)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    need_shared(GPT2_DIR, "The GPT-2 tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GPT2_DIR))


@pytest.fixture(scope="session")
def gpt2_compression(gpt2_tokenizer):
    return engram_hf.build_compression_table(gpt2_tokenizer, progress=False)


# ----------------------------------------------------------------------------- attached Engram
# Tiny configs of pretrained-model architectures Engram attaches to (vocab 101, 3 layers, hidden 32).
# No EOS: generation never stops early, so it can be compared with a fixed-length recompute loop.
_TINY_COMMON = dict(
    vocab_size=101,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=None,
)
TINY_ARCHS = {
    "llama": dict(_TINY_COMMON),
    "qwen3": dict(_TINY_COMMON, head_dim=8),
    "mistral": dict(_TINY_COMMON, sliding_window=8),
    "gemma": dict(_TINY_COMMON, head_dim=8),
    "gemma2": dict(_TINY_COMMON, head_dim=8, sliding_window=8),
    "gemma3_text": dict(_TINY_COMMON, head_dim=8, sliding_window=8),
    "gpt2": dict(vocab_size=101, n_embd=32, n_layer=3, n_head=4, n_positions=128, eos_token_id=None, bos_token_id=None),
    "qwen3_moe": dict(
        _TINY_COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1
    ),
    "deepseek_v3": dict(
        _TINY_COMMON,
        num_key_value_heads=4,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
}


def tiny_causal_lm(arch="llama", seed=0, sharp=False, **overrides):
    """A tiny randomly initialised transformers causal LM of architecture ``arch`` (a model_type).
    ``sharp=True`` scales the output embedding so greedy choices win by wide margins."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**TINY_ARCHS[arch], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    if sharp:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40.0)
    return model


def tiny_spec(**overrides):
    from engram_hf import EngramSpec

    kwargs = dict(layer_ids=[0, 2], table_size=[53, 59], n_head_per_ngram=2, n_embed_per_ngram=16)
    kwargs.update(overrides)
    return EngramSpec(**kwargs)


def tiny_compression(vocab=101):
    """A compression table that merges some ids (as a tokenizer's would), for models without a tokenizer."""
    return torch.arange(vocab) % (vocab - 11)


@torch.no_grad()
def wake_engram(model, seed=0, scale=0.2, adapter=None):
    """Give an attached adapter's silent-at-init parts (value projection, conv) non-trivial values, so
    tests exercise every path, the cached conv state included."""
    g = torch.Generator().manual_seed(seed)
    for memory in model.engram.engram_layers(adapter).values():
        for p in (memory.value_proj.weight, memory.conv.weight):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ----------------------------------------------------------------------------- the quickstart
@pytest.fixture(scope="session")
def quickstart_dir(tmp_path_factory):
    """``engram-hf quickstart --preset smoke`` run once, as a user runs it (a subprocess): what README
    command 1 leaves in ``runs/quickstart``."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("quickstart") / "runs" / "quickstart"
    given = os.environ.get("ENGRAM_HF_QUICKSTART_DIR")
    if given and (Path(given) / "report.md").is_file():
        # CI has just run README command 1; a copy keeps its artefacts as the quickstart left them.
        shutil.copytree(given, out, symlinks=True)
        return out
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "engram_hf.cli", "quickstart", "--preset", "smoke", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def word_tokenizer(words):
    """A word-level tokenizer over ``words`` (ids 0 and 1: ``[UNK]``, ``[PAD]``), split on white space."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
