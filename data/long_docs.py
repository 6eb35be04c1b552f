"""Long documents for long-context evaluation (``eval.task=long_ppl``), as GPT-2 tokens.

A long-context perplexity needs whole documents, each long enough for the longest context, not
a packed stream that runs across document boundaries. ``load_long_documents`` reads them from:

* ``kind="hf"``: a Hugging Face ``datasets`` source: a hub name (``deepmind/pg19``, split
  ``test`` / ``validation``, text field ``text``; needs the network, or the hub cache), a
  ``save_to_disk`` directory, or local ``.parquet`` / ``.json`` / ``.jsonl`` / ``.csv`` /
  ``.arrow`` files (read through ``datasets``' own builders, offline);
* ``kind="text"``: local ``.txt`` files (one document each), ``.jsonl`` / ``.parquet`` files (one
  per row), named by a file, a folder or a glob;
* ``kind="tokens"``: uint16 GPT-2 token files (``.bin``, ``.bin.xz``, ``.npy``) whose documents
  end with EOT (50256), as every token source here writes them, e.g. the Gutenberg books. An
  ``index.json`` beside them (``{"<split>": {"file": ..., "docs": [{"path": ...}, ...]}}``,
  the layout of ``../shared/data/gutenberg``) names the documents.

Texts are tokenised with our GPT-2 BPE (``encode_ordinary``: text that looks like a special
token stays text). Documents with fewer than ``min_tokens`` tokens are skipped and counted, so
the caller can report them; a missing path or an empty result raises, naming the option.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from data.shards import list_shards, load_tokens
from data.sources import expand_text_files, iter_documents
from data.tokenizer import EOT, gpt2_encoding

LONG_KINDS = ("hf", "text", "tokens")
PG19 = "deepmind/pg19"
_HF_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv",
                     ".arrow": "arrow"}  # fmt: skip
_SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes
_ENCODE_BATCH = 16  # documents per multi-threaded tiktoken call


@dataclasses.dataclass
class LongDocConfig:
    """Where long documents come from (the ``data:`` section of ``eval.task=long_ppl``).

    ``path``: hub name or local path(s) (see the module docstring); ``split``: the split of a
    hub dataset, saved ``DatasetDict`` or dataset folder (``test``, ``validation``); ``title_field``: a column that names documents (PG-19's
    ``short_book_title``), used when present; ``revision``: a hub commit, branch or tag;
    ``cache_dir``: ``datasets``' cache (null: its default)."""

    name: str = "pg19"
    kind: str = "hf"
    path: str = PG19
    split: str = "test"
    text_field: str = "text"
    title_field: str | None = "short_book_title"
    revision: str | None = None
    cache_dir: str | None = None


@dataclasses.dataclass
class LongDocument:
    name: str
    tokens: np.ndarray  # (n,) uint16 GPT-2 ids of the text, no EOT


@dataclasses.dataclass
class LongDocStats:
    """What was read: documents seen, kept, skipped as shorter than ``min_tokens``."""

    seen: int = 0
    used: int = 0
    short: int = 0
    longest: int = 0
    min_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.used} documents of >= {self.min_tokens} tokens ({self.short} of "
                f"{self.seen} read were shorter and skipped; longest {self.longest})")  # fmt: skip


# ----------------------------------------------------------------------------- sources


def _is_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(path))


def _hf_dataset(cfg: LongDocConfig):
    """The ``datasets.Dataset`` that ``cfg.path`` / ``cfg.split`` name (see the module doc)."""
    import datasets

    local = Path(cfg.path).expanduser()
    if any((local / m).is_file() for m in _SAVED_MARKERS):
        obj = datasets.load_from_disk(str(local))
        if isinstance(obj, datasets.DatasetDict):
            if cfg.split not in obj:
                raise ValueError(f"data.split={cfg.split!r}: {local} has splits {list(obj)}")
            obj = obj[cfg.split]
        return obj
    if local.is_file() or (not local.exists() and any(c in cfg.path for c in "*?[")):
        suffix = local.suffix.lower()
        if suffix not in _HF_FILE_BUILDERS:
            raise ValueError(f"data.path={cfg.path!r}: expected one of {list(_HF_FILE_BUILDERS)}")
        return datasets.load_dataset(_HF_FILE_BUILDERS[suffix], data_files=str(local),
                                     split="train", cache_dir=cfg.cache_dir)  # fmt: skip
    if local.is_dir():
        return datasets.load_dataset(str(local), split=cfg.split, cache_dir=cfg.cache_dir)
    if _is_local(cfg.path):
        raise FileNotFoundError(f"data.path={cfg.path!r}: no such file or directory")
    return _hub_dataset(cfg)


