"""models/llm.py: our Llama equals transformers' LlamaForCausalLM on the same weights (GQA, RoPE
scalings); the AttentionInterface swap on tiny random transformers models (no download) gives
the model's own logits with exact backends, on all or only chosen layers; bad options raise
ValueErrors naming them; both kinds train through the shared trainer."""

import dataclasses
import json

import pytest
import torch

import ops
from models import build_model
from models.hf import swap_attention
from models.llm import (
    LLM,
    LLMConfig,
    from_hf_state_dict,
    hf_llama_config,
    llm_config_from_hf,
    parse_swap_layers,
    rope_inv_freq,
    to_hf_state_dict,
)
from models.positions import PosConfig
from trainer import config as config_lib
from trainer import run

from .helpers import TINY, compose_cfg, train

transformers = pytest.importorskip("transformers")
ROPE = PosConfig(name="rope", kernel="torch")


def small_cfg(**kw) -> LLMConfig:
    base = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, max_seq_len=64)
    return LLMConfig(**{**base, **kw})


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough for peaked attention, norms away from one (catches mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def hf_llama(n_layer=2, seed=0, **kw):
    """A tiny random LlamaForCausalLM on transformers' sdpa attention."""
    cfg = hf_llama_config(small_cfg(n_layer=n_layer, **kw), attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    randomize_(model, seed)
    return model


def ids(b=2, t=24, seed=0):
    return torch.randint(0, 50257, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "scaling, tied",
    [("none", True), ("linear", False), ("llama3", True)],
)
def test_our_llama_matches_transformers(scaling, tied):
    rope = {
        "linear": dict(rope_factor=4.0),
        "llama3": dict(rope_factor=4.0, rope_original_max_seq_len=64),
    }.get(scaling, {})
    cfg = small_cfg(rope_scaling=scaling, tie_embeddings=tied, **rope)  # fmt: skip
    ours = LLM(cfg, ops.build("sdpa"), ROPE).eval()
    randomize_(ours)
    theirs = transformers.LlamaForCausalLM(hf_llama_config(cfg, attn_implementation="eager"))
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg))
    x = ids()
    with torch.no_grad():
        want = theirs.eval()(input_ids=x).logits
        got = ours(x)
    assert want.abs().max() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    back = from_hf_state_dict(theirs.state_dict(), cfg)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    assert llm_config_from_hf(theirs.config, name=cfg.name) == cfg
    inv, plain = rope_inv_freq(cfg), rope_inv_freq(small_cfg())
    ratio = (plain / inv).tolist()
    if scaling == "llama3":  # head dim 16, original context 64: all three bands present
        assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(4.0) and 1 < ratio[2] < 4
    elif scaling == "linear":
        assert ratio == pytest.approx([4.0] * 8)


def counting(backend):
    """The backend with a call counter (to prove the swap is what ran)."""
    fn, calls = backend._fn, []

    def wrapped(*a, **k):
        calls.append(a[0].shape)
        return fn(*a, **k)

    backend._fn = wrapped
    return backend, calls


@pytest.mark.parametrize("attn", ["sdpa", "reference", "flash"])
def test_attention_interface_swap_gives_the_models_logits(attn):
    model = hf_llama(n_layer=2)
    x = ids(t=20)
    with torch.no_grad():
        want = model(input_ids=x).logits
        backend, calls = counting(ops.build(attn))
        assert swap_attention(model, backend, "all") == [0, 1]
        got = model(input_ids=x).logits
    assert len(calls) == 2 and calls[0] == (2, 20, 4, 16)  # heads-last q, once per layer
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_swap_only_the_last_layers():
    model = hf_llama(n_layer=3, seed=1)
    x = ids(t=16)
    with torch.no_grad():
        want = model(input_ids=x).logits
        backend, calls = counting(ops.build("reference"))
        assert swap_attention(model, backend, "last:1") == [2]
        got = model(input_ids=x).logits
    impl = [layer.self_attn.config._attn_implementation for layer in model.model.layers]
    assert impl == ["sdpa", "sdpa", "attnlab_reference"] and len(calls) == 1
    assert model.config._attn_implementation == "sdpa"  # masks still built for sdpa
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert parse_swap_layers([0, -1], 4) == [0, 3] and parse_swap_layers("none", 4) == []


