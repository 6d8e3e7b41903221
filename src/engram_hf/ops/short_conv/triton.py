"""Triton kernels: per-branch RMSNorm, dilated causal depthwise conv, SiLU and the residual add,
forward and backward, plus a single decode step that reads and shifts the cached conv state.

Offsets are int64 (``tokens * C`` passes 2^31 in long prefills); norm rows are walked in chunks so
register use does not grow with the hidden size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import device_guard
from ..gate.triton import launch_config
from ..inputs import ConvParams, resolve_eps


@triton.jit
def _norm_fwd(
    x_ptr, w_ptr, mask_ptr, xn_ptr, rstd_ptr, D, eps, M: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr
):
    # One program per (token, branch): xn = RMSNorm(x) * w, zeroed at masked tokens.
    row = tl.program_id(0).to(tl.int64)
    tok = row // M
    m = row % M
    cols = tl.arange(0, BLOCK_D)
    sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        x = tl.load(x_ptr + row * D + c, mask=c < D, other=0.0).to(tl.float32)
        sq += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / D + eps)
    scale = rstd
    if HAS_MASK:
        scale = scale * (tl.load(mask_ptr + tok) != 0).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        keep = c < D
        x = tl.load(x_ptr + row * D + c, mask=keep, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + m * D + c, mask=keep, other=0.0).to(tl.float32)
        tl.store(xn_ptr + row * D + c, x * scale * w, mask=keep)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_bwd_terms(dxn_ptr, x_ptr, w_ptr, base, w_base, rstd, c, keep):
    """One chunk of a row: the normalised input, and the incoming gradient times the norm weight."""
    xhat = tl.load(x_ptr + base + c, mask=keep, other=0.0).to(tl.float32) * rstd
    w = tl.load(w_ptr + w_base + c, mask=keep, other=0.0).to(tl.float32)
    return xhat, tl.load(dxn_ptr + base + c, mask=keep, other=0.0) * w


@triton.jit
def _norm_bwd(
    dxn_ptr, x_ptr, w_ptr, mask_ptr, rstd_ptr, dx_ptr, D, M: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    tok = row // M
    m = row % M
    cols = tl.arange(0, BLOCK_D)
    rstd = tl.load(rstd_ptr + row)
    live = 1.0
    if HAS_MASK:
        live = (tl.load(mask_ptr + tok) != 0).to(tl.float32)
    dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        keep = c < D
        xhat, g = _norm_bwd_terms(dxn_ptr, x_ptr, w_ptr, row * D, m * D, rstd, c, keep)
        dot += g * xhat
    mean = tl.sum(dot, axis=0) / D
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        keep = c < D
        xhat, g = _norm_bwd_terms(dxn_ptr, x_ptr, w_ptr, row * D, m * D, rstd, c, keep)
        tl.store(dx_ptr + row * D + c, live * rstd * (g - xhat * mean), mask=keep)


@triton.jit
def _conv_fwd(
    xn_ptr,
    state_ptr,
    cw_ptr,
    res_ptr,
    y_ptr,
    acc_ptr,
    T,
    C,
    K: tl.constexpr,
    DIL: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # y[t] = res[t] + SiLU(sum_j w[:, j] * X[t - (K-1-j)*DIL]), X = [state | xn] along time.
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    t = tok % T
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    S: tl.constexpr = (K - 1) * DIL
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j in tl.static_range(K):
        # The tap's time index, broadcast to the channel block (block masks combine elementwise).
        u = tl.zeros((BLOCK_C,), dtype=tl.int64) + (t - (K - 1 - j) * DIL)
        xv = tl.load(xn_ptr + (b * T + tl.maximum(u, 0)) * C + c, mask=keep & (u >= 0), other=0.0)
        if HAS_STATE:
            xv += tl.load(state_ptr + (b * C + c) * S + S + u, mask=keep & (u < 0), other=0.0).to(tl.float32)
        acc += tl.load(cw_ptr + c * K + j, mask=keep, other=0.0).to(tl.float32) * xv
    res = tl.load(res_ptr + tok * C + c, mask=keep, other=0.0).to(tl.float32)
    y = res + acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + tok * C + c, y.to(y_ptr.dtype.element_ty), mask=keep)
    tl.store(acc_ptr + tok * C + c, acc, mask=keep)


@triton.jit
def _conv_bwd_input(dacc_ptr, cw_ptr, dxn_ptr, T, C, K: tl.constexpr, DIL: tl.constexpr, BLOCK_C: tl.constexpr):
    # Transposed conv: dxn[u] = sum_j w[:, j] * dacc[u + (K-1-j)*DIL] (inside the sequence).
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    u = tok % T
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j in tl.static_range(K):
        t = tl.zeros((BLOCK_C,), dtype=tl.int64) + (u + (K - 1 - j) * DIL)
        d = tl.load(dacc_ptr + (b * T + tl.minimum(t, T - 1)) * C + c, mask=keep & (t < T), other=0.0)
        acc += tl.load(cw_ptr + c * K + j, mask=keep, other=0.0).to(tl.float32) * d
    tl.store(dxn_ptr + tok * C + c, acc, mask=keep)


@triton.jit
def _conv_step(
    xn_ptr,
    state_ptr,
    cw_ptr,
    res_ptr,
    y_ptr,
    C,
    stride_sb,
    stride_sc,
    stride_ss,
    K: tl.constexpr,
    DIL: tl.constexpr,
    S_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One decode step per (batch, channel block): read the taps from the state, then shift it left
    # by one and append the new input. The state may be any strided view (a cropped cache).
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    S: tl.constexpr = (K - 1) * DIL
    row = state_ptr + b * stride_sb + c.to(tl.int64) * stride_sc
    x = tl.load(xn_ptr + b * C + c, mask=keep, other=0.0).to(tl.float32)
    acc = tl.load(cw_ptr + c * K + (K - 1), mask=keep, other=0.0).to(tl.float32) * x
    for j in tl.static_range(K - 1):
        tap = tl.load(row + (S - (K - 1 - j) * DIL) * stride_ss, mask=keep, other=0.0).to(tl.float32)
        acc += tl.load(cw_ptr + c * K + j, mask=keep, other=0.0).to(tl.float32) * tap
    res = tl.load(res_ptr + b * C + c, mask=keep, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * C + c, (res + acc / (1.0 + tl.exp(-acc))).to(y_ptr.dtype.element_ty), mask=keep)
    if S > 0:
        s = tl.arange(0, S_POW2)
        grid = keep[:, None] & (s[None, :] < S - 1)
        older = tl.load(row[:, None] + (s[None, :] + 1) * stride_ss, mask=grid, other=0.0)
        # Every warp's reads of the old state land before any warp overwrites it: a channel's loads
        # and its shifted stores fall to different warps in the compiled layout.
        tl.debug_barrier()
        tl.store(row[:, None] + s[None, :] * stride_ss, older, mask=grid)
        tl.store(row + (S - 1) * stride_ss, x.to(state_ptr.dtype.element_ty), mask=keep)


def _norm(x, norm_weight, eps, mask):
    B, T, M, D = x.shape
    xn = torch.empty(B, T, M, D, device=x.device, dtype=torch.float32)
    rstd = torch.empty(B * T * M, device=x.device, dtype=torch.float32)
    if B * T:
        _norm_fwd[(B * T * M,)](
            x,
            norm_weight.contiguous(),
            mask if mask is not None else x,
            xn,
            rstd,
            D,
            eps,
            M=M,
            HAS_MASK=mask is not None,
            **launch_config(D),
        )
    return xn, rstd


def _block_c(C):
    return min(triton.next_power_of_2(C), 256)


def _next_state(prev, xn_ct, S):
    """The next call's left context: the last S normalised inputs, reaching into ``prev`` only when
    the input is shorter than S (no [B, C, S+T] copy)."""
    T = xn_ct.shape[-1]
    if S == 0:
        return xn_ct[..., :0]
    if T >= S:
        return xn_ct[..., T - S :]
    return torch.cat([prev[..., T:].to(xn_ct.dtype), xn_ct], dim=-1)


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, conv_weight, dilation, eps, mask, state):
        B, T, M, D = x.shape
        C, K = M * D, conv_weight.shape[-1]
        S = (K - 1) * dilation
        eps = resolve_eps(eps)
        x = x.contiguous()
        mask = mask.contiguous() if mask is not None else None
        state = state.contiguous() if state is not None else None
        y = torch.empty_like(x)
        acc = torch.empty(B, T, C, device=x.device, dtype=torch.float32)
        cw = conv_weight.reshape(C, K).contiguous()
        with device_guard(x):
            xn, rstd = _norm(x, norm_weight, eps, mask)
            if B * T:
                _conv_fwd[(B * T, triton.cdiv(C, _block_c(C)))](
                    xn,
                    state if state is not None else xn,
                    cw,
                    x,
                    y,
                    acc,
                    T,
                    C,
                    K=K,
                    DIL=dilation,
                    HAS_STATE=state is not None,
                    BLOCK_C=_block_c(C),
                )
        prev = state if state is not None else xn.new_zeros(B, C, S)
        new_state = _next_state(prev, xn.reshape(B, T, C).transpose(1, 2), S).to(x.dtype)
        ctx.save_for_backward(x, norm_weight, cw, xn, rstd, acc, mask, state)
        ctx.dilation = dilation
        ctx.mark_non_differentiable(new_state)
        return y, new_state

    @staticmethod
    def backward(ctx, dy, _dstate):
        x, norm_weight, cw, xn, rstd, acc, mask, state = ctx.saved_tensors
        B, T, M, D = x.shape
        C, K = cw.shape
        dil = ctx.dilation
        S = (K - 1) * dil
        dy = dy.contiguous().float().reshape(B, T, C)
        sig = torch.sigmoid(acc)
        dacc = (dy * sig * (1 + acc * (1 - sig))).contiguous()
        dxn = torch.empty(B, T, C, device=x.device, dtype=torch.float32)
        dx = torch.empty(B, T, M, D, device=x.device, dtype=torch.float32)
        with device_guard(x):
            if B * T:
                _conv_bwd_input[(B * T, triton.cdiv(C, _block_c(C)))](
                    dacc, cw, dxn, T, C, K=K, DIL=dil, BLOCK_C=_block_c(C)
                )
                _norm_bwd[(B * T * M,)](
                    dxn,
                    x,
                    norm_weight.contiguous(),
                    mask if mask is not None else x,
                    rstd,
                    dx,
                    D,
                    M=M,
                    HAS_MASK=mask is not None,
                    **launch_config(D),
                )
        # Conv weight gradient: per tap, a reduction over (batch, time) of dacc times its input,
        # which is xn shifted by `lag` (and the cached state before the start).
        xn_btc = xn.reshape(B, T, C)
        taps = []
        for j in range(K):
            lag = (K - 1 - j) * dil
            g = (dacc[:, lag:] * xn_btc[:, : T - lag]).sum((0, 1)) if lag < T else dacc.new_zeros(C)
            if state is not None and lag:
                n = min(lag, T)  # positions t < lag read state[:, :, S - lag + t]
                g = g + (dacc[:, :n] * state[:, :, S - lag : S - lag + n].transpose(1, 2).float()).sum((0, 1))
            taps.append(g)
        dcw = torch.stack(taps, dim=1)
        xhat = x.float() * rstd.view(B, T, M, 1)
        if mask is not None:
            xhat = xhat * mask[:, :, None, None].float()
        dnw = (dxn.view(B, T, M, D) * xhat).sum((0, 1))
        dx = dx + dy.view(B, T, M, D)
        return dx.to(x.dtype), dnw.to(norm_weight.dtype), dcw.view(C, 1, K).to(cw.dtype), None, None, None, None


def short_conv_step(x, conv: ConvParams, mask, state):
    B, T, M, D = x.shape
    C, K = M * D, conv.weight.shape[-1]
    S = (K - 1) * conv.dilation
    if state.shape != (B, C, S):
        raise ValueError(f"The conv state must be [{B}, {C}, {S}], got {list(state.shape)}.")
    x = x.contiguous()
    y = torch.empty_like(x)
    with device_guard(x):
        xn, _ = _norm(x, conv.norm.weight, resolve_eps(conv.norm.eps), mask.contiguous() if mask is not None else None)
        _conv_step[(B, triton.cdiv(C, _block_c(C)))](
            xn,
            state,
            conv.weight.reshape(C, K).contiguous(),
            x,
            y,
            C,
            *state.stride(),
            K=K,
            DIL=conv.dilation,
            S_POW2=triton.next_power_of_2(max(S, 1)),
            BLOCK_C=_block_c(C),
        )
    return y
