"""Fused 1-D/2-D/3-D neighborhood attention ("neighborhood") against
ops.neighborhood_reference.

On CPU the kernels run in Triton's interpreter (1-D: 16x16 tiles, 2-D/3-D: 64-element boxes,
8x8 / 4x4x4, unless a case binds others), so shapes stay tiny; the `gpu` tests run at training
size. Every loss also uses the LSE
(sum(lse * w)), so the differentiable-LSE backward is checked.
"""

import math

import pytest
import torch

import ops

# (id, B, N, H, Hkv, D, kernel_size, dilation, stride, is_causal, call causal, build options)
CASES = [
    ("n9-k3", 1, 9, 2, 2, 16, 3, 1, 1, False, False, {}),
    ("n17-k4-even-causal-flag", 2, 17, 2, 1, 16, 4, 1, 1, False, True, {}),
    ("n33-k5-d2-gqa", 1, 33, 4, 2, 16, 5, 2, 1, False, False, {}),
    ("n50-k6-d3-s2-causal", 1, 50, 2, 2, 16, 6, 3, 2, True, False, {}),
    ("n50-k7-sK-mqa", 1, 50, 4, 1, 16, 7, 1, 7, False, False, {}),
    ("n33-k4-sK-causal", 1, 33, 2, 2, 16, 4, 1, 4, True, False, {}),
    ("n70-k20-s3-gqa", 1, 70, 4, 2, 32, 20, 1, 3, False, False, {}),
    ("n70-k20-d2-s4-causal", 1, 70, 2, 2, 16, 20, 2, 4, True, False, {}),
    ("n40-k40-whole-seq", 1, 40, 2, 1, 16, 40, 1, 1, False, False, {}),
    ("n45-k8-d2-tiles32x16", 1, 45, 2, 2, 16, 8, 2, 1, False, True, {"block_m": 32, "block_n": 16}),
    ("n45-k9-tiles16x32-causal", 1, 45, 2, 2, 16, 9, 1, 1, True, False, {"block_n": 32}),
]


def make_qkv(b, n, h, hkv, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, n, h, d), (b, n, hkv, d), (b, n, hkv, d))
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def run(attn, q, k, v, causal, go, w):
    """[out, lse, dq, dk, dv] for loss = sum(out * go) + sum(lse * w)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = attn(q, k, v, causal=causal, return_lse=True)
    loss = (out.double() * go).sum() + (lse.double() * w).sum()
    return [out, lse, *torch.autograd.grad(loss, (q, k, v))]


def upstream(q, seed=1):
    """Upstream grads (go, w) in float64 for out (B, N, H, D) and lse (B, H, N)."""
    g = torch.Generator().manual_seed(seed)
    b, n, h, d = q.shape
    go = torch.randn((b, n, h, d), generator=g, dtype=torch.float64).to(q.device)
    w = torch.randn((b, h, n), generator=g, dtype=torch.float64).to(q.device)
    return go, w


def window(kernel_size, dilation, stride, is_causal):
    return dict(kernel_size=kernel_size, dilation=dilation, stride=stride, is_causal=is_causal)


def masked_sdpa(n, win, device="cpu"):
    """Baseline in the inputs' dtype: torch SDPA with the window as an additive -inf mask."""
    mask = ops.neighborhood_mask((n,), **win, device=device)
    bias = torch.zeros(mask.shape, device=device).masked_fill(~mask, -math.inf)

    def attn(q, k, v, causal, return_lse):
        return ops.sdpa_attention(q, k, v, bias=bias, return_lse=return_lse)

    return attn


def max_err(x, ref):
    return (x.double() - ref).abs().max().item()


