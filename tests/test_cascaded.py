"""The fused cascaded-group-attention kernel (ops/cascaded.py) against the per-head path.

On the CPU the kernel runs in Triton's interpreter (conftest), so shapes stay small; the `gpu`
test runs the published M0 at 224 in fp16 on a GPU.
"""

import pytest
import torch

import ops
from models.efficientvit import CascadedGroupAttention, EfficientViT, EfficientViTConfig, fold_bn_
from ops import cascaded
from tests.helpers import randomize_bn

pytestmark = pytest.mark.skipif(cascaded.triton is None, reason="needs triton")


def make(variant="m0", **kw):
    return EfficientViT(
        EfficientViTConfig(variant=variant, num_classes=10, **kw), ops.build("sdpa")
    )


randomize = randomize_bn


def fused_layers(model):
    return [
        m
        for m in model.modules()
        if isinstance(m, CascadedGroupAttention) and getattr(m, "_fused", None) is not None
    ]


# (variant, img): m0 at 128 pads its 8x8 stage-0 map to 14x14 (four 7x7 windows, part padding)
# and ends on a 2x2 window; m1 has depthwise kernels 7, 5, 3 and two or three heads
@pytest.mark.parametrize("variant,img", [("m0", 128), ("m1", 96)])
def test_fused_model_equals_per_head_path_fp32(variant, img):
    model = randomize(make(variant, img_size=img), seed=1).eval()
    plain = model.fuse_bn(fused_attention=False)
    fused = model.fuse_bn()
    assert len(fused_layers(fused)) == 6  # depths 1 + 2 + 3
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        want, got = plain(x), fused(x)
    scale = want.abs().max().item()
    assert scale > 1e-2
    assert (got - want).abs().max().item() <= 1e-5 * scale


def _layer(heads=3, dim=96, window=5, kernels=(5, 3, 3, 3), seed=2):
    torch.manual_seed(seed)
    layer = CascadedGroupAttention(dim, heads, 16, window, kernels, ops.build("sdpa"))
    return randomize(layer, seed).eval()


@pytest.mark.parametrize("hw", [(10, 7), (5, 5), (3, 4)])
def test_fused_layer_fp16_error_no_larger_than_the_per_head_paths(hw):
    """fp16 in, fp16 out: the kernel's error against a float64 run of the same layer is at most
    twice the per-head fp16 path's (both round where activations are stored)."""
    layer = fold_bn_(_layer())
    x = torch.randn(2, 96, *hw)
    with torch.no_grad():
        exact = layer.double()(x.double())
        plain16 = layer.half()(x.half())
        assert layer.enable_fused()
        fused16 = layer(x.half())
    assert fused16.dtype == torch.float16 and fused16.shape == x.shape
    err_plain = (plain16.double() - exact).abs().max().item()
    err_fused = (fused16.double() - exact).abs().max().item()
    assert exact.abs().max().item() > 0.1
    assert err_fused <= 2 * err_plain + 1e-3, (err_fused, err_plain)


