"""``trainer.step_sms``: the training loop's GPU work on N of the GPU's SMs.

The loop (training steps, ``trainer.step_graph``'s capture and replays, evaluation) runs on a
stream of a CUDA green context of ``step_sms`` SMs. Work issued on other streams of the device's
primary context, the GPU image pipeline's included (``data.decode=gpu``: nvJPEG, as torchvision
drives it, waits on the host for small per-image kernels), may use every SM, so it never queues
behind the step's kernels for lack of one; the step runs on fewer SMs. Opt-in, for the case
where such a pipeline, not the step, bounds training: EfficientViT M0/M2/M5 from JPEGs with
``data.decode=gpu trainer.step_graph=true`` trained 1.23-1.34x faster on an H100 with the loop on
96-120 of its 132 SMs (docs/benchmarks.md, "SMs the step cannot take"). From a pixel store
(``data.kind=pixels``: nothing to decode) the step on all SMs was faster.

``step_sms`` is a number of SMs (an integer from 1 to the GPU's count less one) or a fraction of
the GPU's SMs in (0, 1) (0.8: 106 of an H100 SXM's 132, 91 of an H100 PCIe's 114), which carries
across cards. The driver may round the count up to its partition granularity.

Needs a CUDA build whose ``torch.cuda.green_contexts.GreenContext`` has ``Stream()`` and a driver
with green contexts; anything else is a clear error at start.
"""

from __future__ import annotations

import contextlib
import math

import torch

_USE = "use null (all SMs), a number of SMs, or a fraction of them in (0, 1)"


def _form(step_sms) -> tuple[int | None, float | None]:
    """(count, fraction), one of them set; ValueError for anything else. A whole float is a
    count (OmegaConf hands the config's ``float`` field 120 as 120.0)."""
    ok = not isinstance(step_sms, bool) and isinstance(step_sms, (int, float))
    if ok and math.isfinite(step_sms) and step_sms > 0:
        if step_sms < 1:
            return None, float(step_sms)
        if float(step_sms).is_integer():
            return int(step_sms), None
    raise ValueError(f"trainer.step_sms={step_sms!r}: {_USE}")


def _show(step_sms) -> str:
    count, fraction = _form(step_sms)
    return str(count if count is not None else fraction)


def sm_count(step_sms, total: int) -> int:
    """The number of SMs ``step_sms`` asks for on a GPU of ``total`` SMs (a fraction rounded to
    the nearest count, at least 1); ValueError where it leaves none to the rest of the work."""
    count, fraction = _form(step_sms)
    n = count if count is not None else max(1, round(fraction * total))
    if not n < total:
        raise ValueError(f"trainer.step_sms={_show(step_sms)}: {n} SMs, use 1 .. {total - 1} "
                         f"(this GPU has {total})")  # fmt: skip
    return n


def idle_note(step_sms, decode_gpu: bool, pipeline_here: bool,
              pixels: bool = False) -> str | None:  # fmt: skip
    """A line for the log where ``step_sms`` leaves SMs to work that cannot use them: the GPU
    image pipeline in a child process (its own CUDA context, which this process's green context
    does not partition; measured: no gain), or no GPU pipeline at all. ``pixels``: the
    training images come from a pixel store (``data.kind=pixels``), so no nvJPEG work waits
    for SMs; the step on all of them was faster there. None where it is the measured case,
    ``data.decode=gpu`` from JPEGs with the pipeline's threads in this process."""
    if step_sms is None:
        return None
    if pixels and decode_gpu:
        return (f"trainer.step_sms={_show(step_sms)}: with data.kind=pixels nothing is decoded, "
                "so no nvJPEG work needs the SMs the step leaves; EfficientViT-M0 trained 7-13% "
                "slower so on an H100 (docs/benchmarks.md, \"Pixel stores\"); leave "
                "trainer.step_sms null")  # fmt: skip
    if pipeline_here:
        return None
    why = ("the GPU image pipeline runs in a child process (data.decode_process), whose kernels "
           "a green context of this process does not make room for; data.decode_process=false "
           "keeps it in threads here" if decode_gpu else
           "no GPU image pipeline works beside it (data.decode=gpu, its pipeline in threads, is "
           "the case it is for)")  # fmt: skip
    return (f"trainer.step_sms={_show(step_sms)}: the loop runs on part of the SMs, but {why}; "
            "docs/benchmarks.md, \"SMs the step cannot take\"")  # fmt: skip


def check(step_sms, device: torch.device) -> None:
    """Raise ValueError where ``trainer.step_sms`` cannot be used (before anything is built)."""
    if step_sms is None:
        return
    _form(step_sms)
    if device.type != "cuda":
        raise ValueError(f"trainer.step_sms={_show(step_sms)}: it needs a CUDA device "
                         f"(trainer.device resolved to {device.type})")  # fmt: skip


def _sms_of(device) -> tuple[int, int]:
    """(device index, number of SMs) of a CUDA device."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.get_device_properties(index).multi_processor_count


def green_stream(num_sms: int, device) -> tuple[object, torch.cuda.Stream]:
    """(context, stream): a CUDA green context of ``num_sms`` SMs on ``device`` and a stream
    whose kernels run only on those SMs. Keep the context as long as the stream is used."""
    index, total = _sms_of(device)
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
def on_sms(step_sms, device, say=None):
    """Run the block's CUDA work on a green context of ``step_sms`` SMs, a count or a fraction
    (None: as it is). The block's stream waits for the caller's work before it, the caller's
    for the block's after. ``say`` is told the count."""
    if step_sms is None:
        yield None
        return
    device = torch.device(device)
    n = sm_count(step_sms, total := _sms_of(device)[1])
    ctx, stream = green_stream(n, device)
    if say is not None:
        say(
            f"trainer.step_sms={_show(step_sms)}: the loop on a green context of {n} of the "
            f"GPU's {total} SMs"
        )
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
