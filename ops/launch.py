"""Kernel launches with less host time than ``kernel[grid](...)``.

Triton's launch path rebuilds the argument binding, the specialization of every argument, a
string cache key of the options, the check of the kernel's globals and the grid on every call:
on the H100's host about 60-90 us for our kernels of ~45 arguments, against a few us of GPU
work saved by a faster tile loop. A 2-D neighborhood fwd+bwd step (three launches) measured
0.76 ms of host time for 0.53 ms of GPU time, so the GPU waited.

``launch(kernel, grid, *args, **kwargs)`` keys the compiled kernel by what Triton specializes on
or finer (ints, constexprs and options by value; per tensor: dtype, 16-byte alignment and
device; per tensor descriptor: the same for its base, its block shape, padding, and its shape
and strides as Triton specializes ints), so a kernel found here is the one Triton would
launch. The first call of a key goes through Triton (compiling or finding its own
cache) and keeps the ``CompiledKernel``; later calls launch it directly through
``CompiledKernel[grid](...)``, which keeps Triton's launch hooks (profilers). Arguments of a type
not covered here, the interpreter, non-JIT kernels (autotuners) and calls traced by
``torch.compile`` (Dynamo captures ``kernel[grid](...)`` itself) take Triton's path.
"""

from __future__ import annotations

import inspect
import os

import torch

try:
    import triton
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover - no triton (macOS/CPU-only installs)
    triton, _JITFunction = None, ()

try:
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:
    _TensorDescriptor = ()

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_PLAIN = (int, bool, str, type(None))  # keyed by value
_MAX_ENTRIES = 4096
_COMPILED: dict = {}  # key -> (CompiledKernel, ((name, default), ...) of the parameters after
# the positional arguments: the key fixes how many there are)


class _Uncached(Exception):
    """An argument this cache cannot key safely: launch through Triton."""


def _int_spec(x: int):
    return (x == 1, x % 16 == 0, -(2**31) <= x < 2**31, x >= 2**63)


def _spec(a):
    """What Triton's specialization of one argument depends on (or finer)."""
    t = type(a)
    if t is int:
        return _int_spec(a)
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0, a.device.index)
    if t is float:
        return float
    if a is None or t is bool or t is str:
        return (t, a)
    if _TensorDescriptor and t is _TensorDescriptor:
        return (_spec(a.base), tuple(a.block_shape), getattr(a, "padding", None),
                tuple(map(_int_spec, a.shape)), tuple(map(_int_spec, a.strides)))  # fmt: skip
    if isinstance(a, torch.dtype):
        return a
    raise _Uncached


def _params(kernel):
    """((name, default), ...) of the kernel's parameters (default ``inspect._empty``)."""
    return tuple((p.name, p.default) for p in inspect.signature(kernel.fn).parameters.values())


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with the compiled kernel cached by specialization."""
    # is_compiling() first: under torch.compile, Dynamo captures ``kernel[grid](...)`` itself,
    # but it cannot evaluate isinstance() on the kernel and breaks the graph there
    if _INTERPRET or torch.compiler.is_compiling() or not isinstance(kernel, _JITFunction):
        kernel[grid](*args, **kwargs)
        return
    try:  # ints by value (finer than Triton's key, and cheap); the rest by _spec
        key = (id(kernel), tuple([a if type(a) is int else _spec(a) for a in args]),
               tuple([(k, v if type(v) in _PLAIN else _spec(v)) for k, v in kwargs.items()]))  # fmt: skip
    except _Uncached:
        kernel[grid](*args, **kwargs)
        return
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None:
            if len(_COMPILED) >= _MAX_ENTRIES:  # e.g. a new sequence length every call
                _COMPILED.clear()
            _COMPILED[key] = (compiled, _params(kernel)[len(args) :])
        return
    compiled, rest = entry
    tail = [kwargs[n] if n in kwargs else d for n, d in rest]
    grid = (*grid, 1, 1)[:3] if len(grid) < 3 else grid
    compiled[grid](*args, *tail)
