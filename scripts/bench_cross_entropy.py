"""LM-head loss of GPT-2 124M: fused chunked linear + cross-entropy vs PyTorch, time and memory.

    python scripts/bench_cross_entropy.py [--rows 32768] [--chunks 4096 8192 16384]
        [--kernel 4096:8:fwd 4096:8:rev 8192:16:fwd 2048:4:rev] [--out bench_cross_entropy.json]

Times forward + backward of the loss of h (N, C) fp32 through the tied head weight (V, C) fp32
under bf16 autocast, as the model runs it: ``torch`` = materialised logits +
``F.cross_entropy`` (compiled, as the minimal baseline of bench_train.py), ``fused`` =
``ops.linear_cross_entropy`` for each chunk size and each row-kernel setting
(BLOCK_V:num_warps[:rev|fwd]; BLOCK_V >= V is the one-pass kernel; rev/fwd the order of the
gradient pass's tiles, the module's default if left out). Prints a table (ms, peak MiB above
the inputs) and writes JSON; then times the row kernel alone for each setting on one chunk of
bf16 logits (GB/s counting one read and one write of the logits). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from ops import cross_entropy as ce  # noqa: E402
from scripts.bench_attention import _env  # noqa: E402


def _torch_loss(h, w, t):
    logits = F.linear(h, w)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), t)


def parse_kernel(spec: str):
    """'BLOCK_V:warps' or 'BLOCK_V:warps:rev|fwd' (the gradient pass's tile order; the module's
    default when left out) -> (block_v, warps, reverse)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("rev", "fwd")):
        raise SystemExit(f"--kernel {spec}: expected BLOCK_V:warps or BLOCK_V:warps:rev|fwd")
    reverse = ce._REVERSE if len(parts) == 2 else parts[2] == "rev"
    return int(parts[0]), int(parts[1]), reverse


def measure(fn, h, w, t):
    """Median ms of forward + backward, and peak memory (MiB) above the inputs."""

    def step():
        h.grad = w.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, t)
        loss.backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(step, warmup=5, rep=200), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--chunks", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument(
        "--kernel", nargs="+", default=["4096:8:fwd", "4096:8:rev", "8192:16:fwd", "2048:4:rev"]
    )
    ap.add_argument("--out", default="bench_cross_entropy.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(args.rows, args.dim, device=dev, generator=g).requires_grad_()
    w = (0.02 * torch.randn(args.vocab, args.dim, device=dev, generator=g)).requires_grad_()
    t = torch.randint(0, 50257, (args.rows,), device=dev, generator=g)
    rows = []

    def record(name, chunk, kernel, fn):
        ms, peak = measure(fn, h, w, t)
        rows.append(dict(impl=name, chunk_rows=chunk, kernel=kernel, ms=ms, peak_mib=peak))
        print(f"done {name} chunk={chunk} kernel={kernel}: {ms:.3f} ms", flush=True)

    record("torch (compiled)", None, None, torch.compile(_torch_loss))
    defaults = (ce._BLOCK_V, ce._NUM_WARPS, ce._REVERSE)
    for spec in args.kernel:
        block_v, warps, reverse = parse_kernel(spec)
        ce._BLOCK_V, ce._NUM_WARPS, ce._REVERSE = block_v, warps, reverse
        for chunk in args.chunks:
            record("fused", chunk, spec,
                   lambda h, w, t, c=chunk: ce.linear_cross_entropy(h, w, t, chunk_rows=c))  # fmt: skip
    ce._BLOCK_V, ce._NUM_WARPS, ce._REVERSE = defaults

    # the row kernel alone on one chunk of bf16 logits, in place (loss + gradient), as in the
    # step: bytes moved if the logits are read once and written once, and the rate that gives
    chunk = min(8192, args.rows)  # the default chunk of ops.linear_cross_entropy for GPT-2
    logits = (3.0 * torch.randn(chunk, args.vocab, device=dev, generator=g)).to(torch.bfloat16)
    tc = t[:chunk].contiguous()
    loss_rows = torch.empty(chunk, device=dev)
    inv_n = torch.full((), 1.0 / chunk, device=dev)
    nbytes = 2 * logits.numel() * logits.element_size()
    kernel_rows = []
    for spec in args.kernel:
        block_v, warps, reverse = parse_kernel(spec)
        ms = triton.testing.do_bench(
            lambda b=block_v, nw=warps, r=reverse: ce._ce_rows(logits, tc, loss_rows, inv_n,
                                                               -100, True, b, nw, r),  # fmt: skip
            warmup=5, rep=100)  # fmt: skip
        kernel_rows.append(dict(kernel=spec, chunk_rows=chunk, ms=ms, gb_s=nbytes / ms / 1e6))

    env = _env()
    print(f"\n{env['gpu']} | torch {env['torch']} | triton {env['triton']} | N={args.rows} "
          f"C={args.dim} V={args.vocab}, h/weight fp32, bf16 autocast, fwd+bwd")  # fmt: skip
    print(f"{'impl':18s} {'chunk':>6s} {'kernel':>9s} {'ms':>8s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['impl']:18s} {str(r['chunk_rows'] or '-'):>6s} {str(r['kernel'] or '-'):>9s} "
              f"{r['ms']:8.3f} {r['peak_mib']:9.0f}")  # fmt: skip
    print(f"\nrow kernel alone, {chunk} x {args.vocab} bf16 logits in place; GB/s counts one "
          "read and one write")  # fmt: skip
    print(
        f"{'kernel':>9s} {'ms':>8s} {'GB/s':>7s} {'ms/step (x' + str(args.rows // chunk) + ')':>14s}"
    )
    for r in kernel_rows:
        print(f"{r['kernel']:>9s} {r['ms']:8.3f} {r['gb_s']:7.0f} "
              f"{r['ms'] * args.rows / chunk:14.3f}")  # fmt: skip
    Path(args.out).write_text(
        json.dumps(dict(env=env, rows=rows, row_kernel=kernel_rows), indent=2)
    )


if __name__ == "__main__":
    main()
