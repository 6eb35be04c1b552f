"""Where a training step's time goes: host time per step against GPU kernel time per step.

    python scripts/profile_train_step.py [--start 40] [--steps 20] [--table 22] \\
        -- experiment=efficientvit_m0_imagenet data=synthetic_images ...

Runs ``train.py`` with the given overrides in this process and wraps the trainer's step
function: steps ``start`` .. ``start + steps`` are timed (wall per step after a device sync,
host time spent inside the step function, the part of it spent fetching the batch, the CPU
time of the whole process, above the host time when background threads work beside the step,
and which of its threads used it, by Linux thread name), then the next ``steps // 2`` run
under ``torch.profiler``, which gives the GPU kernel time per step summed over all streams
(the data pipeline's side streams included) and the host operators' table. A step whose host
time is close to its wall time and well above its GPU time is bound by the host (Python, kernel
launches), not the GPU. Set ``trainer.max_steps`` above ``start + 1.5 * steps``. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def thread_cpu_times() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of this process, by thread id, with the
    thread's OS name (``/proc/self/task``; Linux only, else empty). Native threads carry
    names (``pt_autograd_0``, ``cuda-EvtHandlr``, OpenMP's ``python``...)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)  # utime, stime
    return out


def busiest_threads(before: dict, after: dict, steps: int, top: int = 8) -> list[str]:
    """Lines for the threads that used the most CPU between two ``thread_cpu_times``, in ms per
    step, with how many threads of each name there were."""
    used: dict[str, list[float]] = {}
    for tid, (name, cpu) in after.items():
        used.setdefault(name, []).append(cpu - before.get(tid, (name, 0.0))[1])
    rows = sorted(((sum(v), name, len(v)) for name, v in used.items()), reverse=True)[:top]
    return [
        f"  {name:<20} x{n:<3} {total / steps * 1e3:7.1f} ms CPU/step" for total, name, n in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", type=int, default=40, help="first timed step (after warm-up)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps; half as many profiled")
    ap.add_argument("--table", type=int, default=22, help="rows of the host operator table")
    ap.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = ap.parse_args()
    if args.steps < 2 or args.start < 2:
        ap.error("--start and --steps must be at least 2")

    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        sys.exit("profile_train_step.py times GPU kernels: no CUDA device here")
    import trainer.loop as loop

    first, last = args.start, args.start + args.steps
    prof_end = last + max(1, args.steps // 2)
    st = {"n": 0, "host": 0.0, "fetch": 0.0, "prof": None, "t0": 0.0, "cpu0": 0.0, "threads": {}}
    step_fn = loop._train_step

    def timed_step(task, *a, **kw):
        st["n"] += 1
        n = st["n"]
        if n == first:
            torch.cuda.synchronize()
            st["t0"], st["cpu0"] = time.perf_counter(), time.process_time()
            st["threads"] = thread_cpu_times()
        if n == last:
            torch.cuda.synchronize()
            wall = (time.perf_counter() - st["t0"]) / args.steps
            cpu = (time.process_time() - st["cpu0"]) / args.steps
            print(f"steps {first}-{last - 1}: wall {wall * 1e3:.1f} ms/step; host in the step "
                  f"{st['host'] / args.steps * 1e3:.1f} ms/step, of which fetching the batch "
                  f"{st['fetch'] / args.steps * 1e3:.1f}; CPU time of this process (all its "
                  f"threads, not the loader's workers) {cpu * 1e3:.1f} ms/step", flush=True)  # fmt: skip
            lines = busiest_threads(st["threads"], thread_cpu_times(), args.steps)
            if lines:
                print("threads of this process by CPU time (OS thread name, count):", *lines,
                      sep="\n", flush=True)  # fmt: skip
            st["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            st["prof"].__enter__()
        fetch = task.next_batch
        if first <= n < last:

            def next_batch():
                t = time.perf_counter()
                try:
                    return fetch()
                finally:
                    st["fetch"] += time.perf_counter() - t

            task.next_batch = next_batch
        t = time.perf_counter()
        try:
            out = step_fn(task, *a, **kw)
        finally:
            if first <= n < last:
                st["host"] += time.perf_counter() - t
                del task.next_batch  # back to the class's method
        if n == prof_end - 1:
            torch.cuda.synchronize()
            p = st["prof"]
            p.__exit__(None, None, None)
            k = prof_end - last
            kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu = sum(e.device_time for e in kernels) / k / 1e3
            print(f"steps {last}-{prof_end - 1} (profiled): GPU kernel time {gpu:.1f} ms/step, "
                  f"{len(kernels) / k:.0f} kernels/step, all streams", flush=True)  # fmt: skip
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.table,
                                         max_name_column_width=48), flush=True)  # fmt: skip
        return out

    loop._train_step = timed_step
    sys.argv = [str(ROOT / "train.py"), *args.overrides]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    if st["n"] < prof_end:
        print(f"the run stopped at step {st['n']}, before step {prof_end}: raise "
              "trainer.max_steps", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
