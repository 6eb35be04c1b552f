"""Batches prepared ahead by a background thread, on a side CUDA stream, while the step runs.

``data.decode=gpu`` moves decoding and augmentation onto the device, but the host still has
to issue that work: about 20 ms a batch of 256 on an H100 host, as long as a CUDA-graph step
of EfficientViT-M0. Issued from the training loop, the two add up; from a background thread
they overlap: the op dispatch, nvJPEG's host side and the loader's queue waits release the
GIL, and the device runs the decode kernels on their own stream beside the step's.

:class:`Ahead` wraps a resumable batch source (``next_batch``, ``state_dict``,
``load_state_dict``) and a ``transform`` that moves a batch to the device. It keeps up to
``depth`` transformed batches ready. Its ``state_dict`` is the source's state just after the
batch last handed out, not after the ones prepared ahead, so a checkpoint resumes at the right
batch (with the same draws: the GPU pipeline's random state is its batch counter, part of the
source's state). Errors in the thread are raised by ``next_batch``. The source and the
transform must not draw from the global RNGs (the training thread's): the GPU pipeline draws
from per-batch numpy generators, the DataLoader from its own generator.

Each thread times its three parts a batch, in wall time and in its own CPU time
(:class:`StageTimes`): receiving the batch from its source, transforming it, and handing it
over (waiting while the queue is full). :func:`stage_lines` turns two readings into a table;
``scripts/profile_train_step.py`` prints it. Where a thread's wall time well exceeds its CPU
time in a part that does not wait by design, it waits for another thread (the GIL, a lock).
"""

from __future__ import annotations

import contextlib
import copy
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import torch

_POLL_S = 0.1  # how often a blocked thread or caller looks for a stop / a dead thread
_CLOSE_WAIT_S = 60.0  # how long close() waits for a thread that is busy in one batch


def set_os_thread_name(name: str) -> None:
    """Name the calling thread for the OS (Linux: ``/proc/PID/task/TID/comm``, what ``top -H``
    and ``scripts/profile_train_step.py`` show; at most 15 bytes), where Python's own thread
    names do not reach. Does nothing elsewhere or if it fails."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


PARTS = ("receive", "work", "hand-over")  # a background thread's parts of one batch


class StageTimes:
    """A background thread's time by part of a batch (:data:`PARTS`): batches done, and the
    sums of wall and thread-CPU seconds. Written by the thread, read by others: a reading
    (:meth:`reading`) may be one batch out of step, which is fine for per-batch means."""

    def __init__(self):
        self.batches = 0
        self.wall = dict.fromkeys(PARTS, 0.0)
        self.cpu = dict.fromkeys(PARTS, 0.0)

    def add(self, part: str, wall: float, cpu: float) -> None:
        self.wall[part] += wall
        self.cpu[part] += cpu

    def reading(self) -> dict:
        return {"batches": self.batches, "wall": dict(self.wall), "cpu": dict(self.cpu)}


def stage_lines(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """One line per thread (name -> :meth:`StageTimes.reading` at two moments): each part's
    mean per batch between them, wall / the thread's CPU, in ms."""
    lines = []
    for name, b in before.items():
        a = after.get(name)
        n = a["batches"] - b["batches"] if a else 0
        if n <= 0:
            continue
        parts = "   ".join(f"{p} {1e3 * (a['wall'][p] - b['wall'][p]) / n:5.1f} / "
                           f"{1e3 * (a['cpu'][p] - b['cpu'][p]) / n:4.1f}" for p in PARTS)  # fmt: skip
        lines.append(f"  {name:<16} {parts}   ({n} batches)")
    return lines


def background_stages(source) -> Iterator[Ahead]:
    """The :class:`Ahead` threads of a chain of sources (``.source`` links), outermost first."""
    seen = set()
    while source is not None and id(source) not in seen:
        seen.add(id(source))
        if isinstance(source, Ahead):
            yield source
        source = getattr(source, "source", None)


