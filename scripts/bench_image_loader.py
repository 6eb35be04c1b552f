"""Image loading throughput: the training pipeline's images/s against the number of workers.

    python scripts/bench_image_loader.py --root /data/imagenet [--workers 1,4,8,16]
    python scripts/bench_image_loader.py --generate 4096 --from-packed ../shared/data/images/tin40_64_train.npz.xz

Times ``build_image_loaders`` (the trainer's loader: JPEG decode, bicubic random-resized crop,
flip, RandAugment rand-m9-mstd0.5-inc1, collate to channels_last, pinned memory) and, on a
GPU, the copy to the device and :class:`data.DevicePrep` (normalisation and random erasing
0.25), with ``data.device_normalize`` off (workers hand out normalised float32) and on (uint8),
and ``--modes ...,gpu`` for ``data.decode=gpu`` (workers read the JPEG bytes; decode with
nvJPEG, crop, flip and RandAugment on the device: the timed work then includes that GPU work;
``nvjpeg``, ``nvimgcodec``: the same with that ``data.gpu_decoder``).
Each cell reads ``--batches`` batches after a warm-up of two batches per worker (worker start-up
and the prefetched queue left out; keep ``--batches`` well above it). Without an ImageNet folder, ``--generate N`` writes an ImageNet-like folder: N JPEGs
of ``--size`` (default 500x375, ImageNet's median) at quality 90, upscaled from the images of a
packed set (``--from-packed``) or, without one, from generated noisy stripes. The noisy stripes
weigh what ImageNet's JPEGs do (about 110 KB at 500x375); images upscaled from the 64x64
Tiny-ImageNet set weigh about 27 KB and decode faster than ImageNet would. Prints a table and
writes JSON. Runs on the CPU too (then without pinned memory and device copies).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data import (  # noqa: E402
    ImageDataConfig,
    build_device_prep,
    build_gpu_pipeline,
    build_image_loaders,
    to_device,
)

DECODER_MODES = ("nvjpeg", "nvimgcodec")  # --modes that are data.decode=gpu with that decoder


def _write_images(args) -> None:
    root, split, indices, size, packed, seed = args
    from data import open_packed

    z = open_packed(packed, progress=False) if packed else None
    rng = np.random.default_rng(seed)
    w, h = size
    for i in indices:
        k = i % CLASSES
        d = root / split / f"c{k:02d}"
        d.mkdir(parents=True, exist_ok=True)
        if z is not None:
            j = int(rng.integers(len(z["offsets"]) - 1))
            raw = z["data"][z["offsets"][j] : z["offsets"][j + 1]].tobytes()
            img = Image.open(io.BytesIO(raw)).convert("RGB").resize(size, Image.BICUBIC)
        else:
            yy, xx = np.mgrid[0:h, 0:w]
            wave = np.sin((xx + k * yy) * 0.05)
            arr = 120 + 60 * wave[..., None] + rng.normal(0, 25, (h, w, 3))
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        img.save(d / f"{i:06d}.jpg", quality=90)


CLASSES = 10


def generate_folder(root: Path, n: int, size: tuple[int, int], packed: str | None) -> Path:
    """ImageNet-like class folders (train and a small val) of n JPEGs of ``size`` (w, h),
    written by all CPUs."""
    from concurrent.futures import ProcessPoolExecutor

    if packed:  # decompress once before the pool reads it
        from data import open_packed

        open_packed(packed, progress=False)
    procs = max(1, os.cpu_count() or 1)
    jobs = []
    for split, count in (("train", n), ("val", max(CLASSES, n // 50))):
        for p in range(procs):
            jobs.append((root, split, range(p, count, procs), size, packed, 1000 * p + len(split)))
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_write_images, jobs))
    return root


def time_cell(cfg: ImageDataConfig, batch: int, batches: int, device: torch.device) -> dict:
    warm = 2 * max(1, cfg.num_workers)  # every worker has delivered its prefetched batches
    # one epoch covers the whole cell (a tiny folder is read several times over)
    train, *_ = build_image_loaders(cfg, batch, seed=0, epoch_len=(warm + batches + 1) * batch)
    prep, decode = build_device_prep(cfg), build_gpu_pipeline(cfg)
    it = iter(train)
    t0 = None
    n = 0
    for i in range(warm + batches):
        if i == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        b = next(it)
        images, _ = to_device(b, device, cfg.channels_last, prep, train=True, decode=decode)
        if i >= warm:
            n += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    data = [b[0]] if isinstance(b[0], torch.Tensor) else b[0]  # gpu mode: the encoded bytes
    mb = sum(t.numel() * t.element_size() for t in data) / 2**20
    return {"images_per_s": n / dt, "batch_mb": mb}


def time_stages(cfg: ImageDataConfig, batch: int, batches: int, device: torch.device) -> dict:
    """``data.decode=gpu``'s stages one at a time, images/s each: ``read`` (the workers: file
    bytes into one buffer a batch, to this process), ``decode`` (nvJPEG, the last batch again
    and again), ``augment`` (crop, flip, RandAugment of one decoded batch, again and again)
    and both in one thread. The pipeline runs decode and augment in two threads (or a child
    process), so it can go no faster than its slowest stage."""
    warm = 2 * max(1, cfg.num_workers)
    train, *_ = build_image_loaders(cfg, batch, seed=0, epoch_len=(warm + batches + 1) * batch)
    pipe = build_gpu_pipeline(cfg)
    it = iter(train)
    for _ in range(warm):
        b = next(it)
    t = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    out = {"read": batches * batch / (time.perf_counter() - t)}
    reps = max(3, batches // 4)

    def rate(fn) -> float:
        fn()  # (first call: allocations, kernel compiles)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return reps * batch / (time.perf_counter() - t)

    decoded = pipe.decode(b[0], device, train=True)
    out["decode"] = rate(lambda: pipe.decode(b[0], device, train=True))
    out["augment"] = rate(lambda: pipe.augment(decoded))
    out["decode+augment"] = rate(lambda: pipe.augment(pipe.decode(b[0], device, train=True)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="an ImageNet-style folder (train/<class>/*.jpg)")
    ap.add_argument("--generate", type=int, default=0, help="write N ImageNet-like JPEGs instead")
    ap.add_argument("--from-packed", default=None, help="packed .npz(.xz) set to upscale from")
    ap.add_argument("--size", default="500x375", help="generated image size WxH")
    ap.add_argument("--keep", default=None, help="write the generated folder here and keep it")
    ap.add_argument("--workers", default="1,4,8", help="comma list of num_workers")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=100, help="timed batches per cell")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--modes", default="float,uint8",
                    help="float (workers normalise), uint8 (device normalises), gpu (device "
                    "decodes and augments), nvjpeg and nvimgcodec (gpu with that data.gpu_decoder)")  # fmt: skip
    ap.add_argument("--stages", action="store_true",
                    help="also time data.decode=gpu's stages one at a time (read, decode, "
                    "augment)")  # fmt: skip
    ap.add_argument("--cpu-share", type=float, default=0.0,
                    help="gpu modes: data.cpu_decode_share (the workers decode and crop this "
                    "share of each batch with PIL)")  # fmt: skip
    ap.add_argument("--out", default="bench_image_loader.json")
    args = ap.parse_args()
    if not args.root and not args.generate:
        ap.error("give --root DIR (ImageNet-style folder) or --generate N")
    workers = [int(w) for w in args.workers.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"float", "uint8", "gpu", *DECODER_MODES}:
        ap.error("--modes takes float, uint8, gpu, nvjpeg and/or nvimgcodec")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.TemporaryDirectory()
    root = args.root
    if not root:
        w, h = (int(x) for x in args.size.lower().split("x"))
        t = time.perf_counter()
        dest = Path(args.keep) if args.keep else Path(tmp.name)
        root = str(generate_folder(dest, args.generate, (w, h), args.from_packed))
        print(f"generated {args.generate} JPEGs of {w}x{h} in {time.perf_counter() - t:.0f} s")
    rows = []
    for mode in modes:
        gpu_mode = mode in ("gpu", *DECODER_MODES)
        for nw in workers:
            cfg = ImageDataConfig(name="bench", kind="folder", root=root, img_size=args.img_size,
                                  num_workers=nw, device_normalize=mode != "float",
                                  decode="cpu" if mode in ("float", "uint8") else "gpu",
                                  gpu_decoder=mode if mode in DECODER_MODES else "torchvision",
                                  cpu_decode_share=args.cpu_share if gpu_mode else 0.0,
                                  persistent_workers=False)  # fmt: skip
            cell = time_cell(cfg, args.batch, args.batches, device)
            rows.append({"mode": mode, "workers": nw, **cell})
            print(f"{mode:<6} workers {nw:>3}: {cell['images_per_s']:8,.0f} images/s "
                  f"({cell['batch_mb']:.0f} MB a batch)", flush=True)  # fmt: skip
            if gpu_mode and args.stages:
                stages = time_stages(cfg, args.batch, args.batches, device)
                rows[-1]["stages"] = stages
                print("        stages alone: " + ", ".join(f"{k} {v:,.0f}" for k, v in
                                                       stages.items()) + " images/s", flush=True)  # fmt: skip
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "cpus": os.cpu_count(), "torch": torch.__version__, "root": args.root or "generated",
           "generate": args.generate, "size": args.size, "batch": args.batch,
           "img_size": args.img_size, "cpu_share": args.cpu_share,
           "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"\n{env['device']} | {env['cpus']} CPUs | torch {env['torch']} | batch {args.batch}, "
          f"{args.img_size}² train pipeline; images/s")  # fmt: skip
    print(f"{'workers':>8}" + "".join(f"{m:>12}" for m in modes))
    by = {(r["mode"], r["workers"]): r["images_per_s"] for r in rows}
    for nw in workers:
        print(f"{nw:>8}" + "".join(f"{by[(m, nw)]:>12,.0f}" for m in modes))
    tmp.cleanup()


if __name__ == "__main__":
    main()
