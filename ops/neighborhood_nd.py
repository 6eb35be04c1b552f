"""Fused 2-D / 3-D neighborhood attention kernels (NATTEN semantics) behind ``neighborhood``.

Semantics: ``ops.neighborhood_ref`` (per-axis rule; the window is the product of per-axis
windows over row-major flattened tokens). The 1-D helpers of ``ops/neighborhood.py``
(``_window``, ``_first_query``) are applied per axis.

- One kernel family for 2-D and 3-D: a 2-D layout (X, Y) runs as (X, Y, 1) with kernel 1 on the
  unit axis (the rule then yields the window [0, 1)), so every kernel has three axes.
- Query tile: a TX x TY x TZ box of positions of one dilation group per axis, flattened to
  BLOCK_M = TX*TY*TZ rows for tl.dot; key tiles are KX x KY x KZ boxes (BLOCK_N). Grid: (tiles,
  dilation groups dx*dy*dz, batch*heads). In group coordinates position p of axis a is token
  p*d_a + g_a, so dilation costs no copies: offsets are computed from the input's own strides.
- Forward / dQ: per axis the keys of a query tile lie in [start(first query), end(last query))
  (start/end are non-decreasing in p); the kernel loops over the key tiles covering that box only.
  Per axis the union of the tile's windows is contiguous and the window is a product, so every
  visited key tile is at least partially visible; tiles outside the box are never read. A key
  box that every query of the tile sees runs without a mask (large kernels); the others are
  masked element-wise with the product of the per-axis masks.
- Box shapes are chosen per launch (``_choose_boxes``) to visit the fewest tile pairs.
  ``flat_tiles=True`` visits a span as runs of consecutive positions instead (rounded up once,
  not per axis: up to 40% fewer positions for small kernels), always masked; it measured slower
  on an H200 in 9 of 10 2-D 13x13 / 3-D 7x7x7 tile configs (docs/benchmarks.md), so boxes are
  the default.
- dK/dV: one program per (key tile, dilation group, batch*kv head); per axis the queries that can
  see the tile form a contiguous range (binary search on the monotone rule, as in 1-D); loops over
  the query tiles of that box and the q heads of the GQA group. Deterministic, no atomics.
- Forward through TMA tensor descriptors where the layout allows (dilation 1, boxes, (H, D)
  merged, 16-byte strides): whole boxes move, keys outside the span are masked like the rest.
  3-D 7x7x7 fwd 0.351 -> 0.309 ms, large 2-D 13.9 -> 12.6 ms (H100, docs/benchmarks.md). The
  backward keeps pointer loads: its TMA version gave wrong dQ on the H100 (Triton 3.6) while
  right under the interpreter, and had gained under 5%.
- q/k/v: any strides (per-axis strides passed). O, dQ, dK, dV are allocated contiguous; dO is
  reshaped to (B, N, H, D), which is a view unless autograd hands a non-mergeable layout.
"""

from __future__ import annotations

import functools
import math

import torch

from .flash import (
    _INTERPRET,
    _LOG2E,
    _cdiv,
    _dkdv_update,
    _dot,
    _dq_update,
    _jit,
    _launch,
    _softmax_update,
    _TensorDescriptor,
    _tiles,
    _want_tma,
    tl,
)
from .flash import _tma_ok as _aligned_for_tma
from .neighborhood import _first_query, _window

# ----------------------------------------------------------------------------- helpers


@_jit
def _group_len(n, dil, g):
    """Length of dilation group g of an axis of length n."""
    return n // dil + (g < n % dil).to(tl.int32)


@_jit
def _split3(idx, n1, n2):
    """Row-major index over (?, n1, n2) -> its three coordinates."""
    return idx // (n1 * n2), (idx // n2) % n1, idx % n2


@_jit
def _box(base_x, base_y, base_z, DY: tl.constexpr, DZ: tl.constexpr, BLOCK: tl.constexpr):
    """Positions (BLOCK,) per axis of a (BLOCK // (DY*DZ)) x DY x DZ box at (base_x, y, z)."""
    r = tl.arange(0, BLOCK)
    return base_x + r // (DY * DZ), base_y + (r // DZ) % DY, base_z + r % DZ


@_jit
def _mem(px, py, pz, gx, gy, gz, dlx, dly, dlz, sx, sy, sz):
    """Memory offset of group positions (px, py, pz) of groups (gx, gy, gz)."""
    return (px * dlx + gx) * sx + (py * dly + gy) * sy + (pz * dlz + gz) * sz


@_jit
def _span(p0, size, lg, ksize, stride, CAUSAL: tl.constexpr):
    """Key positions [lo, hi) seen by the queries [p0, p0 + size) of one axis (clipped to lg)."""
    lo, _ = _window(tl.minimum(p0, lg - 1), lg, ksize, stride, CAUSAL)
    _, hi = _window(tl.minimum(p0 + size - 1, lg - 1), lg, ksize, stride, CAUSAL)
    return lo, hi


@_jit
def _q_windows(px, py, pz, lgx, lgy, lgz, ksx, ksy, ksz, stx, sty, stz, CX: tl.constexpr,
               CY: tl.constexpr, CZ: tl.constexpr):  # fmt: skip
    """Per query (vectors): key window start and width per axis (width 0 for positions outside
    their axis). Computed once per query tile; the per-pair mask is then _inside's compares."""
    sx, ex = _window(px, lgx, ksx, stx, CX)
    sy, ey = _window(py, lgy, ksy, sty, CY)
    sz, ez = _window(pz, lgz, ksz, stz, CZ)
    return (sx, tl.where(px < lgx, ex - sx, 0), sy, tl.where(py < lgy, ey - sy, 0), sz,
            tl.where(pz < lgz, ez - sz, 0))  # fmt: skip


