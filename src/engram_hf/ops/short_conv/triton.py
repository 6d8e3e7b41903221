"""Triton kernels: per-branch RMSNorm, dilated causal depthwise conv, SiLU and the residual add,
forward and backward, plus a single decode step that reads and shifts the cached conv state.

The normalised input is never materialised: a row kernel computes one scale per (token, branch)
(``rstd``, zero at masked tokens) and the conv applies ``x * scale * w`` as it loads its taps. The
backward recomputes the SiLU derivative as it goes and sums the weight gradients over token tiles
in registers (partial sums per tile, added in a fixed order: deterministic, no atomics).

Every offset is int64: ``tokens * C`` passes 2^31 in one long-context prefill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import device_guard
from ..inputs import ConvParams, resolve_eps
from ..launch import conv_bwd_config, conv_config, row_config, step_config


@triton.jit(do_not_specialize=["M"])
def _row_scale(x_ptr, mask_ptr, scale_ptr, D: tl.int64, eps, M, HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (token, branch) row: scale = 1/rms(x), zero at masked tokens.
    row = tl.program_id(0).to(tl.int64)
    tok = (tl.program_id(0) // M).to(tl.int64)  # int32 division: 64-bit is an out-of-line routine
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        x = tl.load(x_ptr + row * D + c, mask=c < D, other=0.0).to(tl.float32)
        sq += x * x
    scale = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / D + eps)
    if HAS_MASK:
        scale = scale * (tl.load(mask_ptr + tok) != 0).to(tl.float32)
    tl.store(scale_ptr + row, scale)


@triton.jit(do_not_specialize=["T", "n_dblk", "M"])
def _conv_fwd(
    x_ptr,
    scale_ptr,
    nw_ptr,
    state_ptr,
    cw_ptr,
    y_ptr,
    acc_ptr,
    T,
    D: tl.int64,
    n_dblk,
    M,
    DIL: tl.int64,
    K: tl.constexpr,
    HAS_STATE: tl.constexpr,
    STORE_ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # y[t] = x[t] + SiLU(sum_j cw[:, j] * X[t - (K-1-j)*DIL]),  X = [state | x * scale * nw] in time.
    # One program per (token, branch, chunk of the branch's channels).
    # Program ids are split in int32 (64-bit division is an out-of-line routine), then widened.
    tok = tl.program_id(0).to(tl.int64)
    b = (tl.program_id(0) // T).to(tl.int64)
    t = (tl.program_id(0) % T).to(tl.int64)
    m = (tl.program_id(1) // n_dblk).to(tl.int64)
    d = (tl.program_id(1) % n_dblk).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    keep = d < D
    C = M * D
    S = (K - 1) * DIL
    c = m * D + d
    nw = tl.load(nw_ptr + c, mask=keep, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x_t = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(K):
        u = t - (K - 1 - j) * DIL  # the tap's time index (negative: inside the state)
        u_vec = u + tl.zeros_like(d)  # masks combine elementwise (the interpreter needs blocks)
        inside = keep & (u_vec >= 0)
        src = b * T + tl.maximum(u, 0)
        xv = tl.load(x_ptr + src * C + c, mask=inside, other=0.0).to(tl.float32)
        if j == K - 1:
            x_t = xv  # the tap at t is the residual input itself
        xn = xv * tl.load(scale_ptr + (src * M + m)) * nw
        if HAS_STATE:
            # The state arrives time-major, [B, S, C]: a tap's channels are contiguous.
            xn += tl.load(state_ptr + ((b * S + S + u) * C + c), mask=keep & (u_vec < 0), other=0.0).to(tl.float32)
        acc += tl.load(cw_ptr + (j * C + c), mask=keep, other=0.0).to(tl.float32) * xn
    out = tok * C + c
    tl.store(y_ptr + out, (x_t + acc / (1.0 + tl.exp(-acc))).to(y_ptr.dtype.element_ty), mask=keep)
    if STORE_ACC:
        tl.store(acc_ptr + out, acc, mask=keep)


@triton.jit(do_not_specialize=["T", "n_tblk", "n_dblk", "M"])
def _conv_bwd(
    dy_ptr,
    acc_ptr,
    x_ptr,
    scale_ptr,
    nw_ptr,
    cw_ptr,
    dxn_ptr,
    part_ptr,
    T,
    D: tl.int64,
    n_tblk,
    n_dblk,
    M,
    DIL: tl.int64,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # A tile of BLOCK_T tokens x BLOCK_D channels of one branch. With dacc = dy * SiLU'(acc):
    #   dxn[u]        = sum_j cw[:, j] * dacc[u + lag_j]          (transposed conv, inside the sequence)
    #   dcw[:, j]    += sum_u dacc[u + lag_j] * X[u]              (X = x * scale * nw, the conv's input)
    #   dnw          += sum_u dxn[u] * x[u] * scale[u]
    # The sums over the tile's tokens go to part[tile] ([K+1, C]); the caller adds the tiles.
    pid = tl.program_id(0).to(tl.int64)
    b = (tl.program_id(0) // n_tblk).to(tl.int64)
    u = (tl.program_id(0) % n_tblk).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    m = (tl.program_id(1) // n_dblk).to(tl.int64)
    d = (tl.program_id(1) % n_dblk).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    keep = d < D
    C = M * D
    c = m * D + d
    u_ok = u < T
    tile_ok = u_ok[:, None] & keep[None, :]
    x_off = (b * T + u)[:, None] * C + c[None, :]
    xhat = tl.load(x_ptr + x_off, mask=tile_ok, other=0.0).to(tl.float32)
    xhat = xhat * tl.load(scale_ptr + ((b * T + u) * M + m), mask=u_ok, other=0.0)[:, None]
    nw = tl.load(nw_ptr + c, mask=keep, other=0.0).to(tl.float32)
    dxn = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        lag = (K - 1 - j) * DIL
        t = u + lag
        ok = (t < T)[:, None] & keep[None, :]
        off = (b * T + tl.minimum(t, T - 1))[:, None] * C + c[None, :]
        dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(acc_ptr + off, mask=ok, other=0.0)
        sig = 1.0 / (1.0 + tl.exp(-a))
        dacc = dy * sig * (1.0 + a * (1.0 - sig))
        dxn += tl.load(cw_ptr + (j * C + c), mask=keep, other=0.0).to(tl.float32)[None, :] * dacc
        tl.store(part_ptr + ((pid * (K + 1) + j) * C + c), tl.sum(dacc * xhat, axis=0) * nw, mask=keep)
    tl.store(dxn_ptr + x_off, dxn, mask=tile_ok)
    tl.store(part_ptr + ((pid * (K + 1) + K) * C + c), tl.sum(dxn * xhat, axis=0), mask=keep)


@triton.jit(do_not_specialize=["M"])
def _norm_bwd(dxn_ptr, dy_ptr, x_ptr, nw_ptr, scale_ptr, dx_ptr, D: tl.int64, M, BLOCK_D: tl.constexpr):
    # One program per (token, branch) row: RMSNorm backward of xn = x * scale * nw, plus the
    # residual's gradient dy. (scale = 0 at masked tokens zeroes their dx, as it zeroed xn.)
    row = tl.program_id(0).to(tl.int64)
    m = (tl.program_id(0) % M).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    scale = tl.load(scale_ptr + row)
    dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        keep = c < D
        g = tl.load(dxn_ptr + row * D + c, mask=keep, other=0.0) * tl.load(nw_ptr + m * D + c, mask=keep, other=0.0).to(
            tl.float32
        )
        dot += g * tl.load(x_ptr + row * D + c, mask=keep, other=0.0).to(tl.float32)
    mean = tl.sum(dot, axis=0) * scale / D  # mean(g * xhat), xhat = x * scale
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        keep = c < D
        g = tl.load(dxn_ptr + row * D + c, mask=keep, other=0.0) * tl.load(nw_ptr + m * D + c, mask=keep, other=0.0).to(
            tl.float32
        )
        xhat = tl.load(x_ptr + row * D + c, mask=keep, other=0.0).to(tl.float32) * scale
        dy = tl.load(dy_ptr + row * D + c, mask=keep, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * D + c, (scale * (g - xhat * mean) + dy).to(dx_ptr.dtype.element_ty), mask=keep)


@triton.jit(do_not_specialize=["n_dblk", "M", "stride_sb", "stride_sc", "stride_ss"])
def _conv_step(
    x_ptr,
    scale_ptr,
    nw_ptr,
    state_ptr,
    cw_ptr,
    y_ptr,
    D: tl.int64,
    n_dblk,
    stride_sb: tl.int64,
    stride_sc: tl.int64,
    stride_ss: tl.int64,
    M,
    DIL: tl.int64,
    K: tl.constexpr,
    S_POW2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One decode step per (batch row, branch, channel chunk): read the taps from the state, then
    # shift it left by one and append the new normalised input. The state may be any strided view
    # (a cropped or reordered cache), so it is addressed through its strides.
    b = tl.program_id(0).to(tl.int64)
    m = (tl.program_id(1) // n_dblk).to(tl.int64)
    d = (tl.program_id(1) % n_dblk).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    keep = d < D
    C = M * D
    c = m * D + d
    S = (K - 1) * DIL
    row = state_ptr + b * stride_sb + c * stride_sc
    x = tl.load(x_ptr + b * C + c, mask=keep, other=0.0).to(tl.float32)
    xn = x * tl.load(scale_ptr + (b * M + m)) * tl.load(nw_ptr + c, mask=keep, other=0.0).to(tl.float32)
    acc = tl.load(cw_ptr + ((K - 1) * C + c), mask=keep, other=0.0).to(tl.float32) * xn
    for j in tl.static_range(K - 1):
        tap = tl.load(row + (S - (K - 1 - j) * DIL) * stride_ss, mask=keep, other=0.0).to(tl.float32)
        acc += tl.load(cw_ptr + (j * C + c), mask=keep, other=0.0).to(tl.float32) * tap
    tl.store(y_ptr + b * C + c, (x + acc / (1.0 + tl.exp(-acc))).to(y_ptr.dtype.element_ty), mask=keep)
    if S_POW2 > 0:  # a state to shift (K >= 2)
        s = tl.arange(0, S_POW2).to(tl.int64)
        grid = keep[:, None] & (s[None, :] < S - 1)
        older = tl.load(row[:, None] + (s[None, :] + 1) * stride_ss, mask=grid, other=0.0)
        # Every warp's reads of the old state land before any warp overwrites it: a channel's tap
        # loads and its shifted stores fall to different warps in the compiled layout.
        tl.debug_barrier()
        tl.store(row[:, None] + s[None, :] * stride_ss, older, mask=grid)
        tl.store(row + (S - 1) * stride_ss, xn.to(state_ptr.dtype.element_ty), mask=keep)


def _row_scales(x, eps, mask):
    """``[B*T*M]`` float32: 1/rms of each (token, branch) row, zero at masked tokens."""
    B, T, M, D = x.shape
    scale = torch.empty(B * T * M, device=x.device, dtype=torch.float32)
    if B * T:
        _row_scale[(B * T * M,)](
            x, mask if mask is not None else x, scale, D, eps, M, HAS_MASK=mask is not None, **row_config(D)
        )
    return scale


def _next_state(prev, x, scale, norm_weight, S):
    """The next call's left context ``[B, C, S]``: the last S normalised inputs, reaching into
    ``prev`` only when the input is shorter than S. Only those S columns are computed."""
    B, T, M, D = x.shape
    n = min(T, S)
    tail = x[:, T - n :].float() * scale.view(B, T, M, 1)[:, T - n :] * norm_weight.float()
    tail = tail.reshape(B, n, M * D).transpose(1, 2).to(x.dtype)
    if n == S:
        return tail.contiguous()
    return torch.cat([prev[..., n:].to(x.dtype), tail], dim=-1)


class ShortConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, conv_weight, dilation, eps, mask, state, grad_enabled):
        B, T, M, D = x.shape
        C, K = M * D, conv_weight.shape[-1]
        S = (K - 1) * dilation
        x = x.contiguous()
        mask = mask.contiguous() if mask is not None else None
        state = state.contiguous() if state is not None else None
        nw = norm_weight.contiguous()
        # Tap-major weights [K, C] and a time-major state [B, S, C]: every load the kernels make
        # is a contiguous run of channels (16-byte vectors), not a stride-K or stride-S gather.
        cw = conv_weight.reshape(C, K).t().contiguous()
        # needs_input_grad ignores no_grad mode: the caller says whether a backward can follow, so
        # inference does not write the fp32 pre-activation the backward needs.
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:3])
        y = torch.empty_like(x)
        acc = torch.empty(B, T, C, device=x.device, dtype=torch.float32) if needs_grad else y
        cfg = conv_config(D)
        n_dblk = triton.cdiv(D, cfg["BLOCK_D"])
        with device_guard(x):
            scale = _row_scales(x, resolve_eps(eps), mask)
            if B * T:
                _conv_fwd[(B * T, M * n_dblk)](
                    x,
                    scale,
                    nw,
                    state.transpose(1, 2).contiguous() if state is not None else x,
                    cw,
                    y,
                    acc,
                    T,
                    D,
                    n_dblk,
                    M,
                    dilation,
                    K=K,
                    HAS_STATE=state is not None,
                    STORE_ACC=needs_grad,
                    **cfg,
                )
        prev = state if state is not None else x.new_zeros(B, C, S)
        new_state = _next_state(prev, x, scale, nw, S)
        if needs_grad:
            ctx.save_for_backward(x, nw, cw, scale, acc, state)
            ctx.dilation = dilation
        ctx.mark_non_differentiable(new_state)
        return y, new_state

    @staticmethod
    def backward(ctx, dy, _dstate):
        x, nw, cw, scale, acc, state = ctx.saved_tensors
        B, T, M, D = x.shape
        K, C = cw.shape
        dil = ctx.dilation
        S = (K - 1) * dil
        dy = dy.contiguous()
        dxn = torch.empty(B, T, C, device=x.device, dtype=torch.float32)
        dx = torch.empty_like(x)
        cfg = conv_bwd_config(D)
        n_tblk, n_dblk = triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(D, cfg["BLOCK_D"])
        part = torch.empty(B * n_tblk, K + 1, C, device=x.device, dtype=torch.float32)
        with device_guard(x):
            if B * T:
                _conv_bwd[(B * n_tblk, M * n_dblk)](
                    dy, acc, x, scale, nw, cw, dxn, part, T, D, n_tblk, n_dblk, M, dil, K=K, **cfg
                )
                _norm_bwd[(B * T * M,)](dxn, dy, x, nw, scale, dx, D, M, **row_config(D))
        sums = part.sum(0)
        dcw = sums[:K].t()  # [C, K]
        dnw = sums[K].view(M, D)
        if state is not None and B * T:
            # Taps that reached into the cached state (the first S positions): a few columns, in torch.
            n = min(S, T)
            a = acc[:, :n]
            sig = torch.sigmoid(a)
            dacc = dy[:, :n].reshape(B, n, C).float() * sig * (1 + a * (1 - sig))  # [B, n, C]
            for j in range(K - 1):
                lag = (K - 1 - j) * dil
                k = min(lag, n)  # positions t < lag read state[:, :, S - lag + t]
                dcw[:, j] += (dacc[:, :k] * state[:, :, S - lag : S - lag + k].transpose(1, 2).float()).sum((0, 1))
        return dx, dnw.to(nw.dtype), dcw.reshape(C, 1, K).to(cw.dtype), None, None, None, None, None


def short_conv_step(x, conv: ConvParams, mask, state):
    B, T, M, D = x.shape
    C, K = M * D, conv.weight.shape[-1]
    S = (K - 1) * conv.dilation
    if T != 1:
        raise ValueError(f"A decode step takes one position, got {T}.")
    if state.shape != (B, C, S):
        raise ValueError(f"The conv state must be [{B}, {C}, {S}], got {list(state.shape)}.")
    x = x.contiguous()
    y = torch.empty_like(x)
    cfg = step_config(D, S)
    n_dblk = triton.cdiv(D, cfg["BLOCK_D"])
    with device_guard(x):
        scale = _row_scales(x, resolve_eps(conv.norm.eps), mask.contiguous() if mask is not None else None)
        _conv_step[(B, M * n_dblk)](
            x,
            scale,
            conv.norm.weight.contiguous(),
            state,
            conv.weight.reshape(C, K).t().contiguous(),
            y,
            D,
            n_dblk,
            *state.stride(),
            M,
            conv.dilation,
            K=K,
            **cfg,
        )
    return y
