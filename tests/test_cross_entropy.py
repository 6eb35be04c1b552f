"""Fused linear + cross-entropy (ops.cross_entropy) against the PyTorch expression.

On the CPU the kernel runs in Triton's interpreter (fp32/fp16 only, tiny shapes); the `gpu` test
runs it compiled at GPT-2 small size under bf16 autocast.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models import GPT2Config, PosConfig, build_model
from ops import cross_entropy as ce
from ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_torch

needs_kernel = pytest.mark.skipif(
    not ce.fused_available("cpu"), reason="CPU kernel tests need TRITON_INTERPRET=1 (no GPU)"
)

# (rows, V, C, chunk_rows): ragged last chunks, V not a power of two, one row, chunk > rows,
# rows an exact multiple of the chunk
CASES = [(37, 1000, 24, 16), (1, 17, 8, None), (5, 300, 16, 64), (48, 129, 16, 16)]


def make(rows, v, c, dtype=torch.float32, seed=0, ignore=(), ignore_index=-100, device="cpu"):
    """h (rows, C), weight (V, C) with logits of std ~2, targets with some rows ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, c, generator=g)
    w = torch.randn(v, c, generator=g) * (2.0 / c**0.5)
    t = torch.randint(0, v, (rows,), generator=g)
    t[list(ignore)] = ignore_index
    return h.to(device, dtype), w.to(device, dtype), t.to(device)


def run(fn, h, w, t, g=2.5, **kw):
    """Loss and the gradients of g * loss (a non-unit upstream gradient) w.r.t. h and weight."""
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(h, w, t, **kw)
    return (loss, *torch.autograd.grad(loss * g, (h, w)))


def fp64_reference(h, w, t, ignore_index=-100):
    ref = lambda h, w, t: F.cross_entropy(h @ w.T, t, ignore_index=ignore_index)  # noqa: E731
    return run(ref, h.double(), w.double(), t)


def check_within_twice_torch(got, base, ref):
    """Each of loss, grad_h, grad_w within 2x the torch expression's error against float64,
    plus 1e-5 of the magnitude (both compute the loss in fp32)."""
    for name, x, y, r in zip(("loss", "grad_h", "grad_w"), got, base, ref):
        scale = r.abs().max().item()
        err = (x.double() - r).abs().max().item()
        tol = 2 * (y.double() - r).abs().max().item() + 1e-5 * scale
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"


# ----------------------------------------------------------------------------- numbers


@needs_kernel
@pytest.mark.parametrize("rows,v,c,chunk", CASES)
def test_fp32_matches_torch(rows, v, c, chunk):
    h, w, t = make(rows, v, c, ignore=range(0, rows, 7)[1:])
    got = run(linear_cross_entropy, h, w, t, chunk_rows=chunk)
    want = run(linear_cross_entropy_torch, h, w, t)
    assert got[0].shape == () and got[0].dtype == torch.float32
    assert got[1].dtype == got[2].dtype == torch.float32
    for name, x, y in zip(("loss", "grad_h", "grad_w"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


@needs_kernel
@pytest.mark.parametrize("rows,v,c,chunk", CASES[:2])
def test_fp16_within_twice_torch_error(rows, v, c, chunk):
    h, w, t = make(rows, v, c, torch.float16, seed=1, ignore=[0] if rows > 1 else [])
    got = run(linear_cross_entropy, h, w, t, chunk_rows=chunk)
    assert got[1].dtype == got[2].dtype == torch.float16 and got[0].dtype == torch.float32
    base = run(linear_cross_entropy_torch, h, w, t)
    check_within_twice_torch(got, base, fp64_reference(h, w, t))


@needs_kernel
def test_cpu_autocast_computes_in_the_autocast_dtype():
    """fp32 h and weight under fp16 autocast: logits in fp16 like F.linear's, fp32 gradients."""
    h, w, t = make(37, 1000, 24, seed=2, ignore=[3])
    with torch.autocast("cpu", dtype=torch.float16):
        got = run(linear_cross_entropy, h, w, t, chunk_rows=16)
        base = run(linear_cross_entropy_torch, h, w, t)
    assert got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], base[0], rtol=1e-5, atol=1e-5)
    ref = fp64_reference(h.half(), w.half(), t)  # both see the fp16-rounded inputs
    check_within_twice_torch(got, base, ref)


