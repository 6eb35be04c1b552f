"""Image augmentation and sampling: timm's transforms, batch mixup/cutmix with soft targets,
and the DDP samplers (``ShardSampler``, ``RepeatAugSampler``). Split out of ``data/images.py``
(its docstring describes them), which re-exports everything here."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.utils.data import Sampler

from data.image_config import ImageDataConfig

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
    """(train, eval) transforms from timm: PIL image -> CHW tensor.

    Train: random-resized crop (bicubic), flip, RandAugment ``auto_augment``, random erasing
    (``re_prob``, per-pixel noise). Eval: resize to ``img_size / crop_pct``, center crop.
    RandAugment's posterize is patched to work at full strength with current Pillow.
    With ``cfg.device_normalize`` (the default) the output is the uint8 crop and the
    normalisation and random erasing are left to :class:`DevicePrep` on the training device;
    otherwise it is the normalised float tensor with erasing done here.
    """
    from timm.data import create_transform

    common = {"mean": tuple(cfg.mean), "std": tuple(cfg.std),
              "use_prefetcher": bool(cfg.device_normalize)}  # fmt: skip
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


class DevicePrep:
    """The end of the image pipeline, run on the training device over a whole batch: uint8
    images (B, 3, H, W) -> float32 normalised by ``mean``/``std`` (given in [0, 1] units), then
    for training random erasing as timm's (``re_prob`` per image, one rectangle of 2%-1/3 of the
    area with aspect ratio in [0.3, 1/0.3], up to 10 tries for one that fits, filled with
    per-pixel N(0, 1) noise). The memory format is kept.

    Why here and not in the loader workers: a uint8 batch is a quarter of the float one through
    the workers' shared memory, the pinned-memory copy and the host-to-device copy, and the
    float conversion, normalisation and erasing cost the GPU microseconds instead of worker
    time per image (as timm's ``PrefetchLoader``). All draws are on the device (no sync).

    ``fused`` (default: on CUDA): the conversion, normalisation and erasing in one Triton
    launch (``augment_kernels.normalize_erase``: the same values, the same rectangles, noise
    drawn only where it lands) instead of about ten torch kernels that each pass over the
    float32 batch, a whole-batch noise tensor among them."""

    def __init__(self, mean, std, re_prob: float = 0.0, min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3, tries: int = 10,
                 fused: bool | None = None):  # fmt: skip
        self.fused = fused
        self.mean = torch.tensor([255.0 * m for m in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std]).view(1, 3, 1, 1)
        self.re_prob, self.tries = float(re_prob), int(tries)
        self.area = (float(min_area), float(max_area))
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"DevicePrep: expected uint8 images (B, 3, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        dev = images.device
        if self.mean.device != dev:
            self.mean, self.std = self.mean.to(dev), self.std.to(dev)
        erase = train and self.re_prob > 0
        if dev.type == "cuda" if self.fused is None else self.fused:
            from .augment_kernels import normalize_erase

            boxes = None
            if erase:
                top, left, eh, ew, on = self.rectangles(images.shape[0], *images.shape[2:], dev)
                boxes = torch.stack([top, left, eh * on, ew * on], 1).to(torch.int32)
            return normalize_erase(images, self.mean.view(3), self.std.view(3), boxes)
        x = (images.float() - self.mean) / self.std  # elementwise: memory format kept
        if erase:
            x = self.erase(x)
        return x

    def rectangles(self, b: int, h: int, w: int, dev: torch.device):
        """Each image's erasing draw, as float tensors (top, left, height, width) and the
        bool ``on`` (erased or not), vectorised over images and tries, without a sync."""
        r = torch.rand(b, self.tries, 4, device=dev)
        area = h * w * (self.area[0] + (self.area[1] - self.area[0]) * r[..., 0])
        aspect = torch.exp(
            self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * r[..., 1]
        )
        eh = torch.round(torch.sqrt(area * aspect))
        ew = torch.round(torch.sqrt(area / aspect))
        fits = (eh < h) & (ew < w)
        first = fits.float().argmax(1, keepdim=True)  # first try that fits (0 if none)
        pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
        eh, ew = pick(eh), pick(ew)
        top = torch.floor(pick(r[..., 2]) * (h - eh + 1))  # uniform in [0, h - eh]
        left = torch.floor(pick(r[..., 3]) * (w - ew + 1))
        on = (torch.rand(b, device=dev) < self.re_prob) & fits.any(1)
        return top, left, eh, ew, on

    def erase(self, x: torch.Tensor, masked: bool | None = None) -> torch.Tensor:
        """Random erasing of a normalised batch, vectorised over images and tries. ``masked``
        (default: on CUDA) fills through a whole-batch mask and noise tensor without a host
        sync; else a loop over the erased images fills only their rectangles."""
        b, _, h, w = x.shape
        dev = x.device
        top, left, eh, ew, on = self.rectangles(b, h, w, dev)
        if not (x.is_cuda if masked is None else masked):  # noise for the rectangles only
            for i in torch.nonzero(on).flatten().tolist():
                t, l_, hh, ww = (int(v[i]) for v in (top, left, eh, ew))
                x[i, :, t : t + hh, l_ : l_ + ww] = torch.randn(x.shape[1], hh, ww)
            return x
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + eh).view(-1, 1, 1))
                  & (xs >= left.view(-1, 1, 1)) & (xs < (left + ew).view(-1, 1, 1)))  # fmt: skip
        mask = (inside & on.view(-1, 1, 1)).unsqueeze(1)  # (B, 1, H, W)
        return torch.where(mask, torch.randn_like(x), x)  # noise for all: cheap on the GPU


def build_device_prep(cfg: ImageDataConfig) -> DevicePrep | None:
    """The device-side end of the pipeline when ``cfg.device_normalize`` (else None: the
    loader's batches are already normalised floats)."""
    if not cfg.device_normalize:
        return None
    return DevicePrep(cfg.mean, cfg.std, re_prob=float(cfg.re_prob))


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
