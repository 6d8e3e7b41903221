"""Triton kernels: fused context-aware gate (both RMSNorms, dot, signed sqrt, sigmoid, value scale).

One program per token. Rows are walked in chunks (``launch.row_config``), so register use does not
grow with the hidden size (whole 8192-wide rows in registers spill on Hopper). Every offset is
int64: ``tokens * M * D`` passes 2^31 in one long-context prefill.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backend import device_guard
from ..inputs import resolve_eps
from ..launch import row_config


@triton.jit
def _load_branch(k_ptr, h_ptr, wk_ptr, wq_ptr, base, w_base, c, keep):
    """One chunk of one branch in float32: key, hidden state, and the product of both norm weights."""
    k = tl.load(k_ptr + base + c, mask=keep, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + base + c, mask=keep, other=0.0).to(tl.float32)
    wk = tl.load(wk_ptr + w_base + c, mask=keep, other=0.0).to(tl.float32)
    wq = tl.load(wq_ptr + w_base + c, mask=keep, other=0.0).to(tl.float32)
    return k, h, wk * wq


@triton.jit
def _gate_fwd(
    k_ptr,
    h_ptr,
    v_ptr,
    wk_ptr,
    wq_ptr,
    mask_ptr,
    out_ptr,
    stats_ptr,
    D: tl.int64,
    eps_k,
    eps_q,
    inv_sqrt_d,
    zero_sign,
    M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    for m in tl.static_range(M):
        base = (tok * M + m) * D
        kk = tl.zeros((BLOCK_D,), dtype=tl.float32)
        hh = tl.zeros((BLOCK_D,), dtype=tl.float32)
        kh = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            keep = c < D
            k, h, w = _load_branch(k_ptr, h_ptr, wk_ptr, wq_ptr, base, m * D, c, keep)
            kk += k * k
            hh += h * h
            kh += w * k * h
        rk = 1.0 / tl.sqrt(tl.sum(kk, axis=0) / D + eps_k)
        rq = 1.0 / tl.sqrt(tl.sum(hh, axis=0) / D + eps_q)
        g = tl.sum(kh, axis=0) * rk * rq * inv_sqrt_d
        mag = tl.sqrt(tl.maximum(tl.abs(g), 1e-6))
        z = tl.where(g > 0, mag, tl.where(g < 0, -mag, zero_sign * mag))
        alpha = 1.0 / (1.0 + tl.exp(-z))
        if HAS_MASK:  # a dead position: its streams pass through untouched
            alpha = tl.where(tl.load(mask_ptr + tok) != 0, alpha, 0.0)
        sbase = (tok * M + m) * 4
        tl.store(stats_ptr + sbase + 0, rk)
        tl.store(stats_ptr + sbase + 1, rq)
        tl.store(stats_ptr + sbase + 2, g)
        tl.store(stats_ptr + sbase + 3, alpha)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            keep = c < D
            v = tl.load(v_ptr + tok * D + c, mask=keep, other=0.0).to(tl.float32)
            y = alpha * v
            if RESIDUAL:
                y += tl.load(h_ptr + base + c, mask=keep, other=0.0).to(tl.float32)
            tl.store(out_ptr + base + c, y.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _gate_bwd(
    dout_ptr,
    k_ptr,
    h_ptr,
    v_ptr,
    wk_ptr,
    wq_ptr,
    stats_ptr,
    dk_ptr,
    dh_ptr,
    dv_ptr,
    coef_ptr,
    D: tl.int64,
    inv_sqrt_d,
    M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    for m in tl.static_range(M):
        base = (tok * M + m) * D
        sbase = (tok * M + m) * 4
        rk = tl.load(stats_ptr + sbase + 0)
        rq = tl.load(stats_ptr + sbase + 1)
        g = tl.load(stats_ptr + sbase + 2)
        alpha = tl.load(stats_ptr + sbase + 3)
        dv_dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
        wkh = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            keep = c < D
            dout = tl.load(dout_ptr + base + c, mask=keep, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + tok * D + c, mask=keep, other=0.0).to(tl.float32)
            k, h, w = _load_branch(k_ptr, h_ptr, wk_ptr, wq_ptr, base, m * D, c, keep)
            dv_dot += dout * v
            wkh += w * k * h
        dz = tl.sum(dv_dot, axis=0) * alpha * (1.0 - alpha)
        # d/dg [sign(g) sqrt(max(|g|, 1e-6))] = 1 / (2 sqrt|g|) where |g| >= 1e-6, else 0.
        absg = tl.abs(g)
        dg = tl.where((absg >= 1e-6) & (g != 0), dz * 0.5 / tl.sqrt(tl.maximum(absg, 1e-6)), 0.0)
        s = tl.sum(wkh, axis=0)
        coef = dg * inv_sqrt_d * rk * rq
        tl.store(coef_ptr + tok * M + m, coef)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            keep = c < D
            k, h, w = _load_branch(k_ptr, h_ptr, wk_ptr, wq_ptr, base, m * D, c, keep)
            tl.store(dk_ptr + base + c, coef * (w * h - s * rk * rk * k / D), mask=keep)
            dh = coef * (w * k - s * rq * rq * h / D)
            if RESIDUAL:  # out = h + α·v: the output's gradient reaches h directly too
                dh += tl.load(dout_ptr + base + c, mask=keep, other=0.0).to(tl.float32)
            tl.store(dh_ptr + base + c, dh, mask=keep)
    # The shared value's gradient sums the branches: dv = Σ_m α_m dout_m.
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        keep = c < D
        dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for m in tl.static_range(M):
            alpha = tl.load(stats_ptr + (tok * M + m) * 4 + 3)
            dv += alpha * tl.load(dout_ptr + (tok * M + m) * D + c, mask=keep, other=0.0).to(tl.float32)
        tl.store(dv_ptr + tok * D + c, dv, mask=keep)


class GateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key, hidden, value, wk, wq, eps_k, eps_q, zero_sign=0.0, mask=None, residual=False):
        B, T, M, D = key.shape
        key, hidden, value = key.contiguous(), hidden.contiguous(), value.contiguous()
        out_dtype = hidden.dtype if residual else torch.result_type(key, value)
        out = torch.empty_like(key, dtype=out_dtype)
        stats = torch.empty(B * T, M, 4, device=key.device, dtype=torch.float32)
        mask = mask.reshape(B, T).to(torch.int32).contiguous() if mask is not None else None
        if B * T:
            with device_guard(key):
                _gate_fwd[(B * T,)](
                    key,
                    hidden,
                    value,
                    wk.contiguous(),
                    wq.contiguous(),
                    mask if mask is not None else stats,  # never read without HAS_MASK
                    out,
                    stats,
                    D,
                    resolve_eps(eps_k),
                    resolve_eps(eps_q),
                    1.0 / math.sqrt(D),
                    float(zero_sign),
                    M=M,
                    HAS_MASK=mask is not None,
                    RESIDUAL=bool(residual),
                    **row_config(D),
                )
        ctx.residual = bool(residual)
        ctx.save_for_backward(key, hidden, value, wk, wq, stats)
        return out

    @staticmethod
    def backward(ctx, dout):
        key, hidden, value, wk, wq, stats = ctx.saved_tensors
        B, T, M, D = key.shape
        # The kernel accumulates in float32 and stores each gradient in its input's dtype.
        dk, dh, dv = torch.empty_like(key), torch.empty_like(hidden), torch.empty_like(value)
        coef = torch.empty(B, T, M, device=key.device, dtype=torch.float32)
        if B * T:
            with device_guard(key):
                _gate_bwd[(B * T,)](
                    dout.contiguous(),
                    key,
                    hidden,
                    value,
                    wk.contiguous(),
                    wq.contiguous(),
                    stats,
                    dk,
                    dh,
                    dv,
                    coef,
                    D,
                    1.0 / math.sqrt(D),
                    M=M,
                    RESIDUAL=ctx.residual,
                    **row_config(D),
                )
        # The norm weights' gradients are reductions over tokens: one einsum each.
        dw = torch.einsum("btm,btmd->md", coef, key.float() * hidden.float())
        dwk, dwq = dw * wq.float(), dw * wk.float()
        return (dk, dh, dv, dwk.to(wk.dtype), dwq.to(wq.dtype), None, None, None, None, None)
