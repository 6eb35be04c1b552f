"""EfficientViT M0-M5: shapes, timm parity (parameter counts, logits through the state-dict
converter both ways, checkpoint loading), BN folding, attention-backend swaps, clear errors."""

import pytest
import torch

import ops
from models import FAMILIES, PosConfig, build_model
from models.efficientvit import (
    VARIANTS,
    EfficientViT,
    EfficientViTConfig,
    build_efficientvit,
    from_timm_state_dict,
    load_pretrained,
    relative_offset_index,
    to_timm_state_dict,
)
from tests.helpers import randomize_bn

timm = pytest.importorskip("timm")

PUBLISHED_PARAMS_M = {"m0": 2.35, "m1": 2.98, "m2": 4.19, "m3": 6.9, "m4": 8.8, "m5": 12.4}
PAPER_MMACS = {"m0": 79, "m1": 167, "m2": 201, "m3": 263, "m4": 299, "m5": 522}


def make(variant="m0", attn="sdpa", **kw):
    return EfficientViT(EfficientViTConfig(variant=variant, **kw), ops.build(attn))


def timm_model(variant, **kw):
    return timm.create_model(f"efficientvit_{variant}", pretrained=False, **kw)


randomize = randomize_bn


def assert_close(a, b, rtol=1e-5):
    scale = b.abs().max().item()
    assert scale > 1e-3, "degenerate logits: the comparison would prove nothing"
    err = (a - b).abs().max().item()
    assert err <= rtol * scale, f"max |diff| {err:.3g} vs max |logit| {scale:.3g}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_every_variant(variant):
    model = make(variant, img_size=64, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
        assert model(torch.randn(1, 3, 96, 48)).shape == (1, 10)  # other sizes: padded windows
    dims, depths, _, _ = VARIANTS[variant]
    assert [len(s.blocks) for s in model.stages] == list(depths)
    assert model.head.linear.in_features == dims[-1]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_counts_equal_timm(variant):
    with torch.device("meta"):
        ours = make(variant)
        theirs = timm_model(variant)
    n = ours.num_params()
    assert n == sum(p.numel() for p in theirs.parameters())
    assert abs(n / 1e6 - PUBLISHED_PARAMS_M[variant]) < 0.05 * PUBLISHED_PARAMS_M[variant]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_timm_logits_equal_through_the_converter(variant):
    theirs = randomize(timm_model(variant), seed=1).eval()
    ours = make(variant).eval()
    sd = theirs.state_dict()
    ours.load_state_dict(from_timm_state_dict(sd), strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(x), theirs(x))
    # and back: our state dict is exactly timm's layout, and timm computes the same logits
    back = to_timm_state_dict(ours.state_dict())
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    ours2 = randomize(make(variant), seed=2).eval()
    theirs = timm_model(variant).eval()  # fresh: timm caches attention biases in eval mode
    theirs.load_state_dict(to_timm_state_dict(ours2.state_dict()), strict=True)
    with torch.no_grad():
        assert_close(ours2(x), theirs(x))


@pytest.mark.parametrize(
    "variant, img_size, window, input_hw",
    [
        ("m0", 64, 3, (64, 64)),  # 4x4 map, window 3: padded to 6x6, 4 windows per image
        ("m1", 64, 7, (96, 80)),  # window shrunk to the map at build, other input size
        ("m2", 32, 7, (32, 32)),  # 2x2, 1x1, 1x1 maps
    ],
)
def test_timm_logits_equal_with_padded_and_shrunk_windows(variant, img_size, window, input_hw):
    theirs = timm_model(variant, img_size=img_size, window_size=[window] * 3)
    theirs = randomize(theirs, seed=3).eval()
    ours = make(variant, img_size=img_size, window=window).eval()
    ours.load_state_dict(from_timm_state_dict(theirs.state_dict()))
    x = torch.randn(3, 3, *input_hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(x), theirs(x))


def test_relative_offset_index_is_timms():
    theirs = timm_model("m0", img_size=64, window_size=[3, 3, 3])
    attn = theirs.stages[0].blocks[0].mixer.m.attn
    assert torch.equal(relative_offset_index(3), attn.attention_bias_idxs)


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_pretrained_timm_checkpoint_loads(tmp_path, wrap):
    theirs = randomize(timm_model("m0"), seed=4).eval()
    sd = theirs.state_dict()
    path = tmp_path / "efficientvit_m0.pth"
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, path)
    ours = build_model(
        EfficientViTConfig(variant="m0", pretrained=str(path)),
        ops.build("sdpa"),
        PosConfig(name="none"),
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_close(ours(x), theirs(x))


def test_pretrained_at_another_image_size_resizes_biases_as_timm(tmp_path):
    from timm.models.efficientvit_msra import checkpoint_filter_fn

    sd = randomize(timm_model("m0"), seed=5).state_dict()  # 224: windows 7, 7, 4
    torch.save({"model": sd}, tmp_path / "m0.pth")
    theirs = timm_model("m0", img_size=64)  # windows 4, 2, 1
    theirs.load_state_dict(checkpoint_filter_fn(sd, theirs))
    ours = make("m0", img_size=64, pretrained=str(tmp_path / "m0.pth")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(ours(x), theirs.eval()(x))


def test_checkpoint_that_does_not_fit_says_so(tmp_path):
    torch.save(make("m0").state_dict(), tmp_path / "ours.pt")
    with pytest.raises(ValueError, match="does not fit EfficientViT-M1"):
        make("m1", pretrained=str(tmp_path / "ours.pt"))
    load_pretrained(make("m0"), str(tmp_path / "ours.pt"))  # our own layout loads too


@pytest.mark.parametrize("variant", ["m0", "m2"])
def test_bn_folding_keeps_eval_outputs(variant):
    model = randomize(make(variant, img_size=64, window=3), seed=6).eval()
    fused = model.fuse_bn()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(fused(x), model(x))


def test_backend_swap_sdpa_reference_same_logits_and_grads():
    a = randomize(make("m1", "sdpa", img_size=64, window=3, num_classes=7), seed=7)
    b = make("m1", "reference", img_size=64, window=3, num_classes=7)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    a.eval(), b.eval()  # eval: BN on running statistics (batch statistics of a 1x1 map of 2
    with torch.no_grad():  # images would make the gradients ill-conditioned)
        assert_close(a(x), b(x))
    a(x).square().mean().backward()
    b(x).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert a.stages[0].blocks[0].attn.attn_bias.grad.abs().sum() > 0


def _without_biases(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("attn_bias")}


def test_neighborhood_variant_with_whole_map_windows_is_bias_free_global_attention():
    """attn=neighborhood with every stage map within the window (64 px: maps 4x4, 2x2, 1x1, so
    each NA kernel covers its whole map) = the windowed model with zero attention biases: the
    same logits and gradients. The NA kernels get q/k/v padded to one width (Dv 16..48)."""
    a = randomize(make("m0", "sdpa", img_size=64, num_classes=7), seed=3)
    with torch.no_grad():
        for blk in (b for st in a.stages for b in st.blocks):
            blk.attn.attn_bias.zero_()
    b = make("m0", "neighborhood", img_size=64, num_classes=7)
    assert not any(n.endswith("attn_bias") for n, _ in b.named_parameters())
    b.load_state_dict(_without_biases(a))
    x = torch.randn(2, 3, 64, 64)
    a.eval(), b.eval()
    with torch.no_grad():
        assert_close(b(x), a(x))
    a(x).square().mean().backward()
    b(x).square().mean().backward()
    ga = {n: p.grad for n, p in a.named_parameters() if not n.endswith("attn_bias")}
    for name, pb in b.named_parameters():
        torch.testing.assert_close(pb.grad, ga[name], rtol=1e-4, atol=1e-6, msg=name)


def test_neighborhood_variant_slides_its_window_like_the_reference():
    """128 px: stage 0 is an 8x8 map under a 7x7 neighbourhood (shifted at the borders): the
    fused NA kernels against the materialised NATTEN reference, logits and gradients."""
    a = randomize(make("m0", "neighborhood", img_size=128, num_classes=5), seed=4)
    b = make("m0", "neighborhood_reference", img_size=128, num_classes=5)
    b.load_state_dict(a.state_dict())
    assert a.stages[0].blocks[0].attn.attention.options["kernel_size"] == 7
    x = torch.randn(2, 3, 128, 128)
    a.eval(), b.eval()
    with torch.no_grad():
        assert_close(a(x), b(x))
    a(x).square().mean().backward()
    b(x).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_flash_backend_is_refused_for_its_missing_bias():
    with pytest.raises(ValueError, match="'flash' does not support: an additive attention bias"):
        make("m0", "flash")


def test_flops_match_the_paper():
    for variant, mmacs in PAPER_MMACS.items():
        with torch.device("meta"):
            model = make(variant)
        flops = model.flops_per_image()
        assert abs(flops / 2e6 - mmacs) < 0.01 * mmacs, (variant, flops)


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match="model.variant='m9'; valid: m0, m1, m2, m3, m4, m5"):
        make("m9")


def test_bad_image_inputs_raise_clear_errors():
    model = make("m0", img_size=32).eval()
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\).*got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="image size 40x32 is not a multiple of 16"):
        model(torch.randn(2, 3, 40, 32))
    with pytest.raises(ValueError, match="model.img_size=100 must be a positive multiple of 16"):
        make("m0", img_size=100)
    gray = make("m0", img_size=32, in_chans=1, num_classes=3).eval()
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("pos", ["learned", "rope", "carope", "sinusoidal"])
def test_positions_other_than_none_are_refused(pos):
    _, builder = FAMILIES["efficientvit"]
    with pytest.raises(ValueError, match="efficientvit uses its own relative-position attention"):
        builder(EfficientViTConfig(), ops.build("sdpa"), PosConfig(name=pos))


