"""``data.decode=gpu``: JPEG decoding and timm's image transforms on the training device.

The loader workers only read each image's stored bytes; :class:`GpuImagePipeline` then
decodes the batch with ``torchvision.io.decode_jpeg`` (batched nvJPEG on CUDA; the CPU
decoder elsewhere) and builds the uint8 batch (B, 3, S, S) that :class:`DevicePrep`
normalises, as the CPU path's workers would have:

train  timm's RandomResizedCropAndInterpolation (scale (0.08, 1), ratio (3/4, 4/3), bicubic),
       horizontal flip (p 0.5), RandAugment ``rand-...-inc1`` (default rand-m9-mstd0.5-inc1).
eval   resize the short side to ``floor(S / crop_pct)`` (bicubic), center crop S.

Random parameters are drawn on the host from a numpy generator made per batch from
(seed, rank, batch counter): distinct per rank, no device sync, and resumable from the
counter alone (``state_dict``). Crops are resized with PIL's filter (antialiased bicubic):
on CUDA the whole batch in two Triton launches (``resize_kernel.resize_batch``), elsewhere
one ``interpolate(bicubic, antialias=True)`` call an image (the two agree to float rounding, so
to a grey level after rounding where a value sits on .5); RandAugment runs
vectorised: per layer, the images that drew an op of one family (lookup tables, blends,
affine warps) are gathered, transformed with per-image parameters and written back. The ops
follow Pillow's 8-bit arithmetic (LUTs, float32 blends truncated, the 3x3 smoothing filter,
the a=-1 bicubic of ``Image.transform`` with the fill colour outside), on float32 tensors
that hold integers 0..255 after every op: on the CPU they equal timm's PIL ops bit for bit.
On CUDA the batch stays uint8 from the resize on (rounded there) and each family is a Triton
kernel on it (``augment_kernels``), with the same values: every pass over the batch then
moves a quarter of the bytes.

Differences from timm's PIL pipeline: JPEG decoding (nvJPEG's IDCT and chroma upsampling
differ from libjpeg-turbo's by a grey level or so); the crop resize has no 8-bit rounding
between its horizontal and vertical passes (about a fifth of the pixels one level off, more
near clipped overshoots); parameters come from numpy draws, not Python's ``random``, so the
same distributions but other samples.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment_kernels import affine_rows, blend_rows, lut_rows
from .image_config import GPU_DECODERS
from .resize_kernel import image_sizes, resize_batch

RA_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
"""timm's increasing RandAugment op set (``_RAND_INCREASING_TRANSFORMS``), in its order."""

CROP_TRIES = 10


# --------------------------------------------------------------------------- decoding


def decode_batch(
    data: list[torch.Tensor],
    device: torch.device | str,
    stream: torch.cuda.Stream | None = None,
    record: bool = True,
    decoder: str = "torchvision",
    packed: bool = False,
) -> list[torch.Tensor]:
    """Encoded images (uint8 1-D CPU tensors) -> RGB uint8 (3, H, W) tensors on ``device``.

    One batched ``decode_jpeg`` call; if it fails (a PNG named .jpg, a CMYK JPEG nvJPEG
    refuses), each image is decoded alone, falling back to the CPU decoders.

    On CUDA the decoder runs with ``stream`` (default: one from the pool) current, not the
    caller's: torchvision's nvJPEG writes its outputs on a private stream that does not wait
    for the stream the outputs were allocated on (pytorch/vision#9606), so outputs allocated
    on the training stream could land in blocks that queued kernels still read. Blocks of a
    side stream only ever hold earlier outputs, which ``record_stream`` keeps until the
    training stream is done with them; ``record=False`` leaves that to the caller (who must
    then keep the outputs until the caller's stream is done with them, as
    :class:`GpuImagePipeline` does with one event a batch rather than a call an image).

    ``decoder="nvjpeg"``: the GPU's JPEG engines, the batch in one call into one buffer
    (``data.nvjpeg_decode``; on a CPU device, torchvision's CPU decoder as for the default).
    ``decoder="nvimgcodec"``: one nvImageCodec call instead (``data.nvimgcodec_decode``).
    ``packed``: with nvjpeg on CUDA, return its ``PackedImages`` (list-like; ``resize_batch``
    reads it without a tensor an image) rather than a list. A pixel store's batch
    (``data.pixel_store.PixelBatch``) is copied, not decoded: a ``PackedImages`` on CUDA."""
    device = torch.device(device)
    if decoder not in GPU_DECODERS:
        raise ValueError(f"decoder must be one of {GPU_DECODERS}, got {decoder!r}")
    if not len(data):  # every image of the batch came cropped (data.cpu_decode_share=1)
        return []
    if hasattr(data, "to_device"):  # a pixel store's batch: nothing to decode, one copy
        decode_all = lambda batch, dev: batch.to_device(dev)  # noqa: E731
    else:
        decode_all = _pick_decoder(decoder, device, packed)
    if device.type != "cuda":
        return decode_all(data, device)
    caller = torch.cuda.current_stream(device)
    stream = stream or torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        images = decode_all(data, device)
    caller.wait_stream(stream)
    if record:
        for img in getattr(images, "tensors", images):
            img.record_stream(caller)
    return images


