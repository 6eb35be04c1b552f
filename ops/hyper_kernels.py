"""Gathered attention in Triton: the non-causal step of HyperAttention in one kernel per pass.

HyperAttention's non-causal step gives each tile of queries one list of keys: the key block of
its bucket (``n_block`` keys, weight 1) followed by the sampled columns (weight w each, i.e.
log w added to their scores). Done with PyTorch gathers it copies every tile's queries, block
keys and sampled keys into fixed-shape batches, runs two exact attentions and merges them
through their LSEs. Here one kernel reads q rows and keys *through the index lists* and runs
one online softmax over the whole list (the LSE merge of the two parts is exactly a softmax
over their union with the sampled scores shifted by log w), writing o and the LSE straight to
the queries' rows. Nothing is copied; the tile layout is only indices.

- Forward: grid (tiles x row chunks of BLOCK_M, BH). Empty slots of a tile hold the index n_q
  and are masked; chunks past a tile's last query return at once (a bucket's last tile is
  mostly empty: a third of the slots at 64k; skipping them took 64k fwd+bwd from 79.9 to
  74.6-75.3 ms on an H100).
- Backward: a dQ kernel per (row chunk, BH) (each query belongs to one tile: plain stores) and
  a dK/dV kernel per (tile, key chunk, BH). Adjacent tiles with the same key list (the tiles of
  one key block: a bucket with many queries fills several) form runs of up to _RUN_TILES; the
  run's first tile sums dK/dV over all its rows in registers. Sampled columns repeat and
  serve many runs: they are added with atomics into fp32 sums, once per run. A block key in
  one run's block only (in HyperAttention all but the few of the last block, which overlaps
  its neighbour, and of split runs) then gets its final dK/dV with a plain store, starting
  from its sampled sum; the rest add into the fp32 sums, cast afterwards. Atomic sums are not
  bitwise deterministic from call to call. (Earlier: one atomic add per (tile, key) into fp32
  buffers, then a cast, ~80 ms of a 233 ms fwd+bwd at 131k on an H100.)
- The LSE is differentiable (Delta - dLSE, as in ``ops/flash.py``), so the causal recursion's
  merges get the true gradient.
"""

from __future__ import annotations

import math

import torch

from .contract import kernels_run_on
from .flash import (
    _INTERPRET,
    _LOG2E,
    KernelAttention,
    _cdiv,
    _dot,
    _jit,
    _row_delta,
    _softmax_update,
    _Tiles,
    tl,
)
from .launch import launch

_HEAD_DIMS = (16, 32, 64, 128)


def supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernels serve these inputs (else HyperAttention gathers in PyTorch)."""
    return (
        kernels_run_on(q)
        and q.shape[-1] in _HEAD_DIMS
        and v.shape[-1] in _HEAD_DIMS
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


@_jit
def _rows(QIDX, bh, pid, n_q, n_tiles, tile_rows, BLOCK_M: tl.constexpr):
    """Program pid of one BH row: its tile, and the query indices (n_q = empty) of its rows."""
    subs = (tile_rows + BLOCK_M - 1) // BLOCK_M
    tile = pid // subs
    rows = (pid % subs) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_t = rows < tile_rows
    qi = tl.load(QIDX + (bh * n_tiles + tile) * tile_rows + rows, mask=in_t, other=n_q)
    return tile, qi, qi < n_q


@_jit
def _chunk_empty(FILL, bh, pid, n_tiles, tile_rows, BLOCK_M: tl.constexpr):
    """Whether program pid's chunk of rows lies past its tile's last query (FILL (BH, T)
    int32: each tile's last filled slot + 1). A bucket with few queries leaves most of its
    last tile empty: about a third of HyperAttention's slots."""
    subs = (tile_rows + BLOCK_M - 1) // BLOCK_M
    return (pid % subs) * BLOCK_M >= tl.load(FILL + bh * n_tiles + pid // subs)


@_jit
def _keys(K, V, kbase, bh, j0, n_keys, n_block, bias_s, skb, skn, skd, svb, svn, svd,
          HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Key chunk [j0, j0 + BLOCK_N) of a tile's list: indices, k (BN, D), v (BN, DV), the
    validity mask and the per-column score shift (log w / scale on sampled columns)."""
    cols = j0 + tl.arange(0, BLOCK_N)
    in_k = cols < n_keys
    ki = tl.load(kbase + cols, mask=in_k, other=0)
    offs_d = tl.arange(0, HEAD_D)
    offs_v = tl.arange(0, HEAD_DV)
    k = tl.load(K + bh * skb + ki[:, None] * skn + offs_d[None, :] * skd, mask=in_k[:, None],
                other=0.0)  # fmt: skip
    v = tl.load(V + bh * svb + ki[:, None] * svn + offs_v[None, :] * svd, mask=in_k[:, None],
                other=0.0)  # fmt: skip
    shift = tl.where(cols >= n_block, bias_s, 0.0)
    return ki, k, v, in_k, shift


@_jit
def _merge_rows(o1, l1, o2, l2):
    """Two attentions of the same rows over disjoint keys, (BM, DV) outputs and LSEs in log2
    units, merged through their LSEs: (o fp32, lse in log2 units)."""
    mx = tl.maximum(l1, l2)
    mx = tl.where(mx == -float("inf"), 0.0, mx)
    w1 = tl.exp2(l1 - mx)
    w2 = tl.exp2(l2 - mx)
    tot = w1 + w2
    o = (o1.to(tl.float32) * w1[:, None] + o2.to(tl.float32) * w2[:, None]) / tot[:, None]
    return o, mx + tl.log2(tot)


@_jit
def _gfwd_kernel(Q, K, V, O, LSE, QIDX, KIDX, FILL, sqb, sqn, sqd, skb, skn, skd, svb, svn,
                 svd, sob, son, sod, slb, n_q, n_tiles, tile_rows, n_keys, n_block, bias_s,
                 qk_scale, MERGE: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One chunk of BLOCK_M rows of one tile: o and LSE (natural log, batch stride slb) over
    its key list. MERGE: O and LSE already hold an attention of these rows over other keys;
    the two are merged through their LSEs in place (each row is one program's). A chunk past
    its tile's last query (FILL) does nothing."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    bias_s = tl.cast(bias_s, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    bh = tl.program_id(1).to(tl.int64)
    if _chunk_empty(FILL, bh, tl.program_id(0), n_tiles, tile_rows, BLOCK_M):
        return
    tile, qi, in_q = _rows(QIDX, bh, tl.program_id(0), n_q, n_tiles, tile_rows, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    offs_v = tl.arange(0, HEAD_DV)
    q = tl.load(Q + bh * sqb + qi[:, None] * sqn + offs_d[None, :] * sqd, mask=in_q[:, None],
                other=0.0)  # fmt: skip
    acc = tl.zeros([BLOCK_M, HEAD_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    kbase = KIDX + (bh * n_tiles + tile) * n_keys
    for j0 in range(0, n_keys, BLOCK_N):
        ki, k, v, in_k, shift = _keys(K, V, kbase, bh, j0, n_keys, n_block, bias_s, skb,
                                      skn, skd, svb, svn, svd, HEAD_D, HEAD_DV, BLOCK_N)  # fmt: skip
        s = _dot(q, tl.trans(k), IEEE) + shift[None, :]
        s = tl.where(in_k[None, :], s, -float("inf"))
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, qk_scale, IEEE)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse2 = m_i + tl.log2(l_safe)  # log2 units
    o_ptrs = O + bh * sob + qi[:, None] * son + offs_v[None, :] * sod
    if MERGE:
        o_prev = tl.load(o_ptrs, mask=in_q[:, None], other=0.0)
        l_prev = tl.load(LSE + bh * slb + qi, mask=in_q, other=0.0) * 1.4426950408889634
        o, lse2 = _merge_rows(o_prev, l_prev, o, lse2)
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=in_q[:, None])
    tl.store(LSE + bh * slb + qi, lse2 / 1.4426950408889634, mask=in_q)


@_jit
def _row_state(Q, DO, LSE, DELTA, QIDX, bh, pid, sqb, sqn, sqd, sdob, slb, n_q, n_tiles,
               tile_rows, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_M: tl.constexpr):  # fmt: skip
    """Rows of chunk pid: query indices, validity, q (BM, D), dO (BM, DV) ((BH, Nq, DV), rows
    packed, batch stride sdob), LSE in log2 units and Delta - dLSE ((BH, Nq), unit row
    stride, batch stride slb)."""
    tile, qi, in_q = _rows(QIDX, bh, pid, n_q, n_tiles, tile_rows, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    offs_v = tl.arange(0, HEAD_DV)
    q = tl.load(Q + bh * sqb + qi[:, None] * sqn + offs_d[None, :] * sqd, mask=in_q[:, None],
                other=0.0)  # fmt: skip
    do = tl.load(DO + bh * sdob + qi[:, None] * HEAD_DV + offs_v[None, :], mask=in_q[:, None],
                 other=0.0)  # fmt: skip
    lse = tl.load(LSE + bh * slb + qi, mask=in_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * slb + qi, mask=in_q, other=0.0)
    return tile, qi, in_q, q, do, lse, delta


@_jit
def _gdq_kernel(Q, K, V, DO, LSE, DELTA, DQ, QIDX, KIDX, FILL, sqb, sqn, sqd, skb, skn, skd, svb,
                svn, svd, sdqb, sdob, slb, n_q, n_tiles, tile_rows, n_keys, n_block, bias_s,
                qk_scale, scale, ACC: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One chunk of rows: dQ over its tile's key list (each query is in one tile: no atomics).
    DQ (BH, Nq, D): rows packed, batch stride sdqb. ACC: added to what DQ holds (in fp32,
    rounded once). A chunk past its tile's last query (FILL) does nothing."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    bias_s = tl.cast(bias_s, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    bh = tl.program_id(1).to(tl.int64)
    if _chunk_empty(FILL, bh, tl.program_id(0), n_tiles, tile_rows, BLOCK_M):
        return
    tile, qi, in_q, q, do, lse, delta = _row_state(Q, DO, LSE, DELTA, QIDX, bh, tl.program_id(0),
                                                   sqb, sqn, sqd, sdob, slb, n_q, n_tiles,
                                                   tile_rows, HEAD_D, HEAD_DV, BLOCK_M)  # fmt: skip
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    kbase = KIDX + (bh * n_tiles + tile) * n_keys
    for j0 in range(0, n_keys, BLOCK_N):
        ki, k, v, in_k, shift = _keys(K, V, kbase, bh, j0, n_keys, n_block, bias_s, skb, skn,
                                      skd, svb, svn, svd, HEAD_D, HEAD_DV, BLOCK_N)  # fmt: skip
        p = tl.exp2((_dot(q, tl.trans(k), IEEE) + shift[None, :]) * qk_scale - lse[:, None])
        p = tl.where(in_q[:, None] & in_k[None, :], p, 0.0)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    offs_d = tl.arange(0, HEAD_D)
    ptr = DQ + bh * sdqb + qi[:, None] * HEAD_D + offs_d[None, :]
    dq = dq * scale
    if ACC:
        dq += tl.load(ptr, mask=in_q[:, None], other=0.0).to(tl.float32)
    tl.store(ptr, dq.to(DQ.dtype.element_ty), mask=in_q[:, None])


@_jit
def _kv_grads(Q, DO, LSE, DELTA, QIDX, bh, tile, sub_end, k, v, shift, in_k, dk, dv, sqb, sqn,
              sqd, sdob, slb, n_q, n_tiles, tile_rows, qk_scale, HEAD_D: tl.constexpr,
              HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              IEEE: tl.constexpr):  # fmt: skip
    """dk + dK (without the scale), dv + dV of one key chunk (fp32 (BN, D*)), summed in
    registers over the row chunks [tile * chunks per tile, sub_end)."""
    subs = (tile_rows + BLOCK_M - 1) // BLOCK_M
    for sub in range(tile * subs, sub_end):
        _, qi, in_q, q, do, lse, delta = _row_state(Q, DO, LSE, DELTA, QIDX, bh, sub, sqb, sqn,
                                                    sqd, sdob, slb, n_q, n_tiles, tile_rows,
                                                    HEAD_D, HEAD_DV, BLOCK_M)  # fmt: skip
        st = _dot(k, tl.trans(q), IEEE) + shift[:, None]  # (BN, BM)
        pt = tl.exp2(st * qk_scale - lse[None, :])
        pt = tl.where(in_k[:, None] & in_q[None, :], pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dst = pt * (_dot(v, tl.trans(do), IEEE) - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
    return dk, dv


@_jit
def _gdkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SK, SV, CNT, RUN, QIDX, KIDX, FILL, sqb, sqn,
                  sqd, skb, skn, skd, svb, svn, svd, sdkb, sdvb, sdob, slb, n_q, n_k, n_tiles,
                  tile_rows, n_keys, n_block, bias_s, qk_scale, scale, inv_scale,
                  SAMPLES: tl.constexpr,
                  ACC: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One (tile, chunk of BLOCK_N of the block part, or of the sampled part, of its list).
    A tile that leads a run (RUN[tile] > 0 tiles with this same list) sums dK, dV over the
    run's rows, up to its last tile's last query (FILL); the others do nothing. Sampled part:
    atomic adds into the fp32 sums SK, SV.
    Block part, launched after it: a key in one run's block only (CNT == 1) has all of its
    sampled gradient in SK, SV already; the sums start from it and are stored plainly in DK, DV
    (which may be SK, SV themselves). Other keys add into SK, SV, copied out by
    _gfinish_kernel. SK, SV: contiguous (BH, Nk, D*); DK, DV: rows packed, batch strides
    sdkb, sdvb; ACC: added to what DK, DV hold. CNT (BH, Nk) int32."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    bias_s = tl.cast(bias_s, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    inv_scale = tl.cast(inv_scale, tl.float32)
    bh = tl.program_id(1).to(tl.int64)
    if SAMPLES:
        j_lo = n_block
        j_hi = n_keys
    else:
        j_lo = 0
        j_hi = n_block
    n_chunks = (j_hi - j_lo + BLOCK_N - 1) // BLOCK_N
    tile = tl.program_id(0) // n_chunks
    run = tl.load(RUN + bh * n_tiles + tile)
    j_hi = tl.where(run > 0, j_hi, 0)  # not a run's first tile: nothing loaded or stored
    # the run's rows end at its last tile's last query (FILL)
    subs = (tile_rows + BLOCK_M - 1) // BLOCK_M
    last = tile + tl.maximum(run, 1) - 1
    sub_end = tl.where(run > 0, last * subs + tl.cdiv(tl.load(FILL + bh * n_tiles + last),
                                                       BLOCK_M), 0)  # fmt: skip
    kbase = KIDX + (bh * n_tiles + tile) * n_keys
    j0 = j_lo + (tl.program_id(0) % n_chunks) * BLOCK_N
    ki, k, v, in_k, shift = _keys(K, V, kbase, bh, j0, j_hi, n_block, bias_s, skb, skn, skd, svb,
                                  svn, svd, HEAD_D, HEAD_DV, BLOCK_N)  # fmt: skip
    rows_k = (bh * n_k + ki[:, None]).to(tl.int64)
    pk = rows_k * HEAD_D + tl.arange(0, HEAD_D)[None, :]
    pv = rows_k * HEAD_DV + tl.arange(0, HEAD_DV)[None, :]
    if SAMPLES:
        dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DV], dtype=tl.float32)
    else:  # start from the sampled sums (loaded after the loop, with dK, dV live, they spill)
        cnt = tl.load(CNT + bh * n_k + ki, mask=in_k, other=0)
        own = (in_k & (cnt == 1))[:, None]
        dk = tl.load(SK + pk, mask=own, other=0.0) * inv_scale  # the scale comes after the loop
        dv = tl.load(SV + pv, mask=own, other=0.0)
    dk, dv = _kv_grads(Q, DO, LSE, DELTA, QIDX, bh, tile, sub_end, k, v, shift, in_k, dk, dv, sqb,
                       sqn, sqd, sdob, slb, n_q, n_tiles, tile_rows, qk_scale, HEAD_D, HEAD_DV,
                       BLOCK_M, BLOCK_N, IEEE)  # fmt: skip
    dk = dk * scale
    if SAMPLES:
        tl.atomic_add(SK + pk, dk, mask=in_k[:, None])
        tl.atomic_add(SV + pv, dv, mask=in_k[:, None])
    else:
        shared = (in_k & (cnt != 1))[:, None]
        ok = bh * sdkb + ki[:, None].to(tl.int64) * HEAD_D + tl.arange(0, HEAD_D)[None, :]
        ov = bh * sdvb + ki[:, None].to(tl.int64) * HEAD_DV + tl.arange(0, HEAD_DV)[None, :]
        dk_out = dk
        dv_out = dv
        if ACC:
            dk_out += tl.load(DK + ok, mask=own, other=0.0).to(tl.float32)
            dv_out += tl.load(DV + ov, mask=own, other=0.0).to(tl.float32)
        tl.store(DK + ok, dk_out.to(DK.dtype.element_ty), mask=own)
        tl.store(DV + ov, dv_out.to(DV.dtype.element_ty), mask=own)
        tl.atomic_add(SK + pk, dk, mask=shared)
        tl.atomic_add(SV + pv, dv, mask=shared)


@_jit
def _gfinish_kernel(SK, SV, DK, DV, CNT, sdkb, sdvb, n_k, ACC: tl.constexpr,
                    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Keys not stored by _gdkdv_kernel (CNT != 1: in no run's block, or in several): their
    fp32 sums SK, SV cast into DK, DV (added to them with ACC). Rows of the other keys are not
    read."""
    bh = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < n_k
    cnt = tl.load(CNT + bh * n_k + r, mask=ok, other=1)
    todo = (ok & (cnt != 1))[:, None]
    rows = bh * n_k + r[:, None]
    pk = rows * HEAD_D + tl.arange(0, HEAD_D)[None, :]
    pv = rows * HEAD_DV + tl.arange(0, HEAD_DV)[None, :]
    ok = bh * sdkb + r[:, None] * HEAD_D + tl.arange(0, HEAD_D)[None, :]
    ov = bh * sdvb + r[:, None] * HEAD_DV + tl.arange(0, HEAD_DV)[None, :]
    dk = tl.load(SK + pk, mask=todo, other=0.0)
    dv = tl.load(SV + pv, mask=todo, other=0.0)
    if ACC:
        dk += tl.load(DK + ok, mask=todo, other=0.0).to(tl.float32)
        dv += tl.load(DV + ov, mask=todo, other=0.0).to(tl.float32)
    tl.store(DK + ok, dk.to(DK.dtype.element_ty), mask=todo)
    tl.store(DV + ov, dv.to(DV.dtype.element_ty), mask=todo)


def _packed_rows(x: torch.Tensor) -> bool:
    """(BH, N, D) with rows D apart and unit last stride (a batch stride of its own is fine)."""
    return x.stride(-1) == 1 and (x.shape[1] <= 1 or x.stride(1) == x.shape[-1])


# Backward tiles by kernel ("dq", "dkdv"): None takes _tiles'. A sweep on the GPU sets them
# (scripts/bench_hyper.py --sweep-bwd-tiles).
BWD_TILES: dict[str, tuple[int, int, int, int] | None] = {"dq": None, "dkdv": None}


def _bwd_tiles(q: torch.Tensor, kernel: str) -> tuple[int, int, int, int]:
    """(block_m, block_n, warps, stages) of a backward kernel. dK/dV in 16-bit: 32 rows a
    step (H100, 64k's top level: block part 1.93 ms against 2.09 with 64 rows, sampled part
    3.04 against 3.10; the H200 sweep had it first too)."""
    if _INTERPRET:
        return _tiles(q)
    if BWD_TILES.get(kernel) is not None:
        return BWD_TILES[kernel]
    if kernel == "dkdv" and q.dtype != torch.float32:
        return 32, 64, 4, 3
    return _tiles(q)


def _tiles(q: torch.Tensor) -> tuple[int, int, int, int]:
    """(block_m, block_n, warps, stages): 16x16 under the interpreter, H100-sized otherwise."""
    if _INTERPRET:
        return 16, 16, 4, 1
    if q.dtype == torch.float32:
        return 64, 32, 4, 2
    return 64, 64, 4, 3  # H100, 131k causal D=128: fwd 54.2 ms against 57.8 with 64x32/4/2


def _forward(q, k, v, q_index, k_index, n_block: int, log_w: float, scale: float, into=None):
    """(o, lse) of the gathered attention. ``into`` = (o, lse) (BH, Nq, Dv) and (BH, Nq) fp32
    (any strides; lse's last stride 1): attention of the same rows over other keys, merged
    with this one in place through the LSEs (no o or lse of its own, no merge pass), and
    returned."""
    bh, nq, d = q.shape
    dv = v.shape[-1]
    n_tiles, n_keys = k_index.shape[1], k_index.shape[2]
    tile_rows = q_index.shape[1] // max(n_tiles, 1)
    bm, bn, warps, stages = _tiles(q)
    if into is not None:
        o, lse = into
        if lse.stride(-1) != 1:
            raise ValueError("gathered forward: the LSE to merge into needs a unit row stride")
    else:
        o = torch.empty((bh, nq, dv), dtype=q.dtype, device=q.device)
        lse = torch.empty((bh, nq), dtype=torch.float32, device=q.device)
    grid = (n_tiles * _cdiv(tile_rows, bm), bh)
    if all(grid):
        fill = _tile_fill(q_index, nq, n_tiles)
        launch(_gfwd_kernel, grid, q, k, v, o, lse, q_index, k_index, fill, *q.stride(),
               *k.stride(), *v.stride(), *o.stride(), lse.stride(0), nq, n_tiles, tile_rows,
               n_keys, n_block, log_w / scale, scale * _LOG2E, MERGE=into is not None,
               HEAD_D=d, HEAD_DV=dv, BLOCK_M=bm, BLOCK_N=bn, IEEE=q.dtype == torch.float32,
               num_warps=warps, num_stages=stages)  # fmt: skip
    return o, lse


# Longest run of tiles one dK/dV program sums: a bucket with many queries fills many tiles of
# one key list, and one program for all of them would end long after the others. Runs split
# there share their keys, which then take the atomic path (CNT > 1).
_RUN_TILES = 8


def _tile_fill(q_index, n_q: int, n_tiles: int) -> torch.Tensor:
    """(BH, T) int32: each tile's last slot holding a query, + 1 (0: an empty tile). The
    kernels skip the row chunks past it."""
    bh = q_index.shape[0]
    slots = q_index.view(bh, n_tiles, -1)
    pos = torch.arange(1, slots.shape[-1] + 1, dtype=torch.int32, device=q_index.device)
    return torch.where(slots < n_q, pos, 0).amax(-1).to(torch.int32)


def _runs(fill, k_index, n_k: int, n_block: int):
    """(run (BH, T) int32, cnt (BH, Nk) int32): run[t] > 0 where tile t leads a run of that
    many adjacent tiles with queries (``fill`` > 0, from :func:`_tile_fill`) and the same key
    list (at most _RUN_TILES), else 0; cnt[key]: how often the key occurs in the block parts
    of the runs (1: one program owns its dK/dV row)."""
    bh, n_tiles, _ = k_index.shape
    t = torch.arange(n_tiles, device=k_index.device)
    full = fill > 0
    cont = torch.zeros_like(full)  # continues the previous tile's run
    cont[:, 1:] = full[:, 1:] & full[:, :-1] & (k_index[:, 1:] == k_index[:, :-1]).all(-1)
    start = torch.where(cont, 0, t).cummax(1).values  # first tile of the group of equal lists
    stop = torch.where(cont, n_tiles, t)  # next tile outside the group, from each tile
    end = torch.cat([stop[:, 1:], stop.new_full((bh, 1), n_tiles)], 1).flip(1).cummin(1)
    end = end.values.flip(1)
    lead = full & ((t - start) % _RUN_TILES == 0)
    run = torch.where(lead, (end - t).clamp(max=_RUN_TILES), 0).to(torch.int32)
    cnt = torch.zeros((bh, n_k), dtype=torch.int32, device=k_index.device)
    blocks = k_index[:, :, :n_block]
    cnt.scatter_add_(1, blocks.reshape(bh, -1), lead[..., None].expand_as(blocks).reshape(bh, -1)
                     .to(torch.int32))  # fmt: skip
    return run, cnt


def row_delta(o, do, dlse=None):
    """(BH, N) fp32: rowsum(dO * O) - dLSE (flash's pass, one head). o contiguous (BH, N, Dv);
    do any strides; dlse (BH, N) or None."""
    tiles = _Tiles(16 if _INTERPRET else 64, 16, 4, 1)
    dlse = None if dlse is None else dlse.unsqueeze(1)
    return _row_delta(o.unsqueeze(2), do.unsqueeze(2), dlse, tiles).squeeze(1)


def _backward(do, dlse, q, k, v, o, lse, q_index, k_index, n_block: int, log_w: float,
              scale: float, out=None, delta=None):  # fmt: skip
    """(dq, dk, dv); with ``out`` = (dq, dk, dv) buffers (rows packed: last stride 1, row
    stride D*), the gradients are added into them in the kernels instead (one rounding, no
    temporaries) and ``out`` is returned. ``delta`` (rowsum(dO * O) - dLSE, laid out as
    ``lse``) given: ``o`` and ``dlse`` are not read, and (do, lse, delta) may be row views of
    larger tensors (the fused causal recursion passes its top level's)."""
    if out is not None and (q.dtype == torch.float32 or not all(_packed_rows(x) for x in out)):
        for acc, g in zip(out, _backward(do, dlse, q, k, v, o, lse, q_index, k_index, n_block,
                                         log_w, scale, delta=delta)):  # fmt: skip
            acc.add_(g)
        return out
    bh, nq, d = q.shape
    nk, dv = k.shape[1], v.shape[-1]
    n_tiles, n_keys = k_index.shape[1], k_index.shape[2]
    tile_rows = q_index.shape[1] // max(n_tiles, 1)
    bm, bn, warps, stages = _bwd_tiles(q, "dq")
    if not _packed_rows(do):
        do = do.contiguous()
    if delta is None:
        lse = lse.contiguous()
        delta = row_delta(o, do, dlse)  # one pass, not four (~5 ms of the 64k causal backward)
    elif not (lse.stride() == delta.stride() and lse.stride(-1) == 1):
        lse, delta = lse.contiguous(), delta.contiguous()
    acc = out is not None
    dq = out[0] if acc else torch.empty((bh, nq, d), dtype=q.dtype, device=q.device)
    # fp32 sums for the sampled columns and the keys no single program owns; fp32 inputs
    # take their results in place
    sk = torch.zeros((bh, nk, d), dtype=torch.float32, device=q.device)
    sv = torch.zeros((bh, nk, dv), dtype=torch.float32, device=q.device)
    fp32 = q.dtype == torch.float32
    if acc:
        dk, dvv = out[1], out[2]
    else:
        dk = sk if fp32 else torch.empty((bh, nk, d), dtype=k.dtype, device=q.device)
        dvv = sv if fp32 else torch.empty((bh, nk, dv), dtype=v.dtype, device=q.device)
    args = (*q.stride(), *k.stride(), *v.stride())
    const = dict(HEAD_D=d, HEAD_DV=dv, BLOCK_M=bm, BLOCK_N=bn, IEEE=q.dtype == torch.float32,
                 num_warps=warps, num_stages=stages)  # fmt: skip
    kbm, kbn, kwarps, kstages = _bwd_tiles(q, "dkdv")
    const_kv = dict(const, BLOCK_M=kbm, BLOCK_N=kbn, num_warps=kwarps, num_stages=kstages)
    if not (n_tiles and bh):
        return (dq, dk, dvv) if acc else (dq.zero_(), dk.zero_(), dvv.zero_())
    fill = _tile_fill(q_index, nq, n_tiles)
    run, cnt = _runs(fill, k_index, nk, n_block)
    launch(_gdq_kernel, (n_tiles * _cdiv(tile_rows, bm), bh),
           q, k, v, do, lse, delta, dq, q_index, k_index, fill, *args, dq.stride(0), do.stride(0),
           lse.stride(0), nq, n_tiles, tile_rows, n_keys, n_block, log_w / scale,
           scale * _LOG2E, scale, ACC=acc, **const)  # fmt: skip
    for samples, width in ((True, n_keys - n_block), (False, n_block)):  # samples first
        if width > 0:
            launch(_gdkdv_kernel, (n_tiles * _cdiv(width, kbn), bh),
                   q, k, v, do, lse, delta, dk, dvv, sk, sv, cnt, run, q_index, k_index, fill,
                   *args,
                   dk.stride(0), dvv.stride(0), do.stride(0), lse.stride(0), nq, nk, n_tiles,
                   tile_rows, n_keys, n_block, log_w / scale, scale * _LOG2E, scale,
                   1.0 / scale if scale else 0.0, SAMPLES=samples, ACC=acc,
                   **const_kv)  # fmt: skip
    if not fp32 and nk:
        block = 16 if _INTERPRET else 32
        launch(_gfinish_kernel, (_cdiv(nk, block), bh), sk, sv, dk, dvv, cnt, dk.stride(0),
               dvv.stride(0), nk, ACC=acc, HEAD_D=d, HEAD_DV=dv, BLOCK=block)  # fmt: skip
    return dq, dk, dvv


def gathered_attention(q, k, v, q_index, k_index, n_block: int, weight: float, scale: float):
    """Each tile t of BH row r: queries ``q_index[r, t*R:(t+1)*R]`` (R rows; n_q marks an empty
    slot; every query in exactly one tile) attend to keys ``k_index[r, t]``, whose first
    ``n_block`` columns have weight 1 and the rest weight ``weight``. q (BH, Nq, D), k (BH, Nk,
    D), v (BH, Nk, Dv) any strides -> o (BH, Nq, Dv), lse (BH, Nq) fp32, both differentiable.
    Any lists are correct; the backward is fastest where tiles sharing a list are adjacent and
    the block parts of different lists rarely share keys (HyperAttention's layout)."""
    q_index, k_index = q_index.contiguous(), k_index.contiguous()
    args = (q_index, k_index, int(n_block), math.log(weight), float(scale))
    return KernelAttention.apply(q, k, v, _forward, _backward, args)


# ----------------------------------------------------------------------------- merge of halves


@_jit
def _merge_bwd_kernel(DO, DL, O, L, O12, L12, O3, L3, DO12, DL12, DO3, DL3, n, h,
                      HAS_DL: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Gradients of the merge: with w = exp(lse_part - lse), d o_part = w dO and d lse_part =
    w (rowsum(dO (o_part - o)) + dLSE); the copied rows pass dO and dLSE through."""
    bh = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs = tl.arange(0, DV)
    ok = r < n
    second = ok & (r >= h)
    r3 = tl.where(second, r - h, 0)
    row = (bh * n + r[:, None]) * DV + offs[None, :]
    row3 = (bh * (n - h) + r3[:, None]) * DV + offs[None, :]
    do = tl.load(DO + row, mask=ok[:, None], other=0.0).to(tl.float32)
    o = tl.load(O + row, mask=ok[:, None], other=0.0).to(tl.float32)
    o1 = tl.load(O12 + row, mask=ok[:, None], other=0.0).to(tl.float32)
    o3 = tl.load(O3 + row3, mask=second[:, None], other=0.0).to(tl.float32)
    lse = tl.load(L + bh * n + r, mask=ok, other=0.0)
    l1 = tl.load(L12 + bh * n + r, mask=ok, other=0.0)
    l3 = tl.load(L3 + bh * (n - h) + r3, mask=second, other=-float("inf"))
    dl = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_DL:
        dl = tl.load(DL + bh * n + r, mask=ok, other=0.0)
    w1 = tl.where(second, tl.exp(l1 - lse), 1.0)
    w3 = tl.where(second, tl.exp(l3 - lse), 0.0)
    dl1 = tl.where(second, w1 * (tl.sum(do * (o1 - o), 1) + dl), dl)
    dl3 = w3 * (tl.sum(do * (o3 - o), 1) + dl)
    tl.store(DO12 + row, (do * w1[:, None]).to(DO12.dtype.element_ty), mask=ok[:, None])
    tl.store(DL12 + bh * n + r, dl1, mask=ok)
    tl.store(DO3 + row3, (do * w3[:, None]).to(DO3.dtype.element_ty), mask=second[:, None])
    tl.store(DL3 + bh * (n - h) + r3, dl3, mask=second)


@_jit
def _merge_into_kernel(O12, L12, O3, L3, n, h, DV: tl.constexpr, BLOCK: tl.constexpr):
    """Rows [h, n) of (O12, L12) merged in place with rows [0, n - h) of (O3, L3) through the
    LSEs. All contiguous: O* (BH, rows, DV), L* (BH, rows) fp32."""
    bh = tl.program_id(1).to(tl.int64)
    r3 = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r3 < n - h
    offs = tl.arange(0, DV)
    row = (bh * n + h + r3[:, None]) * DV + offs[None, :]
    o1 = tl.load(O12 + row, mask=ok[:, None], other=0.0)
    l1 = tl.load(L12 + bh * n + h + r3, mask=ok, other=0.0) * 1.4426950408889634
    o3 = tl.load(O3 + (bh * (n - h) + r3[:, None]) * DV + offs[None, :], mask=ok[:, None],
                 other=0.0)  # fmt: skip
    l3 = tl.load(L3 + bh * (n - h) + r3, mask=ok, other=0.0) * 1.4426950408889634
    o, lse2 = _merge_rows(o1, l1, o3, l3)
    tl.store(O12 + row, o.to(O12.dtype.element_ty), mask=ok[:, None])
    tl.store(L12 + bh * n + h + r3, lse2 / 1.4426950408889634, mask=ok)


def merge_into(o12, l12, o3, l3):
    """:func:`merge_halves` in place, without autograd: the last N - h rows of o12 (BH, N, Dv)
    and l12 (BH, N) (both contiguous) merged with o3, l3; the first h rows are left as they
    are."""
    bh, n, dv = o12.shape
    h = n - o3.shape[1]
    o3, l3 = o3.contiguous(), l3.contiguous()
    block = 16 if _INTERPRET else 32
    if bh and n > h:
        launch(_merge_into_kernel, (_cdiv(n - h, block), bh), o12, l12, o3, l3, n, h, DV=dv,
               BLOCK=block)  # fmt: skip
    return o12, l12


class _MergeHalves(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o12, l12, o3, l3):
        o12, l12, o3, l3 = (x.contiguous() for x in (o12, l12, o3, l3))
        o, lse = merge_into(o12.clone(), l12.clone(), o3, l3)
        ctx.save_for_backward(o, lse, o12, l12, o3, l3)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dl):
        o, lse, o12, l12, o3, l3 = ctx.saved_tensors
        if do is None and dl is None:
            return None, None, None, None
        bh, n, dv = o.shape
        do = torch.zeros_like(o) if do is None else do.contiguous()
        dl = None if dl is None else dl.contiguous()
        d12, dl12 = torch.empty_like(o12), torch.empty_like(l12)
        d3, dl3 = torch.empty_like(o3), torch.empty_like(l3)
        block = 16 if _INTERPRET else 32
        if bh and n:
            launch(_merge_bwd_kernel, (_cdiv(n, block), bh),
                   do, dl if dl is not None else lse, o, lse, o12, l12, o3, l3, d12, dl12, d3,
                   dl3, n, n - o3.shape[1], HAS_DL=dl is not None, DV=dv, BLOCK=block)  # fmt: skip
        return d12, dl12, d3, dl3


def merge_halves(o12, lse12, o3, lse3):
    """o12 (BH, N, Dv), lse12 (BH, N) fp32: attention of all N queries over one part of their
    keys; o3, lse3 (BH, N - h, ...): the last N - h queries over another, disjoint part. ->
    (o, lse) with the last N - h rows merged through the LSEs and the first h copied, in one
    pass (no fp32 temporaries, no concatenation); differentiable in all four inputs."""
    return _MergeHalves.apply(o12, lse12, o3, lse3)
