"""``trainer.step_graph``: the optimizer step captured once as CUDA graphs and replayed.

With ``trainer.compile_mode=reduce-overhead`` the forward and the backward replay as CUDA
graphs, but the rest of the step stays eager: gradient accumulation into ``.grad``, clipping,
the optimizer and the graphs' own bookkeeping, ~14 ms of host work a step for EfficientViT-M0
at batch 256 against ~12 ms of GPU kernels. Here the step after the batch is ready (zeroing the
gradients, forward, loss, backward, clipping, AdamW) is captured as one graph, so the host's
work a step is two input copies, one learning-rate write and one graph launch. That also leaves
the GIL free for threads that prepare batches beside the step (``data.decode=gpu`` with
``data.decode_process=false``).

How: the batch is copied into static input tensors; the gradients stay allocated (zeroed inside
the graph, so their addresses, and the fused AGC's tables, do not change); AdamW runs with
``capturable=True`` and its learning rate as a device tensor written before each replay. The
capture follows two warm-up steps on a side stream (allocator, cuDNN and Triton choices, the
optimizer's lazy state) whose every effect is undone (weights, buffers, optimizer state, the
CUDA RNG), so the run trains as the eager one does. Autocast runs without its weight-cast cache
(a cached cast from outside the capture would be read from memory the graph does not own).

With gradient accumulation (``accum`` micro-batches a step) there are two graphs: one micro-step
(forward, loss / accum, backward adding into the gradients), replayed once per micro-batch, and
the update (clipping, AdamW, zeroing the gradients), replayed once a step.

Limits (checked, with the reason, by :func:`check`): one process (DDP's gradient hooks
communicate), a CUDA device, and no CUDA graphs of torch.compile's own (``compile_mode``
reduce-overhead or max-autotune). Batches must keep one shape. ``tests/test_step_graph.py``
compares it with the eager step on the GPU, step by step, with and without accumulation (both
passed: on an H100, and with accumulation on an H200; docs/benchmarks.md); the capture checks
that the backward adds into the gradients in place.
"""

from __future__ import annotations

import warnings

import torch

from .sm_partition import capture_stream


def check(rc, world_size: int, device: torch.device) -> None:
    """Raise ValueError where ``trainer.step_graph`` cannot run."""
    t = rc.trainer
    why = []
    if device.type != "cuda":
        why.append(f"it needs a CUDA device (trainer.device resolved to {device.type})")
    if world_size != 1:
        why.append(f"it runs in one process (got {world_size}: DDP's hooks communicate)")
    if t.compile and t.compile_mode in ("reduce-overhead", "max-autotune"):
        why.append(f"trainer.compile_mode={t.compile_mode} makes CUDA graphs of its own (use "
                   "default or max-autotune-no-cudagraphs)")  # fmt: skip
    if why:
        raise ValueError("trainer.step_graph=true: " + "; ".join(why))


