"""Model families as tasks: each supplies a model, batches, ``loss(batch)`` and eval metrics.

The trainer owns everything else (devices, DDP, precision, schedule, checkpoints, logging).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import ops
from data import (
    Ahead,
    KeyedBatch,
    ProcessAhead,
    batch_spec,
    build_device_prep,
    build_gpu_pipeline,
    build_image_loaders,
    build_token_data,
    decode_in_process,
    iter_eval_batches,
    to_device,
)
from models import build_model

from .distributed import DistInfo, all_reduce_sum
from .parallel import is_sharded, max_over_ranks


class LanguageModelTask:
    """Causal language modelling on packed GPT-2 token streams (GPT-2 and LLM families)."""

    def __init__(self, rc, info: DistInfo, *, build_data: bool = True):
        self.rc, self.info = rc, info
        attention = ops.build(rc.attn.name, **rc.attn.options)
        self.model = build_model(rc.model, attention, rc.pos)
        t = rc.trainer
        self.tokens_per_micro = self.units_per_micro = t.micro_batch * t.seq_len
        if build_data:
            self.train_loader, self.val_tokens = build_token_data(
                rc.data,
                batch_size=t.micro_batch,
                seq_len=t.seq_len,
                rank=info.rank,
                world_size=info.world_size,
                seed=rc.seed,
            )

    def next_batch(self):
        x, y = self.train_loader.next_batch()
        dev = self.info.device
        if dev.type == "cuda":  # pinned host memory: the copy overlaps with queued GPU work
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    @staticmethod
    def loss(model, batch) -> torch.Tensor:
        x, y = batch
        return model(x, y)

    unit = "tokens"

    def flops_per_unit(self) -> float:
        return self.model.flops_per_token(self.rc.trainer.seq_len)

    @torch.no_grad()
    def evaluate(self, model, autocast, max_tokens: int, seq_len: int | None = None) -> dict:
        """Mean validation loss and perplexity over up to max_tokens tokens (all ranks)."""
        t = self.rc.trainer
        seq_len = seq_len or t.seq_len
        loss_sum, count = 0.0, 0
        batches = iter_eval_batches(
            self.val_tokens,
            batch_size=t.micro_batch,
            seq_len=seq_len,
            max_tokens=max_tokens,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        idle = 0  # under FSDP every forward is a collective: as many calls on every rank
        if is_sharded(model):
            batches = list(batches)
            idle = max_over_ranks(len(batches), self.info) - len(batches)
        for x, y in batches:
            x, y = x.to(self.info.device), y.to(self.info.device)
            with autocast():
                loss = model(x, y)
            loss_sum += float(loss) * y.numel()
            count += y.numel()
        for _ in range(idle):  # a rank left without windows joins the others' gathers
            with autocast():
                model(torch.zeros(1, 1, dtype=torch.long, device=self.info.device))
        loss_sum, count = all_reduce_sum([loss_sum, float(count)], self.info)
        if count == 0:
            raise ValueError(
                f"validation data has fewer than {seq_len + 1} tokens for one sequence; "
                "give data.val more text or lower trainer.seq_len"
            )
        val_loss = loss_sum / count
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80.0)), "val_tokens": count}


class _EndlessBatches:
    """A DataLoader's batches of one epoch after another, as a batch sampler: epoch ``e``'s
    order after ``sampler.set_epoch(e)``, cut into batches as the loader's own batch sampler
    would, from batch ``skip`` of epoch ``epoch`` on. One loader iterator then serves the whole
    run, so its workers prepare the next epoch's first batches while this epoch's last ones
    train: restarting the iterator each epoch emptied the prefetched queue and left the step
    waiting for the new epoch's first batch, which one worker makes whole."""

    def __init__(self, sampler, batch_size: int, drop_last: bool, epoch: int, skip: int):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        epoch, skip, bs = self.epoch, self.skip, self.batch_size
        while True:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            n = len(order) // bs if self.drop_last else -(-len(order) // bs)
            if n == 0:
                raise ValueError(f"an epoch of {len(order)} samples has no batch of {bs}")
            for b in range(skip, n):  # keyed: the workers may seed work per batch
                yield KeyedBatch.of(order[b * bs : (b + 1) * bs], (epoch, b))
            epoch, skip = epoch + 1, 0


