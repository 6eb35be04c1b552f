"""PyTorch ``scaled_dot_product_attention`` behind the attention contract.

Fast path (training): no bias, Nq == Nk or not causal -> flash / memory-efficient kernels on
GPU, with native GQA (``enable_gqa``) and no copies (heads-last tensors are transposed views).
Bias or bottom-right causal with Nq != Nk use an explicit mask. ``return_lse`` recomputes the
log-sum-exp from the scores (O(N^2) memory): meant for tests and merging, not the hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import causal_mask, check_inputs, from_bhnd, to_bhnd
from .registry import register

_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5


def _lse(qh, kh, scale, mask_add):
    cdt = torch.float64 if qh.dtype == torch.float64 else torch.float32
    s = torch.matmul(qh.to(cdt), kh.to(cdt).transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    if mask_add is not None:
        s = s + mask_add.to(cdt)
    return torch.logsumexp(s, dim=-1)


def sdpa_attention(q, k, v, *, causal=False, scale=None, bias=None, return_lse=False):
    nq, nk = check_inputs(q, k, v, bias)
    token_shape = q.shape[1:-2]
    h, hkv = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = to_bhnd(q), to_bhnd(k), to_bhnd(v)  # (B, H|Hkv, N, D) views
    gqa = hkv != h
    if gqa and (not _HAS_GQA or return_lse or bias is not None or (causal and nq != nk)):
        kh = kh.repeat_interleave(h // hkv, dim=1)
        vh = vh.repeat_interleave(h // hkv, dim=1)
        gqa = False
    kwargs = {"enable_gqa": True} if gqa else {}

    dead_rows = None  # query rows that see no key (causal with Nq > Nk)
    mask = None  # additive float mask (B|1, H|1, Nq, Nk)
    if bias is not None and not causal:  # the bias is the mask: one cast, no zero tensor
        mask = bias  # (the LSE below adds it in fp32)
        attn_mask = bias.to(q.dtype).expand(torch.broadcast_shapes(bias.shape, (nq, nk)))
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=scale, **kwargs)
    elif bias is not None or (causal and nq != nk):
        mdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        mask = torch.zeros((), dtype=mdt, device=q.device)
        if bias is not None:
            mask = mask + bias.to(mdt)
        if causal:
            allowed = causal_mask(nq, nk, q.device)
            dead_rows = ~allowed.any(-1)  # (Nq,)
            allowed = allowed | dead_rows[:, None]  # keep dead rows finite; zeroed below
            mask = mask.masked_fill(~allowed, float("-inf"))
        mask = mask.expand(torch.broadcast_shapes(mask.shape, (nq, nk)))
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask.to(q.dtype), scale=scale, **kwargs
        )
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, **kwargs)
    if dead_rows is not None and bool(dead_rows.any()):
        out = out.masked_fill(dead_rows[:, None], 0.0)
    out = from_bhnd(out, token_shape)
    if not return_lse:
        return out
    if causal and mask is None:  # Nq == Nk: build the causal mask for the LSE
        mask = torch.zeros(nq, nk, device=q.device).masked_fill(
            ~causal_mask(nq, nk, q.device), float("-inf")
        )
    lse = _lse(qh, kh, scale, mask)
    if dead_rows is not None:
        lse = lse.masked_fill(dead_rows, float("-inf"))
    return out, lse


@register("sdpa")
def _build_sdpa():
    """PyTorch scaled_dot_product_attention (flash / memory-efficient / math)."""
    return sdpa_attention
