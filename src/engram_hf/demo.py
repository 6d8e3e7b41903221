"""The built-in end-to-end job: tokenizer → compression table → tiny EngramMoE → Trainer →
atomic save → reload through AutoModelForCausalLM → checks → generation → loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .data import builtin_text
from .training import TrainSpec, read_texts, run_training
from .utils import atomic_write_file


def run_demo(
    out_dir: str | Path = "runs/demo",
    preset: str = "tiny",
    steps: int = 120,
    batch_size: int = 8,
    block_size: int = 128,
    learning_rate: float = 3e-3,
    text_files: list[str] | None = None,
    tokenizer_path: str | None = None,
    vocab_size: int = 2048,
    prompt: str = "Shall I compare thee",
    seed: int = 0,
) -> dict:
    texts = read_texts(text_files) if text_files else [builtin_text()]
    spec = TrainSpec(
        out_dir=str(out_dir), config=preset, tokenizer=tokenizer_path, bpe_vocab_size=vocab_size, steps=steps,
        batch_size=batch_size, block_size=block_size, learning_rate=learning_rate, seed=seed,
    )
    result = run_training(spec, texts)
    model, tokenizer = result["model"], result["tokenizer"]
    print(
        f"EngramMoE ({preset}): {result['parameters'] / 1e6:.2f}M parameters, of which Engram tables "
        f"{result['engram_table_parameters'] / 1e6:.2f}M; vocabulary {result['vocab_size']}."
    )
    print(f"Held-out loss: {result['eval_loss_before']:.3f} -> {result['eval_loss_after']:.3f} nats/token.")

    reloaded = AutoModelForCausalLM.from_pretrained(result["model_dir"]).eval()
    model.eval()
    probe = tokenizer(texts[0][:2000], return_tensors="pt")["input_ids"][:, :block_size]
    with torch.no_grad():
        # Same weights in different allocations may take different BLAS paths: equal to fp32 rounding.
        max_diff = (model(probe).logits - reloaded(probe).logits).abs().max().item()
    if max_diff > 1e-5:
        raise RuntimeError(f"The reloaded model's logits differ from the trained model's by {max_diff:.2e}.")
    prompt_ids = tokenizer(prompt, return_tensors="pt")
    gen = dict(max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        cached = reloaded.generate(**prompt_ids, use_cache=True, **gen)
        uncached = reloaded.generate(**prompt_ids, use_cache=False, **gen)
    if not torch.equal(cached, uncached):
        raise RuntimeError("Generation with the cache differs from generation without it.")
    text = tokenizer.decode(cached[0], skip_special_tokens=True)
    print(
        f"Reloaded with AutoModelForCausalLM from {result['model_dir']}: logits equal (max diff {max_diff:.1e}); "
        "cached == uncached generation."
    )
    print(f"Greedy sample:\n  {text!r}")
    if result["loss_curve"]:
        print(f"Loss curve: {result['loss_curve']}")

    summary = {k: v for k, v in result.items() if k not in ("trainer", "model", "tokenizer", "log_history")}
    summary.update(preset=preset, steps=steps, reload_logits_max_diff=max_diff, cached_generation_matches=True, sample=text)
    atomic_write_file(Path(out_dir) / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    return summary
