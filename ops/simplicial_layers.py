"""``attn=simplicial``: 2-simplicial attention on every k-th layer of a model, from config.

2-simplicial attention has five inputs, so it cannot be a (q, k, v) backend. What a model gets
from ``ops.build("simplicial", every=4, w1=..., w2=..., base="sdpa", ...)`` is a plan: an
:class:`ops.Attention` that *is* the ``base`` backend when called as (q, k, v) (the ordinary
layers run it through the contract, and everything that loops over backends keeps working) and
that carries the 2-simplicial op for the layers that need it. ``simplicial_plan(attention)``
returns that :class:`SimplicialLayers` (None for any other backend); a model asks
``plan.is_simplicial(layer)`` and builds those layers with their extra K2/V2 projections.

Layers ``every - 1, 2 * every - 1, ...`` (0-based) are 2-simplicial: one in ``every``, the last
of each group, as in Fast and Simplex (every=4). Options besides ``every`` and ``base`` are
``ops.build_simplicial``'s (``w1``, ``w2``, ``impl``, tiles).

Windows longer than the sequence: with causal windows, j in (i - w, i] restricted to [0, i]
is the same set for every w >= N, so a call on N < w tokens runs the window N (exactly the
same attention); ``op_for(n)`` builds and caches those ops, so a model trained with w2=512
also runs on a 128-token prompt.
"""

from __future__ import annotations

from .registry import Capabilities, build, register
from .simplicial import _DEFAULTS as _OP_DEFAULTS
from .simplicial import SimplicialAttention, build_simplicial

_DEFAULTS = {"every": 4, "base": "sdpa", **_OP_DEFAULTS}


class SimplicialLayers:
    """The plan of ``attn=simplicial``: ``base`` for ordinary layers (also what a (q, k, v) call
    runs), ``op_for(n)`` the causal 2-simplicial op for layers where ``is_simplicial``."""

    def __init__(self, every: int, base, options: dict):
        self.every, self.base, self.options = every, base, options
        self.simplicial: SimplicialAttention = build_simplicial(**options)
        self._ops: dict[tuple, SimplicialAttention] = {}

    def __call__(self, q, k, v, *, causal=False, scale=None, bias=None, return_lse=False):
        return self.base(q, k, v, causal=causal, scale=scale, bias=bias, return_lse=return_lse)

    def is_simplicial(self, layer: int) -> bool:
        """Layer index (0-based) -> whether it runs 2-simplicial attention."""
        return (layer + 1) % self.every == 0

    def op_for(self, n: int) -> SimplicialAttention:
        """The op for an n-token causal call: windows longer than n shortened to n (same set)."""
        w1, w2 = (
            None if w is None else min(w, n) for w in (self.simplicial.w1, self.simplicial.w2)
        )
        if (w1, w2) == (self.simplicial.w1, self.simplicial.w2):
            return self.simplicial
        if (w1, w2) not in self._ops:
            self._ops[(w1, w2)] = build_simplicial(**{**self.options, "w1": w1, "w2": w2})
        return self._ops[(w1, w2)]

    def state(self) -> dict:  # the base backend's state (e.g. hyper's generators)
        return self.base.state_dict()

    def set_state(self, state: dict) -> None:
        self.base.load_state_dict(state)


def simplicial_plan(attention) -> SimplicialLayers | None:
    """The :class:`SimplicialLayers` behind an ``ops.build("simplicial", ...)`` backend, else None."""
    fn = getattr(attention, "_fn", None)
    return fn if isinstance(fn, SimplicialLayers) else None


@register("simplicial", defaults=_DEFAULTS, capabilities=Capabilities())
def _build_simplicial_layers(every, base, **options):
    """2-simplicial attention on every ``every``-th layer (Fast and Simplex), ``base`` elsewhere."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"simplicial option every={every!r} must be an integer >= 1")
    if base == "simplicial":
        raise ValueError(
            "simplicial option base='simplicial': the other layers need a (q, k, v) backend"
        )
    return SimplicialLayers(every, build(base), options)