class StepGraph:
    """Replays one captured optimizer step; ``__call__(next_batch, lr)`` takes the batch source
    (called ``accum`` times) and the step's learning rate and returns (mean loss, grad norm)
    as device tensors of their own, as ``loop._train_step`` does. ``capture=False`` runs the
    same work eagerly (what the CPU tests check)."""

    def __init__(self, task, train_model, opt, clip, autocast, device, accum: int = 1,
                 capture: bool = True):  # fmt: skip
        """``clip``: clips the gradients, returns their norm; ``autocast``: the loop's autocast
        context factory, made with ``cache_enabled=False``."""
        if int(accum) < 1:
            raise ValueError(f"StepGraph: accum must be >= 1, got {accum!r}")
        self.task, self.model, self.opt, self.clip = task, train_model, opt, clip
        self.autocast, self.device = autocast, torch.device(device)
        self.accum, self.capture = int(accum), bool(capture)
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.inputs: tuple | None = None
        self.outputs: dict = {}  # each graph's output tensors, overwritten by each replay

    def _micro(self) -> torch.Tensor:
        """Forward and backward of the micro-batch in ``inputs``; the gradients add up."""
        with self.autocast():
            loss = self.task.loss(self.model, self.inputs)
        (loss / self.accum if self.accum > 1 else loss).backward()
        return loss.detach()

    def _update(self) -> torch.Tensor:
        """Clip, AdamW, then zero the gradients in place for the next step's micro-batches."""
        norm = self.clip()
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        return norm

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch a step: the whole step, one graph (the gradients are zero on entry:
        made so before the capture, and by every step's end)."""
        loss = self._micro()
        return loss, self._update()

    def _load(self, batch) -> None:
        for x, static in zip(batch, self.inputs):
            if x.shape != static.shape or x.dtype != static.dtype:
                raise ValueError(
                    f"trainer.step_graph: a batch of {tuple(x.shape)} {x.dtype} where the "
                    f"captured step takes {tuple(static.shape)} {static.dtype}"
                )
            static.copy_(x)

    def _run(self, name: str):
        """Replay graph ``name`` (or, uncaptured, run its work) and return its output."""
        if not self.capture:
            return dict(self._steps())[name]()
        self.graphs[name].replay()
        return self.outputs[name]

    def __call__(self, next_batch, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        first = next_batch()
        if self.inputs is None:
            self._prepare(first, lr)
        for group in self.opt.param_groups:
            group["lr"].fill_(lr)
        if self.accum == 1:
            self._load(first)
            loss, norm = self._run("step")
            return loss.clone(), norm.clone()
        total = None
        for i in range(self.accum):
            self._load(first if i == 0 else next_batch())
            loss = self._run("micro").clone()  # (the next replay overwrites the output)
            total = loss if total is None else total + loss
        return total / self.accum, self._run("update").clone()

    # ------------------------------------------------------------------ capture

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def _prepare(self, batch, lr: float) -> None:
        """Static inputs, device learning rates, allocated gradients; then (``capture``) warm
        up, undo the warm-up and capture."""
        dev = self.device
        self.inputs = tuple(x.detach().clone() for x in batch)  # (clone keeps the strides)
        for group in self.opt.param_groups:  # the learning rate read on the device
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=dev)
            group["capturable"] = self.capture
        for p in self._params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
            state = self.opt.state.get(p)
            if state and "step" in state and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device, torch.float32)
        if self.capture:
            self._capture()

    def _steps(self):
        """The work of one step, as ``(name, fn)`` for each graph, in replay order."""
        if self.accum == 1:
            return [("step", self._body)]
        return [("micro", self._micro)] * self.accum + [("update", self._update)]

    def _capture(self) -> None:
        dev = self.device
        saved = self._snapshot()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), warnings.catch_warnings():
            # (AdamW warns that a capturable instance runs uncaptured: these two steps do)
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            for _ in range(2):
                for _, fn in self._steps():
                    fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        self._restore(saved)
        grads = [p.grad.data_ptr() for p in self._params()]
        for name, fn in dict(self._steps()).items():  # each graph once
            graph = torch.cuda.CUDAGraph()
            # thread_local: the data pipeline's threads (data.decode_process=false) go on
            # issuing their own work (nvJPEG's synchronising calls included) while this thread
            # captures
            with torch.cuda.graph(graph, stream=capture_stream(dev),  # trainer.step_sms
                                  capture_error_mode="thread_local"):  # fmt: skip
                self.outputs[name] = fn()
            self.graphs[name] = graph
        if [p.grad.data_ptr() for p in self._params()] != grads:
            raise RuntimeError("trainer.step_graph: the captured backward replaced gradient "
                               "tensors instead of adding into them; the graphs would not "
                               "accumulate")  # fmt: skip

    def _snapshot(self) -> dict:
        """What the warm-up steps change: weights, buffers (BatchNorm statistics), optimizer
        state (None where it is not made yet), the CUDA RNG."""
        model = self.task.model
        return {
            "tensors": [t.detach().clone() for t in (*model.parameters(), *model.buffers())],
            "state": {
                p: (
                    {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} if s else None
                )
                for p, s in ((p, self.opt.state.get(p)) for p in self._params())
            },
            "rng": self._rng_state(),
        }

    def _rng_state(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()  # (the CPU: the undo is tested there)

    @torch.no_grad()
    def _restore(self, saved: dict) -> None:
        model = self.task.model
        for t, v in zip((*model.parameters(), *model.buffers()), saved["tensors"]):
            t.copy_(v)
        for p, before in saved["state"].items():
            state = self.opt.state.get(p)
            if not state:
                continue
            for k, v in state.items():
                if not torch.is_tensor(v):
                    continue
                if before is None:  # made by the warm-up: as the first real step would find it
                    v.zero_()
                else:
                    v.copy_(before[k])
        for p in self._params():
            p.grad.zero_()
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(saved["rng"], self.device)
        else:
            torch.set_rng_state(saved["rng"])
