"""Adaptive gradient clipping of every float32 parameter in one Triton launch.

``optim._adaptive_clip_flat`` needs a fixed number of kernels, but about 2,000 host calls a
step for EfficientViT-M0's ~350 parameters (a reshape of each weight and each gradient to
concatenate them, a view and a dtype conversion of each scale, the list comprehensions): about
3 ms of a CUDA-graph step whose host side is its bound. Here one program per unit (a row of a
>= 2-D weight, a whole 0/1-D one) reads the unit of the weight and of the gradient where they
lie (element offsets from the first parameter and the first gradient, as
``data.resize_kernel`` reads a ragged batch), computes both norms, scales the gradient unit in
place and writes its squared norm (for the logged global norm). The units' table (which
parameter, where in it, how long) is made once per model and kept on the device; a step gives
only the parameters' and gradients' offsets (two ``data_ptr`` lists), and those too are kept
on the device by their values, so a step whose gradients lie where the last one's did (CUDA
graphs) copies nothing to the device. (Copying a 3-column table of all units each step, as
this did first, took ~5 ms of a step's host time in a profile of M0 with real data loading:
two ``copy_`` calls of ~2.5 ms, into the pinned staging buffer and to the device.)

Same rule as ``adaptive_clip_``: scale = limit / max(|g|, 1e-6) where |g| > limit =
clip * max(|w|, eps), else 1; norms summed in another order than ``segment_reduce``, so equal
to float32 rounding (the tests compare them).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ops.launch import launch


@triton.jit
def _agc_kernel(pbase, gbase, units, offsets, n_params, gsq, clip, eps, BLOCK: tl.constexpr):
    # floats arrive as fp64 where torch.compile's Inductor launches the kernel
    clip = tl.cast(clip, tl.float32)
    eps = tl.cast(eps, tl.float32)
    u = tl.program_id(0)
    k = tl.load(units + u * 3)  # the unit's parameter
    within = tl.load(units + u * 3 + 1)
    n = tl.load(units + u * 3 + 2)
    poff = tl.load(offsets + k) + within
    goff = tl.load(offsets + n_params + k) + within
    w_acc = tl.zeros((BLOCK,), tl.float32)
    g_acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < n
        w = tl.load(pbase + poff + o, mask=m, other=0.0)
        g = tl.load(gbase + goff + o, mask=m, other=0.0)
        w_acc += w * w
        g_acc += g * g
    g2 = tl.sum(g_acc, 0)
    g_norm = tl.sqrt(g2)
    limit = tl.maximum(tl.sqrt(tl.sum(w_acc, 0)), eps) * clip
    tl.store(gsq + u, g2)
    if g_norm > limit:
        scale = limit / tl.maximum(g_norm, 1e-6)
        for start in range(0, n, BLOCK):
            o = start + tl.arange(0, BLOCK)
            m = o < n
            g = tl.load(gbase + goff + o, mask=m, other=0.0)
            tl.store(gbase + goff + o, g * scale, mask=m)


_UNITS: dict = {}  # shapes -> unit_layout's arrays, made once per model
_UNIT_TABLES: dict = {}  # (device, shapes) -> the units' (parameter, within, length) on the device
_OFFSETS: dict = {}  # (device, pointers) -> the parameters' and gradients' offsets on the device
_CACHE_MAX = 8


def _remember(cache: dict, key, value):
    if len(cache) >= _CACHE_MAX:
        cache.pop(next(iter(cache)))  # the oldest
    cache[key] = value
    return value


def _to_device(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t


def unit_layout(params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AGC's units of ``params``: a row of a >= 2-D tensor, a whole 0/1-D one. Returns the
    units per parameter, each unit's first element within its parameter, each unit's length."""
    key = tuple(tuple(p.shape) for p in params)
    got = _UNITS.get(key)
    if got is None:
        counts = np.array([p.shape[0] if p.dim() > 1 else 1 for p in params], dtype=np.int64)
        lengths = np.array([p.numel() for p in params], dtype=np.int64) // counts
        within = np.concatenate([np.arange(c) * n for c, n in zip(counts, lengths)])
        got = (counts, within, np.repeat(lengths, counts))
        if len(_UNITS) > 16:
            _UNITS.clear()
        _UNITS[key] = got
    return got


def adaptive_clip_fused_(params, clip: float, eps: float = 1e-3) -> torch.Tensor:
    """``adaptive_clip_`` of contiguous float32 parameters with contiguous float32 gradients,
    all on one device, in one launch; returns the gradients' squared norm before clipping."""
    params = list(params)
    grads = [p.grad for p in params]
    for p, g in zip(params, grads):
        if (p.dtype != torch.float32 or g is None or g.dtype != torch.float32
                or not (p.is_contiguous() and g.is_contiguous()) or p.numel() == 0):  # fmt: skip
            raise ValueError("adaptive_clip_fused_: contiguous float32 weights and gradients only")
    dev = params[0].device
    shapes = tuple(tuple(p.shape) for p in params)
    units = _UNIT_TABLES.get((dev, shapes))
    if units is None:
        counts, within, lengths = unit_layout(params)
        owner = np.repeat(np.arange(len(params), dtype=np.int64), counts)
        units = _remember(_UNIT_TABLES, (dev, shapes),
                          _to_device(np.stack([owner, within, lengths], 1), dev))  # fmt: skip
    ptrs = np.array([t.data_ptr() for t in (*params, *grads)], dtype=np.int64)
    key = (dev, ptrs.tobytes())
    offsets = _OFFSETS.get(key)
    if offsets is None:  # element offsets from the first parameter, the first gradient
        n = len(params)
        offs = np.concatenate([ptrs[:n] - ptrs[0], ptrs[n:] - ptrs[n]]) // 4
        offsets = _remember(_OFFSETS, key, _to_device(offs, dev))
    gsq = torch.empty(units.shape[0], dtype=torch.float32, device=dev)
    launch(_agc_kernel, (units.shape[0],), params[0], grads[0], units, offsets, len(params), gsq,
           float(clip), float(eps), BLOCK=256, num_warps=4)  # fmt: skip
    return gsq.sum()