@_jit
def _inside(kx, ky, kz, sx, wx, sy, wy, sz, wz, HAS_Z: tl.constexpr):
    """Bool (broadcast): key (kx, ky, kz) lies in the window [s, s + w) on every axis, as one
    unsigned compare per axis (0 <= k - s < w); the z test is skipped when the z axis has one
    position (2-D layouts), where it always holds. The kernels are bound by integer work here
    (Nsight Compute, 2-D 13x13 dK/dV: ALU the busiest pipe at 57%), and every pair pays it."""
    ok = ((kx - sx).to(tl.uint32, bitcast=True) < wx.to(tl.uint32, bitcast=True)) & \
        ((ky - sy).to(tl.uint32, bitcast=True) < wy.to(tl.uint32, bitcast=True))  # fmt: skip
    if HAS_Z:
        ok = ok & ((kz - sz).to(tl.uint32, bitcast=True) < wz.to(tl.uint32, bitcast=True))
    return ok


@_jit
def _box_load(desc, b, x0, y0, z0, head, ROWS: tl.constexpr, HEAD_D: tl.constexpr):
    """(ROWS, D) rows of the box at (x0, y0, z0) of one head through a (B, X, Y, Z, H*D)
    tensor descriptor (``_tma_desc``); positions outside the axes read 0."""
    return desc.load([b.to(tl.int32), x0, y0, z0, head * HEAD_D]).reshape(ROWS, HEAD_D)


@_jit
def _box_store(desc, x, b, x0, y0, z0, head, DX: tl.constexpr, DY: tl.constexpr,
               DZ: tl.constexpr, HEAD_D: tl.constexpr):  # fmt: skip
    """Store (DX*DY*DZ, D) rows as the box at (x0, y0, z0); positions outside the axes are
    dropped by the descriptor."""
    desc.store([b.to(tl.int32), x0, y0, z0, head * HEAD_D], x.reshape(1, DX, DY, DZ, HEAD_D))


# ----------------------------------------------------------------------------- kernels
# Shared scalar arguments, in order: nx, ny, nz (axis lengths), dlx, dly, dlz (dilations),
# ksx, ksy, ksz (kernel sizes), stx, sty, stz (strides), ntx, nty, ntz (tiles per axis of the
# grid's first dimension), n_heads, group (q heads per kv head).


@_jit
def _seen_by_all(p0, size, lg, ksize, stride, CAUSAL: tl.constexpr):
    """Key positions [a, b) of one axis that every query of [p0, p0 + size) (clipped to lg)
    sees; empty (a >= b) unless the kernel is large against the tile."""
    a, _ = _window(tl.minimum(p0 + size - 1, lg - 1), lg, ksize, stride, CAUSAL)
    _, b = _window(tl.minimum(p0, lg - 1), lg, ksize, stride, CAUSAL)
    return a, b


