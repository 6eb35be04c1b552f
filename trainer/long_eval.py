"""Long-context perplexity against context length (``eval.task=long_ppl``), exact and approximate
attention on the same weights, in one table.

What is scored. Documents with at least S = ``eval.doc_tokens`` tokens (default: the longest
context asked for) are kept; shorter ones are skipped and counted. Each document is read as
``[EOT] + its first S tokens`` and, at context L, cut into S // L non-overlapping windows, one
forward each at batch 1. Every length that divides S thus scores *the same S predictions* of
every document, so the curve over L measures only what more context buys (non-overlapping
windows over whole books would score different tokens at each L; sliding windows would cost
L / stride forwards per window). The loss is averaged over tokens; the loss of the last quarter
of each window's positions (predictions that see at least 3L/4 tokens) is reported apart: that
is where long context helps. ``loss_by_quarter`` has all four quarters.

What is compared. The model as trained (its own attention: the checkpoint's ``attn`` and
``model.swap_layers``; for a pretrained transformers model without a checkpoint, transformers'
own attention) and, with ``attn=<backend>`` on the command line, the same weights with that
backend on ``eval.swap_layers`` (``all``, ``last:<l>``, ``last_half``, ``[i, ...]``; null: the
model's ``model.swap_layers``). GPT-2 has one backend for all layers.

Memory grows linearly with L: batch 1, attention through the backends (sdpa / flash / hyper form
nothing N x N), and the LM head is swapped for ``ChunkedNLL`` during the forward, which returns
per-token losses computed from fp32 logits a few thousand rows at a time, so (L x vocab) logits
are never held (the models return either all logits or only the mean loss). Peak CUDA memory per
length is reported. Our LLM's RoPE computes angles for any position; GPT-2 with learned
positions has ``model.max_seq_len`` rows and refuses longer contexts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

import ops
from data import (
    LONG_KINDS,
    LongDocConfig,
    TokenDataConfig,
    iter_long_documents,
    long_windows,
    select_long_documents,
    validation_documents,
)
from models import GPT2, LLM, HFCausalLM, LLMConfig, PosConfig, build_model
from models.llm import parse_swap_layers

from . import checkpoint as ckpt_lib
from . import config as config_lib
from .distributed import setup
from .loop import autocast_factory

PLAIN_HF_HEADS = ("llama", "mistral", "qwen2", "qwen3")  # transformers types: logits = lm_head(h)
HEAD_CHUNK_BYTES = 256 * 2**20  # fp32 logits held at once by ChunkedNLL


@dataclasses.dataclass
class ModelSource:
    """What every variant is built from: model/pos config, the model's own attention, the
    weights (None: the pretrained ``model.hf_name``), the training data config, and facts for
    the report (checkpoint, step, training context)."""

    model: Any
    pos: PosConfig
    attn: config_lib.AttnConfig
    state: dict | None
    data: Any
    meta: dict


@dataclasses.dataclass
class Variant:
    key: str  # "own" | "override"
    label: str
    attn: config_lib.AttnConfig
    model: Any  # the model config, swap_layers set for this variant


# ----------------------------------------------------------------------------- configuration


def load_source(cfg) -> ModelSource:
    """A training checkpoint (``ckpt=``), or a pretrained transformers causal LM
    (``model=llm_hf model.hf_name=PATH``, no checkpoint)."""
    if cfg.get("ckpt"):
        if cfg.get("model") is not None:
            raise ValueError("give ckpt=PATH or model=llm_hf model.hf_name=..., not both")
        ckpt = ckpt_lib.load(cfg.ckpt)
        if "model" not in ckpt or "config" not in ckpt:
            raise ValueError(f"{cfg.ckpt} is not a training checkpoint of this repository")
        rc = config_lib.load(ckpt["config"])
        if rc.model.family == "efficientvit":
            raise ValueError("eval.task=long_ppl is for language models; got an image model")
        meta = {"ckpt": str(cfg.ckpt), "step": ckpt.get("step"),
                "train_seq_len": rc.trainer.seq_len}  # fmt: skip
        return ModelSource(rc.model, rc.pos, rc.attn, ckpt["model"], rc.data, meta)
    node = cfg.get("model")
    if node is None or not node.get("hf_name"):
        raise ValueError(
            "eval.task=long_ppl needs ckpt=PATH (a training checkpoint) or model=llm_hf "
            "model.hf_name=PATH (a pretrained transformers causal LM)"
        )
    model = config_lib._typed("model", LLMConfig, node)
    meta = {"ckpt": None, "step": None, "hf_name": model.hf_name, "train_seq_len": None}
    return ModelSource(model, PosConfig(name="rope"), config_lib.AttnConfig(), None, None, meta)


def _n_layers(model_cfg) -> int:
    if getattr(model_cfg, "hf_name", None):
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(model_cfg.hf_name).num_hidden_layers)
    return int(model_cfg.n_layer)


def _swap_spec(model_cfg, spec) -> Any:
    """``eval.swap_layers`` checked against the model; ``last_half`` made ``last:<n/2>``."""
    spec = given = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    if not hasattr(model_cfg, "swap_layers"):  # GPT-2: one backend for every layer
        if spec not in (None, "all"):
            raise ValueError(f"eval.swap_layers={spec!r}: GPT-2 runs one backend on all layers")
        return None
    if spec is None:
        return model_cfg.swap_layers
    n = _n_layers(model_cfg)
    if spec == "last_half":
        if n < 2:
            raise ValueError("eval.swap_layers=last_half needs a model of at least 2 layers")
        spec = f"last:{n // 2}"
    try:
        parse_swap_layers(spec, n)
    except ValueError as e:
        raise ValueError(f"eval.swap_layers={given!r}: {e}") from None
    return spec


def make_variants(cfg, src: ModelSource) -> list[Variant]:
    """The model as trained, and the ``attn=`` override when given (options checked now, before
    any document is read)."""
    own = src.model
    if src.state is None:  # pretrained HF model: its own attention on every layer
        own = dataclasses.replace(src.model, swap_layers="none")
    own_swap = getattr(own, "swap_layers", "all")
    if src.state is None:
        label = "transformers' own"
    elif own_swap == "all":
        label = src.attn.name
    else:
        label = f"{src.attn.name} on {own_swap}"  # sdpa on the other layers
    out = [Variant("own", label, src.attn, own)]
    swap = cfg.eval.get("swap_layers")
    if cfg.get("attn") is None:
        if swap is not None:
            raise ValueError("eval.swap_layers needs attn=<backend>: the attention to put there")
        return out
    attn = config_lib._typed("attn", config_lib.AttnConfig, cfg.attn)
    ops.build(attn.name, **attn.options)  # an unknown backend or option fails here
    spec = _swap_spec(src.model, swap)
    model = src.model if spec is None else dataclasses.replace(src.model, swap_layers=spec)
    out.append(Variant("override", f"{attn.name} on {spec or 'all'}", attn, model))
    return out


def check_lengths(e, src: ModelSource) -> tuple[list[int], int]:
    """(sorted context lengths, tokens scored per document)."""
    lens = list(e.seq_lens) if e.get("seq_lens") else []
    if not lens or any(not isinstance(n, int) or n < 2 for n in lens):
        raise ValueError(f"eval.seq_lens={lens}: give context lengths >= 2, e.g. [4096,8192]")
    lens = sorted(set(lens))
    max_len = getattr(src.model, "max_seq_len", None)
    if src.pos.name == "learned" and lens[-1] > max_len:
        raise ValueError(
            f"eval.seq_lens={lens}: pos=learned has model.max_seq_len={max_len} position rows "
            f"and cannot score longer contexts; use lengths <= {max_len}, or a model with "
            "rope/carope/sinusoidal/none positions"
        )
    span = e.get("doc_tokens") or lens[-1]
    if span < lens[-1]:
        raise ValueError(f"eval.doc_tokens={span} is below the longest context {lens[-1]}")
    return lens, int(span)


def long_documents(cfg, src: ModelSource, span: int):
    """(documents of >= span tokens, stats, a description): ``data=`` (a long-document source
    of conf/data, or a training corpus whose validation split is used), else the checkpoint's
    own training data's validation split."""
    node = cfg.get("data")
    if node is None and src.data is None:
        raise ValueError(
            "no documents: give data=pg19, data=long_text data.path=DIR, data=long_tokens "
            "data.path=FILE or data=gutenberg (a pretrained model has no training data here)"
        )
    if node is not None and node.get("kind") in LONG_KINDS:
        dcfg = config_lib._typed("data", LongDocConfig, node)
        docs, desc = iter_long_documents(dcfg), dataclasses.asdict(dcfg)
    else:
        dcfg = src.data if node is None else config_lib._typed("data", TokenDataConfig, node)
        docs = validation_documents(dcfg)
        desc = {"name": dcfg.name, "kind": dcfg.kind, "path": dcfg.val, "split": "val"}
    what = f"data={desc['name']} (kind {desc['kind']}, {desc['path']!r})"
    kept, stats = select_long_documents(
        docs, min_tokens=span, max_docs=cfg.eval.get("max_docs"), what=what
    )
    return kept, stats, desc


