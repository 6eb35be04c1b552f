"""Where a training step's time goes: host time per step against GPU kernel time per step.

    python scripts/profile_train_step.py [--start 40] [--steps 20] [--table 22] \\
        -- experiment=efficientvit_m0_imagenet data=synthetic_images ...

Runs ``train.py`` with the given overrides in this process and wraps the trainer's step
function: steps ``start`` .. ``start + steps`` are timed (wall per step after a device sync,
host time spent inside the step function, the part of it spent fetching the batch, the CPU
time of the whole process, above the host time when background threads work beside the step,
and which of its threads used it, by Linux thread name; and, for the data pipeline's
background threads (``data.decode=gpu``), each thread's time a batch receiving, working and
handing over, in wall and in its own CPU time), then the next ``steps // 2`` run
under ``torch.profiler``, which gives the GPU kernel time per step summed over all streams
(the data pipeline's side streams included), how busy the GPU was (the union of the kernels'
intervals, whole and per stream: the share of the wall time some kernel ran) and the host
operators' table. A step whose host time is close to its wall time and well above its GPU time
is bound by the host (Python, kernel launches), not the GPU. Set ``trainer.max_steps`` above
``start + 1.5 * steps``. Needs a CUDA GPU.
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


def _stat_fields(path: str) -> list[str]:
    """The fields of a ``/proc/.../stat`` line after ``pid (comm)`` (comm may hold spaces)."""
    with open(path) as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2 :].split()


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_cpu_times(pid: int | str = "self") -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of process ``pid`` (this one by default), by
    thread id, with the thread's OS name (``/proc/PID/task``; Linux only, else empty). Native
    threads carry names (``pt_autograd_0``, ``cuda-EvtHandlr``, OpenMP's ``python``...)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)  # utime, stime
    return out


def descendant_cpu_times(root: int | None = None) -> dict[int, tuple[int, float]]:
    """CPU seconds (user + system, all threads) of every process below ``root`` (this process
    by default), by pid, with its depth below ``root`` (1: a child; 2: a grandchild, such as a
    child's loader workers). Linux only, else empty."""
    root = os.getpid() if root is None else root
    parent, cpu = {}, {}
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        try:
            fields = _stat_fields(f"/proc/{pid}/stat")
        except OSError:
            continue
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    out = {}
    for pid in parent:
        depth, up = 1, parent[pid]
        while up != root and up in parent and depth < 64:
            depth, up = depth + 1, parent[up]
        if up == root:
            out[pid] = (depth, cpu[pid])
    return out


def machine_cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over its CPUs
    (``/proc/stat``; idle and iowait count as not busy). (0, 0) where unreadable."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal
    return (total - vals[3] - vals[4]) / _TICK, total / _TICK


def descendant_lines(before: dict, after: dict, steps: int) -> list[str]:
    """Lines for the CPU used by this process's descendants between two
    ``descendant_cpu_times``, in ms per step, per depth (processes that started meanwhile
    count from zero)."""
    used: dict[int, list[float]] = {}
    for pid, (depth, cpu) in after.items():
        used.setdefault(depth, []).append(cpu - before.get(pid, (depth, 0.0))[1])
    return [
        f"  depth {d}: {len(v):>3} processes {sum(v) / steps * 1e3:8.1f} ms CPU/step"
        for d, v in sorted(used.items())
    ]


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


def busy_union(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals: the time at least one is running."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total if cur_e is None else total + cur_e - cur_s


def gpu_busy_lines(events, wall_us: float, steps: int) -> list[str]:
    """How busy the GPU was over a profiled window of ``wall_us`` microseconds (``steps`` steps):
    the union of every kernel's interval (several streams at once count once), then each
    stream's own union, busiest first. ``events`` are ``(stream, start_us, end_us, is_kernel)``;
    copies and memsets (``is_kernel`` false) are reported apart, as they use the copy engines."""
    kernels = [(s, e) for _, s, e, k in events if k]
    copies = [(s, e) for _, s, e, k in events if not k]
    per = {}
    for stream, s, e, k in events:
        if k:
            per.setdefault(stream, []).append((s, e))
    ms, busy = steps * 1e3, busy_union(kernels)
    lines = [f"GPU busy (any kernel running): {busy / ms:.1f} ms/step of "
             f"{wall_us / ms:.1f} wall ({busy / max(wall_us, 1e-9):.0%}); "
             f"copies and memsets: {busy_union(copies) / ms:.1f} ms/step"]  # fmt: skip
    rows = sorted(((busy_union(v), k, len(v)) for k, v in per.items()), reverse=True)
    small = [r for r in rows if r[0] < 0.01 * wall_us]  # nvJPEG's own streams, say
    for busy, stream, n in rows if len(small) < 2 else [r for r in rows if r not in small]:
        lines.append(f"  stream {stream}: kernels busy {busy / ms:.1f} ms/step, "
                     f"{n / steps:.1f} kernels/step")  # fmt: skip
    if len(small) >= 2:
        busy = busy_union([iv for _, stream, _ in small for iv in per[stream]])
        lines.append(f"  {len(small)} other streams, each under 1% of the wall time: kernels "
                     f"busy {busy / ms:.1f} ms/step, {sum(r[2] for r in small) / steps:.1f} "
                     "kernels/step")  # fmt: skip
    return lines


def stage_readings(task) -> dict[str, dict]:
    """The timings of the task's data pipeline threads (``data.background.Ahead``), by name."""
    from data.background import background_stages

    out: dict[str, dict] = {}
    for a in background_stages(getattr(task, "train_loader", None)):
        name = a.name if a.name not in out else f"{a.name}#{len(out)}"
        out[name] = a.times.reading()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", type=int, default=40, help="first timed step (after warm-up)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps; half as many profiled")
    ap.add_argument("--table", type=int, default=22, help="rows of the host operator table")
    ap.add_argument("--ops", default="",
                    help="comma list of operator names (aten::copy_, ...) to break down by input "
                         "shapes (records shapes while profiling)")  # fmt: skip
    ap.add_argument(
        "--gpu-table",
        type=int,
        default=0,
        help="rows of a table of operators and kernels by GPU time (0: none)",
    )
    ap.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = ap.parse_args()
    if args.steps < 2 or args.start < 2:
        ap.error("--start and --steps must be at least 2")

    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        sys.exit("profile_train_step.py times GPU kernels: no CUDA device here")
    import trainer.loop as loop
    from data.background import stage_lines

    first, last = args.start, args.start + args.steps
    prof_end = last + max(1, args.steps // 2)
    st = {
        "n": 0,
        "host": 0.0,
        "fetch": 0.0,
        "prof": None,
        "t0": 0.0,
        "cpu0": 0.0,
        "threads": {},
        "kids": {},
        "machine": (0.0, 0.0),
    }

    def timed_step(step_fn, task, *a, **kw):
        st["n"] += 1
        n = st["n"]
        if n == first:
            torch.cuda.synchronize()
            st["t0"], st["cpu0"] = time.perf_counter(), time.process_time()
            st["threads"] = thread_cpu_times()
            st["kids"], st["machine"] = descendant_cpu_times(), machine_cpu_times()
            st["kid_threads"] = {p: thread_cpu_times(p) for p, (d, _) in st["kids"].items()
                                 if d == 1}  # fmt: skip
            st["stages"] = stage_readings(task)
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
            lines = stage_lines(st["stages"], stage_readings(task))
            if lines:
                print("data pipeline threads, ms a batch over the timed steps (wall / the "
                      "thread's CPU):", *lines, sep="\n", flush=True)  # fmt: skip
            kids = descendant_cpu_times()
            busy, total = machine_cpu_times()
            if kids:
                print("processes below this one (a data child, its loader workers, compile "
                      "workers) by depth:", *descendant_lines(st["kids"], kids, args.steps),
                      sep="\n", flush=True)  # fmt: skip
                child = max((p for p, (d, _) in kids.items() if d == 1),
                            key=lambda p: kids[p][1] - st["kids"].get(p, (1, 0.0))[1])  # fmt: skip
                start = st["kid_threads"].get(child)
                lines = busiest_threads(start or {}, thread_cpu_times(child), args.steps)
                since = "over the timed steps" if start is not None else "since it started"
                print(f"threads of the busiest child (pid {child}), CPU {since}:", *lines,
                      sep="\n", flush=True)  # fmt: skip
            if total > st["machine"][1]:
                b, t = busy - st["machine"][0], total - st["machine"][1]
                print(f"machine: {b / t:.0%} of {os.cpu_count()} CPUs busy over the timed steps",
                      flush=True)  # fmt: skip
            st["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                 record_shapes=bool(args.ops))  # fmt: skip
            st["prof"].__enter__()
            st["prof_t0"] = time.perf_counter()
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
            window_us = (time.perf_counter() - st["prof_t0"]) * 1e6
            p = st["prof"]
            p.__exit__(None, None, None)
            k = prof_end - last
            kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu = sum(e.device_time for e in kernels) / k / 1e3
            print(f"steps {last}-{prof_end - 1} (profiled): GPU kernel time {gpu:.1f} ms/step, "
                  f"{len(kernels) / k:.0f} kernels/step, all streams", flush=True)  # fmt: skip
            spans = [(e.device_resource_id, e.time_range.start, e.time_range.end,
                      not e.name.startswith(("Memcpy", "Memset"))) for e in kernels]  # fmt: skip
            print(*gpu_busy_lines(spans, window_us, k), sep="\n", flush=True)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.table,
                                         max_name_column_width=48), flush=True)  # fmt: skip
            if args.gpu_table:
                avg = p.key_averages()
                key = "self_device_time_total"  # (torch < 2.4: self_cuda_time_total)
                if avg and not hasattr(avg[0], key):
                    key = "self_cuda_time_total"
                print(avg.table(sort_by=key, row_limit=args.gpu_table, max_name_column_width=48),
                      flush=True)  # fmt: skip
            names = {n for n in args.ops.split(",") if n}
            if names:
                rows = [e for e in p.key_averages(group_by_input_shape=True) if e.key in names]
                rows.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
                print(f"{'operator':<22}{'calls/step':>11}{'self CPU us/call':>18}  input shapes")
                for e in rows[: args.table]:
                    print(f"{e.key:<22}{e.count / k:>11.1f}"
                          f"{e.self_cpu_time_total / max(e.count, 1):>18.1f}  {e.input_shapes}")  # fmt: skip
        return out

    train_step, graph_step = loop._train_step, loop._graph_step  # (trainer.step_graph)
    loop._train_step = lambda task, *a, **kw: timed_step(train_step, task, *a, **kw)
    loop._graph_step = lambda task, *a, **kw: timed_step(graph_step, task, *a, **kw)
    sys.argv = [str(ROOT / "train.py"), *args.overrides]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    if st["n"] < prof_end:
        print(f"the run stopped at step {st['n']}, before step {prof_end}: raise "
              "trainer.max_steps", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
