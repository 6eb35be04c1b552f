"""Tests for data/gpu_augment.py (data.decode=gpu): each piece against timm's PIL pipeline,
then the whole path through build_image_loaders. CPU only (torchvision's CPU JPEG decoder
stands in for nvJPEG), tiny images."""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import timm.data.transforms as timm_tf
import torch
from PIL import Image

from data import (
    HFImageDataset,
    ImageDataConfig,
    PackedImageDataset,
    build_device_prep,
    build_gpu_pipeline,
    build_image_loaders,
    build_transforms,
    decode_in_process,
    make_image_folder,
    to_device,
    write_packed,
)
from data.gpu_augment import (
    CROP_TRIES,
    FAMILIES,
    RA_OPS,
    Decoded,
    GpuImagePipeline,
    RandAugmentSpec,
    _plan_entry,
    _resize,
    apply_op,
    apply_plan,
    crop_params,
    decode_batch,
    draw_rand_augment,
    parse_rand_augment,
)
from data.resize_kernel import resize_batch

S = 16  # output size of the pipeline tests
# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec); they still work
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _jpeg(a: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _test_images(h: int = 18, w: int = 26) -> list[np.ndarray]:
    """Noise, low contrast, two-valued and a smooth gradient: the histogram ops' edge cases."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    low = (noise // 4 + 60).astype(np.uint8)
    two = np.full((h, w, 3), 77, np.uint8)
    two[:3] = 200
    yy, xx = np.mgrid[0:h, 0:w]
    grad = np.stack([xx * 7 % 256, yy * 9 % 256, (xx + yy) * 5 % 256], -1).astype(np.uint8)
    return [noise, low, two, grad]


class _FixedRandom:
    """Stands in for the ``random`` module in timm's level maps: a fixed draw decides the sign."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.fixture(scope="module")
def timm_ops():
    """timm's RandAugment ops as build_transforms configures them (fill = mean, bicubic,
    our posterize patch)."""
    train, _ = build_transforms(ImageDataConfig(kind="folder", img_size=24))
    ra = next(t for t in train.transforms if type(t).__name__ == "RandAugment")
    return {op.name: op for op in ra.ops}


@pytest.mark.parametrize("name", RA_OPS)
def test_each_op_matches_timm(name, timm_ops, monkeypatch):
    """Every op at several magnitudes and both signs, on non-square images, against timm's
    PIL op. The GPU ops reproduce Pillow's integer arithmetic (LUTs, float32 blends that
    truncate, the SMOOTH filter, Image.transform's a=-1 bicubic with edge clamping and fill)
    and are bit-exact here; the bound leaves room for a last-ulp truncation flip on other
    platforms, while any semantic slip (wrong degenerate image, rounding, sign, centre,
    fill or kernel) moves many pixels by several levels."""
    op = timm_ops[name]
    images = _test_images()
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    fill = op.kwargs["fillcolor"]
    for mag in (9.0, 7.3, 10.0):
        for sign in (1.0, -1.0):
            monkeypatch.setattr(timm_aa, "random", _FixedRandom(0.7 if sign < 0 else 0.3))
            args = op.level_fn(mag, op.hparams) if op.level_fn else ()
            ref = np.stack([np.asarray(op.aug_fn(Image.fromarray(a), *args, **op.kwargs))
                            for a in images]).astype(np.float32)  # fmt: skip
            ours = apply_op(name, x, mag, sign, fill).permute(0, 2, 3, 1).numpy()
            diff = np.abs(ours - ref)
            assert diff.max() <= 1 and diff.mean() <= 0.02, (name, mag, sign, diff.mean())
            assert np.array_equal(ours, np.round(ours)) and ours.min() >= 0 and ours.max() <= 255


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_ops_of_a_family_in_one_pass(family, timm_ops, monkeypatch):
    """A layer applies each family once to all images that drew one of its ops: with
    different ops, magnitudes and signs per image, each image must still get its own op."""
    names = FAMILIES[family]
    images = _test_images() * 2
    n = len(images)
    ops = np.array([RA_OPS.index(names[i % len(names)]) for i in range(n)])
    mag = np.linspace(6.0, 10.0, n)
    sign = np.where(np.arange(n) % 3 == 0, -1.0, 1.0)
    entry = _plan_entry(family, ops, np.arange(n), mag, sign, 18, 26)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    fill = timm_ops["Rotate"].kwargs["fillcolor"]
    ours = apply_plan(x, [entry], torch.tensor(fill, dtype=torch.float32))
    for i, a in enumerate(images):
        op = timm_ops[RA_OPS[ops[i]]]
        monkeypatch.setattr(timm_aa, "random", _FixedRandom(0.7 if sign[i] < 0 else 0.3))
        args = op.level_fn(mag[i], op.hparams) if op.level_fn else ()
        ref = np.asarray(op.aug_fn(Image.fromarray(a), *args, **op.kwargs)).astype(np.float32)
        diff = np.abs(ours[i].permute(1, 2, 0).numpy() - ref)
        assert diff.max() <= 1 and diff.mean() <= 0.02, (RA_OPS[ops[i]], diff.mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("family", ["affine", "blend", "lut"])
def test_fused_families_equal_the_torch_ops(family, dtype):
    """RandAugment's op families by Triton launches (interpreted here) against the torch
    implementation that matches PIL: every op of the family, both signs, a subset of a
    non-square batch (rows read in place), bit for bit (fill colour outside, Contrast's
    rounded mean, Sharpness's kept border, the histogram tables included), on float32
    images and on the uint8 images the CUDA pipeline keeps."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (9, 3, 18, 26), generator=g).float()
    x[4] = x[4] // 4 + 100  # low contrast: Contrast's mean matters
    names = FAMILIES[family]
    rows = np.array([7, 0, 3, 5, 8, 2, 4, 6])
    ops = np.array([RA_OPS.index(names[i % len(names)]) for i in range(len(rows))])
    mag = np.linspace(2.0, 10.0, len(rows))
    sign = np.where(np.arange(len(rows)) % 2 == 0, -1.0, 1.0)
    entry = _plan_entry(family, ops, rows, mag, sign, 18, 26)
    fill = torch.tensor([124.0, 116.0, 104.0])
    torch_ops = apply_plan(x.clone(), [entry], fill)
    fused = apply_plan(x.clone().to(dtype), [entry], fill, fused_ops=True)
    assert fused.dtype == dtype and torch.equal(fused.float(), torch_ops)
    moved = (torch_ops != x).flatten(1).any(1)
    # (an op may leave a noise image as it was: AutoContrast on the full range, Solarize above
    # its largest value)
    assert moved[rows].sum() >= len(rows) - 2 and not moved[[1]].any()


def test_rand_augment_spec_and_draws():
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert spec == RandAugmentSpec(magnitude=9, layers=2, prob=0.5, mstd=0.5, mmax=10)
    assert parse_rand_augment("rand-m7-n3-p1.0-mstd101-mmax20-inc1").mstd == math.inf
    assert parse_rand_augment("") is None
    for bad, match in (("augmix-m5", "only RandAugment"), ("rand-m9", "inc1"),
                       ("rand-m9-inc1-tweights", "unsupported section")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            parse_rand_augment(bad)

    b = 6000
    plan = draw_rand_augment(spec, np.random.default_rng(0), b, 24, 24)
    assert [e[0] for e in plan] == list(FAMILIES) * 2  # per layer, one entry per family
    for layer in (plan[:3], plan[3:]):
        counts = np.concatenate([np.bincount(kinds, minlength=len(FAMILIES[fam]))
                                 for fam, _, kinds, _ in layer])  # fmt: skip
        assert abs(counts.sum() / b - 0.5) < 0.03  # each layer applied with p = 0.5
        assert np.all(np.abs(counts / counts.sum() - 1 / 15) < 0.015)  # ops uniform
        seen = np.concatenate([idx for _, idx, _, _ in layer])
        assert len(np.unique(seen)) == len(seen)  # one op per image and layer
    _, _, kinds, matrices = plan[2]
    rot = matrices[kinds == FAMILIES["affine"].index("Rotate")]
    degrees = -np.degrees(np.arctan2(rot[:, 1], rot[:, 0]))  # matrix -> timm's angle
    assert np.all(np.abs(degrees) <= 30 + 1e-9) and abs(np.abs(degrees).mean() - 27) < 0.5
    assert 0.4 < np.mean(degrees > 0) < 0.6  # random sign
    _, _, kinds, luts = plan[0]
    top = luts[kinds == FAMILIES["lut"].index("PosterizeIncreasing"), 255]
    bits = np.select([top == 0, top == 128, top == 192], [0, 1, 2], -1)
    # bits = 4 - int(0.4 m): 1 for m in [7.5, 10), 0 only where N(9, .5) is clipped to 10
    assert set(bits) <= {0, 1, 2} and np.mean(bits == 1) > 0.9
    assert 0 < np.mean(bits == 0) < 0.06


def test_crop_params_match_timm_get_params(monkeypatch):
    """Same uniform draws into timm's get_params (a stand-in ``random`` serves them in
    its call order) and into crop_params give the same crops, fallbacks included."""
    rng = np.random.default_rng(1)
    sizes = [(int(h), int(w)) for h, w in rng.integers(2, 70, (300, 2))]
    sizes += [(3, 60), (60, 3), (2, 2), (40, 1)] * 5  # extreme ratios: all tries fail
    b = len(sizes)
    u = rng.random((b, 2 * CROP_TRIES + 2))
    u[-20:, 0 : 2 * CROP_TRIES : 2] = 0.99  # large areas make the extreme cases fail
    hs, ws = np.array(sizes).T
    ours = np.stack(crop_params(hs, ws, u), 1)

    class Draws:
        def __init__(self, row):
            self.u, self.pos = list(row[:-2]), list(row[-2:])

        def uniform(self, a, b):
            return a + (b - a) * self.u.pop(0)

        def randint(self, a, b):
            return a + int(math.floor(self.pos.pop(0) * (b - a + 1)))

    fallbacks = 0
    for i, (h, w) in enumerate(sizes):
        draws = Draws(u[i])
        monkeypatch.setattr(timm_tf, "random", draws)
        ref = timm_tf.RandomResizedCropAndInterpolation.get_params(
            Image.new("RGB", (w, h)), (0.08, 1.0), (3 / 4, 4 / 3)
        )
        fallbacks += len(draws.u) == 0
        assert tuple(ours[i]) == ref, (h, w, ours[i], ref)
        t, l_, ch, cw = ours[i]
        assert 0 <= t and t + ch <= h and 0 <= l_ and l_ + cw <= w and ch >= 1 and cw >= 1
    assert fallbacks >= 20
    monkeypatch.setattr(timm_tf, "random", random)


def test_crop_resize_close_to_pil():
    """Crop + antialiased bicubic resize vs PIL's crop().resize(BICUBIC). Not bit-exact:
    PIL rounds to 8 bits between its horizontal and vertical passes and uses fixed-point
    weights; on smooth content that moves a few pixels by one level."""
    h, w = 37, 29
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 100 * np.sin(xx / 3.0), 128 + 90 * np.cos(yy / 2.0),
                  (xx * 5 + yy * 3) % 256], -1).astype(np.uint8)  # fmt: skip
    img = torch.from_numpy(a).permute(2, 0, 1)
    for t, l_, ch, cw in ((2, 3, 30, 20), (0, 0, h, w), (5, 7, 6, 9)):
        ref = np.asarray(Image.fromarray(a).crop((l_, t, l_ + cw, t + ch)).resize((S, S), 3))
        ours = _resize(img[:, t : t + ch, l_ : l_ + cw], (S, S)).round().clamp(0, 255)
        diff = np.abs(ours.permute(1, 2, 0).numpy() - ref)
        assert diff.max() <= 2 and diff.mean() <= 0.4, (t, l_, ch, cw, diff.mean())


def _noise_images(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in shapes]


def test_resize_batch_matches_interpolate():
    """One launch for a ragged batch (Triton, interpreted here) vs one F.interpolate(bicubic,
    antialias) per image: downscales, upscales, an untouched size, a flip and eval windows
    agree to float rounding. The images are separate tensors read through the first one's
    pointer, so every offset must land in its own image."""
    imgs = _noise_images([(37, 50), (64, 30), (12, 9), (100, 81), (16, 16)])
    boxes = [(3, 5, 30, 40), (0, 0, 64, 30), (2, 3, 10, 6), (10, 7, 90, 70), (0, 0, 16, 16)]
    flip = [False, True, False, True, False]
    out = resize_batch(imgs, boxes, [(S, S)] * 5, [(0, 0)] * 5, flip, S)
    for im, (t, l_, h, w), f, o in zip(imgs, boxes, flip, out):
        ref = _resize(im[:, t : t + h, l_ : l_ + w], (S, S))
        ref = ref.flip(-1) if f else ref
        assert (o - ref).abs().max() < 1e-3
    # eval: the whole image to (rows, cols), then the S x S window at (top, left)
    sizes, wins = [(20, 27), (34, S)], [(2, 5), (9, 0)]
    out = resize_batch(imgs[:2], [(0, 0, 37, 50), (0, 0, 64, 30)], sizes, wins, [0, 0], S)
    for im, (rh, rw), (t, l_), o in zip(imgs, sizes, wins, out):
        ref = _resize(im, (rh, rw))[:, t : t + S, l_ : l_ + S]
        assert (o - ref).abs().max() < 1e-3


def test_resize_batch_to_uint8_rounds_half_to_even_and_clips():
    """``dtype=torch.uint8`` gives what rounding and clipping the float32 result gives: ties
    to even (a 1x2 image halved is the mean of its pixels) and overshoots clipped."""
    pairs = [(2, 3), (3, 4), (0, 1), (254, 255), (10, 10), (7, 200)]
    imgs = [torch.tensor([a, b], dtype=torch.uint8).view(1, 1, 2).repeat(3, 1, 1) for a, b in pairs]
    n = len(imgs)
    args = ([(0, 0, 1, 2)] * n, [(1, 1)] * n, [(0, 0)] * n, [0] * n, 1)
    got = resize_batch(imgs, *args, dtype=torch.uint8)
    assert got.dtype == torch.uint8 and got[:, :, 0, 0].tolist() == [[v] * 3 for v in
                                                                     (2, 4, 0, 254, 10, 104)]  # fmt: skip
    assert torch.equal(resize_batch(imgs, *args), torch.tensor([2.5, 3.5, 0.5, 254.5, 10, 103.5])
                       .view(n, 1, 1, 1).expand(n, 3, 1, 1))  # fmt: skip
    imgs = _noise_images([(37, 50), (64, 30), (12, 9)])
    args = ([(3, 5, 30, 40), (0, 0, 64, 30), (2, 3, 10, 6)], [(S, S)] * 3, [(0, 0)] * 3,
            [False, True, False], S)  # fmt: skip
    ref = resize_batch(imgs, *args)
    assert (ref < -0.5).any() and (ref > 255.5).any()  # overshoots of the cubic, clipped
    assert torch.equal(resize_batch(imgs, *args, dtype=torch.uint8),
                       ref.round().clamp(0, 255).to(torch.uint8))  # fmt: skip
    with pytest.raises(ValueError, match="dtype"):
        resize_batch(imgs, *args, dtype=torch.float16)


def test_resize_batch_launch_shape_changes_no_value():
    """Other tiles and warps for the two passes (``tiles``, swept by bench_gpu_augment.py)
    give the same bytes: tiles smaller and larger than an image's rows and columns."""
    imgs = _noise_images([(37, 50), (64, 30), (12, 9)])
    args = ([(3, 5, 30, 40), (0, 0, 64, 30), (2, 3, 10, 6)], [(S, S)] * 3, [(0, 0)] * 3,
            [False, True, False], S)  # fmt: skip
    ref = resize_batch(imgs, *args, dtype=torch.uint8)
    for tiles in [(8, 8, 4, 1), (64, 32, 16, 8)]:
        assert torch.equal(resize_batch(imgs, *args, dtype=torch.uint8, tiles=tiles), ref)


def _packed(imgs, other: int):
    """The nvjpeg decoder's PackedImages of ``imgs``: all but image ``other`` planar in one
    buffer at the decoder's aligned offsets, that one as a tensor of its own."""
    from data.nvjpeg_decode import PackedImages, plane_layout

    eng = [k for k in range(len(imgs)) if k != other]
    hw = np.array([im.shape[-2:] for im in imgs], dtype=np.int64)
    offsets, total = plane_layout(hw[eng, 0], hw[eng, 1])
    buf = torch.zeros(total, dtype=torch.uint8)
    for k, off in zip(eng, offsets.tolist()):
        buf[off : off + imgs[k].numel()] = imgs[k].reshape(-1)
    return PackedImages(buf, offsets, hw, eng, {other: imgs[other].clone()})


def test_packed_images_read_as_the_list_of_images():
    """PackedImages (one buffer, no tensor an image) gives the same images, the same resized
    batch from ``resize_batch`` and the same train and eval batches from the pipeline as the
    list of tensors it stands for, with an image outside the buffer among them."""
    imgs = _noise_images([(37, 50), (64, 30), (12, 9), (100, 81)])
    packed = _packed(imgs, other=2)
    assert len(packed) == 4 and all(torch.equal(a, b) for a, b in zip(packed, imgs))
    assert packed.hw.tolist() == [[37, 50], [64, 30], [12, 9], [100, 81]]
    boxes = [(3, 5, 30, 40), (0, 0, 64, 30), (2, 3, 10, 6), (10, 7, 90, 70)]
    args = (boxes, [(S, S)] * 4, [(0, 0)] * 4, [False, True, False, True], S)
    assert torch.equal(resize_batch(_packed(imgs, 2), *args), resize_batch(imgs, *args))
    pipe = build_gpu_pipeline(ImageDataConfig(kind="folder", img_size=S, decode="gpu"), seed=5)
    pipe.batched_resize = True
    for train in (True, False):
        pipe.batches = 0
        ref = pipe.augment(Decoded(imgs, 0 if train else None))
        pipe.batches = 0
        got = pipe.augment(Decoded(_packed(imgs, 2), 0 if train else None))
        assert torch.equal(got, ref), train
    # no buffer (the engines took none): every image a tensor of its own
    from data.nvjpeg_decode import PackedImages

    alone = PackedImages(None, np.zeros(0, dtype=np.int64), packed.hw, [], dict(enumerate(imgs)))
    assert torch.equal(resize_batch(alone, *args), resize_batch(imgs, *args))


def test_pipeline_fused_ops_give_the_same_batches(folder):
    """The whole train transform with RandAugment's families as Triton launches (the
    interpreter here) hands out the same batch as with the torch ops; so does the CUDA path
    (the batch resize kernel, then the family kernels on uint8 images rather than float32),
    worker-cropped images among them."""
    cfg = _gpu_cfg(folder, auto_augment="rand-m9-n3-mstd0.5-inc1")
    train, *_ = build_image_loaders(cfg, 6, seed=0)
    data, _ = next(iter(train))
    outs = []
    for fused in (False, True):
        pipe = build_gpu_pipeline(replace(cfg, fused_augment=fused), seed=11)
        assert pipe.fused_ops is (None if fused else False)  # None: on CUDA only
        pipe.fused_ops = fused  # the interpreter's kernels on this CPU
        outs.append(pipe(data, "cpu", train=True))
    assert torch.equal(outs[0], outs[1])
    imgs = decode_batch(data, "cpu")
    crops = torch.randint(0, 256, (2, S, S, 3), dtype=torch.uint8)
    for decoded in (Decoded(imgs, 3), Decoded(imgs[:4], 3, crops)):
        got = {}
        for fused in (False, True):
            pipe = build_gpu_pipeline(cfg, seed=11)
            pipe.batched_resize, pipe.fused_ops = True, fused
            got[fused] = pipe.train_batch(decoded.images, decoded.index, decoded.crops)
        assert got[False].dtype == torch.float32 and got[True].dtype == torch.uint8
        assert torch.equal(got[True].float(), got[False])


def test_resize_batch_rejects_bad_boxes():
    imgs = _noise_images([(20, 20)])
    with pytest.raises(ValueError, match="outside its image"):
        resize_batch(imgs, [(5, 0, 16, 16)], [(S, S)], [(0, 0)], [0], S)
    with pytest.raises(ValueError, match="window"):
        resize_batch(imgs, [(0, 0, 20, 20)], [(S, S)], [(1, 0)], [0], S)
    with pytest.raises(ValueError, match="uint8"):
        resize_batch([imgs[0].float()], [(0, 0, 20, 20)], [(S, S)], [(0, 0)], [0], S)


def test_pipeline_batched_resize_agrees_with_per_image(folder):
    """The pipeline's two resize paths (the batch kernel, used on CUDA; per image, used on
    the CPU) give the same batches up to a grey level where a value sits on .5."""
    cfg = _gpu_cfg(folder, auto_augment="rand-m9-mstd0.5-inc1")
    train, val, *_ = build_image_loaders(cfg, 4, seed=0)
    outs = {}
    for batched in (False, True):
        pipe = build_gpu_pipeline(cfg, seed=3)
        pipe.batched_resize = batched
        outs[batched] = (pipe(next(iter(train))[0], "cpu", train=True).float(),
                         pipe(next(iter(val))[0], "cpu").float())  # fmt: skip
    for per_image, batch in zip(outs[False], outs[True]):
        diff = (per_image - batch).abs()
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_eval_matches_timm_eval_transform():
    """Short side to floor(S / crop_pct), center crop S: same geometry as timm (exactly
    equal on the content-free fallback), values within PIL's 8-bit resize rounding."""
    cfg = ImageDataConfig(kind="folder", img_size=S, crop_pct=0.875, decode="gpu")
    _, timm_eval = build_transforms(cfg)
    pipe = build_gpu_pipeline(cfg)
    for h, w in ((23, 31), (40, 17), (18, 18), (100, 70), (12, 9)):
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([128 + 100 * np.sin(xx / 3.0), 128 + 90 * np.cos(yy / 2.0),
                      (xx * 7 + yy * 2) % 256], -1).astype(np.uint8)  # fmt: skip
        raw = _jpeg(a)
        ref = timm_eval(Image.open(io.BytesIO(raw)).convert("RGB")).numpy().astype(np.float32)
        ours = pipe([_tensor(raw)], "cpu", train=False)[0].numpy().astype(np.float32)
        diff = np.abs(ours - ref)
        assert ours.shape == (3, S, S) and diff.max() <= 2 and diff.mean() <= 0.4, (h, w)


def test_decode_grey_cmyk_and_png_come_out_rgb():
    """One batch with RGB, greyscale and CMYK JPEGs and a PNG (the batched decoder refuses
    it; each image is then decoded alone, the PNG by the CPU fallback)."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    raws = [_jpeg(a), _jpeg(a, "L"), _jpeg(a, "CMYK"), _jpeg(a, fmt="PNG")]
    out = decode_batch([_tensor(r) for r in raws], "cpu")
    for raw, img in zip(raws, out):
        ref = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        assert img.shape == (3, 10, 14) and img.dtype == torch.uint8
        assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("gpu_folder"), num_classes=3,
                             train_per_class=4, val_per_class=2, size=24)  # fmt: skip


def _gpu_cfg(root, **kw) -> ImageDataConfig:
    kw = {"num_workers": 0, "decode": "gpu", **kw}
    return ImageDataConfig(kind="folder", root=str(root), img_size=S, **kw)


def test_encoded_batches_travel_as_one_buffer(folder):
    """Byte batches from worker processes: one shared buffer and the sizes are pickled, not a
    tensor per image; the receiver gets the same bytes as views of that buffer."""
    import pickle

    from data.images import EncodedImages

    views = [torch.arange(n, dtype=torch.uint8) for n in (5, 1, 9)]
    enc = EncodedImages.from_flat(torch.cat(views), [5, 1, 9])
    back = pickle.loads(pickle.dumps(enc))
    assert isinstance(back, EncodedImages) and back.sizes == [5, 1, 9]
    assert all(torch.equal(a, b) for a, b in zip(back, views))
    assert all(v.untyped_storage().data_ptr() == back.flat.untyped_storage().data_ptr()
               for v in back)  # fmt: skip
    train, *_ = build_image_loaders(_gpu_cfg(folder, num_workers=1), 4, seed=0)
    data, _ = next(iter(train))
    files = {p.read_bytes() for p in (folder / "train").rglob("*.jpg")}
    assert isinstance(data, EncodedImages) and len(data) == 4
    assert all(bytes(d.numpy()) in files for d in data)


def test_nvimgcodec_decoder_gives_torchvisions_images_and_pipeline(folder, tmp_path):
    """data.gpu_decoder=nvimgcodec (here nvImageCodec's CPU backend): the batch in one call,
    the same pixels as torchvision's decoder (both libjpeg-turbo on the CPU), images it cannot
    read decoded one by one as before, and the same augmented batches."""
    pytest.importorskip("nvidia.nvimgcodec")
    from data.gpu_augment import decode_batch

    train, *_ = build_image_loaders(_gpu_cfg(folder), 4, seed=0)
    data, _ = next(iter(train))
    png = io.BytesIO()
    Image.new("RGB", (7, 5), (10, 200, 30)).save(png, format="PNG")
    batch = [*data, torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8)]
    ours = decode_batch(batch, "cpu", decoder="nvimgcodec")
    ref = decode_batch(batch, "cpu")
    assert len(ours) == len(ref) == 5
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert ours[-1].shape == (3, 5, 7) and ours[-1][:, 0, 0].tolist() == [10, 200, 30]
    gif = io.BytesIO()  # a format nvImageCodec does not read: decoded one by one, with a word
    Image.new("RGB", (7, 5), (10, 200, 30)).save(gif, format="GIF")
    with pytest.warns(RuntimeWarning, match="decoded none of a batch of 1"):
        (img,) = decode_batch([torch.frombuffer(bytearray(gif.getvalue()), dtype=torch.uint8)],
                              "cpu", decoder="nvimgcodec")  # fmt: skip
    assert img.shape == (3, 5, 7) and img[:, 0, 0].tolist() == [10, 200, 30]
    with pytest.raises(ValueError, match="decoder must be one of"):
        decode_batch(batch, "cpu", decoder="pil")

    outs = []
    for name in ("torchvision", "nvimgcodec"):
        pipe = build_gpu_pipeline(_gpu_cfg(folder, gpu_decoder=name), seed=4)
        assert pipe.decoder == name
        outs.append(pipe(data, "cpu", train=True))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="data.gpu_decoder must be"):
        build_image_loaders(_gpu_cfg(folder, gpu_decoder="dali"), 4, seed=0)


def test_nvimgcodec_missing_names_the_package(folder, monkeypatch):
    import data.nvimgcodec_decode as nvimg

    monkeypatch.setattr(nvimg, "available", lambda: False)
    with pytest.raises(ImportError, match="pip install 'nvidia-nvimgcodec-cu13"):
        build_gpu_pipeline(_gpu_cfg(folder, gpu_decoder="nvimgcodec"))


def test_pipeline_through_loaders_is_deterministic(folder):
    cfg = _gpu_cfg(folder)
    train, val, n_classes, _ = build_image_loaders(cfg, 4, seed=0)
    batch = next(iter(train))
    data, labels = batch
    assert isinstance(data, Sequence) and len(data) == 4 and labels.dtype == torch.int64
    first = data[0]
    raw = (folder / "train" / "class_00" / "0000.jpg").read_bytes()
    assert first.dtype == torch.uint8 and first.ndim == 1 and bytes(first.numpy()[:2]) == raw[:2]
    prep = build_device_prep(cfg)

    def run(seed):
        pipe = build_gpu_pipeline(cfg, seed=seed)
        torch.manual_seed(0)  # DevicePrep's random erasing draws from torch
        return [to_device(batch, "cpu", True, prep, train=True, decode=pipe)[0]
                for _ in range(2)], pipe  # fmt: skip

    (a0, a1), pipe = run(5)
    assert a0.shape == (4, 3, S, S) and a0.dtype == torch.float32
    assert a0.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(a0).all()
    assert pipe.state_dict() == {"batches": 2}
    (b0, b1), _ = run(5)
    assert torch.equal(a0, b0) and torch.equal(a1, b1)  # same seed: same batches
    assert not torch.equal(a0, a1)  # the counter moves the draws on
    (c0, _), _ = run(6)
    assert not torch.equal(a0, c0)
    # eval: no randomness, same geometry as timm's eval transform
    vb = next(iter(val))
    v0 = to_device(vb, "cpu", True, prep, decode=build_gpu_pipeline(cfg, seed=1))[0]
    v1 = to_device(vb, "cpu", True, prep, decode=build_gpu_pipeline(cfg, seed=2))[0]
    assert torch.equal(v0, v1) and v0.shape == (4, 3, S, S)
    with pytest.raises(ValueError, match="decode=build_gpu_pipeline"):
        to_device(batch, "cpu", True, prep, train=True)

    # through a worker process: the collated byte views cross as one buffer
    train_w, *_ = build_image_loaders(_gpu_cfg(folder, num_workers=1), 4, seed=0)
    data_w, labels_w = next(iter(train_w))
    assert torch.equal(labels_w, labels) and all(torch.equal(x, y) for x, y in zip(data_w, data))


def _resumed(cfg, seed, batches) -> GpuImagePipeline:
    pipe = build_gpu_pipeline(cfg, seed=seed)
    pipe.load_state_dict({"batches": batches})
    return pipe


def test_resumed_pipeline_continues_the_same_draws(folder):
    cfg = _gpu_cfg(folder, auto_augment="rand-m9-mstd0.5-inc1")
    train, *_ = build_image_loaders(cfg, 4, seed=0)
    data, _ = next(iter(train))
    pipe = build_gpu_pipeline(cfg, seed=3)
    outs = [pipe(data, "cpu", train=True) for _ in range(3)]
    resumed = _resumed(cfg, 3, 2)
    assert torch.equal(resumed(data, "cpu", train=True), outs[2])
    assert outs[0].dtype == torch.uint8 and outs[0].shape == (4, 3, S, S)
    from trainer.tasks import _Epochs

    epochs = _Epochs(train, augment=pipe)
    state = epochs.state_dict()
    assert state["augment"] == {"batches": 3}
    other = _Epochs(train, augment=build_gpu_pipeline(cfg, seed=3))
    other.load_state_dict(state)
    assert other.augment.batches == 3


def test_packed_and_hf_sources_hand_out_stored_bytes(tmp_path):
    import datasets

    rng = np.random.default_rng(3)
    raws = [_jpeg(rng.integers(0, 256, (8 + i, 9, 3), dtype=np.uint8)) for i in range(3)]
    write_packed(tmp_path / "p.npz.xz", raws, [0, 1, 0], ["a", "b"])
    ds = PackedImageDataset(tmp_path / "p.npz.xz", cache_dir=tmp_path / "cache", progress=False)
    ds.use_encoded()
    assert [bytes(ds[i][0].numpy()) for i in range(3)] == raws and ds[1][1] == 1

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        names=["a", "b"])})  # fmt: skip
    rows = {"image": [{"bytes": r, "path": None} for r in raws], "label": [0, 1, 1]}
    hf = HFImageDataset(datasets.Dataset.from_dict(rows, features=feats))
    hf.use_encoded()
    assert bytes(hf[2][0].numpy()) == raws[2] and hf[2][1] == 1
    arrays = datasets.Dataset.from_dict({"image": [[1, 2]], "label": [0]})
    with pytest.raises(ValueError, match="column 'image' is .*not a datasets.Image"):
        HFImageDataset(arrays).use_encoded()


def test_config_errors(folder):
    with pytest.raises(ValueError, match=r"data.decode must be one of \['cpu', 'gpu'\]"):
        build_image_loaders(_gpu_cfg(folder, decode="nvjpeg"), 2)
    for kind in ("digits", "synthetic"):
        cfg = ImageDataConfig(kind=kind, img_size=S, decode="gpu", num_workers=0)
        with pytest.raises(ValueError, match=f"data.decode=gpu .*data.kind='{kind}'"):
            build_image_loaders(cfg, 2)
    with pytest.raises(ValueError, match="needs data.device_normalize=true"):
        build_image_loaders(_gpu_cfg(folder, device_normalize=False), 2)
    with pytest.raises(ValueError, match="data.train_interpolation='bilinear'"):
        build_image_loaders(_gpu_cfg(folder, train_interpolation="bilinear"), 2)
    with pytest.raises(ValueError, match="only RandAugment"):
        build_image_loaders(_gpu_cfg(folder, auto_augment="augmix-m5-w4-d2"), 2)
    assert build_gpu_pipeline(ImageDataConfig(kind="folder")) is None  # decode=cpu
    with pytest.raises(ValueError, match="decode_process=true needs data.decode=gpu"):
        build_image_loaders(replace(_gpu_cfg(folder), decode="cpu", decode_process=True), 2)


def test_decode_process_defaults_to_cuda_only():
    """data.decode_process=null (the default) puts decode=gpu's pipeline in a child process on
    CUDA devices only; true/false force it; decode=cpu never uses it."""
    gpu = ImageDataConfig(kind="folder", decode="gpu")
    assert gpu.decode_process is None
    assert decode_in_process(gpu, torch.device("cuda", 1)) and decode_in_process(gpu, "cuda")
    assert not decode_in_process(gpu, torch.device("cpu"))
    assert decode_in_process(replace(gpu, decode_process=True), "cpu")
    assert not decode_in_process(replace(gpu, decode_process=False), "cuda")
    assert not decode_in_process(gpu, "cuda", step_graph=True)  # its threads: the GIL is free
    assert decode_in_process(replace(gpu, decode_process=True), "cuda", step_graph=True)
    assert not decode_in_process(ImageDataConfig(kind="folder"), "cuda")  # decode=cpu


def test_trainer_with_gpu_decode_resumes_exactly(tmp_path, folder):
    """The trainer end to end with data.decode=gpu (CPU here): the pipeline's batch counter
    is checkpointed with the data position, so a stopped and resumed run matches an
    uninterrupted one."""
    from trainer import run as run_training

    from .helpers import compose_cfg

    common = ["experiment=efficientvit_m0_digits", "logger=none", "trainer.progress=false",
              "data=imagenet", f"data.root={folder}", "data.img_size=32", "data.decode=gpu",
              "data.num_workers=0", "data.repeated_aug=false", "model.num_classes=3",
              "trainer.micro_batch=4", "trainer.max_steps=5", "trainer.eval_every=5",
              "trainer.ckpt_every=100", "trainer.epochs=null", "optim.schedule_unit=step",
              "optim.warmup_steps=1"]  # fmt: skip

    def run(name, *extra):
        return run_training(compose_cfg([*common, f"trainer.run_dir={tmp_path / name}", *extra]))

    a = run("a")  # batches decoded ahead by a background thread (data.decode_ahead=2)
    assert a["finished"] and a["images_seen"] == 20
    run("b", "trainer.stop_at=2")
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    # the position of the batches trained on, not of those decoded ahead
    assert ckpt["data"] == {"epoch": 0, "batch": 2, "augment": {"batches": 2}}
    b = run("b")
    assert (b["val_loss"], b["ema_val_loss"]) == (a["val_loss"], a["ema_val_loss"])
    c = run("c", "data.decode_ahead=0")  # decoded in the loop: the same batches
    assert (c["val_loss"], c["ema_val_loss"]) == (a["val_loss"], a["ema_val_loss"])
    # in a child process of its own (data.decode_process), stopped and resumed: the same
    run("d", "data.decode_process=true", "trainer.stop_at=2")
    ckpt = torch.load(tmp_path / "d" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["data"] == {"epoch": 0, "batch": 2, "augment": {"batches": 2}}
    d = run("d", "data.decode_process=true")
    assert (d["val_loss"], d["ema_val_loss"]) == (a["val_loss"], a["ema_val_loss"])


@pytest.mark.gpu
def test_cuda_pipeline_agrees_with_cpu(folder):
    """The same seed on CUDA (nvJPEG, CUDA kernels) and on the CPU: eval batches differ only
    by the decoders' rounding; train batches by that, amplified where an op thresholds
    (solarize, posterize, histogram ops), so the bound is on the mean."""
    cfg = _gpu_cfg(folder, auto_augment="rand-m9-mstd0.5-inc1")
    train, val, *_ = build_image_loaders(cfg, 12, seed=0)
    data, _ = next(iter(train))
    outs = {dev: build_gpu_pipeline(cfg, seed=4)(data, dev, train=True) for dev in ("cpu", "cuda")}
    assert outs["cuda"].is_cuda and outs["cuda"].is_contiguous(memory_format=torch.channels_last)
    diff = (outs["cuda"].cpu().float() - outs["cpu"].float()).abs()
    assert diff.mean() < 4.0, diff.mean()
    vdata, _ = next(iter(val))
    ev = {dev: build_gpu_pipeline(cfg)(vdata, dev) for dev in ("cpu", "cuda")}
    vdiff = (ev["cuda"].cpu().float() - ev["cpu"].float()).abs()
    assert vdiff.mean() < 1.5 and vdiff.max() <= 16, (vdiff.mean(), vdiff.max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("family", ["affine", "blend", "lut"])
def test_cuda_fused_families_equal_the_torch_ops(family, dtype):
    """The compiled family kernels (contraction off) against the torch ops on the
    GPU, bit for bit, at the training size, on float32 and uint8 images."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (40, 3, 224, 224), generator=g).float().cuda()
    names = FAMILIES[family]
    rows = np.arange(0, 40, 2)
    ops = np.array([RA_OPS.index(names[i % len(names)]) for i in range(len(rows))])
    rng = np.random.default_rng(0)
    entry = _plan_entry(family, ops, rows, rng.uniform(0, 10, len(rows)),
                        np.where(rng.random(len(rows)) < 0.5, -1.0, 1.0), 224, 224)  # fmt: skip
    fill = torch.tensor([124.0, 116.0, 104.0], device="cuda")
    want = apply_plan(x.clone(), [entry], fill)
    got = apply_plan(x.clone().to(dtype), [entry], fill, fused_ops=True)
    assert got.dtype == dtype and torch.equal(got.float(), want)


@pytest.mark.gpu
def test_cuda_nvimgcodec_decoder_agrees_with_pil(folder):
    """data.gpu_decoder=nvimgcodec on CUDA: planar RGB images on the device, in the batch's
    order, equal to PIL's (libjpeg-turbo's) decode up to IDCT rounding; the whole pipeline
    runs with it from its side stream, and its batches agree with torchvision's on average.

    The reference is PIL's decode, the one the CPU pipeline and timm use. On an H200 (twelfth
    session, docs/benchmarks.md) nvImageCodec's backends gave a mean difference of 0 to 0.05
    levels from it and at most 3, while torchvision's nvJPEG decode differed by 5 to 14 on
    average (up to 117), so torchvision is no reference here."""
    pytest.importorskip("nvidia.nvimgcodec")
    from data.gpu_augment import decode_batch

    train, *_ = build_image_loaders(_gpu_cfg(folder), 12, seed=0)
    data, _ = next(iter(train))
    ours = decode_batch(data, "cuda", decoder="nvimgcodec")
    torch.cuda.synchronize()
    for a, raw in zip(ours, data):
        pil = Image.open(io.BytesIO(raw.numpy().tobytes())).convert("RGB")
        ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        assert a.is_cuda and a.shape == ref.shape and a.dtype == torch.uint8
        diff = (a.cpu().float() - ref.float()).abs()
        assert diff.mean() < 0.25 and diff.max() <= 4
    outs = [build_gpu_pipeline(_gpu_cfg(folder, gpu_decoder=name), seed=4)(data, "cuda",
                                                                          train=True)
            for name in ("torchvision", "nvimgcodec")]  # fmt: skip
    assert (outs[0].float() - outs[1].float()).abs().mean() < 4.0


@pytest.mark.gpu
def test_cuda_decode_leaves_queued_reads_alone():
    """pytorch/vision#9606: nvJPEG writes on a private stream that does not wait for the
    caller's. Tensors freed while reductions over them are still queued must not be
    overwritten by the decoded images (decode_batch decodes with a side stream current)."""
    from .helpers import queued_reads_corrupted

    rng = np.random.default_rng(5)
    raws = [_tensor(_jpeg(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))] * 8
    assert queued_reads_corrupted(lambda: decode_batch(raws, "cuda"), len(raws)) == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_process_source_hands_out_the_threads_batches(folder, device):
    """data.decode_process: the child's batches (CUDA buffers shared by IPC on a GPU, laid
    out by the trainer's spec before the child's threads start) equal those the trainer's own
    threads make, bit for bit, from a start and from a resumed position."""
    import functools

    from data import ProcessAhead, batch_spec
    from trainer import config as config_lib
    from trainer.tasks import _gpu_train_source, _gpu_train_spec

    from .helpers import compose_cfg

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rc = config_lib.load(compose_cfg([
        "experiment=efficientvit_m0_digits", "data=imagenet", f"data.root={folder}",
        "data.img_size=32", "data.decode=gpu", "data.num_workers=0", "data.repeated_aug=false",
        "model.num_classes=3", "trainer.micro_batch=4", "trainer.epochs=null",
    ]))  # fmt: skip
    factory = functools.partial(_gpu_train_source, rc, 0, 1, device)
    here = factory()
    want = [here.next_batch() for _ in range(5)]
    assert batch_spec(want[0]) == _gpu_train_spec(rc)  # the layout the slots are made in
    there = ProcessAhead(factory, device, depth=2, spec=_gpu_train_spec(rc))
    try:
        got = [there.next_batch() for _ in range(3)]
        state = there.state_dict()
        assert state["batch"] == 3 and state["augment"] == {"batches": 3}
        there.load_state_dict(state)
        got += [there.next_batch() for _ in range(2)]
    finally:
        there.close()
        if hasattr(here, "close"):
            here.close()
    for (xw, yw), (xg, yg) in zip(want, got):
        assert xg.device.type == device and xg.dtype == torch.uint8
        assert xg.stride() == xw.stride()  # channels_last, as the threads hand it out
        assert torch.equal(xg, xw) and torch.equal(yg, yw)
