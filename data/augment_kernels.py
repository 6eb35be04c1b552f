"""RandAugment's op families as Triton kernels, equal to ``gpu_augment``'s torch ops, and the
batch's normalisation with random erasing in one launch.

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

The kernels take and give uint8 images (the CUDA pipeline's) or float32 ones holding the same
integers. Every pass runs a program per chunk of an image, not per image: a family touches a
few dozen images of a batch, and a program an image left most of an H100's SMs idle (the LUT
and blend kernels took 460 and 295 us a 256-image batch that way, 50 and 31 us now; the
twenty-eighth session in docs/benchmarks.md). The per-image statistics (histograms, the sum of
L) are gathered first by atomic adds, in a launch of their own.

:func:`normalize_erase` is ``DevicePrep``'s end of the pipeline: uint8 to float32 normalised,
erased rectangles filled with N(0, 1) noise drawn where it lands, in one pass instead of about
ten torch kernels over the float32 batch.
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
    v0 = tl.load(base + c0, mask=mask, other=0).to(tl.float32)
    v1 = tl.load(base + c1, mask=mask, other=0).to(tl.float32)
    v2 = tl.load(base + c2, mask=mask, other=0).to(tl.float32)
    v3 = tl.load(base + c3, mask=mask, other=0).to(tl.float32)
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
        dst = out + (i * 3 + ch).to(tl.int64) * (H * W) + p
        tl.store(dst, v.to(out.dtype.element_ty), mask=mask)


_DTYPES = (torch.float32, torch.uint8)


def _check_images(x: torch.Tensor, who: str) -> None:
    if x.dtype not in _DTYPES or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(
            f"{who}: x must be float32 or uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}"
        )


def _output(x: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, 3, H, W) result of a family's launch for n of the images ``x``, in x's dtype."""
    return torch.empty(n, 3, *x.shape[2:], dtype=x.dtype, device=x.device)


def affine_rows(x: torch.Tensor, rows: torch.Tensor, params: torch.Tensor, fill: torch.Tensor,
                block: int = 256) -> torch.Tensor:  # fmt: skip
    """``_affine`` of the images ``x[rows]`` ((B, 3, H, W), float32 holding integers or uint8)
    with the per-image matrices ``params`` (n, 6): returns (n, 3, H, W) in x's dtype; ``x``
    is only read."""
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
            tap = src + (y + dy - 1) * W + (x + dx - 1)
            rows += tl.load(tap, mask=interior, other=0).to(tl.float32)
        box += rows
    smooth = tl.floor((box + 4.0 * centre + 6.5) / 13.0)
    return tl.where(interior, smooth, centre)


@triton.jit
def _pixels(img, HW: tl.constexpr, BLOCK: tl.constexpr):
    """This program's chunk of an image's pixels: indices, mask, the three channels (float32)."""
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = p < HW
    c0 = tl.load(img + p, mask=m, other=0).to(tl.float32)
    c1 = tl.load(img + HW + p, mask=m, other=0).to(tl.float32)
    c2 = tl.load(img + 2 * HW + p, mask=m, other=0).to(tl.float32)
    return p, m, c0, c1, c2


@triton.jit
def _luma_sum_kernel(x, rows, kinds, sums, HW: tl.constexpr, BLOCK: tl.constexpr):
    """Contrast's first pass: each chunk adds its (integer) sum of L to its image's total."""
    i = tl.program_id(0)
    if tl.load(kinds + i) == 1:
        img = x + tl.load(rows + i).to(tl.int64) * (3 * HW)
        p, m, c0, c1, c2 = _pixels(img, HW, BLOCK)
        lum = tl.where(m, _luma(c0, c1, c2), 0.0).to(tl.int32)
        tl.atomic_add(sums + i, tl.sum(lum, 0))


