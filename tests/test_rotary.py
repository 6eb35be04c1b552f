"""Fused rotary kernels (ops.rotary) against the PyTorch path of models.positions.

On the CPU the kernels run in Triton's interpreter (fp32/fp16 only, tiny shapes); the `gpu`
tests run them compiled at GPT-2 small size in bf16.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from models import PosConfig
from models.positions import CARoPE, RotaryPositions, apply_rotary
from ops import rotary
from ops.rotary import carope_qk, carope_qkv, rope_qk, rope_qkv

# (T, H, Hkv, D): ragged T (not multiples of the 16-token block), MHA / GQA / MQA, and D=24
# (pair count 12, padded to 16 lanes in the kernel).
CASES = [(1, 4, 4, 16), (17, 4, 2, 32), (33, 4, 1, 16), (70, 2, 2, 16), (17, 3, 1, 24)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3)}


def fused_qk(b, t, h, hkv, d, dtype, device="cpu", seed=0):
    """q, k as strided views of one fused (B, T, (H + 2 Hkv) D) projection, leaf-like."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, generator=g).to(device, dtype).requires_grad_()
    q = qkv[..., : h * d].unflatten(-1, (h, d))  # (B, T, H, D), stride (.., .., D, 1)
    k = qkv[..., h * d : (h + hkv) * d].unflatten(-1, (hkv, d))  # (B, T, Hkv, D)
    return qkv, q, k


