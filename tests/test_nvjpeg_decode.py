"""data.gpu_decoder=nvjpeg (data/nvjpeg_decode.py): the buffer layout and descriptors, the
library search and its error, the CPU fallback; on a GPU with JPEG engines, the pixels
against PIL's decode, the images the engines refuse, threads, and the whole pipeline."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import data.nvjpeg_decode as nvj
from data import ImageDataConfig, build_gpu_pipeline, build_image_loaders, make_image_folder
from data.gpu_augment import decode_batch

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _raw(a: np.ndarray, mode: str = "RGB", fmt: str = "JPEG", **kw) -> torch.Tensor:
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour fields with texture: what photographs' JPEGs hold."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(7 * xx + seed), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1)
    a = 127 + 90 * base + rng.normal(0, 12, (h, w, 3))
    return a.clip(0, 255).astype(np.uint8)


def _pil(raw: torch.Tensor) -> torch.Tensor:
    with Image.open(io.BytesIO(raw.numpy().tobytes())) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def test_plane_layout_aligns_and_packs():
    offsets, total = nvj.plane_layout([2, 5, 1], [3, 7, 300], align=256)
    assert offsets.tolist() == [0, 256, 512] and total == 512 + 1024
    offsets, total = nvj.plane_layout([16], [16], align=256)
    assert offsets.tolist() == [0] and total == 768


def test_image_descriptors_point_at_each_plane():
    """nvjpegImage_t rows: R, G, B plane pointers one H*W apart from the image's start, a null
    fourth channel, and each plane's pitch W."""
    offsets, _ = nvj.plane_layout([2, 4], [3, 5])
    desc = nvj.image_descriptors(1 << 40, offsets, [2, 4], [3, 5])
    assert desc.dtype == np.uint64 and desc.shape == (2, 8)
    base1 = (1 << 40) + int(offsets[1])
    assert desc[1, :4].tolist() == [base1, base1 + 20, base1 + 40, 0]
    assert desc[1, 4:].tolist() == [5, 5, 5, 0]
    assert desc[0, :3].tolist() == [1 << 40, (1 << 40) + 6, (1 << 40) + 12]


def test_jpeg_header_reads_sizes_and_what_the_engines_take():
    """Sizes as PIL reads them, through APP segments (EXIF, ICC); baseline YCbCr JPEGs of
    every subsampling the engines decode are theirs; progressive, grayscale and CMYK JPEGs,
    PNGs, truncated or empty bytes are not (and do not raise)."""
    a = _photo(37, 53, 0)
    exif = Image.Exif()
    exif[0x010F] = "camera"
    for sub in (0, 1, 2):
        raw = _raw(a, quality=90, subsampling=sub, exif=exif.tobytes(), icc_profile=b"x" * 300)
        assert nvj.jpeg_header(raw.numpy()) == (37, 53, True)
        assert nvj.jpeg_header(raw.numpy().tobytes()) == (37, 53, True)
    assert nvj.jpeg_header(_raw(a, quality=90, progressive=True).numpy()) == (37, 53, False)
    assert nvj.jpeg_header(_raw(a, mode="L", quality=90).numpy()) == (37, 53, False)
    assert nvj.jpeg_header(_raw(a, mode="CMYK", quality=90).numpy()) == (37, 53, False)
    assert nvj.jpeg_header(_raw(a, fmt="PNG").numpy()) == (0, 0, False)
    whole = _raw(a, quality=90).numpy()
    for cut in (0, 1, 3, 20, 200):
        h, w, ok = nvj.jpeg_header(whole[:cut])
        assert not ok
    info = nvj.headers([_raw(a, quality=90), _raw(a, fmt="PNG")])
    assert info.tolist() == [[37, 53, 1], [0, 0, 0]]


