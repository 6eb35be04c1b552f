"""One Triton launch for a batch of per-image crops resized with PIL's antialiased bicubic.

``data.decode=gpu`` decodes a batch into separately allocated images of different sizes, and
each gets its own crop box (train: timm's random-resized crop; eval: the resize-then-center-
crop of timm's eval transform). Resizing them one ``F.interpolate(antialias=True)`` call at a
time costs the host about 30 us an image (slice, float copy, interpolate, stack): at 256
images a batch that alone is a third of the pipeline's host time, which is what bounds it.
:func:`resize_batch` reads every image where it lies (a table of element offsets from the
first image), so the whole batch is one launch and nothing is copied or converted first.

The filter is the one ``F.interpolate(mode="bicubic", antialias=True)`` uses (Keys' cubic with
a = -0.5, PIL's): for an output index i the source window is centred at ``scale * (i + 0.5)``
with half-width ``2 * max(scale, 1)`` source pixels, clipped to the source, the weights
``cubic((j - centre + 0.5) / max(scale, 1))`` normalised to sum to one. Each output pixel sums
its rows' horizontal sums, as PyTorch's CUDA kernel does; results equal ``F.interpolate`` to
float rounding (the tests compare them). A horizontal flip is applied when writing.

Two passes, as the filter is separable: the first resamples each source row the window reads
to the output's columns (float32 scratch, unnormalised), the second sums those rows down each
column and divides by the weights' sums. The same products are summed in the same order as a
single pass over Ty x Tx taps a pixel would (on an H100 the results were bit for bit those of
the one-pass kernel this replaced), with Ty + Tx taps' work instead of their product, and each
tap's weight computed for a row or column of a tile rather than for every pixel (one pass took
900 us a 256-image batch at 224; the twenty-eighth session in docs/benchmarks.md).
``dtype=torch.uint8`` rounds and clips in the second pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from ops.launch import launch

# the columns of the per-image geometry table (constants inside the kernels too)
_OFF, _H, _W, _SY, _SX, _SH, _SW, _OH, _OW, _OY, _OX, _FLIP, _TY, _TX, _J0, _NJ, _ROWS = (
    tl.constexpr(k) for k in range(17))  # fmt: skip
_COLS = 20


@triton.jit
def _cubic(x):
    """Keys' cubic convolution kernel with a = -0.5 (PIL's bicubic), at |x|."""
    x = tl.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))


@triton.jit
def _span(i, n_out, n_src):
    """Source window (first index, length), its centre and inverse filter scale for output
    index ``i`` of a resize from ``n_src`` to ``n_out`` samples."""
    scale = n_src.to(tl.float32) / n_out.to(tl.float32)
    support = tl.where(scale >= 1.0, 2.0 * scale, 2.0)
    inv = tl.where(scale >= 1.0, 1.0 / scale, 1.0)
    centre = scale * (i.to(tl.float32) + 0.5)
    lo = tl.maximum((centre - support + 0.5).to(tl.int32), 0)
    hi = tl.minimum((centre + support + 0.5).to(tl.int32), n_src)
    return lo, hi - lo, centre, inv


@triton.jit
def _round_even(v):
    """``torch.round`` (half to even) of float32 ``v``, exactly."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _horizontal_kernel(base, geom, rows, S: tl.constexpr, COLS: tl.constexpr,
                       RH: tl.constexpr, CW: tl.constexpr):  # fmt: skip
    """Pass one: each stored source row of the box (``nj`` rows from box row ``j0``) resampled
    to the S output columns of the kept window, unnormalised: ``rows`` (3, nj, S) float32
    at the image's scratch offset."""
    img = tl.program_id(0)
    g = geom + img * COLS
    j0 = tl.load(g + _J0).to(tl.int32)
    nj = tl.load(g + _NJ).to(tl.int32)
    if tl.program_id(1) * RH < nj:
        off = tl.load(g + _OFF)  # element offset of this image from ``base``
        h = tl.load(g + _H).to(tl.int32)
        w = tl.load(g + _W).to(tl.int32)
        sy = tl.load(g + _SY).to(tl.int32)  # source box: top, left, height, width
        sx = tl.load(g + _SX).to(tl.int32)
        sw = tl.load(g + _SW).to(tl.int32)
        ow = tl.load(g + _OW).to(tl.int32)  # the box's width is resized to ow, of which
        ox = tl.load(g + _OX).to(tl.int32)  # the S columns from ox are kept
        taps_x = tl.load(g + _TX).to(tl.int32)
        j = tl.program_id(1) * RH + tl.arange(0, RH)[:, None]  # stored row
        x = tl.program_id(2) * CW + tl.arange(0, CW)[None, :]  # output column
        inside = (j < nj) & (x < S)
        x0, nx, cx, ix = _span(x + ox, ow, sw)
        src = base + off + (sy + j0 + j).to(tl.int64) * w + (sx + x0)
        plane = h.to(tl.int64) * w
        r0 = tl.zeros((RH, CW), tl.float32)
        r1 = tl.zeros((RH, CW), tl.float32)
        r2 = tl.zeros((RH, CW), tl.float32)
        for tx in range(0, taps_x):
            ok = inside & (tx < nx)
            wx = tl.where(tx < nx, _cubic(((tx + x0).to(tl.float32) - cx + 0.5) * ix), 0.0)
            r0 += wx * tl.load(src + tx, mask=ok, other=0).to(tl.float32)
            r1 += wx * tl.load(src + plane + tx, mask=ok, other=0).to(tl.float32)
            r2 += wx * tl.load(src + 2 * plane + tx, mask=ok, other=0).to(tl.float32)
        dst = rows + tl.load(g + _ROWS) + j * S + x
        tl.store(dst, r0, mask=inside)
        tl.store(dst + nj * S, r1, mask=inside)
        tl.store(dst + 2 * nj * S, r2, mask=inside)


