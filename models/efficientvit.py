"""EfficientViT M0-M5 (Liu et al., CVPR 2023, "EfficientViT: Memory Efficient Vision Transformer
with Cascaded Group Attention"), with each head's softmax attention through the ``ops`` contract.

Shapes (NCHW, BatchNorm after every convolution; S = image size, C_i = embed dim of stage i)::

    stem     4 x (3x3 stride-2 conv + BN), ReLU between        (B, 3, S, S) -> (B, C0, S/16, S/16)
    stage 0  depth[0] x Block
    stage i  Downsample (dw + FFN, PatchMerging stride 2, dw + FFN) -> C_i, then depth[i] x Block
    head     global average pool -> BatchNorm1d + Linear         -> (B, num_classes)

    Block ("sandwich"): x += DW(x); x += FFN(x); x += CGA(x); x += DW(x); x += FFN(x)

Cascaded group attention (CGA) runs on non-overlapping ``window`` x ``window`` windows (the
stage's map zero-padded at the bottom/right to a multiple of the window, as the paper and timm
do; the padded tokens take part as keys, exactly like the published model). Head i reads split i
of the channels plus head i-1's output, projects it to q, k (``key_dim``) and v (C/heads) with
its own 1x1 conv + BN, runs a depthwise conv on q, and attends with a learned bias per relative
offset (|dy|, |dx|) inside the window. Heads depend on each other, so they run one after the
other; every window of the whole batch goes through the backend in one call per head::

    q (B*windows, N, 1, key_dim), k (same), v (B*windows, N, 1, C/heads), bias (1, 1, N, N)

with N = window**2 (Dv != D: backends must accept a value dim different from the key dim, and
an additive bias: ``sdpa`` and ``reference`` do, ``flash`` refuses at build time).

``attn=neighborhood`` (or ``neighborhood_reference``) selects a variant of the paper's model:
each head attends over the ``window`` x ``window`` neighbourhood of every token of the whole
stage map (2-D neighborhood attention, NATTEN semantics: the window shifts at the borders,
nothing is padded or partitioned) instead of inside fixed windows, and there are no learned
attention biases (NA kernels take none; the depthwise convolutions around the attention still
give positions). ``model.window`` sets the neighbourhood (the backend's own ``kernel_size``
option is replaced per stage by min(window, map side)). Where a stage map is no larger than the
window, this equals the paper's model with zero biases (tested). Its state dict is timm's
without ``attention_biases``.

Parameter and buffer layout differ from timm's ``efficientvit_mX`` only by names;
:func:`from_timm_state_dict` / :func:`to_timm_state_dict` map one to the other, and
:func:`load_pretrained` (or ``model.pretrained=PATH``) loads a timm checkpoint file.
:meth:`EfficientViT.fuse_bn` folds every Conv+BN and BN+Linear for inference, and (by default)
runs each windowed CGA layer and the stem's first conv as Triton kernels (``ops/cascaded.py``,
``ops/conv_stem.py``) with channels_last weights. ``model.impl=timm`` builds timm's own model
instead (:class:`TimmEfficientViT`), for comparisons through the same trainer.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import ops

PATCH = 16  # the stem's four stride-2 convolutions

# variant: (embed dims, depths, heads per stage, depthwise kernel on q for head 0, 1, 2, 3)
VARIANTS = {
    "m0": ((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5)),
    "m1": ((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3)),
    "m2": ((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3)),
    "m3": ((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5)),
    "m4": ((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3)),
    "m5": ((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3)),
}


@dataclasses.dataclass
class EfficientViTConfig:
    name: str = "efficientvit_m0"
    family: str = "efficientvit"
    variant: str = "m0"  # m0 .. m5: embed dims, depths, heads from VARIANTS
    num_classes: int = 1000
    img_size: int = 224  # multiple of 16; sets the windows (shrunk where a stage map is smaller)
    in_chans: int = 3
    key_dim: int = 16  # q/k dim per head
    window: int = 7  # attention window side (tokens)
    pretrained: str | None = None  # timm efficientvit_mX checkpoint file, loaded when built
    impl: str = "ours"  # ours | timm: timm's own efficientvit_mX, the reference to compare with
    # no drop_path: the published model (and timm's) has no stochastic depth


def validate_config(cfg: EfficientViTConfig) -> None:
    """Reject configurations that cannot build, naming the field and the valid values."""
    if cfg.variant not in VARIANTS:
        raise ValueError(
            f"unknown EfficientViT variant model.variant={cfg.variant!r}; "
            f"valid: {', '.join(VARIANTS)}"
        )
    if cfg.img_size < PATCH or cfg.img_size % PATCH:
        raise ValueError(
            f"model.img_size={cfg.img_size} must be a positive multiple of {PATCH} "
            "(the stem's four stride-2 convolutions), e.g. 224"
        )
    if cfg.impl not in ("ours", "timm"):
        raise ValueError(f"model.impl={cfg.impl!r}: 'ours' or 'timm' (timm's efficientvit_mX)")
    for field in ("num_classes", "in_chans", "key_dim", "window"):
        if getattr(cfg, field) < 1:
            raise ValueError(f"model.{field}={getattr(cfg, field)} must be >= 1")


def stage_geometry(cfg: EfficientViTConfig) -> list[tuple[int, int]]:
    """(feature-map side, attention window side) of each stage for ``cfg.img_size``."""
    side, out = cfg.img_size // PATCH, []
    for i in range(3):
        if i > 0:
            side = (side - 1) // 2 + 1  # stride-2 3x3 conv with padding 1
        out.append((side, min(cfg.window, side)))
    return out


# ---------------------------------------------------------------------------------------------
# building blocks

NEIGHBORHOOD_BACKENDS = ("neighborhood", "neighborhood_reference")


def is_neighborhood(attention) -> bool:
    """Whether ``attention`` is a neighborhood-attention backend: the model then runs its
    attn=neighborhood variant (2-D NA over each stage's map, kernel model.window, no biases)."""
    return getattr(attention, "name", None) in NEIGHBORHOOD_BACKENDS


class ConvBN(nn.Module):
    """Conv2d without bias followed by BatchNorm2d; ``fuse()`` folds them into one Conv2d."""

    def __init__(self, cin, cout, kernel=1, stride=1, groups=1, bn_init=1.0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_init)

    def forward(self, x):
        return self.bn(self.conv(x))

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c, bn = self.conv, self.bn
        w64 = c.weight.double()
        s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (Cout,)
        fused = nn.Conv2d(
            c.in_channels,
            c.out_channels,
            c.kernel_size,
            c.stride,
            c.padding,
            groups=c.groups,
            bias=True,
            device=c.weight.device,
            dtype=c.weight.dtype,
        )
        fused.weight.copy_(w64 * s[:, None, None, None])
        fused.bias.copy_(bn.bias.double() - bn.running_mean.double() * s)
        return fused


class StemConvReLU(nn.Module):
    """relu(conv(x)) of a folded 3x3 stride-2 stem conv; in inference copies on CUDA, one Triton
    kernel that reads the images in their own dtype and layout (``ops/conv_stem.py``: fuses
    autocast's copy of the images, and cuDNN is slow at 3 input channels). The weights are
    laid out for the kernel at the first call per dtype and device (an inference copy's
    weights do not change)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self._packed: dict = {}  # (dtype, device) -> the kernel's weight layout, made once

    def _fast(self, x) -> bool:
        c = self.conv
        return (
            ops.kernels_run_on(x)
            and not (torch.is_grad_enabled() and (x.requires_grad or c.weight.requires_grad))
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and c.kernel_size == (3, 3) and c.stride == (2, 2) and c.padding == (1, 1)
            and c.groups == 1 and c.bias is not None and c.in_channels <= 4
        )  # fmt: skip

    def forward(self, x):
        if not self._fast(x):
            return F.relu(self.conv(x))
        from ops import conv_stem

        c, dev = self.conv, x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        packed = self._packed.get((dtype, x.device))
        if packed is None:
            packed = self._packed[dtype, x.device] = conv_stem.pack_weights(c.weight, c.bias, dtype)
        cl = c.weight.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if cl else torch.contiguous_format
        return conv_stem.conv3x3_s2(x, c.weight, c.bias, True, dtype, fmt, packed)


def fold_bn_(module: nn.Module) -> nn.Module:
    """Replace every ConvBN and BNLinear inside ``module`` by its folded layer, in place."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (ConvBN, BNLinear)):
                setattr(parent, name, child.fuse())
    return module


class BNLinear(nn.Module):
    """BatchNorm1d followed by Linear (the classifier); ``fuse()`` folds them into one Linear."""

    def __init__(self, cin, cout):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.linear = nn.Linear(cin, cout)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(self.bn(x))

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn, lin = self.bn, self.linear
        s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (Cin,)
        shift = bn.bias.double() - bn.running_mean.double() * s
        w = lin.weight.double()
        fused = nn.Linear(
            lin.in_features, lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype
        )
        fused.weight.copy_(w * s[None, :])
        fused.bias.copy_(w @ shift + lin.bias.double())
        return fused


class FFN(nn.Module):
    """1x1 conv (x2 expansion) + ReLU + 1x1 conv, BN after each; the last BN starts at zero."""

    def __init__(self, dim):
        super().__init__()
        self.pw1 = ConvBN(dim, 2 * dim)
        self.pw2 = ConvBN(2 * dim, dim, bn_init=0.0)

    def forward(self, x):
        return self.pw2(F.relu(self.pw1(x)))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean_hw(x))))), 1x1 convs with bias."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = F.relu(self.fc1(x.mean((2, 3), keepdim=True)))  # (B, R, 1, 1)
        return x * torch.sigmoid(self.fc2(s))


