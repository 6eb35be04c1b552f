"""data.process_ahead: batches from a child process, in order, resumable, errors reported."""

import functools
import os
import signal

import pytest
import torch

from data import ProcessAhead, batch_spec


class Counter:
    """Batch i is (a (2, 3) tensor of i, a (1,) tensor of 10 i); fails or dies at ``bad``."""

    def __init__(self, bad: int | None = None, how: str = "raise", device: str = "cpu"):
        self.i, self.bad, self.how, self.device = 0, bad, how, device

    def next_batch(self):
        if self.i == self.bad:
            if self.how == "exit":
                os._exit(3)
            if self.how == "crash":  # as a native library's fault would
                os.kill(os.getpid(), signal.SIGSEGV)
            if self.how == "shape":
                return torch.zeros(5), torch.zeros(1)
            raise ValueError(f"no batch {self.i}")
        i, self.i = self.i, self.i + 1
        dev = self.device
        return torch.full((2, 3), float(i), device=dev), torch.tensor([10 * i], device=dev)

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = int(state["i"])


def _counter(**kw):
    return Counter(**kw)


def _values(src, n):
    return [(int(x[0, 0]), int(y[0])) for x, y in (src.next_batch() for _ in range(n))]


def test_batches_in_order_and_state_of_those_handed_out():
    src = ProcessAhead(functools.partial(_counter), "cpu", depth=2, length=7, state={"i": 0})
    try:
        assert len(src) == 7
        src.start()  # early, as the trainer does: the same child then hands out the batches
        pid = src._proc.pid
        assert _values(src, 5) == [(i, 10 * i) for i in range(5)]
        assert src.state_dict() == {"i": 5}  # not the position of the batches made ahead
        x, _ = src.next_batch()
        x.fill_(-1)  # the caller's own copy: the slot it came from is reused
        assert _values(src, 4) == [(i, 10 * i) for i in range(6, 10)]
        src.start()  # started already: nothing new
        assert src._proc.pid == pid
    finally:
        src.close()


def test_load_state_dict_restarts_the_child_at_the_position():
    src = ProcessAhead(functools.partial(_counter), "cpu", depth=3)
    try:
        _values(src, 3)
        saved = src.state_dict()
        after = _values(src, 4)
        src.load_state_dict(saved)
        assert _values(src, 4) == after
        src.close()
        fresh = ProcessAhead(functools.partial(_counter), "cpu", state=saved)
        assert _values(fresh, 4) == after  # a new process (a resumed run) alike
        fresh.close()
    finally:
        src.close()


@pytest.mark.parametrize(
    "how, match",
    [
        ("raise", "ValueError: no batch 2"),
        ("exit", "exit code 3"),
        ("shape", "a batch of"),
        (
            "crash",
            r"(?s)exit code -11.*crashed:\n.*Fatal Python error: Segmentation fault.*"
            r"line \d+ in next_batch\n",
        ),
    ],  # fmt: skip
)
def test_failures_in_the_child_reach_the_caller(how, match):
    src = ProcessAhead(functools.partial(_counter, bad=2, how=how), "cpu", depth=1)
    try:
        assert _values(src, 2) == [(0, 0), (1, 10)]
        with pytest.raises(RuntimeError, match=match):
            src.next_batch()
        assert src._proc is None  # stopped and cleaned up
    finally:
        src.close()


def test_the_child_leaves_sigint_and_sigterm_to_the_trainer():
    """A Ctrl-C reaches the whole process group: the trainer checkpoints and stops, and the
    child must still hand out batches until the trainer closes it."""
    src = ProcessAhead(functools.partial(_counter), "cpu", depth=1)
    try:
        assert _values(src, 1) == [(0, 0)]
        os.kill(src._proc.pid, signal.SIGINT)
        os.kill(src._proc.pid, signal.SIGTERM)
        assert _values(src, 3) == [(1, 10), (2, 20), (3, 30)]
        proc = src._proc
    finally:
        src.close()
    assert not proc.is_alive()


def test_slots_laid_out_by_the_spec_before_the_source_exists():
    """With a spec the slots (and so the batches handed out) take its layout, made before the
    child builds the source; a batch that does not fit them is an error."""
    x = torch.empty(3, 2, device="meta").t()  # (2, 3), column-major: not the source's layout
    spec = batch_spec((x, torch.empty(1, dtype=torch.int64, device="meta")))
    assert spec == (((2, 3), (1, 2), torch.float32), ((1,), (1,), torch.int64))
    src = ProcessAhead(functools.partial(_counter), "cpu", depth=2, spec=spec)
    try:
        x, y = src.next_batch()
        assert x.stride() == (1, 2) and y.dtype == torch.int64
        assert _values(src, 3) == [(i, 10 * i) for i in range(1, 4)]
    finally:
        src.close()
    wrong = ((2, 3), (3, 1), torch.float32), ((1,), (1,), torch.float32)  # float labels
    src = ProcessAhead(functools.partial(_counter), "cpu", depth=2, spec=wrong)
    try:
        with pytest.raises(RuntimeError, match="does not fit the slots"):
            src.next_batch()
    finally:
        src.close()


def _counter_if_start_method(expected: str):
    import multiprocessing

    if multiprocessing.get_start_method() != expected:
        raise RuntimeError(f"child start method {multiprocessing.get_start_method()!r}")
    return Counter()


def test_the_childs_own_processes_start_as_the_parents_would():
    """A spawned child's default start method is the parent's (fork on Linux), not spawn:
    its loader's workers start in seconds, not minutes."""
    import multiprocessing

    method = multiprocessing.get_start_method()
    src = ProcessAhead(functools.partial(_counter_if_start_method, method), "cpu", depth=1)
    try:
        assert _values(src, 2) == [(0, 0), (1, 10)]
    finally:
        src.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        ProcessAhead(functools.partial(_counter), "cpu", depth=0)
    for spec in ((), [((2, 3), (3,), torch.float32)], [((2, 3), (3, 1), "float32")], 5):
        with pytest.raises(ValueError, match="spec must be"):
            ProcessAhead(functools.partial(_counter), "cpu", spec=spec)
    with pytest.raises(TypeError, match="no length"):
        len(ProcessAhead(functools.partial(_counter), "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_through_shared_buffers():
    """CUDA slots shared by IPC and ordered by interprocess events: every batch arrives whole
    while the parent's stream is busy, and a slot is not rewritten before the parent read it."""
    spec = batch_spec(Counter(device="meta").next_batch())
    src = ProcessAhead(functools.partial(_counter, device="cuda"), "cuda", depth=2, spec=spec)
    try:
        big = torch.randn(4096, 4096, device="cuda")
        got = []
        for _ in range(30):
            for _ in range(5):  # queued work on the parent's stream
                big = big @ big / 64.0
            x, y = src.next_batch()
            got.append((x.clone(), y.clone()))
        torch.cuda.synchronize()
        for i, (x, y) in enumerate(got):
            assert torch.equal(x, torch.full((2, 3), float(i), device="cuda"))
            assert int(y[0]) == 10 * i
    finally:
        src.close()
