"""Fused rotary position kernels (Triton): RoPE and CARoPE applied to q and k in one launch.

    rope_qk(q, k, cos, sin)  -> (q_rot, k_rot)   cos/sin: (T', D/2) fp32 tables, T' >= T
    rope_qkv(qkv, cos, sin, n_head, n_kv) -> (q_rot, k_rot, v)   on a fused qkv projection
    carope_qkv(qkv, log_f, n_head, n_kv)  -> (q_rot, k_rot, v)   likewise
    split_qkv(qkv, n_head, n_kv)          -> (q, k, v) views of the fused projection
    carope_qk(q, k, log_f)   -> (q_rot, k_rot)   log_f: (B, T, Hkv) fp32 per-token log-frequency

q is (B, T, H, D), k is (B, T, Hkv, D) with H % Hkv == 0, any strides (e.g. views of one fused
qkv projection); outputs are contiguous in the input dtype. Pairs are half-split: dims
(i, i + D/2) form pair i and are rotated by an angle phi: (x1 c - x2 s, x2 c + x1 s).
Arithmetic is fp32 whatever the input dtype; these match models.positions.apply_rotary.

Why fused: the PyTorch path reads q and k once per op (rotate, cat, cast) and, for CARoPE,
writes the (B, T, Hkv, D/2) phase plus its cos and sin to memory; here each element of q and k
is read once and written once, and CARoPE's phase lives only in registers.

- RoPE: grid (token blocks, batch); a program loads its cos/sin tile once and rotates every q and
  k head of those tokens. Backward is the same kernel rotating the gradients by -phi.
- CARoPE: a light scan kernel per (batch, kv head) walks T in blocks over log_f only and stores
  the phase prefix at each block start (the running sum of f_t ** i = exp(i log_f[t]),
  (B, Hkv, n_blocks, D/2), tiny); then every (token block, batch, kv head) runs in parallel:
  phase = carry + in-block cumsum, rotate the group's q heads and the k head. Backward, also
  per block in parallel: dq, dk are the gradients rotated by -phi; d phase = g2 * out1 -
  g1 * out2, with out recomputed in fp32 from the saved inputs (not the bf16-rounded outputs),
  summed over the group and the k head; the cumsum's gradient is a reverse cumsum: the
  in-block part is done there, and a light suffix pass per (batch, kv head) adds the later
  blocks' total, d log_f[t] = sum_i dpow[t,i] i f_t**i being linear in it. (Walking T
  sequentially in one program per (batch, kv head) took 0.35 ms a GPT-2 layer on an H100:
  384 programs cannot fill the GPU.)
  No atomics: results are deterministic.
"""

from __future__ import annotations

import os

import torch

from .contract import kernels_run_on
from .flash import _cdiv
from .launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # pyproject installs triton on Linux only; keep `import ops` working

    class tl:  # stand-in so that the kernel definitions below still parse
        constexpr = staticmethod(lambda x=None: x)

    triton = None

# Triton decides interpreter vs compiler when a kernel is defined, i.e. at this import.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_jit = triton.jit if triton is not None else (lambda fn: fn)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- kernels