def _pick_decoder(decoder: str, device: torch.device, packed: bool):
    """``decode_batch``'s decoding function for ``decoder`` on ``device``."""
    if decoder == "nvimgcodec":
        from .nvimgcodec_decode import decode_nvimgcodec

        return decode_nvimgcodec
    if decoder == "nvjpeg" and device.type == "cuda":  # (elsewhere torchvision's CPU decode)
        from .nvjpeg_decode import decode_nvjpeg, decode_nvjpeg_packed

        return decode_nvjpeg_packed if packed else decode_nvjpeg
    return _decode_all


def _decode_all(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        return [_decode_one(d, device) for d in data]


def _decode_one(data: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError):
        pass
    try:
        img = decode_image(data, mode=ImageReadMode.RGB)  # CPU: JPEG (CMYK too), PNG, WEBP, GIF
    except (RuntimeError, ValueError):
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:  # BMP, TIFF, ...
            img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    return img.to(device)


def _host_to(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without a sync (pinned, non-blocking copy on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --------------------------------------------------------------------------- crops


def crop_params(
    heights: np.ndarray,
    widths: np.ndarray,
    u: np.ndarray,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, height, width) of timm's random-resized crop for each image, from uniform
    draws ``u`` (B, 2 * CROP_TRIES + 2): try t uses u[:, 2t] (area) and u[:, 2t+1] (log
    ratio), the last two place the crop. The first try that fits wins; if none does, a
    center crop of the whole image with its ratio clamped into ``ratio``."""
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    area = (h * w).astype(np.float64)[:, None]
    target = (scale[0] + (scale[1] - scale[0]) * u[:, 0 : 2 * CROP_TRIES : 2]) * area
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[:, 1 : 2 * CROP_TRIES : 2])
    tw = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    th = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (tw <= w[:, None]) & (th <= h[:, None])
    first = fits.argmax(1)
    rows = np.arange(len(h))
    ok = fits[rows, first]
    # at least one pixel: images of a few pixels can round a try down to 0 (timm then fails)
    th, tw = np.maximum(th[rows, first], 1), np.maximum(tw[rows, first], 1)
    top = np.floor(u[:, -2] * (h - th + 1)).astype(np.int64)
    left = np.floor(u[:, -1] * (w - tw + 1)).astype(np.int64)
    # fallback: the whole image, narrowed to the ratio range
    in_ratio = w / h
    rmin, rmax = min(ratio), max(ratio)
    fw = np.where(in_ratio > rmax, np.rint(h * rmax), w).astype(np.int64)
    fh = np.where(in_ratio < rmin, np.rint(w / rmin), h).astype(np.int64)
    th, tw = np.where(ok, th, fh), np.where(ok, tw, fw)
    top = np.where(ok, top, (h - th) // 2)
    left = np.where(ok, left, (w - tw) // 2)
    return top, left, th, tw


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, h, w) -> float32 (3, *size): bicubic with antialiasing (PIL's filter)."""
    x = img.unsqueeze(0).float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return x[0]


def eval_geometry(h: int, w: int, img_size: int, crop_pct: float) -> tuple[int, int, int, int]:
    """(resized h, resized w, top, left) of timm's eval transform: the short side resized to
    ``floor(img_size / crop_pct)`` (torchvision's rounding), then a centered crop."""
    short_new = math.floor(img_size / crop_pct)
    short, long = (w, h) if w <= h else (h, w)
    long_new = int(short_new * long / short)
    nw, nh = (short_new, long_new) if w <= h else (long_new, short_new)
    return nh, nw, int(round((nh - img_size) / 2.0)), int(round((nw - img_size) / 2.0))


# --------------------------------------------------------------------------- RandAugment spec


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's ``rand-m{M}-n{N}-p{P}-mstd{S}-mmax{X}-inc1`` settings."""

    magnitude: float = 10.0
    layers: int = 2
    prob: float = 0.5
    mstd: float = 0.0
    mmax: float = 10.0


def parse_rand_augment(spec: str | None) -> RandAugmentSpec | None:
    """The RandAugment of ``data.auto_augment`` (None when empty); ValueError for policies
    the GPU path does not implement (AutoAugment, AugMix, weighted or non-increasing ops)."""
    if not spec:
        return None
    parts = str(spec).split("-")
    where = f"data.auto_augment={spec!r} with data.decode=gpu"
    if parts[0] != "rand":
        raise ValueError(f"{where}: only RandAugment ('rand-...-inc1') runs on the GPU path; "
                         "use data.decode=cpu for other policies")  # fmt: skip
    kw: dict = {}
    increasing = False
    for part in parts[1:]:
        m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d[\d.]*)", part)
        if not m:
            raise ValueError(f"{where}: unsupported section {part!r} (supported: m, n, p, "
                             "mstd, mmax, inc)")  # fmt: skip
        key, val = m.groups()
        if key == "inc":
            increasing = bool(int(val))
        elif key == "mstd":
            kw["mstd"] = math.inf if float(val) > 100 else float(val)
        else:
            name = {"m": "magnitude", "n": "layers", "p": "prob", "mmax": "mmax"}[key]
            kw[name] = int(val) if key in ("m", "n", "mmax") else float(val)
    if not increasing:
        raise ValueError(f"{where}: only the increasing op set (inc1) is implemented")
    return RandAugmentSpec(**kw)


# --------------------------------------------------------------------------- RandAugment plan

FAMILIES = {
    "lut": ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing",
            "SolarizeAdd"),  # per-channel lookup tables
    "blend": ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
              "SharpnessIncreasing"),  # blends with a degenerate image
    "affine": ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"),
}  # fmt: skip
"""Ops that share one implementation: a layer applies each family once, to every image that
drew one of its ops (fewer, larger kernels than one pass per op)."""
_FAMILY = {op: (fam, k) for fam, ops in FAMILIES.items() for k, op in enumerate(ops)}


