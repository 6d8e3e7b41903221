"""Triton kernels: n-gram hash + row gather for a block of tokens, and the sparse table backward.

Every index that scales with the number of tokens or table rows is int64: ``B*T*H*d`` passes 2^31
at long-context sizes, and table offsets do so for any table over 2^31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import device_guard
from ..fp8_rows.naive import BLOCK as FP8_BLOCK
from ..fp8_rows.triton import as_bytes, e4m3_to_float
from ..inputs import EngramInputs, HashParams, TableRows
from ..launch import SEGMENT_CHUNK, gather_config, segment_config


@triton.jit(do_not_specialize=["n_tok", "T", "H", "n_head"])
def _hash_gather_fwd(
    ids_ptr,
    prefix_ptr,
    pad_ptr,
    mult_ptr,
    moduli_ptr,
    offsets_ptr,
    w_ptr,
    s_ptr,
    e_ptr,
    rows_ptr,
    n_tok,
    T,
    H,
    D: tl.int64,
    n_head,
    N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
):
    # One program per BLOCK_T tokens, all heads: each order's mix is computed once and shared by
    # its heads, and the program copies BLOCK_T * H whole rows.
    # Token and head indices are split in int32 (a call never holds 2^31 tokens; 64-bit division
    # is a slow out-of-line routine), then widened: every offset is int64.
    tok32 = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok32 < n_tok
    b = (tok32 // T).to(tl.int64)
    t = (tok32 % T).to(tl.int64)
    tok = tok32.to(tl.int64)
    heads32 = tl.arange(0, BLOCK_H)
    head_ok = heads32 < H
    head_last_k = heads32 // n_head + 1  # a head of order n mixes tokens t-0 .. t-(n-1)
    heads = heads32.to(tl.int64)
    mix = tl.zeros((BLOCK_T,), dtype=tl.int64)
    per_head = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.int64)
    pad = tl.load(pad_ptr)
    blocked = tl.zeros((BLOCK_T,), dtype=tl.int1)
    for k in tl.static_range(N):
        s = t - k
        inside = tl.load(ids_ptr + b * T + tl.maximum(s, 0), mask=tok_ok & (s >= 0), other=0)
        before = tl.load(prefix_ptr + b * (N - 1) + (N - 1) + s, mask=tok_ok & (s < 0), other=0)
        c = tl.where(s >= 0, inside, before)
        # A DEAD id (negative) latches: it and every older token hash as the pad id.
        blocked = blocked | (c < 0)
        c = tl.where(blocked, pad, c)
        mix = mix ^ (c * tl.load(mult_ptr + k))
        if k >= 1:
            per_head = tl.where(head_last_k[None, :] == k, mix[:, None], per_head)
    moduli = tl.load(moduli_ptr + heads, mask=head_ok, other=1)
    offsets = tl.load(offsets_ptr + heads, mask=head_ok, other=0)
    row = per_head % moduli[None, :] + offsets[None, :]
    ok = tok_ok[:, None] & head_ok[None, :]
    tl.store(rows_ptr + tok[:, None] * H + heads[None, :], row, mask=ok)
    # Whole rows of BLOCK_D contiguous elements: with D a multiple of 16 (which the JIT specialises
    # on), each thread issues 16-byte vector loads and stores.
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    ok3 = ok[:, :, None] & (cols < D)[None, None, :]
    vals = tl.load(w_ptr + row[:, :, None] * D + cols[None, None, :], mask=ok3)
    if QUANT:
        # FP8 rows: the codes' bytes and one scale byte per SCALE_BLOCK columns, decoded exactly.
        sc = tl.load(s_ptr + row[:, :, None] * (D // SCALE_BLOCK) + cols[None, None, :] // SCALE_BLOCK, mask=ok3)
        vals = e4m3_to_float(vals, sc).to(e_ptr.dtype.element_ty)
    out = (tok[:, None, None] * H + heads[None, :, None]) * D + cols[None, None, :]
    tl.store(e_ptr + out, vals, mask=ok3)


@triton.jit
def _chunk_sum(
    grad_ptr, perm_ptr, chunk_start_ptr, chunk_len_ptr, out_ptr, D, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr
):
    # Pass 1: one program per (chunk of at most CHUNK lookups of one row, in sorted order; block of
    # columns). The chunk's rows are loaded as one [CHUNK, BLOCK_D] tile and reduced in registers.
    chunk = tl.program_id(0).to(tl.int64)
    start = tl.load(chunk_start_ptr + chunk)
    count = tl.load(chunk_len_ptr + chunk)
    i = tl.arange(0, CHUNK).to(tl.int64)
    src = tl.load(perm_ptr + start + i, mask=i < count, other=0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    keep = cols < D
    tile = (i < count)[:, None] & keep[None, :]
    vals = tl.load(grad_ptr + src[:, None] * D + cols[None, :], mask=tile, other=0.0).to(tl.float32)
    tl.store(out_ptr + chunk * D + cols, tl.sum(vals, axis=0), mask=keep)


@triton.jit
def _segment_sum(partial_ptr, first_chunk_ptr, n_chunks_ptr, out_ptr, D, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    # Pass 2: one program per (unique row, block of columns), summing its chunks CHUNK at a time in
    # a fixed order (deterministic, no atomics). A row hit 100k times needs 98 steps here.
    seg = tl.program_id(0).to(tl.int64)
    first = tl.load(first_chunk_ptr + seg)
    count = tl.load(n_chunks_ptr + seg)
    i = tl.arange(0, CHUNK).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    keep = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i0 in range(0, count, CHUNK):
        tile = (i0 + i < count)[:, None] & keep[None, :]
        acc += tl.sum(
            tl.load(partial_ptr + (first + i0 + i)[:, None] * D + cols[None, :], mask=tile, other=0.0), axis=0
        )
    tl.store(out_ptr + seg * D + cols, acc, mask=keep)


def hash_gather_forward(inputs: EngramInputs, hashing: HashParams, table: TableRows, dtype=None):
    """(e, rows); an FP8 ``table`` is decoded to ``dtype``."""
    ids = inputs.ids.contiguous()
    B, T = ids.shape
    weight = as_bytes(table.weight).contiguous() if table.quantized else table.weight.contiguous()
    scale = as_bytes(table.scale).contiguous() if table.quantized else weight  # never read unless QUANT
    H, D = hashing.moduli.shape[0], weight.shape[1]
    N = hashing.multipliers.shape[0]
    e = torch.empty(B, T, H * D, device=weight.device, dtype=dtype if table.quantized else weight.dtype)
    rows = torch.empty(B, T, H, device=ids.device, dtype=torch.long)
    if B * T == 0:
        return e, rows
    cfg = gather_config(H, D)
    with device_guard(weight):
        _hash_gather_fwd[(triton.cdiv(B * T, cfg["BLOCK_T"]),)](
            ids,
            inputs.prefix.contiguous(),
            inputs.pad.reshape(1).to(ids.device, torch.long),
            hashing.multipliers,
            hashing.moduli,
            hashing.offsets,
            weight,
            scale,
            e,
            rows,
            B * T,
            T,
            H,
            D,
            H // (N - 1),
            N=N,
            QUANT=table.quantized,
            SCALE_BLOCK=FP8_BLOCK,
            **cfg,
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
    seg_of_chunk = torch.repeat_interleave(
        torch.arange(unique.shape[0], device=flat.device), n_chunks, output_size=total
    )
    rank = torch.arange(total, device=flat.device) - first_chunk[seg_of_chunk]
    chunk_start = starts[seg_of_chunk] + rank * SEGMENT_CHUNK
    chunk_len = torch.minimum(
        starts[seg_of_chunk] + counts[seg_of_chunk] - chunk_start, torch.full_like(chunk_start, SEGMENT_CHUNK)
    )
    partial = torch.empty(total, D, device=grad_rows.device, dtype=torch.float32)
    cfg = segment_config(D)
    n_dblk = triton.cdiv(D, cfg["BLOCK_D"])
    with device_guard(grad_rows):
        _chunk_sum[(total, n_dblk)](grad_rows, perm, chunk_start, chunk_len, partial, D, **cfg)
        _segment_sum[(unique.shape[0], n_dblk)](partial, first_chunk, n_chunks, out, D, **cfg)
    return unique, out


class HashGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, inputs: EngramInputs, hashing: HashParams, sparse_grad: bool):
        e, rows = hash_gather_forward(inputs, hashing, TableRows(weight))
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
