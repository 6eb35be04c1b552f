"""Image classification data: datasets, timm transforms, mixup/cutmix and DDP loaders.

The trainer needs one call::

    train_loader, val_loader, num_classes, mixup_fn = build_image_loaders(
        cfg, batch_size, rank=rank, world=world, seed=seed)
    for epoch in range(epochs):
        train_loader.sampler.set_epoch(epoch)       # new shuffle (and augmentation) per epoch
        for batch in train_loader:
            images, labels = to_device(batch, device, channels_last=cfg.channels_last)
            if mixup_fn is not None:
                images, targets = mixup_fn(images, labels)   # soft targets, rows sum to one
            ...  # soft-target cross entropy; without mixup use label_smoothing in the loss

Sources (``ImageDataConfig.kind``)
----------------------------------
folder   ImageNet-style class folders: ``root/train/<class>/*.jpg`` and ``root/val/<class>/...``
         (or ``train``/``val`` naming the two class-folder directories). A missing path, a
         directory without class sub-folders, an empty class or train/val class lists that
         differ raise an error that prints the expected layout.
hf       Hugging Face ``datasets``: ``root`` is a Hub dataset (default ImageNet-1k,
         ``ILSVRC/imagenet-1k`` at the pinned ``hf_revision``; gated, needs ``huggingface-cli
         login``) or a local ``save_to_disk`` directory; ``train``/``val`` are split names
         (default ``train``/``validation``) or paths of saved single-split datasets.
packed   Our ``.npz.xz`` packed JPEG sets (``train``/``val`` are the files): after lzma
         decompression an ``.npz`` with ``data`` (uint8, all JPEG files concatenated),
         ``offsets`` (int64, n+1), ``labels`` (int16) and ``classes`` (names). Decompressed once
         into ``$ATTNLAB_CACHE/images`` (default ``~/.cache/attnlab``) as ``.npy`` files that are
         memory-mapped, so each worker decodes only the JPEGs it reads.
digits   scikit-learn's ``load_digits`` (1,797 8x8 greyscale digits, bundled with the library):
         no files, no network. A fixed stratified split holds out ``val_fraction`` of each class.

Image size
----------
Every transform ends at ``img_size`` x ``img_size``: training with timm's random-resized crop,
evaluation by resizing the short side to ``floor(img_size / crop_pct)`` and center-cropping
``img_size`` (timm's eval protocol; bicubic both ways). Images smaller than that are therefore
*upscaled* (bicubic), never padded: a 32x32 CIFAR image at ``img_size=224`` becomes a blurry
224x224 image with the content a 224 model expects in size, at ImageNet cost per image. Digits
are upscaled from 8x8 to ``img_size`` (and replicated to RGB) inside the dataset, so the
augmentations work at the final resolution. For small images at their native size
(``img_size=32``), set ``crop_pct=1.0`` so evaluation sees the whole image rather than the
center 28/32.

Distributed sampling
--------------------
Training: ``ShardSampler`` (torch's ``DistributedSampler`` order: a permutation seeded with
``seed + epoch``, rank r takes positions r, r+world, ...; each rank gets the same number of
samples, so the same number of batches) or, with ``repeated_aug`` under DDP (world > 1),
``RepeatAugSampler`` (DeiT/timm semantics: each sample appears ``aug_repeats`` times in a row in
the global order, so its copies land on different ranks and get different augmentations; each
rank still reads about len(dataset)/world samples per epoch). Validation: every sample exactly
once over all ranks (no padding), so ranks may get unequal counts: sum correct/total locally
and all-reduce once.

The package imports nothing from models/, ops/ or trainer/. timm, datasets and scikit-learn are
imported where first used (they take seconds to import).
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from data.sources import default_cache_dir

IMAGE_KINDS = ("folder", "hf", "packed", "digits")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # = timm.data.IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # = timm.data.IMAGENET_DEFAULT_STD

IMAGENET_HF_REPO = "ILSVRC/imagenet-1k"
IMAGENET_HF_REVISION = "4603483700ee984ea9debe3ddbfdeae86f6489eb"
"""Hub commit of ImageNet-1k pinned so every run reads the same files (the commit public
training code pins; not checked from here, these machines have no network). It is a
loading-script dataset, which ``datasets`` >= 4 no longer runs: there, convert once (with
``datasets`` < 4, ``save_to_disk``) and point ``root`` at the copy, set ``hf_revision`` to a
Parquet revision, or use kind=folder."""
HF_ALIASES = {"imagenet-1k": IMAGENET_HF_REPO, "imagenet": IMAGENET_HF_REPO}

PACKED_KEYS = ("data", "offsets", "labels", "classes")
_PACKED_CACHE_FORMAT = 1  # bump when the cache layout changes

FOLDER_LAYOUT = """\
expected layout (ImageNet style, one sub-folder per class, same class names in train/ and val/):
    <root>/
        train/
            <class_a>/  img_0001.jpg  img_0002.jpg ...
            <class_b>/  ...
        val/
            <class_a>/  ...
            <class_b>/  ...
