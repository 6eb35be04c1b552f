"""Triton flash attention ("flash") against ops.reference_attention: output, LSE, gradients.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), with 16x16
tiles unless a test binds others, so shapes stay tiny; the `gpu` test runs at real size.
Every loss also uses the LSE (sum(lse * w)), so the differentiable-LSE backward is checked.
"""

import pytest
import torch

import ops

# (id, B, Nq, Nk, H, Hkv, D, causal, build options); 16x16 tiles unless options say otherwise
CASES = [
    ("n1", 1, 1, 1, 2, 2, 16, False, {}),
    ("n1-sees-all-causal", 1, 1, 5, 2, 1, 16, True, {}),
    ("ragged17-mha-causal", 2, 17, 17, 2, 2, 16, True, {}),
    ("aligned32-gqa-causal", 1, 32, 32, 4, 2, 32, True, {}),
    ("ragged33-gqa", 1, 33, 33, 4, 2, 32, False, {}),
    ("70-mqa-causal", 1, 70, 70, 4, 1, 16, True, {}),
    ("q<k-gqa-causal", 1, 17, 45, 4, 2, 16, True, {}),
    ("q<k-offset14-causal", 1, 19, 33, 2, 2, 16, True, {}),  # 14: last key of a 16-tile
    ("q>k-mqa-causal-dead-rows", 1, 45, 17, 2, 1, 32, True, {}),
    ("q>k", 1, 33, 20, 2, 2, 16, False, {}),
    ("tiles32x16-q<k-causal", 1, 40, 57, 2, 1, 16, True, {"block_m": 32, "block_n": 16}),
    ("tiles16x32-q>k-causal", 1, 57, 40, 2, 2, 16, True, {"block_m": 16, "block_n": 32}),
    ("d64-mqa-causal", 1, 24, 24, 2, 1, 64, True, {}),
]


def make_qkv(b, nq, nk, h, hkv, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, nq, h, d), (b, nk, hkv, d), (b, nk, hkv, d))
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def run(attn, q, k, v, causal, go, w, scale=None):
    """[out, lse, dq, dk, dv] for loss = sum(out * go) + sum(lse * w) over rows that see keys."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = attn(q, k, v, causal=causal, scale=scale, return_lse=True)
    live = torch.isfinite(lse)
    loss = (out.double() * go).sum() + (lse.double().masked_fill(~live, 0) * w).sum()
    return [out, lse, *torch.autograd.grad(loss, (q, k, v))]


def targets(q, k, v, causal, seed=1, scale=None):
    """Upstream grads (go, w) and the float64 reference results on the same inputs."""
    g = torch.Generator().manual_seed(seed)
    b, nq, h, d = q.shape
    go = torch.randn((b, nq, h, d), generator=g, dtype=torch.float64).to(q.device)
    w = torch.randn((b, h, nq), generator=g, dtype=torch.float64).to(q.device)
    ref = run(ops.reference_attention, *(t.double() for t in (q, k, v)), causal, go, w, scale)
    return go, w, ref


def max_err(x, ref):
    """Max |x - ref| over entries where ref is finite (LSE of dead rows is -inf in both)."""
    live = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), live)
    return (x.double() - ref)[live].abs().max().item() if live.any() else 0.0


def check_against_baseline(got, base, ref):
    """Each of out, lse, dq, dk, dv within 2x the baseline's own error against float64.
    The floor (1e-5 of the magnitude) covers LSE, which both compute in fp32 to ~1e-7."""
    for name, x, y, r in zip(("out", "lse", "dq", "dk", "dv"), got, base, ref):
        scale = r[torch.isfinite(r)].abs().max().item()
        err, tol = max_err(x, r), 2 * max_err(y, r) + 1e-5 * scale
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_matches_reference(case):
    """fp32: accumulation error here is ~1e-6; 1e-5 fails TF32 dots (~1e-3) or a wrong mask."""
    _, b, nq, nk, h, hkv, d, causal, options = case
    q, k, v = make_qkv(b, nq, nk, h, hkv, d, seed=nq + 7 * nk + d)
    go, w, ref = targets(q, k, v, causal)
    got = run(ops.build("flash", **options), q, k, v, causal, go, w)
    assert got[0].shape == (b, nq, h, d) and got[0].dtype == torch.float32
    assert got[1].shape == (b, h, nq) and got[1].dtype == torch.float32
    for name, x, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "b,nq,nk,h,hkv,d,causal",
    [(1, 33, 33, 4, 2, 32, True), (2, 70, 70, 2, 1, 16, False), (1, 45, 17, 2, 1, 32, True)],
)
def test_fp16_within_twice_torch_error(b, nq, nk, h, hkv, d, causal):
    """fp16 vs the float64 reference of the fp16 inputs, tolerance from torch's fp16 SDPA."""
    q, k, v = make_qkv(b, nq, nk, h, hkv, d, dtype=torch.float16, seed=nq + d)
    go, w, ref = targets(q, k, v, causal)
    got = run(ops.build("flash"), q, k, v, causal, go, w)
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float32
    check_against_baseline(got, run(ops.sdpa_attention, q, k, v, causal, go, w), ref)


