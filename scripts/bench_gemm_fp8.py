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

bf16      ``torch.mm`` on bf16 operands in their natural layouts (cuBLAS transposes for free).
fp8       ``torch._scaled_mm`` with per-tensor scales: X and W in e4m3, dY in e5m2, fast
          accumulation in the forward only (as torchao's float8 training does). The operands
          must be row-major times column-major, so dX and dW also need W, dY and X transposed.
casts     what FP8 adds around the GEMMs: each tensor's absolute maximum, the scaled casts, and
          the transposed copies above, as compiled torch functions (``--no-compile``: eager).

Prints a table (ms a step for each layer kind, with its count per step) and the step it
projects: ``--step-ms`` minus the bf16 GEMMs plus the FP8 GEMMs and casts. That projection
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

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
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


class Timer:
    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps

    def __call__(self, fn) -> float:
        """Median ms of ``fn`` over ``reps`` calls after two warm-up calls."""
        for _ in range(2):
            fn()
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def time_layer(m: int, k: int, n: int, timer: Timer, device: torch.device, cast, cast_both,
               fast_accum: bool = True) -> dict:  # fmt: skip
    """ms of one training step's GEMMs of a (k -> n) linear over m tokens: bf16, fp8, casts."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device=device, generator=g) * k**-0.5).to(torch.bfloat16)
    dy = (torch.randn(m, n, device=device, generator=g) * 1e-3).to(torch.bfloat16)
    bf16 = timer(lambda: (x @ w.t(), dy @ w, dy.t() @ x))
    x8, xt8, sx = cast_both(x, E4M3)  # X for the forward, X^T for dW
    w8, wt8, sw = cast_both(w, E4M3)  # W (n, k) and W^T (k, n)
    dy8, dyt8, sdy = cast_both(dy, E5M2)  # dY for dX, dY^T for dW

    def fp8():
        y = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16,
                             use_fast_accum=fast_accum)  # fmt: skip
        dx = torch._scaled_mm(dy8, wt8.t(), scale_a=sdy, scale_b=sw, out_dtype=torch.bfloat16)
        dw = torch._scaled_mm(dyt8, xt8.t(), scale_a=sdy, scale_b=sx, out_dtype=torch.bfloat16)
        return y, dx, dw

    gemms = timer(fp8)
    # what FP8 adds: X cast (and transposed, for dW), W cast and transposed, dY likewise
    casts = timer(lambda: (cast_both(x, E4M3), cast_both(w, E4M3), cast_both(dy, E5M2)))
    y, dx, dw = fp8()  # near the bf16 products: a check that the layouts are right
    err = max(float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))
              for a, b in ((y, x @ w.t()), (dx, dy @ w), (dw, dy.t() @ x)))  # fmt: skip
    return {"bf16_ms": bf16, "fp8_gemm_ms": gemms, "cast_ms": casts, "rel_err": err}


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
    cast, cast_both = _to_fp8, _to_fp8_both
    if not args.no_compile and device.type == "cuda":
        cast_both = torch.compile(_to_fp8_both, dynamic=False)
    timer = Timer(device, args.reps)
    rows = []
    for name, k, n, count in LAYERS:
        r = time_layer(args.tokens, k, n, timer, device, cast, cast_both, not args.slow_accum)
        rows.append({"layer": name, "in": k, "out": n, "count": count, **r})
    tot = {key: sum(r[key] * r["count"] for r in rows) for key in ("bf16_ms", "fp8_gemm_ms",
                                                                  "cast_ms")}  # fmt: skip
    fp8_total = tot["fp8_gemm_ms"] + tot["cast_ms"]
    projected = args.step_ms - tot["bf16_ms"] + fp8_total
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{name} | torch {torch.__version__} | {args.tokens} tokens a step | casts "
          f"{'eager' if args.no_compile or device.type != 'cuda' else 'compiled'} | ms a step "
          f"(each layer's three GEMMs x its count)")  # fmt: skip
    print(f"{'layer':<10}{'k->n':>12}{'count':>6}{'bf16':>9}{'fp8 GEMMs':>11}{'casts':>8}"
          f"{'fp8 all':>9}{'speed-up':>10}{'rel err':>9}")  # fmt: skip
    for r in rows:
        c = r["count"]
        all8 = (r["fp8_gemm_ms"] + r["cast_ms"]) * c
        print(f"{r['layer']:<10}{str(r['in']) + '->' + str(r['out']):>12}{c:>6}"
              f"{r['bf16_ms'] * c:>9.2f}{r['fp8_gemm_ms'] * c:>11.2f}{r['cast_ms'] * c:>8.2f}"
              f"{all8:>9.2f}{r['bf16_ms'] * c / all8:>9.2f}x{r['rel_err']:>9.3f}")  # fmt: skip
    print(f"{'all':<28}{tot['bf16_ms']:>9.2f}{tot['fp8_gemm_ms']:>11.2f}{tot['cast_ms']:>8.2f}"
          f"{fp8_total:>9.2f}{tot['bf16_ms'] / fp8_total:>9.2f}x")  # fmt: skip
    print(f"\nbf16 GEMMs here {tot['bf16_ms']:.2f} ms against {args.bf16_gemm_ms:.2f} in the "
          f"profiled step. Projected step with FP8 linears: {args.step_ms:.2f} - "
          f"{tot['bf16_ms']:.2f} + {fp8_total:.2f} = {projected:.2f} ms, "
          f"{args.baseline_ms / projected:.3f}x the minimal loop's {args.baseline_ms:.1f} ms "
          f"(the goal: 1.2x)")  # fmt: skip
    result = {"device": name, "torch": torch.__version__, "args": vars(args), "rows": rows,
              "totals": tot, "projected_step_ms": projected,
              "projected_vs_minimal": args.baseline_ms / projected}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