set data.root=<root>, or data.train / data.val to the two class-folder directories
(image files: {exts})""".format(exts=" ".join(IMAGE_EXTENSIONS))

PACKED_FORMAT = """\
expected a packed image set: an .npz (optionally lzma-compressed, .npz.xz) holding
    data     uint8 (total bytes,)  all JPEG files concatenated
    offsets  int64 (n+1,)          image i is data[offsets[i]:offsets[i+1]]; offsets[0] = 0
    labels   int (n,)              class index of each image, 0 <= label < len(classes)
    classes  str (num_classes,)    class names"""


# --------------------------------------------------------------------------- config


@dataclass
class ImageDataConfig:
    """Which images to train and validate on and how to augment them (``data:`` section).

    Paths by kind (see the module docstring): folder: ``root`` with ``train/`` and ``val/``, or
    ``train``/``val`` class-folder directories; hf: ``root`` = Hub name or ``save_to_disk``
    directory (default ImageNet-1k), ``train``/``val`` = split names or saved-split paths;
    packed: ``train``/``val`` = ``.npz.xz`` files; digits: nothing. The batch size is not
    here: the trainer passes it to ``build_image_loaders``.
    """

    name: str = "digits"
    kind: str = "digits"
    root: str | None = None
    train: str | None = None
    val: str | None = None
    hf_revision: str = IMAGENET_HF_REVISION
    image_key: str = "image"  # hf columns
    label_key: str = "label"
    val_fraction: float = 0.2  # digits: held-out share of each class
    cache_dir: str | None = None  # packed: decompression cache (default $ATTNLAB_CACHE)
    img_size: int = 224
    train_interpolation: str = "bicubic"
    val_interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, center-crop img_size
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment; null/"" disables
    re_prob: float = 0.25  # random erasing (pixel mode)
    mixup: float = 0.8  # mixup alpha (0 disables)
    cutmix: float = 1.0  # cutmix alpha (0 disables)
    label_smoothing: float = 0.1
    repeated_aug: bool = True  # under DDP (world > 1) only
    aug_repeats: int = 3
    num_workers: int = 8  # per process; capped at the CPU count
    pin_memory: bool = True  # when CUDA is available
    persistent_workers: bool = True
    channels_last: bool = True


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"data.{name} must be in [0, 1], got {value!r}")


def check_image_config(cfg: ImageDataConfig) -> None:
    """Raise ValueError naming the field for settings that cannot work."""
    if cfg.kind not in IMAGE_KINDS:
        raise ValueError(f"data.kind must be one of {list(IMAGE_KINDS)}, got {cfg.kind!r}")
    if isinstance(cfg.img_size, bool) or not isinstance(cfg.img_size, int) or cfg.img_size < 1:
        raise ValueError(f"data.img_size must be a positive integer, got {cfg.img_size!r}")
    if not 0.0 < float(cfg.crop_pct) <= 1.0:
        raise ValueError(f"data.crop_pct must be in (0, 1], got {cfg.crop_pct!r}")
    for name in ("mean", "std"):
        value = list(getattr(cfg, name))
        if len(value) != 3:
            raise ValueError(f"data.{name} needs 3 values (RGB), got {value!r}")
    if min(cfg.std) <= 0:
        raise ValueError(f"data.std must be positive, got {list(cfg.std)!r}")
    for name in ("re_prob", "label_smoothing"):
        _check_prob(name, getattr(cfg, name))
    for name in ("mixup", "cutmix"):
        if float(getattr(cfg, name)) < 0:
            raise ValueError(f"data.{name} (a Beta alpha) must be >= 0, got {getattr(cfg, name)!r}")
    if int(cfg.aug_repeats) < 1:
        raise ValueError(f"data.aug_repeats must be >= 1, got {cfg.aug_repeats!r}")
    if int(cfg.num_workers) < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers!r}")
    if cfg.kind == "digits" and not 0.0 < float(cfg.val_fraction) < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction!r}")


# --------------------------------------------------------------------------- datasets


def _to_rgb(img: Image.Image) -> Image.Image:
    """A decoded RGB copy (``convert`` always copies, so the file may be closed after)."""
    return img.convert("RGB")


class _ImageDataset(Dataset):
    """Shared item logic: ``dataset[i] = (transform(RGB PIL image i), label i)``.

    Subclasses set ``classes`` (names, index = label), ``labels`` (int array) and ``image(i)``.
    """

    classes: list[str]
    labels: np.ndarray
    transform: Callable | None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.image(int(index))
        return (self.transform(img) if self.transform else img), int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _is_image_file(entry: os.DirEntry) -> bool:
    return (
        not entry.name.startswith(".")
        and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        and entry.is_file()
    )


class ImageFolderDataset(_ImageDataset):
    """``root/<class>/<image>``: classes are the sorted sub-folder names, files sorted by name.

    Hidden entries (``.name``) are skipped; files with other extensions are ignored. Every
    class must hold at least one image.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        if not self.root.exists():
            raise FileNotFoundError(
                f"image folder {str(self.root)!r} does not exist\n{FOLDER_LAYOUT}"
            )
        if not self.root.is_dir():
            raise NotADirectoryError(
                f"image folder {str(self.root)!r} is a file, not a directory\n{FOLDER_LAYOUT}"
            )
        with os.scandir(self.root) as it:
            entries = sorted(it, key=lambda e: e.name)
        class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        if not class_dirs:
            loose = sum(_is_image_file(e) for e in entries)
            found = f"{loose} image file(s) directly in it" if loose else "it is empty"
            raise ValueError(
                f"image folder {str(self.root)!r} has no class sub-folders ({found}); put each "
                f"class's images in their own sub-folder\n{FOLDER_LAYOUT}"
            )
        self.classes = [e.name for e in class_dirs]
        files: list[str] = []
        labels: list[int] = []
        empty: list[str] = []
        for label, d in enumerate(class_dirs):
            with os.scandir(d.path) as it:
                names = sorted(e.name for e in it if _is_image_file(e))
            if not names:
                empty.append(d.name)
            files.extend(os.path.join(d.name, n) for n in names)
            labels.extend([label] * len(names))
        if empty:
            shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
            raise ValueError(
                f"image folder {str(self.root)!r}: {len(empty)} class folder(s) hold no image "
                f"files: {shown}\n{FOLDER_LAYOUT}"
            )
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    def image(self, index: int) -> Image.Image:
        path = self.path(index)
        try:
            with Image.open(path) as img:
                return _to_rgb(img)
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read image {str(path)!r}: {err}") from err