def test_workers_hand_out_headers_with_the_bytes(tmp_path):
    """With data.gpu_decoder=nvjpeg the loader's workers read each image's header beside its
    bytes, and the headers travel with the batch (pickled from worker processes); with other
    decoders they read none."""
    import pickle

    root = make_image_folder(tmp_path, num_classes=2, train_per_class=3, val_per_class=2, size=20)
    for decoder, workers in (("nvjpeg", 1), ("nvjpeg", 0), ("torchvision", 0)):
        cfg = ImageDataConfig(kind="folder", root=str(root), img_size=16, decode="gpu",
                              num_workers=workers, gpu_decoder=decoder)  # fmt: skip
        train, val, *_ = build_image_loaders(cfg, 4, seed=0)
        for loader in (train, val):
            data, _ = next(iter(loader))
            if decoder != "nvjpeg":
                assert data.headers is None
                continue
            want = [[*_pil(d).shape[1:], 1] for d in data]
            assert data.headers.tolist() == want
            assert pickle.loads(pickle.dumps(data)).headers.tolist() == want


def test_missing_library_names_the_fix(monkeypatch):
    monkeypatch.setattr(nvj, "_LIB", None)
    monkeypatch.setattr(nvj, "_LIB_ERR", None)
    monkeypatch.setattr(nvj, "library_candidates", lambda: ["/nowhere/libnvjpeg.so.13"])
    assert not nvj.available()
    with pytest.raises(ImportError, match="pip install nvidia-nvjpeg.*/nowhere/libnvjpeg"):
        nvj._lib()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = ImageDataConfig(kind="folder", root="unused", img_size=16, decode="gpu",
                          gpu_decoder="nvjpeg")  # fmt: skip
    with pytest.raises(ImportError, match="data.gpu_decoder=torchvision works everywhere"):
        build_gpu_pipeline(cfg)


def test_cpu_device_decodes_as_torchvision_does(tmp_path):
    """On a CPU device the nvjpeg choice decodes with torchvision's CPU decoder, so the
    pipeline's batches equal the default's; asking the module itself for a CPU decode is an
    error."""
    root = make_image_folder(tmp_path, num_classes=2, train_per_class=3, val_per_class=1, size=20)
    cfg = ImageDataConfig(kind="folder", root=str(root), img_size=16, decode="gpu",
                          num_workers=0)  # fmt: skip
    train, *_ = build_image_loaders(cfg, 4, seed=0)
    data, _ = next(iter(train))
    a = decode_batch(data, "cpu", decoder="nvjpeg")
    b = decode_batch(data, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 4
    outs = []
    for name in ("torchvision", "nvjpeg"):
        cfg.gpu_decoder = name
        outs.append(build_gpu_pipeline(cfg, seed=3)(data, "cpu", train=True))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="decodes on CUDA devices"):
        nvj.decode_nvjpeg(list(data), "cpu")


def _engines():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not nvj.available():
        pytest.skip("libnvjpeg not found")
    try:
        nvj._handle(nvj._lib(), torch.cuda.current_device())
    except RuntimeError as err:
        pytest.skip(str(err))


@pytest.mark.gpu
def test_cuda_engines_decode_like_pil_in_one_buffer():
    """JPEGs of several sizes and subsamplings decode to PIL's pixels up to IDCT rounding (the
    chroma interpolated as libjpeg-turbo does), as views of one device buffer in the batch's
    order; a progressive JPEG, a grayscale one and a PNG go to the fallback decoders and
    still come back in their places."""
    _engines()
    raws, kinds = [], []
    for k, (h, w, sub) in enumerate([(375, 500, 2), (64, 48, 0), (33, 47, 1), (224, 224, 2),
                                     (17, 300, 2), (500, 333, 0)]):  # fmt: skip
        raws.append(_raw(_photo(h, w, k), quality=90, subsampling=sub))
        kinds.append("engine")
    raws.insert(2, _raw(_photo(40, 60, 9), quality=90, progressive=True))
    kinds.insert(2, "other")
    raws.insert(4, _raw(_photo(30, 20, 10), mode="L", quality=90))
    kinds.insert(4, "other")
    raws.append(_raw(_photo(12, 9, 11), fmt="PNG"))
    kinds.append("png")
    out = nvj.decode_nvjpeg(raws, "cuda")
    torch.cuda.synchronize()
    assert len(out) == len(raws)
    storages = {o.untyped_storage().data_ptr() for o, k in zip(out, kinds) if k == "engine"}
    assert len(storages) == 1, "the engines' images should share one buffer"
    for o, raw, kind in zip(out, raws, kinds):
        ref = _pil(raw)
        assert o.is_cuda and o.dtype == torch.uint8 and o.shape == ref.shape
        diff = (o.cpu().float() - ref.float()).abs()
        if kind == "png":
            assert diff.max() == 0
        elif kind == "engine":
            assert diff.mean() < 0.25 and diff.max() <= 4, (kind, diff.mean(), diff.max())
        else:  # torchvision's GPU decode (chroma not interpolated) or its CPU one
            assert diff.mean() < 8