@triton.jit
def _blend_kernel(x, rows, kinds, alphas, sums, out, H: tl.constexpr, W: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    i = tl.program_id(0)
    r = tl.load(rows + i).to(tl.int64)
    kind = tl.load(kinds + i)  # 0 Color, 1 Contrast, 2 Brightness, 3 Sharpness
    alpha = tl.load(alphas + i).to(tl.float32)
    img = x + r * (3 * H * W)
    p, m, c0, c1, c2 = _pixels(img, H * W, BLOCK)
    if kind == 0:
        d0 = _luma(c0, c1, c2)
        d1 = d0
        d2 = d0
    elif kind == 3:
        y = p // W
        xx = p % W
        d0 = _smooth_at(img, y, xx, H, W, c0, m)
        d1 = _smooth_at(img + H * W, y, xx, H, W, c1, m)
        d2 = _smooth_at(img + 2 * H * W, y, xx, H, W, c2, m)
    else:  # Contrast: the rounded mean of L, from the exact sum; Brightness: black
        mean = tl.floor(tl.load(sums + i).to(tl.float64) / (H * W * 1.0) + 0.5).to(tl.float32)
        mean = tl.where(kind == 1, mean, 0.0)
        d0 = tl.zeros((BLOCK,), tl.float32) + mean
        d1 = d0
        d2 = d0
    o0 = tl.floor(tl.minimum(tl.maximum(d0 + alpha * (c0 - d0), 0.0), 255.0))
    o1 = tl.floor(tl.minimum(tl.maximum(d1 + alpha * (c1 - d1), 0.0), 255.0))
    o2 = tl.floor(tl.minimum(tl.maximum(d2 + alpha * (c2 - d2), 0.0), 255.0))
    dst = out + i.to(tl.int64) * (3 * H * W) + p
    tl.store(dst, o0.to(out.dtype.element_ty), mask=m)
    tl.store(dst + H * W, o1.to(out.dtype.element_ty), mask=m)
    tl.store(dst + 2 * H * W, o2.to(out.dtype.element_ty), mask=m)


def blend_rows(x: torch.Tensor, rows: torch.Tensor, kinds: torch.Tensor, alphas: torch.Tensor,
               block: int = 1024, contrast: bool = True) -> torch.Tensor:  # fmt: skip
    """``_blend_family`` of the images ``x[rows]`` ((B, 3, H, W), float32 holding integers or
    uint8): per image its kind (0 Color, 1 Contrast, 2 Brightness, 3 Sharpness) and factor;
    returns (n, 3, H, W) in x's dtype; ``x`` is only read. A program a chunk of ``block``
    pixels; Contrast's mean of L comes from a first launch that sums it (skipped when the
    caller knows no image is Contrast: ``contrast=False``)."""
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
    if h * w * 255 >= 2**31:
        raise ValueError(f"blend_rows: {h}x{w} images overflow the int32 sum of L")
    grid = (n, math.ceil(h * w / block))
    rows, kinds = rows.contiguous(), kinds.to(torch.int32).contiguous()
    sums = torch.zeros(n, dtype=torch.int32, device=x.device)
    if contrast:
        launch(_luma_sum_kernel, grid, x, rows, kinds, sums, HW=h * w, BLOCK=block, num_warps=4)
    launch(_blend_kernel, grid, x, rows, kinds, alphas.reshape(n).contiguous(), sums, out,
           H=h, W=w, BLOCK=block, num_warps=4, enable_fp_fusion=False)  # fmt: skip
    return out


@triton.jit
def _hist_kernel(x, rows, kinds, hists, HW: tl.constexpr, BLOCK: tl.constexpr):
    """AutoContrast's and Equalize's first pass: each chunk adds its counts of each channel's
    values to its image's histograms (n, 3, 256)."""
    i = tl.program_id(0)
    if tl.load(kinds + i) <= 1:
        img = x + tl.load(rows + i).to(tl.int64) * (3 * HW)
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = p < HW
        idx = tl.arange(0, 256)
        for ch in tl.static_range(3):
            v = tl.load(img + ch * HW + p, mask=m, other=0).to(tl.int32)
            tl.atomic_add(hists + (i * 3 + ch) * 256 + idx, tl.histogram(v, 256, mask=m))


@triton.jit
def _table_kernel(kinds, tables, hists, luts):
    """Each image's three 256-entry tables (float32): AutoContrast (kind 0) or Equalize (1)
    from the channel's histogram, as ``gpu_augment._auto_contrast_lut`` / ``_equalize_lut``
    compute them, else the fixed table ``tables[i]`` (float64)."""
    i = tl.program_id(0)
    kind = tl.load(kinds + i)
    idx = tl.arange(0, 256)
    for ch in tl.static_range(3):
        if kind <= 1:
            hist = tl.load(hists + (i * 3 + ch) * 256 + idx)
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
            lut = tl.load(tables + i * 256 + idx)
        tl.store(luts + (i * 3 + ch) * 256 + idx, lut.to(tl.float32))


@triton.jit
def _lut_kernel(x, rows, luts, out, HW: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    img = x + tl.load(rows + i).to(tl.int64) * (3 * HW)
    dst = out + i.to(tl.int64) * (3 * HW)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = p < HW
    for ch in tl.static_range(3):
        v = tl.load(img + ch * HW + p, mask=m, other=0).to(tl.int32)
        val = tl.load(luts + (i * 3 + ch) * 256 + v, mask=m)
        tl.store(dst + ch * HW + p, val.to(out.dtype.element_ty), mask=m)


def lut_rows(x: torch.Tensor, rows: torch.Tensor, kinds: torch.Tensor, tables: torch.Tensor,
             block: int = 1024, histograms: bool = True) -> torch.Tensor:  # fmt: skip
    """``_lut_family`` of the images ``x[rows]`` ((B, 3, H, W), values 0..255, float32 or
    uint8): per image its kind (0 AutoContrast, 1 Equalize, others: its row of ``tables``
    (n, 256), one table for the three channels); returns (n, 3, H, W) in x's dtype; ``x`` is
    only read. Three launches: the histograms (a program a chunk of ``block`` pixels; skipped
    when the caller knows no image is AutoContrast or Equalize: ``histograms=False``), the
    tables (a program an image), the lookups (a program a chunk)."""
    _check_images(x, "lut_rows")
    n = rows.numel()
    if kinds.numel() != n or tuple(tables.shape) != (n, 256):
        raise ValueError(f"lut_rows: {n} rows need {n} kinds and tables ({n}, 256), got "
                         f"{kinds.numel()} and {tuple(tables.shape)}")  # fmt: skip
    x, out = x.contiguous(), _output(x, n)
    _, _, h, w = x.shape
    if n == 0:
        return out
    grid = (n, math.ceil(h * w / block))
    rows, kinds = rows.contiguous(), kinds.to(torch.int32).contiguous()
    hists = torch.zeros(n, 3, 256, dtype=torch.int32, device=x.device)
    if histograms:
        launch(_hist_kernel, grid, x, rows, kinds, hists, HW=h * w, BLOCK=block, num_warps=4)
    luts = torch.empty(n, 3, 256, dtype=torch.float32, device=x.device)
    launch(_table_kernel, (n,), kinds, tables.to(torch.float64).contiguous(), hists, luts,
           num_warps=4, enable_fp_fusion=False)  # fmt: skip
    launch(_lut_kernel, grid, x, rows, luts, out, HW=h * w, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _normalize_kernel(x, out, mean, std, boxes, seed, N, H: tl.constexpr, W: tl.constexpr,
                      LAST: tl.constexpr, ERASE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # element index (int32: N < 2^31)
    m = e < N
    if LAST:  # channels_last: (B, H, W, 3) in memory
        c = e % 3
        pix = e // 3
        col = pix % W
        row = (pix // W) % H
        img = pix // (H * W)
    else:
        col = e % W
        row = (e // W) % H
        c = (e // (H * W)) % 3
        img = e // (3 * H * W)
    v = tl.load(x + e, mask=m, other=0).to(tl.float32)
    mu = tl.load(mean + c, mask=m, other=0.0)
    sd = tl.load(std + c, mask=m, other=1.0)
    y = tl.math.div_rn(v - mu, sd)  # IEEE division, as torch's
    if ERASE:
        top = tl.load(boxes + img * 4, mask=m, other=0)
        left = tl.load(boxes + img * 4 + 1, mask=m, other=0)
        bh = tl.load(boxes + img * 4 + 2, mask=m, other=0)
        bw = tl.load(boxes + img * 4 + 3, mask=m, other=0)
        inside = (row >= top) & (row < top + bh) & (col >= left) & (col < left + bw) & m
        if tl.max(inside.to(tl.int32), 0) > 0:  # noise only for blocks that take some
            y = tl.where(inside, tl.randn(tl.load(seed), e), y)
    tl.store(out + e, y, mask=m)


def normalize_erase(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                    boxes: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:  # fmt: skip
    """uint8 (B, 3, H, W) -> float32 ``(images - mean) / std`` (per channel, IEEE division:
    torch's values), in the images' memory format (contiguous or channels_last), with image
    i's rectangle ``boxes[i] = (top, left, height, width)`` (int32 (B, 4); height 0: none)
    filled with N(0, 1) noise (Philox, seeded by one draw of the device's torch generator)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize_erase: images must be uint8 (B, 3, H, W), got "
                         f"{images.dtype} {tuple(images.shape)}")  # fmt: skip
    last = not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if last else torch.contiguous_format
    images = images.contiguous(memory_format=fmt)
    out = torch.empty_like(images, dtype=torch.float32, memory_format=fmt)
    b, _, h, w = images.shape
    n = images.numel()
    if n >= 2**31:
        raise ValueError(f"normalize_erase: {n} elements, above int32 indexing")
    if n == 0:
        return out
    dev = images.device
    mean = mean.to(device=dev, dtype=torch.float32).contiguous()
    std = std.to(device=dev, dtype=torch.float32).contiguous()
    if boxes is None:
        boxes, seed, erase = mean, mean, False  # (not read)
    else:
        if tuple(boxes.shape) != (b, 4):
            raise ValueError(f"normalize_erase: boxes must be ({b}, 4), got {tuple(boxes.shape)}")
        boxes = boxes.to(device=dev, dtype=torch.int32).contiguous()
        seed = torch.randint(0, 2**31 - 1, (1,), device=dev, dtype=torch.int32)
        erase = True
    launch(_normalize_kernel, (triton.cdiv(n, block),), images, out, mean, std, boxes, seed, n,
           H=h, W=w, LAST=last, ERASE=erase, BLOCK=block, num_warps=4)  # fmt: skip
    return out
