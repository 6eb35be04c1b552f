"""Triton flash attention, forward and backward, behind the attention contract.

Layering: Triton kernels -> launchers (``_forward``, ``_backward``) -> ``KernelAttention``
(autograd) -> ``flash_attention`` / ``ops.build("flash", block_m=..., block_n=...)``.

- Heads-last q (B, N, H, D), k/v (B, Nk, Hkv, D) with any strides: the kernels take strides, so
  views of a fused qkv projection are read in place. q head h reads kv head h // (H // Hkv).
- Online softmax in the log2 domain (exp2 with log2(e) folded into the scale), fp32
  accumulation. Causal is bottom-right aligned; key tiles no query of a tile can see are skipped,
  tiles that every query sees fully run without masks, the rest (diagonal, ragged ends) masked.
- The LSE is differentiable: backward uses Delta_i - dLSE_i where flash-attention uses Delta_i.
- Backward: a preprocess kernel (Delta), a dK/dV kernel (one key tile, loops over query tiles
  and over the q heads of its GQA group, so dK/dV need no (B, N, H, D) buffer and no reduction)
  and a separate dQ kernel (loops over key tiles). No atomics: results are deterministic.
- fp32 inputs use IEEE fp32 dots (no TF32) so they match the reference to ~1e-6.
- Tiles and warps are build options (no autotune: options are bound once, per the contract).
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import torch

from .contract import check_inputs, check_kernel_support
from .launch import launch
from .registry import Capabilities, register

try:
    import triton
    import triton.language as tl
except ImportError:  # pyproject installs triton on Linux only; keep `import ops` working

    class tl:  # stand-in so that the kernel definitions below still parse
        constexpr = staticmethod(lambda x=None: x)
        dot = staticmethod(lambda input, other, input_precision=None: None)

    triton = None

try:  # TMA tensor descriptors: Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:
    _TensorDescriptor = None

# Triton decides interpreter vs compiler when a kernel is defined, i.e. at this import.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_jit = triton.jit if triton is not None else (lambda fn: fn)
_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
# Triton >= 3.0 spells "no TF32" input_precision="ieee"; older ones allow_tf32=False.
_HAS_INPUT_PRECISION = tl.constexpr("input_precision" in inspect.signature(tl.dot).parameters)


# ----------------------------------------------------------------------------- kernels


@_jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in fp32; IEEE: full fp32 products (fp32 inputs), no TF32."""
    if IEEE:
        if _HAS_INPUT_PRECISION:
            c = tl.dot(a, b, input_precision="ieee")
        else:
            c = tl.dot(a, b, allow_tf32=False)
    else:
        c = tl.dot(a, b)
    return c


@_jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in fp32, the add done by the matrix unit."""
    if IEEE:
        if _HAS_INPUT_PRECISION:
            c = tl.dot(a, b, acc, input_precision="ieee")
        else:
            c = tl.dot(a, b, acc, allow_tf32=False)
    else:
        c = tl.dot(a, b, acc)
    return c


@_jit
def _masked(s, rows, cols, n_q, n_k, CAUSAL: tl.constexpr):
    """Scores s with -inf where query ``rows`` may not see key ``cols`` (broadcast to s)."""
    ok = (rows < n_q) & (cols < n_k)
    if CAUSAL:
        ok = ok & (cols <= rows + (n_k - n_q))
    return tl.where(ok, s, -float("inf"))


@_jit
def _key_bounds(
    start_m, n_q, n_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """For the query tile at start_m: keys [0, full) need no mask, [full, hi) need one."""
    if CAUSAL:
        off = n_k - n_q
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + off, 0), n_k)  # last row's last key + 1
        full = tl.minimum(tl.maximum(start_m + off + 1, 0), n_k)  # seen by the tile's first row
    else:
        hi = n_k
        full = n_k
    return full // BLOCK_N * BLOCK_N, hi


@_jit
def _query_bounds(start_n, n_q, n_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """For the key tile at start_n: query tiles [lo, mid) and [full, end) need masks,
    [mid, full) do not; rows before lo see none of these keys."""
    end = (n_q + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if CAUSAL:
        off = n_k - n_q
        lo = tl.maximum(start_n - off, 0) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(start_n + BLOCK_N - 1 - off, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        lo = 0
        mid = 0
    # A ragged key tile needs no key mask: a key only feeds its own dK/dV row, not stored.
    mid = tl.minimum(mid, end)
    return lo, mid, tl.maximum(mid, n_q // BLOCK_M * BLOCK_M), end


@_jit
def _load_kv(k_base, v_base, offs_n, in_k, skn, skd, svn, svd, HEAD_D: tl.constexpr):
    """A key tile transposed (D, BN) and its value tile (BN, D); rows past the end read 0."""
    offs_d = tl.arange(0, HEAD_D)
    kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                 mask=in_k[None, :], other=0.0)  # fmt: skip
    v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=in_k[:, None], other=0.0)  # fmt: skip
    return kt, v


@_jit
def _softmax_update(acc, l_i, m_i, s, v, qk_scale, IEEE: tl.constexpr):
    """One online-softmax step: fold raw scores s (BM, BN; -inf where masked), scaled by
    qk_scale > 0 into log2 units, and values v (BN, D) into the running (acc, l_i, m_i). The
    scale is folded into the exponent (one FMA per score). Rows that have seen no key yet
    (m = -inf) stay at zero."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
    p = tl.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return acc, l_i, m_new


