"""One optimizer for a whole Engram model: AdamW for dense parameters, row-wise updates for tables.

Engram tables are huge and each batch touches a few thousand of their rows. With sparse table
gradients (``set_sparse_table_grads``) backward never materialises a table-sized gradient, and
the row-wise modes below update only the touched rows, so a training step costs the same whatever
the table size:

* ``"adam"``: lazy Adam on touched rows (as ``torch.optim.SparseAdam``): two moments per element.
* ``"adagrad"``: row-wise Adagrad (as FBGEMM's ``EXACT_ROWWISE_ADAGRAD``): one float32 per row, the
  running sum of the row's mean squared gradient; 4 bytes of state per row.
* ``"dense"``: plain AdamW on the table like any other parameter (the correct, slow fallback).

Groups carry ``kind``: ``"dense"``, ``"adam_rows"`` or ``"adagrad_rows"``. Every group honours
``lr`` (so LR schedulers work), ``betas``, ``eps`` and ``weight_decay`` (decoupled; never applied to
tables). The state dict round-trips, so ``Trainer`` checkpoints resume exactly.

Row-wise tables keep their gradient off ``p.grad``: a post-accumulate-grad hook moves it to a
pending slot that ``step()`` consumes. ``torch.nn.utils.clip_grad_norm_`` (what ``Trainer`` calls)
cannot take sparse tensors, so this keeps clipping working; it then covers the dense parameters
only, while each table row's step is normalised by its own Adam/Adagrad statistics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..memory.engram import EngramMemory

_ROW_KINDS = {"adam": "adam_rows", "adagrad": "adagrad_rows", "dense": "dense"}
_PENDING = "_engram_pending_grads"


def _stash_grad(p: torch.Tensor) -> None:
    getattr(p, _PENDING).append(p.grad)
    p.grad = None


def _install_stash_hook(p: torch.Tensor) -> None:
    # One hook per tensor, whatever the number of optimizers built over it.
    if not hasattr(p, _PENDING):
        setattr(p, _PENDING, [])
        p.register_post_accumulate_grad_hook(_stash_grad)


def _take_pending_grad(p: torch.Tensor) -> torch.Tensor | None:
    pending = getattr(p, _PENDING, None)
    if not pending:
        return p.grad
    grads = list(pending)
    pending.clear()
    if p.grad is not None:
        grads.append(p.grad)
    if all(g.is_sparse for g in grads):
        return torch.sparse_coo_tensor(
            torch.cat([g._indices() for g in grads], 1),
            torch.cat([g._values() for g in grads]),
            p.shape,
            check_invariants=False,
        )
    return sum(g.to_dense() for g in grads)


def _engram_modules(model: nn.Module) -> list[EngramMemory]:
    return [m for m in model.modules() if isinstance(m, EngramMemory)]


def set_sparse_table_grads(model: nn.Module, enabled: bool = True) -> int:
    """Make every Engram table produce a sparse (row) gradient; returns the number of tables.

    Sparse gradients need an optimizer that accepts them (``EngramOptimizer`` row modes,
    ``torch.optim.SparseAdam``, ``torch.optim.Adagrad``); ``torch.optim.AdamW`` does not.
    """
    modules = _engram_modules(model)
    for m in modules:
        m.sparse_grad = enabled
    return len(modules)


def engram_param_groups(
    model: nn.Module,
    lr: float,
    table_lr: float | None = None,
    weight_decay: float = 0.0,
    table_optimizer: str = "adam",
) -> list[dict]:
    """Parameter groups: decayed dense weights, undecayed dense (biases, norms, 1-D), and tables.

    Tables get ``table_lr`` (default ``5 * lr``: the memory is updated sparsely, each row rarely)
    and never weight decay.
    """
    if table_optimizer not in _ROW_KINDS:
        raise ValueError(f"table_optimizer must be one of {sorted(_ROW_KINDS)}, got {table_optimizer!r}.")
    tables = {id(m.table.weight) for m in _engram_modules(model)}
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
        for g in self.param_groups:
            if g["kind"] not in ("dense", "adam_rows", "adagrad_rows"):
                raise ValueError(f"Unknown group kind {g['kind']!r}.")
            if g["kind"] != "dense":
                if any(p.dim() != 2 for p in g["params"]):
                    raise ValueError("Row-wise groups take 2-D tables only.")
                for p in g["params"]:
                    _install_stash_hook(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for g in self.param_groups:
            for p in g["params"]:
                getattr(p, _PENDING, []).clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if group["kind"] == "dense":
                    if p.grad is not None:
                        self._adamw(p, group)
                    continue
                grad = _take_pending_grad(p)
                if grad is not None:
                    rows, values = _row_gradient(grad)
                    if rows.numel():
                        (self._adam_rows if group["kind"] == "adam_rows" else self._adagrad_rows)(
                            p, rows, values, group
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

    def _adam_rows(self, p, rows, values, group):
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        b1, b2 = group["betas"]
        step = state["step"].item()
        values = values.float()
        m = state["exp_avg"][rows].lerp_(values, 1 - b1)
        v = state["exp_avg_sq"][rows].mul_(b2).addcmul_(values, values, value=1 - b2)
        state["exp_avg"][rows] = m
        state["exp_avg_sq"][rows] = v
        update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt_().add_(group["eps"]))
        p.index_add_(0, rows, (-group["lr"] * update).to(p.dtype))

    def _adagrad_rows(self, p, rows, values, group):
        state = self.state[p]
        if not state:
            state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        values = values.float()
        acc = state["sum"][rows] + values.pow(2).mean(1)
        state["sum"][rows] = acc
        scale = -group["lr"] / (acc.sqrt() + group["eps"])
        p.index_add_(0, rows, (values * scale[:, None]).to(p.dtype))


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
    table_optimizer: str = "adam",
    betas=(0.9, 0.999),
    eps: float = 1e-8,
) -> EngramOptimizer:
    """The recommended optimizer: row-wise table updates with sparse table gradients switched on.

    With ``transformers.Trainer``: ``Trainer(..., optimizers=(build_optimizer(model, lr=args.learning_rate), None))``;
    the Trainer still builds its LR scheduler over these groups.
    """
    set_sparse_table_grads(model, table_optimizer != "dense")
    groups = engram_param_groups(model, lr, table_lr, weight_decay, table_optimizer)
    return EngramOptimizer(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def optimizer_state_bytes_per_row(optimizer: EngramOptimizer, table: torch.Tensor) -> float:
    """Bytes of optimizer state held for ``table``, per row (0 before its first update)."""
    state = optimizer.state.get(table, {})
    total = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return total / table.shape[0] if math.prod(table.shape) else 0.0
