"""Packed-document batches for causal-LM training, with exact resume.

Design
------
The training data is one endless token *stream*: epoch 0's shards in their
(shuffled) order, then epoch 1's, and so on. A cursor ``(epoch, shard_pos,
offset)`` names a position in that stream. Every rank holds the same cursor;
one global step reads ``world_size * batch_size * seq_len + 1`` tokens from it
and rank ``r`` takes the r-th contiguous slice of ``batch_size * seq_len + 1``
tokens (neighbouring slices overlap by the one target token). The cursor then
moves ``world_size * batch_size * seq_len`` tokens on.

Batches may span shard boundaries (and epoch boundaries): no token is dropped,
and a shard of any size, even smaller than one step, is fine. Because the
stream is a pure function of (shards, seed, shuffle), the cursor plus those
settings is the whole state, so ``state_dict`` is small, rank-independent, and
restoring it continues the exact same sequence of batches.

With ``shuffle=True`` each epoch permutes the shard order with
``default_rng((seed, epoch))`` and, inside each shard, permutes its documents
(split after every EOT, the EOT staying with the document it ends) with
``default_rng((seed, epoch, shard_index))``.

Shard changes happen off the training thread: when a shard is first read, the next one in the
stream (the next epoch's first at an epoch's end) is loaded and shuffled in a background
thread, so a step that crosses into it finds it ready. Decompressed ``.bin.xz`` shards are kept
(up to ``_RAW_KEEP_BYTES`` in all), so a new epoch reshuffles without decompressing again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from data.shards import load_tokens, shard_suffix
from data.tokenizer import EOT

_STATE_SETTINGS = ("seed", "world_size", "batch_size", "seq_len", "num_shards", "shuffle")
_CACHE_SHARDS = 2  # the current shard and the one a boundary-spanning batch reaches into
_RAW_KEEP_BYTES = 2 << 30  # decompressed .bin.xz shards kept for later epochs, in all


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_rank(rank: int, world_size: int) -> None:
    _positive_int("world_size", world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must satisfy 0 <= rank < world_size={world_size}, got {rank}")


def _check_tokens(tokens: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what}: token array is empty")
    return arr


def shuffle_documents(tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permute the documents of ``tokens``.

    Each document ends with (and keeps) its EOT; a tail without EOT is one more document.
    """
    ends = np.flatnonzero(tokens == EOT) + 1
    if ends.size == 0 or ends[-1] != tokens.size:
        ends = np.append(ends, tokens.size)
    starts = np.concatenate(([0], ends[:-1]))
    order = rng.permutation(starts.size)
    return np.concatenate([tokens[starts[i] : ends[i]] for i in order])