def rope_tables(t, d, base=10000.0):
    """cos, sin (T, D/2) float32 of m * theta_i, computed in float64."""
    pos = torch.arange(t, dtype=torch.float64)
    theta = base ** (-torch.arange(d // 2, dtype=torch.float64) / (d // 2))
    phase = pos[:, None] * theta
    return phase.cos().float(), phase.sin().float()


def carope_ref(q, k, log_f):
    """The models.positions path: phase = cumsum(f ** i) in log_f's dtype, apply_rotary."""
    i = torch.arange(q.shape[-1] // 2, dtype=log_f.dtype, device=log_f.device)
    phase = torch.cumsum(torch.exp(log_f.unsqueeze(-1) * i), dim=1)  # (B, T, Hkv, D/2)
    cos, sin = phase.cos(), phase.sin()
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def random_log_f(b, t, hkv, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, hkv, generator=g) * 2.0
    return (-torch.log1p(F.softplus(z))).to(device).requires_grad_()


def grads(outs, inputs, seed=2):
    """Gradients of sum(out * g) for fixed random g (float64 g for float64 outputs)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs)


def assert_close(a, b, dtype, scale=1.0):
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(a.to(b.dtype), b, **tol)


# ----------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,h,hkv,d", CASES)
def test_rope_qk_matches_apply_rotary(t, h, hkv, d, dtype):
    qkv, q, k = fused_qk(2, t, h, hkv, d, dtype)
    cos, sin = rope_tables(t + 5, d)  # longer table: the first T rows are used
    qo, ko = rope_qk(q, k, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    assert qo.is_contiguous() and ko.is_contiguous()
    c, s = cos[None, :t, None], sin[None, :t, None]
    rq, rk = apply_rotary(q, c, s), apply_rotary(k, c, s)
    assert_close(qo, rq, dtype, scale=0.1)
    assert_close(ko, rk, dtype, scale=0.1)
    (got,) = grads((qo, ko), qkv)
    (want,) = grads((rq, rk), qkv)
    assert_close(got, want, dtype, scale=0.1)


def test_rope_qk_equals_rotary_positions_module():
    """Wiring check: RotaryPositions' (1, T, 1, D/2) angles go in unchanged."""
    pos = RotaryPositions(16, 10000.0, max_seq_len=64)
    _, q, k = fused_qk(1, 20, 4, 2, 16, torch.float32)
    cos, sin = pos.angles(20, "cpu")
    got = rope_qk(q, k, cos, sin)
    want = pos.rotate(q, k, layer=0, x=None, x0=None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    cos_full, sin_full = pos.cos_table, pos.sin_table  # (64, D/2), longer than T
    for a, b in zip(rope_qk(q, k, cos_full, sin_full), want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_rope_qk_block_sizes_agree():
    _, q, k = fused_qk(2, 33, 4, 2, 16, torch.float32)
    cos, sin = rope_tables(33, 16)
    a = rope_qk(q, k, cos, sin)
    b = rope_qk(q, k, cos, sin, block_t=4, num_warps=1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,h,hkv,d", CASES)
def test_rope_qkv_matches_rope_qk_and_writes_the_fused_gradient(t, h, hkv, d, dtype):
    qkv, q, k = fused_qk(2, t, h, hkv, d, dtype)
    v = qkv[..., (h + hkv) * d :].unflatten(-1, (hkv, d))
    cos, sin = rope_tables(t + 3, d)
    qo, ko, vo = rope_qkv(qkv, cos, sin, h, hkv)
    assert vo.shape == v.shape and vo.data_ptr() == v.data_ptr()  # v is a view, not a copy
    rq, rk = rope_qk(q, k, cos, sin)
    torch.testing.assert_close(qo, rq, rtol=0, atol=0)
    torch.testing.assert_close(ko, rk, rtol=0, atol=0)
    c, s = cos[None, :t, None], sin[None, :t, None]
    (got,) = grads((qo, ko, vo), qkv)
    (want,) = grads((apply_rotary(q, c, s), apply_rotary(k, c, s), v), qkv)
    assert_close(got, want, dtype, scale=0.1)


def test_rope_qkv_unused_outputs_get_zero_gradient():
    qkv, q, k = fused_qk(1, 9, 2, 1, 16, torch.float32)
    cos, sin = rope_tables(9, 16)
    qo, ko, vo = rope_qkv(qkv, cos, sin, 2, 1)
    (g,) = torch.autograd.grad(qo.sum(), qkv)
    (want,) = torch.autograd.grad(apply_rotary(q, cos[None, :, None], sin[None, :, None]).sum(),
                                  qkv)  # fmt: skip
    torch.testing.assert_close(g, want)
    assert g[..., 2 * 16 :].abs().max() == 0  # k and v columns
    (g,) = torch.autograd.grad(rope_qkv(qkv, cos, sin, 2, 1)[2].sum(), qkv)
    assert g[..., : 3 * 16].abs().max() == 0 and (g[..., 3 * 16 :] == 1).all()


def test_rotary_positions_split_rotate_triton_equals_torch():
    """The model's fused-qkv path (triton) against the PyTorch split + rotate path."""
    qkv, _, _ = fused_qk(2, 12, 4, 2, 16, torch.float32)
    outs = {}
    for kernel in ("torch", "triton"):
        pos = RotaryPositions(16, 10000.0, max_seq_len=32, kernel=kernel)
        o = pos.split_rotate(qkv, 4, 2, layer=0, x=None, x0=None)
        outs[kernel] = (o, grads(o, qkv))
    for a, b in zip(outs["triton"][0] + outs["triton"][1], outs["torch"][0] + outs["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- CARoPE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,h,hkv,d", CASES)
def test_carope_qk_matches_pytorch_path(t, h, hkv, d, dtype):
    qkv, q, k = fused_qk(2, t, h, hkv, d, dtype)
    log_f = random_log_f(2, t, hkv)
    qo, ko = carope_qk(q, k, log_f)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    rq, rk = carope_ref(q, k, log_f)  # fp32 phases, like the kernel
    assert_close(qo, rq, dtype)
    assert_close(ko, rk, dtype)
    # gradients against autograd in float64 from the same (rounded) inputs
    got = grads((qo, ko), (qkv, log_f))
    qkv64 = qkv.detach().double().requires_grad_()
    log_f64 = log_f.detach().double().requires_grad_()
    q64 = qkv64[..., : h * d].unflatten(-1, (h, d))
    k64 = qkv64[..., h * d : (h + hkv) * d].unflatten(-1, (hkv, d))
    want = grads(carope_ref(q64, k64, log_f64), (qkv64, log_f64))
    assert_close(got[0], want[0], dtype)
    # d log_f sums O(T * D) terms of size |phase| <= T: scale the tolerance by its largest entry
    err = (got[1].double() - want[1]).abs().max() / want[1].abs().max().clamp_min(1.0)
    assert err < (1e-5 if dtype == torch.float32 else 1e-3), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,h,hkv,d", CASES[1:4])
def test_carope_qkv_matches_carope_qk_and_writes_the_fused_gradient(t, h, hkv, d, dtype):
    qkv, q, k = fused_qk(2, t, h, hkv, d, dtype)
    v = qkv[..., (h + hkv) * d :].unflatten(-1, (hkv, d))
    log_f = random_log_f(2, t, hkv)
    qo, ko, vo = carope_qkv(qkv, log_f, h, hkv)
    assert vo.data_ptr() == v.data_ptr() and vo.shape == v.shape
    rq, rk = carope_qk(q, k, log_f)
    torch.testing.assert_close(qo, rq, rtol=0, atol=0)
    torch.testing.assert_close(ko, rk, rtol=0, atol=0)
    # same arithmetic as carope_qk (whose gradients test_carope_qk_matches_pytorch_path checks
    # against float64): equal to the bit, v's gradient included
    got = grads((qo, ko, vo), (qkv, log_f))
    want = grads((rq, rk, v), (qkv, log_f))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_carope_split_rotate_triton_equals_torch():
    """CARoPE's fused-qkv path (triton) against the PyTorch split + rotate path, W != 0."""
    cfg = PosConfig(name="carope")
    qkv, _, _ = fused_qk(2, 12, 4, 2, 16, torch.float32)
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(5)).requires_grad_()
    outs = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        pos = CARoPE(PosConfig(**{**cfg.__dict__, "kernel": kernel}), d_model=32, n_kv_heads=2,
                     head_dim=16, n_layers=1)  # fmt: skip
        torch.nn.init.normal_(pos.proj[0].weight, std=0.3)
        o = pos.split_rotate(qkv, 4, 2, layer=0, x=x, x0=x)
        outs[kernel] = (o, grads(o, (qkv, x, pos.proj[0].weight)))
    for a, b in zip(outs["triton"][0] + outs["triton"][1], outs["torch"][0] + outs["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_carope_qk_block_sizes_agree_and_carry_across_blocks():
    """block_t=4 means many carried prefixes/suffixes; results agree with one big block."""
    qkv, q, k = fused_qk(1, 19, 2, 1, 16, torch.float32)
    log_f = random_log_f(1, 19, 1)
    outs = []
    for bt in (4, 32):
        qo, ko = carope_qk(q, k, log_f, block_t=bt)
        outs.append((qo, ko, *grads((qo, ko), (qkv, log_f))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_carope_qk_equals_carope_module():
    """Wiring check: log_f from CARoPE's projection gives CARoPE.rotate, gradients to W too."""
    torch.manual_seed(3)
    pos = CARoPE(PosConfig(name="carope"), d_model=8, n_kv_heads=2, head_dim=16, n_layers=1)
    with torch.no_grad():
        pos.proj[0].weight.normal_(0, 0.5)
    x = torch.randn(2, 21, 8)
    qkv, q, k = fused_qk(2, 21, 4, 2, 16, torch.float32)
    want = pos.rotate(q, k, layer=0, x=x, x0=x)
    gw_want = grads(want, (qkv, pos.proj[0].weight))
    log_f = -torch.log1p(F.softplus(pos.proj[0](x)))  # (B, T, Hkv)
    got = carope_qk(q, k, log_f)
    gw_got = grads(got, (qkv, pos.proj[0].weight))
    for a, b in zip((*got, *gw_got), (*want, *gw_want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_carope_at_rope_frequencies_is_rope_from_one():
    """f = base^(-2/D) for every token: phase (m+1) theta_i, i.e. rope with tables shifted by 1."""
    t, d = 40, 16
    _, q, k = fused_qk(1, t, 2, 2, d, torch.float32)
    log_f = torch.full((1, t, 2), -2.0 / d * math.log(10000.0))
    cos, sin = rope_tables(t + 1, d)
    got = carope_qk(q, k, log_f)
    want = rope_qk(q, k, cos[1:], sin[1:])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- launches, errors


def test_launches_per_pass(monkeypatch):
    calls = []
    real = rotary._launch
    monkeypatch.setattr(rotary, "_launch", lambda kernel, *a, **kw: (calls.append(kernel), real(kernel, *a, **kw))[1])  # fmt: skip
    qkv, q, k = fused_qk(1, 5, 2, 1, 16, torch.float32)
    cos, sin = rope_tables(5, 16)
    grads(rope_qk(q, k, cos, sin), qkv)
    assert calls == [rotary._rope_kernel, rotary._rope_kernel]
    calls.clear()
    grads(rope_qkv(qkv, cos, sin, 2, 1), qkv)  # backward: no separate concatenation launch
    assert calls == [rotary._rope_kernel, rotary._rope_qkv_bwd_kernel]
    calls.clear()
    grads(carope_qk(q, k, random_log_f(1, 5, 1)), qkv)
    # CARoPE: a light carry scan, then every token block in parallel (and a light suffix pass)
    fwd = [rotary._carope_carry_kernel, rotary._carope_fwd_kernel]
    assert calls == fwd + [rotary._carope_bwd_kernel, rotary._carope_suffix_kernel]
    calls.clear()
    grads(carope_qkv(qkv, random_log_f(1, 5, 1), 2, 1), qkv)
    assert calls == fwd + [rotary._carope_qkv_bwd_kernel, rotary._carope_suffix_kernel]


def test_empty_sequence():
    qkv, q, k = fused_qk(2, 0, 2, 1, 16, torch.float32)
    qo, ko = carope_qk(q, k, torch.zeros(2, 0, 1))
    assert qo.shape == (2, 0, 2, 16) and ko.shape == (2, 0, 1, 16)
    qo, ko = rope_qk(q, k, *rope_tables(4, 16))
    assert qo.shape == (2, 0, 2, 16)


def test_errors(monkeypatch):
    q, k = torch.randn(1, 4, 4, 16), torch.randn(1, 4, 2, 16)
    cos, sin = rope_tables(4, 16)
    log_f = torch.zeros(1, 4, 2)
    bad = [
        (lambda: rope_qk(torch.randn(1, 4, 4, 15), torch.randn(1, 4, 2, 15), cos, sin), "even"),
        (lambda: carope_qk(torch.randn(1, 4, 1, 258), torch.randn(1, 4, 1, 258), log_f), "256"),
        (lambda: rope_qk(q, torch.randn(1, 5, 2, 16), cos, sin), "agree"),
        (lambda: rope_qk(q, torch.randn(1, 4, 3, 16), cos, sin), "multiple"),
        (lambda: rope_qk(q, k.half(), cos, sin), "dtype"),
        (lambda: rope_qk(q.double(), k.double(), cos, sin), "dtype"),
        (lambda: rope_qk(q[0], k[0], cos, sin), "B, T, H, D"),
        (lambda: rope_qk(q, k, cos[:3], sin[:3]), "fewer than T=4"),
        (lambda: rope_qk(q, k, cos.double(), sin), "float32"),
        (lambda: rope_qk(q, k, cos[:, :4], sin), "shape"),
        (lambda: rope_qk(q, k, cos.requires_grad_(), sin), "no gradient"),
        (lambda: carope_qk(q, k, log_f[..., :1]), "shape"),
        (lambda: carope_qk(q, k, log_f.half()), "float32"),
        (lambda: carope_qk(q, k, log_f, block_t=12), "power of two"),
        (lambda: rope_qk(q, k, *rope_tables(4, 16), num_warps=3), "num_warps"),
        (lambda: rope_qkv(torch.randn(1, 4, 70), cos, sin, 2, 1), "n_head=2, n_kv=1"),
        (lambda: rope_qkv(q, cos, sin, 2, 1), "qkv"),
        (lambda: rope_qkv(torch.randn(1, 4, 64), cos[:3], sin[:3], 2, 1), "fewer than T=4"),
        (lambda: carope_qkv(torch.randn(1, 4, 64), log_f, 2, 1), "shape"),
        (lambda: carope_qkv(torch.randn(1, 4, 62), log_f, 2, 2), "n_head=2, n_kv=2"),
    ]
    for fn, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fn()
    import ops.launch

    monkeypatch.setattr(ops.launch, "_INTERPRET", False)  # as without the interpreter
    with pytest.raises(ValueError, match="CUDA"):
        carope_qk(q, k, log_f)


# ----------------------------------------------------------------------------- GPU, real size


def _gpu_case(hkv):
    b, t, h, d = 32, 1024, 12, 64
    qkv, q, k = fused_qk(b, t, h, hkv, d, torch.bfloat16, device="cuda")
    return qkv, q, k, (b, t, h, hkv, d)


@pytest.mark.gpu
@pytest.mark.parametrize("hkv", [12, 4])
def test_rope_qk_gpu_bf16(hkv):
    qkv, q, k, (b, t, h, hkv, d) = _gpu_case(hkv)
    cos, sin = (x.cuda() for x in rope_tables(t, d))
    got = rope_qk(q, k, cos, sin)
    c, s = cos[None, :, None], sin[None, :, None]
    want = (apply_rotary(q, c, s), apply_rotary(k, c, s))
    for a, w in zip((*got, *grads(got, qkv)), (*want, *grads(want, qkv))):
        torch.testing.assert_close(a, w, rtol=1e-2, atol=1e-2)
    v = qkv[..., (h + hkv) * d :].unflatten(-1, (hkv, d))
    got = rope_qkv(qkv, cos, sin, h, hkv)
    want = (apply_rotary(q, c, s), apply_rotary(k, c, s), v)
    for a, w in zip((*got, *grads(got, qkv)), (*want, *grads(want, qkv))):
        torch.testing.assert_close(a, w, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hkv", [12, 4])
def test_carope_qk_gpu_bf16(hkv):
    qkv, q, k, (b, t, h, hkv, d) = _gpu_case(hkv)
    log_f = random_log_f(b, t, hkv, device="cuda")
    got = carope_qk(q, k, log_f)
    want = carope_ref(q, k, log_f)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=2e-2, atol=2e-2)
    g_got, g_want = grads(got, (qkv, log_f)), grads(want, (qkv, log_f))
    torch.testing.assert_close(g_got[0], g_want[0], rtol=2e-2, atol=2e-2)
    err = (g_got[1] - g_want[1]).abs().max() / g_want[1].abs().max()
    assert err < 2e-3, err


@pytest.mark.gpu
@pytest.mark.parametrize("pos_name", ["rope", "carope"])
def test_compiled_model_gradients_equal_eager_gpu(pos_name):
    """torch.compile around the Triton rotary paths (user kernels inside autograd Functions,
    the fused qkv gradient) must give eager's loss and gradients: a kernel whose writes
    Inductor misreads returns stale memory only when compiled."""
    import ops
    from models import GPT2Config, build_model

    torch.manual_seed(0)
    cfg = GPT2Config(name="nano", n_layer=2, n_head=4, d_model=128, max_seq_len=256,
                     loss="torch")  # fmt: skip
    model = build_model(cfg, ops.build("sdpa"), PosConfig(name=pos_name, kernel="triton")).cuda()
    idx = torch.randint(0, 50257, (4, 257), device="cuda")
    results = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for fn in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        for _ in range(2):  # the second call runs the compiled graph warm
            model.zero_grad(set_to_none=True)
            loss = fn(idx[:, :-1], idx[:, 1:])
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    # one graph: the kernel launches are captured, not broken at (ops.launch)
    assert not torch._dynamo.utils.counters["graph_break"], dict(
        torch._dynamo.utils.counters["graph_break"]
    )
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-4)
    for a, b in zip(g1, g0):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
