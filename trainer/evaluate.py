"""Evaluation of a checkpoint: perplexity at several context lengths, HellaSwag accuracy;
``eval.task=long_ppl`` (long documents, exact vs approximate attention) is in ``long_eval``."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import ops
from data import (
    ImageDataConfig,
    TokenDataConfig,
    build_device_prep,
    build_gpu_pipeline,
    build_image_loaders,
    build_token_data,
    gpt2_encoding,
    iter_eval_batches,
)
from models import build_model

from . import checkpoint as ckpt_lib
from . import config as config_lib
from .distributed import setup
from .long_eval import run_long_eval
from .loop import autocast_factory
from .tasks import evaluate_classifier


def load_model(path, device) -> tuple[torch.nn.Module, config_lib.RunConfig, dict]:
    """Rebuild the model a checkpoint was trained with and load its weights."""
    ckpt = ckpt_lib.load(path)
    if "model" not in ckpt or "config" not in ckpt:
        raise ValueError(
            f"{path} is not a training checkpoint of this repository (no model/config)"
        )
    rc = config_lib.load(ckpt["config"])
    model = build_model(rc.model, ops.build(rc.attn.name, **rc.attn.options), rc.pos)
    ckpt_lib.check_compatible(model, ckpt, path)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), rc, ckpt


@torch.no_grad()
def perplexity(model, tokens, *, seq_len, batch_size, max_tokens, device, autocast) -> dict:
    """Mean next-token loss over non-overlapping windows of seq_len tokens."""
    loss_sum, count = 0.0, 0
    for x, y in iter_eval_batches(
        tokens, batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens, rank=0, world_size=1
    ):
        with autocast():
            loss = model(x.to(device), y.to(device))
        loss_sum += float(loss) * y.numel()
        count += y.numel()
    if count == 0:
        raise ValueError(f"validation data is shorter than one window of {seq_len + 1} tokens")
    loss = loss_sum / count
    return {"loss": loss, "ppl": math.exp(min(loss, 80.0)), "tokens": count}


def _hellaswag_rows(example: dict, enc) -> tuple[list[list[int]], list[int]]:
    ctx = enc.encode_ordinary(example["ctx"])
    rows, starts = [], []
    for ending in example["endings"]:
        rows.append(ctx + enc.encode_ordinary(" " + ending))
        starts.append(len(ctx))
    return rows, starts


@torch.no_grad()
def hellaswag(model, path, *, device, autocast, max_len: int | None, limit=None) -> dict:
    """Completion-style HellaSwag: acc (sum of ending loss) and acc_norm (mean per token)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval.hellaswag: {path} does not exist (hellaswag_val.jsonl)")
    enc = gpt2_encoding()
    n = correct = correct_norm = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            ex = json.loads(line)
            rows, starts = _hellaswag_rows(ex, enc)
            if max_len is not None:  # keep the end of over-long rows (the ending matters)
                cut = [max(0, len(r) - max_len) for r in rows]
                rows = [r[c:] for r, c in zip(rows, cut)]
                starts = [max(1, s - c) for s, c in zip(starts, cut)]
            width = max(map(len, rows))
            idx = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width - 1)
            for i, (r, s) in enumerate(zip(rows, starts)):
                idx[i, : len(r)] = torch.tensor(r)
                mask[i, s - 1 : len(r) - 1] = 1.0  # predictions of the ending tokens
            with autocast():
                logits = model(idx.to(device))
            tok_loss = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), idx[:, 1:].to(device), reduction="none"
            ).cpu()
            sums = (tok_loss * mask).sum(1)
            means = sums / mask.sum(1)
            label = int(ex["label"])
            correct += int(sums.argmin()) == label
            correct_norm += int(means.argmin()) == label
            n += 1
            if limit and n >= limit:
                break
    if n == 0:
        raise ValueError(f"eval.hellaswag: {path} holds no examples")
    return {"acc": correct / n, "acc_norm": correct_norm / n, "examples": n}


def _check_ppl_config(cfg) -> None:
    """eval.task=ppl (and image models) score a checkpoint as it was trained."""
    task = cfg.eval.get("task") or "ppl"
    if task != "ppl":
        raise ValueError(f"eval.task={task!r}; valid: ppl (with eval.hellaswag), long_ppl")
    for key in ("model", "attn"):
        if cfg.get(key) is not None:
            raise ValueError(f"{key}= is read by eval.task=long_ppl only; eval.task=ppl scores "
                             "the checkpoint as it was trained")  # fmt: skip
    if not cfg.get("ckpt"):
        raise ValueError(
            "ckpt=PATH is required: a training checkpoint (runs/<run>/checkpoints/last.pt)"
        )


