"""Copy an ImageNet-style folder with its training images stored smaller, for faster loading.

Usage (from the repository root, with the project's virtualenv)::

    python -m scripts.shrink_image_folder /data/imagenet /data/imagenet_s256 --short-side 256
    python train.py experiment=efficientvit_m0_imagenet data.root=/data/imagenet_s256 ...

Decoding a JPEG costs more the more pixels and bytes it holds, and the training crop is
224x224 whatever the stored size. ImageNet's training JPEGs average about 400x350 pixels and
110 KB; stored with the shorter side at 256 they carry about half the pixels and bytes, and on
an H100 EfficientViT-M0 to M5 train 1.3-1.66x faster from them with ``data.decode=gpu``
(docs/benchmarks.md, "Images stored smaller"). This is what FFCV-style loaders do with their
``max_resolution``. The price: a random-resized crop smaller than the stored image's short side
is upsampled where the original would have had the pixels (at 256, crops below about 57% of
the image's area; at ImageNet's typical size, below about 27%). Evaluate on the untouched
validation images (the default) so that reported accuracy is comparable.

For each image of the ``--splits`` (default ``train``) whose shorter side is above
``--short-side``, the copy is resized with PIL's antialiased bicubic filter to that shorter
side (aspect ratio kept) and encoded in the source's format: JPEG at ``--quality`` (default
90, FFCV's), CMYK and other modes converted to RGB; PNG stays lossless. Images already that
small are linked (or copied where a hard link is impossible) byte for byte, and so are the
other splits (``val/``), so the result is a complete ``data.root``. File and class names are
kept.

``--format pixels`` writes each split of ``--splits`` as a pixel store instead
(``DST/train.pixels`` and its index, ``data.kind=pixels``; ``data/pixel_store.py``): every
image converted to RGB, resized as above when larger, and stored as raw planar pixels, so that
training reads them without decoding. It takes 3 x H x W bytes an image (about 335 GB for
ImageNet's training set at 256, against about 50 GB as JPEGs). On an H100, EfficientViT-M0
trained from it at 14.7k images/s, 86-87% of its rate on a batch already on the GPU, against 11.7k
from the JPEG copy (docs/benchmarks.md, "Pixel stores"). The store is written in the source's
order, one chunk of images at a time; a killed run continues after the last chunk on disk.

Files are written atomically (``name.tmp``, then renamed) and existing files are skipped, so a
killed run, started again, continues where it stopped; ``DST/shrink.json`` records the
settings, and continuing with other settings is refused. Images that fail to decode are listed
at the end with exit status 2; the others are written. A missing or misshapen source folder is
reported with the expected layout, also with exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.image_config import FOLDER_LAYOUT  # noqa: E402
from data.image_sets import ImageFolderDataset  # noqa: E402
from data.pixel_store import PixelStoreDataset, PixelStoreWriter, index_path  # noqa: E402

SETTINGS_FILE = "shrink.json"
FORMATS = ("jpeg", "pixels")
_CHUNK = 64  # images per task handed to a worker process


class ShrinkError(ValueError):
    """The source or destination cannot be used as given; the message says why."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="ImageNet-style root: SRC/train/<class>/*, SRC/val/<class>/*")
    p.add_argument("dst", help="root of the copy (created; must not be inside SRC)")
    p.add_argument("--short-side", type=int, default=256, help="stored shorter side (pixels)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of resized images")
    p.add_argument("--splits", default="train", help="comma list of splits to shrink")
    p.add_argument("--format", choices=FORMATS, default="jpeg",
                   help="jpeg: a folder of smaller files; pixels: a pixel store per split "
                   "(raw RGB, no decoding when training: data.kind=pixels)")  # fmt: skip
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the shorter side ``short_side`` and the aspect ratio kept (rounded)."""
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def shrink_one(src: Path, dst: Path, short_side: int, quality: int) -> str:
    """Write ``dst`` from ``src``; return "resized", "kept" (linked as is) or "there"."""
    if dst.is_file():
        return "there"
    with Image.open(src) as img:
        fmt = img.format
        if min(img.size) <= short_side:
            resized = None
        else:
            img.load()
            mode = img.mode
            if fmt == "JPEG":
                keep = ("RGB", "L")
            elif fmt == "PNG":
                keep = ("RGB", "RGBA", "L", "LA")
            else:
                keep = ("RGB",)
            if mode not in keep:
                img = img.convert("RGBA" if "A" in mode and fmt == "PNG" else "RGB")
            resized = img.resize(target_size(*img.size, short_side), Image.BICUBIC)
    if resized is None:
        _link_or_copy(src, dst)
        return "kept"
    tmp = dst.with_name(dst.name + ".tmp")
    if fmt == "JPEG":
        resized.save(tmp, format="JPEG", quality=quality)
    else:
        resized.save(tmp, format=fmt)
    os.replace(tmp, dst)
    return "resized"


def pixels_of(src: Path, short_side: int) -> np.ndarray:
    """uint8 (3, H, W): ``src`` in RGB (as the folder reader converts it), resized as
    :func:`shrink_one` resizes when its shorter side is above ``short_side``."""
    with Image.open(src) as img:
        img = img.convert("RGB")
    if min(img.size) > short_side:
        img = img.resize(target_size(*img.size, short_side), Image.BICUBIC)
    return np.asarray(img).transpose(2, 0, 1).copy()


def _pixels_chunk(job: tuple[list[tuple[int, str]], int]) -> list[tuple]:
    items, short_side = job
    out: list[tuple] = []
    for k, s in items:
        try:
            out.append(("ok", k, pixels_of(Path(s), short_side)))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            out.append(("failed", k, f"{s}: {err}"))
    return out


def _shrink_chunk(job: tuple[list[tuple[str, str]], int, int]) -> list[tuple[str, str]]:
    pairs, short_side, quality = job
    out = []
    for s, d in pairs:
        try:
            out.append(("ok", shrink_one(Path(s), Path(d), short_side, quality)))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            Path(d + ".tmp").unlink(missing_ok=True)
            out.append(("failed", f"{s}: {err}"))
    return out


def _check_settings(dst: Path, settings: dict) -> None:
    path = dst / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            raise ShrinkError(
                f"{str(dst)!r} was written with other settings ({before}); continuing it with "
                f"{settings} would mix the two. Use another destination or the same settings."
            )
    dst.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1) + "\n")
    os.replace(tmp, path)


def shrink_folder(
    src: str | Path,
    dst: str | Path,
    short_side: int = 256,
    quality: int = 90,
    splits: tuple[str, ...] = ("train",),
    workers: int = 1,
    progress: bool = True,
    fmt: str = "jpeg",
) -> dict:
    """Write the copy; return counts per outcome and the failures (``"failed"``: messages)."""
    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    if short_side < 1:
        raise ShrinkError(f"--short-side must be a positive number of pixels, got {short_side}")
    if not 1 <= quality <= 100:
        raise ShrinkError(f"--quality must be in 1..100, got {quality}")
    if not src.is_dir():
        raise ShrinkError(f"source folder {str(src)!r} does not exist\n{FOLDER_LAYOUT}")
    if dst == src or src in dst.parents:
        raise ShrinkError(f"the copy {str(dst)!r} must not be the source or inside it")
    present = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    missing = [s for s in splits if s not in present]
    if missing:
        raise ShrinkError(
            f"source folder {str(src)!r} has no split folder(s) {missing} (it has "
            f"{present or 'none'})\n{FOLDER_LAYOUT}"
        )
    sets = {}
    for name in present:
        try:
            sets[name] = ImageFolderDataset(src / name)
        except (FileNotFoundError, NotADirectoryError, ValueError) as err:
            if name in splits or name in ("train", "val"):
                raise ShrinkError(str(err)) from err
            # another folder beside the splits (not a class folder tree): left out
    if fmt not in FORMATS:
        raise ShrinkError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "pixels" and "val" in splits:
        raise ShrinkError("--format pixels stores training splits: data.kind=pixels validates on "
                          "the class folders of val/, linked as they are; keep val out of "
                          "--splits")  # fmt: skip
    settings = {"short_side": short_side, "quality": quality, "splits": list(splits)}
    if fmt != "jpeg":  # (stores written before --format existed read as jpeg)
        settings["format"] = fmt
    _check_settings(dst, settings)

    counts = {"resized": 0, "kept": 0, "stored": 0, "there": 0, "linked": 0, "failed": []}
    for name, ds in sets.items():
        for c in ds.classes if fmt == "jpeg" or name not in splits else ():
            (dst / name / c).mkdir(parents=True, exist_ok=True)
        rel = [os.fsdecode(f) for f in ds.files]
        if name not in splits:  # linked as is: a complete data.root
            for r in tqdm(rel, desc=f"linking {name}", unit="img", disable=not progress):
                d = dst / name / r
                if d.is_file():
                    counts["there"] += 1
                else:
                    _link_or_copy(src / name / r, d)
                    counts["linked"] += 1
            continue
        if fmt == "pixels":
            _store_split(ds, src / name, dst / f"{name}.pixels", short_side, workers, progress,
                         counts)  # fmt: skip
            continue
        pairs = [(str(src / name / r), str(dst / name / r)) for r in rel]
        jobs = [(pairs[i : i + _CHUNK], short_side, quality) for i in range(0, len(pairs), _CHUNK)]
        bar = tqdm(total=len(pairs), desc=f"shrinking {name}", unit="img", disable=not progress)
        if workers <= 1:
            results = map(_shrink_chunk, jobs)
            pool = None
        else:
            pool = ProcessPoolExecutor(workers)
            results = pool.map(_shrink_chunk, jobs)
        try:
            for chunk in results:
                for status, what in chunk:
                    if status == "ok":
                        counts[what] += 1
                    else:
                        counts["failed"].append(what)
                bar.update(len(chunk))
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return counts


def _in_order(pool: ProcessPoolExecutor, fn, jobs: list, ahead: int):
    """``pool.map(fn, jobs)`` with at most ``ahead`` jobs submitted and not yet consumed, so
    that chunks of pixels (16 MB each at 256) do not pile up when writing is the slower side."""
    pending: deque = deque()
    it = iter(jobs)
    for job in itertools.islice(it, ahead):
        pending.append(pool.submit(fn, job))
    while pending:
        out = pending.popleft().result()
        job = next(it, None)
        if job is not None:
            pending.append(pool.submit(fn, job))
        yield out


def _store_split(ds: ImageFolderDataset, src: Path, path: Path, short_side: int, workers: int,
                 progress: bool, counts: dict) -> None:  # fmt: skip
    """Write ``ds`` (a split of the source) as the pixel store ``path``, or continue it."""
    if index_path(path).is_file():
        counts["there"] += len(PixelStoreDataset(path))
        return
    writer = PixelStoreWriter(path)
    done = writer.done_sources
    counts["there"] += len(done)
    todo = [(k, str(src / os.fsdecode(f))) for k, f in enumerate(ds.files) if k not in done]
    jobs = [(todo[i : i + _CHUNK], short_side) for i in range(0, len(todo), _CHUNK)]
    bar = tqdm(total=len(ds), initial=len(done), desc=f"storing {src.name} pixels", unit="img",
               disable=not progress)  # fmt: skip
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    results = (
        _in_order(pool, _pixels_chunk, jobs, 2 * workers) if pool else map(_pixels_chunk, jobs)
    )
    try:
        for chunk in results:  # in order: the store keeps the source's order
            for status, k, what in chunk:
                if status == "ok":
                    writer.append(k, what, int(ds.labels[k]))
                    counts["stored"] += 1
                else:
                    counts["failed"].append(what)
            writer.flush()
            bar.update(len(chunk))
        writer.finish(ds.classes, ds.files)
    finally:
        writer.close()
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    try:
        counts = shrink_folder(
            args.src,
            args.dst,
            args.short_side,
            args.quality,
            splits,
            args.workers,
            not args.no_progress,
            args.format,
        )
    except ShrinkError as err:
        print(f"shrink_image_folder: {err}", file=sys.stderr)
        return 2
    failed = counts.pop("failed")
    print(
        f"{args.dst}: {counts['resized']} resized, {counts['kept']} already small enough "
        f"(linked), {counts['stored']} stored as pixels, {counts['linked']} linked from other "
        f"splits, {counts['there']} already there, {len(failed)} failed",
        file=sys.stderr,
    )
    if failed:
        for line in failed[:20]:
            print(f"  cannot shrink {line}", file=sys.stderr)
        if len(failed) > 20:
            print(f"  ... and {len(failed) - 20} more", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
