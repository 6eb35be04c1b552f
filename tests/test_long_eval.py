"""Long-context perplexity (eval.task=long_ppl) and its long-document sources, on the CPU: the
numbers equal a plain full-logits computation, hyper really approximates (and equals exact with
every column sampled), pretrained transformers models without a checkpoint, loader errors, and
the datasets path offline."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data import (
    EOT,
    LongDocConfig,
    TokenDataConfig,
    gpt2_encoding,
    load_long_documents,
    validation_documents,
    write_shard,
)
from models import GPT2Config, PosConfig
from trainer.config import AttnConfig
from trainer.evaluate import load_model, run_eval
from trainer.long_eval import ModelSource, check_lengths

from .helpers import compose_cfg, train

LENS = (64, 128)
HYPER = ["attn=hyper", "attn.options.inner=reference", "attn.options.min_seq_len=16",
         "attn.options.block_size=8", "attn.options.lsh_bits=2"]  # fmt: skip


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    """Three long .txt documents cut from the stdlib's own source, and one short one."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(root.glob("[a-c]*.py"))[:12])
    d = tmp_path_factory.mktemp("books")
    for i in range(3):
        (d / f"book{i}.txt").write_text(text[i * 3000 : (i + 1) * 3000])
    (d / "short.txt").write_text("def f():\n    return 1\n")
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, books):
    """llm_tiny (2 layers, TINY width) trained 2 steps at T=32 on the books (no corpus to
    tokenise); a high learning rate moves the weights off their near-uniform attention."""
    run = tmp_path_factory.mktemp("long") / "run"
    train(run, "model=llm_tiny", "pos=rope", "model.n_layer=2", "trainer.max_steps=2",
          "trainer.eval_every=100", "optim.lr=0.05", "data=files", f"data.train={books}",
          f"data.val={books / 'book2.txt'}")  # fmt: skip
    return run / "checkpoints" / "last.pt"


def long_ppl(tmp_path, *overrides):
    out = tmp_path / f"long_{len(list(tmp_path.glob('long_*.json')))}.json"
    cfg = compose_cfg(["eval.task=long_ppl", "eval.seq_lens=[64,128]", "eval.progress=false",
                       "eval.device=cpu", f"eval.out={out}", *overrides], "eval")  # fmt: skip
    r = run_eval(cfg)
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    return r


