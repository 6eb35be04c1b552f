"""HyperAttention against exact attention at long context: time, memory and error (issue 5).

    python scripts/bench_hyper.py [--lens 8192,16384,32768,65536,131072] [--out bench_hyper.json]
        [--heads 32] [--dim 128] [--no-bwd-above 131072] [--hyper "lsh_bits=7,block_size=256"]

B=1, causal, bf16, heads-last (B, N, H, D). In one process, per sequence length: PyTorch SDPA
with the cuDNN and flash backends, our Triton ``flash`` (exact, with LSE) and ``ops.build("hyper")``
(default options unless ``--hyper``), forward and forward+backward (median of
``triton.testing.do_bench``) and peak memory. The approximation's quality is measured against
exact attention on the same inputs: the output's relative error ||o - o_exact|| / ||o_exact||
and the LSE's mean and max absolute error. Inputs are Gaussian, or with ``--structured`` keys
that cluster around a few directions (closer to trained models, where LSH finds the large
entries). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import ops  # noqa: E402
from scripts.bench_attention import _env  # noqa: E402


def _inputs(n, h, d, structured: bool, seed: int = 0):
    """q, k, v (1, N, H, D) bf16 requiring grad. Structured: each token leans towards one of
    16 random directions per head (so the attention matrix has large entries LSH can find)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, n, h, d)
    q, k, v = (torch.randn(shape, device="cuda", generator=g) for _ in range(3))
    if structured:
        centers = torch.randn(16, h, d, device="cuda", generator=g) * 2.0
        pick = lambda: centers[torch.randint(0, 16, (n,), device="cuda", generator=g)][None]  # noqa: E731
        q, k = q + pick(), k + pick()
    return [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]


def _sdpa(backend):
    def fn(q, k, v):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
        return out.transpose(1, 2)

    return fn


def _time(fn, q, k, v, bwd: bool) -> tuple[float, float]:
    """(median ms, peak GiB above the inputs) of fn's forward or forward+backward."""
    import triton

    go = torch.randn_like(q)

    def step():
        out = fn(q, k, v)
        if bwd:
            torch.autograd.grad(out, (q, k, v), go)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = triton.testing.do_bench(step, warmup=5, rep=50, return_mode="median")
    return ms, peak


def _errors(hyper, flash, q, k, v) -> dict:
    """Hyper's output and LSE against exact attention (our flash, whose LSE is exact)."""
    with torch.no_grad():
        o, lse = hyper(q, k, v, causal=True, return_lse=True)
        r, rl = flash(q, k, v, causal=True, return_lse=True)
        rel = float((o.float() - r.float()).norm() / r.float().norm())
        diff = (lse - rl).abs()
    return {
        "rel_err": rel,
        "lse_mean_abs_err": float(diff.mean()),
        "lse_max_abs_err": float(diff.max()),
    }


def _options(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out


# (block_m, block_n, warps, stages); the first of each list is the default (_bwd_tiles)
_DKDV_TILES = [(32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3), (128, 64, 8, 2),
               (64, 128, 8, 2), (32, 128, 8, 2), (128, 32, 4, 2)]  # fmt: skip
_DQ_TILES = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 2), (64, 128, 8, 2),
             (32, 64, 4, 3)]  # fmt: skip


