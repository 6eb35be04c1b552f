"""HyperAttention (ops/hyper.py) on the CPU: exactness limits, gradients, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

import ops

REF = ops.build("reference")


def qkv(b=2, n=64, h=4, hkv=4, d=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g)
    k = torch.randn(b, n, hkv, d, generator=g)
    v = torch.randn(b, n, hkv, d, generator=g)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def hyper(**kw):
    opts = dict(inner="reference", min_seq_len=16, block_size=8, sample_size=4, lsh_bits=3)
    return ops.build("hyper", **{**opts, **kw})


@pytest.mark.parametrize("causal", [False, True])
def test_below_min_seq_len_it_is_exact(causal):
    q, k, v = qkv(n=32)
    o, lse = hyper(min_seq_len=32)(q, k, v, causal=causal, return_lse=True)
    r, rl = REF(q, k, v, causal=causal, return_lse=True)
    torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, rl, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inner", ["reference", "flash"])
@pytest.mark.parametrize("n", [32, 31])
def test_causal_up_to_twice_min_seq_len_is_one_exact_call(inner, n, monkeypatch):
    """Causal attention whose halves are both within min_seq_len is exact (its recursion's
    three pieces are all exact): one call of the inner backend, no draws, equal to exact
    attention, through the plain and the fused (Triton core) paths."""
    from ops import hyper as H

    q, k, v = qkv(n=n, requires_grad=True)
    attn = hyper(min_seq_len=16, inner=inner)
    calls = []
    for name in ("_exact", "_flash", "_layout"):
        real = getattr(H._Hyper, name)
        monkeypatch.setattr(H._Hyper, name, lambda *a, real=real, name=name:
                            calls.append(name) or real(*a))  # fmt: skip
    o, lse = attn(q, k, v, causal=True, return_lse=True)
    r, rl = REF(q, k, v, causal=True, return_lse=True)
    assert calls == ["_exact"]
    torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, rl, rtol=1e-5, atol=1e-5)
    gq = torch.autograd.grad(o.sum(), q)[0]
    torch.testing.assert_close(gq, torch.autograd.grad(r.sum(), q)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lsh_bits", [0, 3])
@pytest.mark.parametrize(
    "n,hkv", [(64, 4), (60, 2), (66, 1)]
)  # short last block; GQA; 33: odd halves
def test_all_columns_sampled_is_exact_with_gradients(causal, lsh_bits, n, hkv):
    """sample_size >= the keys outside a block: every outside key is used once, so the block
    part + the 'sampled' part is the whole row, merged through the LSEs: exact attention, and
    autograd through the gathers and the merge gives exact attention's gradients."""
    q, k, v = qkv(n=n, hkv=hkv, requires_grad=True)
    attn = hyper(sample_size=10**6, lsh_bits=lsh_bits)
    o, lse = attn(q, k, v, causal=causal, return_lse=True)
    r, rl = REF(q, k, v, causal=causal, return_lse=True)
    torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, rl, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(o)
    got = torch.autograd.grad((o * g).sum() + lse.sum(), (q, k, v))
    want = torch.autograd.grad((r * g).sum() + rl.sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sampled_estimate_improves_with_samples_and_is_reproducible_by_seed():
    """With sampling on, the output estimates exact attention, better with more samples; a
    backend with the same seed replays the same hyperplanes and samples (bit-equal), another
    seed does not; state() and set_state() restore the stream."""
    q, k, v = qkv(n=256, d=16)
    r = REF(q, k, v)

    def err(samples):
        outs = [hyper(seed=s, sample_size=samples)(q, k, v) for s in range(4)]
        return sum(float((o - r).norm()) for o in outs) / len(outs)

    assert err(128) < 0.6 * err(4), (err(128), err(4))
    a, b, c = (
        hyper(seed=1, sample_size=32),
        hyper(seed=1, sample_size=32),
        hyper(seed=2, sample_size=32),
    )
    oa, ob, oc = a(q, k, v), b(q, k, v), c(q, k, v)
    assert torch.equal(oa, ob) and not torch.equal(oa, oc)
    state = a._fn.state()
    o1 = a(q, k, v)
    a._fn.set_state(state)
    assert torch.equal(a(q, k, v), o1)


@pytest.mark.parametrize("t", [77, 100, 127])
def test_causal_changing_future_tokens_changes_no_earlier_output(t):
    """Sampling on (8 columns per block), 128 tokens, recursion down to 16: tokens from t on
    are replaced; every output before t is unchanged (the draws are the same for the same
    seed and shapes, and a query's result depends on its own hash, not on other queries)."""
    q, k, v = qkv(n=128)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t:] = torch.randn_like(x[:, t:]) * 3
    o1 = hyper(seed=5, sample_size=8)(q, k, v, causal=True)
    o2 = hyper(seed=5, sample_size=8)(q2, k2, v2, causal=True)
    torch.testing.assert_close(o1[:, :t], o2[:, :t], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(o1[:, t:], o2[:, t:])


def test_gradients_through_the_sampled_path_are_finite_and_reach_everything():
    q, k, v = qkv(n=128, requires_grad=True)
    o, lse = hyper(sample_size=8)(q, k, v, causal=True, return_lse=True)
    (o.square().sum() + lse.sum()).backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bad_options_and_inputs():
    for kw, msg in [
        (dict(lsh_bits=-1), "lsh_bits=-1"),
        (dict(block_size=0), "block_size=0"),
        (dict(sample_size=1.5), "sample_size=1.5"),
        (dict(inner="hyper"), "inner backend must be exact"),
        (dict(lsh_bits=31), "at most 30"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ops.build("hyper", **kw)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="does not support: an additive attention bias"):
        ops.build("hyper").check(bias=True)
    with pytest.raises(ValueError, match="bias"):
        hyper()(q, k, v, bias=torch.zeros(1, 1, 64, 64))


@pytest.mark.parametrize("n", [64, 60])  # 60: the last key block overlaps its neighbour
@pytest.mark.parametrize("causal", [False, True])
def test_triton_inner_matches_the_reference_inner_with_gradients(causal, n, monkeypatch):
    """The default inner backend (the Triton core, interpreter here: flash for the exact parts,
    the gathered-attention kernels of ops/hyper_kernels.py for the sorted blocks + samples)
    against the plain PyTorch version of the same algorithm (gathers, reference attention, LSE
    merge) with the same draws: outputs, LSE and gradients, which flow through the
    differentiable LSEs into the merges."""
    from ops import hyper_kernels

    calls = []
    fused = hyper_kernels._forward  # the gathered forward, inside autograd or not
    monkeypatch.setattr(hyper_kernels, "_forward",
                        lambda *a, **kw: calls.append(1) or fused(*a, **kw))  # fmt: skip
    q, k, v = qkv(b=1, n=n, h=2, hkv=1, requires_grad=True)
    outs = []
    for inner in ("flash", "reference"):
        before = len(calls)
        o, lse = hyper(inner=inner, seed=3)(q, k, v, causal=causal, return_lse=True)
        assert (len(calls) > before) == (inner == "flash")  # the kernels ran, or did not
        g = torch.autograd.grad(o.square().sum() + lse.sum(), (q, k, v))
        outs.append((o, lse, *g))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_kernels_equal_the_gather_path_in_bf16():
    """On the GPU at a real size (16k tokens, D=128, causal, bf16): the Triton kernels (inner
    flash) against the PyTorch gather path (inner sdpa) with the same draws. Measured on an
    H100: relative differences 2.7e-3 (o), 7e-8 (LSE), 4-5e-3 (gradients), bf16 rounding; a
    wrong index, weight or merge gives O(1)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16384, 4, 128, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))  # fmt: skip
    go = torch.randn_like(q)
    res = {}
    for inner in ("flash", "sdpa"):
        o, lse = ops.build("hyper", inner=inner, seed=1)(q, k, v, causal=True, return_lse=True)
        g = torch.autograd.grad((o.float() * go.float()).sum() + lse.sum(), (q, k, v))
        res[inner] = (o, lse, *g)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), res["flash"], res["sdpa"]):
        rel = float((a.float() - b.float()).norm() / b.float().norm())
        assert rel < 2e-2, (name, rel)


@pytest.mark.parametrize("b,grad_kv", [(1, True), (2, True), (2, False)])
def test_causal_level_inputs_give_the_gradients_of_plain_slicing(b, grad_kv, monkeypatch):
    """The causal recursion's custom autograd step for the halves (no full-size zero-filled
    slice gradients) gives bit-identical gradients to slicing and reshaping by autograd, with
    the same draws; B=1 makes the top level's inputs non-contiguous views."""
    from ops import hyper as H

    torch.manual_seed(3)
    q = torch.randn(b, 64, 2, 16, requires_grad=True)
    k, v = (torch.randn(b, 64, 2, 16, requires_grad=grad_kv) for _ in range(2))
    g = torch.randn(b, 64, 2, 16)
    wrt = (q, k, v) if grad_kv else (q,)

    def grads():
        attn = hyper(min_seq_len=8, block_size=8, sample_size=4, seed=5)
        o, lse = attn(q, k, v, causal=True, return_lse=True)
        return torch.autograd.grad((o * g).sum() + lse.sum(), wrt)

    calls = []
    real = H._LevelInputs.apply
    monkeypatch.setattr(H._LevelInputs, "apply", lambda *a: calls.append(1) or real(*a))
    new = grads()
    assert len(calls) == 2  # levels at 64 and 32 tokens (16: two halves of 8, exact)

    def plain(q, k, v):
        bh, n, d = q.shape
        h = n // 2
        return (*(x.reshape(bh * 2, h, x.shape[-1]) for x in (q, k, v)),
                q[:, h:], k[:, :h], v[:, :h])  # fmt: skip

    monkeypatch.setattr(H, "_level_inputs", plain)
    old = grads()
    for a, c in zip(new, old):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,n", [(1, 64), (2, 64)])
def test_fused_causal_recursion_equals_the_recorded_one(dtype, b, n, monkeypatch):
    """The causal recursion as one autograd step (the Triton core; each level's non-causal
    gradients added into the halves' buffers in the kernels, fp16) against the same recursion
    recorded by autograd level by level, with the same draws: o, LSE and the gradients of all
    three inputs. With min_seq_len=8 the levels at 64 and 32 tokens are gathered, and the
    16-token pieces (two halves of 8) exact causal calls. fp16 rounds each sum once
    where the recorded path rounds twice: fp16 tolerance there."""
    from ops import hyper as H

    torch.manual_seed(4)
    q, k, v = (torch.randn(b, n, 2, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    g, gl = torch.randn(b, n, 2, 16), torch.randn(b, 2, n)

    def run():
        attn = hyper(inner="flash", min_seq_len=8, block_size=8, sample_size=4, seed=5)
        o, lse = attn(q, k, v, causal=True, return_lse=True)
        grads = torch.autograd.grad((o.float() * g).sum() + (lse * gl).sum(), (q, k, v))
        return o, lse, *grads

    calls = []
    real = H._CausalHyper.apply
    monkeypatch.setattr(H._CausalHyper, "apply", lambda *a: calls.append(1) or real(*a))
    fused = run()
    assert calls == [1]
    monkeypatch.setattr(H, "_FUSED_CAUSAL", False)
    recorded = run()
    assert calls == [1]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for name, x, y in zip(("o", "lse", "dq", "dk", "dv"), fused, recorded):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, **tol, msg=lambda e, name=name: f"{name}: {e}")
    monkeypatch.setattr(H, "_FUSED_CAUSAL", True)
    with torch.no_grad():  # without autograd: the same fused forward, nothing recorded
        attn = hyper(inner="flash", min_seq_len=8, block_size=8, sample_size=4, seed=5)
        o = attn(q, k, v, causal=True)
    torch.testing.assert_close(o, fused[0], rtol=0, atol=0)


def test_fused_causal_recursion_frees_its_record_and_says_so_on_a_second_backward():
    """The fused recursion drops its saved tensors during its backward (as autograd frees a
    node's), so a second backward through the same graph raises a clear error."""
    q, k, v = qkv(b=1, n=32, h=1, hkv=1, requires_grad=True)
    attn = hyper(inner="flash", min_seq_len=8, block_size=8, sample_size=4, seed=1)
    o = attn(q, k, v, causal=True)
    o.sum().backward(retain_graph=True)
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="retain_graph"):
        o.sum().backward()


def _gathered_reference(q, k, v, q_index, k_index, n_block, weight, scale):
    """Plain PyTorch for hyper_kernels.gathered_attention: per tile, a softmax over its key
    list (log weight added to the sampled columns' scores), rows written back to the queries."""
    bh, nq, _ = q.shape
    n_tiles = k_index.shape[1]
    rows = q_index.view(bh, n_tiles, -1)
    o = q.new_zeros(bh, nq + 1, v.shape[-1])
    lse = q.new_zeros(bh, nq + 1)
    shift = torch.zeros(k_index.shape[-1], dtype=q.dtype)
    shift[n_block:] = torch.log(torch.tensor(weight, dtype=q.dtype))
    for r in range(bh):
        for t in range(n_tiles):
            qi, ki = rows[r, t], k_index[r, t]
            q_pad = torch.cat([q[r], q.new_zeros(1, q.shape[-1])])
            s = q_pad[qi] @ k[r, ki].T * scale + shift
            lse_t = torch.logsumexp(s, -1)
            o = o.index_put((torch.full_like(qi, r), qi), torch.softmax(s, -1) @ v[r, ki])
            lse = lse.index_put((torch.full_like(qi, r), qi), lse_t)
    return o[:, :nq], lse[:, :nq]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("run_tiles", [8, 2])
def test_gathered_kernels_dk_dv_block_and_sampled_parts(dtype, run_tiles, monkeypatch):
    """The gathered kernels' o, LSE, dQ, dK, dV against autograd through the plain version, on
    a layout with everything the dK/dV split must get right: runs of tiles sharing one key
    list (summed in one program; split when longer than _RUN_TILES), the same list again
    later, a block overlapping another (keys in two blocks, as HyperAttention's last block),
    adjacent tiles with one block but other samples, repeated samples, samples that lie in
    blocks, keys only sampled, keys in nothing (zero gradient), partly and fully empty tiles.
    fp16 takes the cast path (fp32 sums -> dK, dV), fp32 the in-place one."""
    from ops import hyper_kernels

    monkeypatch.setattr(hyper_kernels, "_RUN_TILES", run_tiles)
    g = torch.Generator().manual_seed(0)
    bh, nk, d, rows, n_block = 2, 64, 16, 20, 20
    a, b, c = torch.arange(0, 20), torch.arange(12, 32), torch.arange(32, 52)  # b overlaps a
    # samples repeat, lie in blocks of one run (35, 22, 25: c, b; 35 in c's own list too), of
    # several (0, 5, 13), or in none (55, 56, 57: only sampled); 52-54 and 58-63: in no list
    s1 = torch.tensor([35, 35, 5, 55, 55, 55, 22])
    s2 = torch.tensor([56, 0, 0, 25, 57, 13, 13])
    lists = [(a, s1), (a, s1), (a, s1), (a, s2), (b, s2), (c, s1), (a, s1), (a, s1)]
    base = torch.stack([torch.cat(x) for x in lists])  # (8 tiles, 27 keys)
    perm, perm2 = (torch.randperm(nk, generator=g) for _ in range(2))  # keys in any order
    k_index = torch.stack([perm[base], perm2[base]])
    filled = [20, 20, 13, 20, 9, 17, 0, 5]  # rows with a query per tile; tile 6 is empty
    nq = sum(filled)
    q_index = torch.full((bh, len(lists) * rows), nq)
    for r in range(bh):
        order = torch.randperm(nq, generator=g)  # every query in exactly one tile
        at = 0
        for t, f in enumerate(filled):
            q_index[r, t * rows : t * rows + f] = order[at : at + f]
            at += f
    q = torch.randn(bh, nq, d, generator=g)
    k, v = (torch.randn(bh, nk, d, generator=g) for _ in range(2))
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    go, gl = torch.randn(bh, nq, d, generator=g), torch.randn(bh, nq, generator=g)
    o, lse = hyper_kernels.gathered_attention(q, k, v, q_index, k_index, n_block, 2.5, 0.3)
    got = torch.autograd.grad((o.float() * go).sum() + (lse * gl).sum(), (q, k, v))
    x64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, rl = _gathered_reference(*x64, q_index, k_index, n_block, 2.5, 0.3)
    want = torch.autograd.grad((ro * go).sum() + (rl * gl).sum(), x64)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for name, x, y in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *got), (ro, rl, *want)):
        torch.testing.assert_close(x.double(), y, **tol, msg=lambda e, name=name: f"{name}: {e}")
    # the same gradients added into given buffers (as the fused causal recursion does): rows
    # packed, a batch stride of their own; fp16 rounds each sum once (fp32 adds afterwards)
    with torch.no_grad():
        o2, l2 = hyper_kernels._forward(q, k, v, q_index, k_index, n_block, math.log(2.5), 0.3)
        base = [torch.randn(x.shape, generator=g).to(dtype) for x in (q, k, v)]
        bufs = [torch.zeros(x.shape[0], x.shape[1] + 3, x.shape[2], dtype=dtype)[:, 3:]
                for x in base]  # fmt: skip
        for buf, x in zip(bufs, base):
            buf.copy_(x)
        out = hyper_kernels._backward(go.to(dtype), gl, q, k, v, o2, l2, q_index, k_index,
                                      n_block, math.log(2.5), 0.3, out=bufs)  # fmt: skip
    assert all(a is b for a, b in zip(out, bufs))
    for name, x, y, z in zip(("dq", "dk", "dv"), bufs, base, got):
        torch.testing.assert_close(x.double(), y.double() + z.double(), **tol,
                                   msg=lambda e, name=name: f"{name} added: {e}")  # fmt: skip
    unused = perm[torch.tensor([52, 53, 54, *range(58, 64)])]
    for x in got[1:]:  # keys in no list get exactly zero; keys only sampled do not
        assert x.dtype == dtype and (x[0, unused] == 0).all() and x[0, perm[55]].any()


def test_under_torch_compile_it_runs_eagerly_with_the_same_draws():
    """Dynamo cannot trace the backend's torch.Generator nor the data-dependent tile count:
    under torch.compile the call runs eagerly (one deliberate graph break, ``_opaque``) and
    gives what eager gives with the same seed, sampled path and gradients included."""
    q, k, v = qkv(n=64, requires_grad=True)

    def step(attn, fn_of):
        out = fn_of(lambda q, k, v: attn(q, k, v, causal=True) * 2 + 1)(q, k, v)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        return out.detach(), grads

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = step(hyper(), lambda f: f)
    compiled = step(hyper(), lambda f: torch.compile(f, backend="aot_eager", fullgraph=False))
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert breaks and all("_opaque" in key for key in breaks), breaks
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b)
