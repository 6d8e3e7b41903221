"""The ``TrainingArguments`` of a training run, from its ``TrainSpec``: one recipe for the EngramMoE
runner and the attach runner (``--base``)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainingArguments

# Held-out loss is measured before, during and after training, so its cost scales with the run: the
# held-out set has no more blocks than the run trains on (steps x batch) but at least MIN_EVAL_BLOCKS,
# and never more than MAX_EVAL_TOKENS tokens.
MIN_EVAL_BLOCKS = 32
MAX_EVAL_TOKENS = 1 << 17


def max_eval_blocks(spec) -> int:
    """The most blocks a run holds out of its training text for evaluation (see above)."""
    return max(MIN_EVAL_BLOCKS, min(spec.steps * spec.batch_size, MAX_EVAL_TOKENS // spec.block_size))


def training_arguments(spec, out: Path, evaluate: bool) -> TrainingArguments:
    """Cosine schedule with warm-up, ~50 log lines and six evaluations over the run (``eval_every``
    overrides; none during runs under six steps, whose loss before and after is measured anyway),
    checkpoints every ``save_steps`` if set, under ``out/checkpoints``."""
    every = spec.eval_every or spec.steps // 6
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(spec.steps * spec.warmup_fraction)),
        logging_steps=max(1, spec.steps // 50),
        eval_strategy="steps" if evaluate and every else "no",
        eval_steps=max(1, every),
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