@triton.jit
def _vertical_kernel(geom, rows, out, S: tl.constexpr, COLS: tl.constexpr, RV: tl.constexpr,
                     CW: tl.constexpr, TO_UINT8: tl.constexpr):  # fmt: skip
    """Pass two: each output pixel the weighted sum of its column's resampled rows, divided
    by the product of its vertical and horizontal weight sums; flipped, rounded to uint8."""
    img = tl.program_id(0)
    g = geom + img * COLS
    sh = tl.load(g + _SH).to(tl.int32)
    sw = tl.load(g + _SW).to(tl.int32)
    oh = tl.load(g + _OH).to(tl.int32)
    ow = tl.load(g + _OW).to(tl.int32)
    oy = tl.load(g + _OY).to(tl.int32)
    ox = tl.load(g + _OX).to(tl.int32)
    flip = tl.load(g + _FLIP).to(tl.int32)
    taps_y = tl.load(g + _TY).to(tl.int32)
    taps_x = tl.load(g + _TX).to(tl.int32)
    j0 = tl.load(g + _J0).to(tl.int32)
    nj = tl.load(g + _NJ).to(tl.int32)
    y = tl.program_id(1) * RV + tl.arange(0, RV)[:, None]
    x = tl.program_id(2) * CW + tl.arange(0, CW)[None, :]
    inside = (y < S) & (x < S)
    y0, ny, cy, iy = _span(y + oy, oh, sh)
    x0, nx, cx, ix = _span(x + ox, ow, sw)
    total_x = tl.zeros((1, CW), tl.float32)
    for tx in range(0, taps_x):
        total_x += tl.where(tx < nx, _cubic(((tx + x0).to(tl.float32) - cx + 0.5) * ix), 0.0)
    src = rows + tl.load(g + _ROWS) + (y0 - j0) * S + x
    acc0 = tl.zeros((RV, CW), tl.float32)
    acc1 = tl.zeros((RV, CW), tl.float32)
    acc2 = tl.zeros((RV, CW), tl.float32)
    total_y = tl.zeros((RV, 1), tl.float32)
    for ty in range(0, taps_y):
        wy = tl.where(ty < ny, _cubic(((ty + y0).to(tl.float32) - cy + 0.5) * iy), 0.0)
        total_y += wy
        ok = inside & (ty < ny)
        acc0 += wy * tl.load(src + ty * S, mask=ok, other=0.0)
        acc1 += wy * tl.load(src + (nj + ty) * S, mask=ok, other=0.0)
        acc2 += wy * tl.load(src + (2 * nj + ty) * S, mask=ok, other=0.0)
    norm = total_y * total_x
    norm = tl.where(norm != 0.0, norm, 1.0)
    xo = tl.where(flip != 0, S - 1 - x, x)
    dst = out + img.to(tl.int64) * (3 * S * S) + y * S + xo
    v0, v1, v2 = acc0 / norm, acc1 / norm, acc2 / norm
    if TO_UINT8:  # rounded, then clipped: what ``x.round_().clamp_(0, 255)`` gives
        v0 = tl.minimum(tl.maximum(_round_even(v0), 0.0), 255.0).to(tl.uint8)
        v1 = tl.minimum(tl.maximum(_round_even(v1), 0.0), 255.0).to(tl.uint8)
        v2 = tl.minimum(tl.maximum(_round_even(v2), 0.0), 255.0).to(tl.uint8)
    tl.store(dst, v0, mask=inside)
    tl.store(dst + S * S, v1, mask=inside)
    tl.store(dst + 2 * S * S, v2, mask=inside)


