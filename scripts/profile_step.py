"""Where a GPT-2 training step spends GPU time: top CUDA kernels per position encoding.

    python scripts/profile_step.py --pos minimal learned rope carope [--batch 32] [--seq 1024]

Runs our compiled bf16 train step (as scripts/bench_train.py does) under torch.profiler and
prints its time per step and the kernels that take the most GPU time, so that a slowdown can be
traced to its kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train as bt  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from models.positions import NoPositions, RotaryPositions  # noqa: E402

_orig_rotate = RotaryPositions.rotate
_orig_split_rotate = RotaryPositions.split_rotate


def _rotate_bf16(self, q, k, *, layer, x, x0):
    """Experiment: RoPE arithmetic in the activations' dtype (bf16) instead of fp32."""
    cos, sin = self.angles(q.shape[1], q.device)
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)

    def rot(z):
        z1, z2 = z.chunk(2, dim=-1)
        return torch.cat((z1 * cos - z2 * sin, z2 * cos + z1 * sin), dim=-1)

    return rot(q), rot(k)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pos", nargs="+", default=["learned", "rope"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--flush-every", type=int, default=10)
    ap.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--loss", default="auto", choices=["auto", "torch", "fused"])
    ap.add_argument("--tuning", action="store_true")
    ap.add_argument("--trace", default=None, help="write a Chrome trace per variant: DIR/POS.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    for pos in args.pos:
        torch._dynamo.reset()
        RotaryPositions.rotate = _rotate_bf16 if pos == "rope_bf16" else _orig_rotate
        # rope_split: split q/k/v, then rope_qk (the path before the fused-qkv backward)
        RotaryPositions.split_rotate = (
            NoPositions.split_rotate if pos == "rope_split" else _orig_split_rotate
        )
        torch._dynamo.utils.counters.clear()
        if pos == "minimal":  # the single-file baseline of bench_train.py
            step = bt.make_minimal_step(args, dev)[0]
        else:
            step = bt.make_ours_step(pos.split("_")[0], args.loss, args, dev)[0]
        ms = 1e3 * bt.time_steps(step, 20, 10)
        acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.trace else [])
        with profile(activities=acts, record_shapes=bool(args.trace)) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        if args.trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(args.trace) / f"{pos}.json"))
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        print(f"\n=== pos={pos}: {ms:.1f} ms/step; graph breaks {breaks or 'none'}; "
              "top CUDA kernels over 10 steps ===")  # fmt: skip
        for ev in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[: args.top]:
            print(
                f"{ev.self_device_time_total / 1e4:8.3f} ms/step {ev.count // 10:4d}x  {ev.key[:110]}"
            )


if __name__ == "__main__":
    main()