class _Epochs:
    """Endless batches from an epoch-based loader, with a resumable position (epoch, batch):
    each epoch reshuffles through ``sampler.set_epoch``; resuming starts at the batch after the
    last one consumed, so a resumed run sees the same samples in the same order (and, with
    ``data.num_workers=0``, the same augmentations; worker processes draw theirs from seeds
    taken when the loader's iterator starts, at the start or the resumption of a run). A
    DataLoader is iterated as one iterator over all epochs (``_EndlessBatches``), other loaders
    (``data.kind=synthetic``) epoch by epoch. ``augment``: a device-side pipeline with its own
    ``state_dict`` (data.decode=gpu), saved and restored with the position, so its
    augmentations resume exactly whatever the workers."""

    def __init__(self, loader, augment=None):
        self.loader, self.epoch, self.batch, self._it = loader, 0, 0, None
        self.augment = augment
        self._endless = isinstance(loader, DataLoader)

    def next_batch(self):
        while True:
            if self._it is None:
                # a DataLoader draws a base seed per iterator, from the global RNG unless it
                # has a generator: keep that draw out of the checkpointed RNG stream
                own = getattr(self.loader, "generator", None) is not None
                rng = None if own else torch.random.get_rng_state()
                self._it = iter(self._all_epochs() if self._endless else self._one_epoch())
                if rng is not None:
                    torch.random.set_rng_state(rng)
            if self._endless and self.batch >= len(self.loader):  # the iterator moved on
                self.epoch, self.batch = self.epoch + 1, 0
            try:
                out = next(self._it)
                self.batch += 1
                return out
            except StopIteration:
                self._it, self.epoch, self.batch = None, self.epoch + 1, 0

    def _all_epochs(self):
        """All epochs from the current position, through the loader's dataset, workers and
        collation (``_EndlessBatches``; a position after an epoch's last batch starts the next
        epoch, and ``next_batch`` moves the counters on)."""
        ld = self.loader
        kw = {"prefetch_factor": ld.prefetch_factor} if ld.num_workers else {}
        batches = _EndlessBatches(ld.sampler, ld.batch_size, ld.drop_last, self.epoch, self.batch)
        return DataLoader(ld.dataset, batch_sampler=batches, num_workers=ld.num_workers,
                          collate_fn=ld.collate_fn, pin_memory=ld.pin_memory,
                          worker_init_fn=ld.worker_init_fn, generator=ld.generator,
                          persistent_workers=False, **kw)  # fmt: skip

    def _one_epoch(self):
        """This epoch's batches from the current one on (loaders that skip by themselves)."""
        self.loader.sampler.set_epoch(self.epoch)
        if not self.batch:
            return self.loader
        return self.loader.skip(self.batch)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "batch": self.batch}
        if self.augment is not None:
            state["augment"] = self.augment.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self._it = int(state["epoch"]), int(state["batch"]), None
        if self.augment is not None and "augment" in state:
            self.augment.load_state_dict(state["augment"])


def _decode_stage(decode, dev, batch):
    """data.decode=gpu, first stage: encoded batch -> (Decoded, labels still on the host).
    The labels move in the second stage: the first stage's thread bounds the loader, and
    pinning them here took a tenth of its time (EfficientViT-M0 on an H100,
    docs/benchmarks.md)."""
    images, labels = batch
    return decode.decode(images, dev, train=True), labels


def _augment_stage(decode, batch):
    """data.decode=gpu, second stage: -> (uint8 images, labels) on the device."""
    decoded, labels = batch
    x = decode.augment(decoded)
    if x.is_cuda and not labels.is_cuda:
        labels = labels.pin_memory()
    return x, labels.to(x.device, non_blocking=True)


class _Inline:
    """A source's batches through ``transform`` in the caller's thread (``Ahead``'s interface)."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def next_batch(self):
        return self.transform(self.source.next_batch())

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)

    def __len__(self) -> int:
        return len(self.source)


def _decoded(epochs, decode, dev, ahead: int):
    """``epochs``' encoded batches as (uint8 images, labels) on ``dev``: decoded and augmented
    by two threads ``ahead`` batches ahead, or in the caller's thread for ``ahead=0``."""
    dev = torch.device(dev)
    first = functools.partial(_decode_stage, decode, dev)
    second = functools.partial(_augment_stage, decode)
    if ahead:
        return Ahead(Ahead(epochs, first, dev, ahead, name="decode-ahead"), second, dev, ahead,
                     name="augment-ahead")  # fmt: skip
    return _Inline(epochs, lambda batch: second(first(batch)))


def _gpu_train_source(rc, rank: int, world: int, device: str):
    """data.decode_process: the child process's source, built there from the config: this
    rank's train batches (loader and workers of its own), decoded and augmented on the device
    as in the trainer's own process, resumable at the same positions."""
    dev = torch.device(device)
    loader, *_ = _image_loaders(rc, rank, world)
    decode = build_gpu_pipeline(rc.data, seed=rc.seed, rank=rank)
    return _decoded(_Epochs(loader, augment=decode), decode, dev, int(rc.data.decode_ahead))


def _gpu_train_spec(rc) -> tuple:
    """The layout of ``_gpu_train_source``'s batches (uint8 images in the pipeline's memory
    format, int64 labels), for the child's shared slots, made before its threads start."""
    b, s = int(rc.trainer.micro_batch), int(rc.data.img_size)
    fmt = torch.channels_last if rc.data.channels_last else torch.contiguous_format
    images = torch.empty((b, 3, s, s), dtype=torch.uint8, device="meta", memory_format=fmt)
    return batch_spec((images, torch.empty(b, dtype=torch.int64, device="meta")))


def _image_loaders(rc, rank: int, world: int):
    """The loaders of this rank (one definition for the trainer and decode_process's child:
    both must draw the same batches)."""
    return build_image_loaders(rc.data, rc.trainer.micro_batch, rank=rank, world=world,
                               seed=rc.seed)  # fmt: skip


