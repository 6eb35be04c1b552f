"""Image classification data: datasets, timm transforms, mixup/cutmix and DDP loaders.

The trainer needs one call::

    train_loader, val_loader, num_classes, mixup_fn = build_image_loaders(
        cfg, batch_size, rank=rank, world=world, seed=seed)
    prep = build_device_prep(cfg)                   # uint8 -> normalised (+ erasing) on device
    for epoch in range(epochs):
        train_loader.sampler.set_epoch(epoch)       # new shuffle (and augmentation) per epoch
        for batch in train_loader:
            images, labels = to_device(batch, device, cfg.channels_last, prep, train=True)
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
pixels   A pixel store (``data/pixel_store.py``): the training images as raw planar RGB pixels
         in one file, ``root/train.pixels`` (``scripts/shrink_image_folder.py --format
         pixels`` writes it from a class folder), validated on ``root/val/<class>/...``. With
         ``decode=gpu`` each training batch is read by ``read_threads`` threads into pinned
         memory and copied to the device in one piece: nothing to decode, no workers.
digits   scikit-learn's ``load_digits`` (1,797 8x8 greyscale digits, bundled with the library):
         no files, no network. A fixed stratified split holds out ``val_fraction`` of each class.
synthetic one fixed random batch handed out ``synthetic_batches`` times an epoch, already on the
         GPU (``SyntheticImages``): for measuring a model's training speed without the loader
         (e.g. ours against ``model.impl=timm``); its accuracy means nothing.

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

GPU decoding
------------
``data.decode=gpu`` (folder, packed, hf): the workers only read each image's stored bytes and
hand out (list of uint8 1-D tensors, labels); ``to_device(..., decode=build_gpu_pipeline(cfg,
seed, rank))`` decodes them on the device (nvJPEG) and applies the same random-resized crop,
flip and RandAugment (train) or resize and center crop (eval) there, then ``prep`` as above.
See ``data/gpu_augment.py`` for what it reproduces and where it differs. With kind=pixels the
training batches come as a ``PixelBatch`` (pixels, no decoding) and take the same transforms.

Code: ``data/image_config.py`` (the config and format constants), ``data/image_sets.py`` (the
datasets), ``data/image_augment.py`` (transforms, mixing, samplers); this module builds the
loaders and re-exports all of their names, so ``from data.images import ...`` serves everything.

The package imports nothing from models/, ops/ or trainer/. timm, datasets and scikit-learn are
imported where first used (they take seconds to import).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from data.gpu_augment import (  # noqa: F401
    CROP_TRIES,
    GpuImagePipeline,
    build_gpu_pipeline,
    crop_params,
)
from data.image_augment import (  # noqa: F401
    BatchMixup,
    DevicePrep,
    RepeatAugSampler,
    ShardSampler,
    _check_rank,
    _epoch_order,
    _patch_posterize,
    _posterize,
    build_device_prep,
    build_mixup,
    build_transforms,
)
from data.image_config import (  # noqa: F401
    _PACKED_CACHE_FORMAT,
    DECODE_MODES,
    FOLDER_LAYOUT,
    HF_ALIASES,
    IMAGE_EXTENSIONS,
    IMAGE_KINDS,
    IMAGENET_HF_REPO,
    IMAGENET_HF_REVISION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PACKED_FORMAT,
    PACKED_KEYS,
    ImageDataConfig,
    _check_prob,
    check_image_config,
    decode_in_process,
)
from data.image_sets import (  # noqa: F401
    DigitsDataset,
    HFImageDataset,
    ImageFolderDataset,
    PackedImageDataset,
    _check_packed,
    _decompress,
    _extract_packed,
    _ImageDataset,
    _is_image_file,
    _packed_cache_dir,
    _to_rgb,
    load_hf_split,
    make_image_folder,
    open_packed,
    write_packed,
)
from data.pixel_store import PIXELS_LAYOUT, PixelBatch, PixelStoreDataset, collate_pixels

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


def _pixel_paths(cfg: ImageDataConfig) -> tuple[Path, Path]:
    """(the pixel file, the validation class folder) of ``data.kind=pixels``."""
    if not cfg.root and not (cfg.train and cfg.val):
        raise ValueError("data.root: required for kind='pixels' (or set both data.train and "
                         f"data.val)\n{PIXELS_LAYOUT}")  # fmt: skip
    root = Path(cfg.root).expanduser() if cfg.root else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"data.root={cfg.root!r} is not a directory\n{PIXELS_LAYOUT}")
    train = Path(cfg.train).expanduser() if cfg.train else root / "train.pixels"
    val = Path(cfg.val).expanduser() if cfg.val else root / "val"
    if not val.is_dir():
        raise FileNotFoundError(f"data.kind=pixels: no validation folder {str(val)!r}\n"
                                f"{PIXELS_LAYOUT}")  # fmt: skip
    return train, val


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
    gpu = cfg.decode == "gpu"  # workers hand out the stored bytes: no transforms
    train_tf, val_tf = (None, None) if gpu else build_transforms(cfg)
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
    elif cfg.kind == "pixels":
        train_file, val_dir = _pixel_paths(cfg)
        train = PixelStoreDataset(train_file, train_tf, int(getattr(cfg, "read_threads", 8)))
        val = ImageFolderDataset(val_dir, val_tf)
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
        if gpu:
            ds.use_encoded()
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


class EncodedImages(Sequence):
    """A batch of encoded images: a sequence of uint8 1-D tensors, views of one buffer ``flat``
    split by ``sizes`` (made on first use: the JPEG engines' decoder reads ``flat`` and
    ``sizes`` and never needs them); ``crops``: the batch's images the workers decoded
    (``data.cpu_decode_share``) or None; ``headers``: (H, W, engines) an image for
    ``data.gpu_decoder=nvjpeg``, or None.

    Pickled (worker -> training process) as that buffer and the sizes, so the receiver maps one
    shared-memory tensor, instead of rebuilding a tensor per image (about 40 us each, holding the
    GIL: 10 ms a batch of 256, time the step's thread and a decoding thread would wait for)."""

    def __init__(self, flat: torch.Tensor, sizes, crops: torch.Tensor | None = None,
                 headers: np.ndarray | None = None):  # fmt: skip
        self.flat, self.sizes = flat, [int(n) for n in sizes]
        self.crops, self.headers = crops, headers
        self._views: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def from_flat(cls, flat: torch.Tensor, sizes: list[int], crops=None,
                  headers=None) -> EncodedImages:  # fmt: skip
        return cls(flat, sizes, crops, headers)

    def _split(self) -> tuple[torch.Tensor, ...]:
        if self._views is None:
            self._views = self.flat.split(self.sizes) if self.sizes else ()
        return self._views

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, k):
        return self._split()[k]

    def __iter__(self):
        return iter(self._split())

    def __reduce__(self):
        return (EncodedImages.from_flat, (self.flat, self.sizes, self.crops, self.headers))


