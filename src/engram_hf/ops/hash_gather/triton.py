"""Triton kernels: n-gram hash + row gather for a block of tokens, and the sparse table backward.

Every index that scales with the number of tokens or table rows is int64: ``B*T*H*d`` passes 2^31
at long-context sizes, and table offsets do so for any table over 2^31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import device_guard
from ..inputs import EngramInputs, HashParams

# Lookups summed by one program of the backward's first pass. A hot row (the pad n-grams of a
# padded batch hit one row thousands of times) is then split over many programs instead of
# serialising on one.
SEGMENT_CHUNK = 32


@triton.jit
def _hash_gather_fwd(
    ids_ptr,
    prefix_ptr,
    mult_ptr,
    moduli_ptr,
    offsets_ptr,
    w_ptr,
    e_ptr,
    rows_ptr,
    n_tok,
    T,
    H,
    D,
    n_head,
    N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per BLOCK_T tokens, all heads: each order's mix is computed once and shared by
    # its heads, and the program copies BLOCK_T * H whole rows.
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    tok_ok = tok < n_tok
    b = tok // T
    t = tok % T
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < H
    head_last_k = heads // n_head + 1  # a head of order n mixes tokens t-0 .. t-(n-1)
    mix = tl.zeros((BLOCK_T,), dtype=tl.int64)
    per_head = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.int64)
    for k in tl.static_range(N):
        s = t - k
        inside = tl.load(ids_ptr + b * T + tl.maximum(s, 0), mask=tok_ok & (s >= 0), other=0)
        before = tl.load(prefix_ptr + b * (N - 1) + (N - 1) + s, mask=tok_ok & (s < 0), other=0)
        c = tl.where(s >= 0, inside, before)
        mix = mix ^ (c * tl.load(mult_ptr + k))
        if k >= 1:
            per_head = tl.where(head_last_k[None, :] == k, mix[:, None], per_head)
    moduli = tl.load(moduli_ptr + heads, mask=head_ok, other=1)
    offsets = tl.load(offsets_ptr + heads, mask=head_ok, other=0)
    row = per_head % moduli[None, :] + offsets[None, :]
    ok = tok_ok[:, None] & head_ok[None, :]
    tl.store(rows_ptr + tok[:, None] * H + heads[None, :], row, mask=ok)
    cols = tl.arange(0, BLOCK_D)
    ok3 = ok[:, :, None] & (cols < D)[None, None, :]
    vals = tl.load(w_ptr + row[:, :, None] * D + cols[None, None, :], mask=ok3)
    out = (tok[:, None, None] * H + heads[None, :, None]) * D + cols[None, None, :]
    tl.store(e_ptr + out, vals, mask=ok3)


@triton.jit
def _chunk_sum(
    grad_ptr, perm_ptr, chunk_start_ptr, chunk_len_ptr, out_ptr, D, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr
):
    # Pass 1: one program per chunk of at most CHUNK lookups of the same row (sorted order).
    chunk = tl.program_id(0).to(tl.int64)
    start = tl.load(chunk_start_ptr + chunk)
    count = tl.load(chunk_len_ptr + chunk)
    cols = tl.arange(0, BLOCK_D)
    keep = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(count):
        src = tl.load(perm_ptr + start + i)
        acc += tl.load(grad_ptr + src * D + cols, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + chunk * D + cols, acc, mask=keep)


@triton.jit
def _segment_sum(partial_ptr, first_chunk_ptr, n_chunks_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    # Pass 2: one program per unique row, summing its chunks in order (deterministic, no atomics).
    seg = tl.program_id(0).to(tl.int64)
    first = tl.load(first_chunk_ptr + seg)
    count = tl.load(n_chunks_ptr + seg)
    cols = tl.arange(0, BLOCK_D)
    keep = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(count):
        acc += tl.load(partial_ptr + (first + i) * D + cols, mask=keep, other=0.0)
    tl.store(out_ptr + seg * D + cols, acc, mask=keep)


def _block_t(H: int, D: int) -> int:
    # About 4k elements in flight per program.
    return max(1, min(16, 4096 // (triton.next_power_of_2(H) * triton.next_power_of_2(D))))


def hash_gather_forward(inputs: EngramInputs, hashing: HashParams, weight: torch.Tensor):
    ids = inputs.ids.contiguous()
    B, T = ids.shape
    H, D = hashing.moduli.shape[0], weight.shape[1]
    N = hashing.multipliers.shape[0]
    e = torch.empty(B, T, H * D, device=weight.device, dtype=weight.dtype)
    rows = torch.empty(B, T, H, device=ids.device, dtype=torch.long)
    if B * T == 0:
        return e, rows
    block_t = _block_t(H, D)
    with device_guard(weight):
        _hash_gather_fwd[(triton.cdiv(B * T, block_t),)](
            ids,
            inputs.prefix.contiguous(),
            hashing.multipliers,
            hashing.moduli,
            hashing.offsets,
            weight.contiguous(),
            e,
            rows,
            B * T,
            T,
            H,
            D,
            H // (N - 1),
            N=N,
            BLOCK_T=block_t,
            BLOCK_H=triton.next_power_of_2(H),
            BLOCK_D=triton.next_power_of_2(D),
        )
    return e, rows


def table_grad_rows(rows: torch.LongTensor, grad_rows: torch.Tensor):
    """(unique rows, summed float32 gradient per unique row), sort-based and deterministic."""
    flat = rows.reshape(-1)
    D = grad_rows.shape[-1]
    grad_rows = grad_rows.reshape(-1, D).contiguous()
    sorted_rows, perm = torch.sort(flat)
    unique, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    out = torch.empty(unique.shape[0], D, device=grad_rows.device, dtype=torch.float32)
    if not unique.numel():
        return unique, out
    starts = torch.cumsum(counts, 0) - counts
    n_chunks = (counts + SEGMENT_CHUNK - 1) // SEGMENT_CHUNK
    first_chunk = torch.cumsum(n_chunks, 0) - n_chunks
    total = int(n_chunks.sum())
    seg_of_chunk = torch.repeat_interleave(torch.arange(unique.shape[0], device=flat.device), n_chunks)
    rank = torch.arange(total, device=flat.device) - first_chunk[seg_of_chunk]
    chunk_start = starts[seg_of_chunk] + rank * SEGMENT_CHUNK
    chunk_len = torch.minimum(
        starts[seg_of_chunk] + counts[seg_of_chunk] - chunk_start, torch.full_like(chunk_start, SEGMENT_CHUNK)
    )
    partial = torch.empty(total, D, device=grad_rows.device, dtype=torch.float32)
    block_d = triton.next_power_of_2(D)
    with device_guard(grad_rows):
        _chunk_sum[(total,)](grad_rows, perm, chunk_start, chunk_len, partial, D, CHUNK=SEGMENT_CHUNK, BLOCK_D=block_d)
        _segment_sum[(unique.shape[0],)](partial, first_chunk, n_chunks, out, D, BLOCK_D=block_d)
    return unique, out


class HashGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, inputs: EngramInputs, hashing: HashParams, sparse_grad: bool):
        e, rows = hash_gather_forward(inputs, hashing, weight)
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
        return grad, None, None, None
