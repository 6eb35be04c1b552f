"""NATTEN's neighborhood window as a FlexAttention ``mask_mod``: the peer that
scripts/bench_attention.py measures our neighborhood kernels against.

Same rule as ops/neighborhood_ref.py (see its docstring), written with tensor ops only so that
FlexAttention can vmap it and build a block mask from it.
"""

from __future__ import annotations

import torch


def _axis_allowed(qa, ka, L, K, S, d, causal):
    """Whether key coordinate ka is in query coordinate qa's window along one axis."""
    g, p = qa % d, qa // d
    lg = L // d + (g < L % d).to(qa.dtype)
    if causal:
        leader = torch.minimum((p // S) * S + S - 1, lg - 1)
        start = torch.clamp(leader - K + 1, min=0)
        end = torch.minimum(p + 1, lg)
    else:
        leader = torch.minimum((p // S) * S + S // 2, lg - 1)
        start = torch.minimum(torch.clamp(leader - K // 2, min=0), lg - K)
        end = start + K
    pk = ka // d
    return (ka % d == g) & (pk >= start) & (pk < end)


def natten_mask_mod(token_shape, kernel_size, dilation, stride, is_causal):
    """mask_mod(b, h, q_idx, kv_idx) for row-major flattened tokens of ``token_shape``.

    Per-axis options are tuples of len(token_shape) (see ops.neighborhood_ref.check_window).
    """
    dims = list(token_shape)

    def coords(idx):
        out = []
        for L in reversed(dims):
            out.append(idx % L)
            idx = idx // L
        return out[::-1]

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = None
        for qa, ka, L, K, S, d, c in zip(
            coords(q_idx), coords(kv_idx), dims, kernel_size, stride, dilation, is_causal
        ):
            m = _axis_allowed(qa, ka, L, K, S, d, c)
            allowed = m if allowed is None else allowed & m
        return allowed

    return mask_mod
