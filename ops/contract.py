"""Shared input checks and layout helpers for the attention contract.

Layout (heads last, the projection's natural view)::

    q: (B, *tokens_q, H, D)    k: (B, *tokens_k, Hkv, D)    v: (B, *tokens_k, Hkv, Dv)
    out: (B, *tokens_q, H, Dv) in q.dtype
    lse: (B, H, Nq) float32 (float64 for float64 inputs), natural log, Nq = prod(tokens_q)

``causal`` aligns bottom-right: query i may see key j iff j <= i + (Nk - Nq).  A query row that
sees no key at all (possible only when Nq > Nk) returns zeros and LSE = -inf.
"""

from __future__ import annotations

import math

import torch

from . import launch as _launch


def check_inputs(q, k, v, bias=None) -> tuple[int, int]:
    """Validate shapes; return (Nq, Nk). Raises ValueError naming the offending tensor."""
    if q.dim() < 4 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(
            "attention expects q (B, *tokens, H, D), k (B, *tokens, Hkv, D), v (B, *tokens, Hkv,"
            f" Dv) with the same number of dims (>= 4); got q{tuple(q.shape)},"
            f" k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k{tuple(k.shape)} and v{tuple(v.shape)} must agree except the last dim")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    h, hkv = q.shape[-2], k.shape[-2]
    if h % hkv:
        raise ValueError(
            f"q has {h} heads, k/v have {hkv}: the number of q heads must be a multiple of "
            "the number of k/v heads (GQA/MQA)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    nq = math.prod(q.shape[1:-2])
    nk = math.prod(k.shape[1:-2])
    if bias is not None:
        try:
            torch.broadcast_shapes(bias.shape, (q.shape[0], h, nq, nk))
        except RuntimeError:
            raise ValueError(
                f"bias{tuple(bias.shape)} does not broadcast to (B, H, Nq, Nk) = "
                f"{(q.shape[0], h, nq, nk)}"
            ) from None
    return nq, nk


def kernels_run_on(t: torch.Tensor) -> bool:
    """Whether our Triton kernels can take tensor ``t``: triton is importable and ``t`` is on a
    CUDA device, or any device under Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return _launch.triton is not None and (t.is_cuda or _launch._INTERPRET)


def check_kernel_support(name: str, q: torch.Tensor, head_dims, dtypes, hint: str = "") -> None:
    """The checks every Triton backend makes: head dim and dtype among those its kernels were
    built for, and a device they run on; ValueError naming the backend (and ``hint``)."""
    if q.shape[-1] not in head_dims:
        raise ValueError(f"'{name}' head dim must be one of {head_dims}; got {q.shape[-1]}")
    if q.dtype not in dtypes:
        raise ValueError(f"'{name}' supports dtypes {dtypes}; got {q.dtype}")
    if not kernels_run_on(q):
        raise ValueError(
            f"'{name}' needs triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU){hint}"
        )


def to_bhnd(x: torch.Tensor) -> torch.Tensor:
    """(B, *tokens, H, D) -> (B, H, N, D); a view when the tokens are contiguous."""
    b, h, d = x.shape[0], x.shape[-2], x.shape[-1]
    return x.reshape(b, -1, h, d).transpose(1, 2)


def from_bhnd(x: torch.Tensor, token_shape) -> torch.Tensor:
    """(B, H, N, D) -> (B, *tokens, H, D)."""
    b, h, _, d = x.shape
    return x.transpose(1, 2).reshape(b, *token_shape, h, d)


def causal_mask(nq: int, nk: int, device) -> torch.Tensor:
    """(Nq, Nk) bool, True where query i may see key j (bottom-right aligned)."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i + (nk - nq)
