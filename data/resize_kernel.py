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
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from ops.launch import launch

# the columns of the per-image geometry table
_OFF, _H, _W, _SY, _SX, _SH, _SW, _OH, _OW, _OY, _OX, _FLIP, _TY, _TX = range(14)
_COLS = 16


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
def _resize_batch_kernel(base, geom, out, S: tl.constexpr, BLOCK: tl.constexpr):
    img = tl.program_id(0)
    g = geom + img * 16
    off = tl.load(g + 0)  # element offset of this image from ``base``
    h = tl.load(g + 1).to(tl.int32)
    w = tl.load(g + 2).to(tl.int32)
    sy = tl.load(g + 3).to(tl.int32)  # source box: top, left, height, width
    sx = tl.load(g + 4).to(tl.int32)
    sh = tl.load(g + 5).to(tl.int32)
    sw = tl.load(g + 6).to(tl.int32)
    oh = tl.load(g + 7).to(tl.int32)  # the box is resized to (oh, ow) ...
    ow = tl.load(g + 8).to(tl.int32)
    oy = tl.load(g + 9).to(tl.int32)  # ... of which the S x S window at (oy, ox) is kept
    ox = tl.load(g + 10).to(tl.int32)
    flip = tl.load(g + 11).to(tl.int32)
    taps_y = tl.load(g + 12).to(tl.int32)
    taps_x = tl.load(g + 13).to(tl.int32)

    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = p < S * S
    y, x = p // S, p % S
    y0, ny, cy, iy = _span(y + oy, oh, sh)
    x0, nx, cx, ix = _span(x + ox, ow, sw)
    src = base + off + (sy + y0).to(tl.int64) * w + (sx + x0)
    plane = h.to(tl.int64) * w

    acc0 = tl.zeros((BLOCK,), tl.float32)
    acc1 = tl.zeros((BLOCK,), tl.float32)
    acc2 = tl.zeros((BLOCK,), tl.float32)
    total_y = tl.zeros((BLOCK,), tl.float32)
    total_x = tl.zeros((BLOCK,), tl.float32)
    for tx in range(0, taps_x):
        total_x += tl.where(tx < nx, _cubic(((tx + x0).to(tl.float32) - cx + 0.5) * ix), 0.0)
    for ty in range(0, taps_y):
        wy = tl.where(ty < ny, _cubic(((ty + y0).to(tl.float32) - cy + 0.5) * iy), 0.0)
        total_y += wy
        r0 = tl.zeros((BLOCK,), tl.float32)
        r1 = tl.zeros((BLOCK,), tl.float32)
        r2 = tl.zeros((BLOCK,), tl.float32)
        row = src + ty * w
        for tx in range(0, taps_x):
            ok = inside & (ty < ny) & (tx < nx)
            wx = tl.where(tx < nx, _cubic(((tx + x0).to(tl.float32) - cx + 0.5) * ix), 0.0)
            r0 += wx * tl.load(row + tx, mask=ok, other=0).to(tl.float32)
            r1 += wx * tl.load(row + plane + tx, mask=ok, other=0).to(tl.float32)
            r2 += wx * tl.load(row + 2 * plane + tx, mask=ok, other=0).to(tl.float32)
        acc0 += wy * r0
        acc1 += wy * r1
        acc2 += wy * r2
    norm = total_y * total_x
    norm = tl.where(norm != 0.0, norm, 1.0)
    xo = tl.where(flip != 0, S - 1 - x, x)
    dst = out + img.to(tl.int64) * (3 * S * S) + y * S + xo
    tl.store(dst, acc0 / norm, mask=inside)
    tl.store(dst + S * S, acc1 / norm, mask=inside)
    tl.store(dst + 2 * S * S, acc2 / norm, mask=inside)


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


def resize_batch(images, boxes, resized, windows, flip, size: int, block: int = 256):
    """float32 (B, 3, size, size) from uint8 (3, H, W) ``images`` (one device, any sizes).

    Image b's source box ``boxes[b] = (top, left, height, width)`` is resized to
    ``resized[b] = (rows, cols)`` with PIL's antialiased bicubic, and the ``size`` x ``size``
    window at ``windows[b] = (top, left)`` of that is kept, mirrored left-right where
    ``flip[b]``. Values are not rounded. Train crops: box = the crop, resized = (size, size),
    window = (0, 0); eval: box = the whole image, resized = the short-side resize, window =
    the center crop. The kernel reads the images through raw offsets: images allocated on
    another stream than the current one must be kept (or ``record_stream``-ed) until this
    stream has run it. ``images``: a list of tensors, or the decoder's ``PackedImages``
    (read through its addresses and sizes, without a tensor an image)."""
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
    table = torch.from_numpy(geom)
    table = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table
    out = torch.empty(b, 3, size, size, dtype=torch.float32, device=device)
    grid = (b, math.ceil(size * size / block))
    launch(_resize_batch_kernel, grid, base, table, out, S=size, BLOCK=block, num_warps=4)
    return out
