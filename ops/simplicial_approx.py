"""Approximate 2-simplicial attention in linear time: the polynomial method (Alman and Song).

exp(x) is replaced by its Taylor polynomial of degree g, p(x) = sum_{t<=g} x^t / t!. For the
trilinear logit x = s <q_i, k1_j * k2_k> = s sum_a q_a k1_a k2_a, the power x^t is
<q^(x)t, k1^(x)t * k2^(x)t> (t-fold tensor powers, d^t entries), so

    p(x_ijk) = <phi(q_i), psi(k1_j) * psi(k2_k)>,   phi = [s^t q^(x)t / t!]_t, psi = [k^(x)t]_t

with F = sum_{t<=g} d^t features. Then the numerator and the normaliser factor through the
keys once:

    sum_{j,k} p(x_ijk) (v1_j * v2_k) = phi(q_i) @ (A * B),  A = psi(K1)^T V1,  B = psi(K2)^T V2
    sum_{j,k} p(x_ijk)               = phi(q_i) @ (a * b),  a = psi(K1)^T 1,   b = psi(K2)^T 1

(F x D matrices, * elementwise): O(n F D) time instead of O(n^3 D). The causal form carries
prefix sums of A, B, a, b along the sequence (chunked, so memory is O(chunk F D)).

Where it holds: the truncation error of exp on [-beta, beta] is about beta^(g+1) / (g+1)!, so
for entries bounded by a small beta (the paper's regime: o(cbrt(log n))) a low degree is
accurate. Where it breaks: for larger entries the polynomial is far from exp and can be
negative (odd g), so the normaliser can cross zero and the output blows up;
``scripts/bench_simplicial_approx.py`` measures both against the exact form. F grows as d^g:
practical for head dims d <= 16 and g <= 4.

Layout as ``ops.simplicial``: q (B, N, H, D); k1, k2, v1, v2 (B, N, Hkv, D), H % Hkv == 0.
Plain PyTorch (any dtype, float64 for measurements), differentiable by autograd.
"""

from __future__ import annotations

import math

import torch


def tensor_power_features(x: torch.Tensor, degree: int, coeffs=None) -> torch.Tensor:
    """x (..., D) -> (..., F): [c_0, c_1 x, c_2 x(x)x, ..., c_g x^(x)g] flattened, F = sum d^t
    (c_t = 1 unless ``coeffs`` are given)."""
    parts, power = [], torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    for t in range(degree + 1):
        if t > 0:
            power = (power[..., :, None] * x[..., None, :]).flatten(-2)  # (..., d^t)
        parts.append(power if coeffs is None else power * coeffs[t])
    return torch.cat(parts, -1)


def _check(q, k1, k2, v1, v2, degree: int) -> None:
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 0:
        raise ValueError(f"simplicial_polynomial: degree={degree!r} must be an integer >= 0")
    if q.dim() != 4 or any(t.dim() != 4 for t in (k1, k2, v1, v2)):
        raise ValueError("simplicial_polynomial takes q, k1, k2, v1, v2 as (B, N, H|Hkv, D)")
    if len({t.shape for t in (k1, k2, v1, v2)}) != 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in (k1, k2, v1, v2))
        raise ValueError(f"simplicial_polynomial: k1, k2, v1, v2 need one shape; got {shapes}")
    b, n, h, d = q.shape
    if k1.shape[0] != b or k1.shape[-1] != d or h % k1.shape[2]:
        raise ValueError(
            f"simplicial_polynomial: q{tuple(q.shape)} and k1{tuple(k1.shape)} do not match "
            "(batch, head dim, or H not a multiple of Hkv)"
        )
    features = sum(d**t for t in range(degree + 1))
    if features > 2**20:
        raise ValueError(
            f"simplicial_polynomial: degree {degree} with head dim {d} needs {features} features; "
            "the polynomial method is for small head dims (d <= 16) and low degrees"
        )


def simplicial_polynomial(q, k1, k2, v1, v2, *, degree: int = 3, causal: bool = False,
                          scale: float | None = None, chunk: int = 64) -> torch.Tensor:  # fmt: skip
    """Degree-``degree`` polynomial approximation of 2-simplicial attention (full, or causal
    j, k <= i with one length N), in linear time. Returns o (B, N, H, D) in q's dtype."""
    _check(q, k1, k2, v1, v2, degree)
    b, n, h, d = q.shape
    hkv = k1.shape[2]
    s = d**-0.5 if scale is None else float(scale)
    coeffs = [s**t / math.factorial(t) for t in range(degree + 1)]
    rep = h // hkv
    # (B, Hkv, N, F) key features; (B, Hkv, rep, N, F) query features of each GQA group
    phi = tensor_power_features(q.transpose(1, 2).unflatten(1, (hkv, rep)), degree, coeffs)
    psi1 = tensor_power_features(k1.transpose(1, 2), degree)
    psi2 = tensor_power_features(k2.transpose(1, 2), degree)
    w1, w2 = v1.transpose(1, 2), v2.transpose(1, 2)  # (B, Hkv, N, D)
    if not causal:
        num = (psi1.transpose(-1, -2) @ w1) * (psi2.transpose(-1, -2) @ w2)  # (B, Hkv, F, D)
        den = psi1.sum(-2) * psi2.sum(-2)  # (B, Hkv, F)
        o = (phi @ num[:, :, None]) / (phi @ den[:, :, None, :, None])
    else:
        o = _causal(phi, psi1, psi2, w1, w2, chunk)
    return o.flatten(1, 2).transpose(1, 2).to(q.dtype)  # (B, N, H, D)


def _causal(phi, psi1, psi2, w1, w2, chunk: int):
    """Prefix sums over the sequence, one chunk of positions at a time: position i uses the
    keys j, k <= i. phi (B, Hkv, rep, N, F); psi (B, Hkv, N, F); w (B, Hkv, N, D)."""
    n = psi1.shape[2]
    f, d = psi1.shape[-1], w1.shape[-1]
    zeros = psi1.new_zeros(*psi1.shape[:2], 1, f, d)
    carry_a, carry_b = zeros, zeros  # (B, Hkv, 1, F, D): sums over earlier chunks
    carry_1, carry_2 = psi1.new_zeros(*psi1.shape[:2], 1, f), psi1.new_zeros(*psi1.shape[:2], 1, f)
    outs = []
    for i0 in range(0, n, chunk):
        sl = slice(i0, min(i0 + chunk, n))
        a = carry_a + torch.cumsum(psi1[:, :, sl, :, None] * w1[:, :, sl, None, :], 2)
        bb = carry_b + torch.cumsum(psi2[:, :, sl, :, None] * w2[:, :, sl, None, :], 2)
        s1 = carry_1 + torch.cumsum(psi1[:, :, sl], 2)  # (B, Hkv, c, F)
        s2 = carry_2 + torch.cumsum(psi2[:, :, sl], 2)
        p = phi[:, :, :, sl]  # (B, Hkv, rep, c, F)
        num = (p[..., None] * (a * bb)[:, :, None]).sum(-2)  # (B, Hkv, rep, c, D)
        den = (p * (s1 * s2)[:, :, None]).sum(-1, keepdim=True)
        outs.append(num / den)
        carry_a, carry_b, carry_1, carry_2 = (
            a[:, :, -1:],
            bb[:, :, -1:],
            s1[:, :, -1:],
            s2[:, :, -1:],
        )
    return torch.cat(outs, 3)
