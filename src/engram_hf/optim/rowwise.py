"""One optimizer for a whole Engram model: AdamW for dense parameters, row-wise updates for tables.

Engram tables are huge and each batch touches a few thousand of their rows. With sparse table
gradients (``set_sparse_table_grads``) backward never materialises a table-sized gradient, and
the row-wise modes below update only the touched rows, so a training step costs the same whatever
the table size:

* ``"adagrad"`` (the default): row-wise Adagrad (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``): one float32
  per row, the running sum of the row's mean squared gradient; 4 bytes of state per row.
* ``"adam"``: lazy Adam on touched rows (as ``torch.optim.SparseAdam``): two moments per element,
  ``8 * dim`` bytes per row, allocated and touched when the optimizer is built (so no step pays for
  first-touch page faults).
* ``"dense"``: plain AdamW on the table like any other parameter (the correct, slow fallback).

Tables may live anywhere: a resident parameter, or an offloaded table (``engram_offload="cpu"``
or ``"disk"``) whose rows and optimizer state stay in host RAM or on disk. Every table is updated
through the same row-array arithmetic (``engram_hf.offload.rows``), so offloaded training equals
resident training bit for bit. An offloaded table joins the optimizer through its gradient anchor
(a tensor with no elements); its state lives with its rows and is saved apart from
``state_dict()`` with ``save_offloaded_state`` (``EngramTrainer`` does both).

Groups carry ``kind``: ``"dense"``, ``"adam_rows"`` or ``"adagrad_rows"``. Every group honours
``lr`` (so LR schedulers work), ``betas``, ``eps`` and ``weight_decay`` (decoupled; never applied to
tables). The state dict round-trips, so ``Trainer`` checkpoints resume exactly.

Row-wise tables keep their gradient off ``p.grad``: a post-accumulate-grad hook moves it to a
pending slot that ``step()`` consumes. ``torch.nn.utils.clip_grad_norm_`` (what ``Trainer`` calls)
cannot take sparse tensors, so this keeps clipping working; it then covers the dense parameters
only, while each table row's step is normalised by its own Adam/Adagrad statistics.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..memory.engram import EngramMemory
from ..offload.rows import TensorRows
from ..offload.stores import describe_table, refuse_fp8_training

_ROW_KINDS = {"adam": "adam_rows", "adagrad": "adagrad_rows", "dense": "dense"}
_PENDING = "_engram_pending_grads"
# The attribute of an offloaded table's gradient anchor that names its table.
_TABLE_OF_ANCHOR = "_engram_offloaded_table"
# Per-row state of each row-wise kind: name -> floats per row (None: the table's width).
_ROW_STATE = {"adagrad_rows": {"sum": 1}, "adam_rows": {"exp_avg": None, "exp_avg_sq": None}}


def _stash_grad(p: torch.Tensor) -> None:
    getattr(p, _PENDING).append(p.grad)
    p.grad = None


def _install_stash_hook(p: torch.Tensor) -> None:
    # One hook per tensor, whatever the number of optimizers built over it.
    if not hasattr(p, _PENDING):
        setattr(p, _PENDING, [])
        p.register_post_accumulate_grad_hook(_stash_grad)


def _merge(grads: list[torch.Tensor], shape) -> torch.Tensor:
    if all(g.is_sparse for g in grads):
        if len(grads) == 1:
            return grads[0]
        return torch.sparse_coo_tensor(
            torch.cat([g._indices() for g in grads], 1),
            torch.cat([g._values() for g in grads]),
            shape,
            check_invariants=False,
        )
    return sum(g.to_dense() for g in grads)


def _take_pending_grad(p: torch.Tensor) -> torch.Tensor | None:
    table = getattr(p, _TABLE_OF_ANCHOR, None)
    if table is not None:
        grads = table.take_row_gradients()
        return _merge(grads, table.shape) if grads else None
    pending = getattr(p, _PENDING, None)
    if not pending:
        return p.grad
    grads = list(pending)
    pending.clear()
    if p.grad is not None:
        grads.append(p.grad)
    return _merge(grads, p.shape)


def _engram_modules(model: nn.Module) -> list[EngramMemory]:
    return [m for m in model.modules() if isinstance(m, EngramMemory)]


def set_sparse_table_grads(model: nn.Module, enabled: bool = True) -> int:
    """Make every Engram table produce a sparse (row) gradient; returns the number of tables.

    Sparse gradients need an optimizer that accepts them (``EngramOptimizer`` row modes,
    ``torch.optim.SparseAdam``, ``torch.optim.Adagrad``); ``torch.optim.AdamW`` does not.
    Offloaded tables always produce row gradients, and only while an optimizer trains them.
    """
    modules = _engram_modules(model)
    for m in modules:
        m.sparse_grad = enabled
    return len(modules)


def _table_tensor(engram: EngramMemory) -> torch.Tensor:
    """What stands for a table in the optimizer: the weight, or an offloaded table's anchor."""
    if engram.offloaded:
        anchor = engram.table.grad_anchor
        setattr(anchor, _TABLE_OF_ANCHOR, engram.table)
        return anchor
    return engram.table.weight


