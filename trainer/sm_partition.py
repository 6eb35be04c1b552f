"""``trainer.step_sms``: the training loop's GPU work on N of the GPU's SMs.

The loop (training steps, ``trainer.step_graph``'s capture and replays, evaluation) runs on a
stream of a CUDA green context of ``step_sms`` SMs. Work issued on other streams of the device's
primary context, the GPU image pipeline's included (``data.decode=gpu``: nvJPEG, as torchvision
drives it, waits on the host for small per-image kernels), may use every SM, so it never queues
behind the step's kernels for lack of one; the step runs on fewer SMs. Opt-in, for the case
where such a pipeline, not the step, bounds training (docs/benchmarks.md, issue 4's loading).

Needs a CUDA build whose ``torch.cuda.green_contexts.GreenContext`` has ``Stream()`` and a driver
with green contexts; anything else is a clear error at start.
"""

from __future__ import annotations

import contextlib

import torch


def check(step_sms, device: torch.device) -> None:
    """Raise ValueError where ``trainer.step_sms`` cannot be used (before anything is built)."""
    if step_sms is None:
        return
    if isinstance(step_sms, bool) or not isinstance(step_sms, int) or step_sms < 1:
        raise ValueError(f"trainer.step_sms={step_sms!r}: use null (all SMs) or a number of SMs")
    if device.type != "cuda":
        raise ValueError(f"trainer.step_sms={step_sms}: it needs a CUDA device (trainer.device "
                         f"resolved to {device.type})")  # fmt: skip


def green_stream(num_sms: int, device) -> tuple[object, torch.cuda.Stream]:
    """(context, stream): a CUDA green context of ``num_sms`` SMs on ``device`` and a stream
    whose kernels run only on those SMs. Keep the context as long as the stream is used."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).multi_processor_count
    if not 0 < num_sms < total:
        raise ValueError(f"{num_sms} SMs: use 1 .. {total - 1} (this GPU has {total})")
    try:
        from torch.cuda.green_contexts import GreenContext
    except ImportError as e:
        raise RuntimeError(f"torch {torch.__version__} has no torch.cuda.green_contexts") from e
    try:
        ctx = GreenContext.create(num_sms=num_sms, device_id=index)
    except TypeError:  # earlier signature: create(num_sms, device_id)
        ctx = GreenContext.create(num_sms, index)
    if not hasattr(ctx, "Stream"):
        raise RuntimeError(f"torch {torch.__version__}: GreenContext has no Stream(), which a "
                           "partition of the SMs needs")  # fmt: skip
    return ctx, ctx.Stream()


@contextlib.contextmanager
def on_sms(step_sms, device):
    """Run the block's CUDA work on a green context of ``step_sms`` SMs (None: as it is). The
    block's stream waits for the caller's work before it, the caller's for the block's after."""
    if step_sms is None:
        yield None
        return
    ctx, stream = green_stream(step_sms, device)
    caller = torch.cuda.current_stream(device)
    stream.wait_stream(caller)
    try:
        with torch.cuda.stream(stream):
            yield stream
    finally:
        caller.wait_stream(stream)
        stream.synchronize()  # the context goes with this frame; its stream's work is done
        del ctx


def capture_stream(device) -> torch.cuda.Stream | None:
    """The stream a CUDA graph should be captured on so that its kernels run where the loop's
    do: the current stream under ``on_sms`` (a green context's), else None (torch's choice)."""
    current = torch.cuda.current_stream(device)
    return None if current == torch.cuda.default_stream(device) else current
