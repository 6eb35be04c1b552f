"""Attention kernel latency: our backends against PyTorch's in the same process.

    python scripts/bench_attention.py [--shape 4,16,4096,64] [--causal] [--out bench_attention.json]
    python scripts/bench_attention.py --na 2d     # neighborhood: 1d, 2d, 3d, large2d (issue 3)
    python scripts/bench_attention.py --plot --out na_kernel_sizes.json   # + na_kernel_sizes.png
    python scripts/bench_attention.py --na 2d --sweep [--flat both] [--configs "64,32,4,3;..."]
        [--sweep-part dq|dkdv]

Dense: ``ops.build("flash")`` against SDPA's flash and cuDNN backends. Neighborhood (``--na``):
``ops.build("neighborhood")`` against FlexAttention (compiled, block mask from the same NATTEN
rule, scripts/natten_flex.py). Forward and forward+backward, bf16, median of
triton.testing.do_bench. Prints the floor (FLOPs / 790 TFLOP/s, bytes / 3.0 TB/s) beside each
time, and writes JSON. ``--plot``: 2-D latency against kernel size (ours vs Flex, fwd and
fwd+bwd) as JSON and PNG. ``--sweep``: our forward and backward launchers per tile config.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import ops  # noqa: E402

MATMUL_PEAK, HBM = 790e12, 3.0e12  # measured bf16 matmul rate and copy bandwidth (KINDS.md)


def floors(b, h, n, d, causal, bwd):
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0) * (3.5 if bwd else 1.0)
    byts = 2 * b * n * h * d * (4 if not bwd else 10)  # q,k,v,o (+ do, dq, dk, dv, o, lse-ish)
    return flops / MATMUL_PEAK * 1e3, byts / HBM * 1e3, flops


def run(fn, q, k, v, bwd):
    import triton

    if not bwd:
        return triton.testing.do_bench(lambda: fn(q, k, v), return_mode="median")
    go = torch.randn_like(q)

    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), go)

    return triton.testing.do_bench(step, return_mode="median")


# The neighborhood cases: (B, H, token shape, D, kernel per axis).
NA_CASES = {
    "1d": (1, 16, (32768,), 128, (2049,)),
    "2d": (2, 8, (128, 128), 64, (13, 13)),
    "3d": (1, 8, (32, 32, 32), 64, (7, 7, 7)),
    "large2d": (1, 24, (256, 256), 128, (80, 80)),
}


def na_rows(b, h, shape, d, ks) -> list[dict]:
    """Ours and FlexAttention (same NATTEN rule as a block mask), fwd and fwd+bwd, one shape."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from scripts.natten_flex import natten_mask_mod

    n, nd = math.prod(shape), len(shape)
    ones = (1,) * nd
    q, k, v = (torch.randn(b, *shape, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))  # fmt: skip
    ours = ops.build("neighborhood", kernel_size=list(ks))
    mask = natten_mask_mod(shape, ks, ones, ones, (False,) * nd)
    block_mask = create_block_mask(mask, None, None, n, n, device="cuda")
    flex = torch.compile(flex_attention)

    def flex_fn(q, k, v):
        qf, kf, vf = (t.reshape(b, n, h, d).transpose(1, 2) for t in (q, k, v))
        return flex(qf, kf, vf, block_mask=block_mask).transpose(1, 2).reshape(q.shape)

    window = math.prod(ks)
    rows = []
    for name, fn in {"ours neighborhood": lambda q, k, v: ours(q, k, v), "flex": flex_fn}.items():
        for bwd in (False, True):
            ms = run(fn, q, k, v, bwd)
            flops = 4 * b * h * n * window * d * (3.5 if bwd else 1.0)
            byts = 2 * b * n * h * d * (10 if bwd else 4)
            rows.append({"impl": name, "pass": "fwd+bwd" if bwd else "fwd", "ms": ms,
                         "tflops": flops / ms / 1e9, "floor_flops_ms": flops / MATMUL_PEAK * 1e3,
                         "floor_bytes_ms": byts / HBM * 1e3, "kernel": list(ks)})  # fmt: skip
    return rows


def _env(**extra) -> dict:
    """Card, versions and date for a benchmark's JSON (shared by the scripts/bench_*.py)."""
    import platform

    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), **extra}  # fmt: skip


