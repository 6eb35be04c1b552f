"""The polynomial method for 2-simplicial attention (ops/simplicial_approx.py, issue 7 point 2)."""

from __future__ import annotations

import math

import pytest
import torch

import ops
from ops.simplicial_approx import simplicial_polynomial, tensor_power_features


def inputs(n=24, h=2, hkv=1, d=4, bound=1.0, seed=0):
    """float64 q, k1, k2, v1, v2 scaled so that max |<q_i, k1_j * k2_k>| / sqrt(d) = bound."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, h, d, generator=g, dtype=torch.float64)
    k1, k2, v1, v2 = (torch.randn(1, n, hkv, d, generator=g, dtype=torch.float64) for _ in range(4))
    rep = h // hkv
    x = torch.einsum("bihd,bjhd,bkhd->bhijk", q, k1.repeat_interleave(rep, 2),
                     k2.repeat_interleave(rep, 2)) / math.sqrt(d)  # fmt: skip
    return q * (bound / x.abs().max()), k1, k2, v1, v2


def rel_err(o, r):
    return float((o - r).norm() / r.norm())


def test_features_give_the_taylor_polynomial_of_the_trilinear_logit():
    g = torch.Generator().manual_seed(1)
    q, k1, k2 = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    s, deg = 0.7, 4
    coeffs = [s**t / math.factorial(t) for t in range(deg + 1)]
    got = (tensor_power_features(q, deg, coeffs) * tensor_power_features(k1, deg)
           * tensor_power_features(k2, deg)).sum(-1)  # fmt: skip
    x = s * (q * k1 * k2).sum(-1)
    want = sum(x**t / math.factorial(t) for t in range(deg + 1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_high_degree_on_small_entries_is_exact_attention(causal):
    q, k1, k2, v1, v2 = inputs(n=20, h=4, hkv=2, bound=0.3)
    o = simplicial_polynomial(q, k1, k2, v1, v2, degree=8, causal=causal, chunk=7)
    r = ops.simplicial_reference(q, k1, k2, v1, v2, causal=causal)
    torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_error_shrinks_as_the_degree_grows_for_bounded_entries(causal):
    """Entries bounded by 1: each extra degree cuts the error (truncation ~ 1 / (g+1)!)."""
    q, k1, k2, v1, v2 = inputs(n=24, bound=1.0, seed=2)
    r = ops.simplicial_reference(q, k1, k2, v1, v2, causal=causal)
    errs = [rel_err(simplicial_polynomial(q, k1, k2, v1, v2, degree=g, causal=causal), r)
            for g in range(1, 6)]  # fmt: skip
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3, errs


def test_large_entries_break_a_low_degree():
    """Entries of size 8 (far outside the polynomial's range): degree 2 is far off."""
    q, k1, k2, v1, v2 = inputs(n=24, bound=8.0, seed=3)
    r = ops.simplicial_reference(q, k1, k2, v1, v2)
    assert rel_err(simplicial_polynomial(q, k1, k2, v1, v2, degree=2), r) > 0.1


def test_bad_inputs():
    q, k1, k2, v1, v2 = inputs(n=8)
    with pytest.raises(ValueError, match="degree=-1"):
        simplicial_polynomial(q, k1, k2, v1, v2, degree=-1)
    with pytest.raises(ValueError, match="one shape"):
        simplicial_polynomial(q, k1, k2[:, :4], v1, v2)
    with pytest.raises(ValueError, match="features"):
        big = torch.zeros(1, 4, 1, 64)
        simplicial_polynomial(big, big, big, big, big, degree=4)