def _to_xy(buf: np.ndarray, rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (rows, seq_len) int64, from rows*seq_len+1 tokens."""
    t = torch.from_numpy(buf.astype(np.int64))
    return t[:-1].view(rows, seq_len), t[1:].view(rows, seq_len)


class TokenLoader:
    """Deterministic, resumable packed batches from token shards (paths or in-memory arrays).

    Path shards are loaded lazily with ``load_tokens``; at most two shards (the
    current one and the next, for batches that cross a boundary) are held, plus the one
    being prepared ahead (``prefetch``: in a background thread; off, the training thread loads
    each shard when it reaches it) and decompressed ``.bin.xz`` shards (``_RAW_KEEP_BYTES``).
    """

    def __init__(
        self,
        shards: Sequence[Path | str | np.ndarray],
        *,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        prefetch: bool = True,
    ) -> None:
        if isinstance(shards, (str, Path, np.ndarray)) or len(shards) == 0:
            raise ValueError("TokenLoader: shards must be a non-empty list of paths or arrays")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.seq_len = _positive_int("seq_len", seq_len)
        _check_rank(rank, world_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.shuffle, self.prefetch = bool(shuffle), bool(prefetch)
        self._shards = [
            Path(s) if isinstance(s, (str, Path)) else _check_tokens(s, f"shards[{i}]")
            for i, s in enumerate(shards)
        ]
        self.epoch = self.shard_pos = self.offset = 0
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._pending: dict[tuple[int, int], Future] = {}  # the shard prepared ahead
        self._pool: ThreadPoolExecutor | None = None
        self._raw: dict[int, np.ndarray] = {}  # decompressed .bin.xz shards by index
        self._raw_lock = threading.Lock()

    # ------------------------------------------------------------------ stream

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def tokens_per_step(self) -> int:
        """Tokens the global cursor advances per ``next_batch`` (all ranks together)."""
        return self.world_size * self.batch_size * self.seq_len

    def shard_order(self, epoch: int) -> np.ndarray:
        """Original shard indices in the order epoch ``epoch`` visits them."""
        if not self.shuffle:
            return np.arange(self.num_shards)
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_shards)

    def _raw_shard(self, index: int) -> np.ndarray:
        src = self._shards[index]
        if isinstance(src, np.ndarray):
            return src
        with self._raw_lock:
            kept = self._raw.get(index)
        if kept is not None:
            return kept
        tokens = load_tokens(src)
        if tokens.size == 0:
            raise ValueError(f"TokenLoader: token shard {src} is empty")
        if shard_suffix(src) == ".bin.xz":  # decompressed in memory (the others are mapped)
            with self._raw_lock:
                if sum(t.nbytes for t in self._raw.values()) + tokens.nbytes <= _RAW_KEEP_BYTES:
                    self._raw[index] = tokens
        return tokens

    def _key(self, epoch: int, pos: int) -> tuple[tuple[int, int], int]:
        index = int(self.shard_order(epoch)[pos])
        return (epoch if self.shuffle else 0, index), index

    def _prepare(self, epoch: int, index: int) -> np.ndarray:
        """The shard's tokens as the stream reads them (documents shuffled if enabled); runs in
        the prefetch thread for the shard ahead."""
        tokens = self._raw_shard(index)
        if self.shuffle:
            tokens = shuffle_documents(tokens, np.random.default_rng((self.seed, epoch, index)))
        return tokens

    def _shard(self, epoch: int, pos: int) -> np.ndarray:
        """Tokens of the ``pos``-th shard of ``epoch`` (documents shuffled if enabled), cached;
        a shard read for the first time starts preparing the next one (``prefetch``)."""
        key, index = self._key(epoch, pos)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        job = self._pending.pop(key, None)
        tokens = job.result() if job is not None else self._prepare(epoch, index)
        self._cache[key] = tokens
        while len(self._cache) > _CACHE_SHARDS:
            self._cache.popitem(last=False)
        if self.prefetch:
            pos += 1
            if pos == self.num_shards:
                epoch, pos = epoch + 1, 0
            self._ahead(epoch, pos)
        return tokens

    def _ahead(self, epoch: int, pos: int) -> None:
        """Start preparing shard ``pos`` of ``epoch`` in the background (one at a time)."""
        key, index = self._key(epoch, pos)
        if key in self._cache or key in self._pending:
            return
        self._pending.clear()  # a shard no longer next (after a resume): dropped when done
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-ahead")
        self._pending[key] = self._pool.submit(self._prepare, epoch, index)

    def _walk(
        self, cursor: tuple[int, int, int], n: int, collect: bool
    ) -> tuple[tuple[int, int, int], list[np.ndarray]]:
        """Move ``cursor`` ``n`` tokens forward; return the new cursor (and the tokens if collect).

        The returned cursor is normalised so its offset lies inside its shard.
        """
        epoch, pos, offset = cursor
        pieces: list[np.ndarray] = []
        while True:
            shard = self._shard(epoch, pos)
            take = min(n, shard.size - offset)
            if collect and take > 0:
                pieces.append(shard[offset : offset + take])
            offset, n = offset + take, n - take
            if offset < shard.size:
                return (epoch, pos, offset), pieces
            pos, offset = pos + 1, 0
            if pos == self.num_shards:
                epoch, pos = epoch + 1, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y), each (batch_size, seq_len) int64 on CPU, y = x shifted by one."""
        span = self.batch_size * self.seq_len
        cursor = (self.epoch, self.shard_pos, self.offset)
        start, _ = self._walk(cursor, self.rank * span, collect=False)
        _, pieces = self._walk(start, span + 1, collect=True)
        self.epoch, self.shard_pos, self.offset = self._walk(
            cursor, self.tokens_per_step, collect=False
        )[0]
        buf = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return _to_xy(buf, self.batch_size, self.seq_len)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Cursor plus the settings it is only meaningful with; plain ints, same on every rank."""
        return {
            "epoch": int(self.epoch),
            "shard_pos": int(self.shard_pos),
            "offset": int(self.offset),
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_shards": self.num_shards,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a cursor saved by ``state_dict``; settings must match this loader's exactly."""
        missing = [k for k in ("epoch", "shard_pos", "offset", *_STATE_SETTINGS) if k not in state]
        if missing:
            raise ValueError(f"TokenLoader.load_state_dict: state is missing keys {missing}")
        mine = self.state_dict()
        diffs = [
            f"{k}: checkpoint {int(state[k])} vs loader {mine[k]}"
            for k in _STATE_SETTINGS
            if int(state[k]) != mine[k]
        ]
        if diffs:
            raise ValueError(
                "TokenLoader.load_state_dict: data settings differ from the checkpoint ("
                + "; ".join(diffs)
                + "); resuming exactly needs the same seed, world_size, batch_size, "
                "seq_len, shards and shuffle"
            )
        epoch, pos, offset = int(state["epoch"]), int(state["shard_pos"]), int(state["offset"])
        if epoch < 0 or not 0 <= pos < self.num_shards or offset < 0:
            raise ValueError(
                f"TokenLoader.load_state_dict: bad cursor epoch={epoch} shard_pos={pos} "
                f"offset={offset} (need epoch >= 0, 0 <= shard_pos < {self.num_shards}, "
                "offset >= 0)"
            )
        if offset >= self._shard(epoch, pos).size:
            raise ValueError(
                f"TokenLoader.load_state_dict: offset {offset} is past the end of shard_pos "
                f"{pos} ({self._shard(epoch, pos).size} tokens); were the shards changed?"
            )
        self.epoch, self.shard_pos, self.offset = epoch, pos, offset


def iter_eval_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches: non-overlapping seq_len windows from the start.

    Window ``i`` has inputs ``tokens[i*seq_len : (i+1)*seq_len]`` and the targets
    shifted by one. Windows are dealt out in global steps of
    ``world_size * batch_size``; rank r takes the r-th block of ``batch_size``.
    Iteration stops at the end of the data or after ``max_tokens`` input tokens
    (counted over all ranks). A final partial step is split as evenly as possible,
    so its batches may be smaller than ``batch_size`` and a rank may get none:
    sum loss and token counts locally and all-reduce once after the loop.
    """
    batch_size = _positive_int("batch_size", batch_size)
    seq_len = _positive_int("seq_len", seq_len)
    _check_rank(rank, world_size)
    tokens = _check_tokens(tokens, "iter_eval_batches")
    n_windows = (tokens.size - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, _positive_int("max_tokens", max_tokens) // seq_len)
    if n_windows == 0:
        raise ValueError(
            f"iter_eval_batches: no full window of seq_len={seq_len} (needs seq_len+1 = "
            f"{seq_len + 1} tokens and max_tokens >= seq_len); have {tokens.size} tokens, "
            f"max_tokens={max_tokens}"
        )
    per_step = world_size * batch_size
    for step_start in range(0, n_windows, per_step):
        count = min(per_step, n_windows - step_start)
        base, extra = divmod(count, world_size)  # a full step gives base == batch_size
        rows = base + (rank < extra)
        first = step_start + rank * base + min(rank, extra)
        if rows == 0:
            continue
        buf = tokens[first * seq_len : (first + rows) * seq_len + 1]
        yield _to_xy(buf, rows, seq_len)
