"""How a training step and the GPU image pipeline slow each other down on one GPU.

    python scripts/bench_gpu_sharing.py --root GEN [--workers 15] [--seconds 15] [--variant m0]
        [--step graph] [--step-sms N]

``data.decode=gpu`` decodes (nvJPEG) and augments on the same GPU that trains. Alone, the
pipeline and the step each run at some images/s; together each gets less. This script measures
both rates in four phases, with nothing passed between the two (the pipeline's batches
are dropped, the step trains on one fixed batch), so that only the sharing is timed. The
pipeline runs as in the trainer: two threads, decoding and augmenting two batches ahead on
side streams.

1. the pipeline alone, in a child process (as ``data.decode_process``);
2. the step alone (EfficientViT, bf16 autocast, channels_last, AdamW; ``--step compile``:
   forward and backward as CUDA graphs through ``torch.compile(mode="reduce-overhead")``, as
   the trainer's ``compile_mode=reduce-overhead``; ``graph``: the whole step, optimizer
   included, as one captured CUDA graph, so the step's thread holds the GIL for one launch a
   step; ``eager``);
3. both, the pipeline in a child process: two CUDA contexts, which a GPU without MPS runs one
   at a time;
4. both, the pipeline in threads of the step's process: one context, one GIL.

``--in-flight`` (default 2) paces the step as a training loop is paced by its data: at most that
many steps are queued on the device.

``--step-sms N`` runs the step on a stream of a CUDA green context of N SMs (warm-up and graph
capture included), so that the remaining SMs are never taken by the step. The pipeline stays in
the device's primary context and may use every SM. This tests a reading of the eleventh
session's profile: nvJPEG (as torchvision drives it) waits on the host ~240 times a batch for
small per-image kernels, and each of those kernels queues behind the step's. With SMs the step
cannot take, they would start at once. The trainer has the same as ``trainer.step_sms``
(``trainer/sm_partition.py``, whose needs apply).

If phase 3's two rates add up like running one after the other (1/r3 = 1/r1 + 1/r2 in time
per image), the GPU serialises the two processes. Prints a table and writes JSON. Runs on the
CPU too (tiny settings, for a smoke test), where the GPU's part is not what is timed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pipeline_cfg(root: str, workers: int, img_size: int):
    from data import ImageDataConfig

    return ImageDataConfig(name="bench", kind="folder", root=root, img_size=img_size,
                           num_workers=workers, decode="gpu")  # fmt: skip


def run_pipeline(root: str, workers: int, img_size: int, batch: int, device: str, warm: int,
                 ready, go, stop, out) -> None:  # fmt: skip
    """Decode and augment batches until ``stop``, as the trainer does (two threads, each on a
    side stream, two batches ahead); put (images, seconds) counted from ``go``
    (or an error text) on ``out``. Target of the child process and of the thread."""
    try:
        if mp.current_process().name != "MainProcess":  # a spawned child: its loader workers
            mp.set_start_method(mp.get_all_start_methods()[0], force=True)  # fork on Linux
        import torch

        from data import build_gpu_pipeline, build_image_loaders
        from trainer.tasks import _decoded, _Epochs

        dev = torch.device(device)
        cfg = _pipeline_cfg(root, workers, img_size)
        train, *_ = build_image_loaders(cfg, batch, seed=0)
        pipe = build_gpu_pipeline(cfg)
        source = _decoded(_Epochs(train, augment=pipe), pipe, dev, 2)
        for _ in range(warm):  # workers started, kernels compiled
            source.next_batch()
        _sync(dev)
        ready.set()
        go.wait()
        t0, n = time.perf_counter(), 0
        while not stop.is_set():
            images, _ = source.next_batch()
            n += images.shape[0]
        _sync(dev)
        out.put((n, time.perf_counter() - t0))
        source.close()
    except BaseException as e:  # noqa: BLE001 (reported by the caller)
        ready.set()
        out.put(f"{type(e).__name__}: {e}")


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Step:
    """One training step of EfficientViT on a fixed batch (no data loading). ``mode``: "eager";
    "compile" (``torch.compile(mode="reduce-overhead")``: forward and backward replayed as CUDA
    graphs, the optimizer eager, as the trainer's ``compile_mode=reduce-overhead``); "graph"
    (the whole step, forward, backward and AdamW, captured in one CUDA graph and replayed: the
    host's work a step is one launch)."""

    def __init__(self, variant: str, batch: int, img_size: int, device, mode: str,
                 stream=None):  # fmt: skip
        import torch

        import ops
        from models.efficientvit import EfficientViT, EfficientViTConfig

        if mode not in ("eager", "compile", "graph"):
            raise ValueError(f"mode must be eager, compile or graph, got {mode!r}")
        if mode != "eager" and device.type != "cuda":
            raise ValueError(f"mode={mode!r} needs a CUDA device")
        self.dev, self.mode, self.batch = device, mode, batch
        model = EfficientViT(EfficientViTConfig(variant=variant, img_size=img_size),
                             ops.build("sdpa")).to(device)  # fmt: skip
        self.model = model.to(memory_format=torch.channels_last)
        cuda = device.type == "cuda"
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda,
                                     capturable=mode == "graph")  # fmt: skip
        self.fwd = torch.compile(self.model, mode="reduce-overhead") if mode == "compile" else model
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, 3, img_size, img_size, generator=g)
        self.x = x.to(device).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.graph = None
        self.stream = stream  # None: the current stream
        if stream is not None:  # the model and batch were made on the current stream
            stream.wait_stream(torch.cuda.current_stream(device))

    def _on_stream(self):
        import contextlib

        import torch

        return contextlib.nullcontext() if self.stream is None else torch.cuda.stream(self.stream)

    def _step(self) -> None:
        import torch

        with torch.autocast(self.dev.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(self.fwd(self.x), self.y)
        loss.backward()
        self.opt.step()

    def _capture(self) -> None:
        """Warm up on a side stream, then capture the step with the gradients unset, so that
        backward makes them in the graph's memory (PyTorch's whole-network capture)."""
        import torch

        side = self.stream or torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.opt.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream(self.dev).wait_stream(side)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):  # kernels of the green context
            self._step()

    def __call__(self) -> None:
        import torch

        with self._on_stream():
            if self.mode == "graph":
                if self.graph is None:
                    self._capture()
                self.graph.replay()
                return
            if self.mode == "compile":
                torch.compiler.cudagraph_mark_step_begin()
            self._step()
            self.opt.zero_grad(set_to_none=True)


