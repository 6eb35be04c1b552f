"""Model families, built by name from config.

``FAMILIES`` maps ``model.family`` to (config dataclass, builder). A builder receives the typed
model config, a bound attention backend (``ops.build``) and the position config.
"""

from __future__ import annotations

from .efficientvit import (
    VARIANTS,
    EfficientViT,
    EfficientViTConfig,
    build_efficientvit,
    from_timm_state_dict,
    load_pretrained,
    to_timm_state_dict,
)
from .gpt2 import GPT2, SIZES, GPT2Config
from .hf import HFCausalLM, swap_attention
from .llm import LLM, LLMConfig
from .positions import POSITIONS, PosConfig, build_positions


def _build_gpt2(cfg: GPT2Config, attention, pos: PosConfig) -> GPT2:
    return GPT2(cfg, attention, pos)


def _build_llm(cfg: LLMConfig, attention, pos: PosConfig):
    """Our Llama-style decoder, or the pretrained transformers model ``model.hf_name`` names."""
    return (HFCausalLM if cfg.hf_name is not None else LLM)(cfg, attention, pos)


FAMILIES = {
    "gpt2": (GPT2Config, _build_gpt2),
    "efficientvit": (EfficientViTConfig, build_efficientvit),  # pos must be none
    "llm": (LLMConfig, _build_llm),  # pos must be rope (the model's own) or none (NoPE)
}


def build_model(model_cfg, attention, pos_cfg: PosConfig):
    """Build the model of ``model_cfg.family``; ValueError on an unknown family."""
    family = getattr(model_cfg, "family", None)
    if family not in FAMILIES:
        raise ValueError(f"unknown model.family={family!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[family][1](model_cfg, attention, pos_cfg)


__all__ = [
    "FAMILIES",
    "VARIANTS",
    "EfficientViT",
    "EfficientViTConfig",
    "GPT2",
    "GPT2Config",
    "HFCausalLM",
    "LLM",
    "LLMConfig",
    "POSITIONS",
    "PosConfig",
    "SIZES",
    "build_efficientvit",
    "build_model",
    "build_positions",
    "from_timm_state_dict",
    "load_pretrained",
    "swap_attention",
    "to_timm_state_dict",
]
