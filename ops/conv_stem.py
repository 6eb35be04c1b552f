"""First convolution of an image model (3x3, stride 2, padding 1, few input channels) in Triton.

A convolution from 3 input channels has too little reduction (27 products an output) for a
GEMM: cuDNN's kernels for it ran at 1.7 ms (channels_last) to 2.4 ms (NCHW) for EfficientViT's
stem at batch 2048 x 224^2 on an H100, plus 0.8 ms for autocast's fp32 -> fp16 copy of the
images before it, against ~0.5 ms to read the fp32 images and write the output once. This kernel
reads the images in their own dtype and layout, rounds them (and the weights) to the output
dtype as autocast would, accumulates the 27 products in fp32, adds the bias, applies ReLU if
asked, and writes the output in the requested memory format. Forward only (inference copies).
"""

from __future__ import annotations

import torch

from ops.launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - no triton
    triton = tl = None

MAX_CIN = 4

if triton is not None:

    @triton.jit
    def _conv3x3s2_kernel(x_ptr, w_ptr, b_ptr, o_ptr, P, H, W, HO, WO,
                          sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                          CIN: tl.constexpr, COUT: tl.constexpr, CP: tl.constexpr,
                          RELU: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # output pixels, (b, oy, ox) flat
        pm = p < P
        ox = p % WO
        oy = (p // WO) % HO
        b = (p // (WO * HO)).to(tl.int64)
        co = tl.arange(0, CP)
        dt = o_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK, CP), tl.float32)
        for tap in tl.static_range(CIN * 9):
            ci = tap // 9
            ky = (tap % 9) // 3
            kx = tap % 3
            iy = oy * 2 - 1 + ky
            ix = ox * 2 - 1 + kx
            ok = pm & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            xv = tl.load(x_ptr + b * sxb + ci * sxc + iy * sxh + ix * sxw, mask=ok, other=0.0)
            wv = tl.load(w_ptr + tap * CP + co)  # (CP,) in the output dtype, zero past COUT
            acc += xv.to(dt).to(tl.float32)[:, None] * wv.to(tl.float32)[None, :]
        acc += tl.load(b_ptr + co)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        off = b[:, None] * sob + co[None, :] * soc + (oy * soh + ox * sow)[:, None]
        tl.store(o_ptr + off, acc.to(dt), mask=pm[:, None] & (co < COUT)[None, :])


def pack_weights(weight: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype):
    """(Cin*9, CP) tap-major weights in ``out_dtype`` (zero past Cout) and an fp32 (CP,) bias,
    as the kernel reads them."""
    cout, cin = weight.shape[:2]
    cp = max(8, 1 << (cout - 1).bit_length())
    wt = torch.zeros(cin * 9, cp, device=weight.device, dtype=out_dtype)
    wt[:, :cout] = weight.detach().reshape(cout, cin * 9).t().to(out_dtype)
    bt = torch.zeros(cp, device=weight.device, dtype=torch.float32)
    bt[:cout] = bias.detach().float()
    return wt, bt


def conv3x3_s2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool,
               out_dtype: torch.dtype, memory_format=torch.channels_last,
               packed: tuple | None = None) -> torch.Tensor:  # fmt: skip
    """``[relu](conv2d(x, weight, bias, stride=2, padding=1))`` for x (B, Cin, H, W) with
    Cin <= 4 and weight (Cout, Cin, 3, 3); output (B, Cout, ceil(H/2), ceil(W/2)) in
    ``out_dtype`` and ``memory_format``. x and weight are rounded to ``out_dtype`` first.
    ``packed``: :func:`pack_weights` of these weights for ``out_dtype`` (made here if not
    given; callers that run the same weights often keep it). One opaque op
    (``torch.ops.attnlab.conv3x3_s2``) under ``torch.compile``."""
    if triton is None:
        raise RuntimeError("conv3x3_s2 needs triton")
    cin = x.shape[1]
    if x.dim() != 4 or weight.shape[1:] != (cin, 3, 3) or cin > MAX_CIN:
        raise ValueError(f"conv3x3_s2: weight {tuple(weight.shape)} for input {tuple(x.shape)}")
    wt, bt = pack_weights(weight, bias, out_dtype) if packed is None else packed
    return _conv3x3_s2(x, wt, bt, weight.shape[0], relu, memory_format == torch.channels_last)


def _out(x, wt, cout, channels_last):
    b, _, h, w = x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(b, cout, (h + 1) // 2, (w + 1) // 2, device=x.device, dtype=wt.dtype,
                       memory_format=fmt)  # fmt: skip


@torch.library.custom_op("attnlab::conv3x3_s2", mutates_args=())
def _conv3x3_s2(x: torch.Tensor, wt: torch.Tensor, bt: torch.Tensor, cout: int, relu: bool,
                channels_last: bool) -> torch.Tensor:  # fmt: skip
    out = _out(x, wt, cout, channels_last)
    _, cin, h, w = x.shape
    ho, wo = out.shape[-2:]
    p = x.shape[0] * ho * wo
    block = 128
    launch(_conv3x3s2_kernel, (triton.cdiv(p, block),), x, wt, bt, out, p, h, w, ho, wo,
           *x.stride(), *out.stride(), CIN=cin, COUT=cout, CP=wt.shape[1], RELU=relu,
           BLOCK=block, num_warps=4)  # fmt: skip
    return out


@_conv3x3_s2.register_fake
def _(x, wt, bt, cout, relu, channels_last):
    return _out(x, wt, cout, channels_last)