@pytest.mark.gpu
def test_cuda_headers_that_mislead():
    """A header that wrongly says "engines" (here a progressive JPEG's) makes nvJPEG's own
    check sort the batch again, and every image still comes back right."""
    from data.images import EncodedImages

    _engines()
    raws = [_raw(_photo(40 + i, 72 - i, i), quality=88, subsampling=i % 3) for i in range(40)]
    raws[7] = _raw(_photo(47, 65, 99), quality=88, progressive=True)
    flat = torch.cat(raws)
    batch = EncodedImages.from_flat(flat, [r.numel() for r in raws])
    batch.headers = nvj.headers(batch)
    assert not batch.headers[7, 2] and batch.headers[:, 2].sum() == 39
    batch.headers[7, 2] = 1  # mislead
    out = nvj.decode_nvjpeg(batch, "cuda")
    torch.cuda.synchronize()
    for o, raw in zip(out, raws):
        ref = _pil(raw)
        diff = (o.cpu().float() - ref.float()).abs()
        assert o.shape == ref.shape and diff.mean() < 8
    for k in (0, 13, 39):
        assert (out[k].cpu().float() - _pil(raws[k]).float()).abs().mean() < 0.25


@pytest.mark.gpu
def test_cuda_engines_leave_queued_reads_alone():
    """The engines write when called, not in stream order (torchcodec#1634). Tensors freed on
    the caller's stream while reductions over them are still queued must not be overwritten
    by the decoded images, though the decode runs on that same stream's allocations."""
    from .helpers import queued_reads_corrupted

    _engines()
    raws = [_raw(_photo(64, 64, i), quality=90) for i in range(8)]
    assert queued_reads_corrupted(lambda: nvj.decode_nvjpeg(raws, "cuda"), len(raws)) == 0


@pytest.mark.gpu
def test_cuda_threads_decode_at_once():
    """Two threads decoding batches at the same time (the pipeline's decode_ahead threads)
    each get their own batch's pixels."""
    _engines()
    batches = [[_raw(_photo(96 + 8 * i, 120, 10 * t + i), quality=85) for i in range(24)]
               for t in range(2)]  # fmt: skip
    want = [[_pil(r) for r in b] for b in batches]
    errors: list[str] = []

    def work(t: int) -> None:
        stream = torch.cuda.Stream()
        for _ in range(15):
            with torch.cuda.stream(stream):
                got = nvj.decode_nvjpeg(batches[t], "cuda")
            stream.synchronize()
            for g, w in zip(got, want[t]):
                if (g.cpu().float() - w.float()).abs().mean() >= 0.25:
                    errors.append(f"thread {t}: image differs")
                    return

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


@pytest.mark.gpu
def test_cuda_pipeline_with_engines_trains_like_torchvisions(tmp_path):
    """The pipeline's train and eval batches with data.gpu_decoder=nvjpeg: the same draws as
    with torchvision's decoder, so the batches differ only by the decoders' pixels."""
    _engines()
    root = make_image_folder(tmp_path, num_classes=3, train_per_class=6, val_per_class=2,
                             size=48)  # fmt: skip
    cfg = ImageDataConfig(kind="folder", root=str(root), img_size=32, decode="gpu",
                          num_workers=0)  # fmt: skip
    train, val, *_ = build_image_loaders(cfg, 8, seed=0)
    data, _ = next(iter(train))
    vdata, _ = next(iter(val))
    outs = []
    for name in ("torchvision", "nvjpeg"):
        cfg.gpu_decoder = name
        pipe = build_gpu_pipeline(cfg, seed=4)
        outs.append((pipe(data, "cuda", train=True), pipe(vdata, "cuda")))
    for a, b in zip(*outs):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
        assert (a.float() - b.float()).abs().mean() < 4.0
