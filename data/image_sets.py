"""Image datasets: class folders, scikit-learn digits, Hugging Face ``datasets``, our packed
``.npz.xz`` JPEG sets (decompressed once, memory-mapped) and a generated class folder for
tests. Split out of ``data/images.py`` (its docstring describes the sources), which re-exports
everything here."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.image_config import (
    _PACKED_CACHE_FORMAT,
    FOLDER_LAYOUT,
    HF_ALIASES,
    IMAGE_EXTENSIONS,
    IMAGENET_HF_REPO,
    IMAGENET_HF_REVISION,
    PACKED_FORMAT,
    PACKED_KEYS,
)
from data.sources import default_cache_dir

# --------------------------------------------------------------------------- datasets


def _to_rgb(img: Image.Image) -> Image.Image:
    """A decoded RGB copy (``convert`` always copies, so the file may be closed after)."""
    return img.convert("RGB")


class _ImageDataset(Dataset):
    """Shared item logic: ``dataset[i] = (transform(RGB PIL image i), label i)``, or after
    ``use_encoded()`` (data.decode=gpu) ``(stored file bytes as a uint8 1-D tensor, label i)``.

    Subclasses set ``classes`` (names, index = label), ``labels`` (int array) and ``image(i)``,
    and ``encoded(i)`` where images are stored encoded.
    """

    classes: list[str]
    labels: np.ndarray
    transform: Callable | None
    encoded_only: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def encoded(self, index: int) -> bytes | np.ndarray:
        raise NotImplementedError(
            f"{type(self).__name__} holds no encoded images: data.decode=gpu needs JPEG files "
            "(data.kind folder, packed or hf)"
        )

    def use_encoded(self) -> None:
        """Hand out the images' stored bytes, undecoded (the device decodes them)."""
        self.encoded_only = True

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.encoded_only:
            return _byte_tensor(self.encoded(int(index)), index), int(self.labels[index])
        img = self.image(int(index))
        return (self.transform(img) if self.transform else img), int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _byte_tensor(data: bytes | np.ndarray, index: int) -> torch.Tensor:
    """Encoded image bytes as a (writable, owned) uint8 1-D tensor."""
    if len(data) == 0:
        raise ValueError(f"image {index}: the stored file is empty")
    if isinstance(data, np.ndarray):
        return torch.from_numpy(np.array(data, dtype=np.uint8, copy=True).reshape(-1))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


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
        # one fixed-width byte array, not a list of str: loader workers reading a list touch
        # each item's reference count, which copies the pages of the fork's shared list into
        # every worker (98 MiB a worker for ImageNet's 1.28M names: scripts/bench_worker_memory.py);
        # an array has no per-item objects to touch
        self.files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self.files[index])

    def encoded(self, index: int) -> np.ndarray:
        path = self.path(index)
        try:
            return np.fromfile(path, dtype=np.uint8)
        except OSError as err:
            raise OSError(f"cannot read image {str(path)!r}: {err}") from err

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

    def use_encoded(self) -> None:
        """Read the image column undecoded (``datasets.Image(decode=False)``): its stored
        bytes, or the bytes of the file it names. Other column types raise (no re-encoding)."""
        import datasets

        feature = self.ds.features[self.image_key]
        if not isinstance(feature, datasets.Image):
            raise ValueError(
                f"data.decode=gpu needs encoded images, but column {self.image_key!r} is "
                f"{type(feature).__name__}, not a datasets.Image; use data.decode=cpu"
            )
        self._raw = self.ds.cast_column(self.image_key, datasets.Image(decode=False))
        super().use_encoded()

    def encoded(self, index: int) -> bytes:
        value = self._raw[index][self.image_key]
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and os.path.isfile(value["path"]):
            with open(value["path"], "rb") as f:
                return f.read()
        raise ValueError(
            f"column {self.image_key!r} item {index} holds no stored bytes (path "
            f"{value.get('path')!r}); data.decode=gpu cannot read it, use data.decode=cpu"
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
