"""2-simplicial (Kronecker / tensor) attention: five inputs, its own op.

    o_i = sum_{j,k} exp(s <q_i, k1_j * k2_k>) (v1_j * v2_k) / sum_{j,k} exp(s <q_i, k1_j * k2_k>)

(* elementwise; Alman & Song's Kronecker attention, Roy et al. 2025 "Fast and Simplex"). The
scale s defaults to 1/sqrt(D), the trilinear logits <q, k1, k2> / sqrt(D) of Fast and Simplex;
Alman & Song leave s free (any positive ``scale`` may be passed).

Forms: full (every pair (j, k)); causal (j <= i and k <= i); windowed, causal with
j in (i - w1, i] and k in (i - w2, i] (``w1``/``w2`` bound at build; ``None``: unbounded).
Causal and windowed forms need Nq = N1 = N2 (one sequence); the full form takes any lengths.

Layout as the attention contract: q (B, Nq, H, D); k1, v1 (B, N1, Hkv, D); k2, v2 (B, N2, Hkv, D)
with H % Hkv == 0 (GQA: q head h reads kv head h // (H // Hkv)); output (B, Nq, H, D) in q's
dtype; LSE (B, H, Nq) float32 natural log, differentiable.

Why not ``ops.build``: its ``Attention`` objects are called as (q, k, v), and code that loops
over ``ops.available()`` relies on that. Five inputs make a separate op:
``ops.build_simplicial(w1=..., w2=..., impl="triton"|"reference", block_m=...)`` returns a
:class:`SimplicialAttention` with ``__call__(q, k1, k2, v1, v2, *, causal, scale, return_lse)``
and ``check(...)``, bound once from config like the q, k, v backends.

Layering: kernels (``ops/simplicial_kernels.py``) -> launchers (``_forward``, ``_backward``) ->
autograd Function ``_Simplicial`` (as ``flash.KernelAttention``, five inputs) -> public functions.
Two tilings (option ``heads_per_tile``): sequence-tiled (1: one head, BLOCK_M positions) and
head-packed for GQA (BLOCK_M // heads_per_tile positions x heads_per_tile q heads of one k/v
head); auto picks the largest power of two dividing the GQA group, at most ``block_m``. A
forward tile of one position (heads_per_tile == block_m) runs its own kernel (option
``fwd_kernel``: 'auto' picks it there, 'tiled' keeps the general one). The backward has
one-position kernels too (option ``bwd_kernel``: 'auto' runs them behind the one-position
forward, 1.5x the general ones on an H100; 'tiled' keeps the general ones); for 16-bit inputs
they run split (``DQ_DK1``): dQ with dK1, whose rows are fp32 atomic adds, so dK1 is not
bitwise reproducible except under ``torch.use_deterministic_algorithms(True)``, which keeps
the separate, atomic-free kernels. The backward is the
true gradient of the forward, LSE included (tests compare with autograd through the float64
reference). fp32 uses IEEE dots; fp16/bf16 round q * k1, P and dS to the input dtype before the
fp32-accumulating dots (the one-position forward also rounds v1 * v2, its backward k2 * k1,
v2 * v1 and dO * v1).
"""

from __future__ import annotations

import torch

from . import simplicial_kernels as K
from .contract import check_kernel_support
from .flash import _INTERPRET, _LOG2E, _cdiv, _row_delta, _Tiles
from .launch import launch

_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ----------------------------------------------------------------------------- reference


def _window_mask(rows: range, cols: range, w, device) -> torch.Tensor:
    """(len(rows), len(cols)) bool: causal with window w (None: unbounded), j in (i - w, i]."""
    i = torch.arange(rows.start, rows.stop, device=device)[:, None]
    j = torch.arange(cols.start, cols.stop, device=device)[None, :]
    ok = j <= i
    return ok if w is None else ok & (j > i - w)


def _key_span(i0: int, i1: int, n: int, causal: bool, w) -> range:
    """Keys that queries [i0, i1) may see: all of them, or the causal window's span."""
    if not causal:
        return range(0, n)
    return range(0 if w is None else max(0, i0 - w + 1), i1)


