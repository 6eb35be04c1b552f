"""GPU time of the device-side training image pipeline, per batch and kernel by kernel.

    python scripts/bench_gpu_augment.py [--batch 256] [--img-size 224] [--batches 40]

What ``data.decode=gpu`` does on the GPU for every training batch once the images are there
(as a pixel store's batch arrives, ``data.kind=pixels``): timm's random-resized crop and flip
(``resize_kernel.resize_batch``), RandAugment ``rand-m9-mstd0.5-inc1`` (``augment_kernels``),
the uint8 channels_last batch, then ``DevicePrep``: normalisation and random erasing 0.25.
In training this work shares the GPU with the step, so its GPU time is taken from the step's
rate. The input is a batch of ``--batch`` smooth random RGB images whose short side is
``--short-side`` (aspect ratios 3:4 to 4:3, as a store written at that short side holds), in
one buffer as a store's batch arrives. Prints the batch's GPU kernel time (the sum of its
kernels' durations, ``torch.profiler``), images/s at that time, the ``--table`` kernels with the
most GPU time per batch, and the host's time a batch when batches are queued back to back
(the queueing thread's cost; when it exceeds the kernel time, the loop is bound by the host
and the GPU idles between kernels). ``--torch-ops`` runs RandAugment's families as
torch operations instead of the Triton kernels. ``--resize-sweep`` then times the crop resize
alone (``resize_kernel.resize_batch``, the batch's train crops) for launch shapes around
:data:`resize_kernel.TILES`, checking that each gives the same bytes. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data.gpu_augment import Decoded, GpuImagePipeline  # noqa: E402
from data.image_augment import DevicePrep  # noqa: E402
from data.nvjpeg_decode import PackedImages  # noqa: E402
from data.resize_kernel import TILES, resize_batch  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_batch(n: int, short: int, seed: int, device: torch.device) -> PackedImages:
    """``n`` smooth random uint8 (3, H, W) images, short side ``short``, packed in one buffer."""
    rng = np.random.default_rng(seed)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), n))
    long = np.maximum(short, np.rint(short * np.maximum(aspect, 1 / aspect))).astype(np.int64)
    hw = np.where((aspect >= 1)[:, None], np.stack([np.full(n, short), long], 1),
                  np.stack([long, np.full(n, short)], 1))  # fmt: skip
    sizes = 3 * hw[:, 0] * hw[:, 1]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    buf = torch.empty(int(sizes.sum()), dtype=torch.uint8, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for (h, w), off in zip(hw.tolist(), offsets.tolist()):
        low = torch.rand(1, 3, h // 16 + 2, w // 16 + 2, device=device, generator=gen)
        img = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        img = img + 0.08 * torch.randn(3, h, w, device=device, generator=gen)
        buf[off : off + 3 * h * w] = (img.clamp(0, 1) * 255).round().to(torch.uint8).flatten()
    return PackedImages(buf, offsets, hw, np.arange(n), {})


SWEEP = [TILES, (16, 64, 16, 4), (8, 64, 8, 4), (16, 32, 16, 4), (4, 32, 4, 4), (8, 16, 8, 4),
         (8, 32, 8, 2), (4, 64, 4, 4), (8, 32, 16, 4), (16, 32, 8, 4)]  # fmt: skip
SWEEP_RUN = 8  # resizes queued back to back a timing: the GPU's time, not the host's


def resize_sweep(images: PackedImages, size: int, reps: int) -> list[dict]:
    """ms of the crop resize (uint8 out) of one batch of train crops for each launch shape of
    ``SWEEP`` (median over ``reps`` of ``SWEEP_RUN`` calls queued together, so the host's
    preparation of a call overlaps the GPU's work of the one before), each checked against
    the default shape's bytes."""
    from data.gpu_augment import CROP_TRIES, crop_params

    rng = np.random.default_rng(0)
    hw = images.hw
    top, left, ch, cw = crop_params(hw[:, 0], hw[:, 1], rng.random((len(hw), 2 * CROP_TRIES + 2)))
    n = len(hw)
    args = (images, np.stack([top, left, ch, cw], 1), np.full((n, 2), size), np.zeros((n, 2)),
            rng.random(n) < 0.5, size)  # fmt: skip
    from scripts.bench_efficientvit import median_ms

    ref = resize_batch(*args, dtype=torch.uint8)
    rows = []
    for tiles in SWEEP:
        out = resize_batch(*args, dtype=torch.uint8, tiles=tiles)  # (compiles)

        def run(tiles=tiles):
            for _ in range(SWEEP_RUN):
                resize_batch(*args, dtype=torch.uint8, tiles=tiles)

        ms = median_ms(run, 1, reps) / SWEEP_RUN
        rows.append({"tiles": list(tiles), "ms": ms, "same_bytes": bool(torch.equal(out, ref))})
    print(f"\ncrop resize alone, uint8 out ({n} train crops to {size}²), median of {reps}")
    print(f"{'(rows 1, columns, rows 2, warps)':<34}{'ms':>8}  same bytes")
    for r in rows:
        mark = "  (default)" if tuple(r["tiles"]) == TILES else ""
        print(f"{str(tuple(r['tiles'])):<34}{r['ms']:>8.3f}  {r['same_bytes']}{mark}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40, help="timed batches")
    ap.add_argument("--table", type=int, default=20, help="kernels listed (0: none)")
    ap.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1", help="'' for none")
    ap.add_argument("--re-prob", type=float, default=0.25)
    ap.add_argument("--torch-ops", action="store_true", help="RandAugment by torch operations")
    ap.add_argument(
        "--resize-sweep",
        action="store_true",
        help="also time the crop resize alone for other launch shapes",
    )
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_augment: needs a CUDA GPU")
    device = torch.device("cuda")
    images = make_batch(args.batch, args.short_side, 0, device)
    pipe = GpuImagePipeline(args.img_size, auto_augment=args.auto_augment or None)
    pipe.fused_ops = False if args.torch_ops else None
    prep = DevicePrep(IMAGENET_MEAN, IMAGENET_STD, re_prob=args.re_prob)

    def one(i: int) -> torch.Tensor:
        return prep(pipe.augment(Decoded(images, i)), train=True)

    for i in range(3):  # compiles, allocations
        one(i)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(args.batches):
        one(100 + i)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / args.batches * 1e3
    from torch.profiler import ProfilerActivity, profile

    rows = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(args.batches):
            one(1000 + i)
        torch.cuda.synchronize()
    for ev in prof.key_averages():
        t_us = getattr(ev, "device_time_total", None)
        if t_us is None:
            t_us = ev.cuda_time_total
        if t_us > 0 and not ev.key.startswith("Memcpy"):
            rows.append((ev.key, t_us / args.batches, ev.count / args.batches))
    rows.sort(key=lambda r: -r[1])
    gpu = sum(r[1] for r in rows) / 1e3  # ms of kernels a batch
    name = torch.cuda.get_device_name()
    print(f"\n{name} | torch {torch.__version__} | batch {args.batch} from short side "
          f"{args.short_side} to {args.img_size}² | RandAugment {args.auto_augment or 'off'} "
          f"({'torch ops' if args.torch_ops else 'Triton kernels'}) | erasing {args.re_prob}")  # fmt: skip
    print(f"GPU kernel time a batch {gpu:.3f} ms ({args.batch / gpu * 1e3:,.0f} images/s of "
          f"GPU time, {sum(r[2] for r in rows):.0f} kernels); batches queued back to back: "
          f"{wall:.3f} ms a batch")  # fmt: skip
    if args.table:
        print(f"\n{'kernel':<72}{'us/batch':>10}{'calls':>7}")
        for key, us, calls in rows[: args.table]:
            print(f"{key[:71]:<72}{us:>10.1f}{calls:>7.1f}")
        print(f"{'(all kernels, copies left out)':<72}{gpu * 1e3:>10.1f}")
    sweep = resize_sweep(images, args.img_size, args.batches) if args.resize_sweep else []
    if args.out:
        Path(args.out).write_text(json.dumps({"resize_sweep": sweep,
            "device": name, "torch": torch.__version__, "args": vars(args), "kernel_ms": gpu,
            "queued_ms_per_batch": wall, "kernels": [{"name": k, "us": u, "calls": c} for k, u, c in rows],
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
