"""2-simplicial attention speed (issue 7): TFLOP/s of our Triton kernels against dense SDPA.

    python scripts/bench_simplicial.py [--out bench_simplicial.json] [--dtype bf16]
        [--cases window_gqa,gpt2] [--no-bwd] [--bwd-kernels auto,packed1] [--sweep-bwd-tiles]
        [--sweep-kernels dqdk1,dv1] [--separate] [--dk1-plain]

Cases (causal, heads-last (B, N, H, D)):
  window_gqa: B=4, 64 q heads on 1 k/v head, D=128, N=16384, w1=32, w2=512 (Fast and Simplex's
              shape), head-packed tiling (auto) and sequence-tiled (heads_per_tile=1);
  gpt2:       B=8, H=12 (no GQA), D=64, N=1024, w1=w2=64, sequence-tiled.

FLOPs: the issue's count for the forward, 4 B Hq N D w1 w2 (2 D for the score and 2 D for the
value product of each (i, j, k) triple in the window; the triangle at the start is counted
full). Backward: 3.5x the forward (the score recomputed once, dP, and the five gradient
products dQ, dK1, dK2, dV1, dV2, 2 D each per triple); our kernels recompute more than that.
Yardstick, in the same run: dense (non-causal) PyTorch SDPA with the same FLOPs, i.e. the same
B, Hq, D and N queries against w1 * w2 keys (its backward counted 2.5x its forward).
Median times of ``triton.testing.do_bench``. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ops  # noqa: E402

# name: (B, Hq, Hkv, D, N, w1, w2, [(label, build options)])
CASES = {
    "window_gqa": (4, 64, 1, 128, 16384, 32, 512,
                   [("head-packed", {}), ("sequence-tiled", {"heads_per_tile": 1})]),
    "gpt2": (8, 12, 12, 64, 1024, 64, 64, [("sequence-tiled", {})]),
}  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")


def _fwd_bwd_ms(fwd, inputs, bwd: bool) -> tuple[float, float | None]:
    """Median ms of the forward, and of the backward alone (graph kept between runs)."""
    with torch.no_grad():
        t_fwd = _ms(lambda: fwd(*inputs))
    if not bwd:
        return t_fwd, None
    out = fwd(*inputs)
    grad = torch.randn_like(out)
    t_bwd = _ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True))
    return t_fwd, t_bwd


def _sdpa(q, k, v):
    """Dense non-causal SDPA on heads-last tensors (k/v given per q head: the same FLOPs, and
    every SDPA backend takes it)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _rows(name: str, dtype, bwd: bool, bwd_kernels=("auto",)) -> list[dict]:
    b, h, hkv, d, n, w1, w2, variants = CASES[name]
    if h > hkv:  # head-packed rows once per backward kernel choice
        variants = [
            (label if k == "auto" else f"{label} bwd {k}", {**o, "bwd_kernel": k})
            for label, o in variants
            for k in (bwd_kernels if not o.get("heads_per_tile") else ["auto"])
        ]
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, device="cuda", generator=g).to(dtype).requires_grad_()

    flops = 4 * b * h * n * d * w1 * w2
    rows = []
    xs = [rand(b, n, h, d)] + [rand(b, n, hkv, d) for _ in range(4)]
    for label, options in variants:
        attn = ops.build_simplicial(w1=w1, w2=w2, **options)
        t_fwd, t_bwd = _fwd_bwd_ms(lambda *t, attn=attn: attn(*t, causal=True), xs, bwd)
        rows.append(_row(name, f"simplicial {label}", flops, 3.5, t_fwd, t_bwd))
    del xs
    sd = [rand(b, n, h, d), rand(b, w1 * w2, h, d), rand(b, w1 * w2, h, d)]  # k/v per q head
    t_fwd, t_bwd = _fwd_bwd_ms(_sdpa, sd, bwd)
    rows.append(_row(name, f"SDPA dense {n}x{w1 * w2}", flops, 2.5, t_fwd, t_bwd))
    return rows


def _row(case, label, flops, bwd_factor, t_fwd, t_bwd) -> dict:
    row = {"case": case, "kernel": label, "fwd_ms": t_fwd, "fwd_tflops": flops / t_fwd / 1e9}
    if t_bwd is not None:
        row.update(bwd_ms=t_bwd, bwd_tflops=bwd_factor * flops / t_bwd / 1e9)
    return row