@_jit
def _dkdv_update(dk, dv, pt, q, do, v, delta, IEEE: tl.constexpr):
    """One backward step of a key tile over a query tile: from P^T (BN, BM), dV += P^T dO and
    (unscaled) dK += dS^T Q, with dS^T = P^T * (dP^T - delta); delta (BM,) already holds
    rowsum(dO * O) - dLSE. Shared by the flash and neighborhood dK/dV kernels."""
    dv += _dot(pt.to(do.dtype), do, IEEE)
    dpt = _dot(v, tl.trans(do), IEEE)  # (BN, BM) = dP^T
    dst = pt * (dpt - delta[None, :])
    dk += _dot(dst.to(q.dtype), q, IEEE)
    return dk, dv


@_jit
def _dq_update(dq, p, do, v, k, delta, IEEE: tl.constexpr):
    """One backward step of a query tile over a key tile: from P (BM, BN), (unscaled)
    dQ += dS K with dS = P * (dO V^T - delta). Shared by the flash and neighborhood dQ kernels."""
    dp = _dot(do, tl.trans(v), IEEE)  # (BM, BN)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, IEEE)
    return dq


@_jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, lo, hi,
               n_q, n_k, qk_scale, CAUSAL: tl.constexpr, MASK: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, IEEE: tl.constexpr,
               KD=None, VD=None, b=0, hk=0, TMA: tl.constexpr = False):  # fmt: skip
    """Online-softmax update of (acc, l_i, m_i) over key tiles [lo, hi); m_i in log2 units.
    TMA: K/V tiles come through the descriptors KD, VD of (B, Nk, Hkv, D) (rows past Nk
    read 0), else through pointers."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            kt = tl.trans(KD.load([b, start_n, hk, 0]).reshape(BLOCK_N, HEAD_D))
            v = VD.load([b, start_n, hk, 0]).reshape(BLOCK_N, HEAD_D)
        else:
            in_k = offs_n < n_k
            kt, v = _load_kv(k_base, v_base, offs_n, in_k, skn, skd, svn, svd, HEAD_D)
        s = _dot(q, kt, IEEE)  # (BM, BN), unscaled
        if MASK:
            s = _masked(s, offs_m[:, None], offs_n[None, :], n_q, n_k, CAUSAL)
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, qk_scale, IEEE)
    return acc, l_i, m_i


@_jit
def _fwd_kernel(Q, K, V, O, LSE, sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
                sob, son, soh, sod, n_q, n_k, n_heads, group, qk_scale, QD, KD, VD, OD,
                CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """One (query tile, batch*head): O = softmax(q k^T * scale) v and LSE (natural log).
    TMA: q, K/V and O tiles move through the descriptors QD, KD, VD, OD (``_tma_ok``)."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    in_q = offs_m < n_q
    if TMA:
        q = QD.load([b.to(tl.int32), start_m, h, 0]).reshape(BLOCK_M, HEAD_D)
    else:
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
    k_base = K + b * skb + (h // group) * skh
    v_base = V + b * svb + (h // group) * svh
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    full, hi = _key_bounds(start_m, n_q, n_k, CAUSAL, BLOCK_M, BLOCK_N)
    b32, hk = b.to(tl.int32), h // group
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, offs_m,
                               0, full, n_q, n_k, qk_scale, CAUSAL, False, BLOCK_N, HEAD_D, IEEE,
                               KD, VD, b32, hk, TMA)  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, offs_m,
                               full, hi, n_q, n_k, qk_scale, CAUSAL, True, BLOCK_N, HEAD_D, IEEE,
                               KD, VD, b32, hk, TMA)  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows that see no key: O = 0, LSE = -inf
    out = acc / l_safe[:, None]
    if TMA:
        OD.store([b32, start_m, h, 0], out.to(q.dtype).reshape(1, BLOCK_M, 1, HEAD_D))
    else:
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=in_q[:, None])  # fmt: skip
    tl.store(LSE + bh.to(tl.int64) * n_q + offs_m, (m_i + tl.log2(l_safe)) * _LN2, mask=in_q)