class ClassificationTask:
    """Image classification (EfficientViT family): timm-style augmentation and mixing, soft-
    target cross-entropy, top-1 / top-5 evaluation over the whole validation set."""

    unit = "images"

    def __init__(self, rc, info: DistInfo, *, build_data: bool = True):
        self.rc, self.info = rc, info
        attention = ops.build(rc.attn.name, **rc.attn.options)
        self.model = build_model(rc.model, attention, rc.pos)
        t = rc.trainer
        self.units_per_micro = t.micro_batch
        self.mixup = None
        self.prep = build_device_prep(rc.data)  # None: batches arrive normalised
        # data.decode=gpu: decode + crop/flip/RandAugment on the device (else None)
        self.decode = build_gpu_pipeline(rc.data, seed=rc.seed, rank=info.rank)
        if build_data:
            loader, self.val_loader, n_classes, self.mixup = _image_loaders(
                rc, info.rank, info.world_size
            )
            if n_classes != rc.model.num_classes:
                raise ValueError(
                    f"data '{rc.data.name}' has {n_classes} classes but model.num_classes="
                    f"{rc.model.num_classes}; set model.num_classes={n_classes}"
                )
            if rc.data.img_size != rc.model.img_size:
                raise ValueError(
                    f"data.img_size={rc.data.img_size} differs from model.img_size="
                    f"{rc.model.img_size}; set both to the same size"
                )
            self.train_loader = _Epochs(loader, augment=self.decode)
            ahead = int(rc.data.decode_ahead)
            own = decode_in_process(rc.data, info.device, step_graph=rc.trainer.step_graph)
            if self.decode is not None and own:  # the pipeline in a process of its own
                factory = functools.partial(_gpu_train_source, rc, info.rank, info.world_size,
                                            str(info.device))  # fmt: skip
                self.train_loader = ProcessAhead(
                    factory, info.device, max(1, ahead), length=len(self.train_loader),
                    state=self.train_loader.state_dict(), spec=_gpu_train_spec(rc),
                )  # fmt: skip
            elif self.decode is not None:  # two threads while the step runs (0: in the loop)
                self.train_loader = _decoded(self.train_loader, self.decode, info.device, ahead)

    def next_batch(self):
        images, labels = to_device(
            self.train_loader.next_batch(), self.info.device, self.rc.data.channels_last,
            self.prep, train=True, decode=self.decode,
        )  # fmt: skip
        if self.mixup is not None:
            return self.mixup(images, labels)  # soft targets (B, classes), rows sum to one
        return images, labels

    def loss(self, model, batch) -> torch.Tensor:
        images, targets = batch
        logits = model(images).float()
        if targets.dim() == 2:  # mixed / smoothed targets
            return torch.sum(-targets * torch.log_softmax(logits, -1), -1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.rc.data.label_smoothing)

    def flops_per_unit(self) -> float:
        """Training FLOPs per image: 3x the forward (forward + backward)."""
        return 3.0 * self.model.flops_per_image()

    def evaluate(self, model, autocast, max_units: int | None = None, **_) -> dict:
        """Loss, top-1 and top-5 accuracy (%) over the whole validation set (all ranks)."""
        return evaluate_classifier(
            model, self.val_loader, self.info, autocast, self.rc.data.channels_last,
            what=f"data '{self.rc.data.name}'", prep=self.prep, decode=self.decode,
        )  # fmt: skip


@torch.no_grad()
def evaluate_classifier(model, loader, info: DistInfo, autocast, channels_last: bool = True,
                        what: str = "the data", prep=None, decode=None) -> dict:  # fmt: skip
    """Mean loss, top-1 and top-5 accuracy (%) of ``model`` over ``loader``, summed over ranks
    (each rank holds its own shard of the validation set). ``prep``: the data's
    ``build_device_prep`` when the loader hands out uint8 images; ``decode``: its
    ``build_gpu_pipeline`` when it hands out encoded ones (data.decode=gpu)."""
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    for batch in loader:
        images, labels = to_device(batch, info.device, channels_last, prep, decode=decode)
        with autocast():
            logits = model(images).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        hit = logits.topk(min(5, logits.shape[-1]), -1).indices == labels[:, None]
        top1 += float(hit[:, 0].sum())
        top5 += float(hit.any(-1).sum())
        count += labels.numel()
    model.train(was_training)
    loss_sum, top1, top5, count = all_reduce_sum([loss_sum, top1, top5, count], info)
    if count == 0:
        raise ValueError(f"the validation set of {what} is empty")
    return {"val_loss": loss_sum / count, "val_acc1": 100.0 * top1 / count,
            "val_acc5": 100.0 * top5 / count, "val_images": int(count)}  # fmt: skip


TASKS = {"gpt2": LanguageModelTask, "llm": LanguageModelTask, "efficientvit": ClassificationTask}


def build_task(rc, info: DistInfo, **kw):
    return TASKS[rc.model.family](rc, info, **kw)
