"""Fused neighborhood attention (NATTEN semantics) in Triton, forward and backward.

This file: the 1-D kernels, the per-axis helpers and the public ``neighborhood`` backend;
2-D/3-D token layouts (B, X, Y(, Z), H, D) run the kernels of ``ops/neighborhood_nd.py``.

Semantics are those of ``ops.neighborhood_ref.axis_window`` (kernel size K >= 2, dilation d,
stride S <= K, causal windows ending at the query); ``neighborhood_reference`` defines
correctness. Layering as in ``ops/flash.py``: kernels -> launchers -> ``KernelAttention`` ->
``ops.build("neighborhood", kernel_size=..., ...)``.

- No (N, N) mask: the window of query position p is computed in-kernel from the closed-form
  rule (``_window``). A query tile visits only the key tiles between the start of its first
  query and the end of its last one (start/end are non-decreasing in p); key tiles that every
  query of the tile sees fully run without a mask, the others are masked element-wise.
- Dilation without copies: one program per (tile, dilation group g, batch*head). In group
  coordinates, position p is token p*d + g, i.e. a sequence of length Lg = N//d + (g < N%d)
  with memory stride d*stride_n, on which the window rule is the d = 1 rule.
- Backward: Delta = rowsum(dO*O) - dLSE (flash's preprocess kernel), a dK/dV kernel per key tile
  (the queries that see it form a contiguous range, found by binary search on the monotone
  rule; loops over the q heads of the GQA group) and a dQ kernel per query tile. No atomics.
- Forward through TMA tensor descriptors of the (B, N/d, d, H, D) view when N % d == 0 and the
  strides are 16-byte aligned (``_tma_views``; else pointer loads): 1-D k=2049 1.41 -> 1.20 ms
  on an H100 (docs/benchmarks.md).
- GQA: q head h reads kv head h // (H // Hkv). Any strides, no hidden copies.
"""

from __future__ import annotations

import torch

from .contract import check_inputs, check_kernel_support
from .flash import (
    _ALLOWED,
    _DTYPES,
    _HEAD_DIMS,
    _INTERPRET,
    _LOG2E,
    KernelAttention,
    _cdiv,
    _check_scale,
    _dkdv_update,
    _dot,
    _dq_update,
    _jit,
    _launch,
    _load_kv,
    _row_delta,
    _softmax_update,
    _TensorDescriptor,
    _tiles,
    _tma_ok,
    _want_tma,
    tl,
)
from .neighborhood_ref import check_window
from .registry import Capabilities, register

# ----------------------------------------------------------------------------- kernels


