"""HyperAttention (Han et al., 2023): near-linear approximate attention, ``ops.build("hyper")``.

Non-causal, for queries and keys of equal length N > ``min_seq_len`` (per batch x head):

1. **sortLSH.** q and k are hashed with ``lsh_bits`` random hyperplanes (angular LSH; the code
   is read as a Gray code, so that buckets adjacent in the order differ in one hyperplane) and
   sorted by bucket. Sorted query block i (``block_size`` rows) attends exactly to sorted key
   block i: the large entries of the attention matrix fall into these diagonal blocks.
2. **Sampling.** Each query block also attends to ``sample_size`` key columns drawn uniformly,
   with replacement, from the keys *outside* its own block (no double counting); the sampled
   part estimates the rest of the row sum, so its LSE is raised by log(outside / sample_size).
   Where ``sample_size`` covers every outside key, all of them are used once, weight 1: the
   result is then exact attention (tested).
3. **Merge** through the log-sum-exps: lse = logaddexp(lse_block, lse_sampled), o = the two
   outputs weighted by exp(lse_part - lse).

Causal (the paper's recursion): split the sequence in halves; the first half and the second
half attend causally to themselves (recursively), the second half attends non-causally (step
1-3) to the first; the parts merge through their LSEs. Lengths at or below ``min_seq_len`` (and
cross-attention with unequal lengths) use exact attention.

Every exact piece runs on an inner backend (``inner``, default ``flash``: the Triton core, whose
LSE is differentiable) through the ops contract with ``return_lse=True``, batched over blocks,
so nothing N x N is ever formed. The backward is the true gradient of this forward: autograd
flows through the gathers, the inner backend and the LSE merge (the public implementation
detaches the LSE, which biases the gradient).

Randomness (hyperplanes, samples) comes from a ``torch.Generator`` seeded with ``seed`` and kept
by the backend: a fresh backend with the same seed replays the same draws; ``state()`` /
``set_state()`` save and restore the generators (for checkpoints).
"""

from __future__ import annotations

import math

import torch

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


def _gray_rank(code: torch.Tensor, bits: int) -> torch.Tensor:
    """Position of each Gray code in the Gray sequence: buckets one hyperplane apart are
    neighbours in the sort order."""
    rank = code.clone()
    shift = 1
    while shift < bits:
        rank ^= rank >> shift
        shift <<= 1
    return rank


