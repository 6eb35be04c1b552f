"""Triton kernels of 2-simplicial attention (``ops/simplicial.py`` launches them).

Scores of query i against the key pair (j, k): S_ijk = <q_i, k1_j * k2_k> (* elementwise). A
block of BLOCK_M queries x BLOCK_N1 k1 keys x BLOCK_N2 k2 keys is one matrix product: the rows
A = q_i * k1_j, a (BLOCK_M * BLOCK_N1, D) matrix, times k2^T (D, BLOCK_N2). The value of a pair
factorises, v1_j * v2_k, so sum_{j,k} P_ijk v1_j v2_k = sum_j v1_j * (P @ v2)_ij: again one
matrix product (P as (BLOCK_M * BLOCK_N1, BLOCK_N2) times v2) and a weighted sum over j.

Rows of a program are (query position, q head) pairs: BLOCK_M // HEADS positions x HEADS q heads
of one GQA group. HEADS = 1 is the sequence-tiled form (one head, BLOCK_M positions: models
without GQA such as GPT-2); HEADS > 1 is the head-packed form for GQA (many q heads share one
k/v head and, at one position, one window: with 64 heads per k/v head a tile is one position
and the key loops cover exactly the windows, no causal slack). One program per (position tile,
batch * head block) in the forward and dQ kernels, per (k1 tile, batch * kv head) and (k2 tile,
batch * kv head) in the dK1/dV1 and dK2/dV2 kernels, which loop over the q heads of their GQA
group (no atomics, deterministic; the one exception is ``_dqdk1_packed1_kernel`` below). When
a tile is one position (HEADS == BLOCK_M) the forward has its own kernel,
``_fwd_packed1_kernel``: k1_j and v1_j are then single vectors, so each key
j is two plain dots, (q * k1_j) @ k2^T and P @ (v2 * v1_j), into one (BLOCK_M, D) accumulator,
without the (BLOCK_M, BLOCK_N1, D) temporary of ``_fwd_kernel``; so has the backward
(``*_packed1_kernel``: dQ per position, dK2/dV2 per k2 tile, dK1/dV1 per k1 key, each looping
over what its block meets; or, split, dQ with dK1 per position, dK1's rows added atomically,
and dV1 alone per k1 key). Every kernel recomputes P from the saved LSE; the backward pass
uses dP_ijk = <dO_i, v1_j * v2_k>, the same trilinear form as the scores (rows B = dO_i * v1_j),
and Delta_i = rowsum(dO * O) - dLSE_i, so the LSE is differentiable.

Masks: row i sees j iff j < N1 and, when causal, i - w1 < j <= i (same for k with N2, w2); no
window is w = 2**30. Causal needs Nq = N1 = N2 (checked by the caller).
"""

from __future__ import annotations

from .flash import _dot, _dot_acc, _jit, tl

_NO_WINDOW = 2**30


@_jit
def _ok(rows, cols, n_q, n_k, w, CAUSAL: tl.constexpr):
    """(len(rows), len(cols)) bool: query ``rows`` may see keys ``cols``."""
    ok = (rows[:, None] < n_q) & (cols[None, :] < n_k)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - w)
    return ok