def check_against_baseline(got, base, ref):
    """Each of out, lse, dq, dk, dv within 2x the baseline's own error against float64,
    plus a floor of 1e-5 of the magnitude (LSE is fp32 in both, ~1e-7)."""
    for name, x, y, r in zip(("out", "lse", "dq", "dk", "dv"), got, base, ref):
        err, tol = max_err(x, r), 2 * max_err(y, r) + 1e-5 * r.abs().max().item()
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_matches_reference(case):
    """fp32, IEEE dots: ~1e-6 from the float64 reference; a wrong window fails by far more."""
    _, b, n, h, hkv, d, ks, dil, st, is_causal, causal, options = case
    q, k, v = make_qkv(b, n, h, hkv, d, seed=n + 7 * ks + dil)
    go, w = upstream(q)
    win = window(ks, dil, st, is_causal)
    ref = run(ops.build("neighborhood_reference", **win), *(t.double() for t in (q, k, v)),
              causal, go, w)  # fmt: skip
    got = run(ops.build("neighborhood", **win, **options), q, k, v, causal, go, w)
    assert got[0].shape == (b, n, h, d) and got[0].dtype == torch.float32
    assert got[1].shape == (b, h, n) and got[1].dtype == torch.float32
    for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "n,hkv,ks,dil,st,causal", [(50, 2, 7, 2, 1, False), (70, 1, 9, 1, 3, True)]
)
def test_fp16_within_twice_masked_sdpa_error(n, hkv, ks, dil, st, causal):
    """fp16 vs the float64 reference of the fp16 inputs, tolerance 2x the error of torch SDPA
    in fp16 with the same mask (the fp32-computing reference rounds only its results)."""
    q, k, v = make_qkv(1, n, 4, hkv, 16, dtype=torch.float16, seed=n)
    go, w = upstream(q)
    win = window(ks, dil, st, causal)
    ref = run(ops.build("neighborhood_reference", **win), *(t.double() for t in (q, k, v)),
              False, go, w)  # fmt: skip
    got = run(ops.build("neighborhood", **win), q, k, v, False, go, w)
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float32
    check_against_baseline(got, run(masked_sdpa(n, win), q, k, v, False, go, w), ref)


def test_strided_views_read_in_place():
    """Views of one fused (B, N, (H + 2*Hkv) * D) projection give exactly the results of
    contiguous copies; gradients reach the fused tensor."""
    b, n, h, hkv, d = 2, 19, 4, 2, 16
    torch.manual_seed(0)
    fused = torch.randn(b, n, (h + 2 * hkv) * d, requires_grad=True)
    q, k, v = (t.unflatten(-1, (-1, d)) for t in fused.split([h * d, hkv * d, hkv * d], -1))
    assert not q.is_contiguous()
    attn = ops.build("neighborhood", kernel_size=5, dilation=2)
    go, w = torch.randn(b, n, h, d), torch.randn(b, h, n)
    out, lse = attn(q, k, v, causal=True, return_lse=True)
    (out * go).sum().add((lse * w).sum()).backward()
    want = run(attn, q.contiguous(), k.contiguous(), v.contiguous(), True, go.double(), w.double())
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    assert torch.equal(fused.grad, torch.cat([g.flatten(2) for g in want[2:]], -1))


@pytest.mark.parametrize("n,dil,causal", [(48, 3, False), (45, 1, True)])
def test_tma_path_equals_pointer_path(n, dil, causal):
    """The tensor-descriptor forward (N % d == 0, aligned strides) and the pointer forward give
    the same outputs and gradients; the descriptor one really ran (it needs the N % d view)."""
    from ops import neighborhood as na

    assert na._tma_views(dil, *make_qkv(1, n, 2, 1, 16)) is not None
    assert na._tma_views(5, *make_qkv(1, 48, 2, 1, 16)) is None  # 48 % 5: pointer loads
    q, k, v = make_qkv(1, n, 4, 2, 16, seed=n)
    go, w = upstream(q)
    win = window(7, dil, 1, False)
    tma = run(ops.build("neighborhood", **win, tma=True), q, k, v, causal, go, w)
    ptr = run(ops.build("neighborhood", **win, tma=False), q, k, v, causal, go, w)
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), tma, ptr):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=name)


