"""Fused windowed cascaded group attention (EfficientViT's CGA) for inference, in Triton.

One program per (image, window) runs every head of one CGA layer on one ``ws`` x ``ws`` window
(the map zero-padded at the bottom/right to a multiple of the window, as the published model
does): it reads the window's channels straight from the (B, C, H, W) input (any memory format,
through strides) and writes ``relu(concat_i out_i)`` in the same layout, valid tokens only.
For head i::

    feat  = split_i(x) + out_{i-1}                  (feat_0 = split_0)
    q,k,v = feat @ W_i + b_i                         (the head's 1x1 conv, BN folded)
    q     = depthwise_conv_{K_i}(q) inside the window (zero padding at the window's edges)
    out_i = softmax(q k^T * scale + bias_i) v         (bias_i: the head's (N, N) offset table)

The depthwise convolution is K_i^2 shifted copies of q taken by ``tl.gather`` across the
window's tokens (no memory round trip); the rest are small tensor-core dots. Nothing of the
layer but its input and output touches memory, where the per-head PyTorch path reads and writes
every intermediate (window copies, q/k/v, the score matrices) and launches ~10 kernels a head.
The output projection (a 1x1 conv over all heads) stays a cuBLAS/cuDNN call.

Rounding follows the per-head path under fp16/bf16 autocast: feat, q, k, v, the convolved q
and each head's output are rounded to the activation dtype where that path stores them; scores,
softmax and accumulation are fp32. fp32 inputs compute with fp32 dots (``ieee``).

Forward only: the model uses it in its inference copy (``EfficientViT.fuse_bn``); training goes
through the per-head path and the ``ops`` attention backends.
"""

from __future__ import annotations

import math

import torch

from ops.launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - no triton
    triton = tl = None

MAX_HEADS = 4  # the published variants have 2-4 heads per stage
MAX_WINDOW = 8  # T = next power of two of window**2 tokens in one program (64 for 7x7)