def _hub_dataset(cfg: LongDocConfig):
    """A hub dataset split, with an error that says what to do when it cannot be reached."""
    import datasets

    try:
        return datasets.load_dataset(cfg.path, split=cfg.split, revision=cfg.revision,
                                     cache_dir=cfg.cache_dir)  # fmt: skip
    except Exception as e:  # offline, unknown name, script-based repo: one actionable message
        raise RuntimeError(
            f"data.path={cfg.path!r} (split {cfg.split!r}) could not be loaded through datasets "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Hub downloads "
            "need the network (or the dataset in the Hugging Face cache); script-based hub "
            "repos need a Parquet revision (data.revision=refs/convert/parquet). Offline, point "
            "data.path at a save_to_disk directory or local .parquet/.jsonl files, or use "
            "data=long_text / data=long_tokens"
        ) from e


def _hf_texts(cfg: LongDocConfig) -> Iterator[tuple[str, str]]:
    ds = _hf_dataset(cfg)
    columns = list(ds.column_names)
    if cfg.text_field not in columns:
        raise ValueError(f"data.text_field={cfg.text_field!r} is not a column of {cfg.path!r}; "
                         f"columns: {columns}")  # fmt: skip
    title = cfg.title_field if cfg.title_field in columns else None
    for i, row in enumerate(ds):
        yield (str(row[title]) if title else f"{Path(cfg.path).name}[{i}]"), row[cfg.text_field]


