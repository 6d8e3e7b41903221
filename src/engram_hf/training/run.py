"""One training run with the HF stack: tokenizer → compression table → EngramMoE → Trainer →
checkpoint, loss-curve PNG, model card and summary. ``engram-hf train`` and the demo use it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator, set_seed

from ..memory import build_compression_table
from ..model_card import render_model_card
from ..models.engram_moe import EngramMoEConfig, EngramMoEForCausalLM
from ..optim import build_optimizer
from ..presets import PRESETS, preset_config
from ..utils import atomic_write_dir, atomic_write_file
from .callbacks import RouterBiasCallback
from .data import pack_texts
from .plots import plot_loss_curve
from .tokenizer import train_bpe_tokenizer


@dataclass
class TrainSpec:
    out_dir: str = "runs/train"
    config: str = "tiny"  # a preset name or a JSON file of EngramMoEConfig fields
    config_overrides: dict = field(default_factory=dict)
    tokenizer: str | None = None  # a tokenizer directory; None trains a byte-level BPE on the data
    bpe_vocab_size: int = 2048
    steps: int = 200
    batch_size: int = 8
    block_size: int = 128
    learning_rate: float = 3e-3
    table_lr: float | None = None
    table_optimizer: str = "adam"  # "adam" | "adagrad" (row-wise, sparse) | "dense" (plain AdamW)
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    eval_fraction: float = 0.05
    eval_every: int = 0  # 0: six evaluations over the run
    save_steps: int = 0  # 0: no intermediate checkpoints
    resume_from: str | None = None
    gradient_checkpointing: bool = False
    bf16: bool = False
    lora_r: int = 0
    lora_targets: tuple = ("attention", "experts")
    seed: int = 0
    progress: bool = True


def load_model_config(spec: TrainSpec, **token_fields) -> EngramMoEConfig:
    if spec.config in PRESETS:
        return preset_config(spec.config, **{**token_fields, **spec.config_overrides})
    path = Path(spec.config)
    if not path.is_file():
        raise ValueError(f"--config must be a preset ({', '.join(PRESETS)}) or a JSON file, got {spec.config!r}.")
    fields = json.loads(path.read_text())
    fields.pop("model_type", None)
    return EngramMoEConfig(**{**fields, **token_fields, **spec.config_overrides})


def prepare_tokenizer(spec: TrainSpec, texts: list[str]):
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer) if spec.tokenizer else train_bpe_tokenizer(texts, spec.bpe_vocab_size)
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer needs an EOS token (it separates documents and pads).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(spec: TrainSpec, tokenizer) -> EngramMoEForCausalLM:
    table = build_compression_table(tokenizer, progress=spec.progress)
    config = load_model_config(
        spec,
        vocab_size=len(tokenizer),
        compressed_vocab_size=int(table.max()) + 1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        engram_pad_id=tokenizer.eos_token_id,
    )
    model = EngramMoEForCausalLM(config)
    model.set_compression_table(table)
    return model


def run_training(spec: TrainSpec, texts: list[str], tokenizer=None, model=None, eval_texts: list[str] | None = None) -> dict:
    """Train on ``texts`` and write ``out_dir/{model, loss_curve.png, summary.json}``.

    Held-out loss is measured on ``eval_texts`` if given, else on the first ``eval_fraction`` of
    the packed blocks (which are then not trained on).
    """
    out = Path(spec.out_dir)
    set_seed(spec.seed)
    tokenizer = tokenizer or prepare_tokenizer(spec, texts)
    model = model or build_model(spec, tokenizer)
    data = pack_texts(tokenizer, texts, spec.block_size)
    if eval_texts is not None:
        eval_set, train_set = pack_texts(tokenizer, eval_texts, spec.block_size), data
    else:
        n_eval = max(1, int(len(data) * spec.eval_fraction)) if spec.eval_fraction > 0 else 0
        if len(data) - n_eval < 1:
            raise ValueError(f"Only {len(data)} blocks of {spec.block_size} tokens: not enough text to train on.")
        eval_set = torch.utils.data.Subset(data, range(n_eval)) if n_eval else None
        train_set = torch.utils.data.Subset(data, range(n_eval, len(data)))

    base_model = model
    if spec.lora_r:
        from peft import get_peft_model

        from .lora import lora_config

        model = get_peft_model(model, lora_config(spec.lora_r, targets=spec.lora_targets))
    optimizer = None
    if spec.table_optimizer != "dense" and not spec.lora_r:
        optimizer = build_optimizer(
            model, lr=spec.learning_rate, table_lr=spec.table_lr, weight_decay=spec.weight_decay,
            table_optimizer=spec.table_optimizer,
        )
    eval_every = spec.eval_every or max(1, spec.steps // 6)
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(spec.steps * spec.warmup_fraction)),
        logging_steps=max(1, spec.steps // 50),
        eval_strategy="steps" if eval_set is not None else "no",
        eval_steps=eval_every,
        save_strategy="steps" if spec.save_steps else "no",
        save_steps=spec.save_steps or 500,
        activation_checkpointing=spec.gradient_checkpointing,
        bf16=spec.bf16,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=spec.seed,
        dataloader_num_workers=0,
        disable_tqdm=not spec.progress,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=default_data_collator, callbacks=[RouterBiasCallback()],
        optimizers=(optimizer, None),
    )
    eval_before = trainer.evaluate()["eval_loss"] if eval_set is not None else None
    trainer.train(resume_from_checkpoint=spec.resume_from)
    eval_after = trainer.evaluate()["eval_loss"] if eval_set is not None else None

    model_dir = out / "model"
    n_params = sum(p.numel() for p in base_model.parameters())
    note = (
        f"{spec.steps} steps with `transformers.Trainer` ({spec.table_optimizer} table optimizer, lr "
        f"{spec.learning_rate}, cosine), blocks of {spec.block_size} tokens, batch {spec.batch_size}"
        + (f"; held-out loss {eval_before:.3f} -> {eval_after:.3f}" if eval_set is not None else "")
        + (f"; LoRA r={spec.lora_r} on {', '.join(spec.lora_targets)}" if spec.lora_r else "")
        + "."
    )

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not spec.lora_r:
            card = render_model_card(base_model, f"EngramMoE ({spec.config})", str(model_dir), note)
            (tmp / "README.md").write_text(card, encoding="utf-8")

    atomic_write_dir(model_dir, save)
    history = trainer.state.log_history
    if eval_before is not None:
        history = [{"step": 0, "eval_loss": eval_before}, *history]
    plot = plot_loss_curve(history, out / "loss_curve.png", title=f"EngramMoE {spec.config}")
    summary = {
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()},
        "parameters": n_params,
        "engram_table_parameters": sum(
            e.table.weight.numel() for e in base_model.model.engram_layers.values()
        ),
        "vocab_size": len(tokenizer),
        "train_blocks": len(train_set),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "eval_ppl_after": math.exp(eval_after) if eval_after is not None else None,
        "model_dir": str(model_dir),
        "loss_curve": str(plot) if plot else None,
        "log_history": trainer.state.log_history,
    }
    atomic_write_file(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    summary["trainer"], summary["model"], summary["tokenizer"] = trainer, model, tokenizer
    return summary
