"""Positional encodings, applied before the attention backend (backends never see positions).

Additive encodings (``learned``, ``sinusoidal``) are added to the token embeddings once;
rotary encodings (``rope``, ``carope``) rotate q and k inside every attention layer; ``none``
does neither. All rotaries use the half-split pairing: dims (i, i + D/2) form pair i.

CARoPE (Context-aware Rotary Position Embedding): each layer computes a head-specific,
token-dependent base frequency ``f(x_t)_h = 1 / (softplus(x_t W + b)_h + 1)`` and gives rotary
pair i at position m the phase ``sum_{t<=m} f(x_t)_h ** i`` (a causal cumulative sum, in fp32).
With W = 0 and ``b = softplus^-1(base^(2/D) - 1)`` every token gets ``f = base^(-2/D)``, so
``f ** i = base^(-2i/D)`` = RoPE's frequency of pair i, and the phase is ``(m+1) * theta_i``:
RoPE with positions counted from one. Attention scores depend only on phase differences, so the
model equals the RoPE model exactly at initialisation (tested).

Choices the paper leaves open are options: ``carope_input`` (``layer``: this layer's normalised
input, the default; ``embedding``: the token embedding), ``carope_shared`` (one W for all layers)
and ``carope_bias``. ``carope_proj`` sets the precision of the frequency projection x_t W + b:
``autocast`` (default) follows autocast like every other linear layer (a bf16 GEMM under bf16
autocast, fp32 otherwise), ``fp32`` computes it in fp32 always. The bias and the phase
arithmetic (powers, the cumulative sum, cos/sin) are fp32 in both. Under bf16 autocast the
bf16 GEMM saves an fp32 copy of the normalised input a layer, forward and backward
(docs/benchmarks.md, with a short training check of both settings). Under grouped-query
attention W has one column per k/v head and the q heads of a group share its phase (a rotation
must be the same for a q head and the k head it reads).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ops import rotary as rotary_ops

POSITIONS = ("none", "learned", "sinusoidal", "rope", "carope")
KERNELS = ("auto", "torch", "triton")
CAROPE_INPUTS = ("layer", "embedding")
CAROPE_PROJ = ("autocast", "fp32")


@dataclasses.dataclass
class PosConfig:
    name: str = "carope"  # none | learned | sinusoidal | rope | carope
    base: float = 10000.0  # rotary / sinusoidal base
    carope_input: str = "layer"  # layer | embedding
    carope_shared: bool = False  # one W (d_model, n_kv_heads) for all layers
    carope_bias: bool = True  # bias b inside the softplus (needed for RoPE equality at init)
    carope_proj: str = "autocast"  # x W precision: autocast (bf16 under bf16 autocast) | fp32
    # auto (triton on CUDA, else torch) | torch | triton (ops/rotary.py: one fused pass over q, k)
    kernel: str = "auto"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) by the angles; x (B, T, Hx, D), cos/sin (B|1, T, Hc, D/2)."""
    b, t, hx, d = x.shape
    hc = cos.shape[2]
    xs = x.to(torch.promote_types(x.dtype, cos.dtype)).view(b, t, hc, hx // hc, d)  # (B,T,Hc,G,D)
    x1, x2 = xs[..., : d // 2], xs[..., d // 2 :]
    c, s = cos.unsqueeze(3), sin.unsqueeze(3)  # (B|1, T, Hc, 1, D/2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).view(b, t, hx, d).type_as(x)


class _Rotary(torch.autograd.Function):
    """Rotation with a hand-written backward: the input gradient is the inverse rotation.

    Left to autograd, the slice/cat backward compiles into a slow strided kernel (0.65 ms a
    layer for GPT-2 small at B=32, T=1024 on an H200: 10% of the step); as a rotation by -angle
    it compiles like the forward.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        angle_grad = cos.requires_grad or sin.requires_grad
        ctx.save_for_backward(x if angle_grad else None, cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        x, cos, sin = ctx.saved_tensors
        dx = _rotate(g, cos, -sin) if ctx.needs_input_grad[0] else None
        dcos = dsin = None
        if x is not None:  # d out1 = dc*x1 - ds*x2, d out2 = dc*x2 + ds*x1; sum over the group
            b, t, hx, d = x.shape
            hc = cos.shape[2]
            cdt = cos.dtype
            xs = x.to(cdt).view(b, t, hc, hx // hc, d)
            gs = g.to(cdt).view(b, t, hc, hx // hc, d)
            x1, x2, g1, g2 = (
                xs[..., : d // 2],
                xs[..., d // 2 :],
                gs[..., : d // 2],
                gs[..., d // 2 :],
            )
            dcos = (g1 * x1 + g2 * x2).sum(3).sum_to_size(cos.shape)
            dsin = (g2 * x1 - g1 * x2).sum(3).sum_to_size(sin.shape)
        return dx, dcos, dsin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x by the given angles, computing in fp32 (fp64 for fp64).

    x: (B, T, Hx, D); cos/sin: (B|1, T, Hc, D/2) with Hx % Hc == 0 (q heads share their group's
    angles). Returns x's shape and dtype.
    """
    return _Rotary.apply(x, cos, sin)


def _fused_kernel(kernel: str, x: torch.Tensor) -> bool:
    """Whether pos.kernel selects ops/rotary.py's Triton kernels for tensors like x."""
    if x.dtype == torch.float64:  # the kernels compute in fp32; float64 checks use PyTorch
        return False
    return kernel == "triton" or (kernel == "auto" and x.is_cuda and rotary_ops.available())


class NoPositions(nn.Module):
    rotary = False
    kernel_opts: dict = {}  # block_t / num_warps for the Triton rotary kernels (benchmarks)

    def additive(self, t: int, device) -> torch.Tensor | None:
        return None

    def rotate(self, q, k, *, layer: int, x: torch.Tensor, x0: torch.Tensor):
        return q, k

    def split_rotate(self, qkv, n_head: int, n_kv: int, *, layer: int, x, x0):
        """q (B, T, H, D), k, v (B, T, Hkv, D) from a fused projection (B, T, (H + 2 Hkv) D),
        q and k rotated. Encodings with a fused kernel override this (see RotaryPositions)."""
        q, k, v = rotary_ops.split_qkv(qkv, n_head, n_kv)
        q, k = self.rotate(q, k, layer=layer, x=x, x0=x0)
        return q, k, v


class LearnedPositions(NoPositions):
    """GPT-2's learned absolute position table; sequences longer than it are an error."""

    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.wpe = nn.Embedding(max_seq_len, d_model)

    def additive(self, t, device):
        if t > self.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds pos=learned's table of model.max_seq_len="
                f"{self.max_seq_len} positions; use a shorter sequence (trainer.seq_len / "
                "eval.seq_lens) or a position encoding that extrapolates (rope, carope, sinusoidal)"
            )
        return self.wpe(torch.arange(t, device=device))  # (T, C)


class SinusoidalPositions(NoPositions):
    """Fixed sinusoids of "Attention Is All You Need", computed for any length."""

    def __init__(self, d_model: int, base: float):
        super().__init__()
        self.d_model, self.base = d_model, base

    def additive(self, t, device):
        half = self.d_model // 2
        inv = self.base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
        ang = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv  # (T, C/2)
        pe = torch.zeros(t, self.d_model, device=device)
        pe[:, 0 : 2 * half : 2], pe[:, 1 : 2 * half : 2] = ang.sin(), ang.cos()
        return pe


class RotaryPositions(NoPositions):
    """RoPE: pair i at position m is rotated by m * theta_i (positions from zero).

    cos/sin come from a table computed once (in float64, stored in float32) for max_seq_len
    positions, so a compiled step reads them instead of evaluating pow/sin/cos for every
    element of q and k (that recomputation made a compiled step 30% slower on an H100).
    Longer sequences (length extrapolation at eval) and float64 models compute them afresh.
    """

    rotary = True

    def __init__(self, head_dim: int, base: float, max_seq_len: int = 1024, kernel: str = "torch"):
        super().__init__()
        self.half, self.base, self.kernel = head_dim // 2, base, kernel
        cos, sin = self._table(max_seq_len, "cpu", torch.float64)
        self.register_buffer("cos_table", cos.float(), persistent=False)
        self.register_buffer("sin_table", sin.float(), persistent=False)

    def _table(self, t, device, dtype):
        if torch.device(device).type == "meta":
            z = torch.empty(t, self.half, device=device, dtype=dtype)
            return z, z
        pos = torch.arange(t, device=device, dtype=torch.float64)
        i = torch.arange(self.half, device=device, dtype=torch.float64)
        phase = pos[:, None] * self.base ** (-i / self.half)  # (T, D/2): m * theta_i
        return phase.cos().to(dtype), phase.sin().to(dtype)

    def angles(self, t: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of m * theta_i as (1, T, 1, D/2)."""
        if t <= self.cos_table.shape[0] and dtype != torch.float64:
            cos, sin = self.cos_table[:t], self.sin_table[:t]
        else:
            cos, sin = self._table(t, device, dtype)
        return cos[None, :, None], sin[None, :, None]

    def rotate(self, q, k, *, layer, x, x0):
        cos, sin = self.angles(q.shape[1], q.device, torch.promote_types(q.dtype, torch.float32))
        if _fused_kernel(self.kernel, q):
            return rotary_ops.rope_qk(q, k, cos, sin)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def split_rotate(self, qkv, n_head, n_kv, *, layer, x, x0):
        if _fused_kernel(self.kernel, qkv):
            # one kernel rotates q and k; its backward writes the fused qkv gradient directly
            cos, sin = self.angles(qkv.shape[1], qkv.device)
            return rotary_ops.rope_qkv(qkv, cos, sin, n_head, n_kv, **self.kernel_opts)
        return super().split_rotate(qkv, n_head, n_kv, layer=layer, x=x, x0=x0)


@torch.library.custom_op("attnlab::cos_sin", mutates_args=())
def cos_sin(phase: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin as one opaque op, so that torch.compile materialises them once per layer
    instead of re-evaluating both for every element of q and k (and again in backward)."""
    return phase.cos(), phase.sin()


@cos_sin.register_fake
def _(phase):
    return torch.empty_like(phase), torch.empty_like(phase)


def _cos_sin_setup(ctx, inputs, output):
    ctx.save_for_backward(*output)


def _cos_sin_backward(ctx, grad_cos, grad_sin):
    cos, sin = ctx.saved_tensors
    grad = torch.zeros_like(cos)
    if grad_sin is not None:
        grad = grad + grad_sin * cos
    if grad_cos is not None:
        grad = grad - grad_cos * sin
    return grad


cos_sin.register_autograd(_cos_sin_backward, setup_context=_cos_sin_setup)


class CARoPE(NoPositions):
    """Context-aware RoPE (see module docstring)."""

    rotary = True

    def __init__(self, cfg: PosConfig, *, d_model, n_kv_heads, head_dim, n_layers):
        super().__init__()
        if cfg.carope_input not in CAROPE_INPUTS:
            raise ValueError(
                f"pos.carope_input={cfg.carope_input!r}; valid: {', '.join(CAROPE_INPUTS)}"
            )
        if cfg.carope_proj not in CAROPE_PROJ:
            raise ValueError(
                f"pos.carope_proj={cfg.carope_proj!r}; valid: {', '.join(CAROPE_PROJ)}"
            )
        self.input, self.head_dim, self.base = cfg.carope_input, head_dim, cfg.base
        self.proj_fp32 = cfg.carope_proj == "fp32"
        self.kernel = cfg.kernel
        n_proj = 1 if cfg.carope_shared else n_layers
        self.proj = nn.ModuleList(
            nn.Linear(d_model, n_kv_heads, bias=cfg.carope_bias) for _ in range(n_proj)
        )
        self.register_buffer(
            "pair_index", torch.arange(head_dim // 2, dtype=torch.float32), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self):
        # W = 0 and f = base^(-2/D): softplus(b) = base^(2/D) - 1  =>  b = log(expm1(that)).
        target = self.base ** (2.0 / self.head_dim) - 1.0
        for p in self.proj:
            nn.init.zeros_(p.weight)
            if p.bias is not None:
                nn.init.constant_(p.bias, math.log(math.expm1(target)))

    def log_frequencies(self, layer: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """log f(x_t)_h = -log(softplus(x_t W + b) + 1), (B, T, Hkv) in fp32 (fp64 for fp64);
        x_t W + b as ``carope_proj`` says (autocast's dtype, or fp32)."""
        proj = self.proj[layer % len(self.proj)]
        src = x if self.input == "layer" else x0
        cdt = torch.promote_types(src.dtype, torch.float32)
        if self.proj_fp32:  # fp32 under bf16 autocast too
            with torch.autocast(src.device.type, enabled=False):
                z = F.linear(src.to(cdt), proj.weight.to(cdt))  # (B, T, Hkv)
        else:
            z = F.linear(src, proj.weight)  # autocast's dtype where it is on
        with torch.autocast(src.device.type, enabled=False):
            z = z.to(cdt)
            if proj.bias is not None:  # in fp32: the init's RoPE frequencies stay exact
                z = z + proj.bias.to(cdt)
            return -torch.log1p(F.softplus(z))

    def phases(self, layer: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Per-token phases, (B, T, Hkv, D/2) float32."""
        log_f = self.log_frequencies(layer, x, x0)
        with torch.autocast(x.device.type, enabled=False):
            powers = torch.exp(log_f.unsqueeze(-1) * self.pair_index.to(log_f.dtype))  # f**i
            return torch.cumsum(powers, dim=1)  # causal sum over t <= m

    def rotate(self, q, k, *, layer, x, x0):
        if _fused_kernel(self.kernel, q):
            return rotary_ops.carope_qk(q, k, self.log_frequencies(layer, x, x0).float())
        cos, sin = cos_sin(self.phases(layer, x, x0))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def split_rotate(self, qkv, n_head, n_kv, *, layer, x, x0):
        if _fused_kernel(self.kernel, qkv):  # backward writes the fused qkv gradient directly
            log_f = self.log_frequencies(layer, x, x0).float()
            return rotary_ops.carope_qkv(qkv, log_f, n_head, n_kv, **self.kernel_opts)
        return super().split_rotate(qkv, n_head, n_kv, layer=layer, x=x, x0=x0)


def build_positions(cfg: PosConfig, *, d_model, n_heads, n_kv_heads, n_layers, max_seq_len):
    """Instantiate the encoding named by ``cfg.name``; ValueError on unknown names/shapes."""
    head_dim = d_model // n_heads
    if cfg.name not in POSITIONS:
        raise ValueError(
            f"unknown position encoding pos.name={cfg.name!r}; valid: {', '.join(POSITIONS)}"
        )
    if cfg.kernel not in KERNELS:
        raise ValueError(f"pos.kernel={cfg.kernel!r}; valid: {', '.join(KERNELS)}")
    if cfg.name in ("rope", "carope") and head_dim % 2:
        raise ValueError(f"pos={cfg.name} needs an even head dim; got {head_dim} (d_model/n_head)")
    if cfg.name == "none":
        return NoPositions()
    if cfg.name == "learned":
        return LearnedPositions(max_seq_len, d_model)
    if cfg.name == "sinusoidal":
        return SinusoidalPositions(d_model, cfg.base)
    if cfg.name == "rope":
        return RotaryPositions(head_dim, cfg.base, max_seq_len, cfg.kernel)
    return CARoPE(cfg, d_model=d_model, n_kv_heads=n_kv_heads, head_dim=head_dim, n_layers=n_layers)
