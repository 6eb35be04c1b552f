"""Rotary position ops alone: the fused Triton kernels of ops/rotary.py against PyTorch.

    python scripts/bench_rotary.py [--batch 32] [--seq 1024] [--heads 12] [--kv-heads 12]
        [--head-dim 64] [--out bench_rotary.json]

For RoPE and CARoPE, times forward and forward + backward of rotating q and k taken from one
fused (B, T, (H + 2 Hkv) D) bf16 projection, as GPT-2 runs them (GPU time: the kernels' time
per call summed by torch.profiler, host gaps excluded):

- ``torch eager`` / ``torch compiled``: ``models.positions`` with ``pos.kernel=torch`` (CARoPE:
  frequencies, f ** i, cumulative sum, cos/sin, rotation; compiled with ``torch.compile``);
- ``triton``: ``pos.kernel=triton`` (``rope_qkv`` / ``carope_qkv``).

CARoPE includes the per-token frequency projection from the layer input x (B, T, C) in every
variant; the backward reaches x, the projection and qkv. Prints a table (ms, speed-up of triton
over each PyTorch variant) and writes JSON. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from models.positions import CARoPE, PosConfig, RotaryPositions  # noqa: E402
from scripts.bench_attention import _env  # noqa: E402


def build(name: str, kernel: str, args, dev):
    hd = args.head_dim
    if name == "rope":
        return RotaryPositions(hd, 10000.0, args.seq, kernel).to(dev)
    pos = CARoPE(PosConfig(name="carope", kernel=kernel), d_model=args.heads * hd,
                 n_kv_heads=args.kv_heads, head_dim=hd, n_layers=1).to(dev)  # fmt: skip
    torch.manual_seed(0)
    torch.nn.init.normal_(pos.proj[0].weight, std=0.02)  # token-dependent, as after training
    return pos


def gpu_ms(fn, reps: int = 20) -> float:
    """GPU time of one call: the kernels' own time summed by torch.profiler over reps calls.
    These ops take tens of microseconds, less than Python and autograd take to launch them, so
    wall-clock timing (do_bench) would measure the host."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / reps / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--out", default="bench_rotary.json")
    ap.add_argument("--variants", nargs="*", default=[],
                    help='extra "triton BLOCK_T:WARPS" rows, e.g. "triton 128:8"')  # fmt: skip
    args = ap.parse_args()
    dev = torch.device("cuda")
    b, t, h, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, device=dev, dtype=torch.bfloat16,
                      requires_grad=True)  # fmt: skip
    x = torch.randn(b, t, h * d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    rows = []
    for name in ("rope", "carope"):
        for impl in ("torch eager", "torch compiled", "triton", *args.variants):
            pos = build(name, "torch" if impl.startswith("torch") else "triton", args, dev)
            if impl.startswith("triton "):  # "triton BLOCK_T:WARPS": tile variant
                bt, nw = (int(v) for v in impl.split()[1].split(":"))
                pos.kernel_opts = dict(block_t=bt, num_warps=nw)

            def fwd(pos=pos):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return pos.split_rotate(qkv, h, hkv, layer=0, x=x, x0=x)

            fn = torch.compile(fwd) if impl == "torch compiled" else fwd
            outs = fn()
            grads = [torch.randn_like(o) for o in outs]
            params = [qkv, x, *pos.parameters()]

            def step(fn=fn, grads=grads, params=params):
                outs = fn()
                return torch.autograd.grad(outs, params, grads, allow_unused=True)

            f_ms, s_ms = (gpu_ms(f) for f in (fn, step))
            rows.append(dict(pos=name, impl=impl, fwd_ms=f_ms, fwd_bwd_ms=s_ms))
            print(f"done {name} {impl}: fwd {f_ms:.3f} fwd+bwd {s_ms:.3f} ms", flush=True)
    env = _env(batch=b, seq=t, heads=h, kv_heads=hkv, head_dim=d)
    print(f"\n{env['gpu']} | torch {env['torch']} | triton {env['triton']} | B={b} T={t} H={h} "
          f"Hkv={hkv} D={d} bf16")  # fmt: skip
    print(f"{'pos':7s} {'impl':15s} {'fwd ms':>8s} {'fwd+bwd':>8s} {'triton is (fwd+bwd)':>20s}")
    for r in rows:
        tr = next(x for x in rows if x["pos"] == r["pos"] and x["impl"] == "triton")
        r["triton_speedup_fwd_bwd"] = r["fwd_bwd_ms"] / tr["fwd_bwd_ms"]
        print(f"{r['pos']:7s} {r['impl']:15s} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} "
              f"{r['triton_speedup_fwd_bwd']:19.2f}x")  # fmt: skip
    Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=2))


if __name__ == "__main__":
    main()