@_jit
def _delta_kernel(O, DO, DLSE, DELTA, sdb, sdn, sdh, sdd, n_q, n_heads,
                  HAS_DLSE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):  # fmt: skip
    """DELTA = rowsum(dO * O) - dLSE, (B, H, N) fp32. O is contiguous (B, N, H, D).

    BLOCK_N is unused; _launch passes both tile sizes (Triton 3.6 rejects unknown keywords)."""
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    in_q = offs_m < n_q
    o_ptrs = O + ((b * n_q + offs_m[:, None]) * n_heads + h) * HEAD_D + offs_d[None, :]
    o = tl.load(o_ptrs, mask=in_q[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=in_q[:, None], other=0.0).to(tl.float32)  # fmt: skip
    delta = tl.sum(o * do, 1)
    row = bh.to(tl.int64) * n_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=in_q, other=0.0)
    tl.store(DELTA + row, delta, mask=in_q)


@_jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd,
                offs_n, lo, hi, n_q, n_k, qk_scale, CAUSAL: tl.constexpr, MASK: tl.constexpr,
                BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Accumulate dK, dV (unscaled dK) of one key tile over query tiles [lo, hi)."""
    offs_d = tl.arange(0, HEAD_D)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < n_q
        q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
        do = tl.load(do_base + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                     mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
        lse = tl.load(lse_base + offs_m, mask=in_q, other=0.0) * 1.4426950408889634
        lse = tl.where(lse == -float("inf"), 0.0, lse)  # dead rows: all their keys are masked
        delta = tl.load(delta_base + offs_m, mask=in_q, other=0.0)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale  # (BN, BM) = S^T in log2 units
        if MASK:
            st = _masked(st, offs_m[None, :], offs_n[:, None], n_q, n_k, CAUSAL)
        pt = tl.exp2(st - lse[None, :])  # P^T
        dk, dv = _dkdv_update(dk, dv, pt, q, do, v, delta, IEEE)
    return dk, dv


@_jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqn, sqh, sqd, skb, skn, skh, skd,
                 svb, svn, svh, svd, sdb, sdn, sdh, sdd, n_q, n_k, n_heads, group, qk_scale, scale,
                 CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One (key tile, batch*kv head): dK, dV summed over the q heads of the GQA group."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    n_kv = n_heads // group
    b = (bhk // n_kv).to(tl.int64)
    hk = bhk % n_kv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    in_k = offs_n[:, None] < n_k
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=in_k, other=0.0)  # (BN, D)  # fmt: skip
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=in_k, other=0.0)  # (BN, D)  # fmt: skip
    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    lo, mid, full, end = _query_bounds(start_n, n_q, n_k, CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(group):
        h = hk * group + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        row = (b * n_heads + h) * n_q  # (B, H, N) offset of LSE / DELTA
        lse, delta = LSE + row, DELTA + row
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse, delta, sqn, sqd, sdn, sdd, offs_n,
                             lo, mid, n_q, n_k, qk_scale, CAUSAL, True, BLOCK_M, HEAD_D, IEEE)  # fmt: skip
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse, delta, sqn, sqd, sdn, sdd, offs_n,
                             mid, full, n_q, n_k, qk_scale, CAUSAL, False, BLOCK_M, HEAD_D, IEEE)  # fmt: skip
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse, delta, sqn, sqd, sdn, sdd, offs_n,
                             full, end, n_q, n_k, qk_scale, CAUSAL, True, BLOCK_M, HEAD_D, IEEE)  # fmt: skip
    out = ((b * n_k + offs_n[:, None]) * n_kv + hk) * HEAD_D + offs_d[None, :]  # (B, Nk, Hkv, D)
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=in_k)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=in_k)


@_jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, offs_m, lo, hi,
              n_q, n_k, qk_scale, CAUSAL: tl.constexpr, MASK: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Accumulate (unscaled) dQ of one query tile over key tiles [lo, hi)."""
    offs_d = tl.arange(0, HEAD_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_k = offs_n[:, None] < n_k
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=in_k, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=in_k, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale  # (BM, BN)
        if MASK:
            s = _masked(s, offs_m[:, None], offs_n[None, :], n_q, n_k, CAUSAL)
        p = tl.exp2(s - lse[:, None])
        dq = _dq_update(dq, p, do, v, k, delta, IEEE)
    return dq


@_jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sqb, sqn, sqh, sqd, skb, skn, skh, skd,
               svb, svn, svh, svd, sdb, sdn, sdh, sdd, n_q, n_k, n_heads, group, qk_scale, scale,
               CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One (query tile, batch*head): dQ = scale * dS K, looping over key tiles like forward."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    in_q = offs_m < n_q
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
    row = bh.to(tl.int64) * n_q + offs_m
    lse = tl.load(LSE + row, mask=in_q, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == -float("inf"), 0.0, lse)  # dead rows: all their keys are masked
    delta = tl.load(DELTA + row, mask=in_q, other=0.0)
    k_base = K + b * skb + (h // group) * skh
    v_base = V + b * svb + (h // group) * svh
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    full, hi = _key_bounds(start_m, n_q, n_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, offs_m, 0, full,
                   n_q, n_k, qk_scale, CAUSAL, False, BLOCK_N, HEAD_D, IEEE)  # fmt: skip
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, offs_m, full, hi,
                   n_q, n_k, qk_scale, CAUSAL, True, BLOCK_N, HEAD_D, IEEE)  # fmt: skip
    out = ((b * n_q + offs_m[:, None]) * n_heads + h) * HEAD_D + offs_d[None, :]  # (B, N, H, D)
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=in_q[:, None])


# ----------------------------------------------------------------------------- launchers


@dataclasses.dataclass(frozen=True)
class _Tiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _tiles(opts: dict, head_dim: int, dtype: torch.dtype, backward: bool) -> _Tiles:
    """Build options where given, else defaults by pass, head dim and dtype (H100-sized;
    16x16 under the interpreter, where time grows with the number of tile elements)."""
    if _INTERPRET:
        base = (16, 16, 4, 1)
    elif dtype == torch.float32:  # twice the shared memory per tile
        base = (32, 32, 4, 2) if backward else (64, 32, 4, 2)
    elif backward:  # timed on an H100, causal N=4096 (docs/benchmarks.md)
        base = (64, 64, 4, 2) if head_dim == 128 else (64, 64, 4, 3)
    else:
        base = (64, 32, 4, 3) if head_dim == 128 else (128, 64, 8, 3)
    names = ("block_m", "block_n", "num_warps", "num_stages")
    return _Tiles(*(base[i] if opts[n] is None else opts[n] for i, n in enumerate(names)))


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints (``triton.cdiv`` is a JIT function: ~10 us a host call)."""
    return -(-a // b)


def _launch(kernel, grid, *args, tiles: _Tiles, **constexprs):
    if all(grid):  # empty sequences or batches: nothing to do
        launch(kernel, grid, *args, **constexprs, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
               num_warps=tiles.num_warps, num_stages=tiles.num_stages)  # fmt: skip


def _tma_ok(*tensors) -> bool:
    """Tensor descriptors can move these tensors' tiles: unit last stride, 16-byte aligned
    strides and base address (Triton with TMA support)."""
    if _TensorDescriptor is None:
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(x * size % 16 for x in t.stride()[:-1]):
            return False
    return True


# Tensor descriptors cost host time on every launch: about 0.12 ms for a forward's four on the
# H100's host (creating them, and the launcher encoding them), against 3-12% of the forward's
# GPU time. With tma=None (auto) they serve launches of at least _TMA_MIN_SCORES useful scores
# (about 0.1 ms of GPU work at D=64): below that the step is bound by the host anyway (2-D NA
# 13x13, B2 H8 128x128: fwd+bwd host time 0.57 ms with descriptors, 0.53 without, for 0.53 ms
# of GPU time; docs/benchmarks.md).
_TMA_MIN_SCORES = 1 << 26


def _want_tma(opts: dict, scores: int) -> bool:
    """The ``tma`` option: True / False, or None (auto) by the launch's useful scores. Under
    torch.compile always False: Inductor then launches the kernel itself, and how it takes
    our tensor-descriptor arguments has not run on a GPU here (the pointer path has)."""
    if torch.compiler.is_compiling():
        return False
    tma = opts.get("tma")
    return scores >= _TMA_MIN_SCORES if tma is None else bool(tma)


def _forward(q, k, v, causal: bool, scale: float, opts: dict):
    """q (B, Nq, H, D), k/v (B, Nk, Hkv, D) any strides -> o (B, Nq, H, D), lse (B, H, Nq).
    Tiles move by TMA where ``_tma_ok`` (q/k/v/o as (B, N, H, D) descriptors), else by
    pointers; same arithmetic."""
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    o = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    scores = b * h * nq * nk // (2 if causal else 1)
    tma = _want_tma(opts, scores) and _tma_ok(q, k, v, o)
    if tma and not _INTERPRET and q.dtype != torch.float32 and d == 128:  # as 1-D NA (H100)
        base = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}
        opts = {**opts, **{n: t for n, t in base.items() if opts.get(n) is None}}
    tiles = _tiles(opts, d, q.dtype, backward=False)
    descs = [None] * 4
    if tma:
        blocks = (tiles.block_m, tiles.block_n, tiles.block_n, tiles.block_m)
        descs = [_TensorDescriptor(t, list(t.shape), list(t.stride()), [1, r, 1, d])
                 for t, r in zip((q, k, v, o), blocks)]  # fmt: skip
    grid = (_cdiv(nq, tiles.block_m), b * h)
    _launch(_fwd_kernel, grid, q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(),
            *o.stride(), nq, nk, h, h // hkv, scale * _LOG2E, *descs, tiles=tiles,
            CAUSAL=causal, HEAD_D=d, IEEE=q.dtype == torch.float32, TMA=tma)  # fmt: skip
    return o, lse


def _row_delta(o, do, dlse, tiles: _Tiles) -> torch.Tensor:
    """(B, H, Nq) fp32: rowsum(dO * O) - dLSE, the backward's Delta, in one pass. o contiguous
    (B, Nq, H, D); do (B, Nq, H, D) any strides; dlse (B, H, Nq) or None."""
    b, nq, h, d = o.shape
    delta = torch.empty((b, h, nq), dtype=torch.float32, device=o.device)
    dlse = None if dlse is None else dlse.contiguous()  # tiny
    _launch(_delta_kernel, (_cdiv(nq, tiles.block_m), b * h), o, do,
            delta if dlse is None else dlse, delta, *do.stride(), nq, h,
            tiles=tiles, HAS_DLSE=dlse is not None, HEAD_D=d)  # fmt: skip
    return delta


def _backward(do, dlse, q, k, v, o, lse, causal: bool, scale: float, opts: dict, delta=None):
    """Gradients of sum(o * do) + sum(lse * dlse); dk/dv already summed over GQA groups.
    ``delta`` (rowsum(dO * O) - dLSE, contiguous (B, H, Nq) fp32, as ``lse``) may be given:
    then ``o`` and ``dlse`` are not read (HyperAttention's fused recursion passes its top
    level's, the softmax of each piece being part of one softmax over all its keys)."""
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    tiles = _tiles(opts, d, q.dtype, backward=True)
    if delta is None:
        delta = _row_delta(o, do, dlse, tiles)
    dq = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, nk, hkv, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, nk, hkv, d), dtype=v.dtype, device=v.device)
    args = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), nq, nk, h, h // hkv,
            scale * _LOG2E, scale)  # fmt: skip
    const = dict(tiles=tiles, CAUSAL=causal, HEAD_D=d, IEEE=q.dtype == torch.float32)
    _launch(_dkdv_kernel, (_cdiv(nk, tiles.block_n), b * hkv), q, k, v, do, lse, delta,
            dk, dv, *args, **const)  # fmt: skip
    _launch(_dq_kernel, (_cdiv(nq, tiles.block_m), b * h), q, k, v, do, lse, delta, dq,
            *args, **const)  # fmt: skip
    return dq, dk, dv


