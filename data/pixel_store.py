"""Pixel stores (``data.kind=pixels``): training images kept as raw RGB pixels in one file and
read straight into pinned memory, with nothing to decode.

Why: on an H100 the JPEG path (``data.decode=gpu``, nvJPEG) delivers about 11k images/s of
256-pixel images on a 16-CPU host. The engines are not what bounds it: nvJPEG's batched call
works image by image on the host inside the call. EfficientViT-M0's step needs about 16k
(docs/benchmarks.md). A pixel store trades disk for that work, as FFCV's raw mode does. Each
batch is ``read_threads`` threads of ``pread`` calls into one pinned buffer (the GIL released),
then one copy to the device. The device then crops, flips and RandAugments it as it does
decoded JPEGs (``data.gpu_augment``). The earlier raw-pixel attempt (one PPM file an image,
through the workers' shared memory and a pageable copy) was slower than the JPEGs: those
copies, not the pixels, bounded it. Measured on an H100 (docs/benchmarks.md, "Pixel stores"):
8 threads read 52k images/s of 341x256 from the page cache; EfficientViT-M0 trained at 14.7k
images/s (86-87% of its rate on a batch already on the GPU; 11.7k from the JPEG copy), M5 at 91%,
with the reading and pipeline threads waiting for the GPU most of the time. Leave
``trainer.step_sms`` off with a store: with nothing to decode, the step on all SMs was faster.

Cost: 3 x H x W bytes an image. ImageNet's 1.28M training images at short side 256 take about
335 GB, against about 50 GB as JPEGs at that size. Read from the page cache or a fast NVMe
drive; reads are random, so the store tells the kernel not to read ahead.

Format (``python -m scripts.shrink_image_folder SRC DST --format pixels`` writes it)::

    DST/train.pixels       uint8: image i's planar RGB pixels (3, H, W) at offsets[i]
    DST/train.pixels.npz   offsets int64 (n+1), hw int64 (n, 2), labels int64 (n),
                           classes str (names, index = label), files bytes (source paths
                           relative to the split), version int
    DST/val/<class>/...    validation images as class folders (linked from the source)

Writing is resumable (``PixelStoreWriter``): pixels are appended and each image's record
follows in ``train.pixels.part`` once its pixels are on disk; the index is written last.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.image_sets import _ImageDataset
from data.nvjpeg_decode import PackedImages, plane_layout

VERSION = 1
INDEX_SUFFIX = ".npz"  # the index beside the pixels: train.pixels.npz
PART_SUFFIX = ".part"  # records of the images written so far (while writing)
INDEX_KEYS = ("offsets", "hw", "labels", "classes", "files", "version")
_RECORD = np.dtype([("source", "<i8"), ("h", "<i8"), ("w", "<i8"), ("label", "<i8")])

PIXELS_LAYOUT = """\
expected a pixel store (python -m scripts.shrink_image_folder SRC DST --format pixels writes it):
    <root>/
        train.pixels       uint8: each training image's planar RGB pixels (3, H, W), one after another
        train.pixels.npz   offsets int64 (n+1), hw int64 (n, 2), labels int64 (n), classes, files, version
        val/<class>/...    validation images, one sub-folder per class (as for data.kind=folder)
