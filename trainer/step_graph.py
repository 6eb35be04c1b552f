"""``trainer.step_graph``: the whole optimizer step captured once as a CUDA graph and replayed.

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

Limits (checked, with the reason, by :func:`check`): one process (DDP's gradient hooks
communicate), one micro-batch a step, a CUDA device, and no CUDA graphs of torch.compile's own
(``compile_mode`` reduce-overhead or max-autotune). Batches must keep one shape. Not yet run on
a GPU (tenth session): ``tests/test_step_graph.py``'s GPU test compares it with the eager step.
"""

from __future__ import annotations

import warnings

import torch


def check(rc, world_size: int, accum: int, device: torch.device) -> None:
    """Raise ValueError where ``trainer.step_graph`` cannot run."""
    t = rc.trainer
    why = []
    if device.type != "cuda":
        why.append(f"it needs a CUDA device (trainer.device resolved to {device.type})")
    if world_size != 1:
        why.append(f"it runs in one process (got {world_size}: DDP's hooks communicate)")
    if accum != 1:
        why.append(f"it takes one micro-batch a step (got {accum}: set trainer.micro_batch to "
                   "the per-process batch)")  # fmt: skip
    if t.compile and t.compile_mode in ("reduce-overhead", "max-autotune"):
        why.append(f"trainer.compile_mode={t.compile_mode} makes CUDA graphs of its own (use "
                   "default or max-autotune-no-cudagraphs)")  # fmt: skip
    if why:
        raise ValueError("trainer.step_graph=true: " + "; ".join(why))


class StepGraph:
    """Replays one captured optimizer step; ``__call__(lr)`` takes the step's learning rate and
    returns (loss, grad norm) as device tensors of their own, as ``loop._train_step`` does."""

    def __init__(self, task, train_model, opt, clip, autocast, device):
        """``clip``: clips the gradients, returns their norm; ``autocast``: the loop's autocast
        context factory, made with ``cache_enabled=False``."""
        self.task, self.model, self.opt, self.clip = task, train_model, opt, clip
        self.autocast, self.device = autocast, torch.device(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple | None = None
        self.outputs: tuple | None = None

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured work: zero the gradients in place, loss, backward, clip, AdamW."""
        self.opt.zero_grad(set_to_none=False)
        with self.autocast():
            loss = self.task.loss(self.model, self.inputs)
        loss.backward()
        norm = self.clip()
        self.opt.step()
        return loss.detach(), norm

    def __call__(self, batch, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None:
            self._capture(batch, lr)
        for x, static in zip(batch, self.inputs):
            if x.shape != static.shape or x.dtype != static.dtype:
                raise ValueError(
                    f"trainer.step_graph: a batch of {tuple(x.shape)} {x.dtype} where the "
                    f"captured step takes {tuple(static.shape)} {static.dtype}"
                )
            static.copy_(x)
        for group in self.opt.param_groups:
            group["lr"].fill_(lr)
        self.graph.replay()
        loss, norm = self.outputs
        return loss.clone(), norm.clone()

    # ------------------------------------------------------------------ capture

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def _capture(self, batch, lr: float) -> None:
        dev = self.device
        self.inputs = tuple(x.detach().clone() for x in batch)  # (clone keeps the strides)
        for group in self.opt.param_groups:  # the learning rate read on the device
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=dev)
            group["capturable"] = True
        for p in self._params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            state = self.opt.state.get(p)
            if state and "step" in state and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device, torch.float32)
        saved = self._snapshot()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), warnings.catch_warnings():
            # (AdamW warns that a capturable instance runs uncaptured: these two steps do)
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            for _ in range(2):
                self._body()
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        self._restore(saved)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the data pipeline's threads (data.decode_process=false) go on issuing
        # their own work (nvJPEG's synchronising calls included) while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = self._body()

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
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(saved["rng"], self.device)
        else:
            torch.set_rng_state(saved["rng"])