def engram_param_groups(
    model: nn.Module,
    lr: float,
    table_lr: float | None = None,
    weight_decay: float = 0.0,
    table_optimizer: str = "adagrad",
) -> list[dict]:
    """Parameter groups: decayed dense weights, undecayed dense (biases, norms, 1-D), and tables.

    Tables get ``table_lr`` (default ``5 * lr``: the memory is updated sparsely, each row rarely)
    and never weight decay. Offloaded tables appear through their gradient anchors.
    """
    if table_optimizer not in _ROW_KINDS:
        raise ValueError(f"table_optimizer must be one of {sorted(_ROW_KINDS)}, got {table_optimizer!r}.")
    engrams = _engram_modules(model)
    tables = {id(e.table.weight) for e in engrams if not e.offloaded}
    decay, no_decay, table_params = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in tables:
            table_params.append(p)
        elif p.dim() < 2 or name.endswith(".bias") or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    offloaded = [e for e in engrams if e.offloaded and e.table.trainable]
    if offloaded and table_optimizer == "dense":
        raise ValueError("Offloaded tables train with a row-wise optimizer: use table_optimizer='adagrad' or 'adam'.")
    table_params += [_table_tensor(e) for e in offloaded]
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "kind": "dense", "name": "dense"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "kind": "dense", "name": "dense_no_decay"},
        {
            "params": table_params,
            "lr": 5.0 * lr if table_lr is None else table_lr,
            "weight_decay": 0.0,
            "kind": _ROW_KINDS[table_optimizer],
            "name": "engram_tables",
        },
    ]
    return [g for g in groups if g["params"]]