def op_params(name: str, mag: np.ndarray, sign: np.ndarray, h: int, w: int) -> np.ndarray:
    """Per-image parameters of op ``name`` at magnitudes ``mag`` (timm's level maps; ``sign``
    -1 where timm negates), by family: lut (n, 256) the table (identity for AutoContrast and
    Equalize, which the device computes from histograms); blend (n, 1) the factor; affine
    (n, 6) the matrix taking output pixel centres to input points (``Image.transform``'s)."""
    n, level = len(mag), mag / 10.0
    fam = _FAMILY[name][0]
    if fam == "blend":
        return np.maximum(0.1, 1.0 + sign * (level * 0.9))[:, None]
    if fam == "lut":
        i = np.arange(256, dtype=np.float64)[None, :]
        if name == "Invert":
            return np.broadcast_to(255.0 - i, (n, 256))
        if name == "PosterizeIncreasing":  # keep 4 - int(4 level) bits; 0 bits: black
            q = 2.0 ** (8 - (4 - np.trunc(level * 4)))[:, None]
            return np.floor(i / q) * q
        if name == "SolarizeIncreasing":  # invert from 256 - int(256 level) up
            t = (256 - np.minimum(256, np.trunc(level * 256)))[:, None]
            return np.where(i < t, i, 255.0 - i)
        if name == "SolarizeAdd":  # add min(128, int(110 level)) below 128
            add = np.minimum(128, np.trunc(level * 110))[:, None]
            return np.where(i < 128, np.minimum(255.0, i + add), i)
        return np.broadcast_to(i, (n, 256))
    out = np.zeros((n, 6))
    out[:, 0] = out[:, 4] = 1.0
    if name == "Rotate":  # PIL's rotate about the image centre
        angle = -np.radians((level * 30.0 * sign) % 360.0)
        c, s = np.round(np.cos(angle), 15), np.round(np.sin(angle), 15)
        cx, cy = w / 2.0, h / 2.0
        out[:, 0], out[:, 1], out[:, 3], out[:, 4] = c, s, -s, c
        out[:, 2] = c * -cx + s * -cy + cx
        out[:, 5] = -s * -cx + c * -cy + cy
    elif name in ("ShearX", "ShearY"):
        out[:, 1 if name == "ShearX" else 3] = level * 0.3 * sign
    elif name == "TranslateXRel":
        out[:, 2] = level * 0.45 * sign * w
    else:  # TranslateYRel
        out[:, 5] = level * 0.45 * sign * h
    return out