def test_channels_last_input_gives_channels_last_output():
    layer = fold_bn_(_layer(heads=2, dim=64, window=4, kernels=(3, 3)))
    x = torch.randn(1, 64, 6, 6).to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = layer(x)
        assert layer.enable_fused()
        got = layer(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_training_and_autograd_take_the_per_head_path():
    model = randomize(make("m0", img_size=64, window=3), seed=3).eval()
    fused = model.fuse_bn()
    assert fused_layers(fused)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = fused(x)  # grad enabled, parameters require grad: no kernel backward, so plain path
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    fused.train()
    assert not fused_layers(fused)[0]._fused_ready(torch.randn(1, 64, 4, 4))


def test_layers_the_kernel_cannot_run_stay_unfused():
    na = EfficientViT(
        EfficientViTConfig(img_size=64, window=3), ops.build("neighborhood_reference")
    )
    assert not fused_layers(na.fuse_bn())
    big = make("m0", img_size=256, window=9).fuse_bn()  # stage windows 9, 8, 4
    assert {m.window for m in fused_layers(big)} == {8, 4}  # 9 > MAX_WINDOW: per-head path
    assert fused_layers(make("m0", img_size=64, window=3).fuse_bn())
    plain = make("m0", img_size=64, window=3).eval()  # not folded: BN after the convs
    assert not any(
        m.enable_fused() for m in plain.modules() if isinstance(m, CascadedGroupAttention)
    )


def test_pack_weights_rejects_what_the_kernel_cannot_take():
    w = [torch.zeros(48, 16, 1, 1)] * 5
    b = [torch.zeros(48)] * 5
    dw = [torch.zeros(16, 1, 3, 3)] * 5
    db = [torch.zeros(16)] * 5
    with pytest.raises(ValueError, match="heads"):
        cascaded.pack_weights(w, b, dw, db, torch.zeros(5, 9, 9), 16, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="windows up to"):
        cascaded.pack_weights(w[:2], b[:2], dw[:2], db[:2], torch.zeros(2, 81, 81), 16, 9,
                              torch.float32, "cpu")  # fmt: skip
    with pytest.raises(ValueError, match="odd"):
        cascaded.pack_weights(w[:2], b[:2], [torch.zeros(16, 1, 2, 2)] * 2, db[:2],
                              torch.zeros(2, 9, 9), 16, 3, torch.float32, "cpu")  # fmt: skip


@pytest.mark.gpu
def test_fused_m0_fp16_on_gpu_matches_the_per_head_path():
    """The published M0 at 224, fp16 autocast on a GPU: fused logits against fp32 ones no
    further than twice the per-head fp16 path's."""
    model = randomize(make("m0", img_size=224), seed=4).eval()
    plain = model.fuse_bn(fused_attention=False).cuda()
    fused = model.fuse_bn().cuda()
    x = torch.randn(16, 3, 224, 224, device="cuda")
    with torch.no_grad():
        with torch.autocast("cuda", torch.float16):
            p16 = plain(x).float()
            f16 = fused(x).float()
        exact = plain.double()(x.double()).float()
    assert len(fused_layers(fused)) == 6
    err_plain = (p16 - exact).abs().max().item()
    err_fused = (f16 - exact).abs().max().item()
    assert err_fused <= 2 * err_plain + 1e-3, (err_fused, err_plain)


@pytest.mark.parametrize("hw,cout,fmt", [((9, 14), 8, torch.contiguous_format),
                                         ((8, 8), 24, torch.channels_last)])  # fmt: skip
def test_stem_conv_kernel_equals_conv_relu(hw, cout, fmt):
    from ops.conv_stem import conv3x3_s2

    torch.manual_seed(5)
    x = torch.randn(2, 3, *hw).to(memory_format=fmt)
    w, b = torch.randn(cout, 3, 3, 3), torch.randn(cout)
    want = torch.relu(torch.nn.functional.conv2d(x, w, b, stride=2, padding=1))
    got = conv3x3_s2(x, w, b, True, torch.float32, fmt)
    assert got.shape == want.shape and got.is_contiguous(memory_format=fmt)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    # fp16 output: inputs and weights rounded to fp16, fp32 accumulation, one final rounding
    want16 = torch.relu(torch.nn.functional.conv2d(x.half().float(), w.half().float(), b,
                                                   stride=2, padding=1)).half()  # fmt: skip
    got16 = conv3x3_s2(x, w, b, True, torch.float16, torch.channels_last)
    assert got16.dtype == torch.float16
    assert (got16.float() - want16.float()).abs().max().item() <= 2e-3 * want16.abs().max().item()


def test_fused_model_uses_the_stem_kernel_and_keeps_outputs():
    from models.efficientvit import StemConvReLU

    model = randomize(make("m0", img_size=64, window=3), seed=8).eval()
    fused = model.fuse_bn()
    assert isinstance(fused.stem.conv1, StemConvReLU)
    assert not fused.stem.conv1._fast(torch.zeros(1, 3, 64, 64))  # autograd: plain conv
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert fused.stem.conv1._fast(x)
        want = model.fuse_bn(fused_attention=False)(x)
        got = fused(x)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_fused_model_traces_as_one_graph_under_dynamo():
    """The kernels are opaque custom ops (torch.ops.attnlab.*) with fake implementations, so
    torch.compile sees the whole inference copy as one graph, without breaks."""
    import torch._dynamo as dynamo

    fused = make("m0", img_size=64, window=3).eval().fuse_bn()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        report = dynamo.explain(fused)(x)
    assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons
    ops_used = {
        str(n.target) for g in report.graphs for n in g.graph.nodes if n.op == "call_function"
    }
    assert {"attnlab.cga_forward.default", "attnlab.conv3x3_s2.default"} <= ops_used, ops_used