class EngramOptimizer(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"Invalid hyper-parameters: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}."
            )
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, kind="dense"))
        # Offloaded tables whose state was not restored after load_state_dict (see load_offloaded_state).
        self._unrestored: set[int] = set()
        for g in self.param_groups:
            if g["kind"] not in ("dense", "adam_rows", "adagrad_rows"):
                raise ValueError(f"Unknown group kind {g['kind']!r}.")
            if g["kind"] == "dense":
                if any(hasattr(p, _TABLE_OF_ANCHOR) for p in g["params"]):
                    raise ValueError("An offloaded table cannot be in a dense group: use a row-wise table optimizer.")
                continue
            for p in g["params"]:
                table = getattr(p, _TABLE_OF_ANCHOR, None)
                if table is None and p.dim() != 2:
                    raise ValueError("Row-wise groups take 2-D tables only.")
                if table is None:
                    _install_stash_hook(p)
                self._row_state(p, g["kind"])  # allocated and touched now, not on the first step

    # -------------------------------------------------------------- where a table and its state live
    @staticmethod
    def _table_rows(p: torch.Tensor):
        table = getattr(p, _TABLE_OF_ANCHOR, None)
        return table.store.rows if table is not None else TensorRows(p.data)

    def _row_state(self, p: torch.Tensor, kind: str) -> dict:
        """The row arrays of ``p``'s optimizer state, created on first use."""
        table = getattr(p, _TABLE_OF_ANCHOR, None)
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        arrays = {}
        for name, width in _ROW_STATE[kind].items():
            width = width or (table.embedding_dim if table is not None else p.shape[1])
            if table is not None:
                arrays[name] = table.store.state(name, width)
                state["offloaded"] = _store_token(table)
            else:
                if name not in state:
                    # zeros() writes every page now: later steps do not pay first-touch faults.
                    shape = (p.shape[0],) if width == 1 else (p.shape[0], width)
                    state[name] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                t = state[name]
                arrays[name] = TensorRows(t if t.dim() == 2 else t.view(-1, 1))
        return arrays

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for g in self.param_groups:
            for p in g["params"]:
                getattr(p, _PENDING, []).clear()
                table = getattr(p, _TABLE_OF_ANCHOR, None)
                if table is not None:
                    table.take_row_gradients()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._unrestored:
            raise RuntimeError(
                "This optimizer was loaded from a state dict whose offloaded-table state (Adagrad sums / Adam "
                "moments kept with the tables) has not been restored: call load_offloaded_state(checkpoint_dir), "
                "or resume with engram_hf.training.EngramTrainer, which does."
            )
        for group in self.param_groups:
            for p in group["params"]:
                if group["kind"] == "dense":
                    if p.grad is not None:
                        self._adamw(p, group)
                    continue
                grad = _take_pending_grad(p)
                if grad is None:
                    continue
                rows, values = _row_gradient(grad)
                if not rows.numel():
                    continue
                table_rows = self._table_rows(p)
                state = self._row_state(p, group["kind"])
                self.state[p]["step"] += 1
                update = self._adam_rows if group["kind"] == "adam_rows" else self._adagrad_rows
                args = (table_rows, state, rows, values, dict(group), self.state[p]["step"].item())
                table = getattr(p, _TABLE_OF_ANCHOR, None)
                if table is None:
                    update(*args)
                else:
                    args = (table_rows, state, rows.cpu(), values.cpu(), *args[4:])
                    table.run_update(
                        lambda args=args, update=update, table=table: table.rows_written(args[2], update(*args))
                    )
        return loss

    def _adamw(self, p, group):
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("A dense group received a sparse gradient: put Engram tables in a row-wise group.")
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        b1, b2 = group["betas"]
        step = state["step"].item()
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2**step)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1**step))

    # The row updates below are the only table arithmetic: every tier runs exactly these lines.
    @staticmethod
    def _adam_rows(table, state, rows, values, group, step):
        b1, b2 = group["betas"]
        values = values.float()
        m = state["exp_avg"].read(rows).lerp_(values, 1 - b1)
        v = state["exp_avg_sq"].read(rows).mul_(b2).addcmul_(values, values, value=1 - b2)
        state["exp_avg"].write(rows, m)
        state["exp_avg_sq"].write(rows, v)
        update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt_().add_(group["eps"]))
        new = table.read(rows) + (-group["lr"] * update).to(table.dtype)
        table.write(rows, new)
        return new

    @staticmethod
    def _adagrad_rows(table, state, rows, values, group, step):
        values = values.float()
        acc = state["sum"].read(rows).squeeze(1) + values.pow(2).mean(1)
        state["sum"].write(rows, acc[:, None])
        scale = -group["lr"] / (acc.sqrt() + group["eps"])
        new = table.read(rows) + (values * scale[:, None]).to(table.dtype)
        table.write(rows, new)
        return new

    # -------------------------------------------------------------- checkpoints of offloaded state
    def state_dict(self):
        # Offloaded tables' per-row state stays out (it may be larger than RAM): save_offloaded_state.
        out = super().state_dict()
        for entry in out["state"].values():
            if entry.get("offloaded"):
                for name in ("sum", "exp_avg", "exp_avg_sq"):
                    entry.pop(name, None)
        return out

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # A state dict from this very store (accelerate round-trips it when preparing the optimizer)
        # lost nothing; one from elsewhere (a checkpoint) needs load_offloaded_state.
        self._unrestored = set()
        for p, s in self.state.items():
            table = getattr(p, _TABLE_OF_ANCHOR, None)
            if s.get("offloaded") and (table is None or s["offloaded"] != _store_token(table)):
                self._unrestored.add(id(p))

    def offloaded_tables(self) -> dict[int, tuple[torch.Tensor, object]]:
        """{position in the optimizer's parameter order: (anchor, table)} of every offloaded table."""
        out, i = {}, 0
        for g in self.param_groups:
            for p in g["params"]:
                table = getattr(p, _TABLE_OF_ANCHOR, None)
                if table is not None:
                    out[i] = (p, table)
                i += 1
        return out

    def save_offloaded_state(self, directory) -> list[Path]:
        """Write each offloaded table's optimizer state (the rows' Adagrad sums or Adam moments) into
        ``directory`` as safetensors, streamed by row blocks; nothing larger than a block is held."""
        from ..offload.safetensors_io import write_streamed

        directory = Path(directory)
        written = []
        for index, (anchor, table) in self.offloaded_tables().items():
            table.wait_updates()
            arrays = {name: rows for name, rows in table.store.states.items()}
            if not arrays:
                continue
            path = directory / _state_file(index, table)
            meta = {"step": json.dumps(float(self.state[anchor]["step"])), "table": table.describe()}
            write_streamed(path, arrays, metadata=meta)
            written.append(path)
        return written

    def load_offloaded_state(self, directory) -> None:
        """Restore what ``save_offloaded_state`` wrote, into each table's state arrays.

        The saved layout need not match this one: state saved by N ranks resumes on M ranks or in
        one process, and the reverse. Each table reads, from whichever saved files hold them, the
        global rows it now owns."""
        from safetensors import safe_open

        directory = Path(directory)
        for index, (anchor, table) in self.offloaded_tables().items():
            kind = next(g["kind"] for g in self.param_groups if any(p is anchor for p in g["params"]))
            sources = _state_sources(directory, index, table)
            if not sources:
                if self.state[anchor].get("offloaded"):
                    raise FileNotFoundError(
                        f"{directory / _state_file(index, table)} is missing: the checkpoint lacks an offloaded "
                        "table's optimizer state."
                    )
                continue
            start, stop = _global_rows(table)
            arrays = self._row_state(anchor, kind)
            steps = set()
            for path, (first, last), expected in sources:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("table") != expected:
                        raise ValueError(f"{path} holds state for {meta.get('table')}, not for {expected}.")
                    steps.add(meta["step"])
                    lo, hi = max(first, start), min(last, stop)
                    for name, target in arrays.items():
                        sl = f.get_slice(name)
                        for a in range(lo, hi, 1 << 16):
                            b = min(a + (1 << 16), hi)
                            target.write(torch.arange(a - start, b - start), sl[a - first : b - first])
            if len(steps) != 1:
                raise ValueError(f"The optimizer state files of table {index} in {directory} are from different steps.")
            self.state[anchor]["step"] = torch.tensor(float(json.loads(steps.pop())))
            self.state[anchor]["offloaded"] = _store_token(table)
            self._unrestored.discard(id(anchor))