@needs_kernel
@pytest.mark.parametrize("block_v,reverse", [(128, True), (128, False), (1024, True)])
def test_kernel_multi_tile_rows(block_v, reverse):
    """Vocabulary tiles of 128 over V=1000 (7 full + 1 ragged): the online max/sum carries across
    tiles; targets in the first, the ragged and the last column; out-of-range targets give nan.
    block_v=1024 >= V: the one-pass path (whole row in registers), same results. The gradient
    pass in either tile order (reverse: last tile first) gives the same gradient."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 1000, generator=g) * 4
    logits[1, 900] = 30.0  # the max sits in the ragged tile
    t = torch.tensor([0, 999, 900, 5, -100, 1000])
    inv_n = torch.tensor(1.0 / 4)
    loss_rows = torch.empty(6)
    want_loss = F.cross_entropy(logits[:4], t[:4], reduction="none")
    want_grad = (torch.softmax(logits[:4], 1) - F.one_hot(t[:4], 1000)) / 4
    grad = logits.clone()
    ce._ce_rows(grad, t, loss_rows, inv_n, -100, True, block_v=block_v, num_warps=1,
                reverse=reverse)  # fmt: skip
    torch.testing.assert_close(loss_rows[:4], want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad[:4], want_grad, rtol=1e-6, atol=1e-8)
    assert loss_rows[4] == 0 and (grad[4] == 0).all()  # ignored row
    assert torch.isnan(loss_rows[5])  # target 1000 with V=1000
    # without write_grad the logits stay as they were; the losses are the same
    kept = logits.clone()
    ce._ce_rows(kept, t, loss_rows, inv_n, -100, False, block_v=block_v, num_warps=1)
    assert torch.equal(kept, logits)
    torch.testing.assert_close(loss_rows[:4], want_loss, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_custom_ignore_index():
    h, w, t = make(20, 50, 8, seed=4, ignore=[1, 2, 19], ignore_index=7)
    got = run(linear_cross_entropy, h, w, t, ignore_index=7, chunk_rows=8)
    want = run(linear_cross_entropy_torch, h, w, t, ignore_index=7)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("rows", [0, 9])
def test_all_rows_ignored_or_no_rows_is_nan_with_zero_grads(rows):
    """As PyTorch's mean reduction: 0 / 0 = nan loss, all gradients exactly zero."""
    h, w, t = make(rows, 40, 8, ignore=range(rows))
    got = run(linear_cross_entropy, h, w, t, chunk_rows=4)
    want = run(linear_cross_entropy_torch, h, w, t)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    for x, y in zip(got[1:], want[1:]):
        assert x.shape == y.shape and (x == 0).all() and (y == 0).all()


@needs_kernel
def test_tied_weight_gets_the_summed_gradient():
    """weight both embeds the tokens and projects to the vocabulary (GPT-2's tied LM head)."""
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(300, 16, generator=g) * 0.5
    p0 = torch.randn(16, 16, generator=g) * 0.3
    idx, t = torch.randint(0, 300, (2, 11), generator=g), torch.randint(0, 300, (2, 11))
    grads = []
    for fn, kw in ((linear_cross_entropy, dict(chunk_rows=8)), (linear_cross_entropy_torch, {})):
        w, p = w0.clone().requires_grad_(), p0.clone().requires_grad_()
        h = torch.tanh(F.embedding(idx, w) @ p)  # (B, T, C): 3-D h, 2-D targets
        loss = fn(h, w, t, **kw)
        grads.append((loss, *torch.autograd.grad(loss, (w, p))))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_frozen_weight_no_grad_and_chunk_sizes_agree(monkeypatch):
    h, w, t = make(37, 1000, 24, seed=6, ignore=[4])
    hh = h.clone().requires_grad_()
    (gh,) = torch.autograd.grad(linear_cross_entropy(hh, w, t, chunk_rows=16), hh)  # w frozen
    want = run(linear_cross_entropy_torch, h, w, t, g=1.0)
    torch.testing.assert_close(gh, want[1], rtol=1e-5, atol=1e-6)
    for chunk in (1, 7, 37, None):  # one row per chunk ... one chunk
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk_rows=chunk), want[0])
    # no grad mode: the loss only, the kernel's gradient pass and the grad GEMMs are skipped
    calls = []
    real = ce._ce_rows
    monkeypatch.setattr(ce, "_ce_rows", lambda *a: (calls.append(a[5]), real(*a))[1])
    with torch.no_grad():
        loss = linear_cross_entropy(h.requires_grad_(), w, t, chunk_rows=16)
    assert loss.grad_fn is None and calls == [False] * 3
    torch.testing.assert_close(loss, want[0])


