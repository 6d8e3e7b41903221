"""One training run with the HF stack: tokenizer → compression table → EngramMoE → Trainer →
checkpoint, loss-curve PNG, model card and summary. ``engram-hf train`` and the demo use it."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import default_data_collator, set_seed

from ..memory import build_compression_table, compressed_vocab_size
from ..model_card import render_model_card
from ..models.engram_moe import EngramMoEConfig, EngramMoEForCausalLM
from ..offload.create import save_new_checkpoint
from ..offload.tiers import check_cache_rows, check_tier
from ..optim import build_optimizer
from ..presets import PRESETS, preset_config
from ..utils import atomic_write_dir, atomic_write_file
from .arguments import training_arguments
from .data import train_and_eval_sets
from .plots import plot_loss_curve
from .tokenizer import load_tokenizer, train_bpe_tokenizer
from .trainer import EngramTrainer


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
    table_optimizer: str = "adagrad"  # "adagrad" | "adam" (row-wise, sparse) | "dense" (plain AdamW)
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    eval_fraction: float = 0.05
    eval_every: int = 0  # 0: six evaluations over the run; -1: only the final held-out loss
    save_steps: int = 0  # 0: no intermediate checkpoints
    resume_from: str | None = None
    gradient_checkpointing: bool = False
    bf16: bool = False
    lora_r: int = 0
    lora_targets: tuple | None = None  # None: attention+experts for EngramMoE, every linear layer with --base
    # Continue training a pretrained causal LM (a directory or hub id) with Engram attached instead
    # (``training.attach_run``): ``engram`` holds EngramSpec fields, ``train_base`` unfreezes the base.
    base: str | None = None
    engram: dict = field(default_factory=dict)
    train_base: bool = False
    seed: int = 0
    progress: bool = True
    display_dir: str | None = None  # the path to report when out_dir is a temp dir moved there afterwards
    init_from: str | None = None  # an EngramMoE checkpoint to continue training (else a new model)
    engram_offload: str | None = None  # None | "cpu" | "disk": where the tables live while training
    engram_cache_rows: int = 0  # hot-row cache per offloaded table


# Keys a saved config.json carries besides EngramMoEConfig's own fields; accepted in --config files.
_SAVED_CONFIG_KEYS = {
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "layer_types",
    "number_of_conv_states",
    "output_hidden_states",
    "return_dict",
}


def config_fields() -> set[str]:
    """The fields an EngramMoEConfig takes."""
    import inspect

    return {n for n in inspect.signature(EngramMoEConfig.__init__).parameters if n not in ("self", "kwargs")}


def _check_fields(fields: dict, where: str, allowed_extra: set[str] = frozenset()) -> None:
    unknown = sorted(set(fields) - config_fields() - set(allowed_extra))
    if unknown:
        known = ", ".join(sorted(config_fields()))
        raise ValueError(f"{where} sets unknown config field(s) {unknown}; EngramMoEConfig takes: {known}.")


def check_spec(spec: TrainSpec) -> None:
    """Checks that need no data: run first, so a typo fails before tokenizer training starts."""
    if spec.base:
        from .attach_run import check_base_spec

        check_base_spec(spec)
        return
    _check_fields(spec.config_overrides, "--set")
    if spec.config not in PRESETS:
        load_model_config(spec, _check_only=True)
    if spec.tokenizer:
        path = Path(spec.tokenizer).expanduser()
        if not path.exists() and spec.tokenizer.startswith((".", "/", "~")):
            raise FileNotFoundError(f"Tokenizer directory {path} does not exist.")
    check_tier(spec.engram_offload)
    check_cache_rows(spec.engram_cache_rows, spec.engram_offload)
    if spec.init_from is not None and not (Path(spec.init_from) / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {spec.init_from} is not a checkpoint directory (no config.json).")
    if spec.engram_offload and spec.table_optimizer == "dense":
        raise ValueError("Offloaded tables train with a row-wise table optimizer (adagrad or adam), not 'dense'.")


def load_model_config(spec: TrainSpec, _check_only: bool = False, **token_fields) -> EngramMoEConfig | None:
    _check_fields(spec.config_overrides, "--set")
    if spec.config in PRESETS:
        return preset_config(spec.config, **{**token_fields, **spec.config_overrides})
    path = Path(spec.config)
    if not path.is_file():
        raise ValueError(f"--config must be a preset ({', '.join(PRESETS)}) or a JSON file, got {spec.config!r}.")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    _check_fields(fields, str(path), _SAVED_CONFIG_KEYS)
    if _check_only:
        return None
    fields = {k: v for k, v in fields.items() if k not in _SAVED_CONFIG_KEYS}
    return EngramMoEConfig(**{**fields, **token_fields, **spec.config_overrides})


def prepare_tokenizer(spec: TrainSpec, texts: list[str]):
    if spec.tokenizer:
        tokenizer = load_tokenizer(spec.tokenizer)
    elif spec.init_from:
        tokenizer = load_tokenizer(spec.init_from)
    else:
        tokenizer = train_bpe_tokenizer(texts, spec.bpe_vocab_size)
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer needs an EOS token (it separates documents and pads).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fields(tokenizer, table) -> dict:
    """The config fields a tokenizer and its compression table fix (EOS doubles as Engram's pad)."""
    return dict(
        vocab_size=len(tokenizer),
        compressed_vocab_size=compressed_vocab_size(table),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        engram_pad_id=tokenizer.eos_token_id,
    )


def build_model(spec: TrainSpec, tokenizer) -> EngramMoEForCausalLM:
    """The model to train: loaded from ``init_from``, or new; with ``engram_offload`` its tables live
    in host RAM or on disk (a new model's tables are then written to ``out_dir/initial`` block by
    block and never held whole)."""
    offload = dict(engram_offload=spec.engram_offload, engram_cache_rows=spec.engram_cache_rows)
    if spec.init_from:
        model = EngramMoEForCausalLM.from_pretrained(spec.init_from, **offload)
        if model.config.vocab_size != len(tokenizer):
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} ids, {spec.init_from} expects {model.config.vocab_size}."
            )
        return model
    table = build_compression_table(tokenizer, progress=spec.progress)
    config = load_model_config(spec, **tokenizer_fields(tokenizer, table))
    if spec.engram_offload:
        initial = save_new_checkpoint(EngramMoEForCausalLM, config, Path(spec.out_dir) / "initial", table, spec.seed)
        return EngramMoEForCausalLM.from_pretrained(initial, **offload)
    model = EngramMoEForCausalLM(config)
    model.set_compression_table(table)
    return model