def _se_channels(c: int, divisor: int = 8) -> int:
    """SE width for ratio 1/4, rounded to the nearest multiple of 8 (at least 8)."""
    return max(divisor, int(c / 4 + divisor / 2) // divisor * divisor)


class PatchMerging(nn.Module):
    """(B, C, H, W) -> (B, C', ceil(H/2), ceil(W/2)): 1x1 up x4, 3x3 depthwise stride 2, SE, 1x1."""

    def __init__(self, dim, out_dim):
        super().__init__()
        hid = 4 * dim
        self.conv1 = ConvBN(dim, hid)
        self.conv2 = ConvBN(hid, hid, 3, stride=2, groups=hid)
        self.se = SqueezeExcite(hid, _se_channels(hid))
        self.conv3 = ConvBN(hid, out_dim)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.conv3(self.se(x))


class Downsample(nn.Module):
    """Between stages: residual dw conv + FFN, patch merging (stride 2), residual dw conv + FFN."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.pre_dw = ConvBN(dim, dim, 3, groups=dim)
        self.pre_ffn = FFN(dim)
        self.merge = PatchMerging(dim, out_dim)
        self.post_dw = ConvBN(out_dim, out_dim, 3, groups=out_dim)
        self.post_ffn = FFN(out_dim)

    def forward(self, x):
        x = x + self.pre_dw(x)
        x = x + self.pre_ffn(x)
        x = self.merge(x)
        x = x + self.post_dw(x)
        return x + self.post_ffn(x)


def relative_offset_index(window: int) -> torch.Tensor:
    """(N, N) long, N = window**2: index |dy| * window + |dx| of the offset between two tokens."""
    yy, xx = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    y, x = yy.reshape(-1), xx.reshape(-1)
    return (y[:, None] - y[None, :]).abs() * window + (x[:, None] - x[None, :]).abs()


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, int, int]:
    """(B, C, H, W) -> (B * nH * nW, C, ws, ws), zero-padded at the bottom/right; and nH, nW."""
    b, c, h, w = x.shape
    ph, pw = -h % ws, -w % ws
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    nh, nw = (h + ph) // ws, (w + pw) // ws
    x = x.view(b, c, nh, ws, nw, ws).permute(0, 2, 4, 1, 3, 5)  # (B, nH, nW, C, ws, ws)
    return x.reshape(b * nh * nw, c, ws, ws), nh, nw


def window_reverse(x: torch.Tensor, b: int, nh: int, nw: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nH * nW, C, ws, ws) -> (B, C, h, w)."""
    c, ws = x.shape[1], x.shape[-1]
    x = x.view(b, nh, nw, c, ws, ws).permute(0, 3, 1, 4, 2, 5).reshape(b, c, nh * ws, nw * ws)
    return x[:, :, :h, :w]


class CascadedGroupAttention(nn.Module):
    """Windowed cascaded group attention: (B, C, H, W) -> (B, C, H, W).

    Head i: feat_i = split_i(x) + out_{i-1} (feat_0 = split_0); q, k, v = qkv_i(feat_i);
    q = q_dw_i(q); out_i = softmax(q k^T / sqrt(key_dim) + bias_i) v, through ``attention``.
    Output: proj(relu(concat_i out_i)).
    """

    def __init__(self, dim, heads, key_dim, window, kernels, attention):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed dim {dim} is not divisible by {heads} heads")
        self.heads, self.key_dim, self.window = heads, key_dim, window
        self.val_dim = dim // heads  # head i's output is added to split i+1: same width
        self.scale = key_dim**-0.5
        self.neighborhood = is_neighborhood(attention)
        if self.neighborhood and window > 1:  # 2-D NA over the whole map, window x window
            attention = ops.build(attention.name, **{**attention.options, "kernel_size": window})
        self.attention = attention
        self.qkv = nn.ModuleList(
            ConvBN(dim // heads, 2 * key_dim + self.val_dim) for _ in range(heads)
        )
        self.q_dw = nn.ModuleList(
            ConvBN(key_dim, key_dim, kernels[i], groups=key_dim) for i in range(heads)
        )
        self.proj = ConvBN(self.val_dim * heads, dim, bn_init=0.0)
        if self.neighborhood:  # NA backends take no bias: the dw convs carry the positions
            self.attn_bias = None
        else:
            self.attn_bias = nn.Parameter(torch.zeros(heads, window * window))  # |dy|, |dx|
            self.register_buffer("bias_idx", relative_offset_index(window), persistent=False)

    def enable_fused(self) -> bool:
        """Run this layer through the fused Triton kernel (``ops/cascaded.py``) where it can:
        an inference copy (BN folded: the 1x1 and depthwise convs carry biases), windowed
        attention with biases (not the neighborhood variant), a window up to 8 and a
        power-of-two key_dim >= 16. Returns whether it will. The weights are packed for the
        kernel at the first call per dtype and device: call this again after changing them."""
        from ops import cascaded

        ok = (
            not self.neighborhood
            and cascaded.triton is not None
            and isinstance(self.qkv[0], nn.Conv2d)
            and all(isinstance(m, nn.Conv2d) and m.bias is not None for m in self.q_dw)
            and self.window <= cascaded.MAX_WINDOW
            and self.heads <= cascaded.MAX_HEADS
            and self.key_dim >= 16
            and not self.key_dim & (self.key_dim - 1)
            and all(m.kernel_size[0] % 2 for m in self.q_dw)
        )
        self._fused = {} if ok else None
        return ok

    def _fused_ready(self, x) -> bool:
        fused = getattr(self, "_fused", None)
        if fused is None or self.training or x.dtype == torch.float64:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.attn_bias.requires_grad):
            return False  # the kernel has no backward
        return ops.kernels_run_on(x)

    def _forward_fused(self, x):
        from ops import cascaded

        key = (x.dtype, x.device)
        packed = self._fused.get(key)
        if packed is None:
            with torch.no_grad():
                packed = cascaded.pack_weights(
                    [m.weight for m in self.qkv], [m.bias for m in self.qkv],
                    [m.weight for m in self.q_dw], [m.bias for m in self.q_dw],
                    self.attn_bias[:, self.bias_idx], self.key_dim, self.window, x.dtype,
                    x.device,
                )  # fmt: skip
            self._fused[key] = packed
        return self.proj(cascaded.cascaded_group_attention(x, packed, self.scale))

    def forward(self, x):
        if self.neighborhood:
            return self._forward_neighborhood(x)
        if self._fused_ready(x):
            return self._forward_fused(x)
        b, c, h, w = x.shape
        ws = self.window
        windowed = (h, w) != (ws, ws)
        if windowed:
            x, nh, nw = window_partition(x, ws)  # (B', C, ws, ws), B' = B * nH * nW
        bw = x.shape[0]
        kd, vd = self.key_dim, self.val_dim
        bias = self.attn_bias[:, self.bias_idx]  # (heads, N, N)
        splits = x.chunk(self.heads, dim=1)
        outs, feat = [], splits[0]
        for i in range(self.heads):
            if i > 0:
                feat = feat + splits[i]
            q, k, v = self.qkv[i](feat).split([kd, kd, vd], dim=1)  # (B', D|Dv, ws, ws)
            q = self.q_dw[i](q)
            q = q.flatten(2).transpose(1, 2).unsqueeze(2)  # (B', N, 1, D)
            k = k.flatten(2).transpose(1, 2).unsqueeze(2)  # (B', N, 1, D)
            v = v.flatten(2).transpose(1, 2).unsqueeze(2)  # (B', N, 1, Dv)
            o = self.attention(q, k, v, scale=self.scale, bias=bias[i][None, None])
            feat = o.squeeze(2).transpose(1, 2).reshape(bw, vd, ws, ws)  # (B', Dv, ws, ws)
            outs.append(feat)
        y = self.proj(F.relu(torch.cat(outs, dim=1)))  # (B', C, ws, ws)
        if windowed:
            y = window_reverse(y, b, nh, nw, h, w)
        return y

    def _forward_neighborhood(self, x):
        """The attn=neighborhood variant: each head attends over a window x window
        neighbourhood of every token of the whole (H, W) map (2-D NA, NATTEN semantics: shifted
        at the borders, no padding), no partition and no attention bias. q, k, v go in as
        (B, H, W, 1, Dp), zero-padded to one power-of-two width Dp (zeros change no score q.k
        and give output columns that are cut off), the scale staying key_dim ** -0.5."""
        b, c, h, w = x.shape
        kd, vd = self.key_dim, self.val_dim
        dp = max(16, 1 << (max(kd, vd) - 1).bit_length())

        def tokens(z):  # (B, d, H, W) -> (B, H, W, 1, Dp)
            return F.pad(z.permute(0, 2, 3, 1), (0, dp - z.shape[1])).unsqueeze(3)

        splits = x.chunk(self.heads, dim=1)
        outs, feat = [], splits[0]
        for i in range(self.heads):
            if i > 0:
                feat = feat + splits[i]
            q, k, v = self.qkv[i](feat).split([kd, kd, vd], dim=1)
            q = self.q_dw[i](q)
            if self.window > 1:
                o = self.attention(tokens(q), tokens(k), tokens(v), scale=self.scale)
                feat = o[..., 0, :vd].permute(0, 3, 1, 2)  # (B, Dv, H, W)
            else:  # a 1x1 map: one key, the token itself (NA needs kernels >= 2): the
                # softmax over that single score is 1, computed so that q and k stay in the
                # graph (zero gradients, as the other backends give, and no unused parameters
                # under DDP)
                score = (q * k).sum(1, keepdim=True) * self.scale  # (B, 1, 1, 1)
                feat = torch.softmax(score.unsqueeze(-1), dim=-1).squeeze(-1) * v
            outs.append(feat)
        return self.proj(F.relu(torch.cat(outs, dim=1)))


class Block(nn.Module):
    """Sandwich block: dw conv, FFN, cascaded group attention, dw conv, FFN (all residual)."""

    def __init__(self, dim, heads, key_dim, window, kernels, attention):
        super().__init__()
        self.dw0 = ConvBN(dim, dim, 3, groups=dim, bn_init=0.0)
        self.ffn0 = FFN(dim)
        self.attn = CascadedGroupAttention(dim, heads, key_dim, window, kernels, attention)
        self.dw1 = ConvBN(dim, dim, 3, groups=dim, bn_init=0.0)
        self.ffn1 = FFN(dim)

    def forward(self, x):
        x = x + self.dw0(x)
        x = x + self.ffn0(x)
        x = x + self.attn(x)
        x = x + self.dw1(x)
        return x + self.ffn1(x)


class Stage(nn.Module):
    def __init__(self, in_dim, dim, depth, heads, key_dim, window, kernels, attention):
        super().__init__()
        self.down = Downsample(in_dim, dim) if in_dim is not None else None
        self.blocks = nn.ModuleList(
            Block(dim, heads, key_dim, window, kernels, attention) for _ in range(depth)
        )

    def forward(self, x):
        if self.down is not None:
            x = self.down(x)
        for block in self.blocks:
            x = block(x)
        return x


# ---------------------------------------------------------------------------------------------
# the model


class EfficientViT(nn.Module):
    """EfficientViT-M0..M5: ``forward(images (B, C, H, W)) -> logits (B, num_classes)``.

    H and W must be multiples of 16; windows are sized for ``cfg.img_size`` (other sizes run
    with those windows, padded as needed).
    """

    def __init__(self, cfg: EfficientViTConfig, attention):
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        dims, depths, heads, kernels = VARIANTS[cfg.variant]
        check = getattr(attention, "check", None)
        if is_neighborhood(attention):  # the bias-free 2-D variant (CascadedGroupAttention)
            check(n_heads=1, n_kv_heads=1, token_ndim=2)
        elif check is not None:  # refuse a backend without bias / this head dim before building
            check(head_dim=cfg.key_dim, n_heads=1, n_kv_heads=1, bias=True, causal=False)
        self.stem = nn.Sequential(
            OrderedDict(
                conv1=ConvBN(cfg.in_chans, dims[0] // 8, 3, stride=2),
                act1=nn.ReLU(),
                conv2=ConvBN(dims[0] // 8, dims[0] // 4, 3, stride=2),
                act2=nn.ReLU(),
                conv3=ConvBN(dims[0] // 4, dims[0] // 2, 3, stride=2),
                act3=nn.ReLU(),
                conv4=ConvBN(dims[0] // 2, dims[0], 3, stride=2),
            )
        )
        geometry = stage_geometry(cfg)
        self.stages = nn.ModuleList(
            Stage(
                dims[i - 1] if i > 0 else None,
                dims[i],
                depths[i],
                heads[i],
                cfg.key_dim,
                geometry[i][1],
                kernels,
                attention,
            )
            for i in range(3)
        )
        self.head = BNLinear(dims[-1], cfg.num_classes)
        self._flops: float | None = None
        if cfg.pretrained:
            load_pretrained(self, cfg.pretrained)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W), H and W multiples of 16 -> logits (B, num_classes)."""
        self._check_images(images)
        x = self.stem(images)  # (B, C0, H/16, W/16)
        for stage in self.stages:
            x = stage(x)  # (B, C_i, ., .)
        return self.head(x.mean((2, 3)))  # (B, num_classes)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"EfficientViT expects images (B, {self.cfg.in_chans}, H, W) "
                f"(model.in_chans={self.cfg.in_chans}); got {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h % PATCH or w % PATCH:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of {PATCH} (the stem's four stride-2 "
                f"convolutions); the model was built for {self.cfg.img_size}x{self.cfg.img_size}"
            )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names the paper's recipe keeps out of weight decay (attention biases)."""
        return {n for n, _ in self.named_parameters() if n.endswith("attn_bias")}

    def num_params(self) -> int:
        """Number of parameters (equal to timm's efficientvit_mX at the same img_size)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> float:
        """Forward FLOPs of one ``img_size`` image, 2 x multiply-accumulates.

        Counted by ``torch.utils.flop_counter`` on a meta-device copy (no memory, no compute):
        convolutions, the classifier and the attention matmuls (q k^T and p v, padded windows
        included); elementwise work (BN, ReLU, softmax, SE gating, residual adds) is not counted,
        as in the paper, whose "FLOPs" are MACs (M0: 79M MACs = ~158M FLOPs here).
        """
        if self._flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            cfg = dataclasses.replace(self.cfg, pretrained=None)
            with torch.device("meta"):
                model = EfficientViT(cfg, ops.build("reference")).eval()
                x = torch.empty(1, cfg.in_chans, cfg.img_size, cfg.img_size)
            with FlopCounterMode(display=False) as counter:
                model(x)
            self._flops = float(counter.get_total_flops())
        return self._flops

    @torch.no_grad()
    def fuse_bn(self, fused_attention: bool = True, channels_last: bool = True) -> EfficientViT:
        """An inference copy (eval mode) with every Conv+BN and BN+Linear folded into one layer.

        Same eval-mode outputs (folding in float64); the original model is left unchanged.
        Fused models have no BatchNorm left, so they are for inference only (and their state dict
        is not timm's layout). ``fused_attention``: each windowed CGA layer runs as one Triton
        kernel (``ops/cascaded.py``) on CUDA without autograd, instead of ~10 PyTorch/cuDNN
        kernels a head, and so does the stem's first conv + ReLU (``ops/conv_stem.py``).
        ``channels_last``: the weights go channels_last, so convolutions take and give NHWC
        activations (cuDNN's tensor-core layout; NCHW inputs are converted by the
        first convolution); outputs are unchanged.
        """
        memo = {id(m.attention): m.attention for m in self.modules() if hasattr(m, "attention")}
        fused = fold_bn_(copy.deepcopy(self, memo).eval())
        if fused_attention:
            fused.stem.conv1, fused.stem.act1 = StemConvReLU(fused.stem.conv1), nn.Identity()
            for module in fused.modules():
                if isinstance(module, CascadedGroupAttention):
                    module.enable_fused()
        if channels_last:
            fused = fused.to(memory_format=torch.channels_last)
        return fused


# ---------------------------------------------------------------------------------------------
# timm state dicts and checkpoints

# (ours, timm) key fragments, applied in order to "." + key + "."; each direction is a rename
_RENAMES = (
    (".stem.", ".patch_embed."),
    (".down.pre_dw.", ".downsample.res1.0.m."),
    (".down.pre_ffn.", ".downsample.res1.1.m."),
    (".down.merge.", ".downsample.patchmerge."),
    (".down.post_dw.", ".downsample.res2.0.m."),
    (".down.post_ffn.", ".downsample.res2.1.m."),
    (".dw0.", ".dw0.m."),
    (".ffn0.", ".ffn0.m."),
    (".dw1.", ".dw1.m."),
    (".ffn1.", ".ffn1.m."),
    (".attn.", ".mixer.m.attn."),
    (".qkv.", ".qkvs."),
    (".q_dw.", ".dws."),
    (".proj.", ".proj.1."),
    (".attn_bias.", ".attention_biases."),
)


def _rename(key: str, to_timm: bool) -> str:
    k = f".{key}."
    for ours, timm in _RENAMES:
        k = k.replace(ours, timm) if to_timm else k.replace(timm, ours)
    return k[1:-1]


def from_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``efficientvit_mX`` state dict -> ours (derived ``attention_bias_idxs`` dropped)."""
    return {_rename(k, False): v for k, v in sd.items() if not k.endswith("attention_bias_idxs")}


def to_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> timm ``efficientvit_mX`` layout (loads with ``strict=True``)."""
    return {_rename(k, True): v for k, v in sd.items()}


def _resize_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """(heads, w0*w0) -> (heads, window*window), bicubic as timm/LeViT do for other windows."""
    heads, n0 = table.shape
    w0 = math.isqrt(n0)
    grid = table.float().view(1, heads, w0, w0)
    out = F.interpolate(grid, size=(window, window), mode="bicubic", antialias=True)
    return out.view(heads, window * window).to(table.dtype)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file: a plain one or ``{"model": sd}`` /
    ``{"state_dict": sd}``, a DDP ``module.`` prefix removed; ValueError if there is none."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(
            f"{path}: not a state dict (expected a dict of tensors, or {{'model': ...}} / "
            "{'state_dict': ...})"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(model: EfficientViT, path: str) -> None:
    """Load a timm ``efficientvit_mX`` checkpoint file (or one of ours) into ``model``.

    Accepts a plain state dict or ``{"model": sd}`` / ``{"state_dict": sd}``, with or without a
    DDP ``module.`` prefix. Attention-bias tables of another window size (a checkpoint trained
    at another image size) are resized bicubically, as timm does. Mismatched keys raise.
    """
    sd = _read_state_dict(path)
    if any(k.startswith("patch_embed.") for k in sd):
        sd = from_timm_state_dict(sd)
    own = model.state_dict()
    for k, v in sd.items():
        if k.endswith("attn_bias") and k in own and v.shape != own[k].shape:
            sd[k] = _resize_bias_table(v, math.isqrt(own[k].shape[1]))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{path} does not fit EfficientViT-{model.cfg.variant.upper()} "
            f"(num_classes={model.cfg.num_classes}): {e}"
        ) from None


class TimmEfficientViT(nn.Module):
    """timm's ``efficientvit_mX`` in our trainer (``model.impl=timm``): the published reference
    implementation, trained and evaluated through the same loop, data and recipe as ours, so
    that speed or accuracy can be compared with nothing else changed. Same ``forward``, input
    checks, parameter count, FLOPs and weight-decay exclusions as :class:`EfficientViT`; its
    attention is timm's own (``attn`` must stay ``sdpa``, the default); a checkpoint in
    ``model.pretrained`` loads as timm's state dict."""

    def __init__(self, cfg: EfficientViTConfig):
        super().__init__()
        import timm

        validate_config(cfg)
        self.cfg, self._flops = cfg, None
        w = cfg.window
        self.net = timm.create_model(
            f"efficientvit_{cfg.variant}", pretrained=False, num_classes=cfg.num_classes,
            img_size=cfg.img_size, in_chans=cfg.in_chans, key_dim=(cfg.key_dim,) * 3,
            window_size=(w, w, w),
        )  # fmt: skip
        if cfg.pretrained:
            self.net.load_state_dict(_read_state_dict(cfg.pretrained))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        EfficientViT._check_images(self, images)
        return self.net(images)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("attention_biases")}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> float:
        """Our count for the same architecture (:meth:`EfficientViT.flops_per_image`)."""
        return EfficientViT.flops_per_image(self)


def build_efficientvit(cfg: EfficientViTConfig, attention, pos_cfg=None) -> nn.Module:
    """The ``models.FAMILIES`` builder: positions must be ``none`` (the model has its own)."""
    pos_name = getattr(pos_cfg, "name", "none")
    if pos_name != "none":
        raise ValueError(
            "efficientvit uses its own relative-position attention biases; set pos=none "
            f"(got pos={pos_name})"
        )
    if ops.simplicial_plan(attention) is not None:
        raise ValueError(
            "efficientvit does not take attn=simplicial: 2-simplicial attention is built for "
            "causal sequence models (model.family gpt2 or llm)"
        )
    if cfg.impl == "timm":
        if getattr(attention, "name", "sdpa") != "sdpa":
            raise ValueError(
                f"model.impl=timm runs timm's own attention; attn={attention.name} would be "
                "ignored: use attn=sdpa (the default) or model.impl=ours"
            )
        return TimmEfficientViT(cfg)
    return EfficientViT(cfg, attention)
