"""Pretrained Hugging Face causal LMs with our attention backends (``model.family=llm`` with
``model.hf_name``: a hub name or a local directory).

The model keeps its own weights, RoPE and layers; ``swap_attention`` sends the attention of the
layers that ``model.swap_layers`` names through ``transformers.AttentionInterface`` to our
backend, the others keep transformers' ``sdpa``. Works on transformers 4.48 through 5.x: each
attention module looks its function up per call under ``module.config._attn_implementation``
(4.48-4.50 in the plain dict ``ALL_ATTENTION_FUNCTIONS``, 4.51+ through ``AttentionInterface``),
so swapped modules get their own copy of the config naming ours. Masks are still built from the
model's config (sdpa): ``None`` for unpadded causal input, which every backend runs; padding
masks become an additive bias for backends that take one and are refused by the others.

``HFCausalLM`` puts the model behind the trainer's interface: ``forward(idx, targets)`` returns
logits or the mean next-token loss (the fused LM-head loss for Llama-like heads).
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

import ops
from ops.contract import causal_mask

from .llm import HF_DTYPES, LLMConfig, check_positions, lm_loss, parse_swap_layers, validate_config
from .positions import PosConfig

_FUSED_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # logits = lm_head(last hidden)


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def hf_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):  # fmt: skip
    """transformers' attention-function signature on our backend (``module.attention``).

    query (B, H, N, D), key/value (B, Hkv, Nk, D) -> ((B, N, H, D), None). The transposes are
    views into our heads-last layout; GQA goes to the backend as is (no repeated k/v)."""
    backend = getattr(module, "attention", None)
    if not isinstance(backend, ops.Attention):
        raise ValueError(
            f"{type(module).__name__} has no attnlab backend: use "
            "models.hf.swap_attention(model, backend, layers) to select layers"
        )
    if dropout:
        raise ValueError(f"attnlab attention has no dropout; got {dropout} (set the model "
                         "config's attention_dropout=0)")  # fmt: skip
    for name in ("sliding_window", "softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attnlab attention does not support {name}={kwargs[name]!r} "
                             f"({type(module).__name__})")  # fmt: skip
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, N, H, D)
    bias = None
    if attention_mask is not None:
        causal, bias = _mask_as_bias(attention_mask, q, k, backend, causal)
    elif causal and 1 < q.shape[1] < k.shape[1]:
        # no mask with more keys than queries: a static cache's prefill, whose trailing keys are
        # empty slots (transformers' sdpa aligns top-left here); our causal aligns bottom-right
        k, v = k[:, : q.shape[1]], v[:, : q.shape[1]]
    return backend(q, k, v, causal=causal, scale=scaling, bias=bias), None


def _mask_as_bias(mask, q, k, backend, causal: bool):
    """(causal, bias) for a materialised transformers mask (B|1, 1|H, Nq, >=Nk): bool (True =
    attend) or additive float. Backends with an additive bias take it as one; the others run
    only when it is exactly the causal mask (checked: the mask is O(N^2) already)."""
    nq, nk = q.shape[1], k.shape[1]
    mask = mask[..., :nk]
    if backend.capabilities.bias:
        if mask.dtype == torch.bool:
            low = torch.finfo(torch.float32).min  # finite: fully masked (padded) rows stay finite
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, low)
        return False, mask
    allowed = mask if mask.dtype == torch.bool else mask == 0
    want = causal_mask(nq, nk, mask.device) if causal else torch.ones(nq, nk, dtype=torch.bool)
    if torch.equal(allowed, want.to(allowed.device).expand_as(allowed)):
        return causal, None
    raise ValueError(
        f"attention backend {backend.name!r} takes no attention mask, and this one is not plain "
        "causal (padding or a custom pattern): pass unpadded input_ids (attention_mask None or "
        "all ones), or use attn=sdpa or attn=reference, which take the mask as an additive bias"
    )


def register_hf_attention(backend_name: str) -> str:
    """Register ``hf_attention_forward`` with transformers as ``attnlab_<backend>``.

    ``AttentionInterface.register`` (transformers >= 4.51) is global; before it the global
    ``ALL_ATTENTION_FUNCTIONS`` was a plain dict (4.48-4.50). The function reads the backend from
    the module, so models with differently bound backends never overwrite one another."""
    if _transformers_version() < (4, 48):
        raise ValueError("swapping attention needs transformers >= 4.48 (its attention interface)")
    name = f"attnlab_{backend_name}"
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(name, hf_attention_forward)
    except ImportError:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[name] = hf_attention_forward
    return name


def _attention_modules(model) -> list[nn.Module]:
    """The self-attention module of every layer, by layer index; ValueError where the model
    does not dispatch its attention through transformers' attention interface."""
    mods = [m for m in model.modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")
            and hasattr(m, "config")]  # fmt: skip
    mods.sort(key=lambda m: m.layer_idx)
    if not mods or [m.layer_idx for m in mods] != list(range(len(mods))):
        raise ValueError(f"{type(model).__name__}: found no attention module per layer (classes "
                         "named *Attention with layer_idx) to swap")  # fmt: skip
    try:
        src = inspect.getsource(type(mods[0]).forward)
    except (OSError, TypeError):
        src = "_attn_implementation"
    if "_attn_implementation" not in src:
        raise ValueError(
            f"{type(mods[0]).__name__} does not dispatch through transformers' "
            "AttentionInterface (config._attn_implementation); cannot swap it"
        )
    return mods


