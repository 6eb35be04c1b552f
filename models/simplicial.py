"""The 2-simplicial attention layer of ``attn=simplicial`` (GPT-2 and our LLM).

One fused projection gives q (H heads) and k1, v1, k2, v2 (Hkv heads each: the extra K2/V2
projections of Fast and Simplex); causal 2-simplicial attention (windows ``w1``, ``w2``) runs
through ``ops.simplicial_plan(attention).op_for(T)``; an output projection as in the ordinary
layers. Which layers: ``plan.is_simplicial(layer)`` (every ``every``-th, see
``ops/simplicial_layers.py``).

Positions: none inside these layers. A rotary encoding does not carry over to the trilinear
form <q, k1 * k2> (rotating q, k1 and k2 by their positions leaves no function of relative
position alone), so, as in Fast and Simplex, the 2-simplicial layers see positions only through
their causal windows and the residual stream (and additive encodings, learned or sinusoidal,
added at the bottom); the other layers keep the model's RoPE/CARoPE.
"""

from __future__ import annotations

import torch.nn as nn


class SimplicialSelfAttention(nn.Module):
    """x (B, T, C) -> (B, T, C) through causal 2-simplicial attention."""

    def __init__(self, d_model: int, n_head: int, n_kv: int, head_dim: int, attention, plan,
                 bias: bool):  # fmt: skip
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = n_head, n_kv, head_dim
        self.qkv = nn.Linear(d_model, (n_head + 4 * n_kv) * head_dim, bias=bias)
        self.proj = nn.Linear(n_head * head_dim, d_model, bias=bias)
        self.proj.residual_scale = True  # GPT-2 / Llama init: scaled by 1/sqrt(2 * n_layer)
        self.attention, self.plan = attention, plan  # attention: the named backend (configs)

    def forward(self, x, *args, **kwargs):
        """Extra arguments (positions, layer index) are the ordinary layers'; unused here."""
        b, t, _ = x.shape
        h, hkv, d = self.n_head, self.n_kv, self.head_dim
        q, k1, v1, k2, v2 = self.qkv(x).split([h * d] + [hkv * d] * 4, dim=-1)
        q = q.unflatten(-1, (h, d))  # (B, T, H, D) views of the fused projection
        k1, v1, k2, v2 = (z.unflatten(-1, (hkv, d)) for z in (k1, v1, k2, v2))
        y = self.plan.op_for(t)(q, k1, k2, v1, v2, causal=True)  # (B, T, H, D)
        return self.proj(y.reshape(b, t, h * d))
