"""Attention backends behind one contract.

    attention(q, k, v, *, causal=False, scale=None, bias=None, return_lse=False)

q: (B, *tokens, H, D); k, v: (B, *tokens, Hkv, D|Dv) with H % Hkv == 0. Returns (B, *tokens, H,
Dv) in q's dtype, plus LSE (B, H, Ntokens) float32 when ``return_lse``. ``causal`` aligns
bottom-right when query and key lengths differ; ``bias`` is additive and broadcasts to
(B, H, Nq, Nk). Algorithm options are bound once with ``ops.build(name, **options)``.

Besides attention: ``linear_cross_entropy`` (fused, chunked LM-head loss; ops/cross_entropy.py);
2-simplicial attention, five inputs (q, k1, k2, v1, v2), its own op: ``build_simplicial``,
``simplicial_attention``, ``simplicial_reference`` (ops/simplicial.py); its linear-time
polynomial approximation ``simplicial_polynomial`` (ops/simplicial_approx.py); ``attn=simplicial``
for models (ops/simplicial_layers.py).

This package imports nothing else of the repository.
"""

from . import hyper as _hyper  # noqa: F401  (registers "hyper")
from . import neighborhood as _neighborhood  # noqa: F401  (registers "neighborhood")
from . import neighborhood_ref as _neighborhood_ref  # noqa: F401  (registers "neighborhood_reference")
from . import reference as _reference  # noqa: F401  (registers "reference")
from . import sdpa as _sdpa  # noqa: F401  (registers "sdpa")
from .contract import check_inputs, kernels_run_on
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_torch
from .flash import flash_attention  # registers "flash"
from .neighborhood_ref import neighborhood_mask, neighborhood_reference
from .reference import reference_attention
from .registry import Attention, Capabilities, available, build, register
from .sdpa import sdpa_attention
from .simplicial import (
    SimplicialAttention,
    build_simplicial,
    simplicial_attention,
    simplicial_reference,
)
from .simplicial_approx import simplicial_polynomial
from .simplicial_layers import SimplicialLayers, simplicial_plan  # registers "simplicial"

__all__ = [
    "kernels_run_on",
    "Attention",
    "Capabilities",
    "SimplicialAttention",
    "SimplicialLayers",
    "available",
    "build",
    "build_simplicial",
    "check_inputs",
    "flash_attention",
    "linear_cross_entropy",
    "linear_cross_entropy_torch",
    "neighborhood_mask",
    "neighborhood_reference",
    "reference_attention",
    "register",
    "sdpa_attention",
    "simplicial_attention",
    "simplicial_plan",
    "simplicial_polynomial",
    "simplicial_reference",
]
