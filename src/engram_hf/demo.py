"""The built-in end-to-end job: tokenizer → compression table → tiny EngramMoE → Trainer →
atomic save → reload through AutoModelForCausalLM → checks → generation → loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

from .data import builtin_text
from .memory import build_compression_table
from .model_card import render_model_card
from .models.engram_moe import EngramMoEForCausalLM
from .presets import preset_config
from .training import RouterBiasCallback, pack_texts, plot_loss_curve, train_bpe_tokenizer
from .utils import atomic_write_dir, atomic_write_file


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
    out = Path(out_dir)
    set_seed(seed)
    texts = [Path(f).read_text(encoding="utf-8") for f in text_files] if text_files else [builtin_text()]

    if tokenizer_path:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    else:
        print(f"Training a byte-level BPE tokenizer ({vocab_size} tokens) on the text ...")
        tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer needs an EOS token (it separates documents and pads).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    table = build_compression_table(tokenizer)
    compressed = int(table.max()) + 1
    print(f"Compression table: {len(table)} ids -> {compressed} canonical ids ({compressed / len(table):.1%}).")

    config = preset_config(
        preset,
        vocab_size=len(tokenizer),
        compressed_vocab_size=compressed,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        engram_pad_id=tokenizer.eos_token_id,
    )
    model = EngramMoEForCausalLM(config)
    model.set_compression_table(table)
    n_params = sum(p.numel() for p in model.parameters())
    n_table = sum(m.table.weight.numel() for m in model.model.engram_layers.values())
    print(f"EngramMoE ({preset}): {n_params / 1e6:.2f}M parameters, of which Engram tables {n_table / 1e6:.2f}M.")

    data = pack_texts(tokenizer, texts, block_size)
    n_eval = max(1, len(data) // 20)
    train_set = torch.utils.data.Subset(data, range(n_eval, len(data)))
    eval_set = torch.utils.data.Subset(data, range(n_eval))
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, steps // 20),
        eval_strategy="steps",
        eval_steps=max(1, steps // 6),
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, callbacks=[RouterBiasCallback()]
    )
    eval_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    eval_after = trainer.evaluate()["eval_loss"]
    print(f"Held-out loss: {eval_before:.3f} -> {eval_after:.3f} nats/token (ppl {math.exp(eval_after):.1f}).")

    model_dir = out / "model"

    training_note = (
        f"{steps} steps of AdamW (lr {learning_rate}, cosine) with `transformers.Trainer` on "
        f"{'the built-in Sonnets' if not text_files else ', '.join(Path(f).name for f in text_files)}, "
        f"blocks of {block_size} tokens, batch {batch_size}. Held-out loss {eval_before:.3f} -> {eval_after:.3f}."
    )

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        card = render_model_card(model, f"EngramMoE {preset} (engram-hf demo)", str(model_dir), training_note)
        (tmp / "README.md").write_text(card, encoding="utf-8")

    atomic_write_dir(model_dir, save)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.eval()
    probe = data[0]["input_ids"][None]
    with torch.no_grad():
        identical = torch.equal(model(probe).logits, reloaded(probe).logits)
    if not identical:
        raise RuntimeError("The reloaded model's logits differ from the trained model's.")

    prompt_ids = tokenizer(prompt, return_tensors="pt")
    gen = dict(max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        cached = reloaded.generate(**prompt_ids, use_cache=True, **gen)
        uncached = reloaded.generate(**prompt_ids, use_cache=False, **gen)
    if not torch.equal(cached, uncached):
        raise RuntimeError("Generation with the cache differs from generation without it.")
    text = tokenizer.decode(cached[0], skip_special_tokens=True)
    print(f"Reloaded with AutoModelForCausalLM from {model_dir}: logits identical; cached == uncached generation.")
    print(f"Greedy sample:\n  {text!r}")

    history = [{"step": 0, "eval_loss": eval_before}, *trainer.state.log_history]
    plot = plot_loss_curve(history, out / "loss_curve.png", title=f"EngramMoE {preset} demo")
    summary = {
        "preset": preset,
        "parameters": n_params,
        "engram_table_parameters": n_table,
        "vocab_size": len(tokenizer),
        "compressed_vocab_size": compressed,
        "steps": steps,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "reload_logits_identical": identical,
        "cached_generation_matches": True,
        "sample": text,
        "model_dir": str(model_dir),
        "loss_curve": str(plot) if plot else None,
    }
    atomic_write_file(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    if plot:
        print(f"Loss curve: {plot}")
    return summary