class DigitsDataset(_ImageDataset):
    """scikit-learn's 8x8 digits as RGB images of ``size`` x ``size`` (bicubic upscaling).

    The split is fixed: per class, a seeded permutation (seed 0) puts the first
    ``round(val_fraction * count)`` images in ``val``; the two splits are disjoint and cover
    all 1,797 images.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        val_fraction: float = 0.2,
        transform: Callable | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"digits: split must be 'train' or 'val', got {split!r}")
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16
        targets = bunch.target.astype(np.int64)
        rng = np.random.default_rng(0)
        chosen = []
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(targets == c))
            n_val = int(round(val_fraction * idx.size))
            chosen.append(idx[:n_val] if split == "val" else idx[n_val:])
        order = np.sort(np.concatenate(chosen))
        self.images = images[order]
        self.labels = targets[order]
        self.indices = order  # positions in load_digits()
        self.classes = [str(c) for c in range(10)]
        self.size = int(size)
        self.transform = transform

    def image(self, index: int) -> Image.Image:
        img = Image.fromarray(self.images[index])  # uint8 2-D: mode "L"
        if self.size != img.width:
            img = img.resize((self.size, self.size), Image.BICUBIC)
        return img.convert("RGB")


class HFImageDataset(_ImageDataset):
    """A Hugging Face ``datasets.Dataset`` with an image column and an integer label column."""

    def __init__(
        self,
        ds: Any,
        transform: Callable | None = None,
        image_key: str = "image",
        label_key: str = "label",
        where: str = "dataset",
    ) -> None:
        missing = [k for k in (image_key, label_key) if k not in ds.column_names]
        if missing:
            raise ValueError(
                f"{where}: no column(s) {missing}; columns present: {ds.column_names} "
                "(set data.image_key / data.label_key)"
            )
        self.ds = ds
        self.image_key, self.label_key = image_key, label_key
        self.transform = transform
        self.labels = np.asarray(ds.with_format("numpy")[label_key], dtype=np.int64)
        feature = ds.features[label_key]
        names = getattr(feature, "names", None)
        if names:
            self.classes = list(names)
        else:
            self.classes = [str(c) for c in range(int(self.labels.max(initial=-1)) + 1)]
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(
                f"{where}: labels must be in [0, {len(self.classes)}), found "
                f"{self.labels.min()}..{self.labels.max()} (an unlabelled test split?)"
            )

    def image(self, index: int) -> Image.Image:
        value = self.ds[index][self.image_key]
        if isinstance(value, dict) and value.get("bytes") is not None:  # undecoded Image feature
            value = Image.open(io.BytesIO(value["bytes"]))
        if not isinstance(value, Image.Image):
            raise TypeError(
                f"column {self.image_key!r} item {index} is {type(value).__name__}, not an image"
            )
        return _to_rgb(value)


def load_hf_split(
    source: str | None, split: str, revision: str | None = IMAGENET_HF_REVISION
) -> Any:
    """One split as a ``datasets.Dataset``.

    ``split`` may be the path (it contains a "/" or starts with "~" or ".") of a
    ``save_to_disk`` single-split dataset (then ``source`` is ignored). Otherwise ``source``
    is a ``save_to_disk`` ``DatasetDict`` directory or a Hub dataset name (aliases:
    imagenet-1k, imagenet), loaded at ``revision``.
    """
    import datasets

    if "/" in split or os.sep in split or split.startswith(("~", ".")):  # a path, not a name
        split_path = Path(split).expanduser()
        if not split_path.is_dir():
            raise FileNotFoundError(f"hf split {split!r}: no such saved-dataset directory")
        obj = datasets.load_from_disk(str(split_path))
        if isinstance(obj, datasets.DatasetDict):
            raise ValueError(
                f"{split!r} is a saved DatasetDict with splits {list(obj)}; set data.root to it "
                "and data.train / data.val to split names"
            )
        return obj
    source = source or IMAGENET_HF_REPO
    local = Path(source).expanduser()
    if local.exists():
        obj = datasets.load_from_disk(str(local))
        if not isinstance(obj, datasets.DatasetDict):
            raise ValueError(
                f"{source!r} is a single saved dataset, not a DatasetDict; set data.train and "
                "data.val to saved-split paths instead"
            )
        if split not in obj:
            raise ValueError(f"{source!r} has no split {split!r}; splits present: {list(obj)}")
        return obj[split]
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise FileNotFoundError(
            f"hf dataset {source!r}: no such local directory (a Hub name looks like "
            "'org/name' or 'imagenet-1k')"
        )
    name = HF_ALIASES.get(source, source)
    try:
        return datasets.load_dataset(name, split=split, revision=revision or None)
    except Exception as err:  # the Hub client raises many types; say what to check
        raise RuntimeError(
            f"could not load Hugging Face dataset {name!r} split {split!r} at revision "
            f"{revision!r}: {type(err).__name__}: {err}\nCheck network access and "
            "`huggingface-cli login` (ImageNet-1k is gated); with datasets>=4 a "
            "loading-script revision cannot run: save_to_disk a converted copy and set "
            "data.root to it, or use data.kind=folder"
        ) from err


# --------------------------------------------------------------------------- packed sets


def write_packed(
    path: str | Path,
    images: Sequence[bytes],
    labels: Sequence[int],
    classes: Sequence[str],
) -> Path:
    """Write encoded images (e.g. JPEG bytes) as a packed set; ``.xz`` suffix: lzma-compressed."""
    path = Path(path)
    if len(images) != len(labels):
        raise ValueError(f"write_packed: {len(images)} images but {len(labels)} labels")
    lengths = np.fromiter((len(b) for b in images), dtype=np.int64, count=len(images))
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    data = np.frombuffer(b"".join(images), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(
        buf,
        data=data,
        offsets=offsets,
        labels=np.asarray(labels, dtype=np.int16),
        classes=np.asarray(list(classes), dtype=str),
    )
    raw = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(lzma.compress(raw) if path.suffix == ".xz" else raw)
    os.replace(tmp, path)
    return path


def _packed_cache_dir(path: Path, cache_dir: str | Path | None) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_PACKED_CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = path.name.split(".")[0]
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / "images" / f"{stem}-{digest}"


def _decompress(src: Path, dst: Path, progress: bool) -> None:
    """lzma-decompress ``src`` to ``dst`` in chunks, with a progress bar over input bytes."""
    from tqdm import tqdm

    size = src.stat().st_size
    with (
        open(src, "rb") as raw,
        lzma.open(raw) as fin,
        open(dst, "wb") as fout,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"decompressing {src.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        done = 0
        while chunk := fin.read(1 << 22):
            fout.write(chunk)
            bar.update(raw.tell() - done)
            done = raw.tell()


def _extract_packed(path: Path, out: Path, progress: bool) -> None:
    """Write the members of packed ``path`` as ``out/<key>.npy`` (atomically, whole directory)."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        npz = path
        if path.suffix == ".xz":
            npz = tmp / "set.npz"
            try:
                _decompress(path, npz, progress)
            except lzma.LZMAError as err:
                raise ValueError(f"packed set {str(path)!r}: not valid xz data ({err})") from err
        try:
            with zipfile.ZipFile(npz) as zf:
                names = set(zf.namelist())
                missing = [k for k in PACKED_KEYS if f"{k}.npy" not in names]
                if missing:
                    raise ValueError(
                        f"packed set {str(path)!r}: missing array(s) {missing}; has "
                        f"{sorted(n.removesuffix('.npy') for n in names)}\n{PACKED_FORMAT}"
                    )
                for key in PACKED_KEYS:
                    zf.extract(f"{key}.npy", tmp)
        except zipfile.BadZipFile as err:
            raise ValueError(
                f"packed set {str(path)!r}: not an .npz archive ({err})\n{PACKED_FORMAT}"
            ) from err
        if npz != path:
            npz.unlink()
        (tmp / "source.json").write_text(json.dumps({"source": str(path.resolve())}))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "source.json").is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_packed(
    path: str | Path, cache_dir: str | Path | None = None, progress: bool = True
) -> dict[str, np.ndarray]:
    """The arrays of a packed set, checked; ``data`` memory-mapped from the decompression cache.

    The first call per file decompresses it into ``<cache>/images/<stem>-<hash>/`` (the hash
    covers path, size and mtime, so a changed file is extracted again); concurrent processes
    (DDP ranks) wait on a file lock and extract once.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"packed image set {str(path)!r} does not exist\n{PACKED_FORMAT}")
    out = _packed_cache_dir(path, cache_dir)
    if not (out / "source.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_name(out.name + ".lock"), "w") as lock:
            try:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)
            except ImportError:  # no flock (Windows): extraction stays atomic, maybe repeated
                pass
            if not (out / "source.json").is_file():
                _extract_packed(path, out, progress)
    try:
        arrays = {
            key: np.load(out / f"{key}.npy", mmap_mode="r" if key == "data" else None)
            for key in PACKED_KEYS
        }
    except ValueError as err:  # e.g. object arrays, which would need pickle
        raise ValueError(f"packed set {str(path)!r}: {err}\n{PACKED_FORMAT}") from err
    _check_packed(path, arrays)
    return arrays


def _check_packed(path: Path, a: dict[str, np.ndarray]) -> None:
    def bad(msg: str) -> ValueError:
        return ValueError(f"packed set {str(path)!r}: {msg}\n{PACKED_FORMAT}")

    data, offsets, labels, classes = (a[k] for k in PACKED_KEYS)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise bad(f"data must be 1-D uint8, got {data.dtype} {data.shape}")
    if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer) or offsets.size < 1:
        raise bad(f"offsets must be 1-D integers (n+1,), got {offsets.dtype} {offsets.shape}")
    n = offsets.size - 1
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise bad(
            f"labels must be ({n},) integers to match offsets, got {labels.dtype} {labels.shape}"
        )
    if offsets[0] != 0 or offsets[-1] != data.size or np.any(np.diff(offsets) <= 0):
        raise bad(
            f"offsets must rise strictly from 0 to len(data)={data.size}; got "
            f"{offsets[0]}..{offsets[-1]}"
        )
    if classes.ndim != 1 or classes.size == 0 or classes.dtype.kind not in "US":
        raise bad(
            f"classes must be a non-empty 1-D array of names, got {classes.dtype} {classes.shape}"
        )
    if n and (labels.min() < 0 or labels.max() >= classes.size):
        raise bad(f"labels must be in [0, {classes.size}), found {labels.min()}..{labels.max()}")


class PackedImageDataset(_ImageDataset):
    """A packed ``.npz.xz`` JPEG set, decoded per item (PIL, RGB) from the memory-mapped cache."""

    def __init__(
        self,
        path: str | Path,
        transform: Callable | None = None,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        self.path = Path(path).expanduser()
        arrays = open_packed(self.path, cache_dir, progress)
        self._cache_file = Path(arrays["data"].filename)
        self._data: np.ndarray | None = arrays["data"]
        self.offsets = np.asarray(arrays["offsets"], dtype=np.int64)
        self.labels = np.asarray(arrays["labels"], dtype=np.int64)
        self.classes = [str(c) for c in arrays["classes"]]
        self.transform = transform

    def __getstate__(self) -> dict:  # workers reopen the memory map instead of pickling it
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    def encoded(self, index: int) -> bytes:
        """Image ``index``'s stored (JPEG) bytes."""
        if self._data is None:
            self._data = np.load(self._cache_file, mmap_mode="r")
        return self._data[self.offsets[index] : self.offsets[index + 1]].tobytes()

    def image(self, index: int) -> Image.Image:
        try:
            with Image.open(io.BytesIO(self.encoded(index))) as img:
                return _to_rgb(img)
        except (OSError, ValueError) as err:
            raise OSError(
                f"packed set {str(self.path)!r}: image {index} is unreadable: {err}"
            ) from err