def test_custom_scale_and_public_function():
    q, k, v = make_qkv(1, 20, 20, 2, 1, 16, seed=3)
    go, w, ref = targets(q, k, v, True, scale=0.37)
    got = run(ops.flash_attention, q, k, v, True, go, w, scale=0.37)
    for x, r in zip(got, ref):
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-5)


def test_strided_views_read_in_place():
    """Views of one fused (B, N, (H + 2*Hkv) * D) projection and a (B, H, N, D) transposed
    layout give exactly the results of contiguous copies; grads reach the fused tensor."""
    b, n, h, hkv, d = 2, 19, 4, 2, 16
    torch.manual_seed(0)
    fused = torch.randn(b, n, (h + 2 * hkv) * d, requires_grad=True)
    q, k, v = (t.unflatten(-1, (-1, d)) for t in fused.split([h * d, hkv * d, hkv * d], -1))
    assert not q.is_contiguous() and q.stride() == (n * (h + 2 * hkv) * d, (h + 2 * hkv) * d, d, 1)
    attn = ops.build("flash")
    go, w = torch.randn(b, n, h, d), torch.randn(b, h, n)
    out, lse = attn(q, k, v, causal=True, return_lse=True)
    (out * go).sum().add((lse * w).sum()).backward()
    want = run(attn, q.contiguous(), k.contiguous(), v.contiguous(), True, go.double(), w.double())
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    assert torch.equal(fused.grad, torch.cat([g.flatten(2) for g in want[2:]], -1))

    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert qt.stride(1) == d and qt.stride(2) == n * d  # heads outermost in memory
    got = run(attn, qt, kt, vt, True, go.double(), w.double())
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.parametrize("nq,nk,causal", [(37, 37, True), (20, 45, True), (33, 18, False)])
def test_tma_forward_equals_pointer_forward(nq, nk, causal):
    """The tensor-descriptor forward (aligned layouts) and the pointer forward give the same
    outputs and gradients, causal bottom-right with ragged and unequal lengths; and the
    descriptor path is the one that runs for these contiguous inputs."""
    from ops import flash

    q, k, v = make_qkv(1, nq, nk, 4, 2, 16, seed=nq + nk)
    assert flash._tma_ok(q, k, v) and not flash._tma_ok(q[..., ::2])
    go, w, _ = targets(q, k, v, causal)
    tma = run(ops.build("flash", tma=True), q, k, v, causal, go, w)
    ptr = run(ops.build("flash", tma=False), q, k, v, causal, go, w)
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), tma, ptr):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=name)


def test_lse_only_loss_and_output_only():
    """A loss on the LSE alone (no dO) and a call without return_lse both get true gradients."""
    q, k, v = make_qkv(1, 21, 30, 2, 1, 16, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    attn = ops.build("flash")
    _, lse = attn(q, k, v, causal=True, return_lse=True)
    _, ref_lse = ops.reference_attention(qd, kd, vd, causal=True, return_lse=True)
    got = torch.autograd.grad(lse.sum(), (q, k, v))
    want = torch.autograd.grad(ref_lse.sum(), (qd, kd, vd), allow_unused=True)
    assert want[2] is None and (got[2] == 0).all()  # the LSE does not depend on v
    for x, r in zip(got[:2], want[:2]):
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-5)
    out = attn(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = ops.reference_attention(qd, kd, vd, causal=True)
    want = torch.autograd.grad(ref.square().sum(), (qd, kd, vd))
    for x, r in zip(got, want):
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-5)


def test_dead_rows_zero_output_minus_inf_lse_zero_grad():
    """Causal with Nq > Nk: the first Nq - Nk query rows see no key."""
    q, k, v = make_qkv(1, 37, 5, 2, 2, 16, seed=2)
    q.requires_grad_()
    out, lse = ops.build("flash")(q, k, v, causal=True, return_lse=True)
    dead = 37 - 5
    assert (out[:, :dead] == 0).all() and (out[:, dead:] != 0).all()
    assert torch.isneginf(lse[..., :dead]).all() and torch.isfinite(lse[..., dead:]).all()
    (dq,) = torch.autograd.grad(out.sum() + lse[..., dead:].sum(), q)
    assert (dq[:, :dead] == 0).all() and torch.isfinite(dq).all() and (dq[:, dead:] != 0).any()


