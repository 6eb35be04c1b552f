"""Positional encodings: CARoPE = RoPE at initialisation, CARoPE gradients, length limits."""

import math

import pytest
import torch

import ops
from models import GPT2Config, PosConfig, build_model
from models.positions import CARoPE, RotaryPositions, apply_rotary


def tiny_cfg(**kw):
    base = dict(n_layer=2, n_head=4, d_model=32, max_seq_len=64)
    base.update(kw)
    return GPT2Config(**base)


def test_carope_phase_is_rope_phase_from_one_at_init():
    pos = CARoPE(
        PosConfig(name="carope"), d_model=32, n_kv_heads=4, head_dim=16, n_layers=2
    ).double()
    pos.reset_parameters()  # the bias in float64 (a float32 bias is exact only to ~1e-7)
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    phase = pos.phases(1, x, x)  # (B, T, H, D/2)
    theta = 10000.0 ** (-2.0 * torch.arange(8, dtype=torch.float64) / 16)
    want = torch.arange(1, 51, dtype=torch.float64)[:, None] * theta  # (T, D/2): (m+1) theta_i
    torch.testing.assert_close(phase, want[None, :, None].expand_as(phase), rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("n_kv_head", [None, 2])
@pytest.mark.parametrize("carope_input", ["layer", "embedding"])
def test_carope_model_equals_rope_model_at_init(n_kv_head, carope_input):
    torch.manual_seed(0)
    cfg = tiny_cfg(n_kv_head=n_kv_head)
    attn = ops.build("reference")
    rope = build_model(cfg, attn, PosConfig(name="rope")).double()
    with torch.no_grad():  # sharpen attention so that any phase error would show
        for blk in rope.blocks:
            blk.attn.qkv.weight.mul_(25.0)
    carope = build_model(cfg, attn, PosConfig(name="carope", carope_input=carope_input)).double()
    carope.pos.reset_parameters()  # float64 bias
    missing, unexpected = carope.load_state_dict(rope.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("pos.proj") for k in missing)
    idx = torch.randint(0, 50257, (2, 40))
    a, b = rope(idx), carope(idx)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # positions matter in this model: the same tokens under a 1e-4 phase change differ
    with torch.no_grad():
        carope.pos.proj[0].bias.add_(1e-4)
    assert (carope(idx) - a).abs().max() > 1e-6


def test_carope_differs_from_rope_once_w_is_trained():
    torch.manual_seed(1)
    cfg = tiny_cfg()
    rope = build_model(cfg, ops.build("reference"), PosConfig(name="rope")).double()
    carope = build_model(cfg, ops.build("reference"), PosConfig(name="carope")).double()
    carope.load_state_dict(rope.state_dict(), strict=False)
    with torch.no_grad():
        carope.pos.proj[0].weight.normal_(0, 0.5)
    idx = torch.randint(0, 50257, (1, 20))
    assert (rope(idx) - carope(idx)).abs().max() > 1e-4


@pytest.mark.parametrize("shared,bias", [(False, True), (True, False)])
def test_carope_gradients_match_finite_differences(shared, bias):
    torch.manual_seed(2)
    pos = CARoPE(
        PosConfig(name="carope", carope_shared=shared, carope_bias=bias),
        d_model=6,
        n_kv_heads=2,
        head_dim=4,
        n_layers=2,
    ).double()
    with torch.no_grad():
        for p in pos.proj:
            p.weight.normal_(0, 0.7)
    assert len(pos.proj) == (1 if shared else 2)
    x = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 5, 2, 4, dtype=torch.float64, requires_grad=True)
    params = list(pos.proj[-1].parameters())

    def f(x, q, k, *ps):
        return pos.rotate(q, k, layer=1, x=x, x0=x)

    assert torch.autograd.gradcheck(f, (x, q, k, *params), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_carope_projection_precision_under_autocast():
    """carope_proj: 'fp32' computes x W in fp32 under bf16 autocast (equal to no autocast),
    'autocast' as a bf16 GEMM (close: bf16 rounding of x and W); log f is fp32 either way, the
    bias is added in fp32 (W = 0 gives RoPE's frequencies exactly), bad values are refused."""
    torch.manual_seed(4)
    x = torch.randn(2, 9, 16)
    got, plain = {}, {}
    for proj in ("fp32", "autocast"):
        pos = CARoPE(PosConfig(name="carope", carope_proj=proj), d_model=16, n_kv_heads=2,
                     head_dim=8, n_layers=1)  # fmt: skip
        want_init = pos.log_frequencies(0, x, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            init = pos.log_frequencies(0, x, x)
        assert init.dtype == torch.float32
        assert torch.equal(init, want_init)  # W = 0: only the fp32 bias
        with torch.no_grad():
            pos.proj[0].weight.normal_(0, 0.3)
        plain[proj] = pos.log_frequencies(0, x, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got[proj] = pos.log_frequencies(0, x, x)
        assert got[proj].dtype == torch.float32
    assert torch.equal(got["fp32"], plain["fp32"])
    err = (got["autocast"] - plain["autocast"]).abs().max().item()
    assert 0 < err < 5e-3, err
    with pytest.raises(ValueError, match="carope_proj='fp16'.*autocast, fp32"):
        CARoPE(PosConfig(name="carope", carope_proj="fp16"), d_model=16, n_kv_heads=2,
               head_dim=8, n_layers=1)  # fmt: skip


def test_rotation_is_norm_preserving_and_relative():
    rope = RotaryPositions(8, 10000.0)
    q = torch.randn(1, 12, 2, 8, dtype=torch.float64)
    cos, sin = rope.angles(12, "cpu", torch.float64)
    rq = apply_rotary(q, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # same vector at positions (i, j) and (i+3, j+3): same dot product
    v = torch.randn(8, dtype=torch.float64)
    r = apply_rotary(v.expand(1, 12, 1, 8).contiguous(), cos, sin)[0, :, 0]
    assert math.isclose(float(r[2] @ r[5]), float(r[6] @ r[9]), rel_tol=1e-12)


@pytest.mark.parametrize("name", ["none", "learned", "sinusoidal", "rope", "carope"])
def test_every_position_runs_and_learns_shapes(name):
    torch.manual_seed(3)
    m = build_model(tiny_cfg(), ops.build("sdpa"), PosConfig(name=name))
    idx = torch.randint(0, 50257, (2, 16))
    loss = m(idx, idx)
    loss.backward()
    loss = loss.detach()
    assert math.isfinite(float(loss)) and abs(float(loss) - math.log(50304)) < 1.0
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_learned_positions_refuse_long_sequences():
    m = build_model(tiny_cfg(max_seq_len=8), ops.build("sdpa"), PosConfig(name="learned"))
    with pytest.raises(ValueError, match="sequence length 9 exceeds pos=learned.*max_seq_len=8"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_unknown_position_and_bad_options():
    with pytest.raises(ValueError, match="unknown position encoding pos.name='alibi'.*carope"):
        build_model(tiny_cfg(), ops.build("sdpa"), PosConfig(name="alibi"))
    with pytest.raises(ValueError, match="carope_input='tokens'.*layer, embedding"):
        build_model(tiny_cfg(), ops.build("sdpa"), PosConfig(name="carope", carope_input="tokens"))
    with pytest.raises(ValueError, match="even head dim"):
        build_model(tiny_cfg(d_model=36, n_head=4), ops.build("sdpa"), PosConfig(name="rope"))


@pytest.mark.parametrize("angle_shape", [(2, 5, 2, 3), (1, 5, 1, 3)])
def test_rotary_backward_matches_finite_differences(angle_shape):
    """The hand-written backward (inverse rotation, angle grads summed over q groups)."""
    torch.manual_seed(4)
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    ang = torch.randn(*angle_shape, dtype=torch.float64)
    cos, sin = ang.cos().requires_grad_(), ang.sin().requires_grad_()
    assert torch.autograd.gradcheck(apply_rotary, (x, cos, sin), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["rope", "carope"])
def test_triton_rotary_kernels_match_the_torch_path_in_the_model(name):
    """pos.kernel=triton (ops/rotary.py, interpreter here) = pos.kernel=torch: logits and grads."""
    torch.manual_seed(6)
    cfg = tiny_cfg(n_kv_head=2)
    a = build_model(cfg, ops.build("sdpa"), PosConfig(name=name))
    if name == "carope":
        with torch.no_grad():
            for p in a.pos.proj:
                p.weight.normal_(0, 0.3)
    b = build_model(cfg, ops.build("sdpa"), PosConfig(name=name, kernel="triton"))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 50257, (2, 21))
    la, lb = a(idx, idx), b(idx, idx)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(la, list(a.parameters()))
    gb = torch.autograd.grad(lb, list(b.parameters()))
    for (n, _), x, y in zip(a.named_parameters(), ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6, msg=n)


def test_unknown_rotary_kernel():
    with pytest.raises(ValueError, match="pos.kernel='cuda'; valid: auto, torch, triton"):
        build_model(tiny_cfg(), ops.build("sdpa"), PosConfig(name="rope", kernel="cuda"))
