"""Every Triton kernel against its pure-torch twin, outputs and gradients, fp32 and bf16.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when
there is no GPU); with a GPU they run natively on it (``benchmarks/gpu_check.sh``).
"""

import os

import pytest
import torch

from engram_hf.ops import ConvParams, EngramInputs, GateParams, HashParams, NormParams, TableRows, use_backend
from engram_hf.ops.gate import naive as gate_naive
from engram_hf.ops.hash_gather import naive as hg_naive
from engram_hf.ops.short_conv import naive as conv_naive

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from engram_hf.ops.fp8_rows import naive as fp8_naive  # noqa: E402
from engram_hf.ops.fp8_rows import triton as fp8_triton  # noqa: E402
from engram_hf.ops.gate.triton import GateFunction  # noqa: E402
from engram_hf.ops.hash_gather.triton import HashGatherFunction, hash_gather_forward, table_grad_rows  # noqa: E402
from engram_hf.ops.launch import SEGMENT_CHUNK  # noqa: E402
from engram_hf.ops.short_conv import triton as conv_triton  # noqa: E402

from conftest import tiny_model  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _hash_case(B=2, T=7, N=3, K=2, D=8, compressed=31, masked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, compressed, (B, T), generator=g)
    prefix = torch.randint(0, compressed, (B, N - 1), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long() if masked else None
    pad = torch.tensor(compressed - 1)
    if mask is not None:
        ids = torch.where(mask.bool(), ids, pad)  # as the compressor hands them over
    mult = torch.randint(0, 2**40, (N,), generator=g) * 2 + 1
    primes = torch.tensor([11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53][: (N - 1) * K])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), primes.cumsum(0)[:-1]])
    weight = torch.randn(int(primes.sum()), D, generator=g)
    to = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    inputs = EngramInputs(ids=to(ids), prefix=to(prefix), pad=to(pad), mask=to(mask))
    return inputs, HashParams(to(mult), to(primes), to(offsets)), to(weight)


