"""Plain PyTorch reference attention: the definition of correctness for every backend.

Computes in float32 (float64 for float64 inputs), materialises the full score matrix, supports
any token layout, GQA, additive bias, bottom-right causal masking and returns LSE.
"""

from __future__ import annotations

import torch

from .contract import causal_mask, check_inputs, from_bhnd, to_bhnd
from .registry import register


def reference_attention(q, k, v, *, causal=False, scale=None, bias=None, return_lse=False):
    nq, nk = check_inputs(q, k, v, bias)
    out_dtype, token_shape = q.dtype, q.shape[1:-2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    h, hkv = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (to_bhnd(t).to(cdt) for t in (q, k, v))  # (B, H|Hkv, N, D)
    if hkv != h:
        kh = kh.repeat_interleave(h // hkv, dim=1)
        vh = vh.repeat_interleave(h // hkv, dim=1)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    if bias is not None:
        s = s + bias.to(cdt)
    if causal:
        s = s.masked_fill(~causal_mask(nq, nk, s.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Nq); -inf on rows that see no key
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])  # rows of -inf give exp(-inf) = 0
    out = from_bhnd(torch.matmul(p, vh), token_shape).to(out_dtype)
    return (out, lse) if return_lse else out


@register("reference", capabilities=None)
def _build_reference():
    """fp32 materialised-scores reference (any device, any shape; slow, O(N^2) memory)."""
    return reference_attention