@_jit
def _window(p, lg, ksize, stride, CAUSAL: tl.constexpr):
    """Keys [start, end) of query position p (scalar or vector) in a group of length lg."""
    if CAUSAL:
        leader = tl.minimum((p // stride) * stride + stride - 1, lg - 1)
        start = tl.maximum(leader - ksize + 1, 0)
        end = tl.minimum(p + 1, lg)
    else:
        leader = tl.minimum((p // stride) * stride + stride // 2, lg - 1)
        start = tl.minimum(tl.maximum(leader - ksize // 2, 0), lg - ksize)
        end = start + ksize
    return start, end


@_jit
def _key_range(p0, lg, ksize, stride, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """Query tile at p0: key tiles [lo, a) and [b, hi) need a mask, [a, b) do not."""
    first_s, first_e = _window(tl.minimum(p0, lg - 1), lg, ksize, stride, CAUSAL)
    last_s, last_e = _window(tl.minimum(p0 + BLOCK_M - 1, lg - 1), lg, ksize, stride, CAUSAL)
    lo = first_s // BLOCK_N * BLOCK_N
    hi = last_e
    a = tl.minimum((last_s + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)  # every row starts by here
    b = tl.maximum(tl.minimum(first_e // BLOCK_N * BLOCK_N, hi), a)  # every row ends after
    return lo, a, b, hi


@_jit
def _first_query(n, lg, ksize, stride, CAUSAL: tl.constexpr, BY_END: tl.constexpr):
    """Smallest p in [0, lg] with end(p) > n (BY_END) or start(p) > n: binary search on the
    non-decreasing start/end of the rule."""
    lo = lg * 0
    hi = lg
    while lo < hi:
        mid = (lo + hi) // 2
        s, e = _window(mid, lg, ksize, stride, CAUSAL)
        if BY_END:
            above = e > n
        else:
            above = s > n
        hi = tl.where(above, mid, hi)
        lo = tl.where(above, lo, mid + 1)
    return lo


@_jit
def _in_window(rows, cols, lg, ksize, stride, CAUSAL: tl.constexpr):
    """Bool (rows x cols broadcast): query position ``rows`` sees key position ``cols``."""
    start, end = _window(rows, lg, ksize, stride, CAUSAL)
    return (rows < lg) & (cols >= start) & (cols < end)


@_jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, lo, hi, lg, ksize,
               stride, qk_scale, CAUSAL: tl.constexpr, MASK: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Online-softmax update of (acc, l_i, m_i) over key positions [lo, hi); log2 units."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_k = offs_n < lg
        kt, v = _load_kv(k_base, v_base, offs_n, in_k, skn, skd, svn, svd, HEAD_D)
        s = _dot(q, kt, IEEE)  # (BM, BN), unscaled
        if MASK:
            ok = _in_window(offs_m[:, None], offs_n[None, :], lg, ksize, stride, CAUSAL)
            s = tl.where(ok, s, -float("inf"))
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, qk_scale, IEEE)
    return acc, l_i, m_i


@_jit
def _fwd_kernel(Q, K, V, O, LSE, sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
                sob, son, soh, sod, n, n_heads, group, dil, ksize, stride, qk_scale,
                CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One (query tile, dilation group, batch*head): O and LSE (natural log) of its queries."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    g = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    lg = n // dil + (g < n % dil).to(tl.int32)  # positions p -> tokens p * dil + g
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    in_q = offs_m < lg
    q = tl.load(Q + b * sqb + h * sqh + (offs_m * dil + g)[:, None] * sqn + offs_d[None, :] * sqd,
                mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
    k_base = K + b * skb + (h // group) * skh + g * skn
    v_base = V + b * svb + (h // group) * svh + g * svn
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    lo, a, c, hi = _key_range(tl.program_id(0) * BLOCK_M, lg, ksize, stride, CAUSAL, BLOCK_M,
                              BLOCK_N)  # masked [lo, a), unmasked [a, c), masked [c, hi)  # fmt: skip
    skn, svn = skn * dil, svn * dil  # one step in group coordinates
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, lo, a,
                               lg, ksize, stride, qk_scale, CAUSAL, True, BLOCK_N, HEAD_D, IEEE)  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, a, c,
                               lg, ksize, stride, qk_scale, CAUSAL, False, BLOCK_N, HEAD_D, IEEE)  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, c, hi,
                               lg, ksize, stride, qk_scale, CAUSAL, True, BLOCK_N, HEAD_D, IEEE)  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tok = offs_m * dil + g
    tl.store(O + b * sob + h * soh + tok[:, None] * son + offs_d[None, :] * sod,
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=in_q[:, None])  # fmt: skip
    tl.store(LSE + bh.to(tl.int64) * n + tok, (m_i + tl.log2(l_safe)) / 1.4426950408889634,
             mask=in_q)  # fmt: skip


@_jit
def _fwd_tma_tiles(acc, l_i, m_i, q, k_desc, v_desc, b, g, hk, offs_m, lo, hi, lg, ksize, stride,
                   qk_scale, CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_D: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """``_fwd_tiles`` with K/V tiles loaded by TMA (rows past the end read 0)."""
    for n0 in range(lo, hi, BLOCK_N):
        k = k_desc.load([b, n0, g, hk, 0]).reshape(BLOCK_N, HEAD_D)
        v = v_desc.load([b, n0, g, hk, 0]).reshape(BLOCK_N, HEAD_D)
        s = _dot(q, tl.trans(k), IEEE)  # (BM, BN), unscaled
        if MASK:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            ok = _in_window(offs_m[:, None], offs_n[None, :], lg, ksize, stride, CAUSAL)
            s = tl.where(ok, s, -float("inf"))
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, qk_scale, IEEE)
    return acc, l_i, m_i


@_jit
def _fwd_tma_kernel(q_desc, k_desc, v_desc, o_desc, LSE, n, n_heads, group, dil, ksize, stride,
                    qk_scale, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """``_fwd_kernel`` through tensor descriptors of the (B, N/d, d, H, D) view (N % d == 0):
    q, K/V and o tiles move by TMA, which frees the registers and instructions of pointer
    arithmetic (1.41 -> 1.16 ms on the 1-D k=2049 case, docs/benchmarks.md)."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    g = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // n_heads
    h = bh % n_heads
    lg = n // dil
    p0 = tl.program_id(0) * BLOCK_M
    offs_m = p0 + tl.arange(0, BLOCK_M)
    q = q_desc.load([b, p0, g, h, 0]).reshape(BLOCK_M, HEAD_D)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    lo, a, c, hi = _key_range(p0, lg, ksize, stride, CAUSAL, BLOCK_M, BLOCK_N)
    hk = h // group
    acc, l_i, m_i = _fwd_tma_tiles(acc, l_i, m_i, q, k_desc, v_desc, b, g, hk, offs_m, lo, a, lg,
                                   ksize, stride, qk_scale, CAUSAL, True, BLOCK_N, HEAD_D, IEEE)  # fmt: skip
    acc, l_i, m_i = _fwd_tma_tiles(acc, l_i, m_i, q, k_desc, v_desc, b, g, hk, offs_m, a, c, lg,
                                   ksize, stride, qk_scale, CAUSAL, False, BLOCK_N, HEAD_D, IEEE)  # fmt: skip
    acc, l_i, m_i = _fwd_tma_tiles(acc, l_i, m_i, q, k_desc, v_desc, b, g, hk, offs_m, c, hi, lg,
                                   ksize, stride, qk_scale, CAUSAL, True, BLOCK_N, HEAD_D, IEEE)  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = (acc / l_safe[:, None]).to(q.dtype)  # o has q's dtype
    o_desc.store([b, p0, g, h, 0], o.reshape(1, BLOCK_M, 1, 1, HEAD_D))
    tl.store(LSE + bh.to(tl.int64) * n + offs_m * dil + g,
             (m_i + tl.log2(l_safe)) / 1.4426950408889634, mask=offs_m < lg)  # fmt: skip


@_jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd,
                offs_n, lo, hi, lg, dil, ksize, stride, qk_scale, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Accumulate dK, dV (unscaled dK) of one key tile over query positions [lo, hi), masked.
    q_base/do_base step by group positions; lse_base/delta_base by tokens (p * dil)."""
    offs_d = tl.arange(0, HEAD_D)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_q = offs_m < lg
        q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
        do = tl.load(do_base + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                     mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
        lse = tl.load(lse_base + offs_m * dil, mask=in_q, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m * dil, mask=in_q, other=0.0)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale  # (BN, BM) = S^T in log2 units
        ok = _in_window(offs_m[None, :], offs_n[:, None], lg, ksize, stride, CAUSAL)
        pt = tl.where(ok, tl.exp2(st - lse[None, :]), 0.0)  # P^T
        dk, dv = _dkdv_update(dk, dv, pt, q, do, v, delta, IEEE)
    return dk, dv


@_jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqn, sqh, sqd, skb, skn, skh, skd,
                 svb, svn, svh, svd, sdb, sdn, sdh, sdd, n, n_heads, group, dil, ksize, stride,
                 qk_scale, scale, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One (key tile, dilation group, batch*kv head): dK, dV summed over the GQA group's q
    heads, visiting only the query range whose windows can include these keys."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    g = tl.program_id(1)
    bhk = tl.program_id(2)
    n_kv = n_heads // group
    b = (bhk // n_kv).to(tl.int64)
    hk = bhk % n_kv
    lg = n // dil + (g < n % dil).to(tl.int32)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    in_k = offs_n[:, None] < lg
    tok = offs_n * dil + g
    k = tl.load(K + b * skb + hk * skh + tok[:, None] * skn + offs_d[None, :] * skd,
                mask=in_k, other=0.0)  # (BN, D)  # fmt: skip
    v = tl.load(V + b * svb + hk * svh + tok[:, None] * svn + offs_d[None, :] * svd,
                mask=in_k, other=0.0)  # (BN, D)  # fmt: skip
    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    q_lo = _first_query(n0, lg, ksize, stride, CAUSAL, True)  # first query ending after n0
    last = tl.minimum(n0 + BLOCK_N, lg) - 1
    q_hi = _first_query(last, lg, ksize, stride, CAUSAL, False)  # first starting after last
    for j in range(group):
        h = hk * group + j
        row = (b * n_heads + h) * n + g  # (B, H, N) offset of LSE / DELTA at token g
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q + b * sqb + h * sqh + g * sqn,
                             DO + b * sdb + h * sdh + g * sdn, LSE + row, DELTA + row,
                             sqn * dil, sqd, sdn * dil, sdd, offs_n, q_lo // BLOCK_M * BLOCK_M,
                             q_hi, lg, dil, ksize, stride, qk_scale, CAUSAL, BLOCK_M, HEAD_D,
                             IEEE)  # fmt: skip
    out = ((b * n + tok[:, None]) * n_kv + hk) * HEAD_D + offs_d[None, :]  # (B, N, Hkv, D)
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=in_k)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=in_k)


@_jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, offs_m, lo, hi, lg,
              ksize, stride, qk_scale, CAUSAL: tl.constexpr, MASK: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Accumulate (unscaled) dQ of one query tile over key positions [lo, hi)."""
    offs_d = tl.arange(0, HEAD_D)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_k = offs_n[:, None] < lg
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=in_k, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=in_k, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale  # (BM, BN)
        p = tl.exp2(s - lse[:, None])
        if MASK:
            ok = _in_window(offs_m[:, None], offs_n[None, :], lg, ksize, stride, CAUSAL)
            p = tl.where(ok, p, 0.0)
        dq = _dq_update(dq, p, do, v, k, delta, IEEE)
    return dq


@_jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sqb, sqn, sqh, sqd, skb, skn, skh, skd,
               svb, svn, svh, svd, sdb, sdn, sdh, sdd, n, n_heads, group, dil, ksize, stride,
               qk_scale, scale, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One (query tile, dilation group, batch*head): dQ = scale * dS K over its key range."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    g = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    lg = n // dil + (g < n % dil).to(tl.int32)
    p0 = tl.program_id(0) * BLOCK_M
    offs_m = p0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    in_q = offs_m < lg
    tok = offs_m * dil + g
    q = tl.load(Q + b * sqb + h * sqh + tok[:, None] * sqn + offs_d[None, :] * sqd,
                mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
    do = tl.load(DO + b * sdb + h * sdh + tok[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
    row = bh.to(tl.int64) * n + tok
    lse = tl.load(LSE + row, mask=in_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=in_q, other=0.0)
    k_base = K + b * skb + (h // group) * skh + g * skn
    v_base = V + b * svb + (h // group) * svh + g * svn
    skn, svn = skn * dil, svn * dil  # one step in group coordinates
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    lo, a, c, hi = _key_range(p0, lg, ksize, stride, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, offs_m, lo, a, lg,
                   ksize, stride, qk_scale, CAUSAL, True, BLOCK_N, HEAD_D, IEEE)  # fmt: skip
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, offs_m, a, c, lg,
                   ksize, stride, qk_scale, CAUSAL, False, BLOCK_N, HEAD_D, IEEE)  # fmt: skip
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, offs_m, c, hi, lg,
                   ksize, stride, qk_scale, CAUSAL, True, BLOCK_N, HEAD_D, IEEE)  # fmt: skip
    out = ((b * n + tok[:, None]) * n_heads + h) * HEAD_D + offs_d[None, :]  # (B, N, H, D)
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=in_q[:, None])


# ----------------------------------------------------------------------------- launchers


def _tma_views(dil: int, *tensors):
    """Tensor descriptors need N % d == 0 (the (B, N/d, d, H, D) view), a unit last stride and
    16-byte aligned strides and addresses; None where any of that fails (or Triton has none)."""
    if tensors[0].shape[1] % dil or not _tma_ok(*tensors):
        return None
    views = []
    for t in tensors:
        b, n, h, d = t.shape
        views.append((t, [b, n // dil, dil, h, d], [t.stride(0), t.stride(1) * dil, t.stride(1),
                                                     t.stride(2), 1]))  # fmt: skip
    return views


def _forward(q, k, v, win, scale: float, opts: dict):
    """q (B, N, H, D), k/v (B, N, Hkv, D) any strides -> o (B, N, H, D), lse (B, H, N) fp32."""
    b, n, h, d = q.shape
    ksize, dil, stride, causal = win
    o = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    views = _tma_views(dil, q, k, v, o) if _want_tma(opts, b * h * n * min(ksize, n)) else None
    if not _INTERPRET and q.dtype != torch.float32 and d == 128:  # H100 sweeps, 1-D k=2049
        base = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3} if views else \
            {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}  # fmt: skip
        opts = {**opts, **{n: t for n, t in base.items() if opts[n] is None}}
    tiles = _tiles(opts, d, q.dtype, backward=False)
    grid = (_cdiv(-(-n // dil), tiles.block_m), dil, b * h)  # longest group: ceil(N / d)
    const = dict(tiles=tiles, CAUSAL=causal, HEAD_D=d, IEEE=q.dtype == torch.float32)
    if views:
        blocks = (tiles.block_m, tiles.block_n, tiles.block_n, tiles.block_m)
        descs = [_TensorDescriptor(t, shape, strides, [1, rows, 1, 1, d])
                 for (t, shape, strides), rows in zip(views, blocks)]  # fmt: skip
        _launch(_fwd_tma_kernel, grid, *descs, lse, n, h, h // k.shape[2], dil, ksize, stride,
                scale * _LOG2E, **const)  # fmt: skip
        return o, lse
    _launch(_fwd_kernel, grid, q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(),
            *o.stride(), n, h, h // k.shape[2], dil, ksize, stride, scale * _LOG2E, **const)  # fmt: skip
    return o, lse


def _backward(do, dlse, q, k, v, o, lse, win, scale: float, opts: dict):
    """Gradients of sum(o * do) + sum(lse * dlse); dk/dv already summed over GQA groups."""
    b, n, h, d = q.shape
    hkv = k.shape[2]
    ksize, dil, stride, causal = win
    tiles = _tiles(opts, d, q.dtype, backward=True)
    delta = _row_delta(o, do, dlse, tiles)  # (B, H, N) fp32: rowsum(dO * O) - dLSE
    dq = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, n, hkv, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, n, hkv, d), dtype=v.dtype, device=v.device)
    args = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), n, h, h // hkv, dil, ksize,
            stride, scale * _LOG2E, scale)  # fmt: skip
    const = dict(tiles=tiles, CAUSAL=causal, HEAD_D=d, IEEE=q.dtype == torch.float32)
    lmax = -(-n // dil)  # longest dilation group
    _launch(_dkdv_kernel, (_cdiv(lmax, tiles.block_n), dil, b * hkv), q, k, v, do, lse,
            delta, dk, dv, *args, **const)  # fmt: skip
    _launch(_dq_kernel, (_cdiv(lmax, tiles.block_m), dil, b * h), q, k, v, do, lse, delta,
            dq, *args, **const)  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------- public API


def _check(q, k, v, bias) -> None:
    """The contract's checks plus what this backend lacks; ValueError names the problem."""
    if q.dim() >= 4 and k.dim() == q.dim() and q.shape[1:-2] != k.shape[1:-2]:
        raise ValueError(
            "'neighborhood' needs the same token layout for q and k/v: "
            f"q tokens {tuple(q.shape[1:-2])}, k tokens {tuple(k.shape[1:-2])}"
        )
    check_inputs(q, k, v, bias)
    if bias is not None:
        raise ValueError("'neighborhood' does not support an attention bias")
    if q.dim() not in (4, 5, 6):
        raise ValueError(
            "'neighborhood' handles 1-D, 2-D and 3-D token layouts (B, *tokens, H, D) with 1 to 3 "
            f"token axes; got q{tuple(q.shape)} with {q.dim() - 3} token axes"
        )
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"'neighborhood' needs Dv == D; got Dv={v.shape[-1]}, D={q.shape[-1]}")
    check_kernel_support("neighborhood", q, _HEAD_DIMS, _DTYPES)


_DEFAULTS = {
    "kernel_size": 7,
    "dilation": 1,
    "stride": 1,
    "is_causal": False,
    "block_m": None,
    "block_n": None,
    "num_warps": None,
    "num_stages": None,
    "flat_tiles": None,
    "tma": None,
}
_CAPS = Capabilities(
    dtypes=_DTYPES, head_dims=_HEAD_DIMS, bias=False, causal=True, gqa=True, token_ndims=(1, 2, 3)
)


@register("neighborhood", defaults=_DEFAULTS, capabilities=_CAPS)
def _build_neighborhood(kernel_size, dilation, stride, is_causal, block_m, block_n, num_warps,
                        num_stages, flat_tiles, tma):  # fmt: skip
    """Fused Triton 1-D/2-D/3-D neighborhood attention (NATTEN semantics), fwd + bwd, no (N, N)
    mask. 2-D/3-D: ``flat_tiles`` None (auto), True (visit a tile's key span as runs of
    consecutive positions) or False (as boxes, unmasked where every query sees the box).
    ``tma``: forward tiles through tensor descriptors where the layout allows (True), pointer
    loads (False), or None: descriptors for launches large enough to repay their host time."""
    opts = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    for name, value in opts.items():
        if value is not None and value not in _ALLOWED[name]:
            raise ValueError(
                f"neighborhood option {name}={value!r}: use None (auto) or one of {_ALLOWED[name]}"
            )
    if flat_tiles not in (None, True, False):
        raise ValueError(f"neighborhood option flat_tiles={flat_tiles!r}: use None, True or False")
    if tma not in (None, True, False):
        raise ValueError(f"neighborhood option tma={tma!r}: use None (auto), True or False")
    opts["flat_tiles"] = flat_tiles
    opts["tma"] = tma

    def attention(q, k, v, *, causal=False, scale=None, bias=None, return_lse=False):
        _check(q, k, v, bias)
        ks, ds, ss, cs = check_window(q.shape[1:-2], kernel_size, dilation, stride, is_causal)
        cs = tuple(c or bool(causal) for c in cs)  # causal=True (GPT-2's flag): every axis
        scale = _check_scale(q, scale, "neighborhood")
        win = (ks[0], ds[0], ss[0], cs[0]) if q.dim() == 4 else (ks, ds, ss, cs)
        fwd, bwd = (_forward, _backward) if q.dim() == 4 else (_forward_nd, _backward_nd)
        o, lse = KernelAttention.apply(q, k, v, fwd, bwd, (win, scale, opts))
        return (o, lse) if return_lse else o

    return attention


# 2-D/3-D kernels; imported last: they reuse this module's per-axis helpers.
from .neighborhood_nd import _backward_nd, _forward_nd  # noqa: E402