@_jit
def _key_range(start_m, n_k, w, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """Key tiles [lo, hi) that some query of the tile at start_m may see."""
    if CAUSAL:
        lo = tl.maximum(start_m - w + 1, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, n_k)
    else:
        lo = start_m * 0
        hi = n_k
    return lo, hi


@_jit
def _query_range(start_n, n_q, w, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
    """Query tiles [lo, hi) of which some row may see a key of the tile at start_n."""
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        hi = tl.minimum(start_n + BLOCK_N + w - 1, n_q)
    else:
        lo = start_n * 0
        hi = n_q
    return lo, hi


@_jit
def _rows(base, offs, n, sn, sd, HEAD_D: tl.constexpr):
    """(len(offs), D) rows of one head; rows at or past n read 0."""
    offs_d = tl.arange(0, HEAD_D)
    return tl.load(base + offs[:, None].to(tl.int64) * sn + offs_d[None, :] * sd,
                   mask=offs[:, None] < n, other=0.0)  # fmt: skip


@_jit
def _qrows(base, pos, heads, n_q, sn, sh, sd, HEAD_D: tl.constexpr,
           VOLATILE: tl.constexpr = False):  # fmt: skip
    """(BLOCK_M, D) query-side rows, row r = (position pos[r], q head heads[r]) of one batch;
    positions at or past n_q read 0. VOLATILE: a fresh load, which the compiler may not replace
    by the registers of an earlier load of the same rows."""
    offs_d = tl.arange(0, HEAD_D)
    ptrs = base + pos[:, None].to(tl.int64) * sn + heads[:, None] * sh + offs_d[None, :] * sd
    return tl.load(ptrs, mask=pos[:, None] < n_q, other=0.0, volatile=VOLATILE)


@_jit
def _row_ids(pid_p, pid_h, n_heads, BLOCK_M: tl.constexpr, HEADS: tl.constexpr):
    """Rows of a (position tile, batch * head block) program: BLOCK_M // HEADS positions x
    HEADS q heads of one GQA group, row r = (start + r // HEADS, h0 + r % HEADS)."""
    start_p = pid_p * (BLOCK_M // HEADS)
    n_hb = n_heads // HEADS
    b = (pid_h // n_hb).to(tl.int64)
    h0 = (pid_h % n_hb) * HEADS
    r = tl.arange(0, BLOCK_M)
    return start_p, b, h0, start_p + r // HEADS, h0 + r % HEADS


@_jit
def _outer(x, y, BLOCK_M: tl.constexpr, BLOCK_N1: tl.constexpr, HEAD_D: tl.constexpr):
    """(BM, D) x (BN1, D) -> (BM * BN1, D) rows x_i * y_j, row i * BN1 + j."""
    return tl.reshape(x[:, None, :] * y[None, :, :], (BLOCK_M * BLOCK_N1, HEAD_D))


@_jit
def _probs(a, k2, ok1, ok2, qk_scale, lse, BLOCK_M: tl.constexpr, BLOCK_N1: tl.constexpr,
           BLOCK_N2: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """P (BM, BN1, BN2) = exp2(S * qk_scale - lse) from rows a = q * k1 and k2 (BN2, D);
    masked pairs give 0. lse in log2 units, 0 for padded rows."""
    s = tl.reshape(_dot(a, tl.trans(k2), IEEE), (BLOCK_M, BLOCK_N1, BLOCK_N2))
    ok = ok1[:, :, None] & ok2[:, None, :]
    s = tl.where(ok, s * qk_scale, -float("inf"))
    return tl.exp2(s - lse[:, None, None])


@_jit
def _dscores(p, b, v2, delta, BLOCK_M: tl.constexpr, BLOCK_N1: tl.constexpr,
             BLOCK_N2: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """dS (BM, BN1, BN2) = P * (dP - delta), dP_ijk = <dO_i * v1_j, v2_k> from rows b."""
    dp = tl.reshape(_dot(b, tl.trans(v2), IEEE), (BLOCK_M, BLOCK_N1, BLOCK_N2))
    return p * (dp - delta[:, None, None])


@_jit
def _fwd_kernel(Q, K1, K2, V1, V2, O, LSE, sqb, sqn, sqh, sqd, s1b, s1n, s1h, s1d,
                s2b, s2n, s2h, s2d, t1b, t1n, t1h, t1d, t2b, t2n, t2h, t2d,
                n_q, n1, n2, n_heads, group, w1, w2, qk_scale,
                CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr, HEADS: tl.constexpr,
                IEEE: tl.constexpr):  # fmt: skip
    """One (position tile, batch * head block): O (B, Nq, H, D) contiguous and LSE (natural
    log), by an online softmax over all (k1 chunk, k2 tile) blocks in the window."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    start_p, b, h0, offs_m, heads = _row_ids(tl.program_id(0), tl.program_id(1), n_heads,
                                             BLOCK_M, HEADS)  # fmt: skip
    hk = h0 // group
    q = _qrows(Q + b * sqb, offs_m, heads, n_q, sqn, sqh, sqd, HEAD_D)  # (BM, D)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    lo1, hi1 = _key_range(start_p, n1, w1, CAUSAL, BLOCK_M // HEADS, BLOCK_N1)
    lo2, hi2 = _key_range(start_p, n2, w2, CAUSAL, BLOCK_M // HEADS, BLOCK_N2)
    for s1 in range(lo1, hi1, BLOCK_N1):
        offs1 = s1 + tl.arange(0, BLOCK_N1)
        k1 = _rows(K1 + b * s1b + hk * s1h, offs1, n1, s1n, s1d, HEAD_D)
        v1 = _rows(V1 + b * t1b + hk * t1h, offs1, n1, t1n, t1d, HEAD_D).to(tl.float32)
        ok1 = _ok(offs_m, offs1, n_q, n1, w1, CAUSAL)
        a = _outer(q, k1, BLOCK_M, BLOCK_N1, HEAD_D)  # (BM * BN1, D)
        for s2 in range(lo2, hi2, BLOCK_N2):
            offs2 = s2 + tl.arange(0, BLOCK_N2)
            k2 = _rows(K2 + b * s2b + hk * s2h, offs2, n2, s2n, s2d, HEAD_D)
            v2 = _rows(V2 + b * t2b + hk * t2h, offs2, n2, t2n, t2d, HEAD_D)
            ok2 = _ok(offs_m, offs2, n_q, n2, w2, CAUSAL)
            s = tl.reshape(_dot(a, tl.trans(k2), IEEE), (BLOCK_M, BLOCK_N1, BLOCK_N2))
            s = tl.where(ok1[:, :, None] & ok2[:, None, :], s * qk_scale, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(tl.max(s, 2), 1))
            m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(tl.sum(p, 2), 1)
            pv = _dot(tl.reshape(p, (BLOCK_M * BLOCK_N1, BLOCK_N2)).to(v2.dtype), v2, IEEE)
            pv = tl.reshape(pv, (BLOCK_M, BLOCK_N1, HEAD_D)) * v1[None, :, :]
            acc = acc * alpha[:, None] + tl.sum(pv, 1)
            m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    offs_d = tl.arange(0, HEAD_D)
    in_q = offs_m < n_q
    out = ((b * n_q + offs_m[:, None]) * n_heads + heads[:, None]) * HEAD_D + offs_d[None, :]
    tl.store(O + out, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=in_q[:, None])
    tl.store(LSE + (b * n_heads + heads) * n_q + offs_m,
             (m_i + tl.log2(l_safe)) * 0.6931471805599453, mask=in_q)  # fmt: skip


@_jit
def _packed1_keys(q, k2, v2, bias, acc, l_i, m_i, k1_ptr, v1_ptr, s1n, t1n, lo1, hi1, qk_scale,
                  MASKED: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One k2 tile of ``_fwd_packed1_kernel``: the online softmax over the k1 keys [lo1, hi1),
    each a vector shared by the tile; ``bias`` (0 or -inf per k2 key) only where MASKED."""
    k1 = tl.load(k1_ptr, mask=lo1 < hi1, other=0.0)
    v1 = tl.load(v1_ptr, mask=lo1 < hi1, other=0.0)
    for j in range(lo1, hi1):
        k1_ptr += s1n  # the next key, read while this one computes
        v1_ptr += t1n
        k1_next = tl.load(k1_ptr, mask=j + 1 < hi1, other=0.0)
        v1_next = tl.load(v1_ptr, mask=j + 1 < hi1, other=0.0)
        s = _dot(q * k1[None, :], tl.trans(k2), IEEE)
        if MASKED:
            s = s * qk_scale + bias
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
        else:  # every key visible: scale and shift in one multiply-add
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = m_new
            p = tl.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot_acc(p.to(v2.dtype), v2 * v1[None, :], acc * alpha[:, None], IEEE)
        m_i = m_new
        k1, v1 = k1_next, v1_next
    return acc, l_i, m_i


@_jit
def _packed1_ranges(K1, V1, i, b, hk, n1, n2, w1, w2, s1b, s1n, s1h, s1d, t1b, t1n, t1h, t1d,
                    CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N2: tl.constexpr):  # fmt: skip
    """Position i's k1 keys [lo1, hi1) (all visible to i), its k2 tile range [lo2, hi2) and
    pointers to the (D,) rows k1_lo1, v1_lo1 (one-position kernels)."""
    lo1, hi1 = _key_range(i, n1, w1, CAUSAL, 1, 1)
    lo2, hi2 = _key_range(i, n2, w2, CAUSAL, 1, BLOCK_N2)
    offs_d = tl.arange(0, HEAD_D)
    k1_0 = K1 + b * s1b + hk * s1h + lo1.to(tl.int64) * s1n + offs_d * s1d
    v1_0 = V1 + b * t1b + hk * t1h + lo1.to(tl.int64) * t1n + offs_d * t1d
    return lo1, hi1, lo2, hi2, k1_0, v1_0


@_jit
def _k2_tile(K2, V2, i, b, hk, s2, n2, w2, s2b, s2n, s2h, s2d, t2b, t2n, t2h, t2d,
             CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N2: tl.constexpr):  # fmt: skip
    """The k2, v2 rows of the tile at s2 and whether position i sees all of it (no mask)."""
    offs2 = s2 + tl.arange(0, BLOCK_N2)
    k2 = _rows(K2 + b * s2b + hk * s2h, offs2, n2, s2n, s2d, HEAD_D)
    v2 = _rows(V2 + b * t2b + hk * t2h, offs2, n2, t2n, t2d, HEAD_D)
    full = s2 + BLOCK_N2 <= n2
    if CAUSAL:
        full = full & (s2 > i - w2) & (s2 + BLOCK_N2 <= i + 1)
    return offs2, k2, v2, full


@_jit
def _fwd_packed1_kernel(Q, K1, K2, V1, V2, O, LSE, sqb, sqn, sqh, sqd, s1b, s1n, s1h, s1d,
                        s2b, s2n, s2h, s2d, t1b, t1n, t1h, t1d, t2b, t2n, t2h, t2d,
                        n_q, n1, n2, n_heads, group, w1, w2, qk_scale,
                        CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N2: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """The forward of a tile of one position i and BLOCK_M q heads of one GQA group (HEADS ==
    BLOCK_M); O and LSE as ``_fwd_kernel``. Outer loop over k2 tiles (k2, v2 loaded once),
    inner over the k1 keys j of i's window: S = (q * k1_j) @ k2^T and acc = acc * alpha +
    P @ (v2 * v1_j), one online softmax over all (j, k). Tiles wholly inside i's k2 window
    skip the mask."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    i, b, h0, offs_m, heads = _row_ids(tl.program_id(0), tl.program_id(1), n_heads,
                                       BLOCK_M, BLOCK_M)  # fmt: skip
    hk = h0 // group
    q = _qrows(Q + b * sqb, offs_m, heads, n_q, sqn, sqh, sqd, HEAD_D)  # (BM, D), all at i
    offs_d = tl.arange(0, HEAD_D)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    row = i + tl.zeros([1], dtype=tl.int32)
    lo1, hi1, lo2, hi2, k1_0, v1_0 = _packed1_ranges(K1, V1, i, b, hk, n1, n2, w1, w2, s1b, s1n,
                                                     s1h, s1d, t1b, t1n, t1h, t1d, CAUSAL,
                                                     HEAD_D, BLOCK_N2)  # fmt: skip
    for s2 in range(lo2, hi2, BLOCK_N2):
        offs2, k2, v2, full = _k2_tile(K2, V2, i, b, hk, s2, n2, w2, s2b, s2n, s2h, s2d, t2b,
                                       t2n, t2h, t2d, CAUSAL, HEAD_D, BLOCK_N2)  # fmt: skip
        if full:
            acc, l_i, m_i = _packed1_keys(q, k2, v2, 0.0, acc, l_i, m_i, k1_0, v1_0, s1n, t1n,
                                          lo1, hi1, qk_scale, False, IEEE)  # fmt: skip
        else:
            bias = tl.where(_ok(row, offs2, n_q, n2, w2, CAUSAL), 0.0, -float("inf"))
            acc, l_i, m_i = _packed1_keys(q, k2, v2, bias, acc, l_i, m_i, k1_0, v1_0, s1n, t1n,
                                          lo1, hi1, qk_scale, True, IEEE)  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = ((b * n_q + i) * n_heads + heads[:, None]) * HEAD_D + offs_d[None, :]
    tl.store(O + out, (acc / l_safe[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + (b * n_heads + heads) * n_q + i, (m_i + tl.log2(l_safe)) * 0.6931471805599453)


@_jit
def _row_stats(LSE, DELTA, b, heads, offs_m, n_q, n_heads):
    """LSE in log2 units (0 on padded rows) and Delta of the rows (offs_m, heads)."""
    in_q = offs_m < n_q
    row = (b * n_heads + heads) * n_q + offs_m  # (B, H, Nq)
    lse = tl.load(LSE + row, mask=in_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=in_q, other=0.0)
    return lse, delta


@_jit
def _dq_kernel(Q, K1, K2, V1, V2, DO, LSE, DELTA, DQ, sqb, sqn, sqh, sqd, s1b, s1n, s1h, s1d,
               s2b, s2n, s2h, s2d, t1b, t1n, t1h, t1d, t2b, t2n, t2h, t2d, sdb, sdn, sdh, sdd,
               n_q, n1, n2, n_heads, group, w1, w2, qk_scale, scale,
               CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr, HEADS: tl.constexpr,
               IEEE: tl.constexpr):  # fmt: skip
    """One (position tile, batch * head block): dQ_i = scale * sum_j k1_j * (dS @ k2)_ij."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    start_p, b, h0, offs_m, heads = _row_ids(tl.program_id(0), tl.program_id(1), n_heads,
                                             BLOCK_M, HEADS)  # fmt: skip
    hk = h0 // group
    q = _qrows(Q + b * sqb, offs_m, heads, n_q, sqn, sqh, sqd, HEAD_D)
    do = _qrows(DO + b * sdb, offs_m, heads, n_q, sdn, sdh, sdd, HEAD_D)
    lse, delta = _row_stats(LSE, DELTA, b, heads, offs_m, n_q, n_heads)
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    lo1, hi1 = _key_range(start_p, n1, w1, CAUSAL, BLOCK_M // HEADS, BLOCK_N1)
    lo2, hi2 = _key_range(start_p, n2, w2, CAUSAL, BLOCK_M // HEADS, BLOCK_N2)
    for s1 in range(lo1, hi1, BLOCK_N1):
        offs1 = s1 + tl.arange(0, BLOCK_N1)
        k1 = _rows(K1 + b * s1b + hk * s1h, offs1, n1, s1n, s1d, HEAD_D)
        v1 = _rows(V1 + b * t1b + hk * t1h, offs1, n1, t1n, t1d, HEAD_D)
        ok1 = _ok(offs_m, offs1, n_q, n1, w1, CAUSAL)
        a = _outer(q, k1, BLOCK_M, BLOCK_N1, HEAD_D)
        bb = _outer(do, v1.to(do.dtype), BLOCK_M, BLOCK_N1, HEAD_D)
        for s2 in range(lo2, hi2, BLOCK_N2):
            offs2 = s2 + tl.arange(0, BLOCK_N2)
            k2 = _rows(K2 + b * s2b + hk * s2h, offs2, n2, s2n, s2d, HEAD_D)
            v2 = _rows(V2 + b * t2b + hk * t2h, offs2, n2, t2n, t2d, HEAD_D)
            ok2 = _ok(offs_m, offs2, n_q, n2, w2, CAUSAL)
            p = _probs(a, k2, ok1, ok2, qk_scale, lse, BLOCK_M, BLOCK_N1, BLOCK_N2, IEEE)
            ds = _dscores(p, bb, v2.to(bb.dtype), delta, BLOCK_M, BLOCK_N1, BLOCK_N2, IEEE)
            t = _dot(tl.reshape(ds, (BLOCK_M * BLOCK_N1, BLOCK_N2)).to(k2.dtype), k2, IEEE)
            t = tl.reshape(t, (BLOCK_M, BLOCK_N1, HEAD_D)) * k1.to(tl.float32)[None, :, :]
            dq += tl.sum(t, 1)
    offs_d = tl.arange(0, HEAD_D)
    out = ((b * n_q + offs_m[:, None]) * n_heads + heads[:, None]) * HEAD_D + offs_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < n_q)


@_jit
def _dk1dv1_kernel(Q, K1, K2, V1, V2, DO, LSE, DELTA, DK1, DV1, sqb, sqn, sqh, sqd,
                   s1b, s1n, s1h, s1d, s2b, s2n, s2h, s2d, t1b, t1n, t1h, t1d,
                   t2b, t2n, t2h, t2d, sdb, sdn, sdh, sdd, n_q, n1, n2, n_heads, group, w1, w2,
                   qk_scale, scale, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
                   HEADS: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One (k1 tile, batch*kv head): dK1_j = scale * sum_i q_i * (dS @ k2)_ij and
    dV1_j = sum_i dO_i * (P @ v2)_ij, summed over the q heads of the GQA group (HEADS of
    them per row tile)."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    start_n = tl.program_id(0) * BLOCK_N1
    bhk = tl.program_id(1)
    n_kv = n_heads // group
    b = (bhk // n_kv).to(tl.int64)
    hk = bhk % n_kv
    offs1 = start_n + tl.arange(0, BLOCK_N1)
    k1 = _rows(K1 + b * s1b + hk * s1h, offs1, n1, s1n, s1d, HEAD_D)
    v1 = _rows(V1 + b * t1b + hk * t1h, offs1, n1, t1n, t1d, HEAD_D)
    dk = tl.zeros([BLOCK_N1, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_D], dtype=tl.float32)
    lo, hi = _query_range(start_n, n_q, w1, CAUSAL, BLOCK_M // HEADS, BLOCK_N1)
    r = tl.arange(0, BLOCK_M)
    for g in range(group // HEADS):
        heads = hk * group + g * HEADS + r % HEADS
        for start_p in range(lo, hi, BLOCK_M // HEADS):
            offs_m = start_p + r // HEADS
            q = _qrows(Q + b * sqb, offs_m, heads, n_q, sqn, sqh, sqd, HEAD_D)
            do = _qrows(DO + b * sdb, offs_m, heads, n_q, sdn, sdh, sdd, HEAD_D)
            lse, delta = _row_stats(LSE, DELTA, b, heads, offs_m, n_q, n_heads)
            ok1 = _ok(offs_m, offs1, n_q, n1, w1, CAUSAL)
            a = _outer(q, k1, BLOCK_M, BLOCK_N1, HEAD_D)
            bb = _outer(do, v1.to(do.dtype), BLOCK_M, BLOCK_N1, HEAD_D)
            lo2, hi2 = _key_range(start_p, n2, w2, CAUSAL, BLOCK_M // HEADS, BLOCK_N2)
            for s2 in range(lo2, hi2, BLOCK_N2):
                offs2 = s2 + tl.arange(0, BLOCK_N2)
                k2 = _rows(K2 + b * s2b + hk * s2h, offs2, n2, s2n, s2d, HEAD_D)
                v2 = _rows(V2 + b * t2b + hk * t2h, offs2, n2, t2n, t2d, HEAD_D)
                ok2 = _ok(offs_m, offs2, n_q, n2, w2, CAUSAL)
                p = _probs(a, k2, ok1, ok2, qk_scale, lse, BLOCK_M, BLOCK_N1, BLOCK_N2, IEEE)
                ds = _dscores(p, bb, v2.to(bb.dtype), delta, BLOCK_M, BLOCK_N1, BLOCK_N2, IEEE)
                t = _dot(tl.reshape(ds, (BLOCK_M * BLOCK_N1, BLOCK_N2)).to(k2.dtype), k2, IEEE)
                t = tl.reshape(t, (BLOCK_M, BLOCK_N1, HEAD_D)) * q.to(tl.float32)[:, None, :]
                dk += tl.sum(t, 0)
                u = _dot(tl.reshape(p, (BLOCK_M * BLOCK_N1, BLOCK_N2)).to(v2.dtype), v2, IEEE)
                u = tl.reshape(u, (BLOCK_M, BLOCK_N1, HEAD_D)) * do.to(tl.float32)[:, None, :]
                dv += tl.sum(u, 0)
    offs_d = tl.arange(0, HEAD_D)
    out = ((b * n1 + offs1[:, None]) * n_kv + hk) * HEAD_D + offs_d[None, :]
    tl.store(DK1 + out, (dk * scale).to(DK1.dtype.element_ty), mask=offs1[:, None] < n1)
    tl.store(DV1 + out, dv.to(DV1.dtype.element_ty), mask=offs1[:, None] < n1)


@_jit
def _dk2dv2_kernel(Q, K1, K2, V1, V2, DO, LSE, DELTA, DK2, DV2, sqb, sqn, sqh, sqd,
                   s1b, s1n, s1h, s1d, s2b, s2n, s2h, s2d, t1b, t1n, t1h, t1d,
                   t2b, t2n, t2h, t2d, sdb, sdn, sdh, sdd, n_q, n1, n2, n_heads, group, w1, w2,
                   qk_scale, scale, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
                   HEADS: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One (k2 tile, batch*kv head): dK2 = scale * dS^T @ (q * k1) and dV2 = P^T @ (dO * v1),
    the (i, j) pairs as rows, summed over the q heads of the GQA group."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    start_n = tl.program_id(0) * BLOCK_N2
    bhk = tl.program_id(1)
    n_kv = n_heads // group
    b = (bhk // n_kv).to(tl.int64)
    hk = bhk % n_kv
    offs2 = start_n + tl.arange(0, BLOCK_N2)
    k2 = _rows(K2 + b * s2b + hk * s2h, offs2, n2, s2n, s2d, HEAD_D)
    v2 = _rows(V2 + b * t2b + hk * t2h, offs2, n2, t2n, t2d, HEAD_D)
    dk = tl.zeros([BLOCK_N2, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N2, HEAD_D], dtype=tl.float32)
    lo, hi = _query_range(start_n, n_q, w2, CAUSAL, BLOCK_M // HEADS, BLOCK_N2)
    r = tl.arange(0, BLOCK_M)
    for g in range(group // HEADS):
        heads = hk * group + g * HEADS + r % HEADS
        for start_p in range(lo, hi, BLOCK_M // HEADS):
            offs_m = start_p + r // HEADS
            q = _qrows(Q + b * sqb, offs_m, heads, n_q, sqn, sqh, sqd, HEAD_D)
            do = _qrows(DO + b * sdb, offs_m, heads, n_q, sdn, sdh, sdd, HEAD_D)
            lse, delta = _row_stats(LSE, DELTA, b, heads, offs_m, n_q, n_heads)
            ok2 = _ok(offs_m, offs2, n_q, n2, w2, CAUSAL)
            lo1, hi1 = _key_range(start_p, n1, w1, CAUSAL, BLOCK_M // HEADS, BLOCK_N1)
            for s1 in range(lo1, hi1, BLOCK_N1):
                offs1 = s1 + tl.arange(0, BLOCK_N1)
                k1 = _rows(K1 + b * s1b + hk * s1h, offs1, n1, s1n, s1d, HEAD_D)
                v1 = _rows(V1 + b * t1b + hk * t1h, offs1, n1, t1n, t1d, HEAD_D)
                ok1 = _ok(offs_m, offs1, n_q, n1, w1, CAUSAL)
                a = _outer(q, k1, BLOCK_M, BLOCK_N1, HEAD_D)
                bb = _outer(do, v1.to(do.dtype), BLOCK_M, BLOCK_N1, HEAD_D)
                p = _probs(a, k2, ok1, ok2, qk_scale, lse, BLOCK_M, BLOCK_N1, BLOCK_N2, IEEE)
                ds = _dscores(p, bb, v2.to(bb.dtype), delta, BLOCK_M, BLOCK_N1, BLOCK_N2, IEEE)
                ds = tl.reshape(ds, (BLOCK_M * BLOCK_N1, BLOCK_N2)).to(a.dtype)
                dk += _dot(tl.trans(ds), a, IEEE)
                p = tl.reshape(p, (BLOCK_M * BLOCK_N1, BLOCK_N2)).to(bb.dtype)
                dv += _dot(tl.trans(p), bb, IEEE)
    offs_d = tl.arange(0, HEAD_D)
    out = ((b * n2 + offs2[:, None]) * n_kv + hk) * HEAD_D + offs_d[None, :]
    tl.store(DK2 + out, (dk * scale).to(DK2.dtype.element_ty), mask=offs2[:, None] < n2)
    tl.store(DV2 + out, dv.to(DV2.dtype.element_ty), mask=offs2[:, None] < n2)


# ----------------------------------------------------------------------------- packed1 backward
# Tiles of one position i and BLOCK_M q heads of one GQA group (the forward's packed1 case):
# k1_j, v1_j are single vectors, so every (i, j, k2 tile) step is a few plain dots.


@_jit
def _kv_ids(pid, n_heads, group):
    """(b, kv head) of a batch * kv head program id."""
    n_kv = n_heads // group
    return (pid // n_kv).to(tl.int64), pid % n_kv


@_jit
def _k2_bias(i, offs2, n2, w2, CAUSAL: tl.constexpr):
    """(BN2,) 0 where position i sees k2 key offs2, else -inf."""
    ok = offs2 < n2
    if CAUSAL:
        ok = ok & (offs2 <= i) & (offs2 > i - w2)
    return tl.where(ok, 0.0, -float("inf"))


@_jit
def _k2_probs(K2, V2, b, hk, i, s2, n2, w2, a, lse, qk_scale, s2b, s2n, s2h, s2d, t2b, t2n, t2h,
              t2d, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N2: tl.constexpr,
              IEEE: tl.constexpr):  # fmt: skip
    """The k2, v2 rows of the tile at s2 and P = exp2(a @ k2^T * qk_scale - lse), masked to
    position i's k2 window (the tile loop of the key-outer one-position kernels)."""
    offs2 = s2 + tl.arange(0, BLOCK_N2)
    k2 = _rows(K2 + b * s2b + hk * s2h, offs2, n2, s2n, s2d, HEAD_D)
    v2 = _rows(V2 + b * t2b + hk * t2h, offs2, n2, t2n, t2d, HEAD_D)
    bias = _k2_bias(i, offs2, n2, w2, CAUSAL)
    s = _dot(a, tl.trans(k2), IEEE) * qk_scale + bias[None, :]
    return k2, v2, tl.exp2(s - lse[:, None])


@_jit
def _dq_packed1_keys(q, do, lse, delta, k2, v2, bias, dq, k1_ptr, v1_ptr, s1n, t1n, lo1, hi1,
                     qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One k2 tile of ``_dq_packed1_kernel`` over the k1 keys [lo1, hi1), k1_j/v1_j read one
    key ahead; ``bias`` (0 or -inf per k2 key) only where MASKED."""
    k1 = tl.load(k1_ptr, mask=lo1 < hi1, other=0.0)
    v1 = tl.load(v1_ptr, mask=lo1 < hi1, other=0.0)
    for j in range(lo1, hi1):
        k1_ptr += s1n
        v1_ptr += t1n
        k1_next = tl.load(k1_ptr, mask=j + 1 < hi1, other=0.0)
        v1_next = tl.load(v1_ptr, mask=j + 1 < hi1, other=0.0)
        kk = k2 * k1[None, :]
        s = _dot(q, tl.trans(kk), IEEE) * qk_scale
        if MASKED:
            s = s + bias[None, :]
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v2 * v1[None, :]), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _dot_acc(ds.to(kk.dtype), kk, dq, IEEE)
        k1, v1 = k1_next, v1_next
    return dq


@_jit
def _dq_packed1_kernel(Q, K1, K2, V1, V2, DO, LSE, DELTA, DQ, sqb, sqn, sqh, sqd,
                       s1b, s1n, s1h, s1d, s2b, s2n, s2h, s2d, t1b, t1n, t1h, t1d,
                       t2b, t2n, t2h, t2d, sdb, sdn, sdh, sdd, n_q, n1, n2, n_heads, group,
                       w1, w2, qk_scale, scale, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N2: tl.constexpr,
                       IEEE: tl.constexpr):  # fmt: skip
    """dQ of one position i x BLOCK_M heads. Per k2 tile and k1 key j, with kk = k2 * k1_j and
    vv = v2 * v1_j: S = q @ kk^T, dP = dO @ vv^T, dS = P * (dP - Delta), dq += dS @ kk."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    i, b, h0, offs_m, heads = _row_ids(tl.program_id(0), tl.program_id(1), n_heads,
                                       BLOCK_M, BLOCK_M)  # fmt: skip
    hk = h0 // group
    q = _qrows(Q + b * sqb, offs_m, heads, n_q, sqn, sqh, sqd, HEAD_D)
    do = _qrows(DO + b * sdb, offs_m, heads, n_q, sdn, sdh, sdd, HEAD_D)
    lse, delta = _row_stats(LSE, DELTA, b, heads, offs_m, n_q, n_heads)
    offs_d = tl.arange(0, HEAD_D)
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    lo1, hi1, lo2, hi2, k1_0, v1_0 = _packed1_ranges(K1, V1, i, b, hk, n1, n2, w1, w2, s1b, s1n,
                                                     s1h, s1d, t1b, t1n, t1h, t1d, CAUSAL,
                                                     HEAD_D, BLOCK_N2)  # fmt: skip
    for s2 in range(lo2, hi2, BLOCK_N2):
        offs2, k2, v2, full = _k2_tile(K2, V2, i, b, hk, s2, n2, w2, s2b, s2n, s2h, s2d, t2b,
                                       t2n, t2h, t2d, CAUSAL, HEAD_D, BLOCK_N2)  # fmt: skip
        if full:
            dq = _dq_packed1_keys(q, do, lse, delta, k2, v2, 0.0, dq, k1_0, v1_0, s1n, t1n, lo1,
                                  hi1, qk_scale, False, IEEE)  # fmt: skip
        else:
            bias = _k2_bias(i, offs2, n2, w2, CAUSAL)
            dq = _dq_packed1_keys(q, do, lse, delta, k2, v2, bias, dq, k1_0, v1_0, s1n, t1n, lo1,
                                  hi1, qk_scale, True, IEEE)  # fmt: skip
    out = ((b * n_q + i) * n_heads + heads[:, None]) * HEAD_D + offs_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty))


@_jit
def _dqdk1_packed1_kernel(Q, K1, K2, V1, V2, DO, LSE, DELTA, DQ, DK1F, sqb, sqn, sqh, sqd,
                          s1b, s1n, s1h, s1d, s2b, s2n, s2h, s2d, t1b, t1n, t1h, t1d,
                          t2b, t2n, t2h, t2d, sdb, sdn, sdh, sdd, n_q, n1, n2, n_heads, group,
                          w1, w2, qk_scale, scale, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N2: tl.constexpr,
                          IEEE: tl.constexpr):  # fmt: skip
    """dQ of one position i x BLOCK_M heads and its share of dK1. Per k1 key j (outer) and k2
    tile (inner), with a = q * k1_j and c = dO * v1_j: S = a @ k2^T, dS = P * (c @ v2^T -
    Delta) and W_j += dS @ k2; then dQ += k1_j * W_j and dK1_j += sum_h q * W_j (an fp32
    atomic add of one (D,) row into DK1F). dQ_i = sum_jk dS_ijk k1_j * k2_k and dK1_j =
    sum_ik dS_ijk q_i * k2_k share the product W, so dQ and dK1 cost three tile products per
    (i, j, k2 tile), not the seven of the dQ and dK1/dV1 kernels; dV1 is left to
    ``_dk1dv1_packed1_kernel`` with DV1_ONLY (two products). q and dO are read again for each
    key (volatile loads) rather than held in registers through the loops."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    i, b, h0, offs_m, heads = _row_ids(tl.program_id(0), tl.program_id(1), n_heads,
                                       BLOCK_M, BLOCK_M)  # fmt: skip
    hk = h0 // group
    lse, delta = _row_stats(LSE, DELTA, b, heads, offs_m, n_q, n_heads)
    offs_d = tl.arange(0, HEAD_D)
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    lo1, hi1, lo2, hi2, k1_ptr, v1_ptr = _packed1_ranges(K1, V1, i, b, hk, n1, n2, w1, w2, s1b,
                                                         s1n, s1h, s1d, t1b, t1n, t1h, t1d,
                                                         CAUSAL, HEAD_D, BLOCK_N2)  # fmt: skip
    dk1_row = DK1F + ((b * n1 + lo1) * (n_heads // group) + hk) * HEAD_D + offs_d
    for _ in range(lo1, hi1):
        k1 = tl.load(k1_ptr)
        v1 = tl.load(v1_ptr)
        q = _qrows(Q + b * sqb, offs_m, heads, n_q, sqn, sqh, sqd, HEAD_D, True)
        do = _qrows(DO + b * sdb, offs_m, heads, n_q, sdn, sdh, sdd, HEAD_D, True)
        a = q * k1[None, :]
        c = do * v1[None, :]
        w = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
        for s2 in range(lo2, hi2, BLOCK_N2):
            k2, v2, p = _k2_probs(K2, V2, b, hk, i, s2, n2, w2, a, lse, qk_scale, s2b, s2n, s2h,
                                  s2d, t2b, t2n, t2h, t2d, CAUSAL, HEAD_D, BLOCK_N2,
                                  IEEE)  # fmt: skip
            ds = p * (_dot(c, tl.trans(v2), IEEE) - delta[:, None])
            w = _dot_acc(ds.to(k2.dtype), k2, w, IEEE)
        dq += w * k1.to(tl.float32)[None, :]
        q = _qrows(Q + b * sqb, offs_m, heads, n_q, sqn, sqh, sqd, HEAD_D, True)
        tl.atomic_add(dk1_row, tl.sum(q.to(tl.float32) * w, 0) * scale, sem="relaxed")
        k1_ptr += s1n
        v1_ptr += t1n
        dk1_row += (n_heads // group) * HEAD_D
    out = ((b * n_q + i) * n_heads + heads[:, None]) * HEAD_D + offs_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty))


@_jit
def _dk2_packed1_keys(q, do, lse, delta, k2, v2, bias, dk, dv, k1_ptr, v1_ptr, s1n, t1n, lo1,
                      hi1, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr,
                      TRANSPOSED: tl.constexpr):  # fmt: skip
    """One (position, head block) of ``_dk2dv2_packed1_kernel`` over the k1 keys [lo1, hi1),
    k1_j/v1_j read one key ahead; ``bias`` (0 or -inf per k2 key) only where MASKED.
    TRANSPOSED: dk, dv are dK2^T, dV2^T (D, BN2) and every product has the heads or D as its
    rows (S as in the forward, then dV2^T += c^T @ P): no product with BLOCK_N2 rows, which
    is under the 64 a Hopper warp-group instruction takes when BLOCK_N2 = 32."""
    k1 = tl.load(k1_ptr, mask=lo1 < hi1, other=0.0)
    v1 = tl.load(v1_ptr, mask=lo1 < hi1, other=0.0)
    for j in range(lo1, hi1):
        k1_ptr += s1n
        v1_ptr += t1n
        k1_next = tl.load(k1_ptr, mask=j + 1 < hi1, other=0.0)
        v1_next = tl.load(v1_ptr, mask=j + 1 < hi1, other=0.0)
        a = q * k1[None, :]
        c = do * v1[None, :]
        if TRANSPOSED:
            s = _dot(a, tl.trans(k2), IEEE) * qk_scale
            if MASKED:
                s = s + bias[None, :]
            p = tl.exp2(s - lse[:, None])  # (BM, BN2)
            ds = p * (_dot(c, tl.trans(v2), IEEE) - delta[:, None])
            dv = _dot_acc(tl.trans(c), p.to(c.dtype), dv, IEEE)
            dk = _dot_acc(tl.trans(a), ds.to(a.dtype), dk, IEEE)
        else:
            st = _dot(k2, tl.trans(a), IEEE) * qk_scale
            if MASKED:
                st = st + bias[:, None]
            pt = tl.exp2(st - lse[None, :])  # (BN2, BM) = P^T
            dst = pt * (_dot(v2, tl.trans(c), IEEE) - delta[None, :])
            dv = _dot_acc(pt.to(c.dtype), c, dv, IEEE)
            dk = _dot_acc(dst.to(a.dtype), a, dk, IEEE)
        k1, v1 = k1_next, v1_next
    return dk, dv


@_jit
def _dk2dv2_packed1_kernel(Q, K1, K2, V1, V2, DO, LSE, DELTA, DK2, DV2, sqb, sqn, sqh, sqd,
                           s1b, s1n, s1h, s1d, s2b, s2n, s2h, s2d, t1b, t1n, t1h, t1d,
                           t2b, t2n, t2h, t2d, sdb, sdn, sdh, sdd, n_q, n1, n2, n_heads, group,
                           w1, w2, qk_scale, scale, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N2: tl.constexpr, IEEE: tl.constexpr,
                           TRANSPOSED: tl.constexpr = False):  # fmt: skip
    """dK2, dV2 of one (k2 tile, batch * kv head): over the positions i that see a key of the
    tile, the head blocks of the group and the k1 keys j of i's window, with a = q_i * k1_j and
    c = dO_i * v1_j as (BLOCK_M, D) rows: P^T from k2 @ a^T, dV2 += P^T @ c, dK2 += dS^T @ a
    (TRANSPOSED: P from a @ k2^T, dV2^T += c^T @ P, dK2^T += a^T @ dS)."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    start_n = tl.program_id(0) * BLOCK_N2
    b, hk = _kv_ids(tl.program_id(1), n_heads, group)
    offs2 = start_n + tl.arange(0, BLOCK_N2)
    offs_d = tl.arange(0, HEAD_D)
    r = tl.arange(0, BLOCK_M)
    k2 = _rows(K2 + b * s2b + hk * s2h, offs2, n2, s2n, s2d, HEAD_D)
    v2 = _rows(V2 + b * t2b + hk * t2h, offs2, n2, t2n, t2d, HEAD_D)
    if TRANSPOSED:
        dk = tl.zeros([HEAD_D, BLOCK_N2], dtype=tl.float32)
        dv = tl.zeros([HEAD_D, BLOCK_N2], dtype=tl.float32)
    else:
        dk = tl.zeros([BLOCK_N2, HEAD_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N2, HEAD_D], dtype=tl.float32)
    k1_0 = K1 + b * s1b + hk * s1h + offs_d * s1d
    v1_0 = V1 + b * t1b + hk * t1h + offs_d * t1d
    lo, hi = _query_range(start_n, n_q, w2, CAUSAL, 1, BLOCK_N2)
    for i in range(lo, hi):
        lo1, hi1 = _key_range(i, n1, w1, CAUSAL, 1, 1)
        k1_i = k1_0 + (lo1 + b * 0) * s1n
        v1_i = v1_0 + (lo1 + b * 0) * t1n
        pos = i + r * 0
        full = start_n + BLOCK_N2 <= n2
        if CAUSAL:
            full = full & (start_n > i - w2) & (start_n + BLOCK_N2 <= i + 1)
        for g in range(group // BLOCK_M):
            heads = hk * group + g * BLOCK_M + r
            q = _qrows(Q + b * sqb, pos, heads, n_q, sqn, sqh, sqd, HEAD_D)
            do = _qrows(DO + b * sdb, pos, heads, n_q, sdn, sdh, sdd, HEAD_D)
            lse, delta = _row_stats(LSE, DELTA, b, heads, pos, n_q, n_heads)
            if full:
                dk, dv = _dk2_packed1_keys(q, do, lse, delta, k2, v2, 0.0, dk, dv, k1_i, v1_i,
                                           s1n, t1n, lo1, hi1, qk_scale, False, IEEE,
                                           TRANSPOSED)  # fmt: skip
            else:
                bias = _k2_bias(i, offs2, n2, w2, CAUSAL)
                dk, dv = _dk2_packed1_keys(q, do, lse, delta, k2, v2, bias, dk, dv, k1_i, v1_i,
                                           s1n, t1n, lo1, hi1, qk_scale, True, IEEE,
                                           TRANSPOSED)  # fmt: skip
    if TRANSPOSED:
        dk = tl.trans(dk)
        dv = tl.trans(dv)
    out = ((b * n2 + offs2[:, None]) * (n_heads // group) + hk) * HEAD_D + offs_d[None, :]
    tl.store(DK2 + out, (dk * scale).to(DK2.dtype.element_ty), mask=offs2[:, None] < n2)
    tl.store(DV2 + out, dv.to(DV2.dtype.element_ty), mask=offs2[:, None] < n2)


@_jit
def _dk1dv1_packed1_kernel(Q, K1, K2, V1, V2, DO, LSE, DELTA, DK1, DV1, sqb, sqn, sqh, sqd,
                           s1b, s1n, s1h, s1d, s2b, s2n, s2h, s2d, t1b, t1n, t1h, t1d,
                           t2b, t2n, t2h, t2d, sdb, sdn, sdh, sdd, n_q, n1, n2, n_heads, group,
                           w1, w2, qk_scale, scale, CAUSAL: tl.constexpr, HEAD_D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N2: tl.constexpr,
                           IEEE: tl.constexpr, RELOAD: tl.constexpr = False,
                           DV1_ONLY: tl.constexpr = False):  # fmt: skip
    """dK1, dV1 of one (k1 key j, batch * kv head): over the positions i that see j and the
    head blocks of the group, u = P @ v2 and w = dS @ k2 summed over i's k2 tiles, then
    dV1_j += sum_h dO * u and dK1_j += sum_h q * w. Each (i, j, k) score is computed once.
    RELOAD: q and dO read again after the k2 loop (volatile loads) instead of kept through it:
    at the 16-bit default tiles ptxas then spills 352 B, not 744 (sm_90, Triton 3.6).
    DV1_ONLY: dV1 alone (S and u = P @ v2, two products; dP, dS and w are not formed), where
    ``_dqdk1_packed1_kernel`` gives dK1; DK1 is not written."""
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    j = tl.program_id(0)
    b, hk = _kv_ids(tl.program_id(1), n_heads, group)
    offs_d = tl.arange(0, HEAD_D)
    r = tl.arange(0, BLOCK_M)
    k1 = tl.load(K1 + b * s1b + hk * s1h + (j + b * 0) * s1n + offs_d * s1d)
    v1 = tl.load(V1 + b * t1b + hk * t1h + (j + b * 0) * t1n + offs_d * t1d)
    dk = tl.zeros([HEAD_D], dtype=tl.float32)
    dv = tl.zeros([HEAD_D], dtype=tl.float32)
    lo, hi = _query_range(j, n_q, w1, CAUSAL, 1, 1)
    for i in range(lo, hi):
        lo2, hi2 = _key_range(i, n2, w2, CAUSAL, 1, BLOCK_N2)
        pos = i + r * 0
        for g in range(group // BLOCK_M):
            heads = hk * group + g * BLOCK_M + r
            q = _qrows(Q + b * sqb, pos, heads, n_q, sqn, sqh, sqd, HEAD_D)
            do = _qrows(DO + b * sdb, pos, heads, n_q, sdn, sdh, sdd, HEAD_D)
            lse, delta = _row_stats(LSE, DELTA, b, heads, pos, n_q, n_heads)
            a = q * k1[None, :]
            c = do * v1[None, :]
            u = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
            w = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
            for s2 in range(lo2, hi2, BLOCK_N2):
                k2, v2, p = _k2_probs(K2, V2, b, hk, i, s2, n2, w2, a, lse, qk_scale, s2b, s2n,
                                      s2h, s2d, t2b, t2n, t2h, t2d, CAUSAL, HEAD_D, BLOCK_N2,
                                      IEEE)  # fmt: skip
                if not DV1_ONLY:
                    ds = p * (_dot(c, tl.trans(v2), IEEE) - delta[:, None])
                u = _dot_acc(p.to(v2.dtype), v2, u, IEEE)
                if not DV1_ONLY:
                    w = _dot_acc(ds.to(k2.dtype), k2, w, IEEE)
            if RELOAD:  # q and dO from memory again: not held in registers through the loop
                do = _qrows(DO + b * sdb, pos, heads, n_q, sdn, sdh, sdd, HEAD_D, True)
            dv += tl.sum(do.to(tl.float32) * u, 0)
            if not DV1_ONLY:
                if RELOAD:
                    q = _qrows(Q + b * sqb, pos, heads, n_q, sqn, sqh, sqd, HEAD_D, True)
                dk += tl.sum(q.to(tl.float32) * w, 0)
    out = ((b * n1 + j) * (n_heads // group) + hk) * HEAD_D + offs_d
    if not DV1_ONLY:
        tl.store(DK1 + out, (dk * scale).to(DK1.dtype.element_ty))
    tl.store(DV1 + out, dv.to(DV1.dtype.element_ty))