def _plan_entry(fam: str, ops: np.ndarray, idx, mag, sign, h: int, w: int):
    """(family, image indices, op kinds within the family, parameters) for one layer."""
    kinds = np.array([_FAMILY[RA_OPS[o]][1] for o in ops], dtype=np.int64)
    params = np.empty((len(idx), {"lut": 256, "blend": 1, "affine": 6}[fam]))
    for k, name in enumerate(FAMILIES[fam]):
        sel = kinds == k
        if sel.any():
            params[sel] = op_params(name, mag[sel], sign[sel], h, w)
    return fam, np.asarray(idx, dtype=np.int64), kinds, params


def draw_rand_augment(spec: RandAugmentSpec, rng: np.random.Generator, b: int, h: int, w: int):
    """The batch's RandAugment plan, in application order (layer by layer): per image and
    layer an op drawn uniformly with replacement, applied with probability ``prob``,
    magnitude ~ N(M, mstd) clipped to [0, mmax], sign of the signed ops uniform."""
    shape = (b, spec.layers)
    ops = rng.integers(0, len(RA_OPS), size=shape)
    on = rng.random(shape) <= spec.prob if spec.prob < 1.0 else np.ones(shape, dtype=bool)
    if spec.mstd == math.inf:
        mag = rng.uniform(0.0, spec.magnitude, size=shape)
    elif spec.mstd > 0:
        mag = rng.normal(spec.magnitude, spec.mstd, size=shape)
    else:
        mag = np.full(shape, float(spec.magnitude))
    mag = np.clip(mag, 0.0, spec.mmax or 10.0)
    sign = np.where(rng.random(shape) > 0.5, -1.0, 1.0)
    fam_of = np.array([list(FAMILIES).index(_FAMILY[op][0]) for op in RA_OPS])
    plan = []
    for layer in range(spec.layers):
        for f, fam in enumerate(FAMILIES):
            idx = np.flatnonzero(on[:, layer] & (fam_of[ops[:, layer]] == f))
            if idx.size:
                o, m, sg = ops[idx, layer], mag[idx, layer], sign[idx, layer]
                plan.append(_plan_entry(fam, o, idx, m, sg, h, w))
    return plan


def apply_plan(x: torch.Tensor, plan, fill: torch.Tensor, fused_ops: bool = False) -> torch.Tensor:
    """Apply a ``draw_rand_augment`` plan in place to (B, 3, H, W) images with values 0..255
    (uint8, or float32 holding integers): one host-to-device copy for all indices and one for
    all parameters, then per entry gather the images, transform them and write them back.
    ``fused_ops``: every family's entries by Triton kernels (``augment_kernels``, the same
    values; one to three launches) instead of torch operations (which compute in float32)."""
    if not plan:
        return x
    ints = _host_to(np.concatenate([np.concatenate([e[1], e[2]]) for e in plan]), x.device)
    floats = _host_to(np.concatenate([e[3].ravel() for e in plan]), x.device)
    i = f = 0
    for fam, idx, kinds, params in plan:
        n = len(idx)
        rows, kinds_d = ints[i : i + n], ints[i + n : i + 2 * n]
        p = floats[f : f + params.size].view(params.shape)
        i, f = i + 2 * n, f + params.size
        present = set(kinds.tolist())
        if fam == "affine" and fused_ops:
            y = affine_rows(x, rows, p, fill)
        elif fam == "blend" and fused_ops:
            y = blend_rows(x, rows, kinds_d, p, contrast=1 in present)
        elif fam == "lut" and fused_ops:
            y = lut_rows(x, rows, kinds_d, p, histograms=bool(present & {0, 1}))
        else:  # the torch ops compute on float32
            y = _FAMILY_FNS[fam](x.index_select(0, rows).float(), kinds_d, present, p, fill)
        x.index_copy_(0, rows, y.to(x.dtype))
    return x


