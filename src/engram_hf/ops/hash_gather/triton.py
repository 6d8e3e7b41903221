"""Triton kernels: fused compression + n-gram hash + row gather, and the sparse table backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hash_gather_fwd(
    ids_ptr, lut_ptr, prefix_ptr, mask_ptr, pad_ptr, mult_ptr, moduli_ptr, offsets_ptr, w_ptr, e_ptr, rows_ptr,
    T, H, D, n_head,
    N: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (token, head): hash the head's n-gram ending at the token, copy its row into e_t.
    tok = tl.program_id(0)
    h = tl.program_id(1)
    b = tok // T
    t = tok % T
    last_k = h // n_head + 1  # head h belongs to order h // n_head + 2: it mixes tokens t-0 .. t-last_k
    pad = tl.load(pad_ptr)
    mix = tl.zeros((), dtype=tl.int64)
    for k in tl.static_range(N):
        s = t - k
        in_seq = s >= 0
        s_c = tl.maximum(s, 0)
        c = tl.load(lut_ptr + tl.load(ids_ptr + b * T + s_c))
        if HAS_MASK:
            c = tl.where(tl.load(mask_ptr + b * T + s_c) != 0, c, pad)
        before = tl.load(prefix_ptr + b * (N - 1) + (N - 1) + s, mask=s < 0, other=0)
        c = tl.where(in_seq, c, before)
        term = c * tl.load(mult_ptr + k)
        mix = tl.where(k <= last_k, mix ^ term, mix)
    row = mix % tl.load(moduli_ptr + h) + tl.load(offsets_ptr + h)
    tl.store(rows_ptr + tok * H + h, row)
    cols = tl.arange(0, BLOCK_D)
    keep = cols < D
    vals = tl.load(w_ptr + row * D + cols, mask=keep)
    tl.store(e_ptr + (tok * H + h) * D + cols, vals, mask=keep)


@triton.jit
def _segment_sum(grad_ptr, perm_ptr, starts_ptr, counts_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    # One program per unique row: sum the gradient rows of every lookup that hit it (sorted order,
    # so no atomics and a deterministic result).
    seg = tl.program_id(0)
    start = tl.load(starts_ptr + seg)
    count = tl.load(counts_ptr + seg)
    cols = tl.arange(0, BLOCK_D)
    keep = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(count):
        src = tl.load(perm_ptr + start + i)
        acc += tl.load(grad_ptr + src * D + cols, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + seg * D + cols, acc, mask=keep)


def hash_gather_forward(ids, lut, prefix, mask, pad, multipliers, moduli, offsets, weight):
    B, T = ids.shape
    H, D = moduli.shape[0], weight.shape[1]
    N = multipliers.shape[0]
    ids = ids.contiguous()
    e = torch.empty(B, T, H * D, device=weight.device, dtype=weight.dtype)
    rows = torch.empty(B, T, H, device=ids.device, dtype=torch.long)
    if B * T == 0:
        return e, rows
    mask_arg = mask.contiguous() if mask is not None else ids
    pad = pad.reshape(1).to(device=ids.device, dtype=torch.long)
    _hash_gather_fwd[(B * T, H)](
        ids, lut, prefix.contiguous(), mask_arg, pad, multipliers, moduli, offsets, weight, e, rows,
        T, H, D, H // (N - 1),
        N=N, HAS_MASK=mask is not None, BLOCK_D=triton.next_power_of_2(D),
    )
    return e, rows


def table_grad_rows(rows: torch.LongTensor, grad_rows: torch.Tensor):
    """(unique rows, summed gradient per unique row), sort-based."""
    flat = rows.reshape(-1)
    D = grad_rows.shape[-1]
    grad_rows = grad_rows.reshape(-1, D).contiguous()
    sorted_rows, perm = torch.sort(flat)
    unique, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    out = torch.empty(unique.shape[0], D, device=grad_rows.device, dtype=torch.float32)
    if unique.numel():
        _segment_sum[(unique.shape[0],)](grad_rows, perm, starts, counts, out, D, BLOCK_D=triton.next_power_of_2(D))
    return unique, out


class HashGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids, lut, prefix, mask, pad, multipliers, moduli, offsets, sparse_grad):
        e, rows = hash_gather_forward(ids, lut, prefix, mask, pad, multipliers, moduli, offsets, weight)
        ctx.save_for_backward(rows)
        ctx.table_shape, ctx.sparse_grad, ctx.dtype = weight.shape, sparse_grad, weight.dtype
        ctx.mark_non_differentiable(rows)
        return e, rows

    @staticmethod
    def backward(ctx, grad_e, _grad_rows):
        (rows,) = ctx.saved_tensors
        D = ctx.table_shape[1]
        unique, summed = table_grad_rows(rows, grad_e.reshape(-1, D))
        summed = summed.to(ctx.dtype)
        if ctx.sparse_grad:
            grad = torch.sparse_coo_tensor(
                unique[None], summed, ctx.table_shape, is_coalesced=True, check_invariants=False
            )
        else:
            grad = torch.zeros(ctx.table_shape, device=summed.device, dtype=ctx.dtype).index_copy_(0, unique, summed)
        return grad, None, None, None, None, None, None, None, None, None
