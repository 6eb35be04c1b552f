"""HyperAttention (Han et al., 2023): near-linear approximate attention, ``ops.build("hyper")``.

Non-causal, for Nk > ``min_seq_len`` keys (per batch x head):

1. **sortLSH.** q and k are hashed with ``lsh_bits`` random hyperplanes (angular LSH; the code
   is read as a Gray code, so that buckets adjacent in the order differ in one hyperplane).
   Keys are sorted by bucket and cut into blocks of ``block_size``; each query attends exactly
   to the key block where its own bucket falls in that order: the large entries of the
   attention matrix are found there. (The paper sorts the queries too and pairs block i with
   block i; placing each query by its own hash gives the same blocks for balanced buckets and
   makes a query's result independent of the other queries, which the causal form needs.)
2. **Sampling.** Each key block also gets ``sample_size`` key columns drawn uniformly, with
   replacement, from the keys *outside* it (no double counting); its queries attend to them,
   and the sampled part's LSE is raised by log(outside / sample_size) to estimate the rest of
   the row. Where ``sample_size`` covers every outside key, all of them are used once, weight
   1: the result is then exact attention (tested).
3. **Merge** through the log-sum-exps: lse = logaddexp(lse_block, lse_sampled), o = the two
   outputs weighted by exp(lse_part - lse).

Causal (the paper's recursion): split the sequence in halves; the first half and the second
half attend causally to themselves (recursively), the second half attends non-causally (steps
1-3) to the first; the parts merge through their LSEs. Changing a token changes no earlier
output (tested). Lengths at or below ``min_seq_len``, and causal attention with unequal query
and key lengths, use exact attention.

Every exact piece runs on an inner backend (``inner``, default ``flash``: the Triton core, whose
LSE is differentiable) through the ops contract with ``return_lse=True``, batched over tiles
of ``block_size`` queries of one key block, so nothing N x N is ever formed. The backward is the true gradient of this forward: autograd
flows through the gathers, the inner backend and the LSE merge (the public implementation
detaches the LSE, which biases the gradient). With the Triton core and lengths that halve evenly
down to ``min_seq_len``, the whole causal recursion is one autograd step (``_CausalHyper``): its
backward walks the levels and has each level's non-causal kernels add their gradients straight
into the recursion's buffers, with no per-level copies or additions; the merges need no
backward of their own, each piece being part of one softmax per query (one Delta for all).

Randomness (hyperplanes, samples) comes from a ``torch.Generator`` seeded with ``seed`` and kept
by the backend: a fresh backend with the same seed replays the same draws; ``state()`` /
``set_state()`` save and restore the generators (for checkpoints).
"""

from __future__ import annotations

import math

import torch

from . import flash as _flash
from . import hyper_kernels
from .contract import check_inputs
from .registry import Capabilities, build, register

_DEFAULTS = {
    "lsh_bits": 7,
    "block_size": 256,
    "sample_size": 256,
    "min_seq_len": 4096,
    "inner": "flash",
    "seed": 0,
}

# The causal recursion as one autograd step where it can be (tests switch it off to compare
# with the recursion recorded by autograd level by level).
_FUSED_CAUSAL = True


def _gray_rank(code: torch.Tensor, bits: int) -> torch.Tensor:
    """Position of each Gray code in the Gray sequence: buckets one hyperplane apart are
    neighbours in the sort order."""
    rank = code.clone()
    shift = 1
    while shift < bits:
        rank ^= rank >> shift
        shift <<= 1
    return rank


