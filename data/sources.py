"""Token sources: where documents come from before they become uint16 token arrays.

Every source follows one convention: each document's tokens are followed by EOT
(``<|endoftext|>``, id 50256), so document boundaries survive concatenation and
the loader can shuffle whole documents.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from data.shards import load_tokens, write_shard
from data.tokenizer import encode_documents

# --------------------------------------------------------------------------- bundled

BUNDLED_VAL_PERMILLE = 50
"""Files whose path hash falls below this (out of 1000) form the val split (~5%)."""

_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
_BUNDLED_FORMAT = 1  # bump when the document selection or tokenisation changes
_SPLITS = ("train", "val")


def default_cache_dir() -> Path:
    """``$ATTNLAB_CACHE`` if set, else ``~/.cache/attnlab``."""
    return Path(os.environ.get("ATTNLAB_CACHE") or Path.home() / ".cache" / "attnlab")


def _stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, absolute path) of the stdlib's .py files, sorted by path.

    Test suites and installed third-party packages are pruned while walking.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                out.append((path.relative_to(root).as_posix(), path))
    out.sort(key=lambda item: item[0])
    return out


def bundled_split_of(rel_path: str) -> str:
    """Split ("val" or "train") of a stdlib file, from a stable hash of its relative path."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:4], "big") % 1000
    return "val" if bucket < BUNDLED_VAL_PERMILLE else "train"


def _split_budget(split: str, max_chars: int) -> int:
    """Characters allotted to ``split`` so that train + val together stay within max_chars."""
    val_chars = max(1, max_chars * BUNDLED_VAL_PERMILLE // 1000)
    return val_chars if split == "val" else max_chars - val_chars


def _truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` chars, at a line end when one exists."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut + 1] if cut > 0 else text[:limit]


def bundled_documents(split: str, max_chars: int) -> list[tuple[str, str]]:
    """(relative path, source text) of the stdlib files in ``split``, in sorted path order.

    Files are taken in order until the split's character budget is used; the last
    file is truncated at a line end to fit. Train and val are disjoint by file.
    """
    if split not in _SPLITS:
        raise ValueError(f"bundled corpus: split must be one of {_SPLITS}, got {split!r}")
    if max_chars < 2:
        raise ValueError(f"bundled corpus: max_chars must be >= 2, got {max_chars}")
    budget = _split_budget(split, max_chars)
    docs: list[tuple[str, str]] = []
    for rel, path in _stdlib_files():
        if budget <= 0:
            break
        if bundled_split_of(rel) != split:
            continue
        text = _truncate(path.read_text(encoding="utf-8", errors="replace"), budget)
        if text:
            docs.append((rel, text))
            budget -= len(text)
    if not docs:
        raise ValueError(
            f"bundled corpus: no stdlib .py files for split {split!r} under "
            f"{sysconfig.get_paths()['stdlib']!r}"
        )
    return docs


def bundled_cache_path(split: str, max_chars: int, cache_dir: str | Path | None = None) -> Path:
    """Cache file for a bundled build, keyed by (python version, max_chars, split)."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    ver = "{}.{}.{}".format(*sys.version_info[:3])
    return base / f"bundled_stdlib_v{_BUNDLED_FORMAT}_py{ver}_{max_chars}_{split}.bin"


def bundled_corpus(
    split: str = "train", max_chars: int = 4_000_000, cache_dir: str | Path | None = None
) -> np.ndarray:
    """GPT-2 tokens of the running Python's standard library source (EOT after each file).

    A corpus that every machine already has: no download, deterministic for a
    given Python version. The first call tokenises and caches a .bin under
    ``cache_dir`` (default: ``$ATTNLAB_CACHE`` or ``~/.cache/attnlab``); later
    calls just load it.
    """
    path = bundled_cache_path(split, max_chars, cache_dir)
    if path.is_file():
        return load_tokens(path)
    tokens = encode_documents(text for _, text in bundled_documents(split, max_chars))
    write_shard(path, tokens)
    return tokens


# --------------------------------------------------------------------------- local files

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_GLOB_CHARS = frozenset("*?[")


def _expand_one(entry: str | Path) -> list[Path]:
    """Files named by one entry: a file, a directory (its supported files), or a glob."""
    text = os.path.expanduser(str(entry))
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files in directory {text!r}")
        return files
    if _GLOB_CHARS.intersection(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no files match {text!r}")
        return files
    raise FileNotFoundError(f"no such file or directory: {text!r}")


def expand_text_files(paths_or_glob: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand files/directories/globs into a file list, in the given order (globs sorted)."""
    entries = [paths_or_glob] if isinstance(paths_or_glob, (str, Path)) else list(paths_or_glob)
    if not entries:
        raise FileNotFoundError("no text files given (empty path list)")
    files = [f for entry in entries for f in _expand_one(entry)]
    for f in files:
        if f.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"{f}: unsupported text file type; expected one of {TEXT_SUFFIXES}")
    return files


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """Documents of a JSON-lines file: field ``text_field`` of each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            if text_field not in record:
                raise ValueError(
                    f"{path}:{lineno}: no field {text_field!r}; fields present: "
                    f"{sorted(record)} (set text_field to one of them)"
                )
            value = record[text_field]
            if not isinstance(value, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is not a string")
            yield value


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    """Documents of a Parquet file: non-null values of column ``text_field``, batch by batch."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(
            f"{path}: no column {text_field!r}; columns present: {names} "
            "(set text_field to one of them)"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one .txt (whole file), .jsonl (one per line) or .parquet file."""
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path, text_field)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path, text_field)
    else:
        raise ValueError(f"{path}: unsupported text file type; expected one of {TEXT_SUFFIXES}")


def iter_local_documents(
    paths_or_glob: str | Path | Iterable[str | Path], text_field: str = "text"
) -> Iterator[str]:
    """Documents of all files named by ``paths_or_glob``, file by file.

    Paths are resolved eagerly, so a missing path fails before any document is read.
    """
    files = expand_text_files(paths_or_glob)
    return (doc for path in files for doc in iter_documents(path, text_field))


def local_files(
    paths_or_glob: str | Path | Iterable[str | Path], text_field: str = "text"
) -> np.ndarray:
    """GPT-2 tokens (uint16, EOT after each document) of local .txt/.jsonl/.parquet files."""
    return encode_documents(iter_local_documents(paths_or_glob, text_field))


# --------------------------------------------------------------------------- FineWeb-Edu

FINEWEB_EDU_REPO = "HuggingFaceFW/fineweb-edu"
FINEWEB_EDU_REVISION = "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9"
"""Dataset commit on the Hugging Face Hub; pinned so a re-run streams identical documents."""

FINEWEB_EDU_CONFIGS = ("sample-10BT", "sample-100BT", "sample-350BT", "default")


def fineweb_edu_stream(
    name: str = "sample-10BT", revision: str = FINEWEB_EDU_REVISION, split: str = "train"
) -> Iterator[str]:
    """Stream FineWeb-Edu document texts from the Hub (needs network; nothing is cached whole).

    The dataset is opened immediately (so a bad name/revision fails here), and the
    texts are yielded lazily in the dataset's stored order.
    """
    if name not in FINEWEB_EDU_CONFIGS:
        raise ValueError(
            f"fineweb_edu_stream: name must be one of {FINEWEB_EDU_CONFIGS}, got {name!r}"
        )
    if not revision:
        raise ValueError("fineweb_edu_stream: revision must be a commit hash, branch or tag")
    import datasets

    ds = datasets.load_dataset(
        FINEWEB_EDU_REPO, name=name, split=split, streaming=True, revision=revision
    )
    return (row["text"] for row in ds)
