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
from ..model_card import read_card_info, record_card_info, render_model_card, write_card
from ..models.engram_moe import EngramMoEConfig, EngramMoEForCausalLM
from ..offload.create import save_new_checkpoint
from ..offload.tiers import check_cache_rows, check_tier
from ..optim import build_optimizer
from ..presets import PRESETS, preset_config
from ..utils import atomic_write_dir, atomic_write_file, claim_output_dir
from .arguments import max_eval_blocks, training_arguments
from .data import train_and_eval_sets
from .plots import plot_loss_curve, with_held_out
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
    eval_every: int = 0  # 0: six evaluations over the run
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
    overwrite: bool = False  # write into an out_dir that holds files a training run did not write


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


def claim_out_dir(spec: TrainSpec):
    """``out_dir`` as the run's own (``claim_output_dir``): a training run writes into it in place,
    beside what an earlier run left there (its checkpoints, for ``resume_from``)."""
    return claim_output_dir(spec.out_dir, "train", overwrite=spec.overwrite)


def check_spec(spec: TrainSpec) -> None:
    """Checks that need no data: run first, so a typo fails before tokenizer training starts."""
    claim_out_dir(spec)
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
    if spec.resume_from is not None and not Path(spec.resume_from).is_dir():
        raise FileNotFoundError(f"--resume {spec.resume_from} is not a checkpoint directory.")
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
    """``spec.tokenizer``; else the tokenizer of the run resumed or continued; else a BPE trained on ``texts``."""
    if spec.tokenizer:
        tokenizer = load_tokenizer(spec.tokenizer)
    elif spec.resume_from:
        # Never one trained anew: on other --data it would give the checkpoint's ids other meanings.
        try:
            tokenizer = load_tokenizer(spec.resume_from)
        except (OSError, ValueError):
            raise ValueError(
                f"--resume {spec.resume_from} holds no tokenizer (checkpoints written before engram-hf saved one "
                "there): pass the run's own with --tokenizer (OUT/model holds it once a run has finished)."
            ) from None
    elif spec.init_from:
        tokenizer = load_tokenizer(spec.init_from)
    else:
        tokenizer = train_bpe_tokenizer(texts, spec.bpe_vocab_size)
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer needs an EOS token (it separates documents and pads).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# The config fields ``tokenizer_fields`` sets.
TOKENIZER_FIELDS = {
    "vocab_size",
    "compressed_vocab_size",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "engram_pad_id",
}


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


# Config fields that say where the tables live or how the model runs, not what it is: a resumed run may
# change them.
_RUNTIME_FIELDS = {"engram_offload", "engram_shard", "use_cache"}


def check_resume(spec: TrainSpec, model) -> None:
    """Refuse to resume a checkpoint of another model than ``model`` (the one this run builds), naming
    the fields that differ, and blaming the tokenizer when its fields do; a state-dict error in the
    middle of ``Trainer.train`` would say neither."""
    saved_file = Path(spec.resume_from) / "config.json"
    if not saved_file.is_file():  # a LoRA checkpoint holds the adapter only
        return
    saved = json.loads(saved_file.read_text())
    current = json.loads(model.config.to_json_string(use_diff=False))
    differ = sorted(
        k for k in (config_fields() - _RUNTIME_FIELDS) & saved.keys() & current.keys() if saved[k] != current[k]
    )
    if not differ:
        return
    shown = "; ".join(f"{k} {saved[k]!r} there, {current[k]!r} here" for k in differ)
    if set(differ) & TOKENIZER_FIELDS:
        given = f"--tokenizer {spec.tokenizer}" if spec.tokenizer else "this run's tokenizer"
        raise ValueError(
            f"--resume {spec.resume_from} was trained with another tokenizer than {given} ({shown}): resume "
            "with the run's own tokenizer (the checkpoint's, when --tokenizer is not given)."
        )
    raise ValueError(
        f"--resume {spec.resume_from} is another architecture than this run builds ({shown}): give the --config "
        "and --set of the run being resumed."
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


def training_record(spec: TrainSpec, train_blocks: int, eval_before, eval_after, lora_targets=None) -> dict:
    """What the model card says of a run: the data, the recipe, and the held-out loss."""
    record = {
        "summary": f"Trained with `engram-hf train` (`transformers.Trainer`) for {spec.steps} steps.",
        "data": f"{train_blocks} blocks of {spec.block_size} tokens",
        "tokenizer": spec.tokenizer or f"a byte-level BPE of {spec.bpe_vocab_size} tokens trained on the data",
        "optimizer": f"AdamW (dense) and row-wise {spec.table_optimizer} (tables), lr {spec.learning_rate}"
        + (f", table lr {spec.table_lr}" if spec.table_lr else ", table lr 5x")
        + f", cosine schedule with {spec.warmup_fraction:.0%} warm-up",
        "batch": f"{spec.batch_size} sequences",
        "seed": spec.seed,
    }
    if eval_before is not None and eval_after is not None:
        record["held_out_loss"] = f"{eval_before:.3f} -> {eval_after:.3f} nats/token"
    if spec.lora_r:
        record["lora"] = f"r={spec.lora_r} on {', '.join(lora_targets or ())}"
    return record


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
    claim_out_dir(spec).mark()
    set_seed(spec.seed)
    tokenizer = tokenizer or prepare_tokenizer(spec, texts)
    model = model or build_model(spec, tokenizer)
    if spec.resume_from:
        check_resume(spec, model)
    train_set, eval_set = train_and_eval_sets(
        tokenizer, texts, eval_texts, spec.block_size, spec.eval_fraction, max_eval_blocks(spec)
    )

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
        processing_class=tokenizer,  # saved with every checkpoint: a resumed run reads the same ids
    )
    eval_before = trainer.evaluate()["eval_loss"] if eval_set is not None else None
    trainer.train(resume_from_checkpoint=spec.resume_from)
    eval_after = trainer.evaluate()["eval_loss"] if eval_set is not None else None

    model_dir = out / "model"
    shown_dir = Path(spec.display_dir) / "model" if spec.display_dir else model_dir
    n_params = sum(p.numel() for p in base_model.parameters())
    training = training_record(spec, len(train_set), eval_before, eval_after, lora_targets)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not spec.lora_r:
            record_card_info(tmp, name=f"EngramMoE ({spec.config})", training=training)
            card = render_model_card(base_model, path=str(shown_dir), info=read_card_info(tmp))
            write_card(tmp, card)

    atomic_write_dir(model_dir, save)
    # The saved model holds the trained tables; the work files of disk-offloaded training, and the
    # new model's initial checkpoint, are no longer needed.
    shutil.rmtree(out / "engram-work", ignore_errors=True)
    if spec.engram_offload and not spec.init_from:
        shutil.rmtree(out / "initial", ignore_errors=True)
    history = with_held_out(trainer.state.log_history, eval_before, eval_after, trainer.state.global_step)
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
