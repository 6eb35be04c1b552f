"""How fast a pixel store (``data.kind=pixels``) is read: images/s against reading threads.

    python scripts/bench_pixel_store.py /data/imagenet_px/train.pixels [--threads 1,2,4,8]
        [--batch 256] [--batches 30] [--cold] [--out bench_pixel_store.json]

Times what the trainer's loader does for each training batch with ``data.decode=gpu``:
``PixelStoreDataset.read_batch`` of ``--batch`` random images, by ``data.read_threads``
threads of ``pread`` into one buffer (pinned where CUDA is available), after two untimed
batches. On a GPU it also times the buffer's copy to the device. The training step needs
``batch / step time`` images/s from it: on an H100, EfficientViT-M0 takes about 17k at batch
256 and M5 about 10k (docs/benchmarks.md, "Pixel stores").

``--cold`` asks the kernel to drop the store's cached pages before each timed batch
(``POSIX_FADV_DONTNEED``, not timed; pages other processes hold mapped stay), so that the
reads come from the drive, as they will for a store larger than the page cache: ImageNet at
short side 256 takes about 335 GB. Without it a small store is read from memory after its
first pass. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.pixel_store import PixelStoreDataset  # noqa: E402


def drop_cached_pages(path: Path) -> bool:
    """Ask the kernel to drop ``path``'s pages from the page cache; False where it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def time_cell(store: PixelStoreDataset, threads: int, batch: int, batches: int,
              rng: np.random.Generator, cold: bool) -> dict:  # fmt: skip
    """One thread count: images/s and GiB/s of reading (and of the copy to the GPU)."""
    store.read_threads = threads
    n = len(store)
    for _ in range(2):  # threads started, pinned blocks cached
        store.read_batch(rng.integers(0, n, batch))
    nbytes, dt = 0, 0.0
    for _ in range(batches):
        if cold:  # (not timed)
            drop_cached_pages(store.path)
        t0 = time.perf_counter()
        b = store.read_batch(rng.integers(0, n, batch))
        dt += time.perf_counter() - t0
        nbytes += b.pixels.numel()
    row = {"threads": threads, "images_per_s": batch * batches / dt,
           "gib_per_s": nbytes / dt / 2**30, "mib_per_batch": nbytes / batches / 2**20}  # fmt: skip
    if torch.cuda.is_available():
        b.pixels.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batches):
            b.pixels.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        row["copy_gib_per_s"] = b.pixels.numel() * batches / (time.perf_counter() - t0) / 2**30
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="the store's pixel file (DST/train.pixels)")
    ap.add_argument("--threads", default="1,2,4,8", help="comma list of data.read_threads")
    ap.add_argument("--batch", type=int, default=256, help="images a batch")
    ap.add_argument("--batches", type=int, default=30, help="timed batches a cell")
    ap.add_argument("--cold", action="store_true", help="drop the store's cached pages first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_pixel_store.json")
    args = ap.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",") if t]
    except ValueError:
        ap.error(f"--threads takes a comma list of integers, got {args.threads!r}")
    if not threads or min(threads) < 1 or args.batch < 1 or args.batches < 1:
        ap.error("--threads, --batch and --batches must be positive")
    try:
        store = PixelStoreDataset(args.store)
    except (FileNotFoundError, ValueError) as err:
        print(f"bench_pixel_store: {err}", file=sys.stderr)
        return 2
    store.use_encoded()
    store.pin = True  # where CUDA is available, as the trainer's loader reads
    rng = np.random.default_rng(args.seed)
    rows = []
    for t in threads:
        rows.append(time_cell(store, t, args.batch, args.batches, rng, args.cold))
        r = rows[-1]
        copy = f", copy to the GPU {r['copy_gib_per_s']:.1f} GiB/s" if "copy_gib_per_s" in r else ""
        print(f"threads {t:>3}: {r['images_per_s']:>10,.0f} images/s, {r['gib_per_s']:.1f} GiB/s"
              f"{copy}", flush=True)  # fmt: skip
    env = {"store": str(store.path), "images": len(store), "batch": args.batch,
           "batches": args.batches, "cold": args.cold, "cpus": os.cpu_count(),
           "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    where = "drive (pages dropped first)" if args.cold else "page cache after the first pass"
    print(f"\n{len(store)} images, {rows[0]['mib_per_batch']:.0f} MiB a batch of {args.batch}, "
          f"read from the {where}; {env['cpus']} CPUs{', ' + env['gpu'] if env['gpu'] else ''}")  # fmt: skip
    print(
        f"{'threads':>8}{'images/s':>12}{'GiB/s':>8}"
        + (f"{'copy GiB/s':>12}" if env["gpu"] else "")
    )
    for r in rows:
        line = f"{r['threads']:>8}{r['images_per_s']:>12,.0f}{r['gib_per_s']:>8.1f}"
        print(line + (f"{r['copy_gib_per_s']:>12.1f}" if "copy_gib_per_s" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