def _state_file(index: int, table) -> str:
    """Where a table's optimizer state is saved; a row-sharded table's, one file per rank (its rows)."""
    sharding = getattr(table, "sharding", None)
    if sharding is not None:
        return f"engram-optimizer-{index}-rank{sharding.rank}-of-{sharding.world_size}.safetensors"
    return f"engram-optimizer-{index}.safetensors"


_RANK_FILE = re.compile(r"^engram-optimizer-(\d+)-rank(\d+)-of-(\d+)\.safetensors$")


def _global_rows(table) -> tuple[int, int]:
    """The table's rows as global row ids ``[start, stop)``: a shard's range, or the whole table."""
    sharding = getattr(table, "sharding", None)
    return (sharding.start, sharding.stop) if sharding is not None else (0, table.num_embeddings)


def _state_sources(directory: Path, index: int, table) -> list[tuple[Path, tuple[int, int], str]]:
    """Saved state files of table ``index`` that hold rows this table owns, with the global rows
    each holds and how its table described itself: this layout's own file if present, else the one
    complete saved layout there is (one process, or every rank of one world size). Row ranges
    follow ``RowSharding``, as the saving ranks did."""
    from ..distributed.sharding import RowSharding

    def named(rows=None) -> str:  # how the table that saved a file (whole, or a shard) named itself
        return describe_table(table.layer, table.num_embeddings, table.embedding_dim, rows)

    start, stop = _global_rows(table)
    own = directory / _state_file(index, table)
    if own.exists():
        return [(own, (start, stop), table.describe())]
    layouts: dict[str, list] = {}
    whole = directory / f"engram-optimizer-{index}.safetensors"
    if whole.exists():
        layouts["one process"] = [(whole, (0, table.num_embeddings), named())]
    ranks: dict[int, dict[int, Path]] = {}
    for path in directory.glob(f"engram-optimizer-{index}-rank*-of-*.safetensors"):
        m = _RANK_FILE.match(path.name)
        if m and int(m.group(1)) == index:
            ranks.setdefault(int(m.group(3)), {})[int(m.group(2))] = path
    incomplete = []
    for world, files in sorted(ranks.items()):
        if sorted(files) != list(range(world)):
            incomplete.append(f"{len(files)} of {world} rank files")
            continue
        layouts[f"{world} ranks"] = []
        for rank, path in sorted(files.items()):
            s = RowSharding(table.num_embeddings, world, rank)
            layouts[f"{world} ranks"].append((path, (s.start, s.stop), named((s.start, s.stop))))
    if not layouts and not incomplete:
        return []
    if len(layouts) != 1:
        found = ", ".join([*layouts, *incomplete])
        raise FileNotFoundError(
            f"{directory} holds no single complete set of optimizer state files for table {index} (found: {found})."
        )
    (sources,) = layouts.values()
    return [(path, rows, described) for path, rows, described in sources if rows[0] < stop and start < rows[1]]