# ----------------------------------------------------------------------------- scoring


class ChunkedNLL(nn.Module):
    """Stands in for an LM head (``nn.Linear``) during one forward: returns the per-token
    negative log-likelihood (B, T) float32 of ``targets`` instead of (B, T, V) logits, from fp32
    logits of at most ``HEAD_CHUNK_BYTES`` at a time (autocast off: an exact softmax)."""

    def __init__(self, head: nn.Linear, targets: torch.Tensor):
        super().__init__()
        self.head, self.targets = head, targets

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[:-1] != self.targets.shape:
            raise ValueError(f"LM head got {tuple(h.shape)} for targets {self.targets.shape}")
        w = self.head.weight.float()  # (V, C)
        b = None if self.head.bias is None else self.head.bias.float()
        rows = max(1, HEAD_CHUNK_BYTES // (4 * w.shape[0]))
        flat, tgt = h.reshape(-1, h.shape[-1]), self.targets.reshape(-1)
        out = torch.empty(tgt.shape, dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, tgt.numel(), rows):
                logits = F.linear(flat[s : s + rows].float(), w, b)  # (rows, V)
                out[s : s + rows] = F.cross_entropy(logits, tgt[s : s + rows], reduction="none")
        return out.view(self.targets.shape)


def _head_owner(model) -> nn.Module | None:
    """The module whose ``lm_head`` produces the logits straight from the final hidden states
    (so it can be swapped for ``ChunkedNLL``); None where the head does more (softcapping)."""
    if isinstance(model, (GPT2, LLM)):
        return model
    if isinstance(model, HFCausalLM) and model.hf.config.model_type in PLAIN_HF_HEADS:
        if isinstance(getattr(model.hf, "lm_head", None), nn.Linear):
            return model.hf
    return None


@contextlib.contextmanager
def _nll_head(owner: nn.Module, targets: torch.Tensor):
    head = owner.lm_head
    owner.lm_head = ChunkedNLL(head, targets)
    try:
        yield
    finally:
        owner.lm_head = head


def token_nll(model, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
    """Per-token loss (B, T) float32 of targets y after inputs x, without the full logits where
    the model's head allows it (else from its logits, a chunk of rows at a time)."""
    owner = _head_owner(model)
    with autocast():
        if owner is not None:
            with _nll_head(owner, y):
                return model(x).float()
        logits = model(x)  # (B, T, V): models whose head does more than a linear map
    rows = max(1, HEAD_CHUNK_BYTES // (4 * logits.shape[-1]))
    flat, tgt = logits.flatten(0, 1), y.reshape(-1)
    parts = [F.cross_entropy(flat[s : s + rows].float(), tgt[s : s + rows], reduction="none")
             for s in range(0, tgt.numel(), rows)]  # fmt: skip
    return torch.cat(parts).view(y.shape)


def _peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@torch.inference_mode()
def score_length(model, docs, *, seq_len: int, span: int, device, autocast, bar) -> dict:
    """Loss, perplexity and per-quarter losses of every document's first ``span`` predictions
    in windows of ``seq_len``; tokens/s and peak CUDA memory."""
    bounds = [q * seq_len // 4 for q in range(5)]
    sizes = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], dtype=torch.float64)
    sums, windows = torch.zeros(4, dtype=torch.float64), 0
    _peak_reset(device)
    start = time.perf_counter()
    for doc in docs:
        for x, y in long_windows(doc.tokens, seq_len=seq_len, span=span):
            nll = token_nll(model, x.to(device), y.to(device), autocast)[0].double()  # (L,)
            sums += torch.stack([p.sum() for p in nll.tensor_split(bounds[1:4])]).cpu()
            windows += 1
            bar.update(1)
            bar.set_postfix_str(
                f"loss {float(sums.sum() / (windows * seq_len)):.4f}", refresh=False
            )
    seconds = time.perf_counter() - start
    by_quarter = (sums / (sizes * windows)).tolist()
    loss, last = float(sums.sum() / (windows * seq_len)), by_quarter[3]
    return {"loss": loss, "ppl": _ppl(loss), "loss_last_quarter": last,
            "ppl_last_quarter": _ppl(last), "loss_by_quarter": by_quarter,
            "tokens": windows * seq_len, "windows": windows, "seconds": seconds,
            "tokens_per_s": windows * seq_len / max(seconds, 1e-9),
            "peak_mem_gib": _peak_gib(device)}  # fmt: skip


def _ppl(loss: float) -> float:
    return float(torch.tensor(min(loss, 80.0), dtype=torch.float64).exp())


def build_variant(src: ModelSource, v: Variant, device) -> nn.Module:
    """The variant's model with the source's weights, on ``device``, in eval mode."""
    model = build_model(v.model, ops.build(v.attn.name, **v.attn.options), src.pos)
    if src.state is not None:
        model.load_state_dict(src.state)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- entry point


def run_long_eval(cfg) -> dict:
    """``python eval.py eval.task=long_ppl ...``: scores, prints the table, writes the JSON."""
    e = cfg.eval
    info = setup(e.device)
    src = load_source(cfg)
    lens, span = check_lengths(e, src)
    variants = make_variants(cfg, src)
    docs, stats, data_desc = long_documents(cfg, src, span)
    print(f"long_ppl: {stats.summary()}; scoring {span} tokens of each", flush=True)
    autocast = autocast_factory(e.precision, info.device)
    results = {"task": "long_ppl", **src.meta, "model": src.model.name, "pos": src.pos.name,
               "data": data_desc, "device": str(info.device), "doc_tokens": span,
               "documents": {**dataclasses.asdict(stats), "names": [d.name for d in docs]},
               "variants": {}, "long_ppl": {}}  # fmt: skip
    for v in variants:
        model = build_variant(src, v, info.device)
        results["variants"][v.key] = {
            "label": v.label, "attn": v.attn.name, "options": dict(v.attn.options),
            "swap_layers": getattr(v.model, "swap_layers", "all"),
            "head": "chunked" if _head_owner(model) is not None else "logits",
            "resident_gib": _resident_gib(info.device)}  # fmt: skip
        results["long_ppl"][v.key] = {
            str(L): _score_with_progress(model, v, docs, L, span, info.device, autocast, e)
            for L in lens
        }
        del model
        gc.collect()
        if info.device.type == "cuda":
            torch.cuda.empty_cache()
    out = _out_path(e, src)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(format_long_table(results))
    print(f"wrote {out}")
    return results


def _score_with_progress(model, v: Variant, docs, L: int, span: int, device, autocast, e) -> dict:
    """``score_length`` under a progress bar (stderr), then one summary line (stdout)."""
    with tqdm(total=len(docs) * (span // L), desc=f"{v.label} L={L}", unit="win",
              file=sys.stderr, disable=not e.get("progress", True), leave=False,
              mininterval=2.0) as bar:  # fmt: skip
        r = score_length(model, docs, seq_len=L, span=span, device=device, autocast=autocast,
                         bar=bar)  # fmt: skip
    mem = "" if r["peak_mem_gib"] is None else f", peak {r['peak_mem_gib']:.2f} GiB"
    print(f"  {v.label} L={L}: loss {r['loss']:.4f}, last quarter {r['loss_last_quarter']:.4f}, "
          f"{r['tokens_per_s']:.0f} tok/s{mem}", flush=True)  # fmt: skip
    return r


def _resident_gib(device) -> float | None:
    """CUDA memory held before scoring (weights): the peaks above it are the activations."""
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _out_path(e, src: ModelSource) -> Path:
    if e.get("out"):
        return Path(e.out)
    if src.meta.get("ckpt"):
        return Path(src.meta["ckpt"]).resolve().parent.parent / "eval_long_ppl.json"
    return Path("eval_long_ppl.json")


def format_long_table(results: dict) -> str:
    """One row per (context, variant); deltas against the model's own attention."""
    d, docs = results["data"], results["documents"]
    trained = results.get("train_seq_len")
    head = (f"long-context perplexity | {results['model']} pos={results['pos']} "
            f"step={results.get('step')} | data={d['name']} | {docs['used']} documents x "
            f"{results['doc_tokens']} tokens ({docs['short']} shorter skipped)"
            + (f" | trained at {trained}" if trained else ""))  # fmt: skip
    cols = (f"{'context':>8} | {'attention':<26} | {'loss':>7} | {'ppl':>9} | {'last 1/4':>8} | "
            f"{'ppl 1/4':>9} | {'d loss':>7} | {'d 1/4':>7} | {'tokens':>9} | {'tok/s':>8} | "
            f"{'peak GiB':>8}")  # fmt: skip
    lines = [head, cols, "-" * len(cols)]
    own = results["long_ppl"].get("own", {})
    for L in sorted({int(k) for rows in results["long_ppl"].values() for k in rows}):
        for key, rows in results["long_ppl"].items():
            r, base = rows[str(L)], own[str(L)]
            label = results["variants"][key]["label"][:26]
            dl = "" if key == "own" else f"{r['loss'] - base['loss']:+7.4f}"
            dq = (
                ""
                if key == "own"
                else f"{r['loss_last_quarter'] - base['loss_last_quarter']:+7.4f}"
            )
            mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
            lines.append(
                f"{L:>8} | {label:<26} | {r['loss']:7.4f} | {r['ppl']:9.3f} | "
                f"{r['loss_last_quarter']:8.4f} | {r['ppl_last_quarter']:9.3f} | {dl:>7} | "
                f"{dq:>7} | {r['tokens']:9d} | {r['tokens_per_s']:8.0f} | {mem:>8}"
            )
    return "\n".join(lines)