@_jit
def _n_tiles(sx, sy, sz, DX: tl.constexpr, DY: tl.constexpr, DZ: tl.constexpr,
             FLAT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Tiles covering an sx x sy x sz span: DX x DY x DZ boxes, or (FLAT) BLOCK-long runs of
    its row-major positions."""
    sx, sy, sz = tl.maximum(sx, 0), tl.maximum(sy, 0), tl.maximum(sz, 0)
    if FLAT:
        return (sx * sy * sz + BLOCK - 1) // BLOCK
    else:
        return ((sx + DX - 1) // DX) * ((sy + DY - 1) // DY) * ((sz + DZ - 1) // DZ)


@_jit
def _tile(t, ix, iy, iz, lox, loy, loz, sx, sy, sz, DX: tl.constexpr, DY: tl.constexpr,
          DZ: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Tile t of the span [lo, lo + s) per axis: positions (BLOCK,) per axis, which of them lie
    in the span, and the box origin (x0, y0, z0) (unused when FLAT). Boxes: (ix, iy, iz) is box
    t's index per axis, kept by _next_box in the forward and dQ (runtime divisions cost ~20
    integer instructions each, every tile: 2-D 13x13 fwd 0.134 -> 0.121 ms, H100)."""
    if FLAT:  # consecutive row-major positions of the span: no rounding up per axis
        idx = t * BLOCK + tl.arange(0, BLOCK)
        x = lox + idx // (sy * sz)
        y = loy + (idx // sz) % sy
        z = loz + idx % sz
        x0, y0, z0 = lox, loy, loz
    else:
        x0, y0, z0 = lox + ix * DX, loy + iy * DY, loz + iz * DZ
        x, y, z = _box(x0, y0, z0, DY, DZ, BLOCK)
    ok = (x < lox + sx) & (y < loy + sy) & (z < loz + sz)
    return x, y, z, ok, x0, y0, z0


@_jit
def _divmod(t, n, inv_n):
    """(t // n, t % n) for 0 <= t < 2^22 and n >= 1, given inv_n = 1 / n in fp32: a multiply
    and a correction of at most one instead of an integer division (~20 instructions)."""
    t = t + n * 0  # a tensor (the loop index is a Python int under the interpreter)
    q = (t.to(tl.float32) * inv_n).to(tl.int32)
    r = t - q * n
    q = tl.where(r < 0, q - 1, tl.where(r >= n, q + 1, q))
    return q, t - q * n


@_jit
def _next_box(ix, iy, iz, sy, sz, DY: tl.constexpr, DZ: tl.constexpr):
    """Box index per axis after (ix, iy, iz) in the row-major walk over the boxes covering an
    (sx, sy, sz) span: z fastest."""
    iz = iz + 1
    wrap = iz * DZ >= sz
    iz = tl.where(wrap, 0, iz)
    iy = tl.where(wrap, iy + 1, iy)
    wrap = iy * DY >= sy
    iy = tl.where(wrap, 0, iy)
    ix = tl.where(wrap, ix + 1, ix)
    return ix, iy, iz


@_jit
def _box_seen(x0, y0, z0, ax, bx, ay, by, az, bz, DX: tl.constexpr, DY: tl.constexpr,
              DZ: tl.constexpr):  # fmt: skip
    """Scalar: the DX x DY x DZ key box at (x0, y0, z0) lies inside [a, b) on every axis."""
    return ((x0 >= ax) & (x0 + DX <= bx) & (y0 >= ay) & (y0 + DY <= by) & (z0 >= az)
            & (z0 + DZ <= bz))  # fmt: skip


@_jit
def _fwd_nd_kernel(Q, K, V, O, LSE, sqb, sqx, sqy, sqz, sqh, sqd, skb, skx, sky, skz, skh, skd,
                   svb, svx, svy, svz, svh, svd, nx, ny, nz, dlx, dly, dlz, ksx, ksy, ksz,
                   stx, sty, stz, ntx, nty, ntz, n_heads, group, qk_scale, QD, KD, VD, OD,
                   CX: tl.constexpr, CY: tl.constexpr, CZ: tl.constexpr, TY: tl.constexpr,
                   TZ: tl.constexpr, KY: tl.constexpr, KZ: tl.constexpr, FLAT: tl.constexpr,
                   HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IEEE: tl.constexpr, HAS_Z: tl.constexpr, TMA: tl.constexpr,
                   MASK_ALL: tl.constexpr):  # fmt: skip
    """One (query box, dilation groups, batch*head): O and LSE (natural log) of its queries.
    TMA: q, K/V boxes and O move through the tensor descriptors QD, KD, VD, OD (see
    ``_tma_ok``, ``_tma_desc``), else through pointers."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    tx, ty, tz = _split3(tl.program_id(0), nty, ntz)
    gx, gy, gz = _split3(tl.program_id(1), dly, dlz)
    bh = tl.program_id(2)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    lgx, lgy, lgz = _group_len(nx, dlx, gx), _group_len(ny, dly, gy), _group_len(nz, dlz, gz)
    TX: tl.constexpr = BLOCK_M // (TY * TZ)
    KX: tl.constexpr = BLOCK_N // (KY * KZ)
    px, py, pz = _box(tx * TX, ty * TY, tz * TZ, TY, TZ, BLOCK_M)
    in_q = (px < lgx) & (py < lgy) & (pz < lgz)
    offs_d = tl.arange(0, HEAD_D)
    if TMA:
        q = _box_load(QD, b, tx * TX, ty * TY, tz * TZ, h, BLOCK_M, HEAD_D)
    else:
        q_off = _mem(px, py, pz, gx, gy, gz, dlx, dly, dlz, sqx, sqy, sqz)
        q = tl.load(Q + b * sqb + h * sqh + q_off[:, None] + offs_d[None, :] * sqd,
                    mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
    k_base = K + b * skb + (h // group) * skh
    v_base = V + b * svb + (h // group) * svh
    lox, hix = _span(tx * TX, TX, lgx, ksx, stx, CX)
    loy, hiy = _span(ty * TY, TY, lgy, ksy, sty, CY)
    loz, hiz = _span(tz * TZ, TZ, lgz, ksz, stz, CZ)
    ax, bx = _seen_by_all(tx * TX, TX, lgx, ksx, stx, CX)
    ay, by = _seen_by_all(ty * TY, TY, lgy, ksy, sty, CY)
    az, bz = _seen_by_all(tz * TZ, TZ, lgz, ksz, stz, CZ)
    sx, sy, sz = hix - lox, hiy - loy, hiz - loz
    wsx, wwx, wsy, wwy, wsz, wwz = _q_windows(px, py, pz, lgx, lgy, lgz, ksx, ksy, ksz, stx, sty,
                                              stz, CX, CY, CZ)  # fmt: skip
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    ix, iy, iz = lox * 0, lox * 0, lox * 0
    for t in range(0, _n_tiles(sx, sy, sz, KX, KY, KZ, FLAT, BLOCK_N)):
        kx, ky, kz, in_k, x0, y0, z0 = _tile(t, ix, iy, iz, lox, loy, loz, sx, sy, sz, KX, KY,
                                             KZ, FLAT, BLOCK_N)  # fmt: skip
        ix, iy, iz = _next_box(ix, iy, iz, sy, sz, KY, KZ)
        if TMA:  # the whole box: keys outside the span are masked below (partial boxes)
            kt = tl.trans(_box_load(KD, b, x0, y0, z0, h // group, BLOCK_N, HEAD_D))
            v = _box_load(VD, b, x0, y0, z0, h // group, BLOCK_N, HEAD_D)
        else:
            k_off = _mem(kx, ky, kz, gx, gy, gz, dlx, dly, dlz, skx, sky, skz)
            v_off = _mem(kx, ky, kz, gx, gy, gz, dlx, dly, dlz, svx, svy, svz)
            kt = tl.load(k_base + k_off[None, :] + offs_d[:, None] * skd,
                         mask=in_k[None, :], other=0.0)  # (D, BN)  # fmt: skip
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :] * svd,
                        mask=in_k[:, None], other=0.0)  # (BN, D)  # fmt: skip
        s = _dot(q, kt, IEEE)  # (BM, BN), unscaled
        if MASK_ALL:  # runs of the span (FLAT), or no box can be seen whole: always masked
            partial = True
        else:  # a box: masked unless every query of the tile sees all of it
            partial = _box_seen(x0, y0, z0, ax, bx, ay, by, az, bz, KX, KY, KZ) == 0
        if partial:
            ok = _inside(kx[None, :], ky[None, :], kz[None, :], wsx[:, None], wwx[:, None],
                         wsy[:, None], wwy[:, None], wsz[:, None], wwz[:, None], HAS_Z)  # fmt: skip
            s = tl.where(ok, s, -float("inf"))
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, qk_scale, IEEE)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tok = ((px * dlx + gx) * ny + py * dly + gy) * nz + pz * dlz + gz  # row-major token index
    n = nx * ny * nz
    if TMA:
        _box_store(OD, (acc / l_safe[:, None]).to(q.dtype), b, tx * TX, ty * TY, tz * TZ, h, TX,
                   TY, TZ, HEAD_D)  # fmt: skip
    else:
        tl.store(O + ((b * n + tok[:, None]) * n_heads + h) * HEAD_D + offs_d[None, :],
                 (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=in_q[:, None])  # fmt: skip
    tl.store(LSE + bh.to(tl.int64) * n + tok, (m_i + tl.log2(l_safe)) / 1.4426950408889634,
             mask=in_q)  # fmt: skip


@_jit
def _dq_nd_kernel(Q, K, V, DO, LSE, DELTA, DQ, O, DLSE, sqb, sqx, sqy, sqz, sqh, sqd, skb, skx, sky, skz,
                  skh, skd, svb, svx, svy, svz, svh, svd, nx, ny, nz, dlx, dly, dlz, ksx, ksy,
                  ksz, stx, sty, stz, ntx, nty, ntz, n_heads, group, qk_scale, scale,
                  CX: tl.constexpr, CY: tl.constexpr, CZ: tl.constexpr, TY: tl.constexpr,
                  TZ: tl.constexpr, KY: tl.constexpr, KZ: tl.constexpr, FLAT: tl.constexpr,
                  HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  IEEE: tl.constexpr, HAS_Z: tl.constexpr, HAS_DLSE: tl.constexpr,
                  MASK_ALL: tl.constexpr):  # fmt: skip
    """One (query box, dilation groups, batch*head): dQ = scale * dS K over its key span.
    DO and O are contiguous (B, N, H, D). Also stores, per query, the pair (LSE in log2 units,
    Delta = rowsum(dO * O) - dLSE) as DELTA (B, H, N, 2) (no separate launch): the dK/dV
    kernel, launched after, reads both with one 8-byte load a query instead of two loads and
    a multiply (its per-tile integer work is what bounds it)."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    tx, ty, tz = _split3(tl.program_id(0), nty, ntz)
    gx, gy, gz = _split3(tl.program_id(1), dly, dlz)
    bh = tl.program_id(2)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    lgx, lgy, lgz = _group_len(nx, dlx, gx), _group_len(ny, dly, gy), _group_len(nz, dlz, gz)
    TX: tl.constexpr = BLOCK_M // (TY * TZ)
    KX: tl.constexpr = BLOCK_N // (KY * KZ)
    px, py, pz = _box(tx * TX, ty * TY, tz * TZ, TY, TZ, BLOCK_M)
    in_q = (px < lgx) & (py < lgy) & (pz < lgz)
    offs_d = tl.arange(0, HEAD_D)
    n = nx * ny * nz
    tok = ((px * dlx + gx) * ny + py * dly + gy) * nz + pz * dlz + gz
    q_off = _mem(px, py, pz, gx, gy, gz, dlx, dly, dlz, sqx, sqy, sqz)
    q = tl.load(Q + b * sqb + h * sqh + q_off[:, None] + offs_d[None, :] * sqd,
                mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
    flat = ((b * n + tok[:, None]) * n_heads + h) * HEAD_D + offs_d[None, :]  # (B, N, H, D)
    do = tl.load(DO + flat, mask=in_q[:, None], other=0.0)
    row = bh.to(tl.int64) * n + tok
    lse = tl.load(LSE + row, mask=in_q, other=0.0) * 1.4426950408889634
    o = tl.load(O + flat, mask=in_q[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=in_q, other=0.0)
    pair = tl.arange(0, 2)
    tl.store(DELTA + row[:, None] * 2 + pair[None, :], tl.join(lse, delta), mask=in_q[:, None])
    k_base = K + b * skb + (h // group) * skh
    v_base = V + b * svb + (h // group) * svh
    lox, hix = _span(tx * TX, TX, lgx, ksx, stx, CX)
    loy, hiy = _span(ty * TY, TY, lgy, ksy, sty, CY)
    loz, hiz = _span(tz * TZ, TZ, lgz, ksz, stz, CZ)
    ax, bx = _seen_by_all(tx * TX, TX, lgx, ksx, stx, CX)
    ay, by = _seen_by_all(ty * TY, TY, lgy, ksy, sty, CY)
    az, bz = _seen_by_all(tz * TZ, TZ, lgz, ksz, stz, CZ)
    sx, sy, sz = hix - lox, hiy - loy, hiz - loz
    wsx, wwx, wsy, wwy, wsz, wwz = _q_windows(px, py, pz, lgx, lgy, lgz, ksx, ksy, ksz, stx, sty,
                                              stz, CX, CY, CZ)  # fmt: skip
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    ix, iy, iz = lox * 0, lox * 0, lox * 0
    for t in range(0, _n_tiles(sx, sy, sz, KX, KY, KZ, FLAT, BLOCK_N)):
        kx, ky, kz, in_k, x0, y0, z0 = _tile(t, ix, iy, iz, lox, loy, loz, sx, sy, sz, KX, KY,
                                             KZ, FLAT, BLOCK_N)  # fmt: skip
        ix, iy, iz = _next_box(ix, iy, iz, sy, sz, KY, KZ)
        k_off = _mem(kx, ky, kz, gx, gy, gz, dlx, dly, dlz, skx, sky, skz)
        v_off = _mem(kx, ky, kz, gx, gy, gz, dlx, dly, dlz, svx, svy, svz)
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :] * skd,
                    mask=in_k[:, None], other=0.0)  # (BN, D)  # fmt: skip
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :] * svd,
                    mask=in_k[:, None], other=0.0)  # (BN, D)  # fmt: skip
        p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
        if MASK_ALL:  # runs of the span (FLAT), or no box can be seen whole: always masked
            partial = True
        else:  # a box: masked unless every query of the tile sees all of it
            partial = _box_seen(x0, y0, z0, ax, bx, ay, by, az, bz, KX, KY, KZ) == 0
        if partial:
            ok = _inside(kx[None, :], ky[None, :], kz[None, :], wsx[:, None], wwx[:, None],
                         wsy[:, None], wwy[:, None], wsz[:, None], wwz[:, None], HAS_Z)  # fmt: skip
            p = tl.where(ok, p, 0.0)
        dq = _dq_update(dq, p, do, v, k, delta, IEEE)  # delta holds Delta - dLSE
    tl.store(DQ + flat, (dq * scale).to(DQ.dtype.element_ty), mask=in_q[:, None])


@_jit
def _dkdv_nd_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqx, sqy, sqz, sqh, sqd, skb, skx, sky,
                    skz, skh, skd, svb, svx, svy, svz, svh, svd, nx, ny, nz, dlx, dly, dlz, ksx,
                    ksy, ksz, stx, sty, stz, ntx, nty, ntz, n_heads, group, qk_scale, scale,
                    CX: tl.constexpr, CY: tl.constexpr, CZ: tl.constexpr, TY: tl.constexpr,
                    TZ: tl.constexpr, KY: tl.constexpr, KZ: tl.constexpr, FLAT: tl.constexpr,
                    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IEEE: tl.constexpr, HAS_Z: tl.constexpr, MASK_ALL: tl.constexpr,
                    SIMPLE: tl.constexpr):  # fmt: skip
    """One (key box, dilation groups, batch*kv head): dK, dV summed over the GQA group's q
    heads, over the query span whose windows can reach these keys (per-axis binary search)."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    tx, ty, tz = _split3(tl.program_id(0), nty, ntz)
    gx, gy, gz = _split3(tl.program_id(1), dly, dlz)
    bhk = tl.program_id(2)
    n_kv = n_heads // group
    b = (bhk // n_kv).to(tl.int64)
    hk = bhk % n_kv
    lgx, lgy, lgz = _group_len(nx, dlx, gx), _group_len(ny, dly, gy), _group_len(nz, dlz, gz)
    TX: tl.constexpr = BLOCK_M // (TY * TZ)
    KX: tl.constexpr = BLOCK_N // (KY * KZ)
    kx0, ky0, kz0 = tx * KX, ty * KY, tz * KZ
    kx, ky, kz = _box(kx0, ky0, kz0, KY, KZ, BLOCK_N)
    in_k = (kx < lgx) & (ky < lgy) & (kz < lgz)
    offs_d = tl.arange(0, HEAD_D)
    n = nx * ny * nz
    k_off = _mem(kx, ky, kz, gx, gy, gz, dlx, dly, dlz, skx, sky, skz)
    v_off = _mem(kx, ky, kz, gx, gy, gz, dlx, dly, dlz, svx, svy, svz)
    k = tl.load(K + b * skb + hk * skh + k_off[:, None] + offs_d[None, :] * skd,
                mask=in_k[:, None], other=0.0)  # (BN, D)  # fmt: skip
    v = tl.load(V + b * svb + hk * svh + v_off[:, None] + offs_d[None, :] * svd,
                mask=in_k[:, None], other=0.0)  # (BN, D)  # fmt: skip
    # per axis: queries [first ending after the box's first key, first starting after its last)
    qlox = _first_query(kx0, lgx, ksx, stx, CX, True)
    qhix = _first_query(tl.minimum(kx0 + KX, lgx) - 1, lgx, ksx, stx, CX, False)
    qloy = _first_query(ky0, lgy, ksy, sty, CY, True)
    qhiy = _first_query(tl.minimum(ky0 + KY, lgy) - 1, lgy, ksy, sty, CY, False)
    qloz = _first_query(kz0, lgz, ksz, stz, CZ, True)
    qhiz = _first_query(tl.minimum(kz0 + KZ, lgz) - 1, lgz, ksz, stz, CZ, False)
    sx, sy, sz = qhix - qlox, qhiy - qloy, qhiz - qloz
    n_t = _n_tiles(sx, sy, sz, TX, TY, TZ, FLAT, BLOCK_M)
    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    ny_t, nz_t = (sy + TY - 1) // TY, (sz + TZ - 1) // TZ  # query boxes per axis of the span
    pair = tl.arange(0, 2)
    inv_ny, inv_nz = 1.0 / ny_t.to(tl.float32), 1.0 / nz_t.to(tl.float32)
    for j in range(group):
        h = hk * group + j
        q_base = Q + b * sqb + h * sqh
        for t in range(0, n_t):  # box index from t (the counters of _next_box measured
            # slower here, 2-D 13x13 dK/dV 0.270 -> 0.304 ms on the H100; and an integer
            # division of t in this loop stops Triton 3.8 compiling the kernel for sm_90)
            if HAS_Z:
                ixy, iz = _divmod(t, nz_t, inv_nz)
            else:
                ixy, iz = t, t * 0
            ix, iy = _divmod(ixy, ny_t, inv_ny)
            px, py, pz, in_q, x0, y0, z0 = _tile(t, ix, iy, iz, qlox, qloy, qloz, sx, sy, sz, TX,
                                                 TY, TZ, FLAT, BLOCK_M)  # fmt: skip
            q_off = _mem(px, py, pz, gx, gy, gz, dlx, dly, dlz, sqx, sqy, sqz)
            q = tl.load(q_base + q_off[:, None] + offs_d[None, :] * sqd,
                        mask=in_q[:, None], other=0.0)  # (BM, D)  # fmt: skip
            tok = ((px * dlx + gx) * ny + py * dly + gy) * nz + pz * dlz + gz
            flat = ((b * n + tok[:, None]) * n_heads + h) * HEAD_D + offs_d[None, :]
            do = tl.load(DO + flat, mask=in_q[:, None], other=0.0)
            row = (b * n_heads + h) * n + tok
            lse, delta = tl.split(tl.load(DELTA + row[:, None] * 2 + pair[None, :],
                                          mask=in_q[:, None], other=0.0))  # log2 units, Delta  # fmt: skip
            pt = tl.exp2(_dot(k, tl.trans(q), IEEE) * qk_scale - lse[None, :])  # P^T (BN, BM)
            # unmasked when every query of the box sees every key: the key box lies inside the
            # keys seen by all of them (rows outside the span or the axes load zeros q, dO)
            if MASK_ALL:
                partial = True
            else:
                ax, bx = _seen_by_all(x0, TX, lgx, ksx, stx, CX)
                ay, by = _seen_by_all(y0, TY, lgy, ksy, sty, CY)
                az, bz = _seen_by_all(z0, TZ, lgz, ksz, stz, CZ)
                partial = _box_seen(kx0, ky0, kz0, ax, bx, ay, by, az, bz, KX, KY, KZ) == 0
            if partial:
                if SIMPLE:  # non-causal, stride 1: start clamp(p - k // 2, 0, lg - k), width k
                    # (rows outside the span or the axes load zeros q, dO: they add nothing)
                    wsx = tl.minimum(tl.maximum(px - ksx // 2, 0), lgx - ksx)
                    wsy = tl.minimum(tl.maximum(py - ksy // 2, 0), lgy - ksy)
                    wsz = tl.minimum(tl.maximum(pz - ksz // 2, 0), lgz - ksz)
                    wwx, wwy, wwz = ksx, ksy, ksz
                else:
                    wsx, wwx, wsy, wwy, wsz, wwz = _q_windows(px, py, pz, lgx, lgy, lgz, ksx, ksy,
                                                              ksz, stx, sty, stz, CX, CY, CZ)  # fmt: skip
                ok = _inside(kx[:, None], ky[:, None], kz[:, None], wsx[None, :], wwx, wsy[None, :],
                             wwy, wsz[None, :], wwz, HAS_Z)  # fmt: skip
                pt = tl.where(ok, pt, 0.0)
            dk, dv = _dkdv_update(dk, dv, pt, q, do, v, delta, IEEE)
    tok = ((kx * dlx + gx) * ny + ky * dly + gy) * nz + kz * dlz + gz
    out = ((b * n + tok[:, None]) * n_kv + hk) * HEAD_D + offs_d[None, :]  # (B, N, Hkv, D)
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=in_k[:, None])


# ----------------------------------------------------------------------------- launchers


def _box_shape(block: int, ndim: int) -> tuple[int, int, int]:
    """Split a power-of-two tile size into an (x, y, z) box, later axes getting the larger
    factors (e.g. 2-D 128 -> 8x16x1, 3-D 16 -> 2x2x4, 3-D 128 -> 4x4x8)."""
    e = block.bit_length() - 1
    parts = [e // ndim + (i >= ndim - e % ndim) for i in range(ndim)]
    return tuple(1 << p for p in parts) + (1,) * (3 - ndim)


@functools.lru_cache(maxsize=256)
def _choose_boxes(shape, ks, ds, ss, ndim: int, block_m: int, block_n: int, by_keys: bool):
    """(query box, key box) as (x, y, z) for one launch: the power-of-two factorisations of
    block_m / block_n that visit the fewest (query, key) tile pairs, by the per-axis span rule
    (a box of T queries reaches about T + K + S - 2 keys, clipped to the axis). For dK/dV
    (by_keys) the key box is the program's and the queries are visited; for the forward and dQ
    the other way round. Ties keep the squarest boxes (_box_shape). Measured on an H100
    (docs/benchmarks.md): 2-D 13x13 fwd+bwd 0.668 -> 0.614 ms, 3-D 7x7x7 1.618 -> 1.524 ms."""

    def factorisations(block):
        e = block.bit_length() - 1
        out = []
        for ex in range(e + 1):
            for ey in range(e + 1 - ex):
                ez = e - ex - ey
                if ndim == 2 and (ez or min(ex, ey) < min(2, e // 2)):
                    continue  # 2-D: no side under 4 (2x32 boxes measured 1.7x slower at k=3)
                out.append((1 << ex, 1 << ey, 1 << ez))
        return out

    lens = [-(-n // d) for n, d in zip(shape, ds)]  # longest dilation group per axis

    def cost(fixed, visited):  # programs over the fixed box x tiles of the visited box
        programs = math.prod(-(-L // f) for L, f in zip(lens, fixed))
        spans = [min(f + k + s - 2, L) for f, k, s, L in zip(fixed, ks, ss, lens)]
        return programs * math.prod(-(-sp // v) for sp, v in zip(spans, visited))

    best = (_box_shape(block_m, ndim), _box_shape(block_n, ndim))
    best_cost = cost(best[1], best[0]) if by_keys else cost(best[0], best[1])
    for bm in factorisations(block_m):
        for bn in factorisations(block_n):
            c = cost(bn, bm) if by_keys else cost(bm, bn)
            if c < 0.98 * best_cost:
                best, best_cost = (bm, bn), c
    return best


def _axes(shape, win):
    """Token shape and per-axis window padded to three axes (a unit axis has kernel 1)."""
    ks, ds, ss, cs = win
    pad = 3 - len(shape)
    return (tuple(shape) + (1,) * pad, tuple(ks) + (1,) * pad, tuple(ds) + (1,) * pad,
            tuple(ss) + (1,) * pad, tuple(cs) + (False,) * pad)  # fmt: skip


def _strides3(t):
    """(b, x, y, z, h, d) strides of a (B, *tokens, H, D) tensor, z stride 0 for 2-D."""
    s = t.stride()
    return (*s[:-2], *(0,) * (6 - len(s)), *s[-2:])


def _launch_geometry(axes, heads: int, ndim: int, tiles, by_keys: bool):
    """For one launch over the padded ``axes`` (_axes): the (query, key) boxes, the scalar
    kernel arguments and the grid's tile count over the program's box (query box, or key box
    for dK/dV)."""
    shape, ks, ds, ss, cs = axes
    bm, bn = _choose_boxes(shape, ks, ds, ss, ndim, tiles.block_m, tiles.block_n, by_keys)
    box = bn if by_keys else bm
    nt = [_cdiv(-(-n // d), t) for n, d, t in zip(shape, ds, box)]  # longest group
    args = (*shape, *ds, *ks, *ss, *nt, heads)
    return bm, bn, args, nt


def _nd_opts(opts: dict) -> dict:
    """Under the interpreter, time goes by programs and loop steps more than by tile elements:
    default to 64-element boxes (8x8, 4x4x4) there instead of flash's 16."""
    if not _INTERPRET:
        return opts
    return {**opts, "block_m": opts["block_m"] or 64, "block_n": opts["block_n"] or 64}


# 16-bit defaults (block_m, block_n, warps, stages) per kernel and layout, timed on the issue's
# cases (H100; scripts/bench_attention.py --na 2d|3d --sweep [--sweep-part dq|dkdv]): small
# boxes waste the least of the halo. 2-D (B2 H8 128x128 D64 k13): dK/dV with 32-query tiles
# took the backward from 0.455 to 0.427 ms, dQ with 3 stages from 0.449 to 0.430 ms; 3-D
# (B1 H8 32^3 D64 k7) keeps 64-query dK/dV tiles (1.100 ms against 1.224 with 32).
_ND_TILES = {"fwd": (64, 32, 4, 3), "fwd_d128": (64, 64, 4, 3), "dq": (64, 64, 4, 3),
             "dkdv_2d": (32, 64, 4, 3), "dkdv_3d": (64, 64, 4, 2),
             "bwd_d128": (64, 64, 4, 2)}  # fmt: skip


def _nd_tiles(opts: dict, d: int, dtype: torch.dtype, kernel: str, ndim: int = 2):
    """Tile sizes of one kernel ("fwd", "dq", "dkdv") of a 2-D or 3-D layout: given options,
    else the 16-bit defaults above, else flash's."""
    opts = _nd_opts(opts)
    if not _INTERPRET and dtype != torch.float32:
        if kernel == "fwd":
            key = "fwd_d128" if d > 64 else "fwd"
        else:  # D=128 backward (large 2-D k80: 63.0 ms vs 67.1 with the D=64 2-D tiles)
            key = "bwd_d128" if d > 64 else ("dq" if kernel == "dq" else f"dkdv_{ndim}d")
        base = _ND_TILES[key]
        names = ("block_m", "block_n", "num_warps", "num_stages")
        opts = {**opts, **{n: base[i] if opts[n] is None else opts[n] for i, n in enumerate(names)}}
    return _tiles(opts, d, dtype, kernel != "fwd")


def _tma_ok(win, opts: dict, *tensors) -> bool:
    """Tensor descriptors serve a launch when every dilation is 1, tiles are boxes, and each
    tensor has (H, D) merged (stride D, 1) with 16-byte aligned strides and address."""
    if opts.get("tma") is False or opts.get("flat_tiles") or any(d != 1 for d in win[1]):
        return False
    return all(t.stride(-2) == t.shape[-1] for t in tensors) and _aligned_for_tma(*tensors)


def _tma_desc(t, box):
    """Descriptor of a (B, *tokens, H, D) tensor as (B, X, Y, Z, H*D) (a unit z axis for 2-D),
    moving (1, *box, D) blocks of one head."""
    b, *tokens, h, d = t.shape
    strides = list(t.stride()[: 1 + len(tokens)])
    if len(tokens) == 2:
        tokens, strides = [*tokens, 1], [*strides, h * d]
    return _TensorDescriptor(t, [b, *tokens, h * d], [*strides, 1], [1, *box, d])


@functools.lru_cache(maxsize=512)
def _plan(kind: str, shape, h: int, hkv: int, d: int, dtype, win, opts_key):
    """Everything of a launch that follows from shapes, window and options, once per
    combination (host time: the eager fwd+bwd step of a small layer is bound by it):
    kind "fwd" -> ((grid, scalar args, tiles, constexprs),); "bwd" -> dQ's, then dK/dV's."""
    opts = dict(opts_key)
    ndim = len(shape)
    axes = _axes(shape, win)
    ds, cs = axes[2], axes[4]
    const = dict(CX=cs[0], CY=cs[1], CZ=cs[2], HEAD_D=d, IEEE=dtype == torch.float32,
                 FLAT=bool(opts.get("flat_tiles")), HAS_Z=axes[0][2] > 1)  # fmt: skip
    if kind == "fwd":
        kernels = (("fwd", False, h),)
    else:  # opts["dq_tiles"] / opts["dkdv_tiles"] = (block_m, block_n, warps, stages): one
        # kernel's tiles (sweeps: scripts/bench_attention.py --sweep-part); block_m etc. both's
        kernels = (("dq", False, h), ("dkdv", True, hkv))
    names = ("block_m", "block_n", "num_warps", "num_stages")
    out = []
    for kernel, by_keys, heads in kernels:
        given = dict(zip(names, opts.get(f"{kernel}_tiles") or ()))
        tiles = _nd_tiles({**opts, **given}, d, dtype, kernel, ndim)
        bm, bn, args, nt = _launch_geometry(axes, h, ndim, tiles, by_keys)
        grid = (nt[0] * nt[1] * nt[2], ds[0] * ds[1] * ds[2], heads)  # x batch at launch
        # a query box of T sees a key box of K whole on an axis only if the kernel k >= T + K - 1
        # (away from the borders); where no axis allows it, skip the per-tile test
        mask_all = const["FLAT"] or any(k < t + kk - 1 for k, t, kk in zip(axes[1], bm, bn))
        out.append((grid, (*args, h // hkv), tiles, dict(const, TY=bm[1], TZ=bm[2], KY=bn[1],
                                                          KZ=bn[2], MASK_ALL=mask_all), bm, bn))  # fmt: skip
    return tuple(out)


def _forward_nd(q, k, v, win, scale: float, opts: dict):
    """q (B, *tokens, H, D), k/v (B, *tokens, Hkv, D), 2 or 3 token axes, any strides ->
    o (B, *tokens, H, D) contiguous, lse (B, H, N) fp32."""
    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    shape = q.shape[1:-2]
    ((grid, args, tiles, const, bm, bn),) = _plan("fwd", shape, h, k.shape[-2], d, q.dtype, win,
                                                  tuple(opts.items()))  # fmt: skip
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    n = math.prod(shape)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    scores = b * h * n * math.prod(win[0])
    tma = _want_tma(opts, scores) and _tma_ok(win, opts, q, k, v, o)
    descs = [_tma_desc(t, box) for t, box in ((q, bm), (k, bn), (v, bn), (o, bm))] if tma \
        else [None] * 4  # fmt: skip
    _launch(_fwd_nd_kernel, (grid[0], grid[1], b * grid[2]), q, k, v, o, lse, *_strides3(q),
            *_strides3(k), *_strides3(v), *args, scale * _LOG2E, *descs, tiles=tiles, TMA=tma,
            **const)  # fmt: skip
    return o, lse


def _backward_nd(do, dlse, q, k, v, o, lse, win, scale: float, opts: dict):
    """Gradients of sum(o * do) + sum(lse * dlse) for 2-D/3-D layouts; dk/dv GQA-summed."""
    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    n = lse.shape[-1]
    do = do.reshape(b, n, h, d)  # a view for the usual (mergeable) layouts
    if do.stride() != (n * h * d, h * d, d, 1):
        do = do.contiguous()  # the ND kernels read dO as contiguous (B, N, H, D)
    # (B, H, N, 2) fp32: (LSE log2, rowsum(dO * O) - dLSE) a query, written by the dQ kernel
    delta = torch.empty((*lse.shape, 2), dtype=torch.float32, device=lse.device)
    dlse = None if dlse is None else dlse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    strides = (*_strides3(q), *_strides3(k), *_strides3(v))
    dq_plan, dkdv_plan = _plan("bwd", q.shape[1:-2], h, k.shape[-2], d, q.dtype, win,
                               tuple(opts.items()))  # fmt: skip
    # dQ first: it writes DELTA, which dK/dV reads
    for kernel, outs, (grid, args, tiles, const, _, _), extra in (
        (_dq_nd_kernel, (dq, o, delta if dlse is None else dlse), dq_plan,
         dict(HAS_DLSE=dlse is not None)),
        (_dkdv_nd_kernel, (dk, dv), dkdv_plan,
         dict(SIMPLE=not any(win[3]) and all(s == 1 for s in win[2]))),
    ):  # fmt: skip
        _launch(kernel, (grid[0], grid[1], b * grid[2]), q, k, v, do, lse, delta, *outs,
                *strides, *args, scale * _LOG2E, scale, tiles=tiles, **const, **extra)  # fmt: skip
    return dq, dk, dv