def test_far_tiles_are_never_read():
    """NaN in keys/values beyond the key tiles that the first query tile's windows touch leaves
    its outputs finite (the kernel skips those tiles); likewise NaN in far queries leaves dK/dV of
    the first key tile finite. A dense loop with masks would propagate NaN (0 * NaN)."""
    q, k, v = make_qkv(1, 64, 2, 2, 16)
    attn = ops.build("neighborhood", kernel_size=5)  # rows 0..15 see keys 0..17: tiles 0, 1
    k[:, 32:], v[:, 32:] = math.nan, math.nan
    out, lse = attn(q, k, v, return_lse=True)
    assert torch.isfinite(out[:, :16]).all() and torch.isfinite(lse[..., :16]).all()
    q, k, v = make_qkv(1, 64, 2, 2, 16)
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    out = attn(q, k, v)
    go = torch.randn_like(out)
    go[:, 32:] = math.nan  # keys 0..15 are seen by queries 0..17 only
    dk, dv = torch.autograd.grad(out, (k, v), go)
    assert torch.isfinite(dk[:, :16]).all() and torch.isfinite(dv[:, :16]).all()


def test_lse_only_loss_and_output_only():
    """A loss on the LSE alone (no dO) and a call without return_lse get true gradients."""
    q, k, v = make_qkv(1, 21, 2, 1, 16, seed=5)
    win = window(6, 1, 2, True)
    attn, ref = ops.build("neighborhood", **win), ops.build("neighborhood_reference", **win)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    got = torch.autograd.grad(attn(q, k, v, return_lse=True)[1].sum(), (q, k, v))
    want = torch.autograd.grad(ref(qd, kd, vd, return_lse=True)[1].sum(), (qd, kd), None)
    assert (got[2] == 0).all()  # the LSE does not depend on v
    for x, r in zip(got[:2], want):
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-5)
    out = attn(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(ref(qd, kd, vd).square().sum(), (qd, kd, vd))
    for x, r in zip(got, want):
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem():
    attn = ops.build("neighborhood", kernel_size=3)
    q, k, v = make_qkv(1, 8, 2, 2, 16)
    with pytest.raises(ValueError, match="1-D, 2-D and 3-D token layouts.*got .* 4 token axes"):
        attn(*(t.reshape(1, 2, 2, 1, 2, 2, 16) for t in (q, k, v)))
    with pytest.raises(ValueError, match=r"kernel_size \* dilation = 5 \* 2 = 10 is larger"):
        ops.build("neighborhood", kernel_size=5, dilation=2)(q, k, v)
    with pytest.raises(ValueError, match=r"stride must be in \[1, kernel_size=3\], got 4"):
        ops.build("neighborhood", kernel_size=3, stride=4)(q, k, v)
    with pytest.raises(ValueError, match="kernel_size must be an integer >= 2"):
        ops.build("neighborhood", kernel_size=1)(q, k, v)
    with pytest.raises(ValueError, match="bias"):
        attn(q, k, v, bias=torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="same token layout"):
        attn(q, torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16))
    with pytest.raises(ValueError, match="Dv == D"):
        attn(q, k, torch.randn(1, 8, 2, 32))
    with pytest.raises(ValueError, match=r"head dim must be one of .*got 24"):
        attn(*make_qkv(1, 8, 2, 2, 24))
    with pytest.raises(ValueError, match="block_m=48"):
        ops.build("neighborhood", block_m=48)
    with pytest.raises(ValueError, match="4-D token layouts"):
        attn.check(token_ndim=4)
    attn.check(token_ndim=2)
    attn.check(token_ndim=3)
    attn.check(head_dim=64, n_heads=8, n_kv_heads=2, dtype=torch.bfloat16, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_real_size_within_twice_sdpa_error(causal):
    """Compiled kernels at training size (bf16, N=4096, K=257, GQA) vs the float64 reference;
    tolerance 2x the error of torch SDPA with the same boolean mask in bf16. Deterministic."""
    q, k, v = make_qkv(2, 4096, 8, 2, 64, dtype=torch.bfloat16, device="cuda")
    go, w = upstream(q)
    win = window(257, 1, 1, causal)
    ref = run(ops.build("neighborhood_reference", **win), *(t.double() for t in (q, k, v)),
              False, go, w)  # fmt: skip
    base = run(masked_sdpa(4096, win, "cuda"), q, k, v, False, go, w)
    attn = ops.build("neighborhood", **win)
    got = run(attn, q, k, v, False, go, w)
    check_against_baseline(got, base, ref)
    again = run(attn, q, k, v, False, go, w)
    assert all(torch.equal(x, y) for x, y in zip(got, again))


def test_gpt2_with_fused_kernel_matches_reference_backend():
    """Inside GPT-2 (which passes causal=True): same logits and gradients as the reference."""
    from models import GPT2Config, PosConfig, build_model

    torch.manual_seed(5)
    cfg = GPT2Config(n_layer=1, n_head=2, d_model=32)
    ref = build_model(
        cfg, ops.build("neighborhood_reference", kernel_size=8), PosConfig(name="rope")
    )
    ours = build_model(cfg, ops.build("neighborhood", kernel_size=8), PosConfig(name="rope"))
    ours.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 50257, (2, 19))
    torch.testing.assert_close(ours(idx), ref(idx), rtol=1e-5, atol=1e-5)  # logits
    la, lb = ref(idx, idx), ours(idx, idx)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(la, list(ref.parameters()))
    gb = torch.autograd.grad(lb, list(ours.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- 2-D and 3-D

# (id, B, tokens, H, Hkv, D, kernel_size, dilation, stride, is_causal, call causal, options)
ND_CASES = [
    ("7x9-k3", 1, (7, 9), 2, 2, 16, 3, 1, 1, False, False, {}),
    ("9x11-k4x5-d2x1-s1x2-causal-x-gqa-tiles32x16", 1, (9, 11), 4, 2, 16, (4, 5), (2, 1), (1, 2),
     (True, False), False, {"block_m": 32, "block_n": 16}),
    ("8x10-k3x6-s3x2-mqa-causal-flag", 2, (8, 10), 2, 1, 16, (3, 6), 1, (3, 2), False, True, {}),
    ("9x9-k2-d1x3-s2-causal", 1, (9, 9), 2, 2, 32, 2, (1, 3), 2, True, False,
     {"block_m": 32}),
    ("5x6x7-k3x2x4-d1x2x1-s2x1x3-mqa", 1, (5, 6, 7), 2, 1, 16, (3, 2, 4), (1, 2, 1), (2, 1, 3),
     False, False, {}),
    ("4x5x6-k3-causal-flag-gqa", 1, (4, 5, 6), 4, 2, 16, 3, 1, 1, False, True, {}),
    ("5x6x7-k2x5x3-d2x1x2-causal-z", 1, (5, 6, 7), 2, 2, 16, (2, 5, 3), (2, 1, 2), 1,
     (False, False, True), False, {}),
    # boxes forced: a large kernel on 4x4 boxes, so some key boxes are seen by every query of a
    # box and skip the mask (both loops: forward/dQ over keys, dK/dV over queries)
    ("11x12-k9-box-unmasked", 1, (11, 12), 1, 1, 16, 9, 1, 1, False, False,
     {"block_m": 16, "block_n": 16, "flat_tiles": False}),
    ("11x12-k8x7-d1x2-s2x1-causal-y-box", 1, (11, 12), 2, 2, 16, (8, 5), (1, 2), (2, 1),
     (False, True), False, {"block_m": 16, "block_n": 16, "flat_tiles": False}),
    # runs of the span forced, ragged 3-D with dilation and GQA
    ("7x7x6-k3x4x2-d2x1x1-flat-gqa", 1, (7, 7, 6), 2, 1, 16, (3, 4, 2), (2, 1, 1), 1, False,
     False, {"block_m": 32, "block_n": 64, "flat_tiles": True}),
]  # fmt: skip


def make_nd(b, tokens, h, hkv, d, dtype=torch.float32, seed=0):
    q, k, v = make_qkv(b, math.prod(tokens), h, hkv, d, dtype, seed)
    return [t.unflatten(1, tokens) for t in (q, k, v)]


def upstream_nd(q, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(q.shape[1:-2])
    go = torch.randn(q.shape, generator=g, dtype=torch.float64)
    w = torch.randn((q.shape[0], q.shape[-2], n), generator=g, dtype=torch.float64)
    return go, w


@pytest.mark.parametrize("case", ND_CASES, ids=[c[0] for c in ND_CASES])
def test_nd_fp32_matches_reference(case):
    """2-D/3-D fp32: out, LSE (B, H, N) and all gradients ~1e-6 from the float64 reference."""
    _, b, tokens, h, hkv, d, ks, dil, st, is_causal, causal, options = case
    q, k, v = make_nd(b, tokens, h, hkv, d, seed=len(tokens) + h)
    go, w = upstream_nd(q)
    win = window(ks, dil, st, is_causal)
    ref = run(ops.build("neighborhood_reference", **win), *(t.double() for t in (q, k, v)),
              causal, go, w)  # fmt: skip
    got = run(ops.build("neighborhood", **win, **options), q, k, v, causal, go, w)
    assert got[0].shape == q.shape and got[1].shape == (b, h, math.prod(tokens))
    for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "tokens,hkv,ks,dil,st,causal",
    [
        ((9, 10), 1, (3, 4), (2, 1), 1, (False, True)),
        ((4, 6, 5), 2, 3, (1, 2, 1), (1, 1, 2), False),
    ],
)
def test_nd_fp16_within_twice_masked_sdpa_error(tokens, hkv, ks, dil, st, causal):
    """fp16 2-D/3-D: within 2x the fp16 error of torch SDPA with the same boolean mask."""
    q, k, v = make_nd(1, tokens, 2, hkv, 16, dtype=torch.float16, seed=3)
    go, w = upstream_nd(q)
    win = window(ks, dil, st, causal)
    ref = run(ops.build("neighborhood_reference", **win), *(t.double() for t in (q, k, v)),
              False, go, w)  # fmt: skip
    got = run(ops.build("neighborhood", **win), q, k, v, False, go, w)
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float32
    base = run(masked_sdpa_nd(tokens, win), *(t.flatten(1, -3) for t in (q, k, v)), False,
               go.flatten(1, -3), w)  # fmt: skip
    base = [base[0].unflatten(1, tokens), base[1], *(g.unflatten(1, tokens) for g in base[2:])]
    check_against_baseline(got, base, ref)


@pytest.mark.parametrize(
    "tokens,ks,causal,opts",
    [((9, 10), 5, False, {})],  # 3-D dilation-1 descriptor runs: ND_CASES vs the reference
)
def test_nd_tma_path_equals_pointer_path(tokens, ks, causal, opts):
    """2-D/3-D: the tensor-descriptor kernels (dilation 1, boxes; whole boxes loaded, the
    span masked) give the pointer kernels' outputs and gradients, and really ran."""
    from ops import neighborhood_nd as nd

    q, k, v = make_nd(1, tokens, 4, 2, 16, seed=4)
    win = window(ks, 1, 1, False)
    per_axis = ([ks] * len(tokens), [1] * len(tokens), [1] * len(tokens), [False] * len(tokens))
    assert nd._tma_ok(per_axis, {}, q, k, v) and not nd._tma_ok(per_axis, {"tma": False}, q, k, v)
    assert not nd._tma_ok(per_axis, {}, q.transpose(-1, -2), k, v)  # (H, D) not merged
    dilated = (per_axis[0], [2] * len(tokens), *per_axis[2:])
    assert not nd._tma_ok(dilated, {}, q, k, v)
    go, w = upstream_nd(q)
    tma = run(ops.build("neighborhood", **win, **opts, tma=True), q, k, v, causal, go, w)
    ptr = run(ops.build("neighborhood", **win, **opts, tma=False), q, k, v, causal, go, w)
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), tma, ptr):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=name)