def apply_op(name: str, x: torch.Tensor, mag, sign, fill=(128, 128, 128)) -> torch.Tensor:
    """One RandAugment op on every image of float (n, 3, H, W) at per-image magnitudes and
    signs (an entry point for tests and experiments); ``x`` is left unchanged."""
    n, _, h, w = x.shape
    mag = np.broadcast_to(np.asarray(mag, dtype=np.float64), (n,))
    sign = np.broadcast_to(np.asarray(sign, dtype=np.float64), (n,))
    entry = _plan_entry(_FAMILY[name][0], np.full(n, RA_OPS.index(name)), np.arange(n), mag,
                        sign, h, w)  # fmt: skip
    fill_t = torch.as_tensor(fill, dtype=torch.float32, device=x.device)
    return apply_plan(x.clone(), [entry], fill_t)


# --------------------------------------------------------------------------- the ops


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """(n*3, 256) int64 counts of each channel's values."""
    n, c, h, w = x.shape
    v = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    return hist.scatter_add_(1, v, torch.ones_like(v))


def _auto_contrast_lut(hist: torch.Tensor) -> torch.Tensor:
    """PIL ``autocontrast``: each channel's [lo, hi] stretched to [0, 255] (a float64 LUT
    computed as PIL's Python does, truncated); constant channels unchanged."""
    lo = (hist > 0).int().argmax(1).double()
    hi = (255 - (hist > 0).flip(1).int().argmax(1)).double()
    span = (hi - lo).clamp(min=1.0)
    scale = torch.full_like(span, 255.0) / span  # not 255.0 / span: that multiplies by 1/span
    offset = -lo * scale
    ix = torch.arange(256, dtype=torch.float64, device=hist.device)
    lut = (ix * scale[:, None] + offset[:, None]).trunc().clamp(0, 255)
    return torch.where((hi > lo)[:, None], lut, ix)


