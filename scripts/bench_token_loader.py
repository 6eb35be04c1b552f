"""How long the training thread waits for each GPT-2 batch, with and without shard prefetch.

    python scripts/bench_token_loader.py --shards .data/gut_train10m.bin.xz [--steps 60]
        [--micro-batch 32] [--seq-len 1024] [--step-ms 60] [--keep-raw 0]

``data.TokenLoader`` reads one shard at a time. When the stream enters a shard (a new shard, or
the first shard again at an epoch's end) that shard is loaded (memory-mapped, or decompressed
for ``.bin.xz``) and, with shuffling, its documents are permuted. With ``prefetch`` (the
default) the next shard is prepared in a background thread when the current one is entered;
without it the training thread does that work at the boundary and the GPU waits.

This runs ``--steps`` micro-batches (a step of enough micro-batches to cross at least one
shard or epoch boundary, chosen from the token count), each followed by ``--step-ms`` of
simulated compute (a sleep, which releases the GIL as a GPU step's host side mostly waits),
with prefetch off and on, and prints a table of the waits: the first batch's (the first
shard, loaded before anything can run ahead), then the mean, the largest and the sum of the
others. ``--keep-raw 0`` also drops the kept decompressed ``.bin.xz`` shards (each epoch then
decompresses again, as before they were kept). CPU only; the numbers are the host's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import TokenLoader  # noqa: E402
from data import loader as loader_mod  # noqa: E402
from data.shards import load_tokens  # noqa: E402


def waits(shards, prefetch: bool, args) -> list[float]:
    loader = TokenLoader(shards, batch_size=args.micro_batch, seq_len=args.seq_len,
                         seed=0, prefetch=prefetch)  # fmt: skip
    out = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loader.next_batch()
        out.append(time.perf_counter() - t0)
        time.sleep(args.step_ms / 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", nargs="+", required=True, help=".bin, .bin.xz or .npy files")
    ap.add_argument("--steps", type=int, default=0,
                    help="micro-batches (default: enough for two passes over the shards)")  # fmt: skip
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--step-ms", type=float, default=60.0,
                    help="simulated compute per micro-batch (GPT-2 124M, 32x1024: ~65 ms on "
                    "an H100)")  # fmt: skip
    ap.add_argument("--keep-raw", type=int, default=None,
                    help="bytes of decompressed .bin.xz shards kept (default: the loader's)")  # fmt: skip
    args = ap.parse_args()
    for s in args.shards:
        if not Path(s).is_file():
            sys.exit(f"--shards: no file {s}")
    tokens = sum(load_tokens(s).size for s in args.shards)
    per = args.micro_batch * args.seq_len
    if not args.steps:
        args.steps = 2 * tokens // per + 2
    print(f"{len(args.shards)} shard(s), {tokens:,} tokens; {args.steps} micro-batches of "
          f"{per:,} tokens, {args.step_ms:g} ms of compute each")  # fmt: skip
    if args.keep_raw is not None:
        loader_mod._RAW_KEEP_BYTES = int(args.keep_raw)
    print(f"{'prefetch':<9} {'first ms':>9} {'mean ms':>8} {'max ms':>8} {'sum s':>7}")
    for prefetch in (False, True):
        first, *w = waits(args.shards, prefetch, args)
        print(f"{'on' if prefetch else 'off':<9} {1e3 * first:9.1f} {1e3 * sum(w) / len(w):8.2f} "
              f"{1e3 * max(w):8.1f} {sum(w):7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
