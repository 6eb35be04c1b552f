"""Long-context LLMs (``model.family=llm``): our Llama-style decoder and its configuration.

``LLM`` (``model.hf_name: null``): pre-RMSNorm blocks, SwiGLU MLP, grouped-query attention
through the ``ops`` contract (heads-last views of one fused qkv projection, like GPT-2), RoPE with
``model.rope_base`` and transformers' ``none`` / ``linear`` / ``llama3`` frequency scaling, tied or
untied embeddings. ``to_hf_state_dict`` / ``from_hf_state_dict`` / ``hf_llama_config`` /
``llm_config_from_hf`` convert to and from ``transformers.LlamaForCausalLM`` (same logits).
With ``model.hf_name`` set the family builds a pretrained transformers model instead, with our
attention on chosen layers (``models/hf.py``); both share ``LLMConfig`` and the checks here.

Positions: the RoPE is part of the architecture (the pretrained weights and the HF conversion
fix its base and scaling), so it lives in the model config, not in the ``pos`` group. ``pos=rope``
selects it (``pos.kernel`` picks the fused Triton rotation as for GPT-2), ``pos=none`` runs our
decoder without positions (NoPE); learned, sinusoidal or CARoPE would be a second encoding and
raise. ``pos.base`` is not read (set ``model.rope_base``); HF models require ``pos=rope``.

``model.swap_layers`` (both kinds): ``all``, ``none``, ``last:<l>`` (HyperAttention's recipe: the
last l layers approximate, the first ones stay exact) or a list of layer indices. Layers outside
it run exact attention (our ``sdpa`` backend, or transformers' own for HF models).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import ops
from ops import cross_entropy as ce_ops
from ops import rotary as rotary_ops

from .positions import KERNELS, PosConfig, apply_rotary
from .simplicial import SimplicialSelfAttention

LOSSES = ("auto", "torch", "fused")
ROPE_SCALINGS = ("none", "linear", "llama3")
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHAPE_FIELDS = ("n_layer", "n_head", "n_kv_head", "d_model", "head_dim", "d_ff", "vocab_size",
                 "max_seq_len", "rope_base", "rope_scaling", "rope_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor", "rope_original_max_seq_len", "norm_eps",
                 "tie_embeddings")  # fmt: skip


@dataclasses.dataclass
class LLMConfig:
    name: str = "llm_tiny"
    family: str = "llm"
    hf_name: str | None = None  # transformers causal LM (hub name or directory); null: our LLM
    hf_dtype: str = "float32"  # float32 | bfloat16 | float16: weights of the HF model
    swap_layers: Any = "all"  # all | none | last:<l> | [indices]: layers on attn=, others exact
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head; fewer: GQA / MQA
    d_model: int = 128
    head_dim: int | None = None  # None: d_model // n_head
    d_ff: int = 384  # SwiGLU hidden width
    vocab_size: int = 50304
    max_seq_len: int = 2048  # rows of the RoPE table (longer sequences compute angles afresh)
    rope_base: float = 10000.0
    rope_scaling: str = "none"  # none | linear (position interpolation) | llama3
    rope_factor: float = 1.0  # linear, llama3: how much longer than the original context
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_seq_len: int = 8192  # llama3: the pretraining context
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    loss: str = "auto"  # auto (fused on CUDA) | torch | fused: the LM-head cross-entropy


# ----------------------------------------------------------------------------- configuration


def validate_config(cfg: LLMConfig) -> None:
    """Reject values that cannot build, naming the option and what would be right."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"model.loss={cfg.loss!r}; valid: {', '.join(LOSSES)}")
    parse_swap_layers(cfg.swap_layers, max(cfg.n_layer, 1) if cfg.hf_name is None else None)
    if cfg.hf_name is not None:
        if not cfg.hf_name:
            raise ValueError(
                "model.hf_name is empty: give a Hugging Face hub name or a local "
                "directory (config.json + weights), e.g. model.hf_name=/models/llama"
            )
        if cfg.hf_dtype not in HF_DTYPES:
            raise ValueError(f"model.hf_dtype={cfg.hf_dtype!r}; valid: {', '.join(HF_DTYPES)}")
        default = LLMConfig()
        set_ = [f for f in _SHAPE_FIELDS if getattr(cfg, f) != getattr(default, f)]
        if set_:
            raise ValueError(
                f"model.{set_[0]} is not read when model.hf_name is set (the pretrained model's "
                "own config fixes its shape); use model=llm_hf, or model.hf_name=null for ours"
            )
        return
    n_kv = cfg.n_kv_head or cfg.n_head
    if cfg.n_head < 1 or cfg.n_head % n_kv:
        raise ValueError(f"model.n_kv_head={n_kv} must divide model.n_head={cfg.n_head} (GQA)")
    if cfg.head_dim is None and cfg.d_model % cfg.n_head:
        raise ValueError(
            f"model.d_model={cfg.d_model} is not divisible by model.n_head={cfg.n_head}; "
            "change one, or set model.head_dim"
        )
    if _head_dim(cfg) % 2:
        raise ValueError(f"RoPE needs an even head dim; got {_head_dim(cfg)} (model.head_dim)")
    if cfg.rope_scaling not in ROPE_SCALINGS:
        raise ValueError(f"model.rope_scaling={cfg.rope_scaling!r}; valid: none, linear, llama3")
    if cfg.rope_factor <= 0:
        raise ValueError(f"model.rope_factor={cfg.rope_factor} must be positive")
    if (
        cfg.rope_scaling == "llama3"
        and not 0 < cfg.rope_low_freq_factor < cfg.rope_high_freq_factor
    ):
        raise ValueError(
            f"model.rope_low_freq_factor={cfg.rope_low_freq_factor} must be positive and below "
            f"model.rope_high_freq_factor={cfg.rope_high_freq_factor} (llama3 scaling)"
        )
    if cfg.vocab_size < 50257:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is below GPT-2's 50257 tokens")


