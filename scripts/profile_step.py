"""Where a GPT-2 training step spends GPU time: top CUDA kernels per position encoding.

    python scripts/profile_step.py --pos learned rope carope [--batch 32] [--seq 1024]

Runs our compiled bf16 train step (as scripts/bench_train.py does) under torch.profiler and
prints the kernels that take the most GPU time, so a slowdown can be traced to its kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_train as bt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pos", nargs="+", default=["learned", "rope"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    for pos in args.pos:
        torch._dynamo.reset()
        step = bt.make_ours_step(pos, args, dev)[0]
        for _ in range(6):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(f"\n=== pos={pos}: top CUDA kernels over 3 steps ===")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=90))


if __name__ == "__main__":
    main()