def _rows_needed(n_src: np.ndarray, n_out: np.ndarray, first: np.ndarray, size: int):
    """(first row, rows) of the source box that output rows ``first .. first + size - 1`` of
    a resize from ``n_src`` to ``n_out`` rows read, with a row to spare on each side (the
    kernel's float32 windows may round differently from float64)."""
    scale = n_src / n_out
    support = np.where(scale >= 1.0, 2.0 * scale, 2.0)
    lo = np.floor(scale * (first + 0.5) - support + 0.5).astype(np.int64) - 1
    hi = np.ceil(scale * (first + size - 0.5) + support + 0.5).astype(np.int64) + 1
    lo, hi = np.clip(lo, 0, n_src), np.clip(hi, 0, n_src)
    return lo, hi - lo


def _taps(n_src: np.ndarray, n_out: np.ndarray) -> np.ndarray:
    """The widest source window of a resize (PyTorch's ``interp_size`` for antialiasing)."""
    scale = n_src / n_out
    support = np.where(scale >= 1.0, 2.0 * scale, 2.0)
    return (np.ceil(support).astype(np.int64) * 2 + 1).astype(np.int64)


def image_sizes(images) -> np.ndarray:
    """int64 (n, 2): each image's (H, W); a ``PackedImages``'s from its ``hw``, without a
    tensor an image."""
    hw = getattr(images, "hw", None)
    if hw is None:
        hw = np.array([im.shape[-2:] for im in images], dtype=np.int64)
    return hw.reshape(-1, 2)


TILES = (8, 32, 8, 4)
"""resize_batch's launch shape: (rows of pass one, columns, rows of pass two, warps). The
fastest of sixteen shapes swept on an H100 (``scripts/bench_gpu_augment.py --resize-sweep``):
0.44 ms a batch of 256 train crops against 0.71 for (16, 64, 16, 4), the shape before."""


