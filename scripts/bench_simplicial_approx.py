"""Where the polynomial method for 2-simplicial attention holds and where it breaks (issue 7).

    python scripts/bench_simplicial_approx.py [--out bench_simplicial_approx.json] [--device cpu]

1. Error: relative error ||o - o_exact|| / ||o_exact|| of ``ops.simplicial_approx`` (full form,
   float64) against the exact ``ops.simplicial_reference``, for entry bounds beta (inputs scaled
   so that max |s <q_i, k1_j * k2_k>| = beta), degrees 1-4 and sequence lengths 64-512.
2. Time: the degree-3 approximation against exact attention as n grows (float32, median of 3),
   exact only up to where its n^3 cost stays under a few seconds.

B=1, H=2, D=8, random Gaussian inputs. Prints both tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ops  # noqa: E402
from ops.simplicial_approx import simplicial_polynomial  # noqa: E402

BOUNDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
DEGREES = (1, 2, 3, 4)
LENS = (64, 128, 256, 512)
TIME_LENS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
EXACT_MAX = 512


def _max_entry(q, k1, k2, scale: float) -> float:
    """max over (i, j, k) of |s <q_i, k1_j * k2_k>|, a chunk of queries at a time."""
    best = 0.0
    for i0 in range(0, q.shape[1], 32):
        x = torch.einsum("bihd,bjhd,bkhd->bhijk", q[:, i0 : i0 + 32], k1, k2) * scale
        best = max(best, float(x.abs().max()))
    return best


def _inputs(n, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, 2, d, generator=g, dtype=torch.float64).to(device, dtype)
            for _ in range(5)]  # fmt: skip


def error_rows(d: int, device) -> list[dict]:
    rows = []
    for n in LENS:
        q, k1, k2, v1, v2 = _inputs(n, d, torch.float64, device, seed=n)
        top = _max_entry(q, k1, k2, d**-0.5)
        for beta in BOUNDS:
            qb = q * (beta / top)
            exact = ops.simplicial_reference(qb, k1, k2, v1, v2)
            for g in DEGREES:
                o = simplicial_polynomial(qb, k1, k2, v1, v2, degree=g)
                err = float((o - exact).norm() / exact.norm())
                rows.append({"n": n, "beta": beta, "degree": g, "rel_err": err})
        print(f"errors done for n={n}", flush=True)
    return rows


def _median_time(fn, reps=3) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def time_rows(d: int, device) -> list[dict]:
    rows = []
    for n in TIME_LENS:
        x = _inputs(n, d, torch.float32, device)
        approx = _median_time(lambda x=x: simplicial_polynomial(*x, degree=3))
        exact = (_median_time(lambda x=x: ops.simplicial_reference(*x))
                 if n <= EXACT_MAX else float("nan"))  # fmt: skip
        rows.append({"n": n, "approx_deg3_ms": approx, "exact_ms": exact})
        print(f"n={n}: approx {approx:.1f} ms, exact {exact:.1f} ms", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="bench_simplicial_approx.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dim", type=int, default=8)
    args = ap.parse_args()
    dev = torch.device(args.device)
    env = {"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "B": 1, "H": 2,
           "D": args.dim}  # fmt: skip
    errs = error_rows(args.dim, dev)
    times = time_rows(args.dim, dev)
    Path(args.out).write_text(json.dumps({"env": env, "errors": errs, "times": times}, indent=2))
    print(f"\n{env}\nrelative error of the degree-g polynomial (full form), rows beta, cols n:")
    for g in DEGREES:
        print(f"degree {g}: " + " | ".join(f"n={n}" for n in LENS))
        for beta in BOUNDS:
            cells = [next(r["rel_err"] for r in errs if (r["n"], r["beta"], r["degree"]) == (n, beta, g))
                     for n in LENS]  # fmt: skip
            print(f"  beta {beta:5.2f}: " + " | ".join(f"{c:9.2e}" for c in cells))
    print("\ntime (ms): n | approx degree 3 | exact")
    for r in times:
        ratio = (
            r["exact_ms"] / r["approx_deg3_ms"] if not math.isnan(r["exact_ms"]) else float("nan")
        )
        print(f"  {r['n']:6d} | {r['approx_deg3_ms']:10.1f} | {r['exact_ms']:10.1f} | x{ratio:.1f}")


if __name__ == "__main__":
    main()