if triton is not None:

    @triton.jit
    def _head(x_ptr, out_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, wdw_ptr,
              bdw_ptr, bias_ptr, prev, h: tl.constexpr, KS: tl.constexpr, x_base, o_base,
              sxc, soc, tok_off_x, tok_off_o, in_map, t, wy, wx, scale_log2e,
              KK: tl.constexpr, N: tl.constexpr, T: tl.constexpr, WS: tl.constexpr, CS: tl.constexpr,
              CP: tl.constexpr, KD: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        """One head on one window: returns its output (T, CP) rounded to the activation
        dtype (as fp32), after writing relu of it to ``out`` at the window's map tokens."""
        dt = x_ptr.dtype.element_ty
        c = tl.arange(0, CP)
        d = tl.arange(0, KD)
        cmask = c < CS
        xs = tl.load(x_base + (h * CS + c)[None, :] * sxc + tok_off_x[:, None],
                     mask=in_map[:, None] & cmask[None, :], other=0.0)  # fmt: skip
        feat = (xs.to(tl.float32) + prev).to(dt)  # (T, CP)
        # the head's 1x1 conv: packed weights (CP, KD|CP), zero rows past CS
        wq = tl.load(wq_ptr + h * CP * KD + c[:, None] * KD + d[None, :])
        wk = tl.load(wk_ptr + h * CP * KD + c[:, None] * KD + d[None, :])
        wv = tl.load(wv_ptr + h * CP * CP + c[:, None] * CP + c[None, :])
        q = tl.dot(feat, wq, input_precision=PREC) + tl.load(bq_ptr + h * KD + d)[None, :]
        k = tl.dot(feat, wk, input_precision=PREC) + tl.load(bk_ptr + h * KD + d)[None, :]
        v = tl.dot(feat, wv, input_precision=PREC) + tl.load(bv_ptr + h * CP + c)[None, :]
        q = q.to(dt).to(tl.float32)
        # depthwise KS x KS conv of q inside the window, by gathering shifted rows
        R: tl.constexpr = KS // 2
        acc = tl.zeros((T, KD), tl.float32) + tl.load(bdw_ptr + h * KD + d)[None, :]
        for tap in tl.static_range(KS * KS):
            dy = tap // KS - R
            dx = tap % KS - R
            ok = (wy + dy >= 0) & (wy + dy < WS) & (wx + dx >= 0) & (wx + dx < WS) & (t < N)
            src = tl.where(ok, t + (dy * WS + dx), 0)
            g = tl.gather(q, tl.broadcast_to(src[:, None], (T, KD)), axis=0)
            w = tl.load(wdw_ptr + (h * KK + tap) * KD + d)
            acc += tl.where(ok[:, None], g, 0.0) * w[None, :]
        qc = acc.to(dt)
        s = tl.dot(qc, tl.trans(k.to(dt)), input_precision=PREC)  # (T, T)
        bias = tl.load(bias_ptr + h * T * T + t[:, None] * T + t[None, :])  # log2 units
        s = tl.where((t < N)[None, :], s * scale_log2e + bias, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp2(s - m[:, None])
        l_sum = tl.sum(p, axis=1)
        o = tl.dot(p.to(dt), v.to(dt), input_precision=PREC) / l_sum[:, None]
        o = o.to(dt)
        tl.store(o_base + (h * CS + c)[None, :] * soc + tok_off_o[:, None],
                 tl.maximum(o, 0.0), mask=in_map[:, None] & cmask[None, :])  # fmt: skip
        return o.to(tl.float32)

    @triton.jit
    def _cga_fwd_kernel(x_ptr, out_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
                        wdw_ptr, bdw_ptr, bias_ptr, H, W, NWW, NWIN,
                        sxb, sxc, sxh, sxw, sob, soc, soh, sow, scale_log2e,
                        HEADS: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
                        K2: tl.constexpr, K3: tl.constexpr, KK: tl.constexpr, WS: tl.constexpr,
                        T: tl.constexpr, CS: tl.constexpr, CP: tl.constexpr,
                        KD: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        # floats arrive as fp64 where torch.compile's Inductor launches the kernel
        scale_log2e = tl.cast(scale_log2e, tl.float32)
        pid = tl.program_id(0)
        b = pid // NWIN
        win = pid % NWIN
        y0 = (win // NWW) * WS
        x0 = (win % NWW) * WS
        N: tl.constexpr = WS * WS
        t = tl.arange(0, T)
        wy = t // WS
        wx = t % WS
        yy = y0 + wy
        xx = x0 + wx
        in_map = (t < N) & (yy < H) & (xx < W)
        x_base = x_ptr + b.to(tl.int64) * sxb
        o_base = out_ptr + b.to(tl.int64) * sob
        tok_x = yy * sxh + xx * sxw
        tok_o = yy * soh + xx * sow
        prev = tl.zeros((T, CP), tl.float32)
        prev = _head(x_ptr, out_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, wdw_ptr,
                     bdw_ptr, bias_ptr, prev, 0, K0, x_base, o_base, sxc, soc, tok_x, tok_o,
                     in_map, t, wy, wx, scale_log2e, KK, N, T, WS, CS, CP, KD, PREC)  # fmt: skip
        if HEADS > 1:
            prev = _head(x_ptr, out_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
                         wdw_ptr, bdw_ptr, bias_ptr, prev, 1, K1, x_base, o_base, sxc, soc,
                         tok_x, tok_o, in_map, t, wy, wx, scale_log2e, KK, N, T, WS, CS, CP, KD,
                         PREC)  # fmt: skip
        if HEADS > 2:
            prev = _head(x_ptr, out_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
                         wdw_ptr, bdw_ptr, bias_ptr, prev, 2, K2, x_base, o_base, sxc, soc,
                         tok_x, tok_o, in_map, t, wy, wx, scale_log2e, KK, N, T, WS, CS, CP, KD,
                         PREC)  # fmt: skip
        if HEADS > 3:
            prev = _head(x_ptr, out_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
                         wdw_ptr, bdw_ptr, bias_ptr, prev, 3, K3, x_base, o_base, sxc, soc,
                         tok_x, tok_o, in_map, t, wy, wx, scale_log2e, KK, N, T, WS, CS, CP, KD,
                         PREC)  # fmt: skip


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (n - 1).bit_length())


def pack_weights(qkv_w, qkv_b, dw_w, dw_b, bias_tables, key_dim: int, window: int, dtype,
                 device) -> dict:  # fmt: skip
    """Lay out one CGA layer's folded weights for :func:`cascaded_group_attention`.

    ``qkv_w[i]`` (2*key_dim + Cs, Cs) and ``qkv_b[i]`` the head's 1x1 conv; ``dw_w[i]``
    (key_dim, K_i, K_i) and ``dw_b[i]`` its depthwise conv on q; ``bias_tables`` (heads, N, N)
    the attention biases (N = window**2). Returns the tensors and shapes the kernel takes.
    """
    heads = len(qkv_w)
    cs = qkv_w[0].shape[1]
    if not 1 <= heads <= MAX_HEADS:
        raise ValueError(f"fused CGA takes 1..{MAX_HEADS} heads, got {heads}")
    if not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"fused CGA takes windows up to {MAX_WINDOW}, got {window}")
    if key_dim < 16 or key_dim & (key_dim - 1):
        raise ValueError(f"fused CGA needs a power-of-two key_dim >= 16, got {key_dim}")
    n, t, cp, kd = window * window, _pow2(window * window), _pow2(cs), key_dim
    kw = dict(device=device, dtype=torch.float32)
    wq, wk = torch.zeros(heads, cp, kd, **kw), torch.zeros(heads, cp, kd, **kw)
    wv = torch.zeros(heads, cp, cp, **kw)
    bq, bk, bv = (
        torch.zeros(heads, kd, **kw),
        torch.zeros(heads, kd, **kw),
        torch.zeros(heads, cp, **kw),
    )
    ks = [int(w.shape[-1]) for w in dw_w]
    kmax = max(ks)
    wdw = torch.zeros(heads, kmax * kmax, kd, **kw)
    bdw = torch.zeros(heads, kd, **kw)
    bias = torch.zeros(heads, t, t, **kw)
    for i in range(heads):
        w = qkv_w[i].reshape(2 * kd + cs, cs).float()
        wq[i, :cs] = w[:kd].t()
        wk[i, :cs] = w[kd : 2 * kd].t()
        wv[i, :cs, :cs] = w[2 * kd :].t()
        b = qkv_b[i].float()
        bq[i], bk[i], bv[i, :cs] = b[:kd], b[kd : 2 * kd], b[2 * kd :]
        k = ks[i]
        if k % 2 == 0:
            raise ValueError(f"fused CGA needs odd depthwise kernels, head {i} has {k}")
        # tap-major (K*K, KD) in the slot of a K x K kernel: taps laid out for this head's K
        wdw[i, : k * k] = dw_w[i].reshape(kd, k * k).t().float()
        bdw[i] = dw_b[i].float()
        bias[i, :n, :n] = bias_tables[i].float() * math.log2(math.e)
    wdt = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    return {
        "wq": wq.to(wdt), "wk": wk.to(wdt), "wv": wv.to(wdt), "bq": bq, "bk": bk, "bv": bv,
        "wdw": wdw, "bdw": bdw, "bias": bias, "ks": ks, "kmax": kmax, "heads": heads,
        "cs": cs, "cp": cp, "kd": kd, "window": window, "t": t,
        "num_warps": 8 if cp * t >= 64 * 64 else 4,  # (T, CP) tiles of 64x64 and up: 8 warps
    }  # fmt: skip


def cascaded_group_attention(x: torch.Tensor, packed: dict, scale: float) -> torch.Tensor:
    """x (B, C, H, W) with C = heads * Cs -> relu(concat_i out_i), same shape, dtype and
    memory format (see the module docstring). ``packed`` from :func:`pack_weights` with the
    weights in x's dtype. One opaque op (``torch.ops.attnlab.cga_forward``) under
    ``torch.compile``: Dynamo does not trace into the launch, Inductor keeps the layouts."""
    if triton is None:
        raise RuntimeError("the fused CGA kernel needs triton")
    c = x.shape[1]
    heads, cs = packed["heads"], packed["cs"]
    if x.dim() != 4 or c != heads * cs:
        raise ValueError(
            f"fused CGA: input {tuple(x.shape)}, the layer takes {heads} x {cs} channels"
        )
    if packed["wq"].dtype != (x.dtype if x.dtype != torch.float64 else torch.float32):
        raise ValueError(f"fused CGA: weights packed as {packed['wq'].dtype}, input is {x.dtype}")
    ks = (list(packed["ks"]) + [1] * MAX_HEADS)[:MAX_HEADS]
    return _cga_forward(x, packed["wq"], packed["bq"], packed["wk"], packed["bk"], packed["wv"],
                        packed["bv"], packed["wdw"], packed["bdw"], packed["bias"], float(scale),
                        heads, cs, packed["window"], ks, packed["kmax"], packed["t"],
                        packed["cp"], packed["kd"], packed["num_warps"])  # fmt: skip


@torch.library.custom_op("attnlab::cga_forward", mutates_args=())
def _cga_forward(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor,
                 bk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor, wdw: torch.Tensor,
                 bdw: torch.Tensor, bias: torch.Tensor, scale: float, heads: int, cs: int,
                 window: int, ks: list[int], kmax: int, t: int, cp: int, kd: int,
                 num_warps: int) -> torch.Tensor:  # fmt: skip
    b, _, h, w = x.shape
    out = torch.empty_like(x)  # same memory format
    nwh, nww = -(-h // window), -(-w // window)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    launch(_cga_fwd_kernel, (b * nwh * nww,), x, out, wq, bq, wk, bk, wv, bv, wdw, bdw, bias,
           h, w, nww, nwh * nww, *x.stride(), *out.stride(), scale * math.log2(math.e),
           HEADS=heads, K0=ks[0], K1=ks[1], K2=ks[2], K3=ks[3], KK=kmax * kmax, WS=window, T=t,
           CS=cs, CP=cp, KD=kd, PREC=prec, num_warps=num_warps, num_stages=1)  # fmt: skip
    return out


@_cga_forward.register_fake
def _(x, *args):
    return torch.empty_like(x)
