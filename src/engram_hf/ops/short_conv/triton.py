"""Triton kernels: per-branch RMSNorm, dilated causal depthwise conv, SiLU and the residual add,
forward and backward, plus a single decode step that reads and shifts the cached conv state."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_fwd(x_ptr, w_ptr, mask_ptr, xn_ptr, rstd_ptr, D, eps, M: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (token, branch): xn = RMSNorm(x) * w, zeroed at masked tokens.
    row = tl.program_id(0)
    tok = row // M
    m = row % M
    cols = tl.arange(0, BLOCK_D)
    keep = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=keep, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * rstd * tl.load(w_ptr + m * D + cols, mask=keep, other=0.0).to(tl.float32)
    if HAS_MASK:
        y = y * (tl.load(mask_ptr + tok) != 0).to(tl.float32)
    tl.store(xn_ptr + row * D + cols, y, mask=keep)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_bwd(dxn_ptr, x_ptr, w_ptr, mask_ptr, rstd_ptr, dx_ptr, D, M: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    tok = row // M
    m = row % M
    cols = tl.arange(0, BLOCK_D)
    keep = cols < D
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.load(x_ptr + row * D + cols, mask=keep, other=0.0).to(tl.float32) * rstd
    g = tl.load(dxn_ptr + row * D + cols, mask=keep, other=0.0) * tl.load(w_ptr + m * D + cols, mask=keep, other=0.0).to(tl.float32)
    if HAS_MASK:
        g = g * (tl.load(mask_ptr + tok) != 0).to(tl.float32)
    dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / D))
    tl.store(dx_ptr + row * D + cols, dx, mask=keep)


@triton.jit
def _conv_fwd(
    xn_ptr, state_ptr, cw_ptr, res_ptr, y_ptr, acc_ptr, T, C,
    K: tl.constexpr, DIL: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # y[t] = res[t] + SiLU(sum_j w[:, j] * X[t - (K-1-j)*DIL]), X = [state | xn] along time.
    tok = tl.program_id(0)
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
    tok = tl.program_id(0)
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
    xn_ptr, state_ptr, cw_ptr, res_ptr, y_ptr, C,
    K: tl.constexpr, DIL: tl.constexpr, S_POW2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One decode step per (batch, channel block): read the taps from the state, then shift it left
    # by one and append the new input (each program owns its channels, so in place is safe).
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = c < C
    S: tl.constexpr = (K - 1) * DIL
    x = tl.load(xn_ptr + b * C + c, mask=keep, other=0.0).to(tl.float32)
    acc = tl.load(cw_ptr + c * K + (K - 1), mask=keep, other=0.0).to(tl.float32) * x
    for j in tl.static_range(K - 1):
        tap = tl.load(state_ptr + (b * C + c) * S + S - (K - 1 - j) * DIL, mask=keep, other=0.0).to(tl.float32)
        acc += tl.load(cw_ptr + c * K + j, mask=keep, other=0.0).to(tl.float32) * tap
    res = tl.load(res_ptr + b * C + c, mask=keep, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * C + c, (res + acc / (1.0 + tl.exp(-acc))).to(y_ptr.dtype.element_ty), mask=keep)
    s = tl.arange(0, S_POW2)
    base = (b * C + c)[:, None] * S
    grid = keep[:, None] & (s[None, :] < S - 1)
    older = tl.load(state_ptr + base + s[None, :] + 1, mask=grid, other=0.0)
    tl.store(state_ptr + base + s[None, :], older, mask=grid)
    tl.store(state_ptr + (b * C + c) * S + S - 1, x.to(state_ptr.dtype.element_ty), mask=keep)


def _norm(x, norm_weight, eps, mask):
    B, T, M, D = x.shape
    xn = torch.empty(B, T, M, D, device=x.device, dtype=torch.float32)
    rstd = torch.empty(B * T * M, device=x.device, dtype=torch.float32)
    if B * T:
        _norm_fwd[(B * T * M,)](
            x, norm_weight.contiguous(), mask if mask is not None else x, xn, rstd, D, eps,
            M=M, HAS_MASK=mask is not None, BLOCK_D=triton.next_power_of_2(D),
        )
    return xn, rstd


def _block_c(C):
    return min(triton.next_power_of_2(C), 256)


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, conv_weight, dilation, eps, mask, state):
        B, T, M, D = x.shape
        C, K = M * D, conv_weight.shape[-1]
        S = (K - 1) * dilation
        x = x.contiguous()
        mask = mask.contiguous() if mask is not None else None
        xn, rstd = _norm(x, norm_weight, eps, mask)
        y = torch.empty_like(x)
        acc = torch.empty(B, T, C, device=x.device, dtype=torch.float32)
        cw = conv_weight.reshape(C, K).contiguous()
        if B * T:
            _conv_fwd[(B * T, triton.cdiv(C, _block_c(C)))](
                xn, state.contiguous() if state is not None else xn, cw, x, y, acc, T, C,
                K=K, DIL=dilation, HAS_STATE=state is not None, BLOCK_C=_block_c(C),
            )
        # The next call's left context: the last S normalised inputs, after `state` if T < S.
        xn_ct = xn.reshape(B, T, C).transpose(1, 2)
        prev = state.to(torch.float32) if state is not None else xn_ct.new_zeros(B, C, S)
        new_state = torch.cat([prev, xn_ct], dim=-1)[..., -S:].to(x.dtype) if S else xn_ct[..., :0]
        ctx.save_for_backward(x, norm_weight, cw, xn, rstd, acc, mask, state)
        ctx.dilation, ctx.eps = dilation, eps
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
        if B * T:
            _conv_bwd_input[(B * T, triton.cdiv(C, _block_c(C)))](
                dacc, cw, dxn, T, C, K=K, DIL=dil, BLOCK_C=_block_c(C)
            )
        # Conv weight gradient: for each tap, a reduction over (batch, time) of dacc times its input.
        xn_ct = xn.reshape(B, T, C)
        left = state.transpose(1, 2).float() if state is not None else xn_ct.new_zeros(B, S, C)
        full = torch.cat([left, xn_ct], dim=1)
        dcw = torch.stack([(dacc * full[:, j * dil : j * dil + T]).sum((0, 1)) for j in range(K)], dim=1)
        dx = torch.empty(B, T, M, D, device=x.device, dtype=torch.float32)
        if B * T:
            _norm_bwd[(B * T * M,)](
                dxn, x, norm_weight.contiguous(), mask if mask is not None else x, rstd, dx, D,
                M=M, HAS_MASK=mask is not None, BLOCK_D=triton.next_power_of_2(D),
            )
        xhat = x.float() * rstd.view(B, T, M, 1)
        if mask is not None:
            xhat = xhat * mask[:, :, None, None].float()
        dnw = (dxn.view(B, T, M, D) * xhat).sum((0, 1))
        dx = dx + dy.view(B, T, M, D)
        return dx.to(x.dtype), dnw.to(norm_weight.dtype), dcw.view(C, 1, K).to(cw.dtype), None, None, None, None


def short_conv_step(x, norm_weight, conv_weight, dilation, eps, state, mask=None):
    B, T, M, D = x.shape
    C, K = M * D, conv_weight.shape[-1]
    x = x.contiguous()
    xn, _ = _norm(x, norm_weight, eps, mask.contiguous() if mask is not None else None)
    y = torch.empty_like(x)
    _conv_step[(B, triton.cdiv(C, _block_c(C)))](
        xn, state, conv_weight.reshape(C, K).contiguous(), x, y, C,
        K=K, DIL=dilation, S_POW2=triton.next_power_of_2(max((K - 1) * dilation, 1)), BLOCK_C=_block_c(C),
    )
    return y
