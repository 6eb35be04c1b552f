"""scripts/profile_train_step.py's per-thread CPU accounting (Linux /proc), on the CPU."""

import os
import signal
import sys
import threading
import time

import pytest

from scripts.profile_train_step import busiest_threads, thread_cpu_times


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_a_busy_thread_shows_with_its_cpu_time_and_an_idle_one_does_not():
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(1000))

    def sleep():
        stop.wait()

    threads = [threading.Thread(target=spin, name="spin"), threading.Thread(target=sleep)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.05)
        before = thread_cpu_times()
        time.sleep(0.6)
        after = thread_cpu_times()
    finally:
        stop.set()
        for t in threads:
            t.join()
    spinner = threads[0].native_id
    assert spinner in before and spinner in after
    used = {tid: after[tid][1] - before[tid][1] for tid in after if tid in before}
    assert used[spinner] >= 0.1  # it had the GIL most of the 0.6 s, not the main thread
    assert used[threads[1].native_id] <= 0.02  # the sleeper used next to nothing
    lines = busiest_threads(before, after, steps=2, top=1)  # per "step": half the total
    assert len(lines) == 1 and "ms CPU/step" in lines[0]
    per_step = float(lines[0].split()[-3])
    assert per_step >= 0.1 / 2 * 1e3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_descendants_are_found_by_depth_with_their_cpu_time():
    import subprocess

    from scripts.profile_train_step import (
        descendant_cpu_times,
        descendant_lines,
        machine_cpu_times,
    )

    # a child that starts a spinning grandchild, then sleeps until it ends
    spin = "import time\nt = time.time()\nwhile time.time() - t < 20: pass"
    code = (
        "import subprocess, sys\n"
        f"g = subprocess.Popen([sys.executable, '-c', {spin!r}])\n"
        "print(g.pid, flush=True)\n"
        "g.wait()"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grand = []
    try:
        grand = [int(child.stdout.readline())]
        deadline = time.monotonic() + 15
        while descendant_cpu_times().get(grand[0], (0,))[0] != 2:  # seen as a grandchild
            assert time.monotonic() < deadline, "the grandchild did not show"
            time.sleep(0.05)
        time.sleep(0.2)
        before, m0 = descendant_cpu_times(), machine_cpu_times()
        time.sleep(0.6)
        after, m1 = descendant_cpu_times(), machine_cpu_times()
    finally:
        for pid in grand:
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()
        child.stdout.close()
    assert after[child.pid][0] == 1
    assert after[grand[0]][0] == 2
    used = {pid: after[pid][1] - before.get(pid, (0, 0.0))[1] for pid in after}
    assert used[grand[0]] >= 0.12  # it spun (on a shared, busy CPU: a share of the 0.6 s)
    assert used[child.pid] <= 0.05  # the child slept
    busy, total = m1[0] - m0[0], m1[1] - m0[1]
    assert busy >= 0.12 and total >= busy - 0.02  # (a full machine: equal, to rounding)
    ours = {child.pid, *grand}  # (the test process may have other children)
    lines = descendant_lines(
        {k: v for k, v in before.items() if k in ours},
        {k: v for k, v in after.items() if k in ours},
        steps=1,
    )
    assert [ln.split()[:4] for ln in lines] == [
        ["depth", "1:", "1", "processes"],
        ["depth", "2:", "1", "processes"],
    ]


def test_gpu_busy_counts_overlapping_kernels_once():
    from scripts.profile_train_step import busy_union, gpu_busy_lines

    assert busy_union([]) == 0
    # two streams overlap on [5, 10]; a gap on [12, 20]; a kernel nested in another
    spans = [(0, 10), (5, 12), (20, 30), (22, 25)]
    assert busy_union(spans) == 12 + 10
    assert busy_union(reversed(spans)) == 22  # the order does not matter
    events = [(7, 0, 10000, True), (9, 5000, 12000, True), (7, 20000, 30000, True),
              (7, 0, 40000, False)]  # fmt: skip
    lines = gpu_busy_lines(events, wall_us=40000, steps=2)
    assert lines[0].startswith("GPU busy (any kernel running): 11.0 ms/step of 20.0 wall (55%)")
    assert lines[0].endswith("copies and memsets: 20.0 ms/step")
    assert lines[1] == "  stream 7: kernels busy 10.0 ms/step, 1.0 kernels/step"  # busiest first
    assert lines[2] == "  stream 9: kernels busy 3.5 ms/step, 0.5 kernels/step"


def test_gpu_busy_folds_the_near_idle_streams_into_one_line():
    from scripts.profile_train_step import gpu_busy_lines

    # one busy stream and three streams with a 10 us kernel each, over 10 ms
    events = [(1, 0, 8000, True)] + [(k, 100 * k, 100 * k + 10, True) for k in (2, 3, 4)]
    lines = gpu_busy_lines(events, wall_us=10000, steps=1)
    assert lines[1] == "  stream 1: kernels busy 8.0 ms/step, 1.0 kernels/step"
    assert lines[2] == (
        "  3 other streams, each under 1% of the wall time: kernels busy 0.0 "
        "ms/step, 3.0 kernels/step"
    )
    assert len(lines) == 3
    # a single near-idle stream keeps its own line
    lines = gpu_busy_lines(events[:2], wall_us=10000, steps=1)
    assert lines[2] == "  stream 2: kernels busy 0.0 ms/step, 1.0 kernels/step"


def test_stage_readings_follow_the_task_loaders_threads():
    """The profiler finds the data pipeline's background threads through the task's loader
    chain (the trainer's decode and augment threads), outermost first, two of one name kept
    apart, and a task without them gives none."""
    import torch

    from data import Ahead
    from scripts.profile_train_step import stage_readings

    class Source:
        def next_batch(self):
            return torch.zeros(1)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

        def __len__(self):
            return 1

    class Task:
        pass

    task = Task()
    task.train_loader = Ahead(Ahead(Source(), lambda b: b, "cpu", name="decode-ahead"),
                              lambda b: b, "cpu", name="decode-ahead")  # fmt: skip
    readings = stage_readings(task)
    assert list(readings) == ["decode-ahead", "decode-ahead#1"]
    first = readings["decode-ahead"]
    assert first["batches"] == 0 and set(first["wall"]) == {"receive", "work", "hand-over"}
    assert stage_readings(Task()) == {}