def masked_sdpa_nd(tokens, win, device="cpu"):
    """SDPA over the row-major flattened tokens with the ND window as an additive mask."""
    mask = ops.neighborhood_mask(tokens, **win, device=device)
    bias = torch.zeros(mask.shape, device=device).masked_fill(~mask, -math.inf)

    def attn(q, k, v, causal, return_lse):
        return ops.sdpa_attention(q, k, v, bias=bias, return_lse=return_lse)

    return attn


def test_nd_tiles_default_to_boxes_and_flat_tiles_is_checked():
    """flat_tiles=None (the default) runs the box kernels: bit-identical to flat_tiles=False."""
    q, k, v = make_nd(1, (6, 7), 1, 1, 16)
    default = ops.build("neighborhood", kernel_size=3)(q, k, v)
    boxes = ops.build("neighborhood", kernel_size=3, flat_tiles=False)(q, k, v)
    assert torch.equal(default, boxes)
    with pytest.raises(ValueError, match="flat_tiles='yes'"):
        ops.build("neighborhood", flat_tiles="yes")


def test_nd_boxes_follow_the_span():
    """13x13 on 128x128: dK/dV key boxes of 16x4 reach a 28x16 query span, exactly 7 query
    boxes of 4x16, where the square 8x8 / 8x8 pair visits 9 boxes of a 20x20 span; an 80x80
    kernel keeps square boxes (nothing to gain)."""
    from ops.neighborhood_nd import _choose_boxes

    geo = ((128, 128, 1), (13, 13, 1), (1, 1, 1), (1, 1, 1), 2)
    assert _choose_boxes(*geo, 64, 64, True) == ((4, 16, 1), (16, 4, 1))
    assert _choose_boxes(*geo, 64, 32, False) == ((4, 16, 1), (8, 4, 1))
    big = ((256, 256, 1), (80, 80, 1), (1, 1, 1), (1, 1, 1), 2)
    assert _choose_boxes(*big, 64, 64, False) == ((8, 8, 1), (8, 8, 1))


