"""Backend registry: ``ops.build(name, **options)`` binds algorithm options once.

Every softmax-attention backend implements one contract (see ``ops/__init__.py``)::

    attention(q, k, v, *, causal=False, scale=None, bias=None, return_lse=False)

A backend registers a factory that receives the validated options and returns that callable.
``build`` wraps it in :class:`Attention`, which also answers ``check(...)`` so that a model can
refuse an unsupported combination (head dim, dtype, bias, causal, device) before it is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend supports; ``None`` means "any"."""

    dtypes: tuple[torch.dtype, ...] | None = None
    head_dims: tuple[int, ...] | None = None  # allowed head dims (None: any)
    max_head_dim: int | None = None
    bias: bool = True
    causal: bool = True
    gqa: bool = True
    devices: tuple[str, ...] | None = None  # e.g. ("cuda",); None: any
    token_ndims: tuple[int, ...] = (1,)  # 1: sequences; 2/3: spatial backends


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    name: str
    factory: Callable[..., Callable]
    defaults: dict[str, Any]
    capabilities: Capabilities
    doc: str


_REGISTRY: dict[str, BackendSpec] = {}


def register(name: str, *, defaults: dict[str, Any] | None = None, capabilities=None):
    """Decorator: register ``factory(**options) -> attention_fn`` under ``name``."""

    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"attention backend {name!r} registered twice")
        _REGISTRY[name] = BackendSpec(
            name=name,
            factory=factory,
            defaults=dict(defaults or {}),
            capabilities=capabilities or Capabilities(),
            doc=(factory.__doc__ or "").strip().splitlines()[0] if factory.__doc__ else "",
        )
        return factory

    return wrap


def available() -> dict[str, BackendSpec]:
    """All registered backends by name."""
    return dict(_REGISTRY)


class Attention:
    """A bound backend: callable with the attention contract, plus ``check``."""

    def __init__(self, spec: BackendSpec, options: dict[str, Any]):
        self.name = spec.name
        self.options = options
        self.capabilities = spec.capabilities
        self._fn = spec.factory(**options)

    def __call__(self, q, k, v, *, causal=False, scale=None, bias=None, return_lse=False):
        return self._fn(q, k, v, causal=causal, scale=scale, bias=bias, return_lse=return_lse)

    def state_dict(self) -> dict:
        """Mutable state of the backend (e.g. the random generators of ``hyper``), for
        checkpoints; empty for stateless backends."""
        state = getattr(self._fn, "state", None)
        return state() if state is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._fn.set_state(state)

    def check(
        self,
        *,
        head_dim: int | None = None,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        bias: bool = False,
        causal: bool = False,
        token_ndim: int = 1,
    ) -> None:
        """Raise ValueError naming every unsupported part of this combination."""
        cap, problems = self.capabilities, []
        if dtype is not None and cap.dtypes is not None and dtype not in cap.dtypes:
            problems.append(f"dtype {dtype} (supported: {', '.join(map(str, cap.dtypes))})")
        if head_dim is not None:
            if cap.head_dims is not None and head_dim not in cap.head_dims:
                problems.append(f"head_dim {head_dim} (supported: {cap.head_dims})")
            if cap.max_head_dim is not None and head_dim > cap.max_head_dim:
                problems.append(f"head_dim {head_dim} (at most {cap.max_head_dim})")
        if n_heads is not None and n_kv_heads is not None:
            if n_kv_heads <= 0 or n_heads % n_kv_heads:
                problems.append(
                    f"n_kv_heads {n_kv_heads} must divide n_heads {n_heads} (GQA/MQA groups)"
                )
            elif n_kv_heads != n_heads and not cap.gqa:
                problems.append("grouped-query attention (n_kv_heads != n_heads)")
        if bias and not cap.bias:
            problems.append("an additive attention bias")
        if causal and not cap.causal:
            problems.append("causal masking")
        if device is not None and cap.devices is not None:
            dev = torch.device(device).type
            if dev not in cap.devices:
                problems.append(f"device {dev!r} (supported: {cap.devices})")
        if token_ndim not in cap.token_ndims:
            problems.append(f"{token_ndim}-D token layouts (supported: {cap.token_ndims})")
        if problems:
            raise ValueError(
                f"attention backend {self.name!r} does not support: " + "; ".join(problems)
            )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"Attention({self.name!r}{', ' if opts else ''}{opts})"


def build(name: str, **options) -> Attention:
    """Bind a backend's algorithm options once; unknown names/options raise ValueError."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown attention backend {name!r}; valid backends: {', '.join(sorted(_REGISTRY))}"
        )
    spec = _REGISTRY[name]
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        valid = ", ".join(sorted(spec.defaults)) or "(none)"
        raise ValueError(
            f"attention backend {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"valid options: {valid}"
        )
    return Attention(spec, {**spec.defaults, **options})
