"""Where a GPT-2 training step spends GPU time: top CUDA kernels per position encoding.

    python scripts/profile_step.py --pos learned rope carope [--batch 32] [--seq 1024]

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

from models.positions import RotaryPositions  # noqa: E402

_orig_rotate = RotaryPositions.rotate


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
    ap.add_argument("--kernel", default="torch", choices=["torch", "triton"])
    ap.add_argument("--tuning", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    for pos in args.pos:
        torch._dynamo.reset()
        from models.positions import RotaryPositions

        RotaryPositions.rotate = _rotate_bf16 if pos == "rope_bf16" else _orig_rotate
        step = bt.make_ours_step(pos.replace("_bf16", ""), args, dev)[0]
        ms = 1e3 * bt.time_steps(step, 20, 10)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f"\n=== pos={pos}: {ms:.1f} ms/step; top CUDA kernels over 10 steps ===")
        for ev in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[: args.top]:
            print(
                f"{ev.self_device_time_total / 1e4:8.3f} ms/step {ev.count // 10:4d}x  {ev.key[:110]}"
            )


if __name__ == "__main__":
    main()