# --------------------------------------------------------------------------- synthetic folder


def make_image_folder(
    root: str | Path,
    num_classes: int = 4,
    train_per_class: int = 8,
    val_per_class: int = 2,
    size: int = 32,
    seed: int = 0,
    ext: str = "jpg",
) -> Path:
    """Write a small learnable image folder: ``root/{train,val}/class_<k>/<i>.<ext>``.

    Class k is a colour and stripe orientation of its own plus noise, so a small model can
    separate the classes. Deterministic for a given seed; returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    hues = rng.uniform(40, 215, size=(num_classes, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for k in range(num_classes):
            d = root / split / f"class_{k:02d}"
            d.mkdir(parents=True, exist_ok=True)
            angle = math.pi * k / max(num_classes, 1)
            wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (6.0 / size) * math.pi)
            for i in range(count):
                noise = rng.normal(0, 18, size=(size, size, 3))
                img = hues[k] + 40 * wave[..., None] + noise
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:04d}.{ext}")
    return root


# --------------------------------------------------------------------------- transforms


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, also for 0 bits kept: a black image, as Pillow < 12 gave.

    RandAugment's increasing posterize keeps ``4 - int(level / 10 * 4)`` bits, 0 at the
    strongest level (m9 with mstd0.5 reaches it in ~2% of draws); newer Pillow refuses
    ``bits=0`` and the worker would crash.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Any) -> None:
    """Swap ``_posterize`` into the posterize ops of any RandAugment/AutoAugment in ``transform``
    (these instances only; timm itself is left alone)."""
    for t in getattr(transform, "transforms", ()):
        _patch_posterize(t)
    for op in getattr(transform, "ops", ()):
        if str(getattr(op, "name", "")).startswith("Posterize"):
            op.aug_fn = _posterize
    for policy in getattr(transform, "policy", ()):  # AutoAugment: sub-policies of ops
        for op in policy if isinstance(policy, (list, tuple)) else ():
            if str(getattr(op, "name", "")).startswith("Posterize"):
                op.aug_fn = _posterize


def build_transforms(cfg: ImageDataConfig) -> tuple[Callable, Callable]:
    """(train, eval) transforms from timm: PIL image -> normalised float CHW tensor.

    Train: random-resized crop (bicubic), flip, RandAugment ``auto_augment``, random erasing
    (``re_prob``, per-pixel noise). Eval: resize to ``img_size / crop_pct``, center crop.
    RandAugment's posterize is patched to work at full strength with current Pillow.
    """
    from timm.data import create_transform

    common = {"mean": tuple(cfg.mean), "std": tuple(cfg.std)}
    train = create_transform(
        cfg.img_size,
        is_training=True,
        auto_augment=cfg.auto_augment or None,
        interpolation=cfg.train_interpolation,
        re_prob=float(cfg.re_prob),
        re_mode="pixel",
        **common,
    )
    _patch_posterize(train)
    val = create_transform(
        cfg.img_size,
        is_training=False,
        interpolation=cfg.val_interpolation,
        crop_pct=float(cfg.crop_pct),
        **common,
    )
    return train, val


# --------------------------------------------------------------------------- mixing


class BatchMixup:
    """``(images, labels) -> (images, soft_targets)``: timm's Mixup/CutMix + label smoothing.

    Applied per batch where the batch already is (GPU): one mixing coefficient per batch
    (``mode="batch"``, timm's default), image i paired with image B-1-i; mixup or cutmix is
    chosen per batch with probability ``switch_prob``. ``images`` is modified in place (as in
    timm); its memory format is kept. Targets are float (B, num_classes) rows summing to one.

    Odd batches: timm requires an even batch. Here the first B-1 images are mixed and the last
    one keeps its image with a label-smoothed one-hot target (a batch of one is only smoothed).
    Set ``enabled = False`` to turn mixing off (e.g. for the final epochs); smoothing stays.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        label_smoothing: float = 0.1,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
    ) -> None:
        from timm.data import Mixup

        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("BatchMixup: mixup_alpha or cutmix_alpha must be > 0")
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=prob,
            switch_prob=switch_prob,
            mode=mode,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    @property
    def enabled(self) -> bool:
        return self.mixup.mixup_enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.mixup.mixup_enabled = bool(value)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import mixup_target

        if images.ndim != 4 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"BatchMixup: expected images (B, C, H, W) and labels (B,), got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        n = images.shape[0]
        even = n - n % 2
        parts = []
        if even:
            head = images[:even]
            mixed, targets = self.mixup(head, labels[:even])  # in place on the view
            if mixed.data_ptr() != head.data_ptr():
                head.copy_(mixed)
            parts.append(targets)
        if even < n:
            parts.append(mixup_target(labels[even:], self.num_classes, 1.0, self.label_smoothing))
        return images, parts[0] if len(parts) == 1 else torch.cat(parts)


