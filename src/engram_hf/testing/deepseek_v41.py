"""A tiny checkpoint in DeepSeek-V4.1's Engram names, dtypes and layout, to try the V4.1 tools on
without downloading hundreds of GB (and to test them): ``write_v41_checkpoint(dir, tokenizer)``, or
``python -m engram_hf.testing.deepseek_v41 DIR`` (with a byte-level BPE trained on the built-in
Sonnets standing in for V4.1's tokenizer).

Tables, projections and norm weights are random; everything else follows the release: a sharded
safetensors index, FP8 E4M3 tables with F8_E8M0 scales per 32 columns, ``wkv`` in FP8 with one
scale per 32x32 block, bf16 ``q_weight``/``k_weight``, the ``engram_*`` fields under
``text_config`` (the pad id spelled ``engram_pad_token_id``), ``rms_norm_eps`` 1e-20, and other
model tensors in shards of their own that the Engram tools never read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..memory.compression import build_compression_table, compressed_vocab_size
from ..memory.hashing import table_primes
from ..ops.fp8_rows import BLOCK, encode_rows
from ..ops.fp8_rows.naive import exponent_bytes, scale_exponent
from ..utils import atomic_write_dir


def _fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix as FP8 codes with one E8M0 scale per 32x32 block (V4.1's linear-weight format)."""
    R, C = weight.shape
    blocks = weight.view(R // BLOCK, BLOCK, C // BLOCK, BLOCK)
    e = scale_exponent(blocks.abs().amax(dim=(1, 3)))
    codes = torch.ldexp(blocks, -e[:, None, :, None]).to(torch.float8_e4m3fn)
    return codes.view(R, C), exponent_bytes(e)


def write_v41_checkpoint(
    directory,
    tokenizer=None,
    *,
    layer_ids=(1, 3),
    hidden_size: int = 64,
    hc_mult: int = 4,
    max_ngram_size: int = 4,
    n_heads: int = 2,
    head_dim: int = 32,
    base_table_size: int = 101,
    seed: int = 0,
    prefix: str = "model.",
) -> Path:
    """Write a synthetic V4.1 checkpoint (with ``tokenizer`` saved beside it) to ``directory``; the
    tokenizer defaults to a byte-level BPE of 2,048 tokens trained on the built-in Sonnets."""
    if tokenizer is None:
        from ..data import builtin_text
        from ..training.tokenizer import train_bpe_tokenizer

        tokenizer = train_bpe_tokenizer([builtin_text()], 2048)
    g = torch.Generator().manual_seed(seed)
    table = build_compression_table(tokenizer, progress=False, dialect="deepseek_v41")
    primes = table_primes([base_table_size] * (max_ngram_size - 1), max_ngram_size, n_heads, list(layer_ids))
    rows = {i: sum(p for order in primes[i] for p in order) for i in layer_ids}
    embed_dim = (max_ngram_size - 1) * n_heads * head_dim
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    config = {
        "architectures": ["DeepseekV41ForCausalLM"],
        "model_type": "deepseek_v41",
        "quantization_config": {"fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [BLOCK, BLOCK]},
        "text_config": {
            "hidden_size": hidden_size,
            "hc_mult": hc_mult,
            "rms_norm_eps": 1e-20,
            "vocab_size": len(tokenizer),
            "num_hidden_layers": max(layer_ids) + 2,
            "engram_layer_ids": list(layer_ids),
            "engram_num_embeddings": [rows[i] for i in layer_ids],
            "engram_max_ngram_size": max_ngram_size,
            "engram_vocab_size": base_table_size,
            "engram_n_heads": n_heads,
            "engram_head_dim": head_dim,
            "engram_pad_token_id": pad,
            "engram_compressed_vocab_size": compressed_vocab_size(table),
        },
    }
    shards: dict[str, dict[str, torch.Tensor]] = {
        "model-00001.safetensors": {
            f"{prefix}embed.weight": (torch.randn(len(tokenizer), hidden_size, generator=g)).to(torch.bfloat16),
            f"{prefix}layers.0.attn.wq.weight": torch.randn(hidden_size, hidden_size, generator=g).to(torch.bfloat16),
        }
    }
    for n, layer in enumerate(layer_ids, 2):
        t = encode_rows(torch.randn(rows[layer], head_dim, generator=g) * 0.5)
        wkv, wkv_scale = _fp8_blocks(torch.randn((hc_mult + 1) * hidden_size, embed_dim, generator=g) * 0.05)
        shards[f"model-{n:05d}.safetensors"] = {
            f"{prefix}layers.{layer}.engram.embed.weight": t.weight,
            f"{prefix}layers.{layer}.engram.embed.scale": t.scale,
            f"{prefix}layers.{layer}.engram.wkv.weight": wkv,
            f"{prefix}layers.{layer}.engram.wkv.scale": wkv_scale,
            f"{prefix}layers.{layer}.engram.q_weight": (torch.rand(hc_mult, hidden_size, generator=g) + 0.5).to(
                torch.bfloat16
            ),
            f"{prefix}layers.{layer}.engram.k_weight": (torch.rand(hc_mult, hidden_size, generator=g) + 0.5).to(
                torch.bfloat16
            ),
        }

    def write(tmp: Path) -> None:
        weight_map = {}
        for name, tensors in shards.items():
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
        total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)

    return atomic_write_dir(directory, write)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m engram_hf.testing.deepseek_v41 DIR")
    print(f"wrote a synthetic DeepSeek-V4.1 checkpoint to {write_v41_checkpoint(sys.argv[1])}")