def _lsh_order(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """x (BH, N, D), planes (D, bits) -> permutation (BH, N) sorting x by its bucket."""
    bits = planes.shape[1]
    if bits == 0:
        return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    signs = (x.float() @ planes) > 0  # (BH, N, bits)
    code = (signs.long() << torch.arange(bits, device=x.device)).sum(-1)
    return torch.argsort(_gray_rank(code, bits), dim=-1, stable=True)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (BH, N, D), idx (BH, M) -> (BH, M, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _merge(o1, lse1, o2, lse2):
    """Combine two partial attentions over disjoint key sets: o (.., M, Dv), lse (.., M)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype), lse


class _Hyper:
    """The bound algorithm: options, the inner backend and the generators."""

    def __init__(self, lsh_bits, block_size, sample_size, min_seq_len, inner, seed):
        self.bits, self.block, self.samples = lsh_bits, block_size, sample_size
        self.min_len, self.seed = min_seq_len, seed
        self.inner = build(inner)
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

    def _blocks(self, q, k, v, scale):
        """Sorted query block i against sorted key block i, batched; a shorter last block
        (N not a multiple of block_size) runs as one more call."""
        bh, n, d = q.shape
        b = min(self.block, n)
        nb, rest = divmod(n, b)
        full = nb * b
        qs, ks, vs = (x[:, :full].reshape(bh * nb, b, x.shape[-1]) for x in (q, k, v))
        o, lse = self._exact(qs, ks, vs, scale, False)
        o, lse = o.reshape(bh, full, -1), lse.reshape(bh, full)
        if rest:
            o2, lse2 = self._exact(q[:, full:], k[:, full:], v[:, full:], scale, False)
            o, lse = torch.cat([o, o2], 1), torch.cat([lse, lse2], 1)
        return o, lse

    # ------------------------------------------------------------------ the algorithm
    def noncausal(self, q, k, v, scale):
        """q (BH, N, D), k (BH, N, D), v (BH, N, Dv) -> o, lse (approximate)."""
        bh, n, d = q.shape
        if n <= self.min_len or k.shape[1] != n:
            return self._exact(q, k, v, scale, False)
        gen = self._gen(q.device)
        planes = torch.randn(d, self.bits, device=q.device, generator=gen)
        q_order, k_order = _lsh_order(q, planes), _lsh_order(k, planes)
        qs, ks, vs = _gather(q, q_order), _gather(k, k_order), _gather(v, k_order)
        o_blk, lse_blk = self._blocks(qs, ks, vs, scale)
        # sampled columns outside each query block, in sorted key order
        b = min(self.block, n)
        starts = torch.arange(0, n, b, device=q.device)  # block starts (the last may be short)
        sizes = (n - starts).clamp(max=b)
        outside = n - sizes  # keys outside each block
        nblk = starts.numel()
        if self.samples >= int(outside.max()):  # every outside key once: exact
            m = int(outside.max())
            cols = torch.arange(m, device=q.device).expand(bh, nblk, m)
            valid = cols < outside[None, :, None]
            weight = torch.ones(nblk, device=q.device)
        else:
            m = self.samples
            u = torch.rand(bh, nblk, m, device=q.device, generator=gen)
            cols = (u * outside[None, :, None]).long()
            valid = torch.ones_like(cols, dtype=torch.bool)
            weight = outside.float() / m
        # position among the outside keys -> sorted key index (skip the block itself)
        cols = torch.where(cols >= starts[None, :, None], cols + sizes[None, :, None], cols)
        cols = torch.where(valid, cols, 0)
        # per query block: its rows against its sampled keys, one batched exact call
        row_blk = torch.arange(n, device=q.device) // b  # (N,)
        if n % b:
            o_s, lse_s = self._sampled_ragged(qs, ks, vs, cols, valid, row_blk, scale)
        else:
            kk = _gather(ks, cols.reshape(bh, -1)).reshape(bh * nblk, m, d)
            vv = _gather(vs, cols.reshape(bh, -1)).reshape(bh * nblk, m, vs.shape[-1])
            o_s, lse_s = self._sampled(qs.reshape(bh * nblk, b, d), kk, vv, valid, scale)
            o_s, lse_s = o_s.reshape(bh, n, -1), lse_s.reshape(bh, n)
        lse_s = lse_s + torch.log(weight)[row_blk][None, :]
        o, lse = _merge(o_blk, lse_blk, o_s, lse_s)
        inv = torch.argsort(q_order, dim=-1)  # back to the original query order
        return _gather(o, inv), torch.gather(lse, 1, inv)

    def _sampled(self, q, k, v, valid, scale):
        """q (G, b, D) against its keys (G, m, D) on the inner backend. ``valid`` marks padding
        columns only in the all-columns (exact) mode with a short last block, where blocks have
        different numbers of outside keys: that small case masks them in PyTorch."""
        if bool(valid.all()):
            return self._exact(q, k, v, scale, False)
        g = q.shape[0]
        s = (q.float() @ k.float().transpose(1, 2)) * scale
        s = s.masked_fill(~valid.reshape(g, 1, -1), float("-inf"))
        lse = torch.logsumexp(s, -1)
        o = torch.softmax(s, -1) @ v.float()
        return o.to(q.dtype), lse

    def _sampled_ragged(self, qs, ks, vs, cols, valid, row_blk, scale):
        """Sampled part when N is not a multiple of the block: block by block."""
        outs, lses = [], []
        b = min(self.block, qs.shape[1])
        for j in range(cols.shape[1]):
            rows = slice(j * b, min((j + 1) * b, qs.shape[1]))
            kk, vv = _gather(ks, cols[:, j]), _gather(vs, cols[:, j])
            o, lse = self._sampled(qs[:, rows], kk, vv, valid[:, j], scale)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, 1), torch.cat(lses, 1)

    def causal(self, q, k, v, scale):
        """Causal HyperAttention by the recursion on halves (equal lengths)."""
        n = q.shape[1]
        if n <= self.min_len or k.shape[1] != n:
            return self._exact(q, k, v, scale, True)
        h = n // 2
        o1, lse1 = self.causal(q[:, :h], k[:, :h], v[:, :h], scale)
        o2, lse2 = self.causal(q[:, h:], k[:, h:], v[:, h:], scale)
        o3, lse3 = self.noncausal(q[:, h:], k[:, :h], v[:, :h], scale)
        o2, lse2 = _merge(o2, lse2, o3, lse3)
        return torch.cat([o1, o2], 1), torch.cat([lse1, lse2], 1)

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
        fn = self.causal if causal else self.noncausal
        o, lse = fn(*flat, scale)
        o = o.reshape(b, h, nq, -1).permute(0, 2, 1, 3).to(q.dtype)
        return (o, lse.reshape(b, h, nq).float()) if return_lse else o


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
