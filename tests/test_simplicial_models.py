"""attn=simplicial in the models (issue 7, point 3): every k-th layer 2-simplicial, its extra
K2/V2 projections, causality, kernel = reference inside a model, and a run of the trainer."""

from __future__ import annotations

import json

import pytest
import torch

import ops
from models import GPT2, GPT2Config, PosConfig
from models.llm import LLM, LLMConfig
from models.simplicial import SimplicialSelfAttention

from .helpers import train


def gpt2(attn, n_layer=4, pos="learned"):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_head=4, n_kv_head=2, d_model=64, vocab_size=50304,
                     max_seq_len=32, loss="torch")  # fmt: skip
    return GPT2(cfg, attn, PosConfig(name=pos)).eval()


def test_every_kth_layer_is_simplicial_with_k2_v2_projections():
    attn = ops.build("simplicial", every=2, w1=3, w2=5, impl="reference", base="reference")
    model = gpt2(attn)
    kinds = [type(b.attn) is SimplicialSelfAttention for b in model.blocks]
    assert kinds == [False, True, False, True]
    # q: 4 heads, k1, v1, k2, v2: 2 k/v heads each, head dim 16
    assert model.blocks[1].attn.qkv.weight.shape == ((4 + 4 * 2) * 16, 64)
    assert model.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert ops.simplicial_plan(attn).every == 2 and ops.simplicial_plan(ops.build("sdpa")) is None


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_changing_a_future_token_changes_no_earlier_logit(pos):
    model = gpt2(ops.build("simplicial", every=2, w1=3, w2=5, impl="reference", base="reference"),
                 pos=pos)  # fmt: skip
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    idx2 = idx.clone()
    idx2[:, 13] = (idx2[:, 13] + 1) % 96
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :13], b[:, :13], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a[:, 13:], b[:, 13:])


def test_windows_longer_than_the_sequence_are_the_same_attention():
    """w >= T sees every earlier token: the model runs (shortened windows, cached) and equals
    the model whose windows are exactly T."""
    long = gpt2(ops.build("simplicial", every=2, w1=64, w2=100, impl="reference", base="reference"))
    exact = gpt2(ops.build("simplicial", every=2, w1=12, w2=12, impl="reference", base="reference"))
    exact.load_state_dict(long.state_dict())
    idx = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(long(idx), exact(idx), rtol=0, atol=0)


def test_triton_kernels_equal_the_reference_inside_the_model_with_gradients():
    """The Triton 2-simplicial kernels (interpreter) and the plain PyTorch reference in the same
    2-layer GPT-2 (layer 1 simplicial): logits and every parameter's gradient."""
    grads = []
    for impl in ("triton", "reference"):
        model = gpt2(ops.build("simplicial", every=2, w1=4, w2=6, impl=impl, base="reference"),
                     n_layer=2)  # fmt: skip
        idx = torch.randint(0, 96, (1, 18), generator=torch.Generator().manual_seed(3))
        loss = model(idx, idx)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_llm_swapped_layers_get_simplicial_every_kth():
    cfg = LLMConfig(n_layer=4, n_head=4, n_kv_head=2, d_model=64, d_ff=96, vocab_size=50304,
                    max_seq_len=32, swap_layers="last:2", loss="torch")  # fmt: skip
    attn = ops.build("simplicial", every=2, w1=3, w2=5, impl="reference", base="reference")
    model = LLM(cfg, attn, PosConfig(name="rope")).eval()
    kinds = [type(b.attn) is SimplicialSelfAttention for b in model.blocks]
    assert kinds == [False, False, False, True]  # layer 1 is simplicial but not swapped
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.isfinite(model(idx)).all()


def test_bad_options_and_combinations():
    with pytest.raises(ValueError, match="every=0"):
        ops.build("simplicial", every=0)
    with pytest.raises(ValueError, match="base='simplicial'"):
        ops.build("simplicial", base="simplicial")
    with pytest.raises(ValueError, match="unknown option"):
        ops.build("simplicial", window=3)
    with pytest.raises(ValueError, match="head_dim 24"):
        GPT2(GPT2Config(n_layer=2, n_head=2, d_model=48), ops.build("simplicial", every=1),
             PosConfig(name="none"))  # fmt: skip


def test_gpt2_trains_with_simplicial_attention_from_config(tmp_path):
    """attn=simplicial from the command line: the shared trainer runs it and the loss falls."""
    s = train(tmp_path, "attn=simplicial", "attn.options.impl=reference", "attn.options.every=1",
              "attn.options.w1=8", "attn.options.w2=16", "model.n_head=2", "model.d_model=32",
              "trainer.max_steps=6", "trainer.eval_every=6", "trainer.eval_tokens=256",
              "optim.lr=3e-3")  # fmt: skip
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
    assert s["finished"] and s["val_loss"] < first - 0.2, (first, s["val_loss"])
