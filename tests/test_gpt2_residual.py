"""model.residual: the GPT-2 residual stream in float32 or in the autocast dtype."""

import pytest
import torch

import ops
from models import GPT2Config, PosConfig, build_model


def pair():
    """Two tiny GPT-2s with the same weights, residual float32 and autocast."""
    models = []
    for residual in ("float32", "autocast"):
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_head=2, d_model=32, max_seq_len=16, residual=residual,
                         loss="torch")  # fmt: skip
        models.append(build_model(cfg, ops.build("sdpa"), PosConfig(name="rope", kernel="torch")))
    return models


def block_input_dtypes(model, idx, tgt, autocast: bool):
    seen = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype)) for b in model.blocks
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(idx, tgt)
    for h in hooks:
        h.remove()
    return loss, seen


def test_autocast_residual_runs_the_stream_in_bf16_and_stays_close():
    f32, bf16 = pair()
    g = torch.Generator().manual_seed(1)
    idx, tgt = (torch.randint(0, 50257, (2, 16), generator=g) for _ in range(2))
    loss_a, seen_a = block_input_dtypes(f32, idx, tgt, autocast=True)
    loss_b, seen_b = block_input_dtypes(bf16, idx, tgt, autocast=True)
    assert seen_a == [torch.float32] * 2 and seen_b == [torch.bfloat16] * 2
    assert loss_a.dtype == loss_b.dtype == torch.float32
    # same weights, bf16 rounding of the stream: close, but not the same arithmetic
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-2, atol=0)
    loss_a.backward()
    loss_b.backward()
    for (name, pa), pb in zip(f32.named_parameters(), bf16.parameters()):
        assert pb.grad is not None and pb.grad.dtype == torch.float32, name
        assert torch.isfinite(pb.grad).all(), name
        cos = torch.nn.functional.cosine_similarity(pa.grad.flatten(), pb.grad.flatten(), 0)
        assert cos > 0.99, (name, float(cos))


def test_without_autocast_both_settings_are_the_same_model():
    f32, bf16 = pair()
    idx, tgt = torch.randint(0, 50257, (2, 2, 16)).unbind(0)
    loss_a, seen_a = block_input_dtypes(f32, idx, tgt, autocast=False)
    loss_b, seen_b = block_input_dtypes(bf16, idx, tgt, autocast=False)
    assert seen_a == seen_b == [torch.float32] * 2
    assert torch.equal(loss_a, loss_b)


def test_unknown_residual_is_refused():
    with pytest.raises(ValueError, match="model.residual='half'; valid: float32, autocast"):
        build_model(GPT2Config(residual="half"), ops.build("sdpa"), PosConfig(name="rope"))