@needs_kernel
def test_one_kernel_per_chunk_and_backward_only_scales(monkeypatch):
    calls = []
    real = ce._ce_rows
    monkeypatch.setattr(ce, "_ce_rows", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    h, w, t = make(37, 100, 8)
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, t, chunk_rows=16)
    assert calls == [(16, 100), (16, 100), (5, 100)]
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        (loss * 3.0).backward()
    assert len(calls) == 3 and h.grad is not None  # no kernel in the backward ...
    assert "mul" in seen and not {"mm", "addmm"} & set(seen), seen  # ... and no matmul


def test_default_chunk_rows():
    assert ce.default_chunk_rows(50304, torch.bfloat16) == 8192  # 824 MB of logits
    assert ce.default_chunk_rows(50304, torch.float32) == 4096
    assert ce.default_chunk_rows(10**9, torch.float32) == 16


# ----------------------------------------------------------------------------- torch.compile


@needs_kernel
def test_custom_op_registrations_pass_opcheck():
    """Schema, fake (meta) implementation and autograd registration, as torch.compile needs."""
    h, w, t = make(9, 50, 8, ignore=[2])
    h.requires_grad_(), w.requires_grad_()
    torch.library.opcheck(
        torch.ops.attnlab.linear_cross_entropy.default,
        (h, w, t, -100, 4, torch.float32, True, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@needs_kernel
def test_compiled_op_is_one_graph_and_matches_eager():
    def fn(h, w, t):
        return linear_cross_entropy(torch.tanh(h), w, t, chunk_rows=16) * 3.0

    h, w, t = make(37, 300, 16, seed=7, ignore=[0, 5])
    torch._dynamo.reset()
    got = run(torch.compile(fn, backend="aot_eager", fullgraph=True), h, w, t)
    want = run(fn, h, w, t)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def _gpt2(loss: str):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, d_model=32, loss=loss)
    return build_model(cfg, __import__("ops").build("sdpa"), PosConfig(name="rope"))


def _loss_and_grads(model, idx, y, module=None):
    loss = model(idx, y)
    names, params = zip(*(module or model).named_parameters())
    return loss, dict(zip(names, torch.autograd.grad(loss, params)))


@needs_kernel
def test_gpt2_fused_loss_matches_torch_loss_eager_and_compiled():
    """GPT-2 (V=50304, tied head) with model.loss=fused equals loss=torch: loss, every grad."""
    g = torch.Generator().manual_seed(8)
    idx, y = torch.randint(0, 50257, (2, 12), generator=g), torch.randint(0, 50257, (2, 12))
    y[0, :3] = -100  # ignore_index, as F.cross_entropy's default
    want = _loss_and_grads(_gpt2("torch"), idx, y)
    fused = _gpt2("fused")
    assert fused.lm_head.weight is fused.wte.weight
    torch._dynamo.reset()
    for model in (fused, torch.compile(fused, backend="aot_eager")):
        loss, grads = _loss_and_grads(model, idx, y, module=fused)
        torch.testing.assert_close(loss, want[0], rtol=1e-6, atol=1e-6)
        assert grads.keys() == want[1].keys()
        for name, gw in want[1].items():
            torch.testing.assert_close(grads[name], gw, rtol=1e-4, atol=1e-7, msg=name)
    logits = fused(idx)  # no targets: logits as before
    assert logits.shape == (2, 12, 50304)


def test_gpt2_loss_config(monkeypatch):
    """auto uses the torch expression off CUDA; fused raises where the kernel cannot run."""
    model = _gpt2("auto")
    x = torch.zeros(1, 2, 32)
    assert not model._fused_loss(x)
    assert _gpt2("fused")._fused_loss(x) and not _gpt2("torch")._fused_loss(x)
    with pytest.raises(ValueError, match="model.loss='fast'; valid: auto, torch, fused"):
        _gpt2("fast")
    monkeypatch.setattr(ce, "_INTERPRET", False)
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="needs triton and CUDA.*model.loss=auto/torch"):
        _gpt2("fused")(idx, idx)
    assert torch.isfinite(_gpt2("auto")(idx, idx))


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_argument_and_sizes(monkeypatch):
    h, w, t = make(6, 20, 8)
    bad = [
        (lambda: linear_cross_entropy(h[:, :5], w, t), r"h\(6, 5\) must end in C=8.*\(20, 8\)"),
        (lambda: linear_cross_entropy(h, w[0], t), r"weight must be \(V, C\); got weight\(8,\)"),
        (lambda: linear_cross_entropy(h, w, t.float()), "targets must be integer.*float32"),
        (lambda: linear_cross_entropy(h, w, t[:5]), "targets has 5 elements.*h\\(6, 8\\) has 6"),
        (lambda: linear_cross_entropy(h.double(), w.double(), t), "dtypes must be in.*float64"),
        (lambda: linear_cross_entropy(h, w, t, chunk_rows=0), "chunk_rows must be a positive"),
        (lambda: linear_cross_entropy(h, w.to("meta"), t), "one device"),
    ]
    for fn, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fn()
    monkeypatch.setattr(ce, "_INTERPRET", False)
    with pytest.raises(ValueError, match=r"needs triton and CUDA tensors.*got h on cpu"):
        linear_cross_entropy(h, w, t)
    assert torch.isfinite(linear_cross_entropy_torch(h, w, t))  # the fallback always runs