def build_mixup(cfg: ImageDataConfig, num_classes: int) -> BatchMixup | None:
    """timm mixing for ``cfg``, or None when ``mixup`` and ``cutmix`` are both 0 (then apply
    ``cfg.label_smoothing`` in the loss)."""
    if float(cfg.mixup) <= 0 and float(cfg.cutmix) <= 0:
        return None
    return BatchMixup(
        num_classes,
        mixup_alpha=float(cfg.mixup),
        cutmix_alpha=float(cfg.cutmix),
        label_smoothing=float(cfg.label_smoothing),
    )


# --------------------------------------------------------------------------- samplers


def _check_rank(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need world >= 1 and 0 <= rank < world, got rank={rank} world={world}")


def _epoch_order(n: int, seed: int, epoch: int, length: int, repeats: int = 1) -> list[int]:
    """The epoch's global index order: permutations of range(n) (torch generator seeded
    ``seed + epoch``, as DistributedSampler), each index repeated ``repeats`` times in a row,
    passes appended until ``length`` positions exist."""
    g = torch.Generator()
    g.manual_seed(int(seed) + int(epoch))
    passes = []
    total = 0
    while total < length:
        perm = torch.randperm(n, generator=g)
        if repeats > 1:
            perm = torch.repeat_interleave(perm, repeats)
        passes.append(perm)
        total += perm.numel()
    return torch.cat(passes)[:length].tolist()


class ShardSampler(Sampler[int]):
    """Each rank's share of a per-epoch shuffle (torch ``DistributedSampler`` semantics).

    ``pad=True`` (training): every rank gets ``ceil(total / world)`` indices, where ``total``
    is ``epoch_len`` or the dataset size; positions beyond one permutation continue with the
    next permutation. With ``epoch_len=None`` and a dataset size divisible by ``world`` the
    order equals ``DistributedSampler(shuffle=True, seed=seed)``'s. Ranks are disjoint within a
    permutation. ``pad=False`` (evaluation): rank r takes samples r, r+world, ... exactly once.
    Call ``set_epoch(epoch)`` before each epoch.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        epoch_len: int | None = None,
        pad: bool = True,
    ) -> None:
        _check_rank(rank, world)
        if num_samples < 1:
            raise ValueError("ShardSampler: the dataset is empty")
        if epoch_len is not None and (not pad or epoch_len < 1):
            raise ValueError("ShardSampler: epoch_len needs pad=True and must be >= 1")
        self.n, self.rank, self.world = int(num_samples), int(rank), int(world)
        self.shuffle, self.seed, self.pad = bool(shuffle), int(seed), bool(pad)
        self.epoch_len = epoch_len
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if not self.pad:
            return len(range(self.rank, self.n, self.world))
        return math.ceil((self.epoch_len or self.n) / self.world)

    def __iter__(self) -> Iterator[int]:
        if not self.pad:
            return iter(range(self.rank, self.n, self.world))
        length = len(self) * self.world
        if self.shuffle:
            order = _epoch_order(self.n, self.seed, self.epoch, length)
        else:
            order = [i % self.n for i in range(length)]
        return iter(order[self.rank :: self.world])


class RepeatAugSampler(Sampler[int]):
    """Repeated augmentation for DDP (DeiT's RASampler, timm's ``RepeatAugSampler`` semantics).

    The epoch's global order is a permutation (seeded ``seed + epoch``) with each index
    repeated ``repeats`` times in a row; rank r takes positions r, r+world, ... So the copies
    of a sample go to ``repeats`` consecutive ranks, where each gets its own augmentation.
    Each rank keeps only its first ``num_selected`` indices, so an epoch stays about
    len(dataset) samples over all ranks (timm: ``len // 256 * 256 // world``, or
    ``ceil(len / world)`` below 256 samples); ``epoch_len`` sets the total instead. With
    ``seed=0`` and no ``epoch_len`` the indices equal timm's ``RepeatAugSampler``'s.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world: int = 1,
        repeats: int = 3,
        shuffle: bool = True,
        seed: int = 0,
        epoch_len: int | None = None,
        selected_round: int = 256,
    ) -> None:
        _check_rank(rank, world)
        if num_samples < 1 or repeats < 1:
            raise ValueError("RepeatAugSampler: needs a non-empty dataset and repeats >= 1")
        self.n, self.rank, self.world = int(num_samples), int(rank), int(world)
        self.repeats, self.shuffle, self.seed = int(repeats), bool(shuffle), int(seed)
        self.epoch = 0
        if epoch_len is not None:
            if epoch_len < 1:
                raise ValueError(f"RepeatAugSampler: epoch_len must be >= 1, got {epoch_len}")
            self.num_selected = math.ceil(epoch_len / self.world)
        elif selected_round and self.n >= selected_round:
            self.num_selected = self.n // selected_round * selected_round // self.world
        else:
            self.num_selected = math.ceil(self.n / self.world)
        # never more than one padded pass of the repeated order per rank without epoch_len
        if epoch_len is None:
            self.num_selected = min(
                self.num_selected, math.ceil(self.n * self.repeats / self.world)
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_selected

    def __iter__(self) -> Iterator[int]:
        length = self.num_selected * self.world
        if self.shuffle:
            order = _epoch_order(self.n, self.seed, self.epoch, length, self.repeats)
        else:
            order = [(i // self.repeats) % self.n for i in range(length)]
        return iter(order[self.rank :: self.world])


# --------------------------------------------------------------------------- loaders


def _folder_paths(cfg: ImageDataConfig) -> tuple[Path, Path]:
    if cfg.train and cfg.val:
        return Path(cfg.train), Path(cfg.val)
    if not cfg.root:
        raise ValueError(
            "data.root: required for kind='folder' (or set both data.train and data.val)\n"
            + FOLDER_LAYOUT
        )
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={cfg.root!r} is not a directory\n{FOLDER_LAYOUT}")
    paths = []
    for split, override in (("train", cfg.train), ("val", cfg.val)):
        p = Path(override) if override else root / split
        if not p.is_dir():
            present = sorted(e.name for e in root.iterdir() if e.is_dir())
            raise FileNotFoundError(
                f"data.root={cfg.root!r} has no {split}/ folder (sub-folders present: "
                f"{present})\n{FOLDER_LAYOUT}"
            )
        paths.append(p)
    return paths[0], paths[1]


def _check_same_classes(train: _ImageDataset, val: _ImageDataset, where: str) -> None:
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))

    def show(names: list[str]) -> str:
        return ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") or "-"

    detail = (
        f"only in train: {show(only_train)}; only in val: {show(only_val)}"
        if only_train or only_val
        else "same names, different order"
    )
    layout = f"\n{FOLDER_LAYOUT}" if where == "folder" else ""
    raise ValueError(
        f"{where}: train has {len(train.classes)} classes, val has {len(val.classes)}, and "
        f"they differ ({detail}); labels would not mean the same class{layout}"
    )


def build_image_datasets(
    cfg: ImageDataConfig, progress: bool = True
) -> tuple[_ImageDataset, _ImageDataset]:
    """(train, val) datasets with their transforms; train and val classes must agree."""
    check_image_config(cfg)
    train_tf, val_tf = build_transforms(cfg)
    if cfg.kind == "folder":
        train_dir, val_dir = _folder_paths(cfg)
        train, val = ImageFolderDataset(train_dir, train_tf), ImageFolderDataset(val_dir, val_tf)
    elif cfg.kind == "packed":
        if not cfg.train or not cfg.val:
            raise ValueError(
                "data.train and data.val: both required for kind='packed' (.npz.xz files)\n"
                + PACKED_FORMAT
            )
        train = PackedImageDataset(cfg.train, train_tf, cfg.cache_dir, progress)
        val = PackedImageDataset(cfg.val, val_tf, cfg.cache_dir, progress)
    elif cfg.kind == "hf":
        splits = (cfg.train or "train", cfg.val or "validation")
        train, val = (
            HFImageDataset(
                load_hf_split(cfg.root, split, cfg.hf_revision),
                tf,
                cfg.image_key,
                cfg.label_key,
                where=f"hf {cfg.root or IMAGENET_HF_REPO} [{split}]",
            )
            for split, tf in zip(splits, (train_tf, val_tf))
        )
    else:  # digits; check_image_config rejected other kinds
        if cfg.train or cfg.val or cfg.root:
            raise ValueError("data.root/train/val must be null for kind='digits' (no files)")
        frac = float(cfg.val_fraction)
        train = DigitsDataset("train", cfg.img_size, frac, train_tf)
        val = DigitsDataset("val", cfg.img_size, frac, val_tf)
    _check_same_classes(train, val, cfg.kind)
    for split, ds in (("train", train), ("val", val)):
        if len(ds) == 0:
            raise ValueError(f"data.{split}: the {cfg.kind} {split} split has no images")
    return train, val


class _Collate:
    """Stack (image, label) pairs; images optionally in channels_last (done in the workers)."""

    def __init__(self, channels_last: bool) -> None:
        self.channels_last = channels_last

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([img for img, _ in batch])
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, torch.tensor([label for _, label in batch], dtype=torch.int64)


def _loader_seed(seed: int, rank: int) -> int:
    """Distinct per rank: with repeated augmentation, copies of a sample on different ranks
    must not get identical augmentations."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def build_image_loaders(
    cfg: ImageDataConfig,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    epoch_len: int | None = None,
) -> tuple[DataLoader, DataLoader, int, BatchMixup | None]:
    """(train loader, val loader, num_classes, mixup_fn or None) for this rank.

    ``batch_size`` is per rank. Train batches are full (drop_last) and every rank has the same
    number of them; call ``train_loader.sampler.set_epoch(epoch)`` each epoch. ``epoch_len``:
    training samples per epoch over all ranks (default: the dataset size; with repeated
    augmentation timm's rule): smaller for quick runs, larger to make an epoch of a tiny
    dataset span several passes. Val: every image once over all ranks, in order. Worker
    augmentation RNGs are seeded from (seed, rank). Batches are (images float32 (B, 3, S, S),
    channels_last if cfg.channels_last, labels int64 (B,)) on CPU: see ``to_device``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_rank(rank, world)
    train, val = build_image_datasets(cfg, progress=rank == 0)
    if cfg.repeated_aug and world > 1:
        sampler: Sampler[int] = RepeatAugSampler(
            len(train), rank, world, int(cfg.aug_repeats), seed=seed, epoch_len=epoch_len
        )
    else:
        sampler = ShardSampler(len(train), rank, world, seed=seed, epoch_len=epoch_len)
    if len(sampler) < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is more than the {len(sampler)} training images this rank "
            f"gets per epoch (of {len(train)}, world={world}); no full batch can be formed; "
            "lower the batch size or raise epoch_len"
        )
    workers = min(int(cfg.num_workers), os.cpu_count() or 1)
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": bool(cfg.pin_memory) and torch.cuda.is_available(),
        "collate_fn": _Collate(bool(cfg.channels_last)),
    }
    if workers > 0:
        common["persistent_workers"] = bool(cfg.persistent_workers)
    generator = torch.Generator()
    generator.manual_seed(_loader_seed(seed, rank))
    train_loader = DataLoader(
        train, batch_size=batch_size, sampler=sampler, drop_last=True, generator=generator, **common
    )
    val_sampler = ShardSampler(len(val), rank, world, shuffle=False, pad=False)
    val_loader = DataLoader(val, batch_size=batch_size, sampler=val_sampler, **common)
    return train_loader, val_loader, train.num_classes, build_mixup(cfg, train.num_classes)


def to_device(
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device | str,
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move (images, labels) to ``device`` asynchronously (pinned memory), images in
    channels_last when asked (a no-op when the loader already made them so)."""
    images, labels = batch
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=fmt)
    return images, labels.to(device, non_blocking=True)


__all__ = [
    "FOLDER_LAYOUT",
    "IMAGENET_HF_REPO",
    "IMAGENET_HF_REVISION",
    "IMAGE_EXTENSIONS",
    "IMAGE_KINDS",
    "PACKED_FORMAT",
    "BatchMixup",
    "DigitsDataset",
    "HFImageDataset",
    "ImageDataConfig",
    "ImageFolderDataset",
    "PackedImageDataset",
    "RepeatAugSampler",
    "ShardSampler",
    "build_image_datasets",
    "build_image_loaders",
    "build_mixup",
    "build_transforms",
    "check_image_config",
    "load_hf_split",
    "make_image_folder",
    "open_packed",
    "to_device",
    "write_packed",
]
