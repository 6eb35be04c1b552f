"""The attention contract: reference vs sdpa (output, LSE, gradients), GQA, bias, causal."""

import math

import pytest
import torch

import ops


def naive_attention(q, k, v, causal, scale, bias):
    """Per-query loop in float64: independent check of the reference itself. q: (B,N,H,D)."""
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    out = torch.zeros(b, nq, h, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, h, nq), -math.inf, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // hkv)
            for i in range(nq):
                keys = [j for j in range(nk) if not causal or j <= i + nk - nq]
                if not keys:
                    continue
                s = torch.stack(
                    [q[bi, i, hi].double() @ k[bi, j, g].double() * scale for j in keys]
                )
                if bias is not None:
                    bb = bias.expand(b, h, nq, nk)
                    s = s + bb[bi, hi, i, keys].double()
                lse[bi, hi, i] = torch.logsumexp(s, 0)
                p = torch.softmax(s, 0)
                out[bi, i, hi] = sum(p[n] * v[bi, j, g].double() for n, j in enumerate(keys))
    return out, lse


def rand(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


@pytest.mark.parametrize("nq,nk,causal", [(5, 5, True), (3, 7, True), (7, 4, True), (6, 3, False)])
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (4, 1)])
def test_reference_matches_naive(nq, nk, causal, h, hkv):
    torch.manual_seed(nq * 100 + nk * 10 + h + hkv)
    q, k, v = (
        rand(2, nq, h, 8, grad=False),
        rand(2, nk, hkv, 8, grad=False),
        rand(2, nk, hkv, 6, grad=False),
    )
    bias = torch.randn(1, h, nq, nk, dtype=torch.float64)
    out, lse = ops.reference_attention(
        q, k, v, causal=causal, scale=0.3, bias=bias, return_lse=True
    )
    want, want_lse = naive_attention(q, k, v, causal, 0.3, bias)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)
    assert out.shape == (2, nq, h, 6) and lse.shape == (2, h, nq)


CASES = [  # (B, Nq, Nk, H, Hkv, D, Dv, causal, bias shape or None)
    (2, 9, 9, 4, 4, 16, 16, True, None),
    (1, 6, 11, 4, 2, 8, 12, False, (1, 1, 6, 11)),
    (2, 5, 13, 6, 2, 8, 8, True, None),  # causal, Nq < Nk: bottom-right
    (1, 7, 4, 2, 1, 8, 8, True, (1, 2, 1, 4)),  # causal, Nq > Nk: first rows see nothing
    (2, 10, 10, 4, 1, 8, 8, True, (2, 4, 10, 10)),  # MQA + full bias + causal
]


@pytest.mark.parametrize("case", CASES)
def test_sdpa_matches_reference_forward_lse_backward(case):
    b, nq, nk, h, hkv, d, dv, causal, bshape = case
    torch.manual_seed(sum(case[:7]))
    q, k, v = rand(b, nq, h, d), rand(b, nk, hkv, d), rand(b, nk, hkv, dv)
    bias = rand(*bshape) if bshape else None
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    sdpa, ref = ops.build("sdpa"), ops.build("reference")
    o1, l1 = sdpa(q, k, v, causal=causal, bias=bias, return_lse=True)
    o2, l2 = ref(q, k, v, causal=causal, bias=bias, return_lse=True)
    torch.testing.assert_close(o1, o2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(l1.double(), l2.double(), rtol=1e-6, atol=1e-6)
    go = torch.randn_like(o1)
    finite = torch.isfinite(l2)
    g1 = torch.autograd.grad((o1 * go).sum() + l1[finite].sum(), inputs)
    g2 = torch.autograd.grad((o2 * go).sum() + l2[finite].sum(), inputs)
    for a, r in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_dead_rows_are_zero():
    q, k, v = (
        rand(1, 6, 2, 8, grad=False),
        rand(1, 2, 2, 8, grad=False),
        rand(1, 2, 2, 8, grad=False),
    )
    for name in ("sdpa", "reference"):
        out, lse = ops.build(name)(q, k, v, causal=True, return_lse=True)
        assert (out[:, :4] == 0).all() and torch.isinf(lse[..., :4]).all()
        assert (out[:, 4:] != 0).any()


def test_sdpa_fp32_heads_last_strided_views_no_grad_mismatch():
    """q/k/v as views of one fused projection (the model's layout) in float32."""
    torch.manual_seed(0)
    x = torch.randn(2, 33, 3 * 4 * 16)
    q, k, v = (t.view(2, 33, 4, 16) for t in x.split(64, dim=-1))
    out = ops.build("sdpa")(q, k, v, causal=True)
    ref = ops.build("reference")(q, k, v, causal=True)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    assert out.dtype == torch.float32 and out.shape == (2, 33, 4, 16)


def test_reference_spatial_tokens():
    """(B, X, Y, H, D) layouts flatten to sequences."""
    q, k, v = (
        rand(1, 3, 4, 2, 8, grad=False),
        rand(1, 3, 4, 2, 8, grad=False),
        rand(1, 3, 4, 2, 8, grad=False),
    )
    out = ops.reference_attention(q, k, v)
    flat = ops.reference_attention(
        q.reshape(1, 12, 2, 8), k.reshape(1, 12, 2, 8), v.reshape(1, 12, 2, 8)
    )
    torch.testing.assert_close(out.reshape(1, 12, 2, 8), flat)


def test_build_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="unknown attention backend .flashy.*reference.*sdpa"):
        ops.build("flashy")
    with pytest.raises(ValueError, match="unknown option.*window.*valid options: \\(none\\)"):
        ops.build("sdpa", window=3)


def test_input_errors():
    attn = ops.build("sdpa")
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="multiple of the number of k/v heads"):
        attn(q, k, k)
    with pytest.raises(ValueError, match="head dim"):
        attn(torch.randn(1, 4, 4, 16), k, k)
    with pytest.raises(ValueError, match="does not broadcast"):
        attn(torch.randn(1, 4, 4, 8), k, k, bias=torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="n_kv_heads 3 must divide n_heads 8"):
        attn.check(n_heads=8, n_kv_heads=3)


def test_check_reports_capabilities():
    spec = ops.available()["sdpa"]
    limited = ops.Attention(
        ops.registry.BackendSpec(
            "limited",
            spec.factory,
            {},
            ops.Capabilities(bias=False, max_head_dim=64, devices=("cuda",)),
            "",
        ),
        {},
    )
    with pytest.raises(ValueError, match="head_dim 128.*additive attention bias.*device 'cpu'"):
        limited.check(head_dim=128, bias=True, device="cpu")
    limited.check(head_dim=64, device="cuda")  # fine


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_gpu_low_precision(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 256, 8, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 256, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 256, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
    out = ops.build("sdpa")(q, k, v, causal=True)
    ref = ops.build("reference")(*(t.double() for t in (q, k, v)), causal=True)
    assert (out.double() - ref).norm() / ref.norm() < 1e-2
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ops.build("reference")(qd, kd, vd, causal=True)
    want = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    for g, w in zip(grads, want):
        assert (g.double() - w).norm() / w.norm() < 2e-2