class _BytesCollate:
    """(encoded bytes, label) pairs -> (EncodedImages, labels): one block of memory a batch.

    ``share`` > 0 (``data.cpu_decode_share``, training batches): the last ``round(share * B)``
    images are decoded here with PIL and random-resize-cropped (:func:`crop_decode_pil`); they
    ride along as ``images.crops``, uint8 (k, S, S, 3), and the labels keep the batch's order.
    Their crop draws come from (seed, rank, epoch, batch) when the batch sampler gives that key
    (:class:`KeyedBatch`, as the trainer's loader does), so a resumed run crops them again
    alike whatever the workers; otherwise from the worker's own seed."""

    def __init__(self, share: float = 0.0, img_size: int = 224, seed: int = 0, rank: int = 0,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), headers: bool = False):  # fmt: skip
        self.share, self.img_size, self.headers = float(share), int(img_size), bool(headers)
        self.seed, self.rank = int(seed) % 2**63, int(rank)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self._rng: tuple[int, np.random.Generator] | None = None  # unkeyed: (process seed, rng)

    def _draws(self, key) -> np.random.Generator:
        if key is not None:
            return np.random.default_rng([self.seed, self.rank, *map(int, key), 0x435055])
        seed = torch.initial_seed()  # per worker (and per loader iterator)
        if self._rng is None or self._rng[0] != seed:
            self._rng = (seed, np.random.default_rng([self.seed, self.rank, seed, 0x435055]))
        return self._rng[1]

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[list, torch.Tensor]:
        k = round(self.share * len(batch))
        data = [b for b, _ in batch[: len(batch) - k]]
        flat = torch.cat(data) if data else torch.empty(0, dtype=torch.uint8)
        images = EncodedImages.from_flat(flat, [d.numel() for d in data])
        if self.headers:  # data.gpu_decoder=nvjpeg: sizes and formats read here, not there
            from .nvjpeg_decode import headers

            images.headers = headers(data)
        if k:
            rng = self._draws(getattr(batch, "key", None))
            images.crops = crop_decode_pil([b for b, _ in batch[-k:]], rng, self.img_size,
                                           self.scale, self.ratio)  # fmt: skip
        return images, torch.tensor([label for _, label in batch], dtype=torch.int64)


