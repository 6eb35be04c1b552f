"""Private memory a forked loader worker gains by reading an image folder's file names once.

    python scripts/bench_worker_memory.py [--names 1281167] [--workers 2]

``data.ImageFolderDataset`` keeps its file names for ``__getitem__``. Loader workers are forked
and share the parent's memory until they write to it; reading an item of a Python list writes
its reference count, so a worker that reads every name over an epoch ends up with a private copy
of the list's pages. This builds ImageNet-like names (``nXXXXXXXX/nXXXXXXXX_NNNNN.JPEG``), forks
``--workers`` processes that each read every name once as a worker does (the name joined to the
root), and prints each one's private dirty memory gained (``/proc/self/smaps_rollup``), for a
list of str and for the fixed-width byte array the dataset uses. Linux only.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def private_dirty_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no Private_Dirty line in /proc/self/smaps_rollup")


def gained_per_worker(files, workers: int) -> list[float]:
    """Fork ``workers`` children that each read every entry of ``files`` once; their private
    memory gained, MiB."""
    as_bytes = isinstance(files, np.ndarray)
    r, w = os.pipe()
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                before = private_dirty_mib()
                total = 0
                for i in range(len(files)):
                    name = os.fsdecode(files[i]) if as_bytes else files[i]
                    total += len(os.path.join("/data/imagenet/train", name))
                os.write(w, f"{private_dirty_mib() - before:.1f}\n".encode())
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(w)
    for pid in pids:
        os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return [float(x) for x in f.read().split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--names", type=int, default=1_281_167, help="file names (ImageNet: 1.28M)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("bench_worker_memory.py reads /proc/self/smaps_rollup: Linux only")
    per_class = max(1, args.names // 1000)
    names = [f"n{c:08d}/n{c:08d}_{i:05d}.JPEG" for c in range(1000) for i in range(per_class)]
    rows = [("list of str", gained_per_worker(names, args.workers))]
    array = np.array([os.fsencode(n) for n in names], dtype=np.bytes_)
    del names
    rows.append(("byte array (the dataset's)", gained_per_worker(array, args.workers)))
    print(f"{len(array):,} names, {args.workers} forked workers, each reading every name once")
    print(f"{'names held as':<28}{'private MiB gained per worker':>32}")
    for kind, gained in rows:
        print(f"{kind:<28}{', '.join(f'{g:.1f}' for g in gained):>32}")


if __name__ == "__main__":
    main()
