"""RandAugment's op families as one Triton launch each, equal to ``gpu_augment``'s torch ops.

Affine (Rotate, ShearX/Y, TranslateX/YRel): :func:`affine_rows`. Blends (Color, Contrast,
Brightness, Sharpness): :func:`blend_rows`, PIL's ``ImageEnhance`` (8-bit ``Image.blend``
with L, the rounded mean of L, black or the SMOOTH-filtered image, float32, clipped,
truncated), about 30 host calls a batch in torch. Lookup tables (AutoContrast, Equalize from
each channel's histogram; Invert, Posterize, Solarize, SolarizeAdd from fixed tables):
:func:`lut_rows`, about 25.

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
def _affine_kernel(x, rows, mats, fill, out, H: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    r = tl.load(rows + i).to(tl.int64)
    a = tl.load(mats + i * 6 + 0)
    b = tl.load(mats + i * 6 + 1)
    c0 = tl.load(mats + i * 6 + 2)
    d = tl.load(mats + i * 6 + 3)
    e = tl.load(mats + i * 6 + 4)
    f = tl.load(mats + i * 6 + 5)
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


def _check_images(x: torch.Tensor, who: str) -> None:
    if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{who}: x must be float32 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")


def _output(x: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, 3, H, W) float32 result of a family's launch for n of the images ``x``."""
    return torch.empty(n, 3, *x.shape[2:], dtype=torch.float32, device=x.device)


def affine_rows(x: torch.Tensor, rows: torch.Tensor, params: torch.Tensor, fill: torch.Tensor,
                block: int = 256) -> torch.Tensor:  # fmt: skip
    """``_affine`` of the images ``x[rows]`` (float32 (B, 3, H, W), integer values) with the
    per-image matrices ``params`` (n, 6): returns float32 (n, 3, H, W); ``x`` is only read."""
    _check_images(x, "affine_rows")
    n = rows.numel()
    if params.shape != (n, 6):
        raise ValueError(f"affine_rows: params must be ({n}, 6), got {tuple(params.shape)}")
    x, out = x.contiguous(), _output(x, n)
    _, _, h, w = x.shape
    if n == 0:
        return out
    params = params.to(torch.float64).contiguous()
    fill = fill.to(device=x.device, dtype=torch.float32).contiguous()
    grid = (n, math.ceil(h * w / block))
    launch(_affine_kernel, grid, x, rows.contiguous(), params, fill, out, H=h, W=w, BLOCK=block,
           num_warps=4, enable_fp_fusion=False)  # fmt: skip
    return out


@triton.jit
def _luma(r, g, b):
    """PIL's RGB -> L, (19595 R + 38470 G + 7471 B + 2^15) >> 16, exact in float32."""
    return tl.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)


@triton.jit
def _smooth_at(src, y, x, H: tl.constexpr, W: tl.constexpr, centre, mask):
    """PIL's SMOOTH filter (3x3, weights 1 with 5 in the centre, /13, rounded) at (y, x) of
    one channel; the one-pixel border keeps ``centre``."""
    interior = (y > 0) & (y < H - 1) & (x > 0) & (x < W - 1) & mask
    box = tl.zeros(centre.shape, tl.float32)
    for dy in tl.static_range(3):
        rows = tl.zeros(centre.shape, tl.float32)
        for dx in tl.static_range(3):
            rows += tl.load(src + (y + dy - 1) * W + (x + dx - 1), mask=interior, other=0.0)
        box += rows
    smooth = tl.floor((box + 4.0 * centre + 6.5) / 13.0)
    return tl.where(interior, smooth, centre)


