"""Neighborhood attention semantics (NATTEN's) and its plain PyTorch reference.

Each query attends to a window of keys around it, per axis of a 1-D, 2-D or 3-D token layout.
Per axis of length L, with kernel K, stride S, dilation d, query i (NATTEN's rule):

    group g = i % d, position p = i // d, group length Lg = L // d + (g < L % d), radius r = K // 2
    non-causal: leader = min((p // S) * S + S // 2, Lg - 1)
                start  = clamp(leader - r, 0, Lg - K);      keys p' in [start, start + K)
    causal:     leader = min((p // S) * S + S - 1, Lg - 1)
                start  = max(leader - K + 1, 0);            keys p' in [start, min(p + 1, Lg))
    key j qualifies iff j % d == g and j // d is in that range.

So a non-causal query sees exactly K keys per axis (the window shifts at the borders), dilation
splits the axis into d interleaved groups, stride makes S consecutive queries share one window
(generalized NA), and a causal window ends at the query. A multi-axis window is the product of
the per-axis windows. The reference materialises an (N, N) mask: it defines correctness for the
fused kernels and is meant for small sizes only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .contract import check_inputs
from .reference import reference_attention
from .registry import Capabilities, register


def per_axis(value, ndim: int, name: str) -> tuple:
    """An int/bool for every axis, or a sequence of exactly ndim of them."""
    if isinstance(value, (bool, int)):
        return (value,) * ndim
    if isinstance(value, Sequence) and len(value) == ndim:
        return tuple(value)
    raise ValueError(f"{name}={value!r}: give one value or {ndim} (one per token axis)")


def check_window(token_shape, kernel_size, dilation, stride, is_causal):
    """Validate NA options for a token layout; return per-axis tuples (K, d, S, causal)."""
    ndim = len(token_shape)
    if ndim not in (1, 2, 3):
        raise ValueError(
            f"neighborhood attention takes 1-D, 2-D or 3-D token layouts, got {ndim}-D"
        )
    ks = per_axis(kernel_size, ndim, "kernel_size")
    ds = per_axis(dilation, ndim, "dilation")
    ss = per_axis(stride, ndim, "stride")
    cs = per_axis(is_causal, ndim, "is_causal")
    for ax, (L, k, d, s) in enumerate(zip(token_shape, ks, ds, ss)):
        if not (isinstance(k, int) and k >= 2):
            raise ValueError(
                f"kernel_size must be an integer >= 2 on every axis, got {k} on axis {ax}"
            )
        if not (isinstance(d, int) and d >= 1):
            raise ValueError(f"dilation must be an integer >= 1, got {d} on axis {ax}")
        if not (isinstance(s, int) and 1 <= s <= k):
            raise ValueError(f"stride must be in [1, kernel_size={k}], got {s} on axis {ax}")
        if k * d > L:
            raise ValueError(
                f"kernel_size * dilation = {k} * {d} = {k * d} is larger than axis {ax} of "
                f"length {L}: every query must find kernel_size keys in its dilation group"
            )
    return ks, ds, ss, tuple(bool(c) for c in cs)


def axis_window(L: int, K: int, S: int, d: int, causal: bool, device=None):
    """Per query of one axis: (group, start, end) in group coordinates, each (L,) int64."""
    i = torch.arange(L, device=device)
    g, p = i % d, i // d
    lg = L // d + (g < L % d).long()
    if causal:
        leader = torch.minimum((p // S) * S + S - 1, lg - 1)
        start = (leader - K + 1).clamp(min=0)
        end = torch.minimum(p + 1, lg)
    else:
        leader = torch.minimum((p // S) * S + S // 2, lg - 1)
        start = torch.minimum((leader - K // 2).clamp(min=0), lg - K)
        end = start + K
    return g, start, end


def axis_mask(L, K, S, d, causal, device=None) -> torch.Tensor:
    """(L, L) bool: query i may see key j along this axis."""
    g, start, end = axis_window(L, K, S, d, causal, device)
    j = torch.arange(L, device=device)
    pj = j // d
    return ((j % d)[None] == g[:, None]) & (pj[None] >= start[:, None]) & (pj[None] < end[:, None])


def neighborhood_mask(token_shape, kernel_size, dilation=1, stride=1, is_causal=False, device=None):
    """(N, N) bool over row-major flattened tokens: the product of the per-axis windows."""
    ks, ds, ss, cs = check_window(token_shape, kernel_size, dilation, stride, is_causal)
    masks = [axis_mask(L, k, s, d, c, device) for L, k, d, s, c in zip(token_shape, ks, ds, ss, cs)]
    mask = masks[0]
    for m in masks[1:]:  # (A, A') x (B, B') -> (A*B, A'*B')
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(
            mask.shape[0] * m.shape[0], mask.shape[1] * m.shape[1]
        )
    return mask


def neighborhood_reference(
    q,
    k,
    v,
    *,
    kernel_size,
    dilation=1,
    stride=1,
    is_causal=False,
    causal=False,
    scale=None,
    bias=None,
    return_lse=False,
):
    """Reference NA in fp32 (fp64 for fp64): q, k, v (B, *tokens, H|Hkv, D) with equal tokens.

    ``causal=True`` (the contract's per-call flag, as GPT-2 passes it) makes every axis causal.
    """
    if q.shape[1:-2] != k.shape[1:-2]:
        raise ValueError(
            f"neighborhood attention needs the same token layout for q and k/v: "
            f"q tokens {tuple(q.shape[1:-2])}, k tokens {tuple(k.shape[1:-2])}"
        )
    check_inputs(q, k, v, bias)
    token_shape = tuple(q.shape[1:-2])
    ndim = len(token_shape)
    causal_axes = tuple(c or causal for c in per_axis(is_causal, ndim, "is_causal"))
    mask = neighborhood_mask(token_shape, kernel_size, dilation, stride, causal_axes, q.device)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    na_bias = torch.zeros(mask.shape, dtype=cdt, device=q.device).masked_fill(~mask, -math.inf)
    if bias is not None:
        na_bias = na_bias + bias.to(cdt)
    return reference_attention(q, k, v, scale=scale, bias=na_bias, return_lse=return_lse)


@register(
    "neighborhood_reference",
    defaults={"kernel_size": 7, "dilation": 1, "stride": 1, "is_causal": False},
    capabilities=Capabilities(token_ndims=(1, 2, 3)),
)
def _build_neighborhood_reference(kernel_size, dilation, stride, is_causal):
    """NATTEN-semantics neighborhood attention, materialised (N, N) mask: small sizes only."""
    for name, value in (("kernel_size", kernel_size), ("dilation", dilation), ("stride", stride)):
        vals = [value] if isinstance(value, int) else list(value)
        if not vals or not all(isinstance(x, int) and x >= 1 for x in vals):
            raise ValueError(f"neighborhood_reference: {name}={value!r} must be positive integers")

    def attention(q, k, v, *, causal=False, scale=None, bias=None, return_lse=False):
        return neighborhood_reference(
            q,
            k,
            v,
            kernel_size=kernel_size,
            dilation=dilation,
            stride=stride,
            is_causal=is_causal,
            causal=causal,
            scale=scale,
            bias=bias,
            return_lse=return_lse,
        )

    return attention