def time_steps(step: Step, go, stop, in_flight: int = 0) -> tuple[int, float]:
    """Run steps until ``stop``. ``in_flight`` > 0: before launching a step, wait until at most
    that many earlier steps are still queued on the device (a training loop is paced so by its
    data; unpaced, the host of a graphed step runs far ahead and queues hundreds of steps)."""
    import torch

    cuda = step.dev.type == "cuda"
    done: list = []
    go.wait()
    t0, n = time.perf_counter(), 0
    while not stop.is_set():
        if cuda and in_flight > 0 and len(done) >= in_flight:
            done.pop(0).synchronize()
        step()
        if cuda and in_flight > 0:
            done.append(torch.cuda.Event())
            done[-1].record(step.stream)  # None: the current stream
        n += step.batch
    _sync(step.dev)
    return n, time.perf_counter() - t0


def phase(name: str, step: Step | None, pipeline: str | None, args, device) -> dict:
    """Run one phase for ``args.seconds``: the step (or not) beside the pipeline in a child
    "process", a "thread", or none. Returns the rates in images/s."""
    if pipeline == "process":
        ctx = mp.get_context("spawn")
        ready, go, stop, out = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
        worker = ctx.Process(target=run_pipeline,  # (not daemonic: it starts workers)
                             args=(args.root, args.workers, args.img_size, args.batch,
                                   str(device), args.warm, ready, go, stop, out))  # fmt: skip
    else:
        import queue

        ready, go, stop, out = (
            threading.Event(),
            threading.Event(),
            threading.Event(),
            queue.Queue(),
        )
        worker = threading.Thread(target=run_pipeline, daemon=True,
                                  args=(args.root, args.workers, args.img_size, args.batch,
                                        str(device), args.warm, ready, go, stop, out))  # fmt: skip
    if pipeline:
        worker.start()
        ready.wait()
    timer = threading.Timer(args.seconds, stop.set)
    go.set()
    timer.start()
    row = {"phase": name}
    if step is not None:
        n, dt = time_steps(step, go, stop, args.in_flight)
        row["step"] = n / dt
    else:
        stop.wait()
    if pipeline:
        got = out.get(timeout=120)
        worker.join(timeout=30)
        if pipeline == "process" and worker.is_alive():
            worker.kill()
        if isinstance(got, str):
            raise RuntimeError(f"the pipeline failed: {got}")
        row["pipeline"] = got[0] / got[1]
    timer.cancel()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="ImageNet-style folder (train/<class>/*.jpg)")
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--variant", default="m0")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    ap.add_argument("--warm", type=int, default=5, help="untimed pipeline batches first")
    ap.add_argument("--warm-steps", type=int, default=10, help="untimed steps first")
    ap.add_argument(
        "--step",
        default=None,
        choices=("eager", "compile", "graph"),
        help="how the step runs (default: compile on CUDA, eager on the CPU)",
    )
    ap.add_argument("--in-flight", type=int, default=2,
                    help="steps queued on the device at most (0: unpaced)")  # fmt: skip
    ap.add_argument("--step-sms", type=int, default=None,
                    help="run the step on a CUDA green context of this many SMs")  # fmt: skip
    ap.add_argument("--out", default="bench_gpu_sharing.json")
    args = ap.parse_args()
    if not (ROOT / args.root).exists() and not Path(args.root).exists():
        ap.error(f"--root {args.root!r} does not exist")

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = args.step or ("compile" if device.type == "cuda" else "eager")
    green = None
    if args.step_sms is not None:
        if device.type != "cuda":
            ap.error("--step-sms needs a CUDA GPU")
        from trainer.sm_partition import green_stream

        green = green_stream(args.step_sms, device)  # the context must outlive its stream
    step = Step(args.variant, args.batch, args.img_size, device, mode,
                stream=green[1] if green else None)  # fmt: skip
    t = time.perf_counter()
    for _ in range(args.warm_steps):
        step()
    _sync(device)
    print(f"step warmed up in {time.perf_counter() - t:.0f} s", flush=True)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "cpus": os.cpu_count(), "variant": args.variant,
           "batch": args.batch, "img_size": args.img_size, "workers": args.workers,
           "step": mode, "seconds": args.seconds, "in_flight": args.in_flight,
           "step_sms": args.step_sms,
           "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    rows = []
    for name, with_step, pipeline in (("pipeline alone (process)", False, "process"),
                                      ("step alone", True, None),
                                      ("both, pipeline in a process", True, "process"),
                                      ("both, pipeline in threads", True, "thread")):  # fmt: skip
        row = phase(name, step if with_step else None, pipeline, args, device)
        rows.append(row)
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))  # so far
        print(f"{name:<36}" + "".join(f"  {k} {v:9,.0f} images/s" for k, v in row.items()
                                       if k != "phase"), flush=True)  # fmt: skip
    alone = {"pipeline": rows[0]["pipeline"], "step": rows[1]["step"]}
    serial = 1.0 / (1.0 / alone["pipeline"] + 1.0 / alone["step"])
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows, "serial": serial}, indent=2))
    print(f"\n{env['device']} | torch {env['torch']} | {args.variant}, batch {args.batch}, "
          f"{args.img_size}², step {mode}"
          f"{f' on {args.step_sms} SMs' if args.step_sms else ''}, "
          f"{args.in_flight or 'unpaced'} in flight, "
          f"{args.workers} workers; images/s")  # fmt: skip
    print(f"{'phase':<36}{'step':>10}{'pipeline':>10}")
    for r in rows:
        print(
            f"{r['phase']:<36}"
            + "".join(f"{r[k]:>10,.0f}" if k in r else f"{'':>10}" for k in ("step", "pipeline"))
        )
    print(f"one after the other (1 / (1/step + 1/pipeline) of the phases alone): {serial:,.0f}")


if __name__ == "__main__":
    main()
