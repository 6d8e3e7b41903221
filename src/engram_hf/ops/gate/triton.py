"""Triton kernels: fused context-aware gate (both RMSNorms, dot, signed sqrt, sigmoid, value scale)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_fwd(
    k_ptr, h_ptr, v_ptr, wk_ptr, wq_ptr, out_ptr, stats_ptr,
    D, eps_k, eps_q, inv_sqrt_d,
    M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    keep = cols < D
    v = tl.load(v_ptr + tok * D + cols, mask=keep, other=0.0).to(tl.float32)
    for m in tl.static_range(M):
        base = (tok * M + m) * D
        k = tl.load(k_ptr + base + cols, mask=keep, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + base + cols, mask=keep, other=0.0).to(tl.float32)
        wk = tl.load(wk_ptr + m * D + cols, mask=keep, other=0.0).to(tl.float32)
        wq = tl.load(wq_ptr + m * D + cols, mask=keep, other=0.0).to(tl.float32)
        rk = 1.0 / tl.sqrt(tl.sum(k * k, axis=0) / D + eps_k)
        rq = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps_q)
        g = tl.sum((k * rk * wk) * (h * rq * wq), axis=0) * inv_sqrt_d
        mag = tl.sqrt(tl.maximum(tl.abs(g), 1e-6))
        z = tl.where(g > 0, mag, tl.where(g < 0, -mag, 0.0))
        alpha = 1.0 / (1.0 + tl.exp(-z))
        tl.store(out_ptr + base + cols, (alpha * v).to(out_ptr.dtype.element_ty), mask=keep)
        sbase = (tok * M + m) * 4
        tl.store(stats_ptr + sbase + 0, rk)
        tl.store(stats_ptr + sbase + 1, rq)
        tl.store(stats_ptr + sbase + 2, g)
        tl.store(stats_ptr + sbase + 3, alpha)


@triton.jit
def _gate_bwd(
    dout_ptr, k_ptr, h_ptr, v_ptr, wk_ptr, wq_ptr, stats_ptr, dk_ptr, dh_ptr, dv_ptr, coef_ptr,
    D, inv_sqrt_d,
    M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    keep = cols < D
    v = tl.load(v_ptr + tok * D + cols, mask=keep, other=0.0).to(tl.float32)
    dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for m in tl.static_range(M):
        base = (tok * M + m) * D
        sbase = (tok * M + m) * 4
        rk = tl.load(stats_ptr + sbase + 0)
        rq = tl.load(stats_ptr + sbase + 1)
        g = tl.load(stats_ptr + sbase + 2)
        alpha = tl.load(stats_ptr + sbase + 3)
        dout = tl.load(dout_ptr + base + cols, mask=keep, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + base + cols, mask=keep, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + base + cols, mask=keep, other=0.0).to(tl.float32)
        w = tl.load(wk_ptr + m * D + cols, mask=keep, other=0.0).to(tl.float32) * tl.load(
            wq_ptr + m * D + cols, mask=keep, other=0.0
        ).to(tl.float32)
        dv += alpha * dout
        dz = tl.sum(dout * v, axis=0) * alpha * (1.0 - alpha)
        # d/dg [sign(g) sqrt(max(|g|, 1e-6))] = 1 / (2 sqrt|g|) where |g| >= 1e-6, else 0.
        absg = tl.abs(g)
        dg = tl.where((absg >= 1e-6) & (g != 0), dz * 0.5 / tl.sqrt(tl.maximum(absg, 1e-6)), 0.0)
        s = tl.sum(w * k * h, axis=0)
        coef = dg * inv_sqrt_d * rk * rq
        dk = coef * (w * h - s * rk * rk * k / D)
        dh = coef * (w * k - s * rq * rq * h / D)
        tl.store(dk_ptr + base + cols, dk, mask=keep)
        tl.store(dh_ptr + base + cols, dh, mask=keep)
        tl.store(coef_ptr + tok * M + m, coef)
    tl.store(dv_ptr + tok * D + cols, dv, mask=keep)


class GateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key, hidden, value, wk, wq, eps_k, eps_q):
        B, T, M, D = key.shape
        key, hidden, value = key.contiguous(), hidden.contiguous(), value.contiguous()
        out = torch.empty_like(key, dtype=torch.result_type(key, value))
        stats = torch.empty(B * T, M, 4, device=key.device, dtype=torch.float32)
        eps_k = torch.finfo(torch.float32).eps if eps_k is None else eps_k
        eps_q = torch.finfo(torch.float32).eps if eps_q is None else eps_q
        if B * T:
            _gate_fwd[(B * T,)](
                key, hidden, value, wk.contiguous(), wq.contiguous(), out, stats,
                D, eps_k, eps_q, 1.0 / math.sqrt(D), M=M, BLOCK_D=triton.next_power_of_2(D),
            )
        ctx.save_for_backward(key, hidden, value, wk, wq, stats)
        return out

    @staticmethod
    def backward(ctx, dout):
        key, hidden, value, wk, wq, stats = ctx.saved_tensors
        B, T, M, D = key.shape
        f32 = dict(device=key.device, dtype=torch.float32)
        dk, dh = torch.empty(key.shape, **f32), torch.empty(key.shape, **f32)
        dv, coef = torch.empty(B, T, D, **f32), torch.empty(B, T, M, **f32)
        if B * T:
            _gate_bwd[(B * T,)](
                dout.contiguous(), key, hidden, value, wk.contiguous(), wq.contiguous(), stats, dk, dh, dv, coef,
                D, 1.0 / math.sqrt(D), M=M, BLOCK_D=triton.next_power_of_2(D),
            )
        # The norm weights' gradients are reductions over tokens: one einsum each.
        dw = torch.einsum("btm,btmd->md", coef, key.float() * hidden.float())
        dwk, dwq = dw * wq.float(), dw * wk.float()
        return (
            dk.to(key.dtype), dh.to(hidden.dtype), dv.to(value.dtype), dwk.to(wk.dtype), dwq.to(wq.dtype), None, None
        )