def bench_na(case: str, out: str) -> None:
    b, h, shape, d, ks = NA_CASES[case]
    rows = na_rows(b, h, shape, d, ks)
    env = _env(case=case, B=b, H=h, tokens=shape, D=d, kernel=ks)
    Path(out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print_table(f"NA {case}: B={b} H={h} tokens={shape} D={d} kernel={ks} bf16", env, rows)


PLOT_KERNELS = (3, 5, 7, 9, 13, 17, 25, 33)


def plot_na(out: str) -> None:
    """2-D, B=2 H=8 128x128 D=64: latency against kernel size, ours vs Flex -> JSON + PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, h, shape, d = 2, 8, (128, 128), 64
    rows = []
    for kk in PLOT_KERNELS:
        rows += na_rows(b, h, shape, d, (kk, kk))
        torch._dynamo.reset()  # a new block mask per kernel size: let Flex recompile freely
        print(f"kernel {kk}x{kk}: " + ", ".join(f"{r['impl']} {r['pass']} {r['ms']:.3f} ms"
                                                for r in rows[-4:]), flush=True)  # fmt: skip
    env = _env(B=b, H=h, tokens=shape, D=d, kernels=PLOT_KERNELS)
    Path(out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for impl, color in (("ours neighborhood", "C0"), ("flex", "C1")):
        for pas, style in (("fwd", "--"), ("fwd+bwd", "-")):
            pts = [
                (r["kernel"][0], r["ms"]) for r in rows if r["impl"] == impl and r["pass"] == pas
            ]
            ax.plot(*zip(*pts), style, color=color, marker="o", label=f"{impl} {pas}")
    ax.set_xlabel("kernel size (k x k)")
    ax.set_ylabel("ms (median)")
    ax.set_yscale("log")
    ax.set_title(f"2-D NA, B={b} H={h} {shape[0]}x{shape[1]} D={d} bf16, {env['gpu']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = str(Path(out).with_suffix(".png"))
    fig.savefig(png, dpi=120)
    print(f"wrote {out} and {png}")


SWEEP = [
    (bm, bn, w, st)
    for bm, bn in ((32, 32), (32, 64), (64, 32), (64, 64), (128, 64), (128, 128))
    for w in (4, 8)
    for st in (2, 3)
]


def sweep_na(case: str, out: str, flats=(None,), configs=None, part: str = "all") -> None:
    """Time our forward and backward launchers separately for each tile config of SWEEP (the
    defaults come from the fastest rows; docs/benchmarks.md). part="dq" / "dkdv" (2-D/3-D):
    vary only that backward kernel's tiles (the other keeps its default), timing the backward."""
    import triton

    from ops import neighborhood as na
    from ops.neighborhood_ref import check_window

    b, h, shape, d, ks = NA_CASES[case]
    q, k, v = (torch.randn(b, *shape, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ks3, ds, ss, cs = check_window(shape, list(ks), 1, 1, False)
    nd = len(shape)
    win = (ks3[0], ds[0], ss[0], cs[0]) if nd == 1 else (ks3, ds, ss, cs)
    fwd, bwd = (na._forward, na._backward) if nd == 1 else (na._forward_nd, na._backward_nd)
    scale = d**-0.5
    env = _env(case=case)
    rows = []
    for (bm, bn, w, st), flat in itertools.product(configs or SWEEP, flats):
        opts = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, flat_tiles=flat)
        if part != "all":
            opts = dict(block_m=None, block_n=None, num_warps=None, num_stages=None,
                        flat_tiles=flat, **{f"{part}_tiles": (bm, bn, w, st)})  # fmt: skip
        try:
            o, lse = fwd(q, k, v, win, scale, opts)
            do = torch.randn_like(o)
            f_ms = triton.testing.do_bench(partial(fwd, q, k, v, win, scale, opts),
                                           return_mode="median")  # fmt: skip
            b_ms = triton.testing.do_bench(partial(bwd, do, None, q, k, v, o, lse, win, scale,
                                                   opts), return_mode="median")  # fmt: skip
        except Exception as e:  # out of shared memory etc.: report and go on
            print(f"{opts}: {type(e).__name__}: {str(e)[:80]}")
            continue
        rows.append({**opts, "block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st,
                     "part": part, "fwd_ms": f_ms, "bwd_ms": b_ms})  # fmt: skip
        Path(out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))  # so far
        print(f"bm={bm:<4} bn={bn:<4} warps={w} stages={st} flat={flat}  fwd {f_ms:7.3f} ms  bwd {b_ms:7.3f} ms",
              flush=True)  # fmt: skip
    best_f = min(rows, key=lambda r: r["fwd_ms"])
    best_b = min(rows, key=lambda r: r["bwd_ms"])
    print(f"best fwd: {best_f}\nbest bwd: {best_b}")


def print_table(title, env, rows):
    print(f"\n{env['gpu']} | torch {env['torch']} | {title}")
    print(f"{'impl':<18} {'pass':<8} {'ms':>8} {'TFLOP/s':>8} {'floor(FLOP)':>11} {'floor(B)':>9}")
    for r in rows:
        print(
            f"{r['impl']:<18} {r['pass']:<8} {r['ms']:8.3f} {r['tflops']:8.1f} {r['floor_flops_ms']:11.3f} {r['floor_bytes_ms']:9.3f}"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4,16,4096,64", help="B,H,N,D")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--na", choices=sorted(NA_CASES), help="a neighborhood-attention case instead")
    ap.add_argument("--sweep", action="store_true", help="with --na: time tile configs of ours")
    ap.add_argument("--flat", choices=["auto", "both"], default="auto",
                    help="with --sweep: 2-D/3-D flat_tiles auto, or both True and False")  # fmt: skip
    ap.add_argument("--plot", action="store_true", help="2-D latency vs kernel size, ours vs Flex")
    ap.add_argument("--configs", default="", help='with --sweep: "bm,bn,warps,stages;..."')
    ap.add_argument("--sweep-part", default="all", choices=["all", "dq", "dkdv"],
                    help="with --sweep (2-D/3-D): tile only this backward kernel")  # fmt: skip
    ap.add_argument("--out", default="bench_attention.json")
    args = ap.parse_args()
    if args.plot:
        return plot_na(args.out)
    if args.na and args.sweep:
        flats = {"auto": (None,), "both": (True, False)}[args.flat]
        configs = [tuple(map(int, c.split(","))) for c in args.configs.split(";") if c.strip()]
        return sweep_na(args.na, args.out, flats, configs or None, args.sweep_part)
    if args.na:
        return bench_na(args.na, args.out)
    b, h, n, d = map(int, args.shape.split(","))
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    flash = ops.build("flash")

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=args.causal
                ).transpose(1, 2)

        return fn

    def sdpa_default(q, k, v):  # whichever backend PyTorch picks (what ops.build("sdpa") runs)
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=args.causal
        ).transpose(1, 2)

    impls = {
        "ours flash": lambda q, k, v: flash(q, k, v, causal=args.causal),
        "sdpa default": sdpa_default,
        "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    rows = []
    for name, fn in impls.items():
        for bwd in (False, True):
            try:
                ms = run(fn, q, k, v, bwd)
            except Exception as e:  # a backend missing on this build: report, don't hide
                print(f"{name} {'fwd+bwd' if bwd else 'fwd'} failed: {type(e).__name__}: {e}")
                continue
            f_ms, b_ms, flops = floors(b, h, n, d, args.causal, bwd)
            rows.append(
                {
                    "impl": name,
                    "pass": "fwd+bwd" if bwd else "fwd",
                    "ms": ms,
                    "tflops": flops / ms / 1e9,
                    "floor_flops_ms": f_ms,
                    "floor_bytes_ms": b_ms,
                }
            )
    env = _env(shape=[b, h, n, d], causal=args.causal, dtype="bf16")
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(
        f"\n{env['gpu']} | torch {env['torch']} | triton {env['triton']} | B,H,N,D={b},{h},{n},{d} causal={args.causal} bf16"
    )
    print(f"{'impl':<11} {'pass':<8} {'ms':>8} {'TFLOP/s':>8} {'floor(FLOP)':>11} {'floor(B)':>9}")
    for r in rows:
        print(
            f"{r['impl']:<11} {r['pass']:<8} {r['ms']:8.3f} {r['tflops']:8.1f} {r['floor_flops_ms']:11.3f} {r['floor_bytes_ms']:9.3f}"
        )


if __name__ == "__main__":
    main()