def resize_batch(images, boxes, resized, windows, flip, size: int,
                 dtype: torch.dtype = torch.float32, tiles: tuple = TILES):  # fmt: skip
    """(B, 3, size, size) of ``dtype`` (float32 or uint8) from uint8 (3, H, W) ``images`` (one
    device, any sizes).

    Image b's source box ``boxes[b] = (top, left, height, width)`` is resized to
    ``resized[b] = (rows, cols)`` with PIL's antialiased bicubic, and the ``size`` x ``size``
    window at ``windows[b] = (top, left)`` of that is kept, mirrored left-right where
    ``flip[b]``. Values are not rounded. Train crops: box = the crop, resized = (size, size),
    window = (0, 0); eval: box = the whole image, resized = the short-side resize, window =
    the center crop. The kernel reads the images through raw offsets: images allocated on
    another stream than the current one must be kept (or ``record_stream``-ed) until this
    stream has run it. ``images``: a list of tensors, or the decoder's ``PackedImages``
    (read through its addresses and sizes, without a tensor an image). ``dtype=torch.uint8``:
    the values rounded (half to even) and clipped to 0..255 in the kernel, as
    ``out.round_().clamp_(0, 255)`` would, in a quarter of the memory. ``tiles``: the
    launch shape (:data:`TILES`; powers of two), which changes the speed, not the values."""
    if dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"resize_batch: dtype must be float32 or uint8, got {dtype}")
    b = len(images)
    if b == 0:
        raise ValueError("resize_batch: no images")
    if hasattr(images, "ptrs"):  # nvjpeg_decode.PackedImages: uint8 (3, H, W) by construction
        device, ptrs, base = images.device, images.ptrs, images.tensors[0]
    else:
        device = images[0].device
        images = [im if im.is_contiguous() else im.contiguous() for im in images]
        for im in images:
            if (im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3
                    or im.device != device):  # fmt: skip
                raise ValueError(
                    f"resize_batch: images must be uint8 (3, H, W) on one device, got "
                    f"{tuple(im.shape)} {im.dtype} on {im.device}"
                )
        ptrs = np.array([im.data_ptr() for im in images], dtype=np.int64)
        base = images[0]
    hw = image_sizes(images)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(b, 4)
    resized = np.asarray(resized, dtype=np.int64).reshape(b, 2)
    windows = np.asarray(windows, dtype=np.int64).reshape(b, 2)
    if (
        (boxes[:, 2:] < 1).any()
        or (boxes[:, :2] < 0).any()
        or (boxes[:, :2] + boxes[:, 2:] > hw).any()
    ):
        raise ValueError("resize_batch: a source box lies outside its image")
    if (windows < 0).any() or (windows + size > resized).any():
        raise ValueError("resize_batch: the kept window lies outside the resized image")
    geom = np.zeros((b, _COLS), dtype=np.int64)
    geom[:, _OFF] = ptrs - base.data_ptr()  # uint8 elements: byte offsets are element offsets
    geom[:, _H], geom[:, _W] = hw[:, 0], hw[:, 1]
    geom[:, _SY : _SW + 1] = boxes
    geom[:, _OH : _OW + 1] = resized
    geom[:, _OY : _OX + 1] = windows
    geom[:, _FLIP] = np.asarray(flip, dtype=bool).reshape(b)
    geom[:, _TY] = _taps(boxes[:, 2], resized[:, 0])
    geom[:, _TX] = _taps(boxes[:, 3], resized[:, 1])
    # the box rows the kept window reads: all of a train crop's, a band for an eval crop
    j0, nj = _rows_needed(boxes[:, 2], resized[:, 0], windows[:, 0], size)
    geom[:, _J0], geom[:, _NJ] = j0, nj
    scratch = 3 * nj * size  # float32 elements of each image's resampled rows
    geom[:, _ROWS] = np.cumsum(scratch) - scratch
    table = torch.from_numpy(geom)
    table = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table
    rows = torch.empty(int(scratch.sum()), dtype=torch.float32, device=device)
    out = torch.empty(b, 3, size, size, dtype=dtype, device=device)
    rh, cw, rv, warps = (int(t) for t in tiles)
    grid = (b, math.ceil(max(int(nj.max()), 1) / rh), math.ceil(size / cw))
    launch(_horizontal_kernel, grid, base, table, rows, S=size, COLS=_COLS, RH=rh, CW=cw,
           num_warps=warps)  # fmt: skip
    grid = (b, math.ceil(size / rv), math.ceil(size / cw))
    launch(_vertical_kernel, grid, table, rows, out, S=size, COLS=_COLS, RV=rv, CW=cw,
           TO_UINT8=dtype == torch.uint8, num_warps=warps)  # fmt: skip
    return out