def run_training(
    spec: TrainSpec, texts: list[str], tokenizer=None, model=None, eval_texts: list[str] | None = None
) -> dict:
    """Train on ``texts`` and write ``out_dir/{model, loss_curve.png, summary.json}``.

    Held-out loss is measured on ``eval_texts`` if given, else on the first ``eval_fraction`` of
    the packed blocks (which are then not trained on).
    """
    if spec.base:
        if tokenizer is not None or model is not None:
            raise ValueError("With spec.base the base model and its tokenizer are loaded from that path.")
        from .attach_run import run_attach_training

        return run_attach_training(spec, texts, eval_texts)
    out = Path(spec.out_dir)
    check_spec(spec)
    set_seed(spec.seed)
    tokenizer = tokenizer or prepare_tokenizer(spec, texts)
    model = model or build_model(spec, tokenizer)
    train_set, eval_set = train_and_eval_sets(tokenizer, texts, eval_texts, spec.block_size, spec.eval_fraction)

    base_model = model
    lora_targets = spec.lora_targets or ("attention", "experts")
    if spec.lora_r:
        from peft import get_peft_model

        from .lora import lora_config

        model = get_peft_model(model, lora_config(spec.lora_r, targets=lora_targets))
    optimizer = None
    if spec.table_optimizer != "dense" and not spec.lora_r:
        optimizer = build_optimizer(
            model,
            lr=spec.learning_rate,
            table_lr=spec.table_lr,
            weight_decay=spec.weight_decay,
            table_optimizer=spec.table_optimizer,
            offload_dir=out / "engram-work",
        )
    args = training_arguments(spec, out, evaluate=eval_set is not None)
    trainer = EngramTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        optimizers=(optimizer, None),
    )
    eval_before = trainer.evaluate()["eval_loss"] if eval_set is not None and spec.eval_every >= 0 else None
    trainer.train(resume_from_checkpoint=spec.resume_from)
    eval_after = trainer.evaluate()["eval_loss"] if eval_set is not None else None

    model_dir = out / "model"
    shown_dir = Path(spec.display_dir) / "model" if spec.display_dir else model_dir
    n_params = sum(p.numel() for p in base_model.parameters())
    note = (
        f"{spec.steps} steps with `transformers.Trainer` ({spec.table_optimizer} table optimizer, lr "
        f"{spec.learning_rate}, cosine), blocks of {spec.block_size} tokens, batch {spec.batch_size}"
        + (f"; held-out loss {eval_before:.3f} -> {eval_after:.3f}" if eval_before is not None else "")
        + (f"; held-out loss {eval_after:.3f}" if eval_before is None and eval_after is not None else "")
        + (f"; LoRA r={spec.lora_r} on {', '.join(lora_targets)}" if spec.lora_r else "")
        + "."
    )

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not spec.lora_r:
            card = render_model_card(base_model, f"EngramMoE ({spec.config})", str(shown_dir), note)
            (tmp / "README.md").write_text(card, encoding="utf-8")

    atomic_write_dir(model_dir, save)
    # The saved model holds the trained tables; the work files of disk-offloaded training, and the
    # new model's initial checkpoint, are no longer needed.
    shutil.rmtree(out / "engram-work", ignore_errors=True)
    if spec.engram_offload and not spec.init_from:
        shutil.rmtree(out / "initial", ignore_errors=True)
    history = trainer.state.log_history
    if eval_before is not None:
        history = [{"step": 0, "eval_loss": eval_before}, *history]
    plot = plot_loss_curve(history, out / "loss_curve.png", title=f"EngramMoE {spec.config}")
    # Paths as the user will find them: a run built in a temp dir is moved to display_dir after.
    shown_spec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}
    if spec.display_dir:
        shown_spec["out_dir"] = shown_spec.pop("display_dir")
        plot = Path(spec.display_dir) / Path(plot).name if plot else plot
    summary = {
        "spec": shown_spec,
        "parameters": n_params,
        "engram_table_parameters": base_model.engram_table_parameters(),
        "vocab_size": len(tokenizer),
        "train_blocks": len(train_set),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "eval_ppl_after": math.exp(eval_after) if eval_after is not None else None,
        "model_dir": str(shown_dir),
        "loss_curve": str(plot) if plot else None,
        "log_history": trainer.state.log_history,
    }
    atomic_write_file(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    summary["trainer"], summary["model"], summary["tokenizer"] = trainer, model, tokenizer
    return summary