def simplicial_reference(q, k1, k2, v1, v2, *, causal=False, w1=None, w2=None, scale=None,
                         return_lse=False, chunk=None):  # fmt: skip
    """Plain PyTorch 2-simplicial attention, the definition of correctness (float32, float64
    for float64 inputs). Forms the (queries, N1, N2) scores a chunk of queries at a time, over
    only the keys the chunk's windows reach (``chunk`` queries; by default a chunk holds about
    2**22 scores), never N^3 at once."""
    _check(q, k1, k2, v1, v2, causal, w1, w2, "simplicial_reference")
    b, nq, h, d = q.shape
    n1, n2, group = k1.shape[1], k2.shape[1], h // k1.shape[2]
    scale = _check_scale(q, scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    def heads(t):  # (B, N, Hkv, D) -> (B, H, N, D)
        return t.to(cdt).transpose(1, 2).repeat_interleave(group, dim=1)

    qh = q.to(cdt).transpose(1, 2)
    k1h, k2h, v1h, v2h = (heads(t) for t in (k1, k2, v1, v2))
    windowed = causal and (w1 is not None or w2 is not None)
    span1 = min(n1, w1 + 63) if windowed and w1 is not None else n1
    span2 = min(n2, w2 + 63) if windowed and w2 is not None else n2
    chunk = chunk or max(1, 2**22 // max(1, b * h * span1 * span2))
    chunk = min(chunk, 64) if windowed else chunk  # spans above assume chunks of <= 64
    outs, lses = [], []
    for i0 in range(0, nq, chunk):
        rows = range(i0, min(i0 + chunk, nq))
        c1 = _key_span(i0, rows.stop, n1, causal, w1)
        c2 = _key_span(i0, rows.stop, n2, causal, w2)
        sl1, sl2 = slice(c1.start, c1.stop), slice(c2.start, c2.stop)
        s = torch.einsum("bhid,bhjd,bhkd->bhijk", qh[:, :, i0 : rows.stop], k1h[:, :, sl1],
                         k2h[:, :, sl2]) * scale  # fmt: skip
        if causal:
            ok = _window_mask(rows, c1, w1, q.device)[:, :, None] & _window_mask(rows, c2, w2, q.device)[:, None, :]  # fmt: skip
            s = s.masked_fill(~ok, float("-inf"))
        lse = s.flatten(-2).logsumexp(-1)  # (B, H, c)
        p = torch.exp(s - lse[..., None, None])
        outs.append(torch.einsum("bhijk,bhjd,bhkd->bhid", p, v1h[:, :, sl1], v2h[:, :, sl2]))
        lses.append(lse)
    out = torch.cat(outs, 2).transpose(1, 2).to(q.dtype)  # (B, Nq, H, D)
    lse = torch.cat(lses, 2)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- checks


def _check_scale(q, scale) -> float:
    """The softmax scale s (1/sqrt(D) by default); the kernels fold it into exp2: s > 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"'simplicial' needs a positive scale; got scale={scale}")
    return scale


def _check_shapes(q, k1, k2, v1, v2) -> None:
    """Layout and GQA checks; ValueError names the tensors and their shapes."""
    named = {"q": q, "k1": k1, "k2": k2, "v1": v1, "v2": v2}
    shapes = ", ".join(f"{n}{tuple(t.shape)}" for n, t in named.items())
    if any(t.dim() != 4 for t in named.values()):
        raise ValueError(
            "'simplicial' expects q (B, Nq, H, D), k1/v1 (B, N1, Hkv, D), k2/v2 (B, N2, Hkv, D);"
            f" got {shapes}"
        )
    if k1.shape != v1.shape or k2.shape != v2.shape:
        raise ValueError(f"'simplicial' needs k1.shape == v1.shape and k2.shape == v2.shape; got {shapes}")  # fmt: skip
    bq, _, h, d = q.shape
    if k1.shape[0] != bq or k2.shape[0] != bq:
        raise ValueError(f"'simplicial' batch sizes differ: {shapes}")
    if k1.shape[2] != k2.shape[2] or k1.shape[3] != d or k2.shape[3] != d:
        raise ValueError(
            f"'simplicial' needs the same head dim D={d} everywhere and the same kv heads in "
            f"k1/v1 and k2/v2; got {shapes}"
        )
    if h % k1.shape[2]:
        raise ValueError(
            f"'simplicial': q has {h} heads, k/v have {k1.shape[2]}: the number of q heads must "
            "be a multiple of the number of k/v heads (GQA/MQA)"
        )
    dtypes = {n: t.dtype for n, t in named.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"'simplicial' inputs must share one dtype; got {dtypes}")


def _check_window(name: str, w, n: int) -> None:
    if w is None:
        return
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f"'simplicial' window {name}={w!r}: use None or an int >= 1")
    if w > n:
        raise ValueError(
            f"'simplicial' window {name}={w} is larger than the sequence (length {n}); "
            f"use {name} <= {n} or {name}=None (plain causal)"
        )


def _check(q, k1, k2, v1, v2, causal, w1, w2, who: str) -> None:
    """All input checks shared by the reference and the kernels."""
    _check_shapes(q, k1, k2, v1, v2)
    nq, n1, n2 = q.shape[1], k1.shape[1], k2.shape[1]
    if (w1 is not None or w2 is not None) and not causal:
        raise ValueError(
            f"'{who}': windows (w1={w1}, w2={w2}) are causal, j in (i - w1, i]; call with "
            "causal=True, or build without windows for the full form"
        )
    if causal and not nq == n1 == n2:
        raise ValueError(
            f"'{who}' causal needs one sequence length for q, k1/v1 and k2/v2; got Nq={nq}, "
            f"N1={n1}, N2={n2}"
        )
    _check_window("w1", w1, n1)
    _check_window("w2", w2, n2)


def _check_kernel(q) -> None:
    """What the Triton kernels lack beyond ``_check``."""
    check_kernel_support("simplicial", q, _HEAD_DIMS, _DTYPES, "; impl='reference' runs anywhere")


# ----------------------------------------------------------------------------- launchers

_OPTIONS = ("block_m", "block_n1", "block_n2", "num_warps", "num_stages", "heads_per_tile")
_FWD_KERNELS = ("auto", "packed1", "tiled")  # option fwd_kernel (None: auto)
_BWD_KERNELS = ("auto", "packed1", "tiled")  # option bwd_kernel (None: auto)
_PACKED1_OPTIONS = ("block_n2", "num_warps", "num_stages")  # what one-position tiles take


def _given(opts: dict, names, defaults) -> tuple:
    """The options ``names`` where given (not None), else ``defaults``."""
    return tuple(v if opts.get(n) is None else opts[n] for n, v in zip(names, defaults))


def _tiles(opts: dict, d: int, dtype: torch.dtype, group: int, backward: bool) -> tuple[int, ...]:
    """(block_m, block_n1, block_n2, num_warps, num_stages, heads_per_tile): build options
    where given, else 16-tiles under the interpreter; on the GPU, configurations that ptxas
    (sm_90a, Triton 3.8) compiles without register spills, or with the fewest at D=128 in the
    backward, not yet timed. heads_per_tile (auto): the largest power of two dividing the GQA
    group, at most block_m (1 without GQA: sequence-tiled)."""
    if _INTERPRET:
        base = [16, 16, 16, 4, 1]
    elif dtype == torch.float32:
        base = [32, 2, 32, 4, 1]
    elif backward:
        base = [32, 2, 32 if d == 128 else 64, 8, 1]
    else:
        base = [64, 2, 32 if d == 128 else 64, 8, 2]
    bm = base[0] if opts.get("block_m") is None else opts["block_m"]
    base.append(min(group & -group, bm))
    tiles = _given(opts, _OPTIONS, base)
    if group % tiles[5] or tiles[5] > tiles[0]:
        raise ValueError(
            f"'simplicial' heads_per_tile={tiles[5]} must divide the GQA group (H // Hkv = "
            f"{group}) and be at most block_m={tiles[0]}"
        )
    return tiles


def _fwd_tiles(opts: dict, d: int, dtype: torch.dtype, group: int) -> tuple[str, tuple[int, ...]]:
    """(kernel, tiles) of the forward: 'packed1' (``_fwd_packed1_kernel``) where a tile is one
    position (heads_per_tile == block_m) unless fwd_kernel='tiled', else 'tiled'
    (``_fwd_kernel``). packed1 GPU defaults (block_n2, num_warps, num_stages), where not given:
    fp16/bf16 (64, 4, 1): one warpgroup for the 64 rows (8 warps compute S twice) and no
    spills at D=128 (Triton 3.6 and 3.8, sm_90); fp32 (32, 8, 1), spill-free too. bf16 on an
    H100: 403 TFLOP/s (window_gqa, docs/benchmarks.md). Stages change nothing there: the
    kernel prefetches k1/v1 itself, Triton does not pipeline the loop. Under the interpreter the 16-tiles of ``_tiles``."""
    tiles = _tiles(opts, d, dtype, group, backward=False)
    choice = opts.get("fwd_kernel") or "auto"
    if choice not in _FWD_KERNELS:
        raise ValueError(f"'simplicial' option fwd_kernel={choice!r}: use one of {_FWD_KERNELS}")
    one_position = tiles[5] == tiles[0]
    if choice == "packed1" and not one_position:
        raise ValueError(
            f"'simplicial' fwd_kernel='packed1' needs tiles of one position, heads_per_tile == "
            f"block_m; got heads_per_tile={tiles[5]}, block_m={tiles[0]} (GQA group H // Hkv = "
            f"{group}): use a block_m that divides the group (heads_per_tile follows it), or "
            "fwd_kernel='auto'"
        )
    if choice == "tiled" or not one_position:
        return "tiled", tiles
    if _INTERPRET:
        base = tiles[2:5]
    else:
        base = (32, 8, 1) if dtype == torch.float32 else (64, 4, 1)
    return "packed1", (tiles[0], tiles[1], *_given(opts, _PACKED1_OPTIONS, base), tiles[5])


def _bwd_tiles(opts: dict, d: int, dtype: torch.dtype, group: int,
               split: bool = False) -> tuple[str, list[tuple]]:  # fmt: skip
    """(kernel, [tiles of dQ, dK1/dV1, dK2/dV2]) of the backward, tiles as ``_tiles``
    (split: of dQ with dK1, dV1 alone, dK2/dV2; see ``DQ_DK1``):
    'packed1' (the three ``*_packed1_kernel``) where asked (bwd_kernel='packed1'; the
    forward's tiles must be one position, heads_per_tile == block_m) or, for 'auto', where the
    forward runs packed1 (1.5x the tiled backward on an H100: docs/benchmarks.md), else
    'tiled' (one set of tiles for all three).
    packed1 (block_n2, num_warps, num_stages) per kernel: the options where given, else
    ``_BWD_PACKED1`` on the GPU, the 16-tiles of ``_tiles`` under the interpreter."""
    choice = opts.get("bwd_kernel") or "auto"
    if choice not in _BWD_KERNELS:
        raise ValueError(f"'simplicial' option bwd_kernel={choice!r}: use one of {_BWD_KERNELS}")
    fwd_kernel, ftiles = _fwd_tiles(opts, d, dtype, group)
    if choice == "packed1" and ftiles[5] != ftiles[0]:
        raise ValueError(
            f"'simplicial' bwd_kernel='packed1' needs tiles of one position, heads_per_tile == "
            f"block_m; got heads_per_tile={ftiles[5]}, block_m={ftiles[0]} (GQA group H // Hkv "
            f"= {group}): use a block_m that divides the group, or bwd_kernel='auto'"
        )
    if choice == "tiled" or (choice == "auto" and fwd_kernel != "packed1"):
        return "tiled", [_tiles(opts, d, dtype, group, backward=True)] * 3
    if _INTERPRET:
        bases = [_tiles(opts, d, dtype, group, backward=True)[2:5]] * 3
    else:
        names = ("dqdk1", "dv1", "dk2dv2") if split else ("dq", "dk1dv1", "dk2dv2")
        fp32 = dtype == torch.float32
        defaults = (*_BWD_SPLIT[fp32], _BWD_PACKED1[fp32][2]) if split else _BWD_PACKED1[fp32]
        bases = [BWD_PACKED1_TILES.get(name) or base for name, base in zip(names, defaults)]
    return "packed1", [(ftiles[0], 1, *_given(opts, _PACKED1_OPTIONS, base), ftiles[5])
                       for base in bases]  # fmt: skip


# packed1 backward GPU defaults (block_n2, num_warps, num_stages) of dQ, dK1/dV1, dK2/dV2 by
# [fp32]. bf16: the fastest of the tile sweeps (window_gqa, `bench_simplicial.py
# --sweep-bwd-tiles`, docs/benchmarks.md): on an H100 108.7, 220.5 (2 stages) and 191.5 ms
# (dK2/dV2 transposed, see DK2_TRANSPOSED) against 229.2, 376.2 and 442.7 for the 8-warp tiles
# ptxas had picked for no spills (one warpgroup for the 64 head rows wins although these spill
# a little); dK1/dV1 with 3 stages 215.1 against 222.8 for 2 on an H200. fp32 (BLOCK_M=32,
# IEEE dots): the fewest spills found (296, 0, 168 B), not timed.
_BWD_PACKED1 = {
    False: ((64, 4, 1), (32, 4, 3), (32, 4, 1)),
    True: ((16, 16, 1), (32, 8, 1), (16, 8, 1)),
}


# The split backward's GPU defaults (block_n2, num_warps, num_stages) of dQ with dK1 and of dV1
# alone (DQ_DK1), by [fp32]; dK2/dV2 as _BWD_PACKED1. bf16: the fastest of the sweep
# (window_gqa, H100, docs/benchmarks.md), 158.9 and 116.8 ms; fp32: not timed.
_BWD_SPLIT = {
    False: ((32, 4, 3), (64, 4, 2)),
    True: ((32, 8, 1), (32, 8, 1)),
}


# Per-kernel overrides of those defaults on the GPU, (block_n2, num_warps, num_stages) or None;
# options given to the backend still come first. For the tile sweep of
# scripts/bench_simplicial.py --sweep-bwd-tiles.
BWD_PACKED1_TILES: dict[str, tuple[int, int, int] | None] = {
    "dq": None,
    "dk1dv1": None,
    "dk2dv2": None,
    "dqdk1": None,
    "dv1": None,
}

# The split packed1 backward: ``_dqdk1_packed1_kernel`` gives dQ and dK1 (both are sums of
# dS_ijk times the product W = dS @ k2 it forms once; dK1's (D,) rows are fp32 atomic adds) and
# ``_dk1dv1_packed1_kernel`` with DV1_ONLY gives dV1 (S and P @ v2 only): 3 + 2 tile products
# per (position, k1 key, k2 tile) where dQ and dK1/dV1 take 3 + 4. The atomics make dK1's
# rounding depend on the order of the adds, so under torch.use_deterministic_algorithms(True)
# the backward keeps the separate kernels. None (default): split for fp16/bf16 when not
# deterministic (H100, window_gqa: backward 469 ms, 262.5 TFLOP/s, against 495.7 ms for the
# separate kernels in the same call); fp32 keeps them (not timed); True/False force it (the
# tests and the tile sweep use both).
DQ_DK1: bool | None = None


def _split_bwd(dtype: torch.dtype) -> bool:
    """Whether the packed1 backward runs split (``DQ_DK1``)."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return dtype != torch.float32 if DQ_DK1 is None else DQ_DK1


# The packed1 dK2/dV2 kernel accumulating dK2^T, dV2^T (TRANSPOSED): every product then has 64+
# rows whatever block_n2, so it runs on Hopper's warpgroup MMA. None (default): transposed for
# fp16/bf16 (191.5 ms against 250.5 for the best plain tiles, H100 window_gqa), plain for fp32
# (not timed); True/False force one form (the tests and the tile sweep use both).
DK2_TRANSPOSED: bool | None = None

# The packed1 dK1/dV1 kernel reading q and dO again after its k2 loop (RELOAD) rather than
# holding them in registers through it: ptxas spills 352 B, not 744, at the 16-bit default
# tiles (sm_90). None (default): RELOAD for fp16/bf16 (H100, window_gqa: dK1/dV1 197.6 ms
# against 224.7, the backward 501.8 against 531.2, docs/benchmarks.md), the plain form for fp32
# (not timed); True/False force one form (the tests and the tile sweep use both).
DK1_RELOAD: bool | None = None


def _windows(w1, w2) -> tuple[int, int]:
    return (K._NO_WINDOW if w1 is None else w1), (K._NO_WINDOW if w2 is None else w2)


def _forward(q, k1, k2, v1, v2, causal, w1, w2, scale, opts):
    """q (B, Nq, H, D), k1/v1 (B, N1, Hkv, D), k2/v2 (B, N2, Hkv, D), any strides ->
    o (B, Nq, H, D) contiguous, lse (B, H, Nq) fp32."""
    b, nq, h, d = q.shape
    n1, hkv, n2 = k1.shape[1], k1.shape[2], k2.shape[1]
    o = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    kernel, (bm, bn1, bn2, warps, stages, hp) = _fwd_tiles(opts, d, q.dtype, h // hkv)
    grid = (_cdiv(nq, bm // hp), b * h // hp)
    const = dict(CAUSAL=causal, HEAD_D=d, BLOCK_M=bm, BLOCK_N1=bn1, BLOCK_N2=bn2, HEADS=hp,
                 IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)  # fmt: skip
    kern = K._fwd_kernel
    if kernel == "packed1":  # one position x bm heads: no k1 block, no head packing constant
        kern = K._fwd_packed1_kernel
        del const["BLOCK_N1"], const["HEADS"]
    if all(grid):
        launch(kern, grid, q, k1, k2, v1, v2, o, lse, *q.stride(), *k1.stride(), *k2.stride(),
               *v1.stride(), *v2.stride(), nq, n1, n2, h, h // hkv, *_windows(w1, w2),
               scale * _LOG2E, **const)  # fmt: skip
    return o, lse


def _backward(do, dlse, q, k1, k2, v1, v2, o, lse, causal, w1, w2, scale, opts):
    """Gradients of sum(o * do) + sum(lse * dlse) (dlse may be None); kv grads summed over
    the GQA group in-kernel."""
    b, nq, h, d = q.shape
    n1, hkv, n2 = k1.shape[1], k1.shape[2], k2.shape[1]
    split = _split_bwd(q.dtype)
    kernel, tiles = _bwd_tiles(opts, d, q.dtype, h // hkv, split)
    split = split and kernel == "packed1"
    bm, _, _, warps, stages, hp = tiles[0]
    delta = _row_delta(o, do, dlse, _Tiles(bm, 16, warps, stages))  # rowsum(dO * O) - dLSE
    dq = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    dk1, dv1, dk2, dv2 = (torch.empty((b, n, hkv, d), dtype=q.dtype, device=q.device)
                          for n in (n1, n1, n2, n2))  # fmt: skip
    args = (*q.stride(), *k1.stride(), *k2.stride(), *v1.stride(), *v2.stride(), *do.stride(),
            nq, n1, n2, h, h // hkv, *_windows(w1, w2), scale * _LOG2E, scale)  # fmt: skip
    if kernel == "packed1":  # one position x bm heads; one k1 key per dK1/dV1 program
        kernels = (K._dq_packed1_kernel, K._dk1dv1_packed1_kernel, K._dk2dv2_packed1_kernel)
    else:
        kernels = (K._dq_kernel, K._dk1dv1_kernel, K._dk2dv2_kernel)
    outs = ((dq,), (dk1, dv1), (dk2, dv2))
    if split:  # dK1 summed over positions by fp32 atomics, in dk1 itself when fp32
        dk1f = (
            dk1.zero_() if q.dtype == torch.float32 else torch.zeros_like(dk1, dtype=torch.float32)
        )
        kernels = (K._dqdk1_packed1_kernel, *kernels[1:])
        outs = ((dq, dk1f), (dk1f, dv1), (dk2, dv2))
    for x, (kern, out, (bm, bn1, bn2, warps, stages, hp)) in enumerate(zip(kernels, outs, tiles)):
        grid = (_cdiv((nq, n1, n2)[x], (bm // hp, bn1, bn2)[x]), b * (h // hp if x == 0 else hkv))
        const = dict(CAUSAL=causal, HEAD_D=d, BLOCK_M=bm, BLOCK_N1=bn1, BLOCK_N2=bn2, HEADS=hp,
                     IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)  # fmt: skip
        if kernel == "packed1":
            del const["BLOCK_N1"], const["HEADS"]
            transposed = q.dtype != torch.float32 if DK2_TRANSPOSED is None else DK2_TRANSPOSED
            if x == 2 and transposed:
                const["TRANSPOSED"] = True
            reload = q.dtype != torch.float32 if DK1_RELOAD is None else DK1_RELOAD
            if x == 1 and reload:
                const["RELOAD"] = True
            if x == 1 and split:
                const["DV1_ONLY"] = True
        if all(grid):
            launch(kern, grid, q, k1, k2, v1, v2, do, lse, delta, *out, *args, **const)
    if split and dk1f is not dk1:
        dk1.copy_(dk1f)
    return dq, dk1, dk2, dv1, dv2


class _Simplicial(torch.autograd.Function):
    """(q, k1, k2, v1, v2) -> (o, lse), both differentiable, through the launchers."""

    @staticmethod
    def forward(ctx, q, k1, k2, v1, v2, args):
        o, lse = _forward(q, k1, k2, v1, v2, *args)
        ctx.save_for_backward(q, k1, k2, v1, v2, o, lse)
        ctx.args = args
        ctx.set_materialize_grads(False)  # no (B, H, N) zeros when the LSE is not used
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k1, k2, v1, v2, o, lse = ctx.saved_tensors
        if do is None and dlse is None:
            return (None,) * 6
        do = torch.zeros_like(o) if do is None else do
        return (*_backward(do, dlse, q, k1, k2, v1, v2, o, lse, *ctx.args), None)


# ----------------------------------------------------------------------------- public API


def _kernel_attention(q, k1, k2, v1, v2, causal, scale, return_lse, w1, w2, opts):
    _check(q, k1, k2, v1, v2, causal, w1, w2, "simplicial")
    _check_kernel(q)
    args = (bool(causal), w1, w2, _check_scale(q, scale), opts)
    o, lse = _Simplicial.apply(q, k1, k2, v1, v2, args)
    return (o, lse) if return_lse else o


def simplicial_attention(q, k1, k2, v1, v2, *, causal=False, scale=None, return_lse=False):
    """Triton 2-simplicial attention, full or causal, default tiles (windows: build it with
    ``build_simplicial(w1=..., w2=...)``). See the module docstring for shapes."""
    return _kernel_attention(q, k1, k2, v1, v2, causal, scale, return_lse, None, None, {})


_DEFAULTS = {"w1": None, "w2": None, "impl": "triton", "fwd_kernel": None, "bwd_kernel": None,
             **dict.fromkeys(_OPTIONS)}  # fmt: skip
_ALLOWED = {
    "block_m": (16, 32, 64, 128),
    "block_n1": (1, 2, 4, 8, 16, 32),
    "block_n2": (16, 32, 64, 128),
    "num_warps": (1, 2, 4, 8, 16),
    "num_stages": (1, 2, 3, 4, 5),
    "heads_per_tile": (1, 2, 4, 8, 16, 32, 64, 128),
    "fwd_kernel": _FWD_KERNELS,
    "bwd_kernel": _BWD_KERNELS,
}


class SimplicialAttention:
    """A bound 2-simplicial op: ``attn(q, k1, k2, v1, v2, *, causal=False, scale=None,
    return_lse=False)``, plus ``check`` so that a model can refuse a combination before it
    is built. Made by :func:`build_simplicial`."""

    name = "simplicial"

    def __init__(self, options: dict):
        self.options = options
        self.w1, self.w2 = options["w1"], options["w2"]
        self._opts = {n: options[n] for n in (*_OPTIONS, "fwd_kernel", "bwd_kernel")}

    def __call__(self, q, k1, k2, v1, v2, *, causal=False, scale=None, return_lse=False):
        if self.options["impl"] == "reference":
            return simplicial_reference(q, k1, k2, v1, v2, causal=causal, w1=self.w1,
                                        w2=self.w2, scale=scale, return_lse=return_lse)  # fmt: skip
        return _kernel_attention(q, k1, k2, v1, v2, causal, scale, return_lse, self.w1, self.w2,
                                 self._opts)  # fmt: skip

    def check(self, *, head_dim=None, n_heads=None, n_kv_heads=None, dtype=None, device=None,
              causal=False, seq_len=None) -> None:  # fmt: skip
        """Raise ValueError naming every unsupported part of this combination."""
        problems, kernel = [], self.options["impl"] == "triton"
        if kernel and head_dim is not None and head_dim not in _HEAD_DIMS:
            problems.append(f"head_dim {head_dim} (supported: {_HEAD_DIMS})")
        if kernel and dtype is not None and dtype not in _DTYPES:
            problems.append(f"dtype {dtype} (supported: {', '.join(map(str, _DTYPES))})")
        if n_heads is not None and n_kv_heads is not None and (n_kv_heads <= 0 or n_heads % n_kv_heads):  # fmt: skip
            problems.append(f"n_kv_heads {n_kv_heads} must divide n_heads {n_heads}")
        if kernel and device is not None and torch.device(device).type != "cuda" and not _INTERPRET:  # fmt: skip
            problems.append(f"device {torch.device(device).type!r} (the kernels need 'cuda')")
        windowed = self.w1 is not None or self.w2 is not None
        if windowed and not causal:
            problems.append(f"non-causal use of windows w1={self.w1}, w2={self.w2}")
        for name, w in (("w1", self.w1), ("w2", self.w2)):
            if w is not None and seq_len is not None and w > seq_len:
                problems.append(f"window {name}={w} larger than the sequence length {seq_len}")
        if problems:
            raise ValueError("'simplicial' does not support: " + "; ".join(problems))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
        return f"SimplicialAttention({opts})"


def build_simplicial(**options) -> SimplicialAttention:
    """Bind 2-simplicial options once: ``w1``, ``w2`` (windows, None = unbounded), ``impl``
    ('triton' or 'reference'), tiles ``block_m`` (rows: positions x heads), ``block_n1``,
    ``block_n2``, ``num_warps``, ``num_stages``, ``heads_per_tile`` (1: sequence-tiled; > 1:
    head-packed GQA tiling; None: defaults), ``fwd_kernel`` ('auto'/None: the one-position
    kernel where heads_per_tile == block_m, else the general one; 'packed1': the one-position
    kernel, an error where tiles hold several positions; 'tiled': always the general one),
    ``bwd_kernel`` (the backward's kernels: 'auto'/None the one-position ones behind the
    one-position forward, else the general ones; 'tiled' always the general ones; 'packed1' the
    one-position ones, an error where the forward's tiles hold several positions). Unknown or invalid options raise ValueError."""
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise ValueError(
            f"'simplicial' got unknown option(s) {', '.join(unknown)}; valid options: "
            f"{', '.join(sorted(_DEFAULTS))}"
        )
    opts = {**_DEFAULTS, **options}
    for name in ("w1", "w2"):
        _check_window(name, opts[name], n=2**62)
    if opts["impl"] not in ("triton", "reference"):
        raise ValueError(f"'simplicial' option impl={opts['impl']!r}: use 'triton' or 'reference'")
    for name, allowed in _ALLOWED.items():
        if opts[name] is not None and opts[name] not in allowed:
            raise ValueError(
                f"'simplicial' option {name}={opts[name]!r}: use None (auto) or one of {allowed}"
            )
    return SimplicialAttention(opts)