def _file_texts(cfg: LongDocConfig) -> Iterator[tuple[str, str]]:
    try:
        files = expand_text_files(cfg.path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.path: {e}") from e
    for path in files:
        for i, text in enumerate(iter_documents(path, cfg.text_field)):
            yield (str(path) if path.suffix == ".txt" else f"{path}[{i}]"), text


def _index_names(path: Path, n_docs: int) -> list[str] | None:
    """Document names from an ``index.json`` beside a token file, when it describes that file
    with as many documents (``{split: {"file": name, "docs": [{"path": ...}]}}``, or a list of
    such entries per split, as ../shared/data/gutenberg has it)."""
    index = path.parent / "index.json"
    if not index.is_file():
        return None
    entries = []
    for value in json.loads(index.read_text()).values():
        entries += value if isinstance(value, list) else [value]
    for entry in entries:
        if isinstance(entry, dict) and entry.get("file") == path.name:
            docs = entry.get("docs") or []
            if len(docs) == n_docs:
                return [str(d.get("path", f"{path.name}#{i}")) for i, d in enumerate(docs)]
    return None


def split_documents(tokens: np.ndarray) -> list[np.ndarray]:
    """The documents of an EOT-delimited token stream (EOTs dropped, a tail kept, empties
    dropped)."""
    ends = np.flatnonzero(tokens == EOT)
    starts = np.concatenate(([0], ends + 1))
    stops = np.concatenate((ends, [tokens.size]))
    return [tokens[a:b] for a, b in zip(starts, stops) if b > a]


def _token_docs(cfg: LongDocConfig) -> Iterator[LongDocument]:
    try:
        files = list_shards(cfg.path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.path: {e}") from e
    for path in files:
        docs = split_documents(load_tokens(path))
        names = _index_names(path, len(docs))
        for i, doc in enumerate(docs):
            yield LongDocument(names[i] if names else f"{path.name}#{i}", doc)


def _encoded(texts: Iterator[tuple[str, str]]) -> Iterator[LongDocument]:
    """Tokenise (name, text) pairs a batch at a time (tiktoken threads over a batch)."""
    enc, batch = gpt2_encoding(), []
    for item in texts:
        batch.append(item)
        if len(batch) == _ENCODE_BATCH:
            yield from _encode_batch(enc, batch)
            batch = []
    yield from _encode_batch(enc, batch)


def _encode_batch(enc, batch: list[tuple[str, str]]) -> Iterator[LongDocument]:
    ids = enc.encode_ordinary_batch([text for _, text in batch]) if batch else []
    for (name, _), toks in zip(batch, ids):
        yield LongDocument(name, np.asarray(toks, dtype=np.uint16))


def iter_long_documents(cfg: LongDocConfig) -> Iterator[LongDocument]:
    """Every document of ``cfg``'s source, tokenised, in the source's order."""
    if cfg.kind not in LONG_KINDS:
        raise ValueError(f"data.kind={cfg.kind!r}; long documents: {', '.join(LONG_KINDS)}")
    if not cfg.path:
        raise ValueError(f"data.path is required for kind={cfg.kind!r}")
    if cfg.kind == "tokens":
        return _token_docs(cfg)
    return _encoded(_hf_texts(cfg) if cfg.kind == "hf" else _file_texts(cfg))


def select_long_documents(
    docs: Iterator[LongDocument], *, min_tokens: int, max_docs: int | None = None, what: str
) -> tuple[list[LongDocument], LongDocStats]:
    """The first ``max_docs`` documents with at least ``min_tokens`` tokens, and the counts.

    Raises ValueError when the source holds no documents, or none long enough (naming the
    longest, so the user can pick a context that fits)."""
    if min_tokens < 1 or (max_docs is not None and max_docs < 1):
        raise ValueError(f"min_tokens={min_tokens} and max_docs={max_docs} must be positive")
    stats, kept = LongDocStats(min_tokens=min_tokens), []
    for doc in docs:
        stats.seen += 1
        stats.longest = max(stats.longest, int(doc.tokens.size))
        if doc.tokens.size < min_tokens:
            stats.short += 1
            continue
        kept.append(doc)
        if max_docs is not None and len(kept) == max_docs:
            break
    stats.used = len(kept)
    if stats.seen == 0:
        raise ValueError(f"{what}: holds no documents")
    if not kept:
        raise ValueError(
            f"{what}: none of its {stats.seen} documents has {min_tokens} tokens (the longest "
            f"has {stats.longest}); use shorter eval.seq_lens / eval.doc_tokens or longer documents"
        )
    return kept, stats


def load_long_documents(
    cfg: LongDocConfig, *, min_tokens: int, max_docs: int | None = None
) -> tuple[list[LongDocument], LongDocStats]:
    """Documents of ``cfg`` with at least ``min_tokens`` tokens (the first ``max_docs``)."""
    what = f"data={cfg.name} (kind {cfg.kind}, path {cfg.path!r})"
    return select_long_documents(
        iter_long_documents(cfg), min_tokens=min_tokens, max_docs=max_docs, what=what
    )


# ----------------------------------------------------------------------------- windows


def long_windows(
    tokens: np.ndarray, *, seq_len: int, span: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows over the first ``span`` predictions of one document.

    The document is read as ``[EOT] + tokens`` (EOT precedes every document in training, so its
    first token is predicted from the usual document start). Window i has inputs
    ``seq[i*L : (i+1)*L]`` and targets shifted by one, each (1, L) int64; ``span // L`` windows,
    so every length that divides ``span`` scores the same ``span`` tokens."""
    if tokens.size < span:
        raise ValueError(f"document has {tokens.size} tokens; {span} are needed")
    seq = np.concatenate(([EOT], tokens[:span])).astype(np.int64)
    for i in range(span // seq_len):
        w = torch.from_numpy(seq[i * seq_len : (i + 1) * seq_len + 1])
        yield w[None, :-1], w[None, 1:]