def check_positions(pos: PosConfig, cfg: LLMConfig) -> None:
    """The pos group may only select or drop the model's own RoPE (see the module docstring)."""
    valid = ("rope",) if cfg.hf_name is not None else ("rope", "none")
    if pos.name not in valid:
        own = (
            "the pretrained model keeps its own positions"
            if cfg.hf_name
            else ("model.family=llm applies its own RoPE (model.rope_base, model.rope_scaling)")
        )
        raise ValueError(
            f"{own}; pos={pos.name} would be a second encoding: use "
            + ("pos=rope" if cfg.hf_name else "pos=rope (the model's RoPE) or pos=none (NoPE)")
        )
    if pos.base not in (PosConfig.base, cfg.rope_base):
        where = "the pretrained model's config" if cfg.hf_name else "model.rope_base"
        raise ValueError(f"pos.base={pos.base} is not read by model.family=llm: set {where}")
    if pos.kernel not in KERNELS:
        raise ValueError(f"pos.kernel={pos.kernel!r}; valid: {', '.join(KERNELS)}")


def parse_swap_layers(spec, n_layers: int | None) -> list[int]:
    """Layer indices named by ``model.swap_layers`` (sorted); ValueError naming the option.
    With ``n_layers`` None only the form is checked."""
    n = n_layers if n_layers is not None else 1 << 30
    hint = "use all, none, last:<l> (1 <= l <= layers) or a list of layer indices"
    if isinstance(spec, str):
        if spec in ("all", "none"):
            return list(range(n_layers or 0)) if spec == "all" else []
        head, _, count = spec.partition(":")
        if head == "last" and count.isdigit() and 1 <= int(count) <= n:
            return list(range(n - int(count), n)) if n_layers is not None else []
    elif isinstance(spec, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and -n <= i < n for i in spec
    ):
        idx = sorted({i % n for i in spec}) if n_layers is not None else []
        if len(idx) == len(spec) or n_layers is None:
            return idx
    layers = "" if n_layers is None else f" for {n_layers} layers"
    raise ValueError(f"model.swap_layers={spec!r} is not valid{layers}: {hint}")