def swap_attention(model, attention, layers="all") -> list[int]:
    """Run the attention of the chosen layers of a transformers model on ``attention`` (an
    ``ops.Attention``); returns their indices. Weights and RoPE stay the model's.

    transformers looks the function up per call in ``module.config._attn_implementation``; each
    swapped module gets its own copy of the config naming ours, so the other layers (and the
    mask construction, which reads the model's config) keep the model's implementation."""
    mods = _attention_modules(model)
    chosen = parse_swap_layers(layers, len(mods))
    if not chosen:
        return []
    m0 = mods[0]
    n_heads = m0.config.num_attention_heads
    n_kv = getattr(m0.config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(m0, "head_dim", None) or m0.config.hidden_size // n_heads
    attention.check(head_dim=head_dim, n_heads=n_heads, n_kv_heads=n_kv, causal=True)
    name = register_hf_attention(attention.name)
    copies = {}
    for i in chosen:
        m = mods[i]
        if getattr(m, "attention", None) is not None and not isinstance(m.attention, ops.Attention):
            raise ValueError(f"{type(m).__name__} already has an 'attention' attribute")
        if id(m.config) not in copies:
            copies[id(m.config)] = copy.deepcopy(m.config)
            copies[id(m.config)]._attn_implementation = name
        m.config, m.attention = copies[id(m.config)], attention
    return chosen


def load_hf_causal_lm(name: str, dtype: str = "float32"):
    """``AutoModelForCausalLM.from_pretrained(name)`` with transformers' sdpa attention, in
    ``dtype``. Loading then casting works alike on transformers 4 (default float32) and 5
    (default: the checkpoint's dtype)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa")
    except OSError as e:
        raise OSError(
            f"model.hf_name={name!r} could not be loaded ({str(e).splitlines()[0]}). Give a local "
            "directory with config.json and weights, or a hub name already in the Hugging Face "
            "cache (downloads need the network)"
        ) from e
    return model.to(HF_DTYPES[dtype])


class HFCausalLM(nn.Module):
    """A pretrained transformers causal LM behind our interface: ``forward(idx, targets)``
    returns logits or the mean next-token loss (targets already shifted, as the trainer's)."""

    def __init__(self, cfg: LLMConfig, attention, pos_cfg: PosConfig):
        super().__init__()
        validate_config(cfg)
        check_positions(pos_cfg, cfg)
        self.cfg = cfg
        self.hf = load_hf_causal_lm(cfg.hf_name, cfg.hf_dtype)
        self.swapped = swap_attention(self.hf, attention, cfg.swap_layers)
        self.train()  # from_pretrained leaves eval mode; built models start in training mode

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        fused_head = self.hf.config.model_type in _FUSED_HEAD_TYPES
        if targets is None or not fused_head:
            logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, V)
            if targets is None:
                return logits
            return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1))
        h = self.hf.base_model(input_ids=idx, use_cache=False)[0]  # (B, T, C)
        return lm_loss(h, self.hf.get_output_embeddings(), targets, self.cfg.loss)

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        c = self.hf.config
        emb = self.hf.get_input_embeddings().weight
        tied = emb is self.hf.get_output_embeddings().weight
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        n = self.num_params() - (0 if tied else emb.numel())
        return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * head_dim * seq_len
