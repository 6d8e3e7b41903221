"""Saving a model whose tables are row-sharded over ranks, into a standard safetensors checkpoint.

Rank 0 writes the dense weights and creates one file per table, sized for the whole table; every
rank then writes its own rows into that file at its rows' offset. No rank ever holds a whole table,
and the result is an ordinary checkpoint: it loads on one process, or sharded on any number of
ranks. Everything is written into a temp directory beside the target, and only after every rank
reports success does rank 0 swap it into place: a rank that fails mid-save leaves the previous
checkpoint as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..offload.safetensors_io import create_sized, index_tables, table_arrays, write_rows_at
from ..utils import commit_dir, keep_non_model_files, remove_stale_siblings, temp_sibling


def save_sharded_pretrained(model, save_directory, save_dense) -> Path:
    """Collective: every rank calls it. ``save_dense(tmp)`` (rank 0 only) writes config and dense weights."""
    rank = dist.get_rank()
    target = Path(save_directory).resolve()
    name = [None]
    if rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(target)
        tmp = temp_sibling(target)
        os.mkdir(tmp)
        name = [str(tmp)]
    dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    tables = {key: e.table for key, e in model.engram_table_keys().items()}
    # Per table, its stored tensors (the weight; FP8 tables also their scales), in one file.
    arrays = {key: table_arrays(key, table.store) for key, table in tables.items()}
    files = {key: f"model-engram-table-{i}.safetensors" for i, key in enumerate(tables)}
    error = None
    try:
        if rank == 0:
            save_dense(tmp)
            for key, table in tables.items():
                create_sized(
                    tmp / files[key],
                    {
                        name: ((table.num_embeddings, array.shape[1]), array.dtype)
                        for name, array in arrays[key].items()
                    },
                    metadata={"format": "pt"},
                )
    except Exception as e:  # noqa: BLE001  (reported to every rank below, then raised)
        error = e
    _agree(error, tmp, "prepare")
    try:
        for key, table in tables.items():
            table.wait_updates()
            for name, array in arrays[key].items():
                write_rows_at(tmp / files[key], name, table.sharding.start, array)
    except Exception as e:  # noqa: BLE001
        error = e
    _agree(error, tmp, "write its rows")
    if rank == 0:
        index_tables(tmp, {name: files[key] for key in tables for name in arrays[key]})
        commit_dir(tmp, target, keep_non_model_files)
    dist.barrier()
    return target


def _agree(error, tmp: Path, what: str) -> None:
    """Every rank learns whether all succeeded; on any failure the temp directory goes and all raise."""
    flag = torch.tensor([0 if error is not None else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if int(flag) == 1:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    message = f"A rank failed to {what} while saving; the previous checkpoint is untouched."
    if error is not None:
        raise RuntimeError(f"{message} This rank: {error}") from error
    raise RuntimeError(message)