def _head_dim(cfg: LLMConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.n_head


# ----------------------------------------------------------------------------- our decoder


def rope_inv_freq(cfg: LLMConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,) in float32, computed as transformers computes them.

    ``linear`` divides every frequency by ``rope_factor`` (position interpolation); ``llama3``
    divides only the low frequencies (wavelength above original/low_freq_factor), keeps the high
    ones (below original/high_freq_factor) and blends the band between."""
    d = _head_dim(cfg)
    i = torch.arange(0, d, 2, dtype=torch.int64, device="cpu")  # cpu also under a meta build
    inv = 1.0 / (cfg.rope_base ** (i.float() / d))
    if cfg.rope_scaling == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        f, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_seq_len
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / f + smooth * scaled
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(mid, blended, scaled)
    return inv


class Rotary(nn.Module):
    """cos/sin of ``m * inv_freq`` for positions m, as a float32 table of ``max_seq_len`` rows
    (angles in float64, then rounded) so a compiled step reads them instead of recomputing them
    for every element of q and k (see models.positions.RotaryPositions)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        cos, sin = self._table(cfg.max_seq_len, "cpu", torch.float64)
        self.register_buffer("cos_table", cos.float(), persistent=False)
        self.register_buffer("sin_table", sin.float(), persistent=False)

    def _table(self, t: int, device, dtype):
        inv = self.inv_freq.to(device=device, dtype=torch.float64)
        phase = torch.arange(t, device=device, dtype=torch.float64)[:, None] * inv  # (T, D/2)
        return phase.cos().to(dtype), phase.sin().to(dtype)

    def angles(self, t: int, device, dtype=torch.float32):
        """cos, sin as (1, T, 1, D/2)."""
        if t <= self.cos_table.shape[0] and dtype != torch.float64:
            cos, sin = self.cos_table[:t], self.sin_table[:t]
        else:
            cos, sin = self._table(t, device, dtype)
        return cos[None, :, None], sin[None, :, None]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 (as Llama does), returned in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, attention):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = (
            cfg.n_head,
            cfg.n_kv_head or cfg.n_head,
            _head_dim(cfg),
        )
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=False)
        self.proj.residual_scale = True
        self.attention = attention

    def forward(self, x, rope, fused_rope: bool):
        b, t, _ = x.shape
        qkv = self.qkv(x)  # (B, T, (H + 2 Hkv) D) = [q heads | k heads | v heads]
        if rope is not None and fused_rope:  # backward writes the qkv gradient in one launch
            q, k, v = rotary_ops.rope_qkv(qkv, *rope, self.n_head, self.n_kv)
        else:
            q, k, v = rotary_ops.split_qkv(qkv, self.n_head, self.n_kv)  # (B, T, H|Hkv, D) views
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = self.attention(q, k, v, causal=True)  # (B, T, H, D)
        return self.proj(y.reshape(b, t, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)  # [gate | up]
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.down.residual_scale = True

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig, attention, simplicial=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if simplicial is not None:  # attn=simplicial on this layer: its plan (models/simplicial)
            self.attn = SimplicialSelfAttention(cfg.d_model, cfg.n_head,
                                                cfg.n_kv_head or cfg.n_head, _head_dim(cfg),
                                                attention, simplicial, False)  # fmt: skip
        else:
            self.attn = SelfAttention(cfg, attention)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope, fused_rope: bool):
        x = x + self.attn(self.attn_norm(x), rope, fused_rope)
        return x + self.mlp(self.mlp_norm(x))


class LLM(nn.Module):
    """Llama-style decoder; ``forward(idx, targets)`` as GPT-2's (logits, or the mean loss)."""

    def __init__(self, cfg: LLMConfig, attention, pos_cfg: PosConfig):
        super().__init__()
        validate_config(cfg)
        check_positions(pos_cfg, cfg)
        self.cfg, self.rope_kernel = cfg, pos_cfg.kernel
        self.swapped = parse_swap_layers(cfg.swap_layers, cfg.n_layer)
        if self.swapped:
            attention.check(head_dim=_head_dim(cfg), n_heads=cfg.n_head,
                            n_kv_heads=cfg.n_kv_head or cfg.n_head, causal=True)  # fmt: skip
        exact = ops.build("sdpa") if len(self.swapped) < cfg.n_layer else None
        backends = [attention if i in self.swapped else exact for i in range(cfg.n_layer)]
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = Rotary(cfg) if pos_cfg.name == "rope" else None
        plan = ops.simplicial_plan(attention)  # attn=simplicial: every k-th swapped layer
        simplicial = [plan if plan is not None and i in self.swapped and plan.is_simplicial(i)
                      else None for i in range(cfg.n_layer)]  # fmt: skip
        if any(simplicial):
            plan.simplicial.check(head_dim=_head_dim(cfg), n_heads=cfg.n_head,
                                  n_kv_heads=cfg.n_kv_head or cfg.n_head, causal=True)  # fmt: skip
        self.blocks = nn.ModuleList(Block(cfg, a, s) for a, s in zip(backends, simplicial))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            res = getattr(m, "residual_scale", False)
            nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layer) if res else 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) token ids -> logits (B, T, V), or the mean cross-entropy if targets."""
        x = self.embed(idx)  # (B, T, C)
        rope, fused = None, False
        if self.rope is not None:
            f64 = x.dtype == torch.float64
            rope = self.rope.angles(
                idx.shape[1], idx.device, torch.float64 if f64 else torch.float32
            )
            fused = not f64 and (self.rope_kernel == "triton" or (
                self.rope_kernel == "auto" and x.is_cuda and rotary_ops.available()))  # fmt: skip
        for block in self.blocks:
            x = block(x, rope, fused)
        return lm_loss(self.norm(x), self.lm_head, targets, self.cfg.loss)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, tied weights once (no position table to leave out)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (GPT-2's convention): 6 x matmul weights + attention."""
        c = self.cfg
        n = self.num_params() - (0 if c.tie_embeddings else self.embed.weight.numel())
        return 6 * n + 12 * c.n_layer * c.n_head * _head_dim(c) * seq_len