def run_eval(cfg) -> dict:
    """Entry point of eval.py: returns and writes the results JSON, prints a table."""
    e = cfg.eval
    if e.get("task") == "long_ppl":
        return run_long_eval(cfg)
    _check_ppl_config(cfg)
    info = setup(e.device)
    model, rc, ckpt = load_model(cfg.ckpt, info.device)
    if rc.model.family == "efficientvit":
        return _run_image_eval(cfg, info, model, rc, ckpt)
    if cfg.get("data") is not None:
        node = OmegaConf.merge(OmegaConf.structured(TokenDataConfig), cfg.data)
        rc.data = OmegaConf.to_object(node)
    seq_lens = list(e.seq_lens) if e.seq_lens else [rc.trainer.seq_len]
    if rc.pos.name == "learned" and max(seq_lens) > rc.model.max_seq_len:
        raise ValueError(
            f"eval.seq_lens={seq_lens} exceeds what pos=learned allows (model.max_seq_len="
            f"{rc.model.max_seq_len}); use lengths <= {rc.model.max_seq_len}"
        )
    autocast = autocast_factory(e.precision, info.device)
    _, val = build_token_data(
        rc.data, batch_size=1, seq_len=min(seq_lens), rank=0, world_size=1, seed=rc.seed
    )
    results = {
        "ckpt": str(cfg.ckpt),
        "step": ckpt.get("step"),
        "model": rc.model.name,
        "pos": rc.pos.name,
        "attn": rc.attn.name,
        "data": rc.data.name,
        "perplexity": {},
    }
    for L in seq_lens:
        r = perplexity(
            model,
            val,
            seq_len=L,
            batch_size=e.batch_size,
            max_tokens=e.max_tokens,
            device=info.device,
            autocast=autocast,
        )
        results["perplexity"][str(L)] = r
    if e.hellaswag:
        max_len = rc.model.max_seq_len if rc.pos.name == "learned" else None
        results["hellaswag"] = hellaswag(
            model,
            e.hellaswag,
            device=info.device,
            autocast=autocast,
            max_len=max_len,
            limit=e.hellaswag_limit,
        )
    out = Path(e.out) if e.out else Path(cfg.ckpt).resolve().parent.parent / "eval.json"
    out.write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"wrote {out}")
    return results


def _run_image_eval(cfg, info, model, rc, ckpt) -> dict:
    """Image classifiers: top-1, top-5 and loss on the validation set, for the raw weights and
    (when the checkpoint holds one) the EMA, with parameter count and image size, as timm's
    validate reports them."""
    e = cfg.eval
    if cfg.get("data") is not None:
        rc.data = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(ImageDataConfig), cfg.data)
        )
    rc.data.img_size = rc.model.img_size  # evaluate at the size the model was built for
    _, val, n_classes, _ = build_image_loaders(rc.data, int(e.batch_size), rank=0, world=1)
    if n_classes != rc.model.num_classes:
        raise ValueError(
            f"data '{rc.data.name}' has {n_classes} classes; the checkpoint's model has "
            f"{rc.model.num_classes}"
        )
    autocast = autocast_factory(e.precision, info.device)
    results = {
        "ckpt": str(cfg.ckpt),
        "step": ckpt.get("step"),
        "model": rc.model.name,
        "attn": rc.attn.name,
        "data": rc.data.name,
        "img_size": rc.model.img_size,
        "param_count": sum(p.numel() for p in model.parameters()),
        "weights": {},
    }
    prep, decode = build_device_prep(rc.data), build_gpu_pipeline(rc.data)
    results["weights"]["raw"] = evaluate_classifier(model, val, info, autocast, what=rc.data.name,
                                                    prep=prep, decode=decode)  # fmt: skip
    if "ema" in ckpt:
        ema = copy.deepcopy(model)
        ema.load_state_dict(ckpt["ema"])
        results["weights"]["ema"] = evaluate_classifier(ema, val, info, autocast,
                                                        what=rc.data.name, prep=prep,
                                                        decode=decode)  # fmt: skip
    out = Path(e.out) if e.out else Path(cfg.ckpt).resolve().parent.parent / "eval.json"
    out.write_text(json.dumps(results, indent=2))
    print(format_image_table(results))
    print(f"wrote {out}")
    return results


def format_image_table(results: dict) -> str:
    lines = [
        f"{results['model']} attn={results['attn']} step={results['step']} data={results['data']}"
        f" | {results['param_count'] / 1e6:.2f}M params | {results['img_size']}px",
        f"{'weights':>8} | {'top-1':>7} | {'top-5':>7} | {'loss':>7} | {'images':>7}",
        "-" * 50,
    ]
    for name, r in results["weights"].items():
        lines.append(
            f"{name:>8} | {r['val_acc1']:7.2f} | {r['val_acc5']:7.2f} | {r['val_loss']:7.4f} | "
            f"{r['val_images']:7d}"
        )
    return "\n".join(lines)


def format_table(results: dict) -> str:
    lines = [
        f"{results['model']} pos={results['pos']} attn={results['attn']} step={results['step']} data={results['data']}",
        f"{'context':>8} | {'val loss':>8} | {'ppl':>10} | {'tokens':>9}",
        "-" * 45,
    ]
    for L, r in results["perplexity"].items():
        lines.append(f"{L:>8} | {r['loss']:8.4f} | {r['ppl']:10.3f} | {r['tokens']:9d}")
    if "hellaswag" in results:
        h = results["hellaswag"]
        lines.append(
            f"HellaSwag ({h['examples']} examples): acc {h['acc']:.4f}  acc_norm {h['acc_norm']:.4f}"
        )
    return "\n".join(lines)
