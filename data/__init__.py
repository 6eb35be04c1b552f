"""Training data: GPT-2 token streams and image classification sets.

Tokens: the trainer needs one call, ``build_token_data(cfg, ...)``, which turns a
``TokenDataConfig`` into a training ``TokenLoader`` and a validation token array.
Images (``data.images``): ``build_image_loaders(cfg, batch_size, ...)`` turns an
``ImageDataConfig`` into train/val loaders, the class count and a mixup callable.
Long documents (``data.long_docs``, for long-context evaluation): ``load_long_documents`` reads
PG-19 through ``datasets``, local text or token files, whole and tokenised;
``validation_documents`` gives a training config's validation split as documents.
This package imports nothing from models/, ops/ or trainer/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from data.background import Ahead
from data.images import (
    IMAGE_KINDS,
    IMAGENET_HF_REPO,
    IMAGENET_HF_REVISION,
    BatchMixup,
    DevicePrep,
    DigitsDataset,
    GpuImagePipeline,
    HFImageDataset,
    ImageDataConfig,
    ImageFolderDataset,
    KeyedBatch,
    PackedImageDataset,
    RepeatAugSampler,
    ShardSampler,
    build_device_prep,
    build_gpu_pipeline,
    build_image_datasets,
    build_image_loaders,
    build_mixup,
    build_transforms,
    check_image_config,
    decode_in_process,
    load_hf_split,
    make_image_folder,
    open_packed,
    to_device,
    write_packed,
)
from data.loader import TokenLoader, iter_eval_batches, shuffle_documents
from data.long_docs import (
    LONG_KINDS,
    LongDocConfig,
    LongDocStats,
    LongDocument,
    iter_long_documents,
    load_long_documents,
    long_windows,
    select_long_documents,
    split_documents,
)
from data.process_ahead import ProcessAhead, batch_spec
from data.shards import SHARD_SUFFIXES, list_shards, load_tokens, write_shard
from data.sources import (
    FINEWEB_EDU_CONFIGS,
    FINEWEB_EDU_REVISION,
    bundled_corpus,
    bundled_documents,
    default_cache_dir,
    fineweb_edu_stream,
    iter_local_documents,
    local_files,
)
from data.tokenizer import EOT, VOCAB_SIZE, encode_document, encode_documents, gpt2_encoding

__all__ = [
    "Ahead",
    "ProcessAhead",
    "EOT",
    "FINEWEB_EDU_CONFIGS",
    "FINEWEB_EDU_REVISION",
    "IMAGENET_HF_REPO",
    "IMAGENET_HF_REVISION",
    "IMAGE_KINDS",
    "KINDS",
    "LONG_KINDS",
    "SHARD_SUFFIXES",
    "VOCAB_SIZE",
    "BatchMixup",
    "DevicePrep",
    "DigitsDataset",
    "GpuImagePipeline",
    "HFImageDataset",
    "ImageDataConfig",
    "ImageFolderDataset",
    "KeyedBatch",
    "LongDocConfig",
    "LongDocStats",
    "LongDocument",
    "PackedImageDataset",
    "RepeatAugSampler",
    "ShardSampler",
    "TokenDataConfig",
    "TokenLoader",
    "batch_spec",
    "build_device_prep",
    "build_gpu_pipeline",
    "build_image_datasets",
    "build_image_loaders",
    "build_mixup",
    "build_token_data",
    "build_transforms",
    "bundled_corpus",
    "bundled_documents",
    "check_image_config",
    "decode_in_process",
    "default_cache_dir",
    "encode_document",
    "encode_documents",
    "fineweb_edu_stream",
    "gpt2_encoding",
    "iter_eval_batches",
    "iter_local_documents",
    "iter_long_documents",
    "validation_documents",
    "list_shards",
    "load_hf_split",
    "load_long_documents",
    "load_tokens",
    "local_files",
    "long_windows",
    "make_image_folder",
    "open_packed",
    "select_long_documents",
    "shuffle_documents",
    "split_documents",
    "to_device",
    "write_packed",
    "write_shard",
]

KINDS = ("bundled", "shards", "files")


@dataclass
class TokenDataConfig:
    """Which tokens to train and validate on (the ``data:`` section of the run config).

    kind="bundled": the Python stdlib source corpus (no files needed; train/val must be null).
    kind="shards":  pre-tokenised uint16 shards; ``train``/``val`` are a directory or glob
                    of .bin/.bin.xz/.npy. ``val`` may be null when ``train`` is a directory
                    that also holds ``*val*`` shards (the prepare_fineweb_edu.py layout).
    kind="files":   raw text (.txt/.jsonl/.parquet, documents in field ``text_field``);
                    null ``val`` holds out the last ``val_fraction`` of the documents.
    """

    name: str = "pycorpus"
    kind: str = "bundled"
    train: str | None = None
    val: str | None = None
    val_fraction: float = 0.05
    text_field: str = "text"
    max_chars: int = 4_000_000
    cache_dir: str | None = None
    shuffle: bool = True


T = TypeVar("T")


def _for_field(field: str, fn: Callable[[], T]) -> T:
    """Run ``fn``, prefixing any path/value error with the config field it came from."""
    try:
        return fn()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{field}: {err}") from err
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from err


def _bundled(cfg: TokenDataConfig) -> tuple[list, np.ndarray]:
    if cfg.train or cfg.val:
        raise ValueError(
            "data.train and data.val must be null for kind='bundled' (it always uses the "
            "stdlib corpus); use kind='shards' or kind='files' for your own data"
        )
    if not isinstance(cfg.max_chars, int) or cfg.max_chars < 1000:
        raise ValueError(f"data.max_chars must be an integer >= 1000, got {cfg.max_chars!r}")
    train = bundled_corpus("train", cfg.max_chars, cfg.cache_dir)
    val = bundled_corpus("val", cfg.max_chars, cfg.cache_dir)
    return [train], val


def _default_val_shards(train: str, train_files: list[Path]) -> list[Path]:
    """The ``*val*`` shards beside the train shards when data.train is a directory."""
    if Path(train).expanduser().is_dir():
        try:
            val_files = list_shards(train, split="val")
        except FileNotFoundError:
            val_files = train_files
        if not set(val_files) & set(train_files):
            return val_files
    raise ValueError(
        f"data.val: required for kind='shards' because data.train={train!r} is not a "
        "directory holding *val* shards; set data.val to a shard file, directory or glob"
    )


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _shards(cfg: TokenDataConfig) -> tuple[list, np.ndarray]:
    if not cfg.train:
        raise ValueError("data.train: required for kind='shards' (a directory or glob of shards)")
    train_files = _for_field("data.train", lambda: list_shards(cfg.train, split="train"))
    if cfg.val:
        val_files = _for_field("data.val", lambda: list_shards(cfg.val, split="val"))
    else:
        val_files = _default_val_shards(cfg.train, train_files)
    shared = sorted(set(train_files) & set(val_files))
    if shared:
        raise ValueError(f"data.val: shards {[str(p) for p in shared]} are also in data.train")
    val = _for_field("data.val", lambda: _concat([load_tokens(p) for p in val_files]))
    return train_files, val


def _read_docs(paths: str, text_field: str) -> list[str]:
    return list(iter_local_documents(paths, text_field))


def _files(cfg: TokenDataConfig) -> tuple[list, np.ndarray]:
    if not cfg.train:
        raise ValueError(
            "data.train: required for kind='files' (a .txt/.jsonl/.parquet path or glob)"
        )
    docs = _for_field("data.train", lambda: _read_docs(cfg.train, cfg.text_field))
    if cfg.val:
        val_docs = _for_field("data.val", lambda: _read_docs(cfg.val, cfg.text_field))
    else:
        if not 0.0 < cfg.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction!r}")
        if len(docs) < 2:
            raise ValueError(
                f"data.train: {len(docs)} document(s) cannot be split into train and val; "
                "add documents or set data.val"
            )
        n_val = min(len(docs) - 1, max(1, round(len(docs) * cfg.val_fraction)))
        docs, val_docs = docs[:-n_val], docs[-n_val:]
    return [encode_documents(docs)], encode_documents(val_docs)


_BUILDERS = {"bundled": _bundled, "shards": _shards, "files": _files}


def build_token_data(
    cfg: TokenDataConfig,
    *,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> tuple[TokenLoader, np.ndarray]:
    """(training TokenLoader, validation tokens) for ``cfg``.

    ``cfg`` may be the dataclass or an OmegaConf node built from it. Every rank
    must call this with the same cfg/seed: the loader state is then identical
    on all ranks and each rank reads its own slice of every global step.
    """
    if cfg.kind not in _BUILDERS:
        raise ValueError(f"data.kind must be one of {list(KINDS)}, got {cfg.kind!r}")
    train_shards, val = _BUILDERS[cfg.kind](cfg)
    if val.size == 0:
        raise ValueError(f"data.val: validation split of kind={cfg.kind!r} has no tokens")
    loader = TokenLoader(
        train_shards,
        batch_size=batch_size,
        seq_len=seq_len,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=bool(cfg.shuffle),
    )
    return loader, val


def validation_documents(cfg: TokenDataConfig) -> Iterator[LongDocument]:
    """The validation split of a token-data config as whole documents (split at EOT), for
    long-context evaluation of a model on the data it was trained on. Shards named by
    ``data.val`` keep their ``index.json`` names (the Gutenberg books)."""
    if cfg.kind == "shards" and cfg.val:
        return iter_long_documents(LongDocConfig(name=cfg.name, kind="tokens", path=cfg.val))
    _, val = build_token_data(cfg, batch_size=1, seq_len=1)
    docs = split_documents(val)
    return (LongDocument(f"{cfg.name} val #{i}", d) for i, d in enumerate(docs))