def test_nd_strided_views_read_in_place():
    """2-D: views of a fused projection and a spatial crop (non-mergeable token strides) give
    exactly the results of contiguous copies; gradients reach the fused tensor."""
    b, x, y, h, hkv, d = 1, 9, 12, 2, 1, 16
    torch.manual_seed(0)
    fused = torch.randn(b, x + 1, y, (h + 2 * hkv) * d)
    fused = fused[:, 1:, 1:].requires_grad_()  # crop: the x stride is not y * (y stride)
    fused.retain_grad()
    q, k, v = (t.unflatten(-1, (-1, d)) for t in fused.split([h * d, hkv * d, hkv * d], -1))
    assert not q.is_contiguous() and q.stride(1) != q.shape[2] * q.stride(2)
    attn = ops.build("neighborhood", kernel_size=(3, 4), dilation=(2, 1), is_causal=(False, True))
    go, w = torch.randn(q.shape), torch.randn(b, h, x * (y - 1))
    out, lse = attn(q, k, v, return_lse=True)
    (out * go).sum().add((lse * w).sum()).backward()
    want = run(attn, q.contiguous(), k.contiguous(), v.contiguous(), False, go.double(),
               w.double())  # fmt: skip
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    assert torch.equal(fused.grad, torch.cat([g.flatten(-2) for g in want[2:]], -1))