set data.root=<root>, or data.train=<file>.pixels and data.val=<class-folder directory>"""


def index_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + INDEX_SUFFIX)


class PixelBatch(PackedImages):
    """A batch read from a pixel store: the images' planar RGB pixels (3, H, W) in one uint8
    host buffer ``pixels`` (pinned when CUDA is available), laid out as the JPEG engines' output
    (``PackedImages``: indexing gives (3, H, W) views, ``hw`` the sizes); ``labels`` int64."""

    def __init__(self, pixels: torch.Tensor, offsets: np.ndarray, hw: np.ndarray,
                 labels: torch.Tensor):  # fmt: skip
        super().__init__(pixels, offsets, hw, np.arange(len(hw)), {})
        self.labels = labels

    @property
    def pixels(self) -> torch.Tensor:
        return self._buf

    def packed(self, buf: torch.Tensor) -> PackedImages:
        """The same images over ``buf``, a copy of ``pixels`` (on the device, say)."""
        return PackedImages(buf, self._offsets, self.hw, np.arange(len(self)), {})

    def to_device(self, device: torch.device):
        """The images on ``device``: on CUDA a ``PackedImages`` over one copy of the buffer,
        queued on the current stream; elsewhere the list of views."""
        if device.type != "cuda":
            return self.images()
        return self.packed(self.pixels.to(device, non_blocking=self.pixels.is_pinned()))


def collate_pixels(batch: PixelBatch) -> tuple[PixelBatch, torch.Tensor]:
    """The loader's collation for a pixel store's batches (read whole by ``__getitems__``)."""
    return batch, batch.labels


def _check_index(path: Path, idx: dict, size: int) -> None:
    def bad(msg: str) -> ValueError:
        return ValueError(f"pixel store {str(path)!r}: {msg}\n{PIXELS_LAYOUT}")

    missing = [k for k in INDEX_KEYS if k not in idx]
    if missing:
        raise bad(f"its index lacks {missing}")
    if int(idx["version"]) != VERSION:
        raise bad(f"format version {int(idx['version'])}, this code reads version {VERSION}")
    off, hw, labels = idx["offsets"], idx["hw"], idx["labels"]
    n = len(labels)
    if off.shape != (n + 1,) or hw.shape != (n, 2) or len(idx["files"]) != n:
        raise bad(f"offsets {off.shape}, hw {hw.shape}, files {len(idx['files'])} do not fit "
                  f"{n} labels")  # fmt: skip
    if n == 0:
        raise bad("it holds no image")
    if (hw < 1).any() or off[0] != 0 or (np.diff(off) != 3 * hw[:, 0] * hw[:, 1]).any():
        raise bad("offsets do not match the images' sizes (3 x H x W bytes each)")
    if off[-1] != size:
        raise bad(f"the pixel file holds {size} bytes, its index expects {int(off[-1])} "
                  "(truncated or from another store)")  # fmt: skip
    if labels.min() < 0 or labels.max() >= len(idx["classes"]):
        raise bad(f"labels outside 0..{len(idx['classes']) - 1}")


class PixelStoreDataset(_ImageDataset):
    """A pixel store's images: ``dataset[i]`` = (transform(RGB PIL image), label), as the other
    sources (``data.decode=cpu``: the loader's workers transform them). With ``use_encoded()``
    (``data.decode=gpu``) the loader reads whole batches instead: ``__getitems__`` returns a
    :class:`PixelBatch`, read by ``read_threads`` threads into one buffer, pinned when
    ``pin`` is set (the loader sets it) and CUDA is available."""

    def __init__(self, path: str | Path, transform: Callable | None = None,
                 read_threads: int = 8) -> None:  # fmt: skip
        self.path = Path(path).expanduser()
        self.transform, self.read_threads, self.pin = transform, int(read_threads), False
        if self.read_threads < 1:
            raise ValueError(f"data.read_threads must be >= 1, got {read_threads!r}")
        ipath = index_path(self.path)
        for p in (self.path, ipath):
            if not p.is_file():
                raise FileNotFoundError(f"pixel store: {str(p)!r} does not exist\n{PIXELS_LAYOUT}")
        with np.load(ipath, allow_pickle=False) as z:
            idx = {k: z[k] for k in z.files}
        _check_index(self.path, idx, self.path.stat().st_size)
        self.offsets = idx["offsets"].astype(np.int64)
        self.hw = idx["hw"].astype(np.int64)
        self.labels = idx["labels"].astype(np.int64)
        self.classes = [str(c) for c in idx["classes"]]
        self.files = idx["files"]
        self._fd: tuple | None = None  # ((pid,), fd): a process's own descriptor
        self._pool: tuple | None = None  # ((pid, threads), its reading threads)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # worker processes open their own descriptor and threads
        state = self.__dict__.copy()
        state["_fd"] = state["_pool"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _own(self, name: str, key: tuple, make):
        """``make()``'s result, kept as ``self.<name>`` = (key, value) and made again where the
        key differs: each process (keyed by pid) opens its own descriptor and threads."""
        held = getattr(self, name)
        if held is None or held[0] != key:
            with self._lock:
                held = getattr(self, name)
                if held is None or held[0] != key:
                    held = (key, make())
                    setattr(self, name, held)
        return held[1]

    def _file(self) -> int:
        def open_file() -> int:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if hasattr(os, "posix_fadvise"):  # random reads: no read-ahead
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            return fd

        return self._own("_fd", (os.getpid(),), open_file)

    def _threads(self) -> ThreadPoolExecutor:
        """This process's reading threads, ``read_threads`` of them (made again if it changed)."""
        return self._own("_pool", (os.getpid(), self.read_threads),
                         lambda: ThreadPoolExecutor(self.read_threads, thread_name_prefix="pixels"))  # fmt: skip

    def _read_into(self, fd: int, out: np.ndarray, index: int) -> None:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        view, done = memoryview(out), 0
        while done < end - start:  # pread may return less than asked (signals)
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise OSError(f"pixel store {str(self.path)!r}: image {index} ends early "
                              f"({done} of {end - start} bytes)")  # fmt: skip
            done += got

    def pixels(self, index: int) -> np.ndarray:
        """uint8 (3, H, W): image ``index``'s stored pixels."""
        h, w = self.hw[index].tolist()
        out = np.empty(3 * h * w, dtype=np.uint8)
        self._read_into(self._file(), out, int(index))
        return out.reshape(3, h, w)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.pixels(index).transpose(1, 2, 0)))

    def read_batch(self, indices) -> PixelBatch:
        """The images of ``indices`` in one buffer (``read_threads`` threads of ``pread``)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        hw = self.hw[idx]
        offsets, total = plane_layout(hw[:, 0], hw[:, 1])  # as the JPEG engines' output
        pin = self.pin and torch.cuda.is_available()
        buf = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        arr, fd = buf.numpy(), self._file()
        ends = offsets + 3 * hw[:, 0] * hw[:, 1]

        def read(lo: int, hi: int) -> None:
            for k in range(lo, hi):
                self._read_into(fd, arr[offsets[k] : ends[k]], int(idx[k]))

        n, t = len(idx), min(self.read_threads, len(idx))
        if t <= 1:
            read(0, n)
        else:
            cuts = np.linspace(0, n, t + 1).astype(int)
            jobs = [self._threads().submit(read, int(a), int(b)) for a, b in zip(cuts, cuts[1:])]
            for j in jobs:
                j.result()
        return PixelBatch(buf, offsets, hw, torch.from_numpy(self.labels[idx]))

    def use_encoded(self) -> None:
        """data.decode=gpu: the loader reads whole batches of pixels (``__getitems__``)."""
        self.encoded_only = True

    def __getitem__(self, index: int):
        if self.encoded_only:
            raise TypeError("a pixel store with data.decode=gpu is read by batch (__getitems__)")
        return super().__getitem__(index)

    def __getitems__(self, indices):
        if self.encoded_only:
            return self.read_batch(indices)
        return [self[i] for i in indices]


class PixelStoreWriter:
    """Writes a pixel store at ``path`` image by image, resumably.

    ``append(source, pixels (3, H, W) uint8, label)`` adds one image; ``flush()`` makes the
    images appended so far durable (their pixels, then their records in ``<path>.part``).
    Opened again on an unfinished store, it keeps the images whose records are complete and
    cuts off anything after them; ``done_sources`` tells which source images are in.
    ``finish(classes, files)`` writes the index and removes the records; ``files`` maps a
    source number to its file name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + PART_SUFFIX)
        if index_path(self.path).is_file():
            raise FileExistsError(f"pixel store {str(self.path)!r} is already complete")
        records = np.zeros(0, dtype=_RECORD)
        if self.part.is_file():
            raw = self.part.read_bytes()
            raw = raw[: len(raw) // _RECORD.itemsize * _RECORD.itemsize]  # a torn last record
            records = np.frombuffer(raw, dtype=_RECORD).copy()
        size = int((3 * records["h"] * records["w"]).sum())
        if records.size and (not self.path.is_file() or self.path.stat().st_size < size):
            records, size = records[:0], 0  # records without their pixels: start again
        self._records = list(records)
        self._pixels = open(self.path, "r+b" if self.path.is_file() else "wb")  # noqa: SIM115
        self._pixels.truncate(size)
        self._pixels.seek(size)
        self._part = open(self.part, "r+b" if self.part.is_file() else "wb")  # noqa: SIM115
        self._part.truncate(len(self._records) * _RECORD.itemsize)
        self._part.seek(0, os.SEEK_END)
        self._pending: list[tuple[int, int, int, int]] = []

    @property
    def done_sources(self) -> set[int]:
        return {int(r["source"]) for r in self._records} | {p[0] for p in self._pending}

    def __len__(self) -> int:
        return len(self._records) + len(self._pending)

    def append(self, source: int, pixels: np.ndarray, label: int) -> None:
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ValueError(f"pixel store: images are uint8 (3, H, W), got {pixels.dtype} "
                             f"{pixels.shape}")  # fmt: skip
        self._pixels.write(np.ascontiguousarray(pixels).data)
        self._pending.append((int(source), pixels.shape[1], pixels.shape[2], int(label)))

    def flush(self) -> None:
        if not self._pending:
            return
        self._pixels.flush()
        os.fsync(self._pixels.fileno())
        rec = np.array(self._pending, dtype=_RECORD)
        self._part.write(rec.tobytes())
        self._part.flush()
        os.fsync(self._part.fileno())
        self._records.extend(rec)
        self._pending = []

    def close(self) -> None:
        self._pixels.close()
        self._part.close()

    def finish(self, classes: Sequence[str], files: Sequence[bytes]) -> int:
        """Write the index (images in the order appended); returns the image count."""
        self.flush()
        self.close()
        rec = np.array(self._records, dtype=_RECORD)
        hw = np.stack([rec["h"], rec["w"]], 1).astype(np.int64).reshape(-1, 2)
        offsets = np.zeros(len(rec) + 1, dtype=np.int64)
        np.cumsum(3 * hw[:, 0] * hw[:, 1], out=offsets[1:])
        ipath = index_path(self.path)
        tmp = ipath.with_name(ipath.name + ".tmp.npz")
        np.savez(tmp, offsets=offsets, hw=hw, labels=rec["label"].astype(np.int64),
                 classes=np.array(list(classes), dtype=np.str_),
                 files=np.array([files[int(s)] for s in rec["source"]], dtype=np.bytes_),
                 version=np.int64(VERSION))  # fmt: skip
        os.replace(tmp, ipath)
        self.part.unlink(missing_ok=True)
        return len(rec)
