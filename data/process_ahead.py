"""Batches prepared by a child process, handed over through a ring of shared buffers.

With ``data.decode=gpu`` the host side of decoding and augmenting (nvJPEG's per-image calls,
the augmentation's launches, the loader's queue) runs in Python threads beside the training
step (:class:`data.background.Ahead`), and both share one GIL: on an H100 the step's own host
time nearly doubles next to them (``docs/benchmarks.md``). :class:`ProcessAhead` moves that
work into a process of its own, with its own interpreter.

The child builds its batch source from a picklable ``factory`` (its own loader, workers and
pipeline), resumes it at the parent's position, and writes each batch (a tuple of tensors of
fixed shapes) into one of ``depth`` slots allocated once (before the source is built, when
their layout is given) and shared with the parent: CUDA memory through CUDA IPC, with
interprocess events ordering the child's writes before the parent's reads and the parent's
reads before the child writes the slot again; CPU memory through shared memory. The parent
copies a slot out (on its current stream) and hands the slot back, so what it returns is its
own. ``state_dict`` is the source's state just after the batch last handed out, not after
those prepared ahead, as with :class:`~data.background.Ahead`. Errors in the child reach
``next_batch`` with the child's traceback; a child that crashes is reported with where its
threads were (``faulthandler``), and a child whose parent dies stops.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import multiprocessing
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.multiprocessing  # registers the reductions that share tensors between processes

from .background import _POLL_S  # how often a blocked side looks for a stop or a dead peer

_START_S = 600.0  # the first batch may wait for a folder scan and nvJPEG's start-up


class ProcessAhead:
    """``next_batch`` / ``state_dict`` / ``load_state_dict`` / ``close`` of the source that
    ``factory()`` builds, run in a child process. ``factory`` must be picklable (a module-level
    function or a ``functools.partial`` of one); the source it returns hands out tuples of
    tensors on ``device`` of the same shapes every batch.

    ``spec`` (see :func:`batch_spec`) lays out the shared slots before the child builds the
    source. Give it for a source that runs CUDA work in threads of its own: without it the
    slots are made from the first batch and shared while those threads run, and on an H100
    (torch 2.11) sharing CUDA memory beside nvJPEG decoding and Triton launches crashed the
    child (SIGSEGV in ``_share_cuda_``) in about half the starts."""

    def __init__(self, factory: Callable, device: torch.device | str, depth: int = 2,
                 length: int | None = None, state: dict | None = None,
                 spec: tuple | None = None):  # fmt: skip
        if int(depth) < 1:
            raise ValueError(f"ProcessAhead: depth must be >= 1, got {depth!r}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.factory, self.device, self.depth, self._length = factory, device, int(depth), length
        self.spec = None if spec is None else _checked_spec(spec)
        self._state = copy.deepcopy(state)  # None: where the factory's source starts
        self._proc = None

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("ProcessAhead: no length given")
        return self._length

    # ------------------------------------------------------------------ the parent's side

    def next_batch(self) -> tuple:
        self.start()
        if self._slots is None:  # the child's first message: its slots
            msg = self._get(_START_S)
            slots, ready, free = msg[1:]
            self._slots = slots
            if self.device.type == "cuda":
                ev = torch.cuda.Event.from_ipc_handle
                self._ready = [ev(self.device, h) for h in ready]
                self._free = [ev(self.device, h) for h in free]
        _, k, state = self._get(None)
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(self._ready[k])  # the child's copy into slot k is done
            batch = tuple(t.clone() for t in self._slots[k])
            self._free[k].record(stream)  # and, once this copy is, the slot is free
        else:
            batch = tuple(t.clone() for t in self._slots[k])
        self._free_tx.send(k)
        self._state = state
        return batch

    def start(self) -> None:
        """Start the child now (``next_batch`` would start it otherwise), so that its start-up
        (the loader's scan and workers, the first batches) overlaps the caller's own."""
        if self._proc is None:
            self._start()

    def state_dict(self) -> dict | None:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()  # what was prepared ahead belongs to the old position
        self._state = copy.deepcopy(state)

    def close(self) -> None:
        """Stop the child (the next ``next_batch`` starts a new one at ``state_dict``)."""
        if self._proc is None:
            return
        self._slots = self._ready = self._free = None  # the child's memory: let go first
        self._stop.set()
        deadline = time.monotonic() + 30.0
        while self._proc.is_alive() and time.monotonic() < deadline:
            try:  # unblock a send of the child's
                if self._ready_rx.poll(_POLL_S):
                    self._ready_rx.recv()
            except (EOFError, OSError):
                break
        self._proc.join(timeout=5.0)
        if self._proc.is_alive():  # (it ignores SIGTERM: see _child)
            self._proc.kill()
            self._proc.join()
        for conn in (self._ready_rx, self._free_tx):
            conn.close()
        with contextlib.suppress(OSError):
            os.unlink(self._crash_path)
        self._proc = None

    def _crash_report(self) -> str:
        try:
            with open(self._crash_path, errors="replace") as f:
                return f.read().strip()
        except OSError:
            return ""

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _start(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._stop = ctx.Event()
        # pipes, not queues: a message is in the pipe once send returns (a queue's feeder
        # thread would lose the last messages of a child that dies)
        self._ready_rx, ready_tx = ctx.Pipe(duplex=False)
        free_rx, self._free_tx = ctx.Pipe(duplex=False)
        self._slots = self._ready = self._free = None
        # a crash (SIGSEGV in a native library) sends no message: the child's faulthandler
        # writes its threads' stacks here, and the error shows them
        fd, self._crash_path = tempfile.mkstemp(prefix="batches-process-", suffix=".txt")
        os.close(fd)
        # the child's own processes (its loader's workers) start as this process's would: a
        # spawned child otherwise spawns them too, each importing torch anew (two minutes for
        # 15 workers on the GPU machine, against seconds forked)
        # (get_start_method() without allow_none would fix this process's default for good)
        method = multiprocessing.get_start_method(allow_none=True)
        method = method or multiprocessing.get_all_start_methods()[0]  # the platform's default
        args = (self.factory, self.spec, self.device, self._state, self.depth, ready_tx, free_rx,
                self._stop, self._crash_path, method)  # fmt: skip
        # not a daemon: its loader starts worker processes of its own
        proc = ctx.Process(target=_child, args=args, name="batches-process", daemon=False)
        try:
            proc.start()
        except BaseException:  # nothing started: nothing for close() to stop
            for conn in (self._ready_rx, self._free_tx):
                conn.close()
            with contextlib.suppress(OSError):
                os.unlink(self._crash_path)
            raise
        finally:
            ready_tx.close()  # the child's ends
            free_rx.close()
        self._proc = proc

    def _get(self, timeout: float | None):
        t0 = time.monotonic()
        lost = None  # a message the child died while handing over (its shared memory)
        while True:
            try:
                if self._ready_rx.poll(_POLL_S):
                    msg = self._ready_rx.recv()
                    break
            except EOFError:  # the child is gone: its exit code says more
                self._proc.join(timeout=5.0)
            except Exception as e:  # unpickling needs the child alive (fds, IPC handles)
                self._proc.join(timeout=5.0)
                if self._proc.is_alive():
                    self.close()
                    raise
                lost = e
            if not self._proc.is_alive():
                self._raise_dead(lost)
            if timeout is not None and time.monotonic() - t0 > timeout:
                self.close()
                raise RuntimeError(f"the batch process sent nothing in {timeout:.0f} s")
        if msg[0] == "error":
            self.close()
            raise RuntimeError(f"the batch process failed:\n{msg[1]}")
        return msg

    def _raise_dead(self, lost: Exception | None):
        """The child has exited: raise its last error if it sent one, else its exit code and
        where its threads were if it crashed."""
        code, crash = self._proc.exitcode, self._crash_report()
        error = None
        while error is None:  # what it sent before it exited
            try:
                if not self._ready_rx.poll(0):
                    break
                msg = self._ready_rx.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that needed the child alive: read on
                continue
            error = msg[1] if msg[0] == "error" else None
        self.close()
        if error is not None:
            raise RuntimeError(f"the batch process failed:\n{error}")
        raise RuntimeError(
            f"the batch process stopped (exit code {code}) without a message"
            + (f" (and a message it was sending was lost: {lost!r})" if lost else "")
            + (f"; where its threads were when it crashed:\n{crash}" if crash else "")
        )


def batch_spec(batch) -> tuple:
    """The layout of a batch (a tuple of tensors) as ``ProcessAhead``'s ``spec`` takes it: a
    (shape, stride, dtype) per tensor. ``meta`` tensors describe a batch without memory."""
    return tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in batch)


def _checked_spec(spec) -> tuple:
    try:
        out = tuple((tuple(int(n) for n in shape), tuple(int(n) for n in stride), dtype)
                    for shape, stride, dtype in spec)  # fmt: skip
    except (TypeError, ValueError):
        out = ()
    if not out or not all(isinstance(d, torch.dtype) and len(a) == len(b) for a, b, d in out):
        raise ValueError("ProcessAhead: spec must be a non-empty tuple of (shape, stride, dtype) "
                         f"per tensor of a batch (see batch_spec), got {spec!r}")  # fmt: skip
    return out


# ---------------------------------------------------------------------- the child's side


def _child(factory, spec, device, state, depth, ready_tx, free_rx, stop, crash_path,
           start_method) -> None:  # fmt: skip
    parent = multiprocessing.parent_process()
    multiprocessing.set_start_method(start_method, force=True)
    crash_file = open(crash_path, "w")  # noqa: SIM115 (open for the process's whole life)
    faulthandler.enable(crash_file, all_threads=True)

    def alive() -> bool:
        return not stop.is_set() and (parent is None or parent.is_alive())

    def put(item) -> bool:
        if not alive():
            return False
        try:
            ready_tx.send(item)
            return True
        except OSError:  # the parent closed its end (BrokenPipeError)
            return False

    # the trainer handles SIGINT / SIGTERM itself (a checkpoint, then a clean stop that
    # closes this process): a child dying of them first would cut that short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    source = None
    try:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        side = torch.cuda.Stream(device) if cuda else None
        on_side = (lambda: torch.cuda.stream(side)) if cuda else contextlib.nullcontext
        slots = ready = free = None
        if spec is not None:  # shared before the source exists: no thread of its runs yet
            with on_side():
                slots, ready, free, handles = _make_slots(spec, device, depth)
            if not put(("slots", slots, *handles)):
                return
        unused = list(range(depth))
        source = factory()
        if state is not None:
            source.load_state_dict(state)
        with torch.no_grad(), on_side():
            while alive():
                batch = source.next_batch()
                if not isinstance(batch, tuple) or not all(
                    isinstance(t, torch.Tensor) for t in batch
                ):
                    raise TypeError("ProcessAhead: the source must hand out tuples of tensors")
                pos = copy.deepcopy(source.state_dict())
                if slots is None:  # no spec: slots like the first batch
                    slots, ready, free, handles = _make_slots(batch_spec(batch), device, depth)
                    if not put(("slots", slots, *handles)):
                        return
                k = unused.pop(0) if unused else _take(free_rx, alive)
                if k is None:
                    return
                shapes = [(tuple(t.shape), t.dtype) for t in batch]
                if shapes != [(tuple(t.shape), t.dtype) for t in slots[k]]:
                    raise ValueError(f"ProcessAhead: a batch of {shapes} does not fit the slots, "
                                     f"made for {[(tuple(t.shape), t.dtype) for t in slots[k]]} "
                                     "(by the spec, or by the first batch)")  # fmt: skip
                if cuda:
                    side.wait_event(free[k])  # the parent's copy out of slot k is done
                for dst, src in zip(slots[k], batch):
                    dst.copy_(src)
                if cuda:
                    ready[k].record(side)  # (on the CPU the copy is done before the message)
                del batch
                if not put(("batch", k, pos)):
                    return
    except BaseException:
        put(("error", traceback.format_exc()))
    finally:  # its threads and its loader's workers
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _make_slots(spec, device, depth):
    """``depth`` slots of tensors laid out as ``spec`` says, shared with the parent (CUDA IPC
    or shared memory), and on CUDA the interprocess events of each slot and their handles."""
    slots = [tuple(torch.empty_strided(shape, stride, dtype=dtype, device=device)
                   for shape, stride, dtype in spec) for _ in range(depth)]  # fmt: skip
    if device.type != "cuda":
        for tensors in slots:
            for t in tensors:
                t.share_memory_()
        return slots, None, None, (None, None)
    ready = [torch.cuda.Event(interprocess=True) for _ in range(depth)]
    free = [torch.cuda.Event(interprocess=True) for _ in range(depth)]
    return slots, ready, free, ([e.ipc_handle() for e in ready], [e.ipc_handle() for e in free])


def _take(free_rx, alive):
    while alive():
        try:
            if free_rx.poll(_POLL_S):
                return free_rx.recv()
        except (EOFError, OSError):  # the parent closed its end
            return None
    return None