@triton.jit
def _blend_kernel(x, rows, kinds, alphas, out, H: tl.constexpr, W: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    i = tl.program_id(0)
    r = tl.load(rows + i).to(tl.int64)
    kind = tl.load(kinds + i)  # 0 Color, 1 Contrast, 2 Brightness, 3 Sharpness
    alpha = tl.load(alphas + i).to(tl.float32)
    img = x + r * (3 * H * W)
    dst = out + i.to(tl.int64) * (3 * H * W)
    mean = tl.full((), 0.0, tl.float32)
    if kind == 1:  # the rounded mean of L, from an exact (integer) sum
        total = tl.zeros((BLOCK,), tl.int32)
        for start in range(0, H * W, BLOCK):
            p = start + tl.arange(0, BLOCK)
            m = p < H * W
            lum = _luma(tl.load(img + p, mask=m, other=0.0),
                        tl.load(img + H * W + p, mask=m, other=0.0),
                        tl.load(img + 2 * H * W + p, mask=m, other=0.0))  # fmt: skip
            total += tl.where(m, lum, 0.0).to(tl.int32)
        mean = tl.floor(tl.sum(total, 0).to(tl.float64) / (H * W * 1.0) + 0.5).to(tl.float32)
    for start in range(0, H * W, BLOCK):
        p = start + tl.arange(0, BLOCK)
        m = p < H * W
        y = p // W
        xx = p % W
        c0 = tl.load(img + p, mask=m, other=0.0)
        c1 = tl.load(img + H * W + p, mask=m, other=0.0)
        c2 = tl.load(img + 2 * H * W + p, mask=m, other=0.0)
        if kind == 0:
            d0 = _luma(c0, c1, c2)
            d1 = d0
            d2 = d0
        elif kind == 3:
            d0 = _smooth_at(img, y, xx, H, W, c0, m)
            d1 = _smooth_at(img + H * W, y, xx, H, W, c1, m)
            d2 = _smooth_at(img + 2 * H * W, y, xx, H, W, c2, m)
        else:
            d0 = tl.zeros((BLOCK,), tl.float32) + mean  # Brightness: mean stays 0 (black)
            d1 = d0
            d2 = d0
        o0 = tl.floor(tl.minimum(tl.maximum(d0 + alpha * (c0 - d0), 0.0), 255.0))
        o1 = tl.floor(tl.minimum(tl.maximum(d1 + alpha * (c1 - d1), 0.0), 255.0))
        o2 = tl.floor(tl.minimum(tl.maximum(d2 + alpha * (c2 - d2), 0.0), 255.0))
        tl.store(dst + p, o0, mask=m)
        tl.store(dst + H * W + p, o1, mask=m)
        tl.store(dst + 2 * H * W + p, o2, mask=m)


def blend_rows(x: torch.Tensor, rows: torch.Tensor, kinds: torch.Tensor, alphas: torch.Tensor,
               block: int = 1024) -> torch.Tensor:  # fmt: skip
    """``_blend_family`` of the images ``x[rows]`` (float32 (B, 3, H, W), integer values):
    per image its kind (0 Color, 1 Contrast, 2 Brightness, 3 Sharpness) and factor; returns
    float32 (n, 3, H, W); ``x`` is only read. One program an image (a Contrast image sums its
    L first)."""
    _check_images(x, "blend_rows")
    n = rows.numel()
    if kinds.numel() != n or alphas.numel() != n:
        raise ValueError(
            f"blend_rows: {n} rows but {kinds.numel()} kinds, {alphas.numel()} factors"
        )
    x, out = x.contiguous(), _output(x, n)
    _, _, h, w = x.shape
    if n == 0:
        return out
    launch(_blend_kernel, (n,), x, rows.contiguous(), kinds.to(torch.int32).contiguous(),
           alphas.reshape(n).contiguous(), out, H=h, W=w, BLOCK=block, num_warps=4,
           enable_fp_fusion=False)  # fmt: skip
    return out


@triton.jit
def _channel_lut(src, kind, table, HW: tl.constexpr, BLOCK: tl.constexpr):
    """One channel's 256-entry table (float64): AutoContrast (kind 0) or Equalize (1) from
    the channel's histogram, as ``gpu_augment._auto_contrast_lut`` / ``_equalize_lut``
    compute them, else the fixed table at ``table``."""
    idx = tl.arange(0, 256)
    if kind <= 1:
        hist = tl.zeros((256,), tl.int32)
        for start in range(0, HW, BLOCK):
            p = start + tl.arange(0, BLOCK)
            m = p < HW
            v = tl.load(src + p, mask=m, other=0.0).to(tl.int32)
            hist += tl.histogram(v, 256, mask=m)
        nz = hist > 0
        lo = tl.min(tl.where(nz, idx, 256), 0)
        hi = tl.max(tl.where(nz, idx, -1), 0)
        ix = idx.to(tl.float64)
        if kind == 0:  # stretch [lo, hi] to [0, 255] (float64, truncated, clipped)
            span = tl.maximum(hi - lo, 1).to(tl.float64)
            scale = 255.0 / span
            offset = -lo.to(tl.float64) * scale
            lut = tl.floor(ix * scale + offset)  # = trunc where it matters: clipped at 0
            lut = tl.where(hi > lo, tl.minimum(tl.maximum(lut, 0.0), 255.0), ix)
        else:  # PIL's equalize (integer math)
            step = (tl.sum(hist, 0) - tl.sum(tl.where(idx == hi, hist, 0), 0)) // 255
            cum = tl.cumsum(hist, 0) - hist
            eq = (step // 2 + cum) // tl.maximum(step, 1)
            lut = tl.where(step > 0, tl.minimum(eq, 255), idx).to(tl.float64)
    else:
        lut = tl.load(table + idx)
    return lut


@triton.jit
def _lut_kernel(x, rows, kinds, tables, luts, out, H: tl.constexpr, W: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    i = tl.program_id(0)
    r = tl.load(rows + i).to(tl.int64)
    kind = tl.load(kinds + i)  # 0 AutoContrast, 1 Equalize, else the table tables[i]
    img = x + r * (3 * H * W)
    dst = out + i.to(tl.int64) * (3 * H * W)
    mine = luts + i * (3 * 256)
    idx = tl.arange(0, 256)
    for ch in tl.static_range(3):
        lut = _channel_lut(img + ch * H * W, kind, tables + i * 256, H * W, BLOCK)
        tl.store(mine + ch * 256 + idx, lut.to(tl.float32))
    tl.debug_barrier()  # the tables, written by all threads, read by all below
    for start in range(0, H * W, BLOCK):
        p = start + tl.arange(0, BLOCK)
        m = p < H * W
        for ch in tl.static_range(3):
            v = tl.load(img + ch * H * W + p, mask=m, other=0.0).to(tl.int32)
            tl.store(dst + ch * H * W + p, tl.load(mine + ch * 256 + v, mask=m), mask=m)


def lut_rows(x: torch.Tensor, rows: torch.Tensor, kinds: torch.Tensor, tables: torch.Tensor,
             block: int = 1024) -> torch.Tensor:  # fmt: skip
    """``_lut_family`` of the images ``x[rows]`` (float32 (B, 3, H, W), values 0..255): per
    image its kind (0 AutoContrast, 1 Equalize, others: its row of ``tables`` (n, 256), one
    table for the three channels); returns float32 (n, 3, H, W); ``x`` is only read."""
    _check_images(x, "lut_rows")
    n = rows.numel()
    if kinds.numel() != n or tuple(tables.shape) != (n, 256):
        raise ValueError(f"lut_rows: {n} rows need {n} kinds and tables ({n}, 256), got "
                         f"{kinds.numel()} and {tuple(tables.shape)}")  # fmt: skip
    x, out = x.contiguous(), _output(x, n)
    _, _, h, w = x.shape
    if n == 0:
        return out
    luts = torch.empty(n, 3, 256, dtype=torch.float32, device=x.device)
    launch(_lut_kernel, (n,), x, rows.contiguous(), kinds.to(torch.int32).contiguous(),
           tables.to(torch.float64).contiguous(), luts, out, H=h, W=w, BLOCK=block,
           num_warps=4, enable_fp_fusion=False)  # fmt: skip
    return out
