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