# ----------------------------------------------------------------------------- GPU, real size


@pytest.mark.gpu
def test_gpu_real_size_bf16_autocast_within_twice_torch_error():
    """GPT-2 small's head at 8192 rows under bf16 autocast vs float64 of the bf16-rounded inputs;
    tolerance 2x the torch expression's own error; and far less memory than the torch path."""
    h, w, t = make(8192, 50304, 768, seed=9, ignore=range(0, 8192, 97), device="cuda")
    ref = fp64_reference(h.bfloat16(), w.bfloat16(), t)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = run(linear_cross_entropy, h, w, t)
        torch.cuda.synchronize()
        fused_peak = torch.cuda.max_memory_allocated() - start
        torch.cuda.reset_peak_memory_stats()
        base = run(linear_cross_entropy_torch, h, w, t)
        torch.cuda.synchronize()
        torch_peak = torch.cuda.max_memory_allocated() - start
    assert got[1].dtype == got[2].dtype == torch.float32
    check_within_twice_torch(got, base, ref)
    assert fused_peak < 1.5 * 2**30 and fused_peak < torch_peak / 2, (fused_peak, torch_peak)


@pytest.mark.gpu
def test_gpu_row_kernel_tile_orders_agree():
    """The compiled row kernel on GPT-2's vocabulary (13 tiles of 4096, the last ragged): the
    gradient pass in reverse tile order writes exactly what the forward order writes, and both
    match softmax - onehot computed in fp32 from the same bf16 logits; an ignored row is zero."""
    g = torch.Generator(device="cuda").manual_seed(5)
    v = 50304
    logits = (3 * torch.randn(64, v, device="cuda", generator=g)).bfloat16()
    t = torch.randint(0, v, (64,), device="cuda", generator=g)
    t[3], t[7] = -100, v - 1  # an ignored row; a target in the ragged last tile
    inv_n = torch.tensor(1.0 / 63, device="cuda")
    out = {}
    for reverse in (False, True):
        grad, loss = logits.clone(), torch.empty(64, device="cuda")
        ce._ce_rows(grad, t, loss, inv_n, -100, True, reverse=reverse)
        out[reverse] = grad, loss
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    grad, loss = out[True]
    x, keep = logits.float(), t != -100
    want = (torch.softmax(x, 1) - F.one_hot(t.clamp_min(0), v)) / 63
    torch.testing.assert_close(grad[keep].float(), want[keep], rtol=1e-2, atol=1e-7)
    want_loss = F.cross_entropy(x[keep], t[keep], reduction="none")
    torch.testing.assert_close(loss[keep], want_loss, rtol=1e-5, atol=1e-5)
    assert (grad[3] == 0).all() and loss[3] == 0