def test_errors_name_the_problem():
    attn = ops.build("flash")
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16)
    with pytest.raises(ValueError, match="bias"):
        attn(q, k, v, bias=torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"head dim must be one of \(16, 32, 64, 128\); got 24"):
        attn(*make_qkv(1, 8, 8, 2, 2, 24))
    with pytest.raises(ValueError, match="Dv == D; got Dv=32, D=16"):
        attn(q, k, torch.randn(1, 8, 2, 32))
    with pytest.raises(ValueError, match="float64"):
        attn(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="sequences"):
        attn(*(t.reshape(1, 2, 4, 2, 16) for t in (q, k, v)))
    with pytest.raises(ValueError, match="positive scale; got scale=-0.5"):
        attn(q, k, v, scale=-0.5)
    with pytest.raises(ValueError, match="'neighborhood' needs a positive scale; got scale=0.0"):
        ops.build("neighborhood", kernel_size=3)(q, k, v, scale=0.0)
    with pytest.raises(ValueError, match=r"block_m=48.*\(16, 32, 64, 128, 256\)"):
        ops.build("flash", block_m=48)
    with pytest.raises(ValueError, match="num_warps=3"):
        ops.build("flash", num_warps=3)
    with pytest.raises(ValueError, match="unknown option.*valid options: block_m, block_n"):
        ops.build("flash", window=3)
    with pytest.raises(ValueError, match="head_dim 96.*additive attention bias"):
        attn.check(head_dim=96, bias=True)
    attn.check(head_dim=64, n_heads=8, n_kv_heads=2, dtype=torch.bfloat16, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,hkv,d,causal", [(torch.bfloat16, 2, 64, True), (torch.float16, 8, 128, False)]
)
def test_gpu_real_size_within_twice_sdpa_error(dtype, hkv, d, causal):
    """Compiled kernels at training size with default tiles vs float64, tolerance 2x torch
    SDPA's own error in the same dtype; the backward is deterministic (no atomics)."""
    q, k, v = make_qkv(2, 1024, 1024, 8, hkv, d, dtype=dtype, device="cuda")
    go, w, ref = targets(q, k, v, causal)
    attn = ops.build("flash")
    got = run(attn, q, k, v, causal, go, w)
    check_against_baseline(got, run(ops.sdpa_attention, q, k, v, causal, go, w), ref)
    again = run(attn, q, k, v, causal, go, w)
    assert all(torch.equal(x, y) for x, y in zip(got, again))


def test_gpt2_with_flash_matches_sdpa():
    """The backend from config inside the model: same logits and gradients as sdpa (fp32)."""
    from models import GPT2Config, PosConfig, build_model

    torch.manual_seed(5)
    cfg = GPT2Config(n_layer=1, n_head=2, n_kv_head=1, d_model=32)
    ref = build_model(cfg, ops.build("sdpa"), PosConfig(name="rope"))
    ours = build_model(cfg, ops.build("flash"), PosConfig(name="rope"))
    ours.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 50257, (2, 19))
    la, lb = ref(idx, idx), ours(idx, idx)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(la, list(ref.parameters()))
    gb = torch.autograd.grad(lb, list(ours.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_tma_option_auto_by_launch_size():
    """tma=None uses descriptors only for launches that repay their host time; True/False force;
    anything else is refused by the builders."""
    from ops import flash

    big, small = flash._TMA_MIN_SCORES, flash._TMA_MIN_SCORES - 1
    assert flash._want_tma({"tma": None}, big) and not flash._want_tma({"tma": None}, small)
    assert flash._want_tma({"tma": True}, 1) and not flash._want_tma({"tma": False}, big)
    for name in ("flash", "neighborhood"):
        ops.build(name, tma=None)
        with pytest.raises(ValueError, match="tma"):
            ops.build(name, tma="yes")


def test_no_tensor_descriptors_under_torch_compile():
    """Under torch.compile the forward takes the pointer path (Inductor launches the kernel,
    and its handling of tensor-descriptor arguments has not run on a GPU); eager keeps the
    option."""
    from ops import flash

    def want(x):
        return x + int(flash._want_tma({"tma": True}, 1 << 30))

    assert want(torch.zeros(())).item() == 1
    assert torch.compile(want, backend="eager")(torch.zeros(())).item() == 0