class Ahead:
    """``name``: the thread's name, for Python and for the OS (profiles tell threads apart by
    it); ``times``: the thread's :class:`StageTimes`."""

    def __init__(self, source, transform: Callable, device: torch.device | str, depth: int = 2,
                 name: str = "batches-ahead"):  # fmt: skip
        if int(depth) < 1:
            raise ValueError(f"Ahead: depth must be >= 1, got {depth!r}")
        self.source, self.transform = source, transform
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.depth = device, int(depth)
        self._state = copy.deepcopy(source.state_dict())
        self._thread: threading.Thread | None = None
        self._stuck = False  # close() left a thread stuck in a batch (it holds the source)
        self.name = str(name)
        self.times = StageTimes()

    def __len__(self) -> int:
        return len(self.source)

    # ------------------------------------------------------------------ the caller's side

    def next_batch(self):
        if self._thread is None:
            self._start()
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the background batch thread stopped") from None
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, ready, state = item
        if ready is not None:  # the step's stream waits for the side stream's work, and the
            stream = torch.cuda.current_stream(self.device)  # allocator for the step's use
            stream.wait_event(ready)
            for t in _tensors(batch):
                if t.is_cuda:
                    t.record_stream(stream)
        self._state = state
        return batch

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()  # what was prepared ahead belongs to the old position
        self.source.load_state_dict(state)
        self._state = copy.deepcopy(self.source.state_dict())

    def close(self, wait_s: float = _CLOSE_WAIT_S) -> None:
        """Stop the thread and drop the batches prepared ahead (the next ``next_batch``
        starts again from ``state_dict``'s position).

        A thread still inside one batch after ``wait_s`` seconds (its source or transform
        stuck, say in a device call that never returns) is left behind as a daemon thread with
        a warning, so that an error being raised, or the process's exit, is not held up by it.
        It still holds the source, so this object cannot start again (``next_batch`` raises)."""
        if self._thread is None:
            return
        self._stop.set()
        deadline = time.monotonic() + float(wait_s)
        while self._thread.is_alive():
            if time.monotonic() > deadline:
                warnings.warn(f"{self.name}: the background thread did not stop within "
                              f"{float(wait_s):g} s of being asked to (stuck in its source or "
                              "transform); left behind", RuntimeWarning, stacklevel=2)  # fmt: skip
                self._thread, self._stuck = None, True
                return
            try:  # unblock a put
                self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None
        self.source.load_state_dict(copy.deepcopy(self._state))

    def __del__(self):
        try:
            if self._thread is not None:
                self._stop.set()
        except Exception:
            pass

    # ------------------------------------------------------------------ the thread

    def _start(self) -> None:
        if self._stuck:
            raise RuntimeError(f"{self.name}: a background thread left stuck by close() still "
                               "holds the batch source; build the loader again")  # fmt: skip
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(self.depth)
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None
        self._thread = threading.Thread(target=self._run, args=(side,), name=self.name, daemon=True)
        self._thread.start()

    def _run(self, side) -> None:
        set_os_thread_name(self.name)
        try:
            if side is not None:  # current device and stream are per thread
                torch.cuda.set_device(self.device)
            with torch.no_grad(), torch.cuda.stream(side) if side else contextlib.nullcontext():
                clock, cpu, times = time.perf_counter, time.thread_time, self.times
                while not self._stop.is_set():
                    t0, c0 = clock(), cpu()
                    batch = self.source.next_batch()
                    t1, c1 = clock(), cpu()
                    batch = self.transform(batch)
                    ready = None
                    if side is not None:
                        ready = torch.cuda.Event()
                        ready.record(side)
                    state = copy.deepcopy(self.source.state_dict())
                    t2, c2 = clock(), cpu()
                    if not self._put((batch, ready, state)):
                        return
                    t3, c3 = clock(), cpu()
                    times.add("receive", t1 - t0, c1 - c0)
                    times.add("work", t2 - t1, c2 - c1)
                    times.add("hand-over", t3 - t2, c3 - c2)
                    times.batches += 1
        except BaseException as e:  # handed to the caller
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