def _print(rows: list[dict]) -> None:
    print(
        f"{'case':<11} {'kernel':<30} {'fwd ms':>9} {'fwd TF/s':>9} {'bwd ms':>9} {'bwd TF/s':>9}"
    )
    for r in rows:
        bwd = (
            f"{r['bwd_ms']:9.2f} {r['bwd_tflops']:9.1f}" if "bwd_ms" in r else f"{'-':>9} {'-':>9}"
        )
        print(f"{r['case']:<11} {r['kernel']:<30} {r['fwd_ms']:9.2f} {r['fwd_tflops']:9.1f} {bwd}")


# (block_n2, num_warps, num_stages) candidates of each packed1 backward kernel, the 16-bit
# default first (ops/simplicial.py _BWD_PACKED1; 16-bit runs dK2/dV2 transposed, dk2dv2_t). The
# second sweep's list; the first's (the offline ptxas picks, 8 warps): docs/benchmarks.md
_SWEEP = {
    "dq": [(64, 4, 1), (64, 4, 2), (128, 4, 1), (32, 4, 1), (64, 2, 1), (128, 8, 1)],
    "dk1dv1": [(32, 4, 3), (32, 4, 2), (32, 4, 1), (32, 4, 4), (64, 4, 1)],
    # the same kernel reading q and dO again after its k2 loop (ops.simplicial.DK1_RELOAD)
    "dk1dv1_r": [(32, 4, 3), (32, 4, 2), (32, 4, 1), (32, 4, 4), (16, 4, 3), (64, 4, 2)],
    "dk2dv2": [(64, 4, 1), (64, 4, 2), (128, 4, 1), (64, 2, 1)],
    # the same kernel accumulating dK2^T, dV2^T (ops.simplicial.DK2_TRANSPOSED)
    "dk2dv2_t": [(32, 4, 1), (32, 4, 2), (64, 4, 1), (64, 4, 2), (32, 2, 1), (16, 2, 1)],
    # the split backward (ops.simplicial.DQ_DK1): dQ with dK1, and dV1 alone
    "dqdk1": [(32, 4, 3), (32, 4, 1), (32, 4, 2), (64, 4, 1), (16, 4, 3), (16, 4, 1)],
    "dv1": [(64, 4, 2), (64, 4, 1), (32, 4, 3), (32, 4, 2), (128, 4, 1), (64, 4, 3)],
}
_KERNEL_NAMES = {"dq": "_dq_packed1_kernel", "dk1dv1": "_dk1dv1_packed1_kernel",
                 "dk1dv1_r": "_dk1dv1_packed1_kernel",
                 "dk2dv2": "_dk2dv2_packed1_kernel",
                 "dk2dv2_t": "_dk2dv2_packed1_kernel",
                 "dqdk1": "_dqdk1_packed1_kernel", "dv1": "_dk1dv1_packed1_kernel"}  # fmt: skip


