"""RandAugment's affine ops (Rotate, ShearX/Y, TranslateX/YRel) as one Triton launch.

``gpu_augment._affine`` warps the images that drew an affine op with torch operations: about
35 host calls a batch and, per image, a float32 gather of 16 taps at every pixel (0.8 GB at
224x224 for a third of a 256-image batch). :func:`affine_rows` computes the same thing in one
kernel that reads the 4x4 neighbourhood where it lies: PIL's ``Image.transform(AFFINE,
BICUBIC)`` with the fill colour outside, coordinates and the a = -1 cubic in float64 in the
same order of operations, floating-point contraction off, so that the results equal
``_affine``'s (the tests compare them bit for bit).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ops.launch import launch


@triton.jit
def _cubic64(v1, v2, v3, v4, d):
    """PIL's a = -1 cubic between v2 and v3 at offset d, as ``gpu_augment._cubic`` computes
    it: the coefficients in the taps' dtype, the polynomial in float64."""
    p2 = -v1 + v3
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    p2 = p2.to(tl.float64)
    p3 = p3.to(tl.float64)
    p4 = p4.to(tl.float64)
    return v2.to(tl.float64) + d * (p2 + d * (p3 + d * p4))


@triton.jit
def _row(src, row, x0, last, w, dx, mask):
    """The horizontal cubic of one source row (float32 taps) at the four columns around x0,
    clamped to [0, last]; ``w`` the row length."""
    c0 = tl.minimum(tl.maximum(x0 - 1.0, 0.0), last).to(tl.int32)
    c1 = tl.minimum(tl.maximum(x0, 0.0), last).to(tl.int32)
    c2 = tl.minimum(tl.maximum(x0 + 1.0, 0.0), last).to(tl.int32)
    c3 = tl.minimum(tl.maximum(x0 + 2.0, 0.0), last).to(tl.int32)
    base = src + row * w
    v0 = tl.load(base + c0, mask=mask, other=0.0)
    v1 = tl.load(base + c1, mask=mask, other=0.0)
    v2 = tl.load(base + c2, mask=mask, other=0.0)
    v3 = tl.load(base + c3, mask=mask, other=0.0)
    return _cubic64(v0, v1, v2, v3, dx)


@triton.jit
def _affine_kernel(
    x, rows, params, fill, out, H: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr
):
    i = tl.program_id(0)
    r = tl.load(rows + i).to(tl.int64)
    a = tl.load(params + i * 6 + 0)
    b = tl.load(params + i * 6 + 1)
    c0 = tl.load(params + i * 6 + 2)
    d = tl.load(params + i * 6 + 3)
    e = tl.load(params + i * 6 + 4)
    f = tl.load(params + i * 6 + 5)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = p < H * W
    yo = (p // W).to(tl.float64) + 0.5
    xo = (p % W).to(tl.float64) + 0.5
    xin = a * xo + b * yo + c0
    yin = d * xo + e * yo + f
    inside = (xin >= 0.0) & (xin < W) & (yin >= 0.0) & (yin < H)
    xs = xin - 0.5
    ys = yin - 0.5
    fx = tl.floor(xs)
    fy = tl.floor(ys)
    dx = xs - fx
    dy = ys - fy
    hf = H * 1.0
    wf = W * 1.0
    y0 = tl.minimum(tl.maximum(fy - 1.0, 0.0), hf - 1.0).to(tl.int32)
    y1 = tl.minimum(tl.maximum(fy, 0.0), hf - 1.0).to(tl.int32)
    y2 = tl.minimum(tl.maximum(fy + 1.0, 0.0), hf - 1.0).to(tl.int32)
    y3 = tl.minimum(tl.maximum(fy + 2.0, 0.0), hf - 1.0).to(tl.int32)
    for ch in tl.static_range(3):
        src = x + (r * 3 + ch) * (H * W)
        r0 = _row(src, y0, fx, wf - 1.0, W, dx, mask)
        r1 = _row(src, y1, fx, wf - 1.0, W, dx, mask)
        r2 = _row(src, y2, fx, wf - 1.0, W, dx, mask)
        r3 = _row(src, y3, fx, wf - 1.0, W, dx, mask)
        v = _cubic64(r0, r1, r2, r3, dy)
        v = tl.floor(tl.minimum(tl.maximum(v, 0.0), 255.0))  # clamp, then trunc (>= 0)
        v = tl.where(inside, v.to(tl.float32), tl.load(fill + ch))
        tl.store(out + (i * 3 + ch).to(tl.int64) * (H * W) + p, v, mask=mask)


def affine_rows(x: torch.Tensor, rows: torch.Tensor, params: torch.Tensor, fill: torch.Tensor,
                block: int = 256) -> torch.Tensor:  # fmt: skip
    """``_affine`` of the images ``x[rows]`` (float32 (B, 3, H, W), integer values) with the
    per-image matrices ``params`` (n, 6): returns float32 (n, 3, H, W); ``x`` is only read."""
    if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"affine_rows: x must be float32 (B, 3, H, W), got {x.dtype} "
                         f"{tuple(x.shape)}")  # fmt: skip
    n = rows.numel()
    if params.shape != (n, 6):
        raise ValueError(f"affine_rows: params must be ({n}, 6), got {tuple(params.shape)}")
    x = x.contiguous()
    _, _, h, w = x.shape
    out = torch.empty(n, 3, h, w, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    params = params.to(torch.float64).contiguous()
    fill = fill.to(device=x.device, dtype=torch.float32).contiguous()
    grid = (n, math.ceil(h * w / block))
    launch(_affine_kernel, grid, x, rows.contiguous(), params, fill, out, H=h, W=w, BLOCK=block,
           num_warps=4, enable_fp_fusion=False)  # fmt: skip
    return out