def lm_loss(h, head: nn.Linear, targets, loss: str):
    """Logits of the final hidden states h, or their mean cross-entropy against targets: the
    fused chunked kernel (ops.cross_entropy) for model.loss=fused, or auto on CUDA."""
    if targets is None:
        return head(h)  # (B, T, V)
    if loss == "fused" or (loss == "auto" and h.is_cuda and ce_ops.fused_available(h.device)):
        return ce_ops.linear_cross_entropy(h, head.weight, targets)
    logits = head(h)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


# ----------------------------------------------------------------------------- conversion

_HF_LAYER = {  # ours (in blocks.i.) -> transformers (in model.layers.i.)
    "attn_norm.weight": ("input_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                        "self_attn.v_proj.weight"),
    "attn.proj.weight": ("self_attn.o_proj.weight",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down.weight": ("mlp.down_proj.weight",),
}  # fmt: skip
_HF_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}  # fmt: skip


def to_hf_state_dict(state: dict, cfg: LLMConfig) -> dict:
    """Our LLM's state dict -> ``LlamaForCausalLM``'s (fused projections split by rows)."""
    out = {hf: state[ours] for ours, hf in _HF_TOP.items()}
    for i in range(cfg.n_layer):
        for ours, hfs in _HF_LAYER.items():
            w = state[f"blocks.{i}.{ours}"]
            parts = _split_sizes(ours, cfg)
            for name, part in zip(hfs, w.split(parts) if parts else (w,)):
                out[f"model.layers.{i}.{name}"] = part
    return out


def from_hf_state_dict(state: dict, cfg: LLMConfig) -> dict:
    """``LlamaForCausalLM``'s state dict -> our LLM's (tied: lm_head from the embedding)."""
    out = {ours: state[hf] for ours, hf in _HF_TOP.items() if hf in state}
    if cfg.tie_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed.weight"]
    for i in range(cfg.n_layer):
        for ours, hfs in _HF_LAYER.items():
            out[f"blocks.{i}.{ours}"] = torch.cat([state[f"model.layers.{i}.{h}"] for h in hfs])
    return out


def _split_sizes(ours: str, cfg: LLMConfig) -> list[int] | None:
    d, n_kv = _head_dim(cfg), cfg.n_kv_head or cfg.n_head
    if ours == "attn.qkv.weight":
        return [cfg.n_head * d, n_kv * d, n_kv * d]
    return [cfg.d_ff, cfg.d_ff] if ours == "mlp.gate_up.weight" else None


def hf_llama_config(cfg: LLMConfig, **extra):
    """The ``transformers.LlamaConfig`` of our LLM's shape. RoPE goes in as ``rope_theta`` +
    ``rope_scaling``, which transformers 4 reads and 5 converts to ``rope_parameters``."""
    from transformers import LlamaConfig

    scaling = {
        "none": None,
        "linear": {"rope_type": "linear", "factor": cfg.rope_factor},
        "llama3": {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
        },
    }
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                       intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
                       num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_kv_head or cfg.n_head, head_dim=_head_dim(cfg),
                       max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                       rope_theta=cfg.rope_base, rope_scaling=scaling[cfg.rope_scaling],
                       tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
                       attention_bias=False, mlp_bias=False, **extra)  # fmt: skip


def llm_config_from_hf(hf, **overrides) -> LLMConfig:
    """Our LLMConfig for a ``LlamaConfig`` (transformers 4: rope_theta/rope_scaling; 5:
    rope_parameters); ValueError for what our decoder does not have."""
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False) or \
            getattr(hf, "hidden_act", "silu") != "silu":  # fmt: skip
        raise ValueError("our LLM has no attention/MLP biases and uses SiLU (SwiGLU)")
    rp = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_type {kind!r}; our LLM has none (default), linear and llama3")
    head_dim = getattr(hf, "head_dim", None)
    kw = dict(n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
              n_kv_head=hf.num_key_value_heads, d_model=hf.hidden_size,
              head_dim=head_dim if head_dim != hf.hidden_size // hf.num_attention_heads else None,
              d_ff=hf.intermediate_size,
              vocab_size=hf.vocab_size, max_seq_len=hf.max_position_embeddings,
              rope_base=float(rp.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
              rope_scaling="none" if kind == "default" else kind,
              rope_factor=float(rp.get("factor", 1.0)), norm_eps=hf.rms_norm_eps,
              tie_embeddings=bool(hf.tie_word_embeddings))  # fmt: skip
    if kind == "llama3":
        kw.update(
            rope_low_freq_factor=float(rp["low_freq_factor"]),
            rope_high_freq_factor=float(rp["high_freq_factor"]),
            rope_original_max_seq_len=int(rp["original_max_position_embeddings"]),
        )
    return LLMConfig(**{**kw, **overrides})