def full_logits_losses(model, docs, L):
    """Per-token losses of the same windows from the model's full logits (plain expression)."""
    out = []
    for tokens in docs:
        seq = torch.tensor(np.concatenate(([EOT], tokens[:128])).astype(np.int64))
        for i in range(128 // L):
            w = seq[i * L : (i + 1) * L + 1]
            with torch.no_grad():
                logits = model(w[None, :-1])[0]
            out.append(F.cross_entropy(logits.double(), w[1:], reduction="none"))
    return torch.stack(out)  # (windows, L)


def test_long_ppl_exact_vs_hyper_one_table(ckpt, books, tmp_path, capsys):
    r = long_ppl(tmp_path, f"ckpt={ckpt}", "data=long_text", f"data.path={books}", *HYPER,
                 "attn.options.sample_size=4", "eval.swap_layers=last:1")  # fmt: skip
    docs = r["documents"]
    assert (docs["used"], docs["short"], docs["seen"]) == (3, 1, 4)
    assert docs["names"] == [str(books / f"book{i}.txt") for i in range(3)]
    assert r["variants"]["own"]["attn"] == "sdpa" and r["variants"]["own"]["head"] == "chunked"
    assert r["variants"]["override"]["swap_layers"] == "last:1"
    model, _, _ = load_model(ckpt, torch.device("cpu"))
    enc = gpt2_encoding()
    texts = [enc.encode_ordinary((books / f"book{i}.txt").read_text()) for i in range(3)]
    for L in LENS:
        own, hyp = r["long_ppl"]["own"][str(L)], r["long_ppl"]["override"][str(L)]
        assert own["tokens"] == hyp["tokens"] == 3 * 128 and own["windows"] == 3 * 128 // L
        ref = full_logits_losses(model, [np.array(t) for t in texts], L)
        assert own["loss"] == pytest.approx(ref.mean().item(), rel=1e-5)
        assert own["loss_last_quarter"] == pytest.approx(ref[:, 3 * L // 4 :].mean().item(), 1e-5)
        quarters = ref.view(ref.shape[0], 4, L // 4).mean((0, 2)).tolist()
        assert own["loss_by_quarter"] == pytest.approx(quarters, rel=1e-5)
        assert own["ppl"] == pytest.approx(np.exp(own["loss"]), rel=1e-9)
        assert abs(hyp["loss"] - own["loss"]) > 5e-5, (L, hyp["loss"], own["loss"])  # ~3e-4
    table = capsys.readouterr().out
    assert "hyper on last:1" in table and "last 1/4" in table and "3 documents x 128" in table


def test_hyper_with_every_column_sampled_equals_exact(ckpt, books, tmp_path):
    r = long_ppl(tmp_path, f"ckpt={ckpt}", "data=long_text", f"data.path={books}", *HYPER,
                 "attn.options.sample_size=1000000", "eval.swap_layers=last_half")  # fmt: skip
    assert r["variants"]["override"]["swap_layers"] == "last:1"
    for L in LENS:
        own, hyp = r["long_ppl"]["own"][str(L)], r["long_ppl"]["override"][str(L)]
        assert hyp["loss"] == pytest.approx(own["loss"], abs=1e-6)  # ~1e-8 (sample_size=4: 3e-4)
        assert hyp["loss_by_quarter"] == pytest.approx(own["loss_by_quarter"], abs=1e-6)


def test_pretrained_hf_model_without_checkpoint(books, tmp_path):
    import transformers

    from models import LLMConfig
    from models.llm import hf_llama_config

    hf_cfg = hf_llama_config(LLMConfig(n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    r = long_ppl(tmp_path, "model=llm_hf", f"model.hf_name={tmp_path / 'hf'}", "data=long_text",
                 f"data.path={books}", "eval.max_docs=1", *HYPER,
                 "attn.options.sample_size=1000000", "eval.swap_layers=last_half")  # fmt: skip
    assert r["ckpt"] is None and r["variants"]["own"]["label"] == "transformers' own"
    assert r["documents"]["used"] == 1
    tokens = gpt2_encoding().encode_ordinary((books / "book0.txt").read_text())
    seq = torch.tensor([EOT, *tokens[:128]])[None]
    with torch.no_grad():
        ref = hf(input_ids=seq[:, :-1], labels=seq[:, :-1]).logits[0]
    ref_loss = F.cross_entropy(ref.double(), seq[0, 1:]).item()
    own, hyp = r["long_ppl"]["own"]["128"], r["long_ppl"]["override"]["128"]
    assert own["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert hyp["loss"] == pytest.approx(own["loss"], abs=1e-5)


def test_token_files_split_at_eot_and_named_by_index(tmp_path):
    """The Gutenberg layout: uint16 tokens, EOT after each book, index.json naming them; long
    books are selected and the short ones counted (also through data=gutenberg-like configs)."""
    rng = np.random.default_rng(0)
    lens, names = [300, 50, 400], ["A/one.txt", "B/two.txt", "C/three.txt"]
    books = [rng.integers(0, 50000, n).astype(np.uint16) for n in lens]
    write_shard(tmp_path / "val.bin", np.concatenate([np.append(b, EOT) for b in books]))
    index = {"val": {"file": "val.bin", "docs": [{"path": n} for n in names]}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    cfg = LongDocConfig(name="t", kind="tokens", path=str(tmp_path / "val.bin"))
    docs, stats = load_long_documents(cfg, min_tokens=256)
    assert [d.name for d in docs] == ["A/one.txt", "C/three.txt"]
    assert np.array_equal(docs[1].tokens, books[2]) and (stats.short, stats.longest) == (1, 400)
    shards = TokenDataConfig(name="g", kind="shards", train="x", val=str(tmp_path / "val.bin"))
    assert [d.name for d in validation_documents(shards)] == names
    with pytest.raises(ValueError, match="none of its 3 documents has 500 tokens .* has 400"):
        load_long_documents(cfg, min_tokens=500)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path.*nowhere"):
        load_long_documents(LongDocConfig(kind="text", path=str(tmp_path / "nowhere")),
                            min_tokens=8)  # fmt: skip
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt"):
        load_long_documents(LongDocConfig(kind="text", path=str(tmp_path / "empty")), min_tokens=8)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no documents"):
        load_long_documents(
            LongDocConfig(kind="text", path=str(tmp_path / "e.jsonl")), min_tokens=8
        )
    with pytest.raises(ValueError, match="data.kind='web'"):
        load_long_documents(LongDocConfig(kind="web", path="x"), min_tokens=8)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_long_documents(LongDocConfig(kind="hf", path="./missing_dir"), min_tokens=8)


def test_length_and_swap_errors(ckpt, books, tmp_path):
    gpt2 = ModelSource(GPT2Config(max_seq_len=64), PosConfig(name="learned"), AttnConfig(),
                       {}, None, {})  # fmt: skip
    with pytest.raises(ValueError, match="pos=learned has model.max_seq_len=64"):
        check_lengths(OmegaConf.create({"seq_lens": [64, 128]}), gpt2)
    ours = ModelSource(
        GPT2Config(max_seq_len=64), PosConfig(name="rope"), AttnConfig(), {}, None, {}
    )
    assert check_lengths(OmegaConf.create({"seq_lens": [128, 4096]}), ours) == ([128, 4096], 4096)
    assert check_lengths(OmegaConf.create({"seq_lens": [64, 32]}), gpt2) == ([32, 64], 64)
    with pytest.raises(ValueError, match="eval.doc_tokens=100 is below"):
        check_lengths(OmegaConf.create({"seq_lens": [64, 128], "doc_tokens": 100}), ours)
    common = [f"ckpt={ckpt}", "data=long_text", f"data.path={books}"]
    with pytest.raises(ValueError, match="eval.swap_layers needs attn="):
        long_ppl(tmp_path, *common, "eval.swap_layers=last:1")
    with pytest.raises(ValueError, match="eval.swap_layers='last:5': model.swap_layers"):
        long_ppl(tmp_path, *common, "attn=sdpa", "eval.swap_layers=last:5")
    with pytest.raises(ValueError, match="none of its 4 documents has 4096 tokens"):
        long_ppl(tmp_path, *common, "eval.seq_lens=[4096]")
    with pytest.raises(ValueError, match="attn= is read by eval.task=long_ppl only"):
        run_eval(compose_cfg([f"ckpt={ckpt}", "attn=hyper"], "eval"))
    with pytest.raises(ValueError, match="eval.task='long'; valid: ppl"):
        run_eval(compose_cfg([f"ckpt={ckpt}", "eval.task=long"], "eval"))


def test_datasets_sources_offline(tmp_path):
    """kind=hf without the hub: a save_to_disk dataset (named by its title column), a saved
    DatasetDict split, a local parquet file through datasets' builder; a hub name offline
    raises an error that says what to do."""
    import datasets

    texts = ["word " * 300, "short", "other words " * 200]
    ds = datasets.Dataset.from_dict({"text": texts, "short_book_title": ["A", "B", "C"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    docs, stats = load_long_documents(LongDocConfig(path=str(tmp_path / "saved")), min_tokens=100)
    assert [d.name for d in docs] == ["A", "C"] and stats.short == 1
    assert docs[0].tokens.tolist() == gpt2_encoding().encode_ordinary(texts[0])
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "dict"))
    cfg = LongDocConfig(path=str(tmp_path / "dict"), split="validation")
    assert len(load_long_documents(cfg, min_tokens=100)[0]) == 2
    with pytest.raises(ValueError, match="has splits \\['validation'\\]"):
        load_long_documents(LongDocConfig(path=str(tmp_path / "dict")), min_tokens=100)
    ds.to_parquet(str(tmp_path / "books.parquet"))
    cfg = LongDocConfig(path=str(tmp_path / "books.parquet"), cache_dir=str(tmp_path / "c"))
    assert [d.name for d in load_long_documents(cfg, min_tokens=100)[0]] == ["A", "C"]
    with pytest.raises(ValueError, match="text_field='body' is not a column"):
        load_long_documents(LongDocConfig(path=str(tmp_path / "saved"), text_field="body"),
                            min_tokens=1)  # fmt: skip
    with pytest.raises(RuntimeError, match="need the network"):
        load_long_documents(LongDocConfig(), min_tokens=100)  # deepmind/pg19, offline here