def test_padding_masks_go_to_bias_backends_and_are_refused_by_the_others():
    model = hf_llama(n_layer=2, seed=2)
    x, mask = ids(t=12), torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding of the first sequence
    with torch.no_grad():
        want = model(input_ids=x, attention_mask=mask).logits
        swap_attention(model, ops.build("sdpa"), "all")
        got = model(input_ids=x, attention_mask=mask).logits
        torch.testing.assert_close(got[0, 3:], want[0, 3:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        swap_attention(model, ops.build("flash"), "all")
        with pytest.raises(ValueError, match="'flash' takes no attention mask.*attn=sdpa"):
            model(input_ids=x, attention_mask=mask)
        model(input_ids=x, attention_mask=torch.ones_like(mask))  # all ones: plain causal


def test_our_llama_swap_layers_and_nope():
    built = LLM(small_cfg(n_layer=3, swap_layers="last:2"), ops.build("reference"), ROPE)
    assert [b.attn.attention.name for b in built.blocks] == ["sdpa", "reference", "reference"]
    nope = LLM(small_cfg(), ops.build("sdpa"), PosConfig(name="none"))
    assert nope.rope is None and nope(ids(t=8)).shape == (2, 8, 50304)


def test_fused_rotary_kernel_matches_torch_path():
    cfg = small_cfg(rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=32)
    a = LLM(cfg, ops.build("sdpa"), ROPE)
    b = LLM(cfg, ops.build("sdpa"), PosConfig(name="rope", kernel="triton"))
    b.load_state_dict(a.state_dict())
    x, y = ids(t=16), ids(t=16, seed=1)
    la, lb = a(x, y), b(x, y)
    la.backward(), lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    ga, gb = a.blocks[0].attn.qkv.weight.grad, b.blocks[0].attn.qkv.weight.grad
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.swap_layers=last:9"], "model.swap_layers='last:9' is not valid for 4 layers"),
        (["model.swap_layers=first:2"], "model.swap_layers='first:2'.*use all, none, last:"),
        (["model.swap_layers=[1,1]"], "model.swap_layers=\\[1, 1\\] is not valid"),
        (["model.rope_scaling=yarn"], "model.rope_scaling='yarn'; valid: none, linear, llama3"),
        (["model.n_kv_head=3"], "model.n_kv_head=3 must divide model.n_head=4"),
        (["model.head_dim=15"], "RoPE needs an even head dim; got 15"),
        (["model.rope_scaling=llama3", "model.rope_high_freq_factor=0.5"],
         "model.rope_low_freq_factor=1.0 must be positive and below model.rope_high"),
        (["model.loss=fast"], "model.loss='fast'; valid: auto, torch, fused"),
        (["pos=carope"], "own RoPE.*pos=carope would be a second encoding: use pos=rope"),
        (["pos=learned"], "pos=learned would be a second encoding"),
        (["pos=rope", "pos.base=500"], "pos.base=500.0 is not read.*set model.rope_base"),
        (["model=llm_hf"], "model.hf_name is empty: give a Hugging Face hub name"),
        (["model.hf_name=x", "model.n_layer=2"], "model.n_layer is not read when model.hf_name"),
        (["model=llm_hf", "model.hf_name=x", "model.hf_dtype=fp8"], "model.hf_dtype='fp8'"),
        (["model=llm_hf", "model.hf_name=x", "pos=none"], "keeps its own positions.*pos=rope"),
        (["+model.rope_type=x"], "bad config in 'model'.*rope_type.*\\(LLMConfig\\)"),
    ],
)  # fmt: skip
def test_bad_options_raise_value_errors_naming_them(overrides, match):
    cfg = compose_cfg(["model=llm_tiny", "pos=rope", *overrides])
    with pytest.raises(ValueError, match=match):
        rc = config_lib.load(cfg)
        with torch.device("meta"):
            build_model(rc.model, ops.build(rc.attn.name, **rc.attn.options), rc.pos)


