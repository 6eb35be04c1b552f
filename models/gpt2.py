"""GPT-2 with an injected attention backend and positional encoding.

nanoGPT-shaped: pre-LayerNorm blocks, GELU MLP, tied token embedding / LM head. Attention runs
through the ``ops`` contract in the heads-last layout, so q/k/v are plain views of the fused
projection. Positions come from ``models.positions`` (additive ones once at the bottom, rotary
ones inside every attention layer). The loss (``model.loss``) is either the plain expression
over materialised logits or ``ops.linear_cross_entropy``, which never holds more than a chunk of
them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import ops
from ops import cross_entropy as ce_ops

from .positions import PosConfig, build_positions
from .simplicial import SimplicialSelfAttention

LOSSES = ("auto", "torch", "fused")
RESIDUALS = ("float32", "autocast")


@dataclasses.dataclass
class GPT2Config:
    name: str = "gpt2_nano"
    family: str = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head (multi-head); fewer: GQA / MQA
    d_model: int = 128
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 (faster matmuls)
    max_seq_len: int = 1024  # size of the learned position table
    dropout: float = 0.0
    bias: bool = True
    mlp_ratio: int = 4
    # LM-head loss: "torch" materialises the (B*T, V) logits, "fused" is ops.linear_cross_entropy
    # (chunked, gradient in forward), "auto" = fused where the logits are on CUDA and triton imports
    loss: str = "auto"
    # The residual stream's dtype under autocast. "float32" (default): the embeddings and every
    # residual add stay float32, as in nanoGPT. "autocast": the stream is cast once to the
    # autocast dtype (bf16/fp16) after the embeddings, halving its memory traffic; every add
    # then rounds to that dtype, so the arithmetic differs. Without autocast both are the same.
    residual: str = "float32"


SIZES = {  # name: (n_layer, n_head, d_model)
    "nano": (4, 4, 128),
    "tiny": (6, 8, 512),  # the CARoPE paper's small model
    "small": (12, 12, 768),  # GPT-2 124M
    "medium": (24, 16, 1024),  # GPT-2 350M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config, attention):
        super().__init__()
        self.n_head, self.n_kv = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        qkv_out = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.proj.residual_scale = True  # GPT-2 init: scaled by 1/sqrt(2 * n_layer)
        self.attention = attention
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, *, pos, layer, x0):
        b, t, _ = x.shape
        hd = self.head_dim
        # q (B, T, H, D), k and v (B, T, Hkv, D); q and k rotated by rotary encodings
        q, k, v = pos.split_rotate(self.qkv(x), self.n_head, self.n_kv, layer=layer, x=x, x0=x0)
        y = self.attention(q, k, v, causal=True)  # (B, T, H, D)
        return self.dropout(self.proj(y.reshape(b, t, self.n_head * hd)))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual_scale = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, attention, simplicial=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        if simplicial is not None:  # attn=simplicial on this layer: its plan (models/simplicial)
            n_kv = cfg.n_kv_head or cfg.n_head
            self.attn = SimplicialSelfAttention(cfg.d_model, cfg.n_head, n_kv,
                                                cfg.d_model // cfg.n_head, attention, simplicial,
                                                cfg.bias)  # fmt: skip
        else:
            self.attn = CausalSelfAttention(cfg, attention)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, *, pos, layer, x0):
        x = x + self.attn(self.ln_1(x), pos=pos, layer=layer, x0=x0)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config, attention, pos_cfg: PosConfig):
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        n_kv = cfg.n_kv_head or cfg.n_head
        attention.check(
            head_dim=cfg.d_model // cfg.n_head, n_heads=cfg.n_head, n_kv_heads=n_kv, causal=True
        )
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = build_positions(
            pos_cfg,
            d_model=cfg.d_model,
            n_heads=cfg.n_head,
            n_kv_heads=n_kv,
            n_layers=cfg.n_layer,
            max_seq_len=cfg.max_seq_len,
        )
        self.drop = nn.Dropout(cfg.dropout)
        plan = ops.simplicial_plan(attention)  # attn=simplicial: every k-th layer 2-simplicial
        if plan is not None:  # the 2-simplicial layers' own limits (head dim, GQA, windows)
            plan.simplicial.check(head_dim=cfg.d_model // cfg.n_head, n_heads=cfg.n_head,
                                  n_kv_heads=n_kv, causal=True)  # fmt: skip
        self.blocks = nn.ModuleList(
            Block(cfg, attention, plan if plan is not None and plan.is_simplicial(i) else None)
            for i in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)
        if hasattr(self.pos, "reset_parameters"):
            self.pos.reset_parameters()

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if hasattr(m, "residual_scale") else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) token ids -> logits (B, T, V), or the mean cross-entropy if targets."""
        _, t = idx.shape
        x0 = self.wte(idx)  # (B, T, C)
        pe = self.pos.additive(t, idx.device)
        x = self.drop(x0 if pe is None else x0 + pe)
        dev = x.device.type
        if self.cfg.residual == "autocast" and torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        for i, block in enumerate(self.blocks):
            x = block(x, pos=self.pos, layer=i, x0=x0)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x)  # (B, T, V)
        if self._fused_loss(x):  # never materialises the (B*T, V) logits
            return ce_ops.linear_cross_entropy(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def _fused_loss(self, x: torch.Tensor) -> bool:
        """model.loss: fused (errors where the kernel cannot run), torch, or auto (fused on CUDA)."""
        if self.cfg.loss == "auto":
            return x.is_cuda and ce_ops.fused_available(x.device)
        return self.cfg.loss == "fused"

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; tied weights once; without the position table if non_embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and hasattr(self.pos, "wpe"):
            n -= self.pos.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, nanoGPT/PaLM convention: 6N + 12 * L * H * D * T."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.d_model * seq_len


def validate_config(cfg: GPT2Config) -> None:
    """Reject shapes that cannot build, naming the fields."""
    if cfg.d_model % cfg.n_head:
        raise ValueError(
            f"model.d_model={cfg.d_model} is not divisible by model.n_head={cfg.n_head}"
        )
    n_kv = cfg.n_kv_head or cfg.n_head
    if cfg.n_head % n_kv:
        raise ValueError(
            f"model.n_kv_head={n_kv} must divide model.n_head={cfg.n_head} (GQA groups)"
        )
    if cfg.loss not in LOSSES:
        raise ValueError(f"model.loss={cfg.loss!r}; valid: {', '.join(LOSSES)}")
    if cfg.residual not in RESIDUALS:
        raise ValueError(f"model.residual={cfg.residual!r}; valid: {', '.join(RESIDUALS)}")
    if cfg.vocab_size < 50257:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is below GPT-2's 50257 tokens")