@pytest.mark.parametrize("N,K,masked", [(2, 1, False), (3, 2, True), (4, 3, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
def test_hash_gather_matches_twin(N, K, masked, dtype, sparse):
    inputs, hashing, weight = _hash_case(N=N, K=K, masked=masked)
    weight = weight.to(dtype)
    w1 = weight.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    e1, rows1 = hg_naive.hash_gather(inputs, hashing, TableRows(w1), sparse)
    e2, rows2 = HashGatherFunction.apply(w2, inputs, hashing, sparse)
    assert torch.equal(rows1, rows2), "hash ids must match exactly"
    assert torch.equal(e1, e2), "the gather is a copy: bit-exact"
    grad = torch.randn(e1.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    e1.backward(grad)
    e2.backward(grad)
    assert w2.grad.is_sparse == sparse
    torch.testing.assert_close(w2.grad.to_dense(), w1.grad.to_dense(), **TOL[dtype])


def test_table_grad_rows_is_sorted_segment_sum():
    rows = torch.tensor([5, 2, 5, 9, 2, 5], device=DEVICE)
    grads = torch.arange(12, dtype=torch.float32, device=DEVICE).view(6, 2)
    unique, summed = table_grad_rows(rows, grads)
    assert unique.tolist() == [2, 5, 9]
    assert summed.tolist() == [[2 + 8, 3 + 9], [0 + 4 + 10, 1 + 5 + 11], [6, 7]]


@pytest.mark.parametrize("M,D", [(1, 8), (3, 12), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_matches_twin(M, D, dtype):
    g = torch.Generator().manual_seed(M * D)
    B, T = 2, 5
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    key, hidden, value = make(B, T, M, D), make(B, T, M, D), make(B, T, D)
    wk, wq = (
        (torch.rand(M, D, generator=g) + 0.5).to(DEVICE, dtype),
        (torch.rand(M, D, generator=g) + 0.5).to(DEVICE, dtype),
    )
    wk.requires_grad_(), wq.requires_grad_()
    args = [key, hidden, value, wk, wq]
    twin = [a.detach().clone().requires_grad_() for a in args]
    out_k = GateFunction.apply(*args, None, 1e-6)
    out_t = gate_naive.gate_value(*twin[:3], GateParams(NormParams(twin[3], None), NormParams(twin[4], 1e-6)))
    torch.testing.assert_close(out_k, out_t, **TOL[dtype])
    grad = torch.randn(out_k.shape, generator=g).to(DEVICE, dtype)
    out_k.backward(grad)
    out_t.backward(grad)
    for a, b in zip(args, twin):
        torch.testing.assert_close(a.grad, b.grad, **{k: v * 10 for k, v in TOL[dtype].items()})


@pytest.mark.parametrize("M,D,K,dil,T", [(1, 8, 4, 3, 9), (2, 4, 4, 2, 3), (3, 8, 3, 4, 20), (2, 4, 2, 1, 5)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_conv_matches_twin(M, D, K, dil, T, with_state, masked, dtype):
    g = torch.Generator().manual_seed(T * K)
    B, C, S = 2, M * D, (K - 1) * dil
    x = torch.randn(B, T, M, D, generator=g).to(DEVICE, dtype).requires_grad_()
    nw = (torch.rand(M, D, generator=g) + 0.5).to(DEVICE, dtype).requires_grad_()
    cw = (torch.randn(C, 1, K, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_()
    state = torch.randn(B, C, S, generator=g).to(DEVICE, dtype) if with_state else None
    mask = (torch.rand(B, T, generator=g) > 0.3).long().to(DEVICE) if masked else None
    twin = [t.detach().clone().requires_grad_() for t in (x, nw, cw)]
    y_k, s_k = conv_triton.ShortConvFunction.apply(x, nw, cw, dil, 1e-5, mask, state, True)
    y_t, s_t = conv_naive.short_conv(twin[0], ConvParams(NormParams(twin[1], 1e-5), twin[2], dil), mask, state)
    torch.testing.assert_close(y_k, y_t, **TOL[dtype])
    torch.testing.assert_close(s_k, s_t, **TOL[dtype])
    grad = torch.randn(y_k.shape, generator=g).to(DEVICE, dtype)
    y_k.backward(grad)
    y_t.backward(grad)
    for a, b in zip((x, nw, cw), twin):
        torch.testing.assert_close(a.grad, b.grad, **{k: v * 10 for k, v in TOL[dtype].items()})


@pytest.mark.parametrize("M,D,K,dil", [(2, 4, 4, 3), (1, 8, 3, 2), (3, 4, 2, 1)])
def test_short_conv_decode_step_matches_twin_and_shifts_state(M, D, K, dil):
    g = torch.Generator().manual_seed(K)
    B, C, S = 3, M * D, (K - 1) * dil
    nw = (torch.rand(M, D, generator=g) + 0.5).to(DEVICE)
    cw = torch.randn(C, 1, K, generator=g).to(DEVICE)
    s_k = torch.randn(B, C, S, generator=g).to(DEVICE)
    s_t = s_k.clone()
    for _ in range(4):
        x = torch.randn(B, 1, M, D, generator=g).to(DEVICE)
        conv = ConvParams(NormParams(nw, 1e-5), cw, dil)
        y_k = conv_triton.short_conv_step(x, conv, None, s_k)
        y_t = conv_naive.short_conv_step(x, conv, None, s_t)
        torch.testing.assert_close(y_k, y_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s_k, s_t, rtol=1e-5, atol=1e-5)


def test_model_under_triton_backend_matches_torch_backend_and_caches():
    from transformers import DynamicCache

    m = tiny_model().to(DEVICE)
    ids = torch.randint(2, 97, (2, 11), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        with use_backend("torch"):
            ref = m(ids, attention_mask=mask).logits
        with use_backend("triton"):
            out = m(ids, attention_mask=mask).logits
            cache = DynamicCache(config=m.config)
            steps = [m(ids[:, :4], attention_mask=mask[:, :4], cache=cache).logits]
            for t in range(4, 11):
                steps.append(m(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1)[1, 3:], ref[1, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1)[0], ref[0], rtol=1e-5, atol=1e-5)


def test_model_gradients_under_triton_backend():
    a, b = tiny_model().to(DEVICE), tiny_model().to(DEVICE)
    ids = torch.randint(2, 97, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with use_backend("torch"):
        a(ids, labels=ids).loss.backward()
    with use_backend("triton"):
        b(ids, labels=ids).loss.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("layout", ["cropped", "transposed", "batch-strided"])
def test_decode_step_on_a_strided_state_view(layout):
    """The cache hands the step views (a crop of a longer state, a transposed buffer, every other
    batch row): the kernel must address the state through its strides and leave the rest alone."""
    g = torch.Generator().manual_seed(5)
    B, M, D, K, dil = 2, 2, 8, 4, 3
    C, S = M * D, (K - 1) * dil
    nw = (torch.rand(M, D, generator=g) + 0.5).to(DEVICE)
    cw = torch.randn(C, 1, K, generator=g).to(DEVICE)
    conv = ConvParams(NormParams(nw, 1e-5), cw, dil)
    if layout == "cropped":
        backing = torch.randn(B, C, S + 5, generator=g).to(DEVICE)
        state = backing[:, :, 3 : 3 + S]
    elif layout == "transposed":
        backing = torch.randn(B, S, C, generator=g).to(DEVICE)
        state = backing.transpose(1, 2)
    else:
        backing = torch.randn(2 * B, C, S, generator=g).to(DEVICE)
        state = backing[::2]
    assert not state.is_contiguous()
    outside = backing.clone()
    twin = state.clone()
    for _ in range(3):
        x = torch.randn(B, 1, M, D, generator=g).to(DEVICE)
        y = conv_triton.short_conv_step(x, conv, None, state)
        y_t = conv_naive.short_conv_step(x, conv, None, twin)
        torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, twin, rtol=1e-5, atol=1e-5)
    # Everything of the backing buffer outside the view is untouched.
    outside_view = outside.clone()
    if layout == "cropped":
        outside_view[:, :, 3 : 3 + S] = backing[:, :, 3 : 3 + S]
    elif layout == "batch-strided":
        outside_view[::2] = backing[::2]
    else:
        outside_view = backing
    assert torch.equal(backing, outside_view)


def test_width_one_conv_keeps_no_state():
    """kernel_size=1 is refused by the config, but the op itself must not write outside an empty state."""
    g = torch.Generator().manual_seed(6)
    B, M, D = 2, 1, 8
    nw = torch.ones(M, D).to(DEVICE)
    cw = torch.randn(M * D, 1, 1, generator=g).to(DEVICE)
    backing = torch.zeros(B, M * D, 1).to(DEVICE)
    state = backing[:, :, :0]
    x = torch.randn(B, 1, M, D, generator=g).to(DEVICE)
    y = conv_triton.short_conv_step(x, ConvParams(NormParams(nw, 1e-5), cw, 2), None, state)
    torch.testing.assert_close(y, conv_naive.short_conv(x, ConvParams(NormParams(nw, 1e-5), cw, 2))[0])
    assert torch.equal(backing, torch.zeros_like(backing))


def test_hot_row_backward_is_split_into_chunks_and_deterministic():
    """The pad n-grams of a padded batch hit one row thousands of times: its gradient is summed in
    chunks of SEGMENT_CHUNK lookups, then over the chunks, and must equal a float64 sum, bit for bit
    from run to run."""
    g = torch.Generator().manual_seed(7)
    hot = 3000 + 7  # not a multiple of the chunk: a short last chunk
    assert hot > 50 * SEGMENT_CHUNK
    rows = torch.cat([torch.full((hot,), 11), torch.randint(0, 40, (500,), generator=g), torch.tensor([39, 0])])
    rows = rows[torch.randperm(rows.shape[0], generator=g)].to(DEVICE)
    grads = torch.randn(rows.shape[0], 24, generator=g).to(DEVICE)
    unique, summed = table_grad_rows(rows, grads)
    expected = torch.zeros(40, 24, dtype=torch.float64, device=DEVICE).index_add_(0, rows, grads.double())
    assert unique.tolist() == sorted(set(rows.tolist()))
    torch.testing.assert_close(summed.double(), expected[unique], rtol=1e-6, atol=1e-4)
    again = table_grad_rows(rows, grads)[1]
    assert torch.equal(summed, again), "the sum order is fixed: identical bits on every run"


# ----------------------------------------------------------------------------- DeepSeek-V4.1 and FP8 rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_decode_matches_twin_exactly(dtype):
    """Every code byte and a spread of scale bytes (subnormal codes, NaN, negative zero included),
    through the kernel's bit arithmetic and torch's own float8 conversions: identical bits."""
    codes = torch.arange(256, dtype=torch.uint8).view(8, 32)
    scales = torch.tensor([[127], [0], [1], [100], [126], [130], [140], [150]], dtype=torch.uint8)
    # Half outputs: scales whose products stay in the type's normal range (the interpreter converts
    # float32 subnormals to half types by its own rule; float32 covers the subnormal scales).
    if dtype is torch.bfloat16:
        scales = scales.clamp_min(10)
    if dtype is torch.float16:
        scales = scales.clamp(122, 134)
    table = TableRows(codes.to(DEVICE), scales.to(DEVICE))
    out = fp8_triton.decode_rows(table, dtype)
    ref = fp8_naive.decode(table, dtype)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(out[0, 0].view(bits), ref[0, 0].view(bits)) and bool(torch.signbit(out[4, 0])), "-0 stays -0"
    # Packed rows (codes then scales, one buffer): strided views decode the same.
    packed = torch.cat([codes, scales], 1).to(DEVICE)
    assert torch.equal(
        torch.nan_to_num(fp8_triton.decode_rows(TableRows(packed[:, :32], packed[:, 32:]), dtype)),
        torch.nan_to_num(ref),
    )


def test_fp8_encode_round_trips():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-20, 20, 64)[:, None]
    t = fp8_naive.encode(x)
    y = fp8_naive.decode(t, torch.float32)
    assert ((y - x).abs() <= x.abs() / 16 + 1e-45).all(), "within half an E4M3 step"
    # Decoded rows encode back to the same values (a block whose largest code rounded down may pick
    # the next smaller scale, with doubled codes: other bytes, equal values).
    assert torch.equal(fp8_naive.decode(fp8_naive.encode(y), torch.float32), y)
    with pytest.raises(ValueError, match="finite"):
        fp8_naive.encode(torch.full((1, 32), float("inf")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dead", [False, True])
def test_fp8_hash_gather_and_dead_latch_match_twin(dtype, dead):
    inputs, hashing, weight = _hash_case(N=4, K=2, D=32, masked=False, seed=3)
    if dead:  # DEAD ids in the sequence and in the look-back: every n-gram over them hashes pads
        ids, prefix = inputs.ids.clone(), inputs.prefix.clone()
        ids[0, 2], ids[1, 5], prefix[1, 1] = -1, -1, -1
        inputs = EngramInputs(ids=ids, prefix=prefix, pad=inputs.pad)
    table = fp8_naive.encode(weight.cpu())
    table = TableRows(table.weight.to(DEVICE), table.scale.to(DEVICE))
    e1, rows1 = hg_naive.hash_gather(inputs, hashing, table, dtype=dtype)
    e2, rows2 = hash_gather_forward(inputs, hashing, table, dtype)
    assert torch.equal(rows1, rows2) and torch.equal(e1, e2)
    if dead:
        # Position 3 of row 0 reaches back over the DEAD id at 2 only from order 3 on.
        blocked = hg_naive.hash_rows(EngramInputs(ids=inputs.ids, prefix=inputs.prefix, pad=inputs.pad), hashing)
        pad = int(inputs.pad)
        same = EngramInputs(
            ids=torch.tensor([[pad, pad, pad, int(inputs.ids[0, 3])]], device=DEVICE),
            prefix=torch.full((1, 3), pad, device=DEVICE),
            pad=inputs.pad,
        )
        assert torch.equal(blocked[0, 3, 2:], hg_naive.hash_rows(same, hashing)[0, 3, 2:])


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("zero_sign", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_dead_mask_residual_and_sign_match_twin(residual, zero_sign, dtype):
    g = torch.Generator().manual_seed(11)
    B, T, M, D = 2, 6, 4, 32
    make = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    key, hidden, value = make(B, T, M, D), make(B, T, M, D), make(B, T, D)
    with torch.no_grad():
        key[0, 1].zero_()  # dot product exactly 0: the sign rule decides
    wk, wq = ((torch.rand(M, D, generator=g) + 0.5).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[1, 2] = 0
    args = [key, hidden, value, wk, wq]
    twin = [a.detach().clone().requires_grad_() for a in args]
    out_k = GateFunction.apply(*args, 1e-20, 1e-20, zero_sign, mask, residual)
    gate = GateParams(NormParams(twin[3], 1e-20), NormParams(twin[4], 1e-20), zero_sign)
    out_t = gate_naive.gate_value(*twin[:3], gate, mask, residual)
    torch.testing.assert_close(out_k, out_t, **TOL[dtype])
    alpha = gate_naive.gate_alpha(key.detach(), hidden.detach(), gate, mask)
    assert torch.all(alpha[1, 2] == 0), "a dead position's gate is 0"
    expected_zero = torch.sigmoid(torch.tensor(zero_sign * 1e-3))
    torch.testing.assert_close(alpha[0, 1], expected_zero.expand(M).to(alpha.device))
    if residual:
        assert torch.equal(out_k[1, 2], hidden.detach()[1, 2]), "dead: the streams pass through"
    grad = torch.randn(out_k.shape, generator=g).to(DEVICE, dtype)
    out_k.backward(grad)
    out_t.backward(grad)
    for a, b in zip(args, twin):
        torch.testing.assert_close(a.grad, b.grad, **{k: v * 10 for k, v in TOL[dtype].items()})
