import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels are tested under Triton's interpreter; it must be switched on
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import engram_hf  # noqa: F401  (registers the Auto classes)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENGRAM_HF_SHARED_DIR", REPO.parent / "shared"))
GOLDEN_DIR = Path(os.environ.get("ENGRAM_HF_GOLDEN_DIR", SHARED / "golden"))
GPT2_DIR = SHARED / "data" / "tokenizers" / "gpt2"


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


def tiny_model(seed=0, **overrides):
    from engram_hf import EngramMoEForCausalLM

    torch.manual_seed(seed)
    model = EngramMoEForCausalLM(tiny_config(**overrides)).eval()
    # Give the silent-at-init parts (conv, hyper-connection mixes) non-trivial values so that every
    # path, the cached conv state included, is actually exercised by the equality tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv.weight") or "_hc." in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    if not GPT2_DIR.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2_DIR}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GPT2_DIR))


@pytest.fixture(scope="session")
def gpt2_compression(gpt2_tokenizer):
    return engram_hf.build_compression_table(gpt2_tokenizer, progress=False)
