"""``engram-hf train --base PATH``: continue training a pretrained causal LM with Engram attached
(base frozen), optionally with LoRA on the base, through ``transformers.Trainer``.

Writes ``out_dir/engram`` (the adapter, apart from the base), ``out_dir/lora`` (with LoRA) or
``out_dir/model`` (merged, loadable with ``AutoModelForCausalLM``; without LoRA), the loss curve
and ``summary.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from transformers import AutoModelForCausalLM, Trainer, default_data_collator, set_seed

from ..attach import EngramSpec, attach_engram
from ..attach.training import EngramCheckpointCallback, add_lora
from ..optim import build_optimizer
from ..utils import atomic_write_dir, atomic_write_file
from .arguments import max_eval_blocks, training_arguments
from .data import train_and_eval_sets
from .plots import plot_loss_curve, with_held_out
from .run import claim_out_dir


def check_base_spec(spec) -> EngramSpec:
    """Checks that need no data or model: the base path and the Engram fields."""
    base = Path(spec.base).expanduser()
    if not base.exists() and spec.base.startswith((".", "/", "~")):
        raise FileNotFoundError(f"Base model directory {base} does not exist.")
    if spec.config_overrides:
        raise ValueError("--set configures EngramMoE presets; with --base, size Engram with the --engram-* options.")
    if spec.init_from or spec.engram_offload or spec.engram_cache_rows:
        raise ValueError(
            "--init-from, --engram-offload and --engram-cache-rows train EngramMoE checkpoints; with --base the "
            "attached tables train resident."
        )
    return EngramSpec(**spec.engram)


def run_attach_training(spec, texts: list[str], eval_texts: list[str] | None = None) -> dict:
    """Train Engram (and LoRA when ``spec.lora_r``) on ``texts`` on top of the base at ``spec.base``."""
    from .tokenizer import load_tokenizer

    engram_spec = check_base_spec(spec)
    claim_out_dir(spec).mark()
    out = Path(spec.out_dir)
    set_seed(spec.seed)
    tokenizer = load_tokenizer(spec.tokenizer or spec.base)
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer needs an EOS token (it separates documents and pads).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec.base)
    attach_engram(model, engram_spec, tokenizer, freeze_base=not spec.train_base)
    base_model = model
    train_set, eval_set = train_and_eval_sets(
        tokenizer, texts, eval_texts, spec.block_size, spec.eval_fraction, max_eval_blocks(spec)
    )
    callbacks = []
    if spec.lora_r:
        targets = list(spec.lora_targets) if spec.lora_targets else "all-linear"
        model = add_lora(model, r=spec.lora_r, target_modules=targets)
        callbacks.append(EngramCheckpointCallback(resume_from=spec.resume_from))
    optimizer = build_optimizer(
        model,
        lr=spec.learning_rate,
        table_lr=spec.table_lr,
        weight_decay=spec.weight_decay,
        table_optimizer=spec.table_optimizer,
    )
    args = training_arguments(spec, out, evaluate=eval_set is not None)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        callbacks=callbacks,
        optimizers=(optimizer, None),
    )
    eval_before = trainer.evaluate()["eval_loss"] if eval_set is not None else None
    trainer.train(resume_from_checkpoint=spec.resume_from)
    eval_after = trainer.evaluate()["eval_loss"] if eval_set is not None else None

    shown = Path(spec.display_dir) if spec.display_dir else out
    base_model.engram.save_adapter(out / "engram")  # atomic
    saved = {"engram_adapter": str(shown / "engram")}
    if spec.lora_r:
        atomic_write_dir(out / "lora", lambda tmp: model.save_pretrained(tmp))
        saved["lora_adapter"] = str(shown / "lora")
    else:

        def save_merged(tmp: Path) -> None:
            base_model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        atomic_write_dir(out / "model", save_merged)
        saved["merged_model"] = str(shown / "model")

    history = with_held_out(trainer.state.log_history, eval_before, eval_after, trainer.state.global_step)
    plot = plot_loss_curve(history, out / "loss_curve.png", title=f"Engram on {Path(spec.base).name}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = {
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()},
        "engram_spec": base_model.engram.adapter().spec.to_dict(),
        "trainable_parameters": trainable,
        "engram_table_parameters": base_model.engram.adapter().table_parameters(),
        "train_blocks": len(train_set),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "eval_ppl_after": math.exp(eval_after) if eval_after is not None else None,
        **saved,
        "model_dir": saved.get("merged_model", saved["engram_adapter"]),
        "loss_curve": str(plot) if plot else None,
        "log_history": trainer.state.log_history,
    }
    atomic_write_file(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    summary["trainer"], summary["model"], summary["tokenizer"] = trainer, model, tokenizer
    return summary