class KernelAttention(torch.autograd.Function):
    """(q, k, v) -> (o, lse), both differentiable, through a pair of kernel launchers:
    ``fwd(q, k, v, *args) -> (o, lse)`` and ``bwd(do, dlse, q, k, v, o, lse, *args) -> (dq, dk,
    dv)`` (dlse may be None). Shared by the flash and neighborhood backends."""

    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, args):
        o, lse = fwd(q, k, v, *args)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.bwd, ctx.args = bwd, args
        ctx.set_materialize_grads(False)  # no (B, H, N) zeros when the LSE is not used
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None and dlse is None:
            return (None,) * 6
        do = torch.zeros_like(o) if do is None else do
        return (*ctx.bwd(do, dlse, q, k, v, o, lse, *ctx.args), None, None, None)


# ----------------------------------------------------------------------------- public API


def _check_scale(q, scale, name: str) -> float:
    """The softmax scale (1/sqrt(D) by default); the kernels fold it into exp2 and need > 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"'{name}' needs a positive scale; got scale={scale}")
    return scale


def _check(q, k, v, bias) -> None:
    """The contract's checks plus what this backend lacks; ValueError names the problem."""
    check_inputs(q, k, v, bias)
    if bias is not None:
        raise ValueError("'flash' does not support an attention bias; use 'sdpa' or 'reference'")
    if q.dim() != 4:
        raise ValueError(f"'flash' takes sequences q (B, N, H, D); got q{tuple(q.shape)}")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"'flash' needs Dv == D; got Dv={v.shape[-1]}, D={q.shape[-1]}")
    check_kernel_support("flash", q, _HEAD_DIMS, _DTYPES)


