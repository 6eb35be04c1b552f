"""How far FP8 GEMMs could take GPT-2's training step: each GEMM of a step in bf16 and in FP8.

    python scripts/bench_gemm_fp8.py [--tokens 32768] [--step-ms 68.96] [--bf16-gemm-ms 35.19]

Issue 6 asks for 1.2x the minimal loop's tokens/s with the model unchanged. The twentieth
session's profile (docs/benchmarks.md) put 35.2 ms of our 69.0 ms step (H100, B=32, T=1024) in
cuBLAS bf16 GEMMs at 70-74% of the dense peak, and found that 1.2x needs either the
memory-bound work halved or faster GEMMs, which on an H100 means FP8 (a change of the model's
arithmetic, so the issue owner's call). This script prices the FP8 route before anything is
built on it. For every linear layer of GPT-2 124M (12 blocks of qkv 768->2304, attention
projection 768->768, fc 768->3072, MLP projection 3072->768; the 768->50304 head once) it times
the three GEMMs of a training step (forward Y = X W^T, dX = dY W, dW = dY^T X):

bf16        ``torch.mm`` on bf16 operands in their natural layouts (cuBLAS transposes for free).
tensorwise  ``torch._scaled_mm`` with a scale a tensor: X and W in e4m3, dY in e5m2, all three
            GEMMs in FP8, fast accumulation in the forward only (as torchao's float8 training
            does). The operands must be row-major times column-major, so dX and dW also need
            W, dY and X transposed.
rowwise     a scale a row of each operand along the contracted dimension, everything e4m3;
            the forward and dX in FP8, dW in bf16 (torchao's rowwise recipe with a
            high-precision weight gradient). No activation is transposed; W is cast twice.
casts       what FP8 adds around the GEMMs: the absolute maxima, the scaled casts and the
            transposed copies, as compiled torch functions (``--no-compile``: eager). Fused
            into the kernels that produce the tensors (LayerNorm, GELU), some of this would go.

Prints a table per recipe (ms a step for each layer kind, with its count per step) and the step
it projects: ``--step-ms`` minus the bf16 GEMMs plus the FP8 GEMMs and casts (and, as a bound,
without the casts). That projection
assumes the GEMMs' time in the step equals their time alone; ``--bf16-gemm-ms`` (the profile's
figure) is printed beside this run's bf16 total to check it. The attention's own GEMMs (in the
flash kernel) are not counted. Runs on a CPU too (tiny ``--tokens``, to check the script; the
times mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scripts.bench_efficientvit import median_ms  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
RECIPES = {
    "tensorwise": "a scale a tensor; X, W in e4m3, dY in e5m2; all three GEMMs in FP8",
    "rowwise": "a scale a row along the contracted dimension, all e4m3; dW in bf16",
}
LAYERS = (  # name, in features, out features, count per step (GPT-2 124M)
    ("qkv", 768, 2304, 12),
    ("attn proj", 768, 768, 12),
    ("fc", 768, 3072, 12),
    ("mlp proj", 3072, 768, 12),
    ("lm head", 768, 50304, 1),
)


def _to_fp8(x: torch.Tensor, dtype: torch.dtype):
    """(x scaled into ``dtype``'s range and cast, the inverse scale): per-tensor scaling."""
    amax = x.abs().amax().float().clamp(min=1e-12)
    scale = torch.finfo(dtype).max / amax
    return (x.float() * scale).to(dtype), scale.reciprocal()


def _to_fp8_both(x: torch.Tensor, dtype: torch.dtype):
    """The cast of ``x`` and of its transpose (a contiguous copy), with their inverse scale."""
    x8, inv = _to_fp8(x, dtype)
    return x8, x8.t().contiguous(), inv


def _to_fp8_rows(x: torch.Tensor):
    """(x with each row scaled into e4m3's range and cast, the (rows, 1) inverse scales)."""
    amax = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12)
    scale = torch.finfo(E4M3).max / amax
    return (x.float() * scale).to(E4M3), scale.reciprocal()


