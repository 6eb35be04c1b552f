"""Model families as tasks: each supplies a model, batches, ``loss(batch)`` and eval metrics.

The trainer owns everything else (devices, DDP, precision, schedule, checkpoints, logging).
"""

from __future__ import annotations

import math

import torch

import ops
from data import build_token_data, iter_eval_batches
from models import build_model

from .distributed import DistInfo, all_reduce_sum


class LanguageModelTask:
    """Causal language modelling on packed GPT-2 token streams (GPT-2 family)."""

    def __init__(self, rc, info: DistInfo, *, build_data: bool = True):
        self.rc, self.info = rc, info
        attention = ops.build(rc.attn.name, **rc.attn.options)
        self.model = build_model(rc.model, attention, rc.pos)
        t = rc.trainer
        self.tokens_per_micro = t.micro_batch * t.seq_len
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

    def flops_per_token(self) -> float:
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
        for x, y in batches:
            x, y = x.to(self.info.device), y.to(self.info.device)
            with autocast():
                loss = model(x, y)
            loss_sum += float(loss) * y.numel()
            count += y.numel()
        loss_sum, count = all_reduce_sum([loss_sum, float(count)], self.info)
        if count == 0:
            raise ValueError(
                f"validation data has fewer than {seq_len + 1} tokens for one sequence; "
                "give data.val more text or lower trainer.seq_len"
            )
        val_loss = loss_sum / count
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80.0)), "val_tokens": count}


TASKS = {"gpt2": LanguageModelTask}


def build_task(rc, info: DistInfo, **kw):
    return TASKS[rc.model.family](rc, info, **kw)