def test_nd_far_tiles_are_never_read():
    """2-D, kernel 3: the first query box (boxes as the launcher chooses them) reaches keys
    [0, box + 1) per axis, visited as whole key boxes; NaN keys/values beyond those boxes leave
    its outputs finite. Likewise NaN upstream grads beyond the query boxes that the first key box
    visits leave its dK/dV finite. A dense loop with masks would propagate NaN (0 * NaN)."""
    from ops.neighborhood_nd import _choose_boxes

    tokens = (40, 40)
    attn = ops.build("neighborhood", kernel_size=3, block_m=64, block_n=64)
    geo = ((40, 40, 1), (3, 3, 1), (1, 1, 1), (1, 1, 1), 2, 64, 64)
    (tx, ty, _), (kx, ky, _) = _choose_boxes(*geo, False)
    reach = [-(-(t + 1) // kk) * kk for t, kk in ((tx, kx), (ty, ky))]  # visited key boxes
    assert max(reach) < 40
    q, k, v = make_nd(1, tokens, 1, 1, 16)
    for t in (k, v):
        t[:, reach[0] :], t[:, :, reach[1] :] = math.nan, math.nan
    out, lse = attn(q, k, v, return_lse=True)
    assert torch.isfinite(out[:, :tx, :ty]).all()
    assert torch.isfinite(lse.view(1, 1, *tokens)[..., :tx, :ty]).all()
    assert torch.isnan(out[:, 39:, 39:]).all()  # the poison does reach the far queries
    (tx, ty, _), (kx, ky, _) = _choose_boxes(*geo, True)
    reach = [-(-(kk + 1) // t) * t for t, kk in ((tx, kx), (ty, ky))]  # visited query boxes
    assert max(reach) < 40
    q, k, v = (t.requires_grad_() for t in make_nd(1, tokens, 1, 1, 16))
    out = attn(q, k, v)
    go = torch.randn_like(out)
    go[:, reach[0] :], go[:, :, reach[1] :] = math.nan, math.nan
    dk, dv = torch.autograd.grad(out, (k, v), go)
    assert torch.isfinite(dk[:, :kx, :ky]).all() and torch.isfinite(dv[:, :kx, :ky]).all()
    assert torch.isnan(dk[:, 39:, 39:]).all()


def test_nd_errors_name_the_problem():
    q, k, v = make_nd(1, (6, 8), 2, 2, 16)
    with pytest.raises(ValueError, match=r"kernel_size=\(3, 3, 3\): give one value or 2"):
        ops.build("neighborhood", kernel_size=(3, 3, 3))(q, k, v)
    with pytest.raises(
        ValueError, match=r"kernel_size \* dilation = 4 \* 2 = 8 is larger than axis 0"
    ):
        ops.build("neighborhood", kernel_size=4, dilation=(2, 1))(q, k, v)
    with pytest.raises(
        ValueError, match=r"stride must be in \[1, kernel_size=3\], got 4 on axis 1"
    ):
        ops.build("neighborhood", kernel_size=3, stride=(1, 4))(q, k, v)
    with pytest.raises(ValueError, match="same token layout"):
        ops.build("neighborhood", kernel_size=3)(q, k[:, :, :7], v[:, :, :7])


def _blockwise_reference(q, k, v, win, go, w, rows=1024):
    """Float64 NA outputs, LSE and the gradients of sum(o*go) + sum(lse*w), over query row blocks
    with a hand-written backward, so that neither an (N, N) mask nor an autograd graph of all
    blocks is kept: the per-axis masks are combined per block."""
    from ops.neighborhood_ref import axis_mask, check_window

    tokens = q.shape[1:-2]
    ks, ds, ss, cs = check_window(tokens, **win)
    masks = [
        axis_mask(n, kk, s, dd, c, q.device) for n, kk, dd, s, c in zip(tokens, ks, ds, ss, cs)
    ]
    idx = torch.arange(math.prod(tokens), device=q.device)
    coords = []
    for n in reversed(tokens):
        coords.insert(0, idx % n)
        idx = idx // n
    qd, kd, vd = (t.double().flatten(1, -3) for t in (q, k, v))
    gd, wd = go.flatten(1, -3).double(), w.double()
    group = qd.shape[2] // kd.shape[2]
    kx, vx = kd.repeat_interleave(group, 2), vd.repeat_interleave(group, 2)
    scale = q.shape[-1] ** -0.5
    o, lse, dq = torch.empty_like(qd), torch.empty(wd.shape, dtype=qd.dtype), torch.empty_like(qd)
    lse = lse.to(q.device)
    dkx, dvx = torch.zeros_like(kx), torch.zeros_like(vx)
    for r0 in range(0, qd.shape[1], rows):
        sl = slice(r0, r0 + rows)
        ok = masks[0][coords[0][sl]][:, coords[0]]
        for m, c in zip(masks[1:], coords[1:]):
            ok = ok & m[c[sl]][:, c]
        s = torch.einsum("bqhd,bkhd->bhqk", qd[:, sl], kx) * scale
        s = s.masked_fill(~ok, -math.inf)
        lse[..., sl] = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., sl, None])
        del s
        o[:, sl] = torch.einsum("bhqk,bkhd->bqhd", p, vx)
        delta = (o[:, sl] * gd[:, sl]).sum(-1).transpose(1, 2) - wd[..., sl]  # (B, H, rows)
        dp = torch.einsum("bqhd,bkhd->bhqk", gd[:, sl], vx)
        dvx += torch.einsum("bhqk,bqhd->bkhd", p, gd[:, sl])
        ds = p * (dp - delta[..., None]) * scale
        del p, dp
        dq[:, sl] = torch.einsum("bhqk,bkhd->bqhd", ds, kx)
        dkx += torch.einsum("bhqk,bqhd->bkhd", ds, qd[:, sl])
    dk = dkx.unflatten(2, (-1, group)).sum(3)
    dv = dvx.unflatten(2, (-1, group)).sum(3)
    return [o.unflatten(1, tokens), lse, *(g.unflatten(1, tokens) for g in (dq, dk, dv))]


def _blockwise_sdpa(q, k, v, win, go, w, rows=4096):
    """Baseline: torch SDPA in q's dtype with the boolean window as an additive mask, run over
    query row blocks (rows are independent; dK/dV summed over blocks in fp32)."""
    tokens = q.shape[1:-2]
    mask = ops.neighborhood_mask(tokens, **win, device=q.device)
    qf, kf, vf = (t.flatten(1, -3) for t in (q, k, v))
    kf, vf = (t.detach().requires_grad_() for t in (kf, vf))
    gf = go.flatten(1, -3)
    outs, lses, dqs = [], [], []
    dk, dv = torch.zeros(kf.shape, device=q.device), torch.zeros(vf.shape, device=q.device)
    for r0 in range(0, qf.shape[1], rows):
        sl = slice(r0, r0 + rows)
        qb = qf[:, sl].detach().requires_grad_()
        bias = torch.zeros(mask[sl].shape, device=q.device).masked_fill(~mask[sl], -math.inf)
        o, lse = ops.sdpa_attention(qb, kf, vf, bias=bias, return_lse=True)
        loss = (o.double() * gf[:, sl]).sum() + (lse.double() * w[..., sl]).sum()
        gq, gk, gv = torch.autograd.grad(loss, (qb, kf, vf))
        outs.append(o.detach())
        lses.append(lse.detach())
        dqs.append(gq)
        dk += gk.float()
        dv += gv.float()
    grads = (torch.cat(dqs, 1), dk.to(q.dtype), dv.to(q.dtype))
    return [torch.cat(outs, 1).unflatten(1, tokens), torch.cat(lses, -1),
            *(g.unflatten(1, tokens) for g in grads)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b,tokens,ks",
    [(2, (128, 128), 13), (1, (32, 32, 32), 7)],
    ids=["2d-128x128-k13", "3d-32x32x32-k7"],
)
def test_gpu_nd_real_size_within_twice_sdpa_error(b, tokens, ks):
    """bf16 at training size vs a blockwise float64 reference; tolerance 2x the error of torch
    SDPA in bf16 with the same boolean mask. Deterministic."""
    q, k, v = make_nd(b, tokens, 8, 8, 64, dtype=torch.bfloat16)
    q, k, v = (t.cuda() for t in (q, k, v))
    go, w = (t.cuda() for t in upstream_nd(q))
    win = window(ks, 1, 1, False)
    ref = _blockwise_reference(q, k, v, win, go, w)
    base = _blockwise_sdpa(q, k, v, win, go, w)
    attn = ops.build("neighborhood", **win)
    got = run(attn, q, k, v, False, go, w)
    check_against_baseline(got, base, ref)
    again = run(attn, q, k, v, False, go, w)
    assert all(torch.equal(x, y) for x, y in zip(got, again))