def _store_token(table) -> int:
    """Names the store holding a table's state in this process (it never survives a save and load).
    An int: torch's ``load_state_dict`` mangles strings in state."""
    return id(table.store) * 4_194_304 + os.getpid()


def _row_gradient(grad: torch.Tensor) -> tuple[torch.LongTensor, torch.Tensor]:
    """(unique rows, summed row gradients) from a sparse or dense 2-D gradient."""
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    rows = grad.abs().amax(dim=1).nonzero().squeeze(1)
    return rows, grad[rows]


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    table_lr: float | None = None,
    weight_decay: float = 0.0,
    table_optimizer: str = "adagrad",
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    offload_dir=None,
    train_tables: bool = True,
) -> EngramOptimizer:
    """The recommended optimizer: row-wise table updates with sparse table gradients switched on.

    Offloaded tables are made trainable here: host tables are updated in RAM; disk tables write the
    rows they change and their optimizer state to sparse work files in ``offload_dir`` (required
    then), never into the checkpoint they were loaded from.

    ``train_tables=False`` leaves every table out (frozen) and trains the rest: the projections,
    gates and conv, and whatever else requires grad. FP8 tables (``engram_table_format="fp8"``, or
    V4.1's) are never trained: with them, pass ``train_tables=False`` (otherwise this raises, saying why).

    With ``transformers.Trainer``: ``Trainer(..., optimizers=(build_optimizer(model, lr=args.learning_rate), None))``
    (``engram_hf.training.EngramTrainer`` also saves and restores offloaded tables and their state);
    the Trainer still builds its LR scheduler over these groups.
    """
    if table_optimizer not in _ROW_KINDS:
        raise ValueError(f"table_optimizer must be one of {sorted(_ROW_KINDS)}, got {table_optimizer!r}.")
    engrams = _engram_modules(model)
    if train_tables:
        quantized = [e.layer_idx for e in engrams if e.quantized]
        if quantized:
            refuse_fp8_training(True, hint="pass train_tables=False to train everything else with them frozen")
        set_sparse_table_grads(model, table_optimizer != "dense")
        if table_optimizer != "dense":
            for e in engrams:
                if e.offloaded:
                    e.table.make_trainable(offload_dir)
    else:
        for e in engrams:
            if not e.offloaded and not e.quantized:
                e.table.weight.requires_grad_(False)
    groups = engram_param_groups(model, lr, table_lr, weight_decay, table_optimizer)
    return EngramOptimizer(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def optimizer_state_bytes_per_row(optimizer: EngramOptimizer, table: torch.Tensor) -> float:
    """Bytes of optimizer state held for ``table`` (a weight or an offloaded table's anchor), per row."""
    owner = getattr(table, _TABLE_OF_ANCHOR, None)
    if owner is not None:
        total = sum(r.tensor.numel() * r.tensor.element_size() for r in owner.store.states.values())
        return total / owner.shape[0]
    state = optimizer.state.get(table, {})
    total = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return total / table.shape[0] if math.prod(table.shape) else 0.0