def _sweep_bwd_tiles(name: str, dtype, reps: int = 2, kernels=None) -> list[dict]:
    """Each packed1 backward kernel's GPU time (torch.profiler, mean of ``reps`` backward
    passes) with each candidate tile configuration, the other two at their defaults; the
    defaults are not changed."""
    from torch.profiler import ProfilerActivity, profile

    from ops import simplicial

    b, h, hkv, d, n, w1, w2, _ = CASES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(b, n, h, d, device="cuda", generator=g).to(dtype).requires_grad_()]
    xs += [torch.randn(b, n, hkv, d, device="cuda", generator=g).to(dtype).requires_grad_()
           for _ in range(4)]  # fmt: skip
    attn = ops.build_simplicial(w1=w1, w2=w2, bwd_kernel="packed1")
    out = attn(*xs, causal=True)
    grad = torch.randn_like(out)
    flops = 4 * b * h * n * d * w1 * w2
    rows = []
    for kernel, configs in _SWEEP.items():
        if kernels and kernel not in kernels:
            continue
        hook = kernel.removesuffix("_t").removesuffix("_r")
        # the form swept; the others at their defaults (None), so backward_ms is the total
        simplicial.DK2_TRANSPOSED = {"dk2dv2": False, "dk2dv2_t": True}.get(kernel)
        simplicial.DK1_RELOAD = {"dk1dv1": False, "dk1dv1_r": True}.get(kernel)
        # dq and dk1dv1 are the separate kernels; dk2dv2 runs beside the default split
        simplicial.DQ_DK1 = {"dq": False, "dk1dv1": False, "dk1dv1_r": False}.get(kernel)
        for cfg in configs:
            simplicial.BWD_PACKED1_TILES[hook] = cfg
            row = {"case": name, "kernel": kernel, "tiles": cfg}
            try:
                torch.autograd.grad(out, xs, grad, retain_graph=True)  # compile
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(reps):
                        torch.autograd.grad(out, xs, grad, retain_graph=True)
                    torch.cuda.synchronize()
                times = {e.key: e.self_device_time_total / reps / 1e3
                         for e in prof.key_averages()}  # fmt: skip
                row["ms"] = times.get(_KERNEL_NAMES[kernel], float("nan"))
                row["backward_ms"] = sum(times.values())
                row["backward_tflops"] = 3.5 * flops / row["backward_ms"] / 1e9
            except Exception as e:  # out of shared memory, a compile failure: report, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
        simplicial.BWD_PACKED1_TILES[hook] = None
    simplicial.DK2_TRANSPOSED = None
    simplicial.DK1_RELOAD = None
    simplicial.DQ_DK1 = None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_simplicial.json")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--bwd-kernels", default="auto",
                    help="comma list of bwd_kernel values for the head-packed rows, e.g. "
                    "auto,packed1 (each a row)")  # fmt: skip
    ap.add_argument("--sweep-bwd-tiles", action="store_true",
                    help="time each packed1 backward kernel (torch.profiler) with each candidate "
                    "tile config of _SWEEP on the first case, then exit")  # fmt: skip
    ap.add_argument("--sweep-kernels", default="",
                    help="comma list of _SWEEP entries to sweep (default: all)")  # fmt: skip
    ap.add_argument("--dk1-plain", action="store_true",
                    help="the rows with ops.simplicial.DK1_RELOAD off (dK1/dV1 holds q and dO "
                    "through its k2 loop, as before the 16-bit default read them again)")  # fmt: skip
    ap.add_argument("--separate", action="store_true",
                    help="the rows with ops.simplicial.DQ_DK1 off (the separate dQ and dK1/dV1 "
                    "kernels, as before the split backward)")  # fmt: skip
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_simplicial needs a CUDA GPU (the CPU tests cover correctness)")
    from scripts.bench_attention import _env

    if args.sweep_bwd_tiles:
        case = args.cases.split(",")[0]
        kernels = [k for k in args.sweep_kernels.split(",") if k]
        if unknown := set(kernels) - set(_SWEEP):
            sys.exit(f"--sweep-kernels: unknown {sorted(unknown)}; known: {', '.join(_SWEEP)}")
        rows = _sweep_bwd_tiles(case, DTYPES[args.dtype], kernels=kernels)
        env = _env(dtype=args.dtype, case=CASES[case][:7])
        Path(args.out).write_text(json.dumps({"env": env, "sweep": rows}, indent=2))
        print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {args.dtype}, causal")
        for r in rows:
            ms = f"{r['ms']:9.2f} ms" if "ms" in r else r["error"]
            print(f"{r['kernel']:<7} {str(r['tiles']):<14} {ms}")
        return

    from ops import simplicial

    simplicial.DK1_RELOAD = False if args.dk1_plain else None
    simplicial.DQ_DK1 = False if args.separate else None
    rows = []
    for name in args.cases.split(","):
        if name not in CASES:
            sys.exit(f"unknown case {name!r}; valid: {', '.join(CASES)}")
        rows += _rows(name, DTYPES[args.dtype], not args.no_bwd, args.bwd_kernels.split(","))
        torch.cuda.empty_cache()
    env = _env(dtype=args.dtype, cases={k: CASES[k][:7] for k in args.cases.split(",")},
               dk1_plain=args.dk1_plain, separate=args.separate)  # fmt: skip
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {args.dtype}, causal")
    _print(rows)


if __name__ == "__main__":
    main()