def _equalize_lut(hist: torch.Tensor) -> torch.Tensor:
    """PIL ``equalize``: per channel, a LUT from the cumulative histogram (integer math)."""
    last = 255 - (hist > 0).flip(1).int().argmax(1)
    step = (hist.sum(1) - hist.gather(1, last[:, None]).squeeze(1)) // 255
    cum = hist.cumsum(1) - hist
    lut = ((step // 2)[:, None] + cum) // step.clamp(min=1)[:, None]
    ix = torch.arange(256, device=hist.device)
    return torch.where((step > 0)[:, None], lut.clamp(max=255), ix).double()


def _lut_family(x, kinds, present, params, fill):
    """AutoContrast (kind 0), Equalize (1) and the fixed tables (Invert, Posterize,
    Solarize, SolarizeAdd: ``params``) as one per-channel lookup."""
    n, c, h, w = x.shape
    lut = params.unsqueeze(1).expand(n, c, 256).reshape(n * c, 256)
    if present & {0, 1}:
        hist = _histogram(x)
        k = kinds.view(n, 1).expand(n, c).reshape(n * c, 1)  # per channel row
        if 0 in present:
            lut = torch.where(k == 0, _auto_contrast_lut(hist), lut)
        if 1 in present:
            lut = torch.where(k == 1, _equalize_lut(hist), lut)
    return lut.to(x.dtype).gather(1, x.reshape(n * c, h * w).long()).view(n, c, h, w)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L, (19595 R + 38470 G + 7471 B + 2^15) >> 16 (exact in float32)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, weights 1 with 5 in the centre, /13, rounded); the
    one-pixel border is kept. Shifted adds, not conv2d: exact (no TF32)."""
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x
    rows = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.floor((box + 4.0 * x[..., 1:-1, 1:-1] + 6.5) / 13.0)
    return out


def _blend_family(x, kinds, present, params, fill):
    """``ImageEnhance`` Color (kind 0: blend with L), Contrast (1: with the rounded mean of
    L), Brightness (2: with black), Sharpness (3: with SMOOTH), by per-image factors:
    PIL's 8-bit ``Image.blend`` (float32, clipped, truncated)."""
    k = kinds.view(-1, 1, 1, 1)
    deg = torch.zeros_like(x)
    if present & {0, 1}:
        luma = _luma(x)
        if 0 in present:
            deg = torch.where(k == 0, luma, deg)
        if 1 in present:
            total = luma.double().sum((1, 2, 3), keepdim=True)
            mean = torch.floor(total / torch.full_like(total, luma[0].numel()) + 0.5)
            deg = torch.where(k == 1, mean.to(x.dtype), deg)  # (true division, as Python)
    if 3 in present:
        deg = torch.where(k == 3, _smooth(x), deg)
    alpha = params.to(torch.float32).view(-1, 1, 1, 1)
    return (deg + alpha * (x - deg)).clamp(0, 255).trunc()


def _cubic(v1, v2, v3, v4, d):
    """PIL's bicubic interpolation polynomial (a = -1) between v2 and v3 at offset d."""
    p2 = -v1 + v3
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _affine(x, kinds, present, params, fill):
    """PIL ``Image.transform(AFFINE, BICUBIC, fillcolor=fill)`` with per-image matrices:
    output pixel centre (i + .5, j + .5) -> input point; points outside the image take
    ``fill``, others the a=-1 bicubic of the edge-clamped 4x4 neighbourhood, clipped and
    truncated. Coordinates and interpolation in float64, as PIL computes them."""
    n, c, h, w = x.shape
    dev, f64 = x.device, torch.float64
    xo = (torch.arange(w, device=dev, dtype=f64) + 0.5).view(1, 1, w)
    yo = (torch.arange(h, device=dev, dtype=f64) + 0.5).view(1, h, 1)
    a, b, c0, d, e, f = (m.view(n, 1, 1) for m in params.to(f64).unbind(1))
    xin = a * xo + b * yo + c0  # (n, h, w)
    yin = d * xo + e * yo + f
    inside = ((xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)).unsqueeze(1)
    xs, ys = xin - 0.5, yin - 0.5
    x0, y0 = xs.floor(), ys.floor()
    taps = torch.arange(-1, 3, device=dev, dtype=f64).view(1, 4, 1, 1)
    cols = (x0.unsqueeze(1) + taps).clamp(0, w - 1).long()  # (n, 4, h, w)
    rows = (y0.unsqueeze(1) + taps).clamp(0, h - 1).long() * w
    index = (rows.unsqueeze(2) + cols.unsqueeze(1)).view(n, 1, 16 * h * w)
    v = x.reshape(n, c, h * w).gather(2, index.expand(n, c, 16 * h * w))
    v = v.view(n, c, 4, 4, h, w)  # [row tap, column tap]
    dx = (xs - x0).view(n, 1, 1, h, w)
    dy = (ys - y0).view(n, 1, h, w)
    r = _cubic(v[:, :, :, 0], v[:, :, :, 1], v[:, :, :, 2], v[:, :, :, 3], dx)  # (n, c, 4, h, w)
    out = _cubic(r[:, :, 0], r[:, :, 1], r[:, :, 2], r[:, :, 3], dy).clamp(0, 255).trunc()
    return torch.where(inside, out.to(x.dtype), fill.to(x.dtype).view(1, c, 1, 1))


_FAMILY_FNS = {"lut": _lut_family, "blend": _blend_family, "affine": _affine}


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Decoded:
    """A decoded batch between the pipeline's two stages: the images (uint8 (3, H, W), sizes
    differ), for a train batch its index (the seed of its draws; None for eval), and the
    batch's last images as the loader's workers decoded and cropped them
    (``data.cpu_decode_share``), if any."""

    images: list[torch.Tensor]  # or nvjpeg_decode.PackedImages (data.gpu_decoder=nvjpeg)
    index: int | None
    crops: torch.Tensor | None = None  # uint8 (k, S, S, 3) the workers cropped, on the device


class GpuImagePipeline:
    """Encoded batch (list of uint8 1-D tensors) -> uint8 (B, 3, S, S) on ``device``.

    ``pipeline(data, device, train)``: decode, then the train or eval transform (module
    docstring). ``fill`` is RandAugment's fill colour for uncovered pixels (timm: the
    dataset mean x 255, rounded). Training batches advance a counter, the only state
    (``state_dict``): batch k of a run with (seed, rank) always gets the same draws."""

    def __init__(self, img_size: int, crop_pct: float = 0.875, fill=(124, 116, 104),
                 auto_augment: str | None = "rand-m9-mstd0.5-inc1", seed: int = 0,
                 rank: int = 0, channels_last: bool = True, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), hflip: float = 0.5):  # fmt: skip
        self.img_size, self.crop_pct = int(img_size), float(crop_pct)
        self.fill = torch.tensor([float(v) for v in fill])
        self._fills: dict[torch.device, torch.Tensor] = {}
        self.spec = parse_rand_augment(auto_augment)
        self.seed, self.rank = int(seed) % 2**63, int(rank)
        self.channels_last = bool(channels_last)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.batches = 0
        self.batched_resize: bool | None = None  # None: on CUDA devices (see ``_batched``)
        # each RandAugment family in one Triton launch, equal to the torch ops bit for bit;
        # None: on CUDA devices (True also runs them under the interpreter on a CPU)
        self.fused_ops: bool | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # decoding side streams
        self.decoder = "torchvision"  # nvjpeg, nvimgcodec (data.gpu_decoder; see decode_batch)
        self._held: list = []  # (event, decoded images) of CUDA batches being transformed
        self._lock = threading.Lock()

    def _batched(self, images: list[torch.Tensor]) -> bool:
        """Resize with :func:`resize_batch` (the batch's two Triton launches) rather than image by
        image."""
        if self.batched_resize is None:
            if hasattr(images, "ptrs"):  # PackedImages: on a CUDA device
                return True
            return bool(images) and images[0].is_cuda
        return self.batched_resize

    def _fused(self, device: torch.device) -> bool:
        """RandAugment's families by Triton launches (``fused_ops``; None: on CUDA)."""
        return device.type == "cuda" if self.fused_ops is None else self.fused_ops

    def _uint8(self, images) -> bool:
        """Crop and RandAugment a batch that the batch kernels resize (``_batched``) as uint8
        (the kernels' path: each pass over the batch moves a quarter of float32's bytes) rather
        than float32 holding the same integers (the torch ops' path)."""
        device = images.device if hasattr(images, "device") else images[0].device
        return self.spec is None or self._fused(device)

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])

    def __call__(self, data, device, train: bool = False) -> torch.Tensor:
        return self.augment(self.decode(data, device, train))

    def decode(self, data, device, train: bool = False) -> Decoded:
        """Stage one: decode the batch (nvJPEG on CUDA). A train batch takes the next batch
        index (which fixes its random draws), so stage two may run in another thread."""
        device = torch.device(device)
        crops = getattr(data, "crops", None)  # data.cpu_decode_share: the workers' crops
        if crops is not None and not train:
            raise ValueError("GpuImagePipeline.decode: an eval batch with worker crops "
                             "(data.cpu_decode_share is for training batches only)")  # fmt: skip
        with self._lock:  # stages in threads of their own, eval batches from the loop
            index = None
            if train:
                index, self.batches = self.batches, self.batches + 1
            if device.type != "cuda":
                images = decode_batch(data, device, decoder=self.decoder)
                return Decoded(images, index, None if crops is None else crops.to(device))
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
        stream = self._streams[device]
        if crops is not None:  # on the decoding stream, which the caller's then waits for
            with torch.cuda.stream(stream):
                crops = crops.to(device, non_blocking=True)
            torch.cuda.current_stream(device).wait_stream(stream)
        images = decode_batch(data, device, stream, record=False, decoder=self.decoder,
                              packed=True)  # fmt: skip
        return Decoded(images, index, crops)

    def augment(self, batch: Decoded) -> torch.Tensor:
        """Stage two: crop, flip and RandAugment (train) or the eval resize and crop."""
        images = batch.images
        if batch.index is None:
            x = self.eval_batch(images)
        else:
            x = self.train_batch(images, batch.index, batch.crops)
        if x.is_cuda:  # keep the images until this stream has read them
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(x.device))
            kept = images if batch.crops is None else [images, batch.crops]
            with self._lock:
                # earlier batches' images: only those read by now give their blocks back, which
                # nvJPEG's writes may then take (see decode_batch); the others stay held.
                # Polling, not waiting, keeps the next decode from queueing behind this
                # augmentation (+7.6% images/s for EfficientViT-M0 from JPEGs on an H100,
                # docs/benchmarks.md); done here, not in the decoding thread, which bounds the
                # loader (twenty-sixth session)
                self._held = [(e, imgs) for e, imgs in self._held if not e.query()]
                self._held.append((done, kept))
            if self.decoder == "nvjpeg":
                from .nvjpeg_decode import release_read_bytes

                release_read_bytes()
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(torch.uint8, memory_format=fmt)

    def train_batch(self, images: list[torch.Tensor], index: int,
                    cropped: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Decoded images -> (B, 3, S, S) with values 0..255: random-resized crop, flip,
        RandAugment, with the draws of batch ``index``; uint8 on the kernels' path (CUDA),
        float32 on the torch ops' path. ``cropped``: uint8 (k, S, S, 3) images already cropped
        (by the loader's workers), the batch's last k: they take the flip and RandAugment
        draws of their places, and the draws of the others do not depend on k."""
        rng = np.random.default_rng([self.seed, self.rank, int(index), 0x475055])
        k = 0 if cropped is None else len(cropped)
        n, s = len(images), self.img_size
        b = n + k
        hw = image_sizes(images)
        u = rng.random((b, 2 * CROP_TRIES + 2))[:n]
        top, left, ch, cw = crop_params(hw[:, 0], hw[:, 1], u, self.scale, self.ratio)
        flip = rng.random(b) < self.hflip
        parts = []
        batched = n > 0 and self._batched(images)
        dtype = torch.uint8 if batched and self._uint8(images) else torch.float32
        if batched:  # the batch's resize kernels, the flip included (and the rounding for uint8)
            boxes = np.stack([top, left, ch, cw], 1)
            parts.append(resize_batch(images, boxes, np.full((n, 2), s), np.zeros((n, 2)),
                                      flip[:n], s, dtype=dtype))  # fmt: skip
        elif n:
            images = list(images)
            parts.append(torch.stack([
                _resize(img[:, t : t + hh, l_ : l_ + ww], (s, s))
                for img, t, l_, hh, ww in zip(images, top.tolist(), left.tolist(),
                                              ch.tolist(), cw.tolist())]))  # fmt: skip
        if k:
            parts.append(cropped.permute(0, 3, 1, 2).to(dtype))
        x = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        # flips left to do: the worker crops', and every one on the per-image path
        todo = flip.copy()
        if batched:
            todo[:n] = False
        if todo.any():
            mask = _host_to(todo, x.device).view(b, 1, 1, 1)
            x = torch.where(mask, x.flip(-1), x)
        if x.dtype != torch.uint8:
            x = x.round_().clamp_(0, 255)
        if self.spec is not None:
            plan = draw_rand_augment(self.spec, rng, b, s, s)
            if x.device not in self._fills:  # copied once: a pageable copy would sync
                self._fills[x.device] = self.fill.to(x.device)
            x = apply_plan(x, plan, self._fills[x.device], fused_ops=self._fused(x.device))
        return x

    def eval_batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Decoded images -> (B, 3, S, S) with values 0..255: timm's eval resize and center
        crop; uint8 from the batch kernel (CUDA), float32 image by image."""
        s = self.img_size
        if self._batched(images):  # the batch's resize kernels, rounded to uint8 in them
            hw = image_sizes(images)
            geo = np.array([eval_geometry(h, w, s, self.crop_pct) for h, w in hw.tolist()])
            boxes = np.concatenate([np.zeros_like(hw), hw], 1)
            return resize_batch(images, boxes, geo[:, :2], geo[:, 2:], np.zeros(len(images)), s,
                                dtype=torch.uint8)  # fmt: skip
        else:
            out = []
            for img in images:
                nh, nw, top, left = eval_geometry(img.shape[-2], img.shape[-1], s, self.crop_pct)
                out.append(_resize(img, (nh, nw))[:, top : top + s, left : left + s])
            x = torch.stack(out)
        return x.round_().clamp_(0, 255)


def build_gpu_pipeline(cfg, seed: int = 0, rank: int = 0) -> GpuImagePipeline | None:
    """The device-side decoder for ``cfg`` (an ``ImageDataConfig``) when ``cfg.decode`` is
    "gpu", else None (the workers decode)."""
    if getattr(cfg, "decode", "cpu") != "gpu":
        return None
    fill = tuple(min(255, round(255 * m)) for m in cfg.mean)
    pipe = GpuImagePipeline(cfg.img_size, cfg.crop_pct, fill, cfg.auto_augment or None,
                            seed=seed, rank=rank, channels_last=bool(cfg.channels_last))  # fmt: skip
    pipe.fused_ops = None if getattr(cfg, "fused_augment", True) else False
    pipe.decoder = getattr(cfg, "gpu_decoder", "torchvision")
    if pipe.decoder == "nvimgcodec":
        from .nvimgcodec_decode import INSTALL_HINT, available

        if not available():
            raise ImportError(INSTALL_HINT)
    if pipe.decoder == "nvjpeg" and torch.cuda.is_available():  # (CPU hosts decode on the CPU)
        from .nvjpeg_decode import _lib

        _lib()  # ImportError naming what is missing
    return pipe