def _attention(q, k, v, causal, scale, bias, return_lse, opts):
    _check(q, k, v, bias)
    scale = _check_scale(q, scale, "flash")
    o, lse = KernelAttention.apply(q, k, v, _forward, _backward, (bool(causal), scale, opts))
    return (o, lse) if return_lse else o


_DEFAULTS = {"block_m": None, "block_n": None, "num_warps": None, "num_stages": None, "tma": None}


def flash_attention(q, k, v, *, causal=False, scale=None, bias=None, return_lse=False):
    """Triton flash attention with default tiles; see the module docstring and ops contract."""
    return _attention(q, k, v, causal, scale, bias, return_lse, _DEFAULTS)


_ALLOWED = {
    "block_m": (16, 32, 64, 128, 256),
    "block_n": (16, 32, 64, 128, 256),
    "num_warps": (1, 2, 4, 8, 16),
    "num_stages": (1, 2, 3, 4, 5, 6),
}
_CAPS = Capabilities(dtypes=_DTYPES, head_dims=_HEAD_DIMS, bias=False, causal=True, gqa=True)


@register("flash", defaults=_DEFAULTS, capabilities=_CAPS)
def _build_flash(block_m=None, block_n=None, num_warps=None, num_stages=None, tma=None):
    """Triton flash attention, fwd + bwd, differentiable LSE (tiles: block_m x block_n; tma:
    forward tiles through tensor descriptors where the layout allows: True, False, or None for
    launches large enough to repay their host time)."""
    opts = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    for name, value in opts.items():
        if value is not None and value not in _ALLOWED[name]:
            raise ValueError(
                f"flash option {name}={value!r}: use None (auto) or one of {_ALLOWED[name]}"
            )
    if tma not in (None, True, False):
        raise ValueError(f"flash option tma={tma!r}: use None (auto), True or False")
    opts["tma"] = tma

    def flash(q, k, v, *, causal=False, scale=None, bias=None, return_lse=False):
        return _attention(q, k, v, causal, scale, bias, return_lse, opts)

    return flash
