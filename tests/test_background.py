"""Tests for data/background.py: batches prepared ahead by a thread, with the position of the
batches handed out (not of those prepared ahead) as the resumable state."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from data import Ahead


class Counter:
    """A resumable source: batch i is tensor([i]); ``fail_at`` raises there."""

    def __init__(self, fail_at: int | None = None):
        self.i, self.fail_at, self.calls = 0, fail_at, 0

    def next_batch(self):
        if self.i == self.fail_at:
            raise KeyError(f"bad sample {self.i}")
        self.i += 1
        self.calls += 1
        return torch.tensor([self.i - 1])

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = int(state["i"])

    def __len__(self) -> int:
        return 100


def test_batches_in_order_and_state_of_those_handed_out():
    src = Counter()
    ahead = Ahead(src, lambda b: b * 10, "cpu", depth=3)
    assert ahead.state_dict() == {"i": 0} and len(ahead) == 100
    got = [int(ahead.next_batch()) for _ in range(4)]
    assert got == [0, 10, 20, 30]
    deadline = time.time() + 5
    while src.calls < 8 and time.time() < deadline:  # the thread fills its queue
        time.sleep(0.01)
    time.sleep(0.05)
    assert src.calls == 8  # 4 handed out, 3 ready, 1 waiting for room
    assert ahead.state_dict() == {"i": 4}
    ahead.close()  # the prepared batches are dropped, the source put back
    assert src.i == 4 and int(ahead.next_batch()) == 40
    ahead.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_the_thread_carries_its_name_for_the_os():
    """Profiles read thread names from the OS: the thread names itself (15 bytes at most)."""
    ahead = Ahead(Counter(), lambda b: b, "cpu", depth=1, name="decode-ahead-and-more")
    try:
        ahead.next_batch()
        tid = ahead._thread.native_id
        with open(f"/proc/self/task/{tid}/comm") as f:
            assert f.read().strip() == "decode-ahead-an"
        assert ahead._thread.name == "decode-ahead-and-more"
    finally:
        ahead.close()


def test_close_leaves_a_stuck_thread_behind_with_a_warning():
    """A transform that never returns (a device call that hangs, say) does not hang close():
    after its wait the thread is left behind with a warning, and the object refuses to start
    again, since that thread still holds the source."""
    import threading

    release = threading.Event()

    def transform(b):
        if int(b) == 1:  # the second batch never finishes until released
            release.wait(30)
        return b

    ahead = Ahead(Counter(), transform, "cpu", depth=1)
    try:
        assert int(ahead.next_batch()) == 0
        time.sleep(0.05)  # the thread is now inside batch 1
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="did not stop within 0.3 s"):
            ahead.close(wait_s=0.3)
        assert time.monotonic() - t0 < 5
        with pytest.raises(RuntimeError, match="left stuck by close"):
            ahead.next_batch()
    finally:
        release.set()


def test_close_waits_for_a_thread_that_finishes_its_batch():
    """A slow batch shorter than the wait: close() waits for it, with no warning, and the
    source is put back at the position of the batches handed out."""
    import warnings

    src = Counter()
    ahead = Ahead(src, lambda b: (time.sleep(0.3), b)[1], "cpu", depth=1)
    assert int(ahead.next_batch()) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ahead.close(wait_s=5)
    assert src.i == 1 and int(ahead.next_batch()) == 1
    ahead.close()


def test_load_state_dict_restarts_from_the_position():
    ahead = Ahead(Counter(), lambda b: b, "cpu")
    [ahead.next_batch() for _ in range(3)]
    state = ahead.state_dict()
    [ahead.next_batch() for _ in range(5)]
    ahead.load_state_dict(state)
    assert ahead.state_dict() == {"i": 3} and int(ahead.next_batch()) == 3
    ahead.close()


def test_errors_in_the_thread_reach_the_caller():
    ahead = Ahead(Counter(fail_at=2), lambda b: b, "cpu")
    assert [int(ahead.next_batch()) for _ in range(2)] == [0, 1]
    with pytest.raises(KeyError, match="bad sample 2"):
        ahead.next_batch()
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Ahead(Counter(), lambda b: b, "cpu", depth=0)


@pytest.mark.gpu
def test_cuda_batches_wait_for_the_side_stream():
    """The batch is filled on the thread's side stream after a long GPU spin: the caller's
    stream must wait for that before reading it (else it sums unfilled memory)."""

    def slow(b):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time on the side stream
        return torch.full((1024,), float(b), device="cuda")

    ahead = Ahead(Counter(), slow, "cuda", depth=2)
    sums = [ahead.next_batch().sum() for _ in range(6)]
    assert [float(s) for s in sums] == [1024.0 * i for i in range(6)]
    ahead.close()


def test_stage_times_split_receive_work_and_hand_over():
    """Each thread's time a batch by part: a source that sleeps shows as receiving (wall, not
    CPU), a transform that computes as work (wall and CPU), and a full queue as hand-over."""
    from data.background import background_stages, stage_lines

    class Slow(Counter):
        def next_batch(self):
            time.sleep(0.01)
            return super().next_batch()

    def spin(b):
        end = time.thread_time() + 0.005
        while time.thread_time() < end:
            pass
        return b

    inner = Ahead(Slow(), spin, "cpu", depth=1, name="first")
    outer = Ahead(inner, lambda b: b, "cpu", depth=1, name="second")
    assert [a.name for a in background_stages(outer)] == ["second", "first"]
    before = {a.name: a.times.reading() for a in background_stages(outer)}
    for _ in range(8):
        outer.next_batch()
        time.sleep(0.05)  # a slow consumer: the threads wait to hand over
    after = {a.name: a.times.reading() for a in background_stages(outer)}
    outer.close()
    b, a = before["first"], after["first"]
    n = a["batches"] - b["batches"]
    assert n >= 6

    def mean(part, kind):
        return (a[kind][part] - b[kind][part]) / n

    assert mean("receive", "wall") >= 0.009 and mean("receive", "cpu") < 0.005
    assert mean("work", "cpu") >= 0.0045 and mean("work", "wall") >= mean("work", "cpu") * 0.9
    b2, a2 = before["second"], after["second"]
    n2 = a2["batches"] - b2["batches"]
    waited = (a2["wall"]["hand-over"] - b2["wall"]["hand-over"]) / n2
    assert waited > 0.01  # its queue of depth 1 was full: the consumer sleeps 50 ms a batch
    lines = stage_lines(before, after)
    assert len(lines) == 2 and lines[0].split()[0] == "second" and "batches)" in lines[1]
    assert stage_lines(before, before) == []  # no batches between: no lines