def _sweep_bwd_tiles(hyper, n: int, args) -> None:
    """hyper's causal fwd+bwd (median of ~6 runs) with each dK/dV tile config (dQ default),
    then each dQ config (dK/dV at the fastest): a table and JSON; the kernels' defaults are
    not changed."""
    import triton

    from ops import hyper_kernels

    q, k, v = _inputs(n, args.heads, args.dim, args.structured)
    go = torch.randn_like(q)

    def fwd_bwd():
        torch.autograd.grad(hyper(q, k, v, causal=True), (q, k, v), go)

    def timed() -> float:
        try:
            return triton.testing.do_bench(fwd_bwd, warmup=100, rep=500, return_mode="median")
        except Exception as e:  # e.g. out of shared memory for a large tile
            print(f"  failed: {type(e).__name__}: {str(e)[:100]}", flush=True)
            return float("nan")

    cudnn = triton.testing.do_bench(lambda: torch.autograd.grad(
        _sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v), (q, k, v), go), warmup=100, rep=1000,
        return_mode="median")  # fmt: skip
    rows = []
    for kernel, configs in (("dkdv", _DKDV_TILES), ("dq", _DQ_TILES)):
        for cfg in configs:
            hyper_kernels.BWD_TILES[kernel] = cfg
            ms = timed()
            rows.append({"kernel": kernel, "tiles": cfg, "fwd_bwd_ms": ms})
            print(f"{kernel:<5} {cfg}: {ms:8.2f} ms  ({cudnn / ms:.2f}x cuDNN)", flush=True)
        done = [r for r in rows if r["kernel"] == kernel and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]]
        hyper_kernels.BWD_TILES[kernel] = min(done, key=lambda r: r["fwd_bwd_ms"])["tiles"]
    best = dict(hyper_kernels.BWD_TILES)
    print(f"cuDNN fwd+bwd {cudnn:.2f} ms; fastest tiles {best}", flush=True)
    env = _env(B=1, H=args.heads, D=args.dim, causal=True, dtype="bf16", hyper=hyper.options,
               n=n)  # fmt: skip
    Path(args.out).write_text(json.dumps({"env": env, "cudnn_fwd_bwd_ms": cudnn,
                                          "rows": rows, "fastest": best}, indent=2))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lens", default="8192,16384,32768,65536,131072")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hyper", default="", help='hyper options, e.g. "lsh_bits=7,sample_size=256"')
    ap.add_argument("--structured", action="store_true", help="clustered q/k instead of Gaussian")
    ap.add_argument("--impls", default="sdpa cudnn,sdpa flash,ours flash,hyper")
    ap.add_argument("--out", default="bench_hyper.json")
    ap.add_argument("--sweep-bwd-tiles", action="store_true",
                    help="time hyper's fwd+bwd at the first length with each candidate tile "
                    "config of the gathered backward kernels (dK/dV, then dQ), then exit")  # fmt: skip
    args = ap.parse_args()
    hyper = ops.build("hyper", **_options(args.hyper))
    if args.sweep_bwd_tiles:
        _sweep_bwd_tiles(hyper, int(args.lens.split(",")[0]), args)
        return
    flash = ops.build("flash")
    impls = {
        "sdpa cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "ours flash": lambda q, k, v: flash(q, k, v, causal=True),
        "hyper": lambda q, k, v: hyper(q, k, v, causal=True),
    }
    wanted = [s.strip() for s in args.impls.split(",")]
    env = _env(B=1, H=args.heads, D=args.dim, causal=True, dtype="bf16", hyper=hyper.options,
               structured=args.structured)  # fmt: skip
    rows = []
    for n in map(int, args.lens.split(",")):
        q, k, v = _inputs(n, args.heads, args.dim, args.structured)
        errs = _errors(hyper, flash, q, k, v) if "hyper" in wanted else {}
        for name in wanted:
            row = {"n": n, "impl": name}
            for bwd in (False, True):
                key = "fwd_bwd" if bwd else "fwd"
                try:
                    ms, gib = _time(impls[name], q, k, v, bwd)
                except Exception as e:  # a backend missing on this build, out of memory: report
                    print(f"N={n} {name} {key}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    ms, gib = float("nan"), float("nan")
                    torch.cuda.empty_cache()
                row[f"{key}_ms"], row[f"{key}_peak_gib"] = ms, gib
            if name == "hyper":
                row.update(errs)
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
        del q, k, v
        torch.cuda.empty_cache()
    _table(env, rows)


def _table(env, rows) -> None:
    print(f"\n{env['gpu']} | torch {env['torch']} | triton {env['triton']} | B=1 H={env['H']} "
          f"D={env['D']} causal bf16 | hyper {env['hyper']}")  # fmt: skip
    head = f"{'N':>7} {'impl':<11} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak GiB':>9} {'x cuDNN fwd':>11} {'x cuDNN f+b':>11} {'rel err':>8} {'LSE err':>8}"
    print(head)
    for r in rows:
        ref = next((x for x in rows if x["n"] == r["n"] and x["impl"] == "sdpa cudnn"), None)
        sf = ref["fwd_ms"] / r["fwd_ms"] if ref else float("nan")
        sb = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"] if ref else float("nan")
        err = f"{r['rel_err']:8.4f} {r['lse_mean_abs_err']:8.4f}" if "rel_err" in r else ""
        print(f"{r['n']:>7} {r['impl']:<11} {r['fwd_ms']:9.2f} {r['fwd_bwd_ms']:11.2f} "
              f"{r['fwd_bwd_peak_gib']:9.2f} {sf:11.2f} {sb:11.2f} {err}")  # fmt: skip


if __name__ == "__main__":
    main()