def _weight_rows_and_cols(w: torch.Tensor):
    """A weight (n, k) cast per row (the forward's B, scales (1, n)) and per column, stored
    transposed (dX's B, scales (1, k))."""
    w8, sw = _to_fp8_rows(w)
    wt8, swt = _to_fp8_rows(w.t().contiguous())  # row-major (k, n): its .t() is column-major
    return w8, sw.t(), wt8, swt.t()


class Timer:
    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps

    def __call__(self, fn) -> float:
        """Median ms of ``fn`` over ``reps`` calls after two warm-up calls (CUDA events on a
        GPU, ``bench_efficientvit.median_ms``; the wall clock on a CPU)."""
        if self.device.type == "cuda":
            return median_ms(fn, 2, self.reps)
        for _ in range(2):
            fn()
        times = []
        for _ in range(self.reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def time_layer(m: int, k: int, n: int, timer: Timer, device: torch.device, casts: dict,
               fast_accum: bool = True) -> dict:  # fmt: skip
    """ms of one training step's GEMMs of a (k -> n) linear over m tokens: bf16, and for each
    recipe its GEMMs and casts, with the FP8 products' error against bf16."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device=device, generator=g) * k**-0.5).to(torch.bfloat16)
    dy = (torch.randn(m, n, device=device, generator=g) * 1e-3).to(torch.bfloat16)
    ref = (x @ w.t(), dy @ w, dy.t() @ x)
    out = {"bf16_ms": timer(lambda: (x @ w.t(), dy @ w, dy.t() @ x))}
    mm = torch._scaled_mm
    bf = torch.bfloat16

    # tensorwise: one scale a tensor; X, W e4m3, dY e5m2; transposed copies for dX and dW
    both = casts["both"]
    x8, xt8, sx = both(x, E4M3)
    w8, wt8, sw = both(w, E4M3)
    dy8, dyt8, sdy = both(dy, E5M2)
    tensorwise = lambda: (  # noqa: E731
        mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=bf, use_fast_accum=fast_accum),
        mm(dy8, wt8.t(), scale_a=sdy, scale_b=sw, out_dtype=bf),
        mm(dyt8, xt8.t(), scale_a=sdy, scale_b=sx, out_dtype=bf))  # fmt: skip
    tensorwise_casts = lambda: (both(x, E4M3), both(w, E4M3), both(dy, E5M2))  # noqa: E731

    # rowwise: a scale a row of each operand along the contracted dimension, all e4m3; the
    # forward and dX in FP8, dW in bf16 (torchao's rowwise recipe with a high-precision dW)
    rows, wrc = casts["rows"], casts["weight"]
    xr8, sxr = rows(x)
    wr8, swr, wc8, swc = wrc(w)
    dyr8, sdyr = rows(dy)
    rowwise = lambda: (  # noqa: E731
        mm(xr8, wr8.t(), scale_a=sxr, scale_b=swr, out_dtype=bf, use_fast_accum=fast_accum),
        mm(dyr8, wc8.t(), scale_a=sdyr, scale_b=swc, out_dtype=bf),
        dy.t() @ x)  # fmt: skip
    rowwise_casts = lambda: (rows(x), wrc(w), rows(dy))  # noqa: E731

    for name, gemms, cast in (("tensorwise", tensorwise, tensorwise_casts),
                              ("rowwise", rowwise, rowwise_casts)):  # fmt: skip
        got = gemms()  # near the bf16 products: a check that the layouts and scales are right
        err = max(float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))
                  for a, b in zip(got, ref))  # fmt: skip
        out[name] = {"fp8_gemm_ms": timer(gemms), "cast_ms": timer(cast), "rel_err": err}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32 * 1024, help="tokens a step (B x T)")
    ap.add_argument(
        "--step-ms",
        type=float,
        default=68.96,
        help="the bf16 step to project from (ms; default: the twentieth session's)",
    )
    ap.add_argument(
        "--bf16-gemm-ms",
        type=float,
        default=35.19,
        help="the profile's bf16 GEMM time in that step (ms), printed beside ours",
    )
    ap.add_argument(
        "--baseline-ms",
        type=float,
        default=69.1,
        help="the minimal loop's step (ms) that 1.2x is counted against",
    )
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="eager casts")
    ap.add_argument("--slow-accum", action="store_true", help="no fast accumulation anywhere")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        sys.exit("bench_gemm_fp8: FP8 GEMMs need compute capability 8.9 or later (Ada, Hopper)")
    timer = Timer(device, args.reps)
    rows = []
    for name, k, n, count in LAYERS:
        # compiled afresh for each layer: dynamo keeps its compiled versions on the function's
        # code, and every layer's shapes together pass its recompile limit (8), past which it
        # runs eager (the first GPU run did, from the attention projection on)
        casts = {"both": _to_fp8_both, "rows": _to_fp8_rows, "weight": _weight_rows_and_cols}
        if not args.no_compile and device.type == "cuda":
            torch._dynamo.reset()
            casts = {key: torch.compile(fn, dynamic=False) for key, fn in casts.items()}
        r = time_layer(args.tokens, k, n, timer, device, casts, not args.slow_accum)
        rows.append({"layer": name, "in": k, "out": n, "count": count, **r})
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bf16_total = sum(r["bf16_ms"] * r["count"] for r in rows)
    result = {"device": name, "torch": torch.__version__, "args": vars(args), "rows": rows,
              "bf16_ms": bf16_total}  # fmt: skip
    print(f"\n{name} | torch {torch.__version__} | {args.tokens} tokens a step | casts "
          f"{'eager' if args.no_compile or device.type != 'cuda' else 'compiled'} | ms a step "
          f"(each layer's three GEMMs x its count)")  # fmt: skip
    for recipe, what in RECIPES.items():
        print(f"\n{recipe}: {what}")
        print(f"{'layer':<10}{'k->n':>12}{'count':>6}{'bf16':>9}{'fp8 GEMMs':>11}{'casts':>8}"
              f"{'fp8 all':>9}{'speed-up':>10}{'rel err':>9}")  # fmt: skip
        gemms = casts_ms = 0.0
        for r in rows:
            c, q = r["count"], r[recipe]
            gemms, casts_ms = gemms + q["fp8_gemm_ms"] * c, casts_ms + q["cast_ms"] * c
            all8 = (q["fp8_gemm_ms"] + q["cast_ms"]) * c
            print(f"{r['layer']:<10}{str(r['in']) + '->' + str(r['out']):>12}{c:>6}"
                  f"{r['bf16_ms'] * c:>9.2f}{q['fp8_gemm_ms'] * c:>11.2f}{q['cast_ms'] * c:>8.2f}"
                  f"{all8:>9.2f}{r['bf16_ms'] * c / all8:>9.2f}x{q['rel_err']:>9.3f}")  # fmt: skip
        fp8_total = gemms + casts_ms
        projected = args.step_ms - bf16_total + fp8_total
        print(f"{'all':<28}{bf16_total:>9.2f}{gemms:>11.2f}{casts_ms:>8.2f}{fp8_total:>9.2f}"
              f"{bf16_total / fp8_total:>9.2f}x")  # fmt: skip
        print(f"Projected step: {args.step_ms:.2f} - {bf16_total:.2f} + {fp8_total:.2f} = "
              f"{projected:.2f} ms, {args.baseline_ms / projected:.3f}x the minimal loop's "
              f"{args.baseline_ms:.1f} ms (the goal: 1.2x); without the casts (fused into "
              f"their producers at no cost) {args.baseline_ms / (projected - casts_ms):.3f}x")  # fmt: skip
        result[recipe] = {"fp8_gemm_ms": gemms, "cast_ms": casts_ms, "projected_step_ms":
                          projected, "projected_vs_minimal": args.baseline_ms / projected}  # fmt: skip
    print(f"\nbf16 GEMMs here {bf16_total:.2f} ms against {args.bf16_gemm_ms:.2f} in the "
          f"profiled step")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