def test_config_sizes():
    counts = {}
    for m in ("llm_tiny", "llm_small", "llm_1b"):
        rc = config_lib.load(compose_cfg([f"model={m}", "pos=rope"]))
        with torch.device("meta"):
            counts[m] = build_model(rc.model, ops.build("sdpa"), rc.pos).num_params()
    assert 7.0e6 < counts["llm_tiny"] < 7.5e6 and 124e6 < counts["llm_small"] < 126e6
    assert counts["llm_1b"] == 1_235_814_400  # Llama-3.2-1B's count (tied embedding)


def test_llm_tiny_trains_through_the_trainer(tmp_path):
    s = train(tmp_path, "model=llm_tiny", "pos=rope", "trainer.max_steps=3",
              "model.swap_layers=last:1", "attn=reference")  # fmt: skip
    assert s["final_step"] == 3 and s["finished"] and 5.0 < s["val_loss"] < 12.0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert (
        "blocks.0.attn.qkv.weight" in ckpt["model"] and ckpt["config"]["model"]["family"] == "llm"
    )


def test_pretrained_hf_model_trains_through_the_trainer(tmp_path):
    hf_llama(n_layer=2).save_pretrained(tmp_path / "hf")
    not_model = [o for o in TINY if not o.startswith("model.")]
    cfg = compose_cfg([*not_model, f"trainer.run_dir={tmp_path / 'run'}", "model=llm_hf",
                       f"model.hf_name={tmp_path / 'hf'}", "model.swap_layers=[1]", "pos=rope",
                       "attn=reference", "trainer.max_steps=2"])  # fmt: skip
    s = run(cfg)
    assert s["final_step"] == 2 and s["val_loss"] < 100.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_step"] == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert "hf.model.layers.1.self_attn.q_proj.weight" in ckpt["model"]
    assert list(ckpt["attention"]) == ["hf.model.layers.1.self_attn"]  # our backend, found


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0)


@pytest.mark.gpu
def test_gpu_fused_paths_match_plain_ones_in_bf16(tmp_path):
    """CUDA, bf16 autocast: fused rotary + fused loss + flash = PyTorch rotary + loss + sdpa;
    then three trainer steps of llm_tiny on flash with the defaults (fused paths on CUDA)."""
    cfg = small_cfg(n_head=8, n_kv_head=2, d_model=512, d_ff=1024, rope_scaling="llama3",
                    rope_factor=8.0, rope_original_max_seq_len=256, max_seq_len=1024)  # fmt: skip
    torch.manual_seed(0)
    a = LLM(dataclasses.replace(cfg, loss="torch"), ops.build("sdpa"), ROPE).cuda()
    b = LLM(dataclasses.replace(cfg, loss="fused"), ops.build("flash"),
            PosConfig(name="rope", kernel="triton")).cuda()  # fmt: skip
    b.load_state_dict(a.state_dict())
    x, y = ids(4, 512).cuda(), ids(4, 512, seed=1).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        la, lb = a(x, y), b(x, y)
    (la + lb).backward()
    assert abs(la.item() - lb.item()) < 2e-2
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert _cosine(pa.grad, pb.grad) > 0.99, name
    s = train(tmp_path, "model=llm_tiny", "pos=rope", "attn=flash", "trainer.max_steps=3")
    assert s["final_step"] == 3 and 5.0 < s["val_loss"] < 12.0


@pytest.mark.gpu
def test_gpu_swap_flash_into_a_bf16_transformers_model():
    model = hf_llama(n_layer=2, d_model=256, n_head=4, n_kv_head=2).cuda().to(torch.bfloat16)
    x = ids(2, 1024).cuda()
    with torch.no_grad():
        want = model(input_ids=x).logits.float()
        backend, calls = counting(ops.build("flash"))
        swap_attention(model, backend, "last:1")
        got = model(input_ids=x).logits.float()
    assert len(calls) == 1 and _cosine(got, want) > 0.999
    assert (got - want).abs().max() < 0.05 * want.abs().max()
