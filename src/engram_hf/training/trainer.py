"""``EngramTrainer``: ``transformers.Trainer`` that also checkpoints offloaded Engram tables.

A model whose tables are offloaded (``engram_offload="cpu"`` or ``"disk"``) keeps them, and their
row-wise optimizer state, outside the model's parameters and the optimizer's ``state_dict``: a
plain ``Trainer`` would neither restore that state on resume nor load the checkpoint without
reading whole tables into RAM. This subclass:

* saves each offloaded table's optimizer state beside ``optimizer.pt`` (streamed safetensors);
* on resume, loads the dense weights only, re-binds every offloaded table to the checkpoint's own
  table shard (memory-mapped or read into RAM, as the table's tier says; a disk table gets a fresh
  work file, so the checkpoint is never written), and restores the optimizer state;
* adds ``RouterBiasCallback`` unless one is given.

For a resident model it behaves exactly as ``Trainer`` (plus the callback).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from transformers import Trainer

from ..offload.loading import checkpoint_tables, open_store
from ..optim.rowwise import EngramOptimizer
from .callbacks import RouterBiasCallback


def _unwrap_optimizer(optimizer):
    while optimizer is not None and not isinstance(optimizer, EngramOptimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, EngramOptimizer) else None


def _engram_model(model):
    model = getattr(model, "module", model)
    model = getattr(model, "get_base_model", lambda: model)()
    return model if hasattr(model, "engram_layers") else None


class EngramTrainer(Trainer):
    def __init__(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        if not any(isinstance(c, RouterBiasCallback) or c is RouterBiasCallback for c in callbacks):
            callbacks.append(RouterBiasCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def _offloaded(self) -> dict:
        model = _engram_model(self.model)
        return {} if model is None else {i: e for i, e in model.engram_layers().items() if e.offloaded}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        model = _engram_model(self.model)
        if model is not None and getattr(model.config, "engram_shard", False):
            # Row-sharded tables save collectively: every rank writes its rows (Trainer would let
            # only the main process save).
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            model.save_pretrained(output_dir)
            if self.args.should_save and self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            return
        super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        optimizer = _unwrap_optimizer(self.optimizer)
        model = _engram_model(self.model)
        sharded = model is not None and getattr(model.config, "engram_shard", False)
        if optimizer is not None and (self.args.should_save or sharded):
            optimizer.save_offloaded_state(output_dir)  # sharded tables: every rank saves its rows' state

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        optimizer = _unwrap_optimizer(self.optimizer)
        if checkpoint is not None and optimizer is not None:
            optimizer.load_offloaded_state(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        offloaded = self._offloaded()
        if not offloaded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        checkpoint = Path(resume_from_checkpoint)
        engram_model = _engram_model(model if model is not None else self.model)
        # Dense weights: every shard but the tables' (which may be larger than RAM).
        tables = checkpoint_tables(checkpoint)
        table_files = {Path(t.file).name for t in tables.values()}
        index = checkpoint / "model.safetensors.index.json"
        shards = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        expected = set(engram_model.state_dict())
        for shard in shards:
            if shard in table_files:
                continue
            state = {k: v for k, v in load_file(str(checkpoint / shard)).items() if k in expected}
            engram_model.load_state_dict(state, strict=False)
        # Tables: re-bound to this checkpoint's shards, trainable again with fresh work files.
        for layer, engram in offloaded.items():
            table = engram.table
            if layer not in tables:
                raise KeyError(f"{checkpoint} holds no Engram table for layer {layer}.")
            old = table.store
            cache = table.cache
            store = open_store(tables[layer], table.tier)
            table.bind(
                store,
                cache.capacity if cache is not None else 0,
                cache.data.device if cache is not None else "cpu",
                layer=layer,
            )
            work = getattr(old, "work_dir", None)
            table.make_trainable(Path(work) / f"resume-{checkpoint.name}" if work is not None else None)