@_jit
def _rot(X, Y, x_off, y_off, sxd, offs_i, mask, c, s, HALF: tl.constexpr):
    """Rotate one head tile: pairs at X + x_off (strided) -> Y + y_off (unit D stride).

    x_off/y_off (BT, 1), offs_i (HP,), mask/c/s (BT, HP)."""
    x1 = tl.load(X + x_off + offs_i[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + (offs_i[None, :] + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + y_off + offs_i[None, :], (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + offs_i[None, :] + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty),
             mask=mask)  # fmt: skip


@_jit
def _copy_head(X, Y, x_off, y_off, sxd, offs_i, mask, HALF: tl.constexpr):
    """Copy one head tile (both halves) from X + x_off (strided) to Y + y_off (unit D stride)."""
    for j in tl.static_range(2):
        x = tl.load(X + x_off + (offs_i[None, :] + j * HALF) * sxd, mask=mask, other=0.0)
        tl.store(Y + y_off + offs_i[None, :] + j * HALF, x.to(Y.dtype.element_ty), mask=mask)


@_jit
def _rot_back(G, X, DX, g_off, x_off, dx_off, sgd, sxd, offs_i, mask, c, s, HALF: tl.constexpr):
    """Gradient of one head tile: DX = G rotated by -phi (contiguous D); returns
    d phi = g1 (-x1 s - x2 c) + g2 (x1 c - x2 s), (BT, HP), from the exact inputs x."""
    g1 = tl.load(G + g_off + offs_i[None, :] * sgd, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(G + g_off + (offs_i[None, :] + HALF) * sgd, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(X + x_off + offs_i[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + (offs_i[None, :] + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + dx_off + offs_i[None, :], (g1 * c + g2 * s).to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + dx_off + offs_i[None, :] + HALF, (g2 * c - g1 * s).to(DX.dtype.element_ty),
             mask=mask)  # fmt: skip
    return g2 * (x1 * c - x2 * s) - g1 * (x2 * c + x1 * s)


@_jit
def _rope_body(Q, K, V, QO, KO, VO, COS, SIN, sqb, sqt, sqh, sqd, skb, skt, skh, skd,
               svb, svt, svh, svd, sob, sot, soh, skob, skot, skoh, svob, svot, svoh,
               sct, sci, sst, ssi, n_t, n_h, n_kv, NEG: tl.constexpr, COPY_V: tl.constexpr,
               HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """One (token block, batch): rotate all q and k heads by the table angles (by -angle if NEG)
    and, if COPY_V, copy the v heads too."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    offs_i = tl.arange(0, HALF_P)
    mask = (offs_t < n_t)[:, None] & (offs_i < HALF)[None, :]  # (BT, HP)
    t = offs_t.to(tl.int64)[:, None]  # (BT, 1)
    c = tl.load(COS + t * sct + offs_i[None, :] * sci, mask=mask, other=0.0)
    s = tl.load(SIN + t * sst + offs_i[None, :] * ssi, mask=mask, other=0.0)
    if NEG:
        s = -s
    for h in range(n_h):
        _rot(Q, QO, b * sqb + t * sqt + h * sqh, b * sob + t * sot + h * soh, sqd, offs_i, mask,
             c, s, HALF)  # fmt: skip
    for h in range(n_kv):
        _rot(K, KO, b * skb + t * skt + h * skh, b * skob + t * skot + h * skoh, skd, offs_i,
             mask, c, s, HALF)  # fmt: skip
    if COPY_V:
        for h in range(n_kv):
            _copy_head(V, VO, b * svb + t * svt + h * svh, b * svob + t * svot + h * svoh, svd,
                       offs_i, mask, HALF)  # fmt: skip


@_jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                 sob, sot, soh, skob, skot, skoh, sct, sci, sst, ssi, n_t, n_h, n_kv,
                 NEG: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
                 BLOCK_T: tl.constexpr):  # fmt: skip
    """q, k (any strides) -> rotated qo, ko (separate outputs, unit D stride)."""
    _rope_body(Q, K, K, QO, KO, KO, COS, SIN, sqb, sqt, sqh, sqd, skb, skt, skh, skd,
               skb, skt, skh, skd, sob, sot, soh, skob, skot, skoh, skob, skot, skoh,
               sct, sci, sst, ssi, n_t, n_h, n_kv, NEG, False, HALF, HALF_P, BLOCK_T)  # fmt: skip


@_jit
def _rope_qkv_bwd_kernel(GQ, GK, GV, DQKV, COS, SIN, sgqb, sgqt, sgqh, sgqd, sgkb, sgkt, sgkh,
                         sgkd, sgvb, sgvt, sgvh, sgvd, sdb, sdt, n_t, n_h, n_kv, sct, sci, sst,
                         ssi, HALF: tl.constexpr, HALF_P: tl.constexpr,
                         BLOCK_T: tl.constexpr):  # fmt: skip
    """Gradient of a fused qkv (B, T, (H + 2 Hkv) D), unit column stride, written in one pass:
    q and k gradients rotated back, v's copied. One output pointer: passing three views of one
    buffer would make torch.compile treat them as separate mutated tensors."""
    D: tl.constexpr = 2 * HALF
    _rope_body(GQ, GK, GV, DQKV, DQKV + n_h * D, DQKV + (n_h + n_kv) * D, COS, SIN,
               sgqb, sgqt, sgqh, sgqd, sgkb, sgkt, sgkh, sgkd, sgvb, sgvt, sgvh, sgvd,
               sdb, sdt, D, sdb, sdt, D, sdb, sdt, D, sct, sci, sst, ssi, n_t, n_h, n_kv,
               True, True, HALF, HALF_P, BLOCK_T)  # fmt: skip


@_jit
def _carope_powers(LOGF, l_off, slt, offs_t, offs_i, n_t, HALF: tl.constexpr):
    """Powers f_t ** i = exp(i log_f[t]) ((BT, HP), 0 off-range) and their mask."""
    in_t = offs_t < n_t
    mask = in_t[:, None] & (offs_i < HALF)[None, :]
    log_f = tl.load(LOGF + l_off + offs_t.to(tl.int64) * slt, mask=in_t, other=0.0)
    return tl.where(mask, tl.exp(log_f[:, None] * offs_i.to(tl.float32)[None, :]), 0.0), mask


@_jit
def _carope_phase(LOGF, l_off, slt, offs_t, offs_i, carry, n_t, HALF: tl.constexpr):
    """Powers f_t ** i and phases carry + cumsum_t (both (BT, HP), 0 off-range)."""
    pw, mask = _carope_powers(LOGF, l_off, slt, offs_t, offs_i, n_t, HALF)
    return pw, carry[None, :] + tl.cumsum(pw, 0), mask


@_jit
def _carope_block(LOGF, CARRY, slb, slt, slh, n_t, n_kv, HALF: tl.constexpr,
                  HALF_P: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """A (token block, batch, kv head) program's setup: its coordinates, its slot in the
    (B, Hkv, n_blocks, HP) carry/sum tables, the powers f_t ** i and the cos/sin of the phase
    (the block's carry + in-block cumsum)."""
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2)
    offs_i = tl.arange(0, HALF_P)
    slot = ((b * n_kv + hk) * tl.cdiv(n_t, BLOCK_T) + blk) * HALF_P + offs_i
    offs_t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    pw, phase, mask = _carope_phase(LOGF, b * slb + hk * slh, slt, offs_t, offs_i,
                                    tl.load(CARRY + slot), n_t, HALF)  # fmt: skip
    return b, hk, offs_i, offs_t, slot, pw, mask, tl.cos(phase), tl.sin(phase)


@_jit
def _carope_carry_kernel(LOGF, CARRY, slb, slt, slh, n_t, n_kv, HALF: tl.constexpr,
                         HALF_P: tl.constexpr, BLOCK_T: tl.constexpr,
                         NB: tl.constexpr):  # fmt: skip
    """One (batch, kv head): the phase prefix (sum of f_t ** i over the earlier blocks) at the
    start of every token block, (B, Hkv, n_blocks, HP). Light (log_f only): the rotation
    kernels then run every block in parallel. NB blocks a step: their sums, and an exclusive
    cumsum over them (a serial walk of one block a step was latency-bound: 25-45 us a layer
    of GPT-2 at T=1024 for a few MB of reads)."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    n_blocks = tl.cdiv(n_t, BLOCK_T)
    offs_i = tl.arange(0, HALF_P)
    offs_b = tl.arange(0, NB)
    carry_base = CARRY + (b * n_kv + hk) * n_blocks * HALF_P
    carry = tl.zeros([HALF_P], dtype=tl.float32)
    for c0 in range(0, n_blocks, NB):
        offs_t = c0 * BLOCK_T + tl.arange(0, NB * BLOCK_T)
        pw, _ = _carope_powers(LOGF, b * slb + hk * slh, slt, offs_t, offs_i, n_t, HALF)
        sums = tl.sum(tl.reshape(pw, (NB, BLOCK_T, HALF_P)), 1)  # (NB, HP): each block's
        starts = carry[None, :] + tl.cumsum(sums, 0) - sums  # sum of the blocks before
        blk = c0 + offs_b
        tl.store(carry_base + blk[:, None] * HALF_P + offs_i[None, :], starts,
                 mask=(blk < n_blocks)[:, None])  # fmt: skip
        carry += tl.sum(sums, 0)


@_jit
def _carope_fwd_kernel(Q, K, LOGF, QO, KO, CARRY, sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                       slb, slt, slh, n_t, n_h, n_kv, HALF: tl.constexpr, HALF_P: tl.constexpr,
                       BLOCK_T: tl.constexpr):  # fmt: skip
    """One (token block, batch, kv head): phase = the block's carry + in-block cumsum; rotate
    the group's q heads and the k head."""
    b, hk, offs_i, offs_t, _, _, mask, c, s = _carope_block(LOGF, CARRY, slb, slt, slh, n_t,
                                                            n_kv, HALF, HALF_P, BLOCK_T)  # fmt: skip
    group = n_h // n_kv
    t = offs_t.to(tl.int64)[:, None]  # (BT, 1)
    for g in range(group):
        h = hk * group + g
        _rot(Q, QO, b * sqb + t * sqt + h * sqh, ((b * n_t + t) * n_h + h) * (2 * HALF), sqd,
             offs_i, mask, c, s, HALF)  # fmt: skip
    _rot(K, KO, b * skb + t * skt + hk * skh, ((b * n_t + t) * n_kv + hk) * (2 * HALF), skd,
         offs_i, mask, c, s, HALF)  # fmt: skip


@_jit
def _carope_bwd_body(GQ, GK, GV, Q, K, LOGF, CARRY, DQ, DK, DV, DLOGF, DSUM, sgqb, sgqt, sgqh,
                     sgqd, sgkb, sgkt, sgkh, sgkd, sgvb, sgvt, sgvh, sgvd, sqb, sqt, sqh, sqd,
                     skb, skt, skh, skd, sdqb, sdqt, sdqh, sdkb, sdkt, sdkh, sdvb, sdvt, sdvh,
                     slb, slt, slh, n_t, n_h, n_kv, COPY_V: tl.constexpr, HALF: tl.constexpr,
                     HALF_P: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """One (token block, batch, kv head): dq, dk (rotated back), v's gradient if COPY_V, and
    the in-block part of d log_f: with d phase summed over the group and the k head,
    d pow[t] = (reverse cumsum of d phase within the block)[t] + suffix, where suffix (the sum
    over later blocks) is not known here; DLOGF gets the in-block term and DSUM the block's
    total d phase, and _carope_suffix_kernel adds sum_i suffix_i * i * f_t ** i."""
    b, hk, offs_i, offs_t, slot, pw, mask, c, s = _carope_block(LOGF, CARRY, slb, slt, slh,
                                                                n_t, n_kv, HALF, HALF_P,
                                                                BLOCK_T)  # fmt: skip
    group = n_h // n_kv
    t = offs_t.to(tl.int64)[:, None]  # (BT, 1)
    dphase = tl.zeros([BLOCK_T, HALF_P], dtype=tl.float32)
    for g in range(group):
        h = hk * group + g
        dphase += _rot_back(GQ, Q, DQ, b * sgqb + t * sgqt + h * sgqh,
                            b * sqb + t * sqt + h * sqh, b * sdqb + t * sdqt + h * sdqh,
                            sgqd, sqd, offs_i, mask, c, s, HALF)  # fmt: skip
    dphase += _rot_back(GK, K, DK, b * sgkb + t * sgkt + hk * sgkh,
                        b * skb + t * skt + hk * skh, b * sdkb + t * sdkt + hk * sdkh,
                        sgkd, skd, offs_i, mask, c, s, HALF)  # fmt: skip
    if COPY_V:
        _copy_head(GV, DV, b * sgvb + t * sgvt + hk * sgvh, b * sdvb + t * sdvt + hk * sdvh,
                   sgvd, offs_i, mask, HALF)  # fmt: skip
    dpow = tl.cumsum(dphase, 0, reverse=True)  # sum over m >= t within the block
    tl.store(DSUM + slot, tl.sum(dphase, 0))
    dlog_f = tl.sum(dpow * pw * offs_i.to(tl.float32)[None, :], 1)  # (BT,)
    tl.store(DLOGF + (b * n_t + offs_t) * n_kv + hk, dlog_f, mask=offs_t < n_t)


@_jit
def _carope_suffix_kernel(LOGF, DSUM, DLOGF, slb, slt, slh, n_t, n_kv, HALF: tl.constexpr,
                          HALF_P: tl.constexpr, BLOCK_T: tl.constexpr,
                          NB: tl.constexpr):  # fmt: skip
    """One (batch, kv head): walk the blocks from the end, NB a step, carrying suffix = the
    total d phase of the later blocks, and add its term sum_i suffix_i * i * f_t ** i to
    d log_f (each block's own suffix: the carried one + a reverse exclusive cumsum over the
    step's blocks)."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    n_blocks = tl.cdiv(n_t, BLOCK_T)
    n_steps = tl.cdiv(n_blocks, NB)
    offs_i = tl.arange(0, HALF_P)
    offs_b = tl.arange(0, NB)
    base = DSUM + (b * n_kv + hk) * n_blocks * HALF_P
    suffix = tl.zeros([HALF_P], dtype=tl.float32)
    for r in range(n_steps):
        c0 = (n_steps - 1 - r) * NB
        blk = c0 + offs_b
        ds = tl.load(base + blk[:, None] * HALF_P + offs_i[None, :],
                     mask=(blk < n_blocks)[:, None], other=0.0)  # (NB, HP)  # fmt: skip
        later = suffix[None, :] + tl.cumsum(ds, 0, reverse=True) - ds  # (NB, HP)
        offs_t = c0 * BLOCK_T + tl.arange(0, NB * BLOCK_T)
        in_t = offs_t < n_t
        pw, _ = _carope_powers(LOGF, b * slb + hk * slh, slt, offs_t, offs_i, n_t, HALF)
        ipw = pw * offs_i.to(tl.float32)[None, :]  # i * f_t ** i
        extra = tl.sum(tl.reshape(ipw, (NB, BLOCK_T, HALF_P)) * later[:, None, :], 2)
        ptr = DLOGF + (b * n_t + offs_t) * n_kv + hk
        tl.store(ptr, tl.load(ptr, mask=in_t, other=0.0) + tl.reshape(extra, (NB * BLOCK_T,)),
                 mask=in_t)  # fmt: skip
        suffix += tl.sum(ds, 0)


@_jit
def _carope_bwd_kernel(GQ, GK, Q, K, LOGF, CARRY, DQ, DK, DLOGF, DSUM, sgqb, sgqt, sgqh, sgqd,
                       sgkb, sgkt, sgkh, sgkd, sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                       slb, slt, slh, n_t, n_h, n_kv,
                       HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """Backward into separate contiguous dq (B, T, H, D), dk (B, T, Hkv, D)."""
    D: tl.constexpr = 2 * HALF
    _carope_bwd_body(GQ, GK, GK, Q, K, LOGF, CARRY, DQ, DK, DK, DLOGF, DSUM, sgqb, sgqt, sgqh,
                     sgqd, sgkb, sgkt, sgkh, sgkd, sgkb, sgkt, sgkh, sgkd, sqb, sqt, sqh, sqd,
                     skb, skt, skh, skd, n_t * n_h * D, n_h * D, D, n_t * n_kv * D, n_kv * D, D,
                     n_t * n_kv * D, n_kv * D, D, slb, slt, slh, n_t, n_h, n_kv, False, HALF,
                     HALF_P, BLOCK_T)  # fmt: skip


@_jit
def _carope_qkv_bwd_kernel(GQ, GK, GV, Q, K, LOGF, CARRY, DQKV, DLOGF, DSUM, sgqb, sgqt, sgqh,
                           sgqd, sgkb, sgkt, sgkh, sgkd, sgvb, sgvt, sgvh, sgvd, sqb, sqt, sqh,
                           sqd, skb, skt, skh, skd, sdb, sdt, slb, slt, slh, n_t, n_h, n_kv,
                           HALF: tl.constexpr, HALF_P: tl.constexpr,
                           BLOCK_T: tl.constexpr):  # fmt: skip
    """Backward into one fused qkv gradient (B, T, (H + 2 Hkv) D) with unit column stride (one
    output pointer, as _rope_qkv_bwd_kernel), v's gradient copied beside q's and k's."""
    D: tl.constexpr = 2 * HALF
    _carope_bwd_body(GQ, GK, GV, Q, K, LOGF, CARRY, DQKV, DQKV + n_h * D,
                     DQKV + (n_h + n_kv) * D, DLOGF, DSUM, sgqb, sgqt, sgqh, sgqd, sgkb, sgkt,
                     sgkh, sgkd, sgvb, sgvt, sgvh, sgvd, sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                     sdb, sdt, D, sdb, sdt, D, sdb, sdt, D, slb, slt, slh, n_t, n_h, n_kv, True,
                     HALF, HALF_P, BLOCK_T)  # fmt: skip


# ----------------------------------------------------------------------------- launchers


def _opts(block_t, num_warps, default_block_t: int) -> tuple[int, int]:
    """Tile options: given values, else defaults (16-token blocks under the interpreter)."""
    bt = (16 if _INTERPRET else default_block_t) if block_t is None else block_t
    if not isinstance(bt, int) or bt < 1 or bt & (bt - 1) or bt > 1024:
        raise ValueError(f"block_t must be a power of two in [1, 1024]; got {block_t!r}")
    nw = 4 if num_warps is None else num_warps
    if nw not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be one of (1, 2, 4, 8, 16); got {num_warps!r}")
    return bt, nw


def _launch(kernel, grid, *args, num_warps: int, **constexprs):
    if all(grid):  # empty sequences or batches: nothing to do
        launch(kernel, grid, *args, **constexprs, num_warps=num_warps)


def _scan_blocks(block_t: int) -> int:
    """Token blocks the carry and suffix scans take a step: 128 tokens (16 under the
    interpreter, so that the CPU tests' short sequences span several steps)."""
    return max(1, (16 if _INTERPRET else 128) // block_t)


def _half(d: int) -> dict:
    return dict(HALF=d // 2, HALF_P=triton.next_power_of_2(d // 2))


def _rope(q, k, cos, sin, neg: bool, block_t: int, num_warps: int):
    """q (B, T, H, D), k (B, T, Hkv, D) any strides -> rotated, contiguous, same dtype."""
    b, t, h, d = q.shape
    qo = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(_rope_kernel, (_cdiv(t, block_t), b), q, k, qo, ko, cos, sin, *q.stride(),
            *k.stride(), *qo.stride()[:3], *ko.stride()[:3], *cos.stride(), *sin.stride(), t, h,
            k.shape[2], num_warps=num_warps, NEG=neg, BLOCK_T=block_t, **_half(d))  # fmt: skip
    return qo, ko


class _RopeQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, block_t, num_warps):
        ctx.save_for_backward(cos, sin)
        ctx.opts = (block_t, num_warps)
        return _rope(q, k, cos, sin, False, block_t, num_warps)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope(gq, gk, cos, sin, True, *ctx.opts)  # inverse rotation
        return dq, dk, None, None, None, None


def split_qkv(qkv: torch.Tensor, n_head: int, n_kv: int):
    """Views q (B, T, H, D), k, v (B, T, Hkv, D) of a fused (B, T, (H + 2 Hkv) D) projection."""
    b, t, w = qkv.shape
    d = w // (n_head + 2 * n_kv)
    q, k, v = qkv.split([n_head * d, n_kv * d, n_kv * d], dim=-1)
    return q.view(b, t, n_head, d), k.view(b, t, n_kv, d), v.view(b, t, n_kv, d)


class _RopeQKV(torch.autograd.Function):
    """RoPE on a fused qkv projection. Backward writes the qkv gradient in one launch (q and k
    gradients rotated back, v's copied beside them) instead of rotating into separate tensors
    that autograd's split backward then concatenates: one read and one write of the gradient
    fewer per layer."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head, n_kv, block_t, num_warps):
        q, k, v = split_qkv(qkv, n_head, n_kv)
        ctx.save_for_backward(cos, sin)
        ctx.opts = (n_head, n_kv, block_t, num_warps)
        qo, ko = _rope(q, k, cos, sin, False, block_t, num_warps)
        return qo, ko, v

    @staticmethod
    def backward(ctx, gq, gk, gv):
        cos, sin = ctx.saved_tensors
        n_head, n_kv, block_t, num_warps = ctx.opts
        g = next(x for x in (gq, gk, gv) if x is not None)
        b, t, _, d = g.shape
        if gv is None:  # an output unused downstream has no gradient: use zeros
            gv = torch.zeros((b, t, n_kv, d), dtype=g.dtype, device=g.device)
        gq = torch.zeros((b, t, n_head, d), dtype=g.dtype, device=g.device) if gq is None else gq
        gk = torch.zeros_like(gv) if gk is None else gk
        dqkv = torch.empty(b, t, (n_head + 2 * n_kv) * d, dtype=g.dtype, device=g.device)
        _launch(_rope_qkv_bwd_kernel, (_cdiv(t, block_t), b), gq, gk, gv, dqkv, cos, sin,
                *gq.stride(), *gk.stride(), *gv.stride(), *dqkv.stride()[:2], t, n_head, n_kv,
                *cos.stride(), *sin.stride(), num_warps=num_warps, BLOCK_T=block_t,
                **_half(d))  # fmt: skip
        return dqkv, None, None, None, None, None, None


def _carope_fwd(q, k, log_f, block_t, num_warps):
    """Rotated contiguous (qo, ko) and the per-block phase carries for the backward."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    half = _half(d)
    qo = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((b, t, hkv, d), dtype=k.dtype, device=k.device)
    n_blocks = _cdiv(t, block_t)
    carry = torch.empty((b, hkv, n_blocks, half["HALF_P"]), dtype=torch.float32,
                        device=q.device)  # fmt: skip
    _launch(_carope_carry_kernel, (b, hkv), log_f, carry, *log_f.stride(), t, hkv,
            num_warps=num_warps, BLOCK_T=block_t, NB=_scan_blocks(block_t), **half)  # fmt: skip
    _launch(_carope_fwd_kernel, (n_blocks, b, hkv), q, k, log_f, qo, ko, carry, *q.stride(),
            *k.stride(), *log_f.stride(), t, h, hkv, num_warps=num_warps, BLOCK_T=block_t,
            **half)  # fmt: skip
    return qo, ko, carry


def _carope_bwd(kernel, grads, q, k, log_f, carry, outs, out_strides, block_t, num_warps):
    """Launch a CARoPE backward kernel (all token blocks in parallel) and the suffix pass;
    returns d log_f."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    dlog_f = torch.empty((b, t, hkv), dtype=torch.float32, device=q.device)
    dsum = torch.empty_like(carry)  # (B, Hkv, n_blocks, HP): each block's total d phase
    strides = [s for g in grads for s in g.stride()]
    _launch(kernel, (carry.shape[2], b, hkv), *grads, q, k, log_f, carry, *outs, dlog_f, dsum,
            *strides, *q.stride(), *k.stride(), *out_strides, *log_f.stride(), t, h, hkv,
            num_warps=num_warps, BLOCK_T=block_t, **_half(d))  # fmt: skip
    _launch(_carope_suffix_kernel, (b, hkv), log_f, dsum, dlog_f, *log_f.stride(), t, hkv,
            num_warps=num_warps, BLOCK_T=block_t, NB=_scan_blocks(block_t),
            **_half(d))  # fmt: skip
    return dlog_f


class _CaropeQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, log_f, block_t, num_warps):
        qo, ko, carry = _carope_fwd(q, k, log_f, block_t, num_warps)
        ctx.save_for_backward(q, k, log_f, carry)
        ctx.opts = (block_t, num_warps)
        return qo, ko

    @staticmethod
    def backward(ctx, gq, gk):
        q, k, log_f, carry = ctx.saved_tensors
        block_t, num_warps = ctx.opts
        b, t, h, d = q.shape
        hkv = k.shape[2]
        gq = torch.zeros_like(q) if gq is None else gq  # an output unused downstream
        gk = torch.zeros_like(k) if gk is None else gk
        dq = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device)
        dk = torch.empty((b, t, hkv, d), dtype=k.dtype, device=k.device)
        dlog_f = _carope_bwd(_carope_bwd_kernel, (gq, gk), q, k, log_f, carry, (dq, dk), (),
                             block_t, num_warps)  # fmt: skip
        return dq, dk, dlog_f, None, None


class _CaropeQKV(torch.autograd.Function):
    """CARoPE on a fused qkv projection; like _RopeQKV, the backward writes qkv's gradient in
    the same launch that computes d log_f (v's gradient copied beside q's and k's)."""

    @staticmethod
    def forward(ctx, qkv, log_f, n_head, n_kv, block_t, num_warps):
        q, k, v = split_qkv(qkv, n_head, n_kv)
        qo, ko, carry = _carope_fwd(q, k, log_f, block_t, num_warps)
        ctx.save_for_backward(qkv, log_f, carry)
        ctx.opts = (n_head, n_kv, block_t, num_warps)
        return qo, ko, v

    @staticmethod
    def backward(ctx, gq, gk, gv):
        qkv, log_f, carry = ctx.saved_tensors
        n_head, n_kv, block_t, num_warps = ctx.opts
        q, k, v = split_qkv(qkv, n_head, n_kv)
        b, t, _, d = q.shape
        gq = torch.zeros_like(q) if gq is None else gq  # an output unused downstream
        gk = torch.zeros_like(k) if gk is None else gk
        gv = torch.zeros_like(v) if gv is None else gv
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        dlog_f = _carope_bwd(_carope_qkv_bwd_kernel, (gq, gk, gv), q, k, log_f, carry, (dqkv,),
                             dqkv.stride()[:2], block_t, num_warps)  # fmt: skip
        return dqkv, dlog_f, None, None, None, None


# ----------------------------------------------------------------------------- public API


def available() -> bool:
    """Whether the kernels can run on CUDA tensors here (triton importable)."""
    return triton is not None


def _check_qk(name: str, q: torch.Tensor, k: torch.Tensor) -> None:
    """Shape/dtype/device checks shared by both ops; ValueError says what would be right."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{name} takes q (B, T, H, D), k (B, T, Hkv, D); got q{tuple(q.shape)}, "
                         f"k{tuple(k.shape)}")  # fmt: skip
    (b, t, h, d), (bk, tk, hkv, dk) = q.shape, k.shape
    if (b, t, d) != (bk, tk, dk):
        raise ValueError(f"{name}: q{tuple(q.shape)} and k{tuple(k.shape)} must agree in B, T, D")
    if d % 2 or d > _MAX_HEAD_DIM or d == 0:
        raise ValueError(f"{name}: head dim must be even and <= {_MAX_HEAD_DIM}; got {d}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"{name}: q heads ({h}) must be a multiple of k heads ({hkv})")
    if q.dtype != k.dtype or q.dtype not in _DTYPES:
        raise ValueError(f"{name}: q and k must share a dtype in {_DTYPES}; got {q.dtype}, "
                         f"{k.dtype}")  # fmt: skip
    if q.device != k.device:
        raise ValueError(f"{name}: q on {q.device}, k on {k.device}; put them on one device")
    if not kernels_run_on(q):
        raise ValueError(f"{name} needs triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _check_f32(name: str, what: str, x: torch.Tensor, shape: tuple, device) -> None:
    if x.dtype != torch.float32 or x.device != device:
        raise ValueError(f"{name}: {what} must be float32 on {device}; got {x.dtype} on {x.device}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name}: {what} must have shape {shape}; got {tuple(x.shape)}")


def _tables(name: str, cos, sin, t: int, half: int, device):
    """Validated (T', D/2) float32 cos/sin tables (from tables or their (1, T', 1, D/2) views)."""
    cos, sin = (x[0, :, 0] if x.dim() == 4 and x.shape[0] == x.shape[2] == 1 else x
                for x in (cos, sin))  # fmt: skip
    for what, x in (("cos", cos), ("sin", sin)):
        if x.dim() == 2 and x.shape[1] == half and x.shape[0] < t:
            raise ValueError(f"{name}: {what} table has {x.shape[0]} rows, fewer than T={t}")
        _check_f32(name, what, x, (x.shape[0] if x.dim() == 2 else t, half), device)
        if x.requires_grad:
            raise ValueError(f"{name} gives no gradient to cos/sin; detach them, or use "
                             "models.positions.apply_rotary for learned angles")  # fmt: skip
    return cos, sin


def rope_qk(q, k, cos, sin, *, block_t=None, num_warps=None):
    """RoPE on q (B, T, H, D) and k (B, T, Hkv, D) in one launch; returns contiguous (q_rot, k_rot).

    cos, sin: (T', D/2) float32 tables with T' >= T (the first T rows are used), or their
    (1, T', 1, D/2) broadcast views. Gradients flow to q and k only: the tables must not
    require grad. Same numbers as models.positions.apply_rotary with these angles.
    """
    _check_qk("rope_qk", q, k)
    cos, sin = _tables("rope_qk", cos, sin, q.shape[1], q.shape[3] // 2, q.device)
    block_t, num_warps = _opts(block_t, num_warps, 32)
    return _RopeQK.apply(q, k, cos, sin, block_t, num_warps)


def rope_qkv(qkv, cos, sin, n_head: int, n_kv: int, *, block_t=None, num_warps=None):
    """RoPE on a fused projection qkv (B, T, (H + 2 Hkv) D) laid out [q heads | k heads | v heads].

    Returns (q_rot (B, T, H, D), k_rot (B, T, Hkv, D)) contiguous and v (B, T, Hkv, D), a view
    of qkv. Same numbers as rope_qk on the split views; the difference is the backward, which
    writes qkv's gradient directly (see _RopeQKV). cos, sin as for rope_qk.
    """
    q, _, _ = _check_fused("rope_qkv", qkv, n_head, n_kv)
    cos, sin = _tables("rope_qkv", cos, sin, q.shape[1], q.shape[3] // 2, q.device)
    block_t, num_warps = _opts(block_t, num_warps, 32)
    return _RopeQKV.apply(qkv, cos, sin, n_head, n_kv, block_t, num_warps)


def carope_qk(q, k, log_f, *, block_t=None, num_warps=None):
    """CARoPE on q (B, T, H, D) and k (B, T, Hkv, D) in one launch; returns (q_rot, k_rot).

    log_f: (B, T, Hkv) float32 log-frequencies (-log(softplus(z) + 1) in models.positions).
    Pair i at position m turns by phase sum_{t<=m} exp(i log_f[t]) of its kv head (q head h
    uses kv head h // (H / Hkv)), computed in fp32 in registers. Differentiable in q, k, log_f.
    """
    _check_qk("carope_qk", q, k)
    b, t, _, _ = q.shape
    _check_f32("carope_qk", "log_f", log_f, (b, t, k.shape[2]), q.device)
    block_t, num_warps = _opts(block_t, num_warps, 32)  # 32: bench_rotary.py, H100
    return _CaropeQK.apply(q, k, log_f, block_t, num_warps)


def _check_fused(name: str, qkv: torch.Tensor, n_head: int, n_kv: int):
    """Views q, k, v of a fused projection after checking its shape (ValueError otherwise)."""
    if qkv.dim() != 3:
        raise ValueError(f"{name} takes qkv (B, T, (H + 2 Hkv) D); got {tuple(qkv.shape)}")
    if n_head < 1 or n_kv < 1 or qkv.shape[2] % (n_head + 2 * n_kv):
        raise ValueError(f"{name}: width {qkv.shape[2]} is not (n_head + 2 n_kv) * head_dim "
                         f"with n_head={n_head}, n_kv={n_kv}")  # fmt: skip
    q, k, v = split_qkv(qkv, n_head, n_kv)
    _check_qk(name, q, k)
    return q, k, v


def carope_qkv(qkv, log_f, n_head: int, n_kv: int, *, block_t=None, num_warps=None):
    """CARoPE on a fused projection qkv (B, T, (H + 2 Hkv) D) laid out [q | k | v heads].

    Returns (q_rot, k_rot) contiguous and v, a view of qkv; log_f as for carope_qk. Same
    numbers as carope_qk on the split views; the backward writes qkv's gradient directly.
    """
    q, _, _ = _check_fused("carope_qkv", qkv, n_head, n_kv)
    b, t = q.shape[:2]
    _check_f32("carope_qkv", "log_f", log_f, (b, t, n_kv), q.device)
    block_t, num_warps = _opts(block_t, num_warps, 32)  # 32: bench_rotary.py, H100
    return _CaropeQKV.apply(qkv, log_f, n_head, n_kv, block_t, num_warps)