def test_train_mode_step_runs_and_updates():
    model = make("m0", img_size=64, num_classes=5).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 5, (8,))
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.no_weight_decay() == {
        f"stages.{i}.blocks.{j}.attn.attn_bias" for i, d in enumerate((1, 2, 3)) for j in range(d)
    }


def test_timm_impl_is_timms_model_with_our_interface(tmp_path):
    """model.impl=timm: timm's efficientvit_mX in our trainer, same parameters, FLOPs, input
    checks and weight-decay exclusions as ours; a timm checkpoint loads into it."""
    from models.efficientvit import TimmEfficientViT

    cfg = EfficientViTConfig(variant="m1", img_size=64, window=3, num_classes=7, impl="timm")
    ref = build_efficientvit(cfg, ops.build("sdpa"))
    assert isinstance(ref, TimmEfficientViT)
    ours = make("m1", img_size=64, window=3, num_classes=7)
    assert ref.num_params() == ours.num_params()
    assert ref.flops_per_image() == ours.flops_per_image()
    assert len(ref.no_weight_decay()) == len(ours.no_weight_decay()) > 0
    randomize(ref.net, seed=9)
    torch.save(ref.net.state_dict(), tmp_path / "timm.pt")
    ours.load_state_dict(from_timm_state_dict(ref.net.state_dict()))
    ref2 = build_efficientvit(
        EfficientViTConfig(variant="m1", img_size=64, window=3, num_classes=7, impl="timm",
                           pretrained=str(tmp_path / "timm.pt")), ops.build("sdpa"))  # fmt: skip
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(ref2.eval()(x), ours.eval()(x))
    with pytest.raises(ValueError, match="multiple of 16"):
        ref(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="attn=sdpa"):
        build_efficientvit(cfg, ops.build("reference"))
    with pytest.raises(ValueError, match="model.impl"):
        EfficientViT(EfficientViTConfig(impl="keras"), ops.build("sdpa"))