def _ranks(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """x (BH, N, D), planes (D, bits) -> (BH, N) sort key: the Gray rank of x's bucket."""
    bits = planes.shape[1]
    if bits == 0:
        return torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
    pad = -bits % 8  # an aligned GEMM: 7 columns ran as a 32x32 wmma kernel, 4.7 ms at 131k
    planes = torch.nn.functional.pad(planes.to(x.dtype), (0, pad))
    signs = (x @ planes)[..., :bits] > 0  # (BH, N, bits); 16-bit inputs project in 16 bits
    code = (signs.long() << torch.arange(bits, device=x.device)).sum(-1)
    return _gray_rank(code, bits)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (BH, N, D), idx (BH, M) -> (BH, M, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _merge(o1, lse1, o2, lse2):
    """Combine two partial attentions over disjoint key sets: o (.., M, Dv), lse (.., M)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype), lse


class _LevelInputs(torch.autograd.Function):
    """One level of the causal recursion reads q, k, v (BH, N, D) four ways: as two halves
    batched for the recursion (BH*2, N/2, D), and q's second half with k's and v's first
    half for the non-causal part. Sliced by autograd, each slice's gradient is a full-size zero
    tensor with the slice copied in, then added to the recursion's gradient: at 64k tokens
    ~20 ms of fills and adds in the backward. Here the backward takes the recursion's gradient
    as the input's and adds the half's gradient into it in place."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.h = q.shape[1] // 2
        return _split_level(q, k, v)

    @staticmethod
    def backward(ctx, gq_r, gk_r, gv_r, gq2, gk1, gv1):
        h = ctx.h
        out = []
        grads = ((gq_r, gq2, True), (gk_r, gk1, False), (gv_r, gv1, False))
        for needed, (g_r, g_half, second) in zip(ctx.needs_input_grad, grads):
            if not needed or (g_r is None and g_half is None):
                out.append(None)
                continue
            if g_r is None:
                n_d = (g_half.shape[0], 2 * h, g_half.shape[-1])
                g = g_half.new_zeros(n_d)
            else:
                g = g_r.reshape(g_r.shape[0] // 2, 2 * h, g_r.shape[-1]).clone()
            if g_half is not None:
                (g[:, h:] if second else g[:, :h]).add_(g_half)
            out.append(g)
        return tuple(out)


def _split_level(q, k, v):
    """(q, k, v as two batched halves (BH*2, N/2, D), q[:, h:], k[:, :h], v[:, :h])."""
    bh, n, _ = q.shape
    h = n // 2
    halves = tuple(x.reshape(bh * 2, h, x.shape[-1]) for x in (q, k, v))  # views if they can
    return (*halves, q[:, h:], k[:, :h], v[:, :h])


def _level_inputs(q, k, v):
    """:func:`_split_level`, through :class:`_LevelInputs` where autograd records."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _LevelInputs.apply(q, k, v)
    return _split_level(q, k, v)


class _Hyper:
    """The bound algorithm: options, the inner backend and the generators."""

    def __init__(self, lsh_bits, block_size, sample_size, min_seq_len, inner, seed):
        self.bits, self.block, self.samples = lsh_bits, block_size, sample_size
        self.min_len, self.seed = min_seq_len, seed
        self.inner = build(inner)
        self.fused = inner == "flash"  # the Triton core: gathered-attention kernels too
        self._gens: dict[str, torch.Generator] = {}

    # ------------------------------------------------------------------ randomness
    def _gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gens[key]

    def state(self) -> dict[str, torch.Tensor]:
        """Generator states by device (for checkpoints)."""
        return {k: g.get_state() for k, g in self._gens.items()}

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        for key, s in state.items():
            self._gen(torch.device(key)).set_state(s)

    # ------------------------------------------------------------------ exact pieces
    def _exact(self, q, k, v, scale, causal):
        """(BH, Nq, D) x (BH, Nk, D) -> o (BH, Nq, Dv), lse (BH, Nq) through the inner backend."""
        o, lse = self.inner(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), causal=causal,
                            scale=scale, return_lse=True)  # fmt: skip
        return o.squeeze(2), lse.squeeze(1)

    # ------------------------------------------------------------------ the algorithm
    def noncausal(self, q, k, v, scale):
        """q (BH, Nq, D), k (BH, Nk, D), v (BH, Nk, Dv) -> o, lse (approximate).

        Keys are sorted by bucket and cut into blocks of ``block_size`` (the last one ends at
        Nk, overlapping its neighbour, so every block has the same size). Each query goes to
        the key block where its own bucket falls in that order (its computation depends on its
        own hash, the keys and the draws only: no other query can change it, which keeps the
        causal recursion causal). Queries are then packed into tiles of ``block_size`` rows of
        one key block, so the exact parts run as batched calls of fixed shape."""
        bh, nq, d = q.shape
        nk, dv = k.shape[1], v.shape[-1]
        if nk <= self.min_len:
            return self._exact(q, k, v, scale, False)
        k_order, starts, tile_blk, samp, q_index, b, weight = self._layout(q, k)
        if self.fused and hyper_kernels.supported(q, v):  # one kernel reads through indices
            q_index, k_index, b, _ = self._kernel_plan(k_order, starts, tile_blk, samp, q_index,
                                                       b, weight)  # fmt: skip
            return hyper_kernels.gathered_attention(q, k, v, q_index, k_index, b, weight, scale)
        n_tiles, m = tile_blk.shape[1], samp.shape[-1]
        dev = q.device
        # the tiles' queries, block keys and sampled keys, as fixed-shape batches
        ks, vs = _gather(k, k_order), _gather(v, k_order)
        q_pad = torch.cat([q, q.new_zeros(bh, 1, d)], 1)
        qt = _gather(q_pad, q_index).reshape(bh * n_tiles, b, d)
        key_idx = (starts[tile_blk][..., None] + torch.arange(b, device=dev)).reshape(bh, -1)
        kt = _gather(ks, key_idx).reshape(bh * n_tiles, b, d)
        vt = _gather(vs, key_idx).reshape(bh * n_tiles, b, dv)
        o_blk, lse_blk = self._exact(qt, kt, vt, scale, False)
        ksm = _gather(ks, samp.reshape(bh, -1)).reshape(bh * n_tiles, m, d)
        vsm = _gather(vs, samp.reshape(bh, -1)).reshape(bh * n_tiles, m, dv)
        o_s, lse_s = self._exact(qt, ksm, vsm, scale, False)
        o_t, lse_t = _merge(o_blk, lse_blk, o_s, lse_s + math.log(weight))
        # back to the queries (empty slots land on the dropped row nq)
        o = q.new_zeros(bh, nq + 1, dv).scatter(
            1, q_index[..., None].expand(-1, -1, dv), o_t.reshape(bh, -1, dv).to(q.dtype)
        )
        lse = lse_t.new_zeros(bh, nq + 1).scatter(1, q_index, lse_t.reshape(bh, -1))
        return o[:, :nq], lse[:, :nq]

    def _layout(self, q, k):
        """The non-causal step's draws and tile layout (Nk > min_seq_len): (k_order, block
        starts, each tile's key block, each tile's sampled columns (positions in k_order), the
        tiles' query slots (nq: empty), block size, sample weight)."""
        bh, nq, d = q.shape
        nk = k.shape[1]
        dev = q.device
        gen = self._gen(dev)
        planes = torch.randn(d, self.bits, device=dev, generator=gen)
        k_rank, q_rank = _ranks(k, planes), _ranks(q, planes)
        k_order = torch.argsort(k_rank, dim=-1, stable=True)
        b = min(self.block, nk)
        nblk = -(-nk // b)
        starts = (torch.arange(nblk, device=dev) * b).clamp(max=nk - b)  # (nblk,)
        # every query's key block: where its bucket falls among the sorted keys
        pos = torch.searchsorted(torch.gather(k_rank, 1, k_order), q_rank.contiguous())
        qblk = (pos // b).clamp(max=nblk - 1)  # (BH, Nq)
        # samples: m columns outside each block, drawn per key block (not per query)
        outside = nk - b
        if self.samples >= outside:  # every outside key once: exact attention
            m, weight = outside, 1.0
            cols = torch.arange(m, device=dev).expand(bh, nblk, m)
        else:
            m, weight = self.samples, outside / self.samples
            cols = (torch.rand(bh, nblk, m, device=dev, generator=gen) * outside).long()
        cols = torch.where(cols >= starts[None, :, None], cols + b, cols)  # skip the block
        # pack queries into tiles of b rows of one key block
        order = torch.argsort(qblk, dim=-1, stable=True)  # queries grouped by block
        blk_sorted = torch.gather(qblk, 1, order)
        counts = torch.zeros(bh, nblk, dtype=torch.long, device=dev)
        counts.scatter_add_(1, qblk, torch.ones_like(qblk))
        first = torch.cumsum(counts, 1) - counts  # first sorted position of each block
        tiles_per = -(-counts // b)
        tile_first = torch.cumsum(tiles_per, 1) - tiles_per
        n_tiles = int(tiles_per.sum(1).max())
        rank_in_blk = torch.arange(nq, device=dev) - torch.gather(first, 1, blk_sorted)
        tile = torch.gather(tile_first, 1, blk_sorted) + rank_in_blk // b  # (BH, Nq)
        slot = tile * b + rank_in_blk % b
        q_index = torch.full((bh, n_tiles * b), nq, dtype=torch.long, device=dev)  # nq: empty
        q_index.scatter_(1, slot, order)
        tile_blk = torch.zeros(bh, n_tiles, dtype=torch.long, device=dev)
        tile_blk.scatter_(1, tile, blk_sorted)
        samp = torch.gather(cols, 1, tile_blk[..., None].expand(-1, -1, m))  # (BH, T, m)
        return k_order, starts, tile_blk, samp, q_index, b, weight

    @staticmethod
    def _kernel_plan(k_order, starts, tile_blk, samp, q_index, b, weight):
        """The gathered kernels' arguments from a layout: (q_index, k_index (BH, T, b + m) of
        key positions, block size, log weight)."""
        bh, n_tiles = tile_blk.shape
        blk = starts[tile_blk][..., None] + torch.arange(b, device=tile_blk.device)  # (BH, T, b)
        k_index = torch.gather(k_order, 1, torch.cat([blk, samp], -1).reshape(bh, -1))
        return q_index, k_index.reshape(bh, n_tiles, -1), b, math.log(weight)

    def causal(self, q, k, v, scale):
        """Causal HyperAttention by the recursion on halves (equal lengths). For even lengths
        the two halves recurse as one batch (BH*2, N/2, D): each level of the recursion is one
        non-causal call and the leaves one exact call, not 2^level calls of their own."""
        bh, n, d = q.shape
        if self._exact_causal(n) or k.shape[1] != n:  # (unequal lengths: bottom-right, exact)
            return self._exact(q, k, v, scale, True)
        if self._fuses_causal(q, v):
            if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
                return _CausalHyper.apply(q, k, v, self, scale)
            return self._fused_forward(q, k, v, scale, keep=False)[:2]
        h = n // 2
        if n % 2 == 0:
            *halves, q2, k1, v1 = _level_inputs(q, k, v)
            o12, lse12 = self.causal(*halves, scale)
            o12, lse12 = o12.reshape(bh, n, -1), lse12.reshape(bh, n)
        else:
            o1, lse1 = self.causal(q[:, :h], k[:, :h], v[:, :h], scale)
            o2, lse2 = self.causal(q[:, h:], k[:, h:], v[:, h:], scale)
            o12, lse12 = torch.cat([o1, o2], 1), torch.cat([lse1, lse2], 1)
            q2, k1, v1 = q[:, h:], k[:, :h], v[:, :h]
        o3, lse3 = self.noncausal(q2, k1, v1, scale)
        if self.fused and hyper_kernels.supported(q, v):  # one pass, no fp32 temporaries
            return hyper_kernels.merge_halves(o12, lse12, o3.to(o12.dtype), lse3)
        o2, lse2 = _merge(o12[:, h:], lse12[:, h:], o3, lse3)
        return torch.cat([o12[:, :h], o2], 1), torch.cat([lse12[:, :h], lse2], 1)

    def _exact_causal(self, n: int) -> bool:
        """Whether causal attention over n tokens is exact: n <= min_seq_len, or both halves
        are (then the recursion's three pieces, two causal halves and the second half's
        queries on the first half's keys, all exact, are one exact causal attention; computed
        as one, it needs no merge and no adding of gradients, and its tiles run longer)."""
        return n - n // 2 <= self.min_len

    # ------------------------------------------------------------------ fused recursion
    def _fuses_causal(self, q, v) -> bool:
        """Whether the causal recursion runs as one autograd step: the Triton core, and every
        level halves an even length (the recursion's buffers are then views of one another)."""
        if not (_FUSED_CAUSAL and self.fused and hyper_kernels.supported(q, v)):
            return False
        n = q.shape[1]
        while not self._exact_causal(n):
            if n % 2:
                return False
            n //= 2
        return True

    def _flash(self, q, k, v, scale, causal):
        """(BH, Nq, D) x (BH, Nk, D): the Triton core's forward, no autograd -> o, lse."""
        o, lse = _flash._forward(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), causal, scale,
                                 _flash._DEFAULTS)  # fmt: skip
        return o.squeeze(2), lse.squeeze(1)

    @staticmethod
    def _flash_grads(do, q, k, v, lse, delta, scale, causal):
        """The Triton core's gradients for (BH, N, D) pieces, given the rows' LSE and Delta."""
        lse, delta = lse.contiguous().unsqueeze(1), delta.contiguous().unsqueeze(1)
        g = _flash._backward(do.unsqueeze(2), None, q.unsqueeze(2), k.unsqueeze(2),
                             v.unsqueeze(2), None, lse, causal, scale, _flash._DEFAULTS,
                             delta=delta)  # fmt: skip
        return [x.squeeze(2) for x in g]

    def _fused_forward(self, q, k, v, scale, keep: bool):
        """The causal recursion without autograd (same draws, in the same order, as
        :meth:`causal`'s): (o, lse, record), the record (with ``keep``) holding what
        :meth:`_fused_backward` needs, level by level: each piece's inputs and index lists,
        none of the pieces' outputs. Each level's output is its halves' output buffer, the
        second half's rows merged in place with the non-causal part by the gathered kernel
        itself: no merge pass, no new buffer. The deepest level is exact causal attention in
        one flash call (:meth:`_exact_causal`)."""
        bh, n, _ = q.shape
        if self._exact_causal(n):
            o, lse = self._flash(q, k, v, scale, True)
            return o, lse, ({"qkv": (q, k, v)} if keep else None)
        *halves, q2, k1, v1 = _split_level(q, k, v)
        o, lse, child = self._fused_forward(*halves, scale, keep)
        # the halves' outputs become this level's: the second half's rows merge in place
        o, lse = o.reshape(bh, n, -1), lse.reshape(bh, n)
        h = n // 2  # > min_seq_len (else the level is exact): the gathered kernel
        plan = self._kernel_plan(*self._layout(q2, k1))
        hyper_kernels._forward(q2, k1, v1, *plan, scale, into=(o[:, h:], lse[:, h:]))
        rec = {"child": child, "qkv": (q2, k1, v1), "plan": plan} if keep else None
        return o, lse, rec

    def _fused_backward(self, rec, do, lse, delta, scale):
        """Gradients (dq, dk, dv) of :meth:`_fused_forward` at the level of ``rec``.

        Each query's output is one softmax over the union of the keys of every piece it
        attends to (the leaves' causal keys, each level's block and sampled keys with their
        log-weight): the LSE merges are exact. So every piece's gradient needs only the rows'
        final LSE and Delta = rowsum(dO * O) - dLSE, computed once for the whole recursion:
        ``do``, ``lse``, ``delta`` are this level's rows of the top level's (views; no merge
        backward, no per-level output gradients). The halves' gradients come back as one
        buffer per input; this level's non-causal gradients are added into its views in place
        (in the kernels for the gathered part). The record is emptied as it is walked."""
        if "child" not in rec:
            q, k, v = rec.pop("qkv")
            return self._flash_grads(do, q, k, v, lse, delta, scale, True)
        bh, n = lse.shape
        h = n // 2
        half = lambda x: x.reshape(bh * 2, h, *x.shape[2:])  # noqa: E731
        grads = self._fused_backward(rec.pop("child"), half(do), half(lse), half(delta), scale)
        dq, dk, dvv = (g.reshape(bh, n, g.shape[-1]) for g in grads)
        del grads
        q2, k1, v1 = rec.pop("qkv")
        out = (dq[:, h:], dk[:, :h], dvv[:, :h])
        hyper_kernels._backward(do[:, h:], None, q2, k1, v1, None, lse[:, h:], *rec.pop("plan"),
                                scale, out=out, delta=delta[:, h:])  # fmt: skip
        return dq, dk, dvv

    # ------------------------------------------------------------------ the contract
    def __call__(self, q, k, v, *, causal=False, scale=None, bias=None, return_lse=False):
        check_inputs(q, k, v, bias)
        if bias is not None:
            raise ValueError("'hyper' does not support an attention bias")
        if q.dim() != 4:
            raise ValueError(f"'hyper' takes sequences (B, N, H, D); got q{tuple(q.shape)}")
        b, nq, h, d = q.shape
        hkv = k.shape[2]
        scale = d**-0.5 if scale is None else scale
        rep = h // hkv  # GQA: every q head uses its group's k/v
        kx, vx = (x.repeat_interleave(rep, dim=2) if rep > 1 else x for x in (k, v))
        flat = [x.permute(0, 2, 1, 3).reshape(b * h, x.shape[1], x.shape[-1]) for x in (q, kx, vx)]
        o, lse = _opaque(self.causal if causal else self.noncausal, *flat, scale)
        o = o.reshape(b, h, nq, -1).permute(0, 2, 1, 3).to(q.dtype)
        return (o, lse.reshape(b, h, nq).float()) if return_lse else o


@torch.compiler.disable
def _opaque(fn, q, k, v, scale):
    """``fn(q, k, v, scale)`` run eagerly under ``torch.compile``: the layout's sizes depend on
    the hashed data (the number of query tiles is read back from the GPU) and the draws come
    from the backend's own ``torch.Generator``, which Dynamo cannot trace. A compiled model
    breaks its graph around each HyperAttention call instead and computes the same thing."""
    return fn(q, k, v, scale)


class _CausalHyper(torch.autograd.Function):
    """The fused causal recursion (:meth:`_Hyper._fused_forward`) as one autograd step:
    (q, k, v) (BH, N, D) -> (o, lse), both differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, attn, scale):
        o, lse, rec = attn._fused_forward(q, k, v, scale, keep=True)
        ctx.attn, ctx.scale, ctx.rec = attn, scale, rec
        ctx.save_for_backward(q, k, v, o, lse)  # (q, k, v: in-place changes are caught)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        _, _, _, o, lse = ctx.saved_tensors
        if do is None and dlse is None:
            return (None,) * 5
        do = torch.zeros_like(o) if do is None else do.contiguous()
        rec, ctx.rec = ctx.rec, None
        if rec is None:
            raise RuntimeError("hyper: the causal recursion's backward ran twice; its saved "
                               "tensors were freed (retain_graph is not supported)")  # fmt: skip
        delta = hyper_kernels.row_delta(o, do, dlse)
        grads = ctx.attn._fused_backward(rec, do, lse, delta, ctx.scale)
        return (*grads, None, None)


@register("hyper", defaults=_DEFAULTS, capabilities=Capabilities(bias=False))
def _build_hyper(lsh_bits, block_size, sample_size, min_seq_len, inner, seed):
    """HyperAttention: sortLSH diagonal blocks + uniform column samples, merged by LSE."""
    checks = (("lsh_bits", lsh_bits, 0), ("block_size", block_size, 1),
              ("sample_size", sample_size, 1), ("min_seq_len", min_seq_len, 0))  # fmt: skip
    for name, value, low in checks:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"hyper option {name}={value!r} must be an integer >= {low}")
    if lsh_bits > 30:
        raise ValueError(f"hyper option lsh_bits={lsh_bits} must be at most 30")
    if inner == "hyper":
        raise ValueError("hyper option inner='hyper': the inner backend must be exact")
    return _Hyper(lsh_bits, block_size, sample_size, min_seq_len, inner, int(seed))