class KeyedBatch(list):
    """A batch of sample indices with ``key`` = (epoch, batch within the epoch): what the
    trainer's batch sampler yields, so that work done in the workers can be seeded per batch."""

    key: tuple[int, int] | None = None

    @classmethod
    def of(cls, indices, key: tuple[int, int]) -> KeyedBatch:
        out = cls(indices)
        out.key = (int(key[0]), int(key[1]))
        return out


class _KeyedItems(torch.utils.data.Dataset):
    """``dataset`` whose batch fetch (``__getitems__``) keeps the batch sampler's ``key``."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, indices) -> KeyedBatch:
        out = KeyedBatch(self.dataset[i] for i in indices)
        out.key = getattr(indices, "key", None)
        return out

    def __getattr__(self, name: str):  # num_classes, classes, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def crop_decode_pil(data: list[torch.Tensor], rng: np.random.Generator, size: int,
                    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:  # fmt: skip
    """Encoded images -> uint8 (k, size, size, 3): decoded with PIL (RGB) and cropped as timm's
    RandomResizedCropAndInterpolation does (the crop, then PIL's bicubic resize), the crop boxes
    from ``crop_params`` with uniform draws from ``rng``."""
    import io

    from PIL import Image

    ims = [Image.open(io.BytesIO(d.numpy().tobytes())) for d in data]
    hw = np.array([(im.height, im.width) for im in ims], dtype=np.int64).reshape(-1, 2)
    u = rng.random((len(ims), 2 * CROP_TRIES + 2))
    top, left, ch, cw = crop_params(hw[:, 0], hw[:, 1], u, scale, ratio)
    out = np.empty((len(ims), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(ims):
        with im:
            box = (int(left[i]), int(top[i]), int(left[i] + cw[i]), int(top[i] + ch[i]))
            crop = im.convert("RGB").crop(box).resize((size, size), Image.BICUBIC)
            out[i] = np.asarray(crop)
    return torch.from_numpy(out)


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
    channels_last if cfg.channels_last, labels int64 (B,)) on CPU: see ``to_device``; with
    ``cfg.decode="gpu"`` (list of encoded uint8 1-D tensors, labels), for ``to_device``'s
    ``decode``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_rank(rank, world)
    if cfg.kind == "synthetic":
        check_image_config(cfg)
        classes = int(cfg.num_classes)
        mk = lambda n, s: SyntheticImages(batch_size, cfg.img_size, classes, n,  # noqa: E731
                                          seed * 1000 + rank * 10 + s, bool(cfg.channels_last),
                                          uint8=bool(cfg.device_normalize))  # fmt: skip
        return mk(int(cfg.synthetic_batches), 0), mk(2, 1), classes, build_mixup(cfg, classes)
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
    gpu = cfg.decode == "gpu"  # byte batches: the decoders read host memory, no pinning
    nvjpeg = gpu and getattr(cfg, "gpu_decoder", "torchvision") == "nvjpeg"
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": bool(cfg.pin_memory) and torch.cuda.is_available() and not gpu,
        "collate_fn": _BytesCollate(headers=nvjpeg) if gpu else _Collate(bool(cfg.channels_last)),
    }
    train_collate = common["collate_fn"]
    if gpu and float(cfg.cpu_decode_share) > 0:  # the workers decode a share of each batch
        train_collate = _BytesCollate(cfg.cpu_decode_share, cfg.img_size, seed, rank,
                                      headers=nvjpeg)  # fmt: skip
        train = _KeyedItems(train)
    if workers > 0:
        common["persistent_workers"] = bool(cfg.persistent_workers)
    generator = torch.Generator()
    generator.manual_seed(_loader_seed(seed, rank))
    train_kw = {**common, "collate_fn": train_collate}
    if gpu and cfg.kind == "pixels":  # threads of this process read whole batches, pinned
        train.pin = True  # (read_batch pins only where CUDA is available)
        train_kw = {"num_workers": 0, "collate_fn": collate_pixels}
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=True,
                              generator=generator, **train_kw)  # fmt: skip
    val_sampler = ShardSampler(len(val), rank, world, shuffle=False, pad=False)
    val_loader = DataLoader(val, batch_size=batch_size, sampler=val_sampler, **common)
    return train_loader, val_loader, train.num_classes, build_mixup(cfg, train.num_classes)


class _NoSampler:
    def set_epoch(self, epoch: int) -> None:
        pass


class SyntheticImages:
    """``data.kind=synthetic``: ``n`` batches per epoch of one fixed batch of random images
    (N(0, 1) after normalisation) and labels, made once on the GPU when there is one (else
    the CPU) and handed out as device-side copies (mixing works in place): a loader that
    costs next to nothing, for measuring a model's training speed apart from decoding,
    augmentation and host-to-device copies. Accuracy on it means nothing. Interface of the
    epoch loaders: ``len``, iteration, ``sampler.set_epoch``, ``skip(k)`` for resuming
    mid-epoch."""

    def __init__(self, batch: int, size: int, classes: int, n: int, seed: int,
                 channels_last: bool = True, start: int = 0, uint8: bool = False):  # fmt: skip
        self.batch, self.size, self.classes, self.n, self.seed = batch, size, classes, n, seed
        self.channels_last, self.start, self.uint8 = channels_last, start, uint8
        self.sampler, self._data = _NoSampler(), None

    def _make(self):
        dev = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else "cpu"
        )
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.batch, 3, self.size, self.size)
        if self.uint8:  # as the image loaders hand out with data.device_normalize
            images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        else:
            images = torch.randn(shape, generator=g)
        labels = torch.randint(0, self.classes, (self.batch,), generator=g)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.to(dev, memory_format=fmt), labels.to(dev)

    def __iter__(self):
        if self._data is None:
            self._data = self._make()
        images, labels = self._data
        for _ in range(self.n - self.start):
            # float: a copy a step (one device-side copy): mixup/cutmix mix the batch in
            # place, and every step should see the same images; uint8: DevicePrep makes the
            # float batch anew each step, so the stored one is never modified
            yield (images if self.uint8 else images.clone(memory_format=torch.preserve_format),
                   labels)  # fmt: skip

    def __len__(self) -> int:
        return self.n - self.start

    def skip(self, batches: int) -> SyntheticImages:
        out = SyntheticImages(self.batch, self.size, self.classes, self.n, self.seed,
                              self.channels_last, start=min(self.n, batches),
                              uint8=self.uint8)  # fmt: skip
        out._data = self._data
        return out


def to_device(
    batch: tuple[torch.Tensor | list[torch.Tensor], torch.Tensor],
    device: torch.device | str,
    channels_last: bool = True,
    prep: DevicePrep | None = None,
    train: bool = False,
    decode: GpuImagePipeline | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move (images, labels) to ``device`` asynchronously (pinned memory), images in
    channels_last when asked (a no-op when the loader already made them so). uint8 images
    (``data.device_normalize``) are then normalised, and for ``train`` randomly erased, by
    ``prep`` (``build_device_prep(cfg)``) on the device. Encoded images (a list, from
    ``data.decode=gpu``) are first decoded and transformed on the device by ``decode``
    (``build_gpu_pipeline(cfg, seed, rank)``)."""
    images, labels = batch
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if isinstance(images, (list, tuple, EncodedImages, PixelBatch)):
        if decode is None:
            raise ValueError(
                "to_device: the loader hands out encoded images (data.decode=gpu); pass "
                "decode=build_gpu_pipeline(data_cfg, seed, rank) to decode them on the device"
            )
        images = decode(images, device, train).to(memory_format=fmt)
        if torch.device(device).type == "cuda":
            labels = labels.pin_memory()
    else:
        images = images.to(device, non_blocking=True, memory_format=fmt)
    if images.dtype == torch.uint8:
        if prep is None:
            raise ValueError(
                "to_device: the loader hands out uint8 images (data.device_normalize=true); "
                "pass prep=build_device_prep(data_cfg) to normalise them on the device"
            )
        images = prep(images, train)
    return images, labels.to(device, non_blocking=True)


__all__ = [
    "FOLDER_LAYOUT",
    "IMAGENET_HF_REPO",
    "IMAGENET_HF_REVISION",
    "IMAGE_EXTENSIONS",
    "IMAGE_KINDS",
    "PACKED_FORMAT",
    "BatchMixup",
    "DevicePrep",
    "DigitsDataset",
    "GpuImagePipeline",
    "HFImageDataset",
    "ImageDataConfig",
    "ImageFolderDataset",
    "KeyedBatch",
    "PIXELS_LAYOUT",
    "PackedImageDataset",
    "PixelBatch",
    "PixelStoreDataset",
    "RepeatAugSampler",
    "ShardSampler",
    "SyntheticImages",
    "build_device_prep",
    "build_gpu_pipeline",
    "build_image_datasets",
    "build_image_loaders",
    "build_mixup",
    "build_transforms",
    "check_image_config",
    "crop_decode_pil",
    "decode_in_process",
    "load_hf_split",
    "make_image_folder",
    "open_packed",
    "to_device",
    "write_packed",
]
