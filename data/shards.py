"""Reading and writing uint16 token shards.

Three on-disk forms are understood, chosen by file name suffix:

* ``.bin``     raw little-endian uint16, no header (memory-mapped on read);
* ``.bin.xz``  the same bytes compressed with lzma/xz (decompressed fully in memory);
* ``.npy``     a 1-D NumPy array, as build-nanogpt's fineweb.py writes (memory-mapped).

GPT-2 ids (< 50257) fit in uint16, halving disk and RAM versus int32.
"""

from __future__ import annotations

import glob
import lzma
import os
import re
from pathlib import Path

import numpy as np

SHARD_SUFFIXES = (".bin.xz", ".bin", ".npy")
_TOKEN_DTYPE = np.dtype("<u2")


def shard_suffix(path: str | Path) -> str | None:
    """The recognised shard suffix of ``path`` (".bin", ".bin.xz", ".npy") or None."""
    name = Path(path).name
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _require_suffix(path: Path) -> str:
    suffix = shard_suffix(path)
    if suffix is None:
        raise ValueError(
            f"{path}: not a token shard; expected a name ending in one of {SHARD_SUFFIXES}"
        )
    return suffix


def load_tokens(path: str | Path) -> np.ndarray:
    """Load one shard as a 1-D uint16 array (read-only for .bin/.npy memory maps)."""
    path = Path(path)
    suffix = _require_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"token shard not found: {path}")
    if suffix == ".npy":
        return _load_npy(path)
    raw: bytes | None = None
    if suffix == ".bin.xz":
        try:
            raw = lzma.decompress(path.read_bytes())
        except lzma.LZMAError as err:
            raise ValueError(f"{path}: not a valid xz/lzma stream ({err})") from err
        nbytes = len(raw)
    else:
        nbytes = path.stat().st_size
    if nbytes % 2:
        raise ValueError(
            f"{path}: {nbytes} bytes is not a whole number of uint16 tokens (must be even)"
        )
    if raw is not None:
        return np.frombuffer(raw, dtype=_TOKEN_DTYPE).astype(np.uint16, copy=False)
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=_TOKEN_DTYPE, mode="r").view(np.ndarray)


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map a .npy shard and check it is a 1-D array of valid uint16 token ids."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D token array, got shape {arr.shape}")
    if arr.dtype == np.uint16:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: expected integer token ids, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.uint16).max):
        raise ValueError(f"{path}: token ids outside [0, 65535] cannot be stored as uint16")
    return np.asarray(arr, dtype=np.uint16)


def _as_token_array(tokens: np.ndarray, path: Path) -> np.ndarray:
    """Validate and convert ``tokens`` to contiguous little-endian uint16."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"write_shard({path}): tokens must be 1-D, got shape {arr.shape}")
    if arr.dtype != np.uint16:
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"write_shard({path}): tokens must be integers, got {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.uint16).max):
            raise ValueError(f"write_shard({path}): token ids must lie in [0, 65535]")
    return np.ascontiguousarray(arr, dtype=_TOKEN_DTYPE)


def write_shard(path: str | Path, tokens: np.ndarray) -> Path:
    """Write ``tokens`` to ``path`` atomically; the format follows the suffix.

    The data goes to a temporary file in the same directory, is fsync'ed, then
    ``os.replace``d over ``path``: readers (and a resumed job) never see a half
    written shard, even if the writer is killed.
    """
    path = Path(path)
    suffix = _require_suffix(path)
    arr = _as_token_array(tokens, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if suffix == ".npy":
                np.save(f, arr.astype(np.uint16, copy=False), allow_pickle=False)
            elif suffix == ".bin.xz":
                f.write(lzma.compress(arr.tobytes(), preset=6))
            else:
                f.write(arr.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


_SPLIT_WORDS = ("train", "val")


def _mentions(name: str, word: str) -> bool:
    """Whether ``word`` appears in ``name`` as a separate token (e.g. "x_val_000.bin")."""
    return re.search(rf"(?<![a-z]){word}(?![a-z])", name.lower()) is not None


def _filter_split(files: list[Path], split: str | None) -> list[Path]:
    """Keep shards of ``split`` when file names carry split words ("train"/"val")."""
    if split is None or not any(_mentions(f.name, w) for f in files for w in _SPLIT_WORDS):
        return files
    return [f for f in files if _mentions(f.name, split)]


def list_shards(pattern_or_dir: str | Path, split: str | None = None) -> list[Path]:
    """Sorted shard paths from a directory, a single file, or a glob pattern.

    For a directory, only files with a shard suffix directly inside it are used;
    if ``split`` ("train" or "val") is given and any file name mentions a split
    word, only the files naming ``split`` are kept (build-nanogpt and
    prepare_fineweb_edu.py put ``*_val_*`` and ``*_train_*`` shards side by side).
    Raises FileNotFoundError naming the pattern when nothing matches.
    """
    if split is not None and split not in _SPLIT_WORDS:
        raise ValueError(f"list_shards: split must be one of {_SPLIT_WORDS} or None, got {split!r}")
    text = os.path.expanduser(str(pattern_or_dir))
    path = Path(text)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and shard_suffix(p)]
        files = _filter_split(sorted(files), split)
        where = f"directory {text!r}" + (f" for split {split!r}" if split else "")
    elif path.is_file():
        _require_suffix(path)
        files = [path]
        where = repr(text)
    else:
        matches = [Path(p) for p in glob.glob(text, recursive=True)]
        files = sorted(p for p in matches if p.is_file() and shard_suffix(p))
        where = repr(text)
    if not files:
        raise FileNotFoundError(f"no token shards ({', '.join(SHARD_SUFFIXES)}) match {where}")
    return files
