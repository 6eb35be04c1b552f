"""scripts/profile_train_step.py's per-thread CPU accounting (Linux /proc), on the CPU."""

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
