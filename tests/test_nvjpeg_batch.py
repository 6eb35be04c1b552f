"""data.gpu_decoder=nvjpeg (data/nvjpeg_batch.py, data/csrc/nvjpeg_batch.c): the build and its
errors on the CPU, the decoded images against torchvision's nvJPEG path on a GPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import data.nvjpeg_batch as nvjb
from data import ImageDataConfig, build_gpu_pipeline, build_image_loaders, make_image_folder
from data.gpu_augment import decode_batch

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _encoded(img: Image.Image, fmt: str = "JPEG", **kw) -> torch.Tensor:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _mixed_batch(seed: int = 0) -> list[torch.Tensor]:
    """Baseline JPEGs of several sizes and subsamplings, plus what the batched call cannot
    take: a progressive JPEG, a grey one, a CMYK one and a PNG."""
    rng = np.random.default_rng(seed)

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    out = [_encoded(rgb(h, w), quality=90) for h, w in ((37, 29), (64, 80), (16, 16))]
    out.append(_encoded(rgb(48, 40), quality=85, subsampling=0))  # 4:4:4
    out.append(_encoded(rgb(33, 51), progressive=True))
    out.append(_encoded(rgb(20, 30).convert("L")))
    out.append(_encoded(rgb(24, 18).convert("CMYK")))
    out.append(_encoded(rgb(10, 12), "PNG"))
    return out


def test_missing_toolchain_names_what_is_missing(monkeypatch, tmp_path):
    """Without nvJPEG's headers and library the build stops with an ImportError that names
    what it did not find and how to install it; the pipeline is refused where CUDA runs."""
    monkeypatch.setattr(nvjb, "_lib", None)
    monkeypatch.setattr(nvjb, "_lib_error", None)
    monkeypatch.setattr(nvjb, "_roots", lambda: [])
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    with pytest.raises(ImportError, match=r"pip install nvidia-nvjpeg .*not found: nvjpeg\.h"):
        nvjb.load()
    assert not nvjb.available()


def test_cpu_falls_back_to_torchvision(tmp_path):
    """On a CPU device the decoder is torchvision's (nvJPEG needs CUDA): the same images, and
    the pipeline's batches with gpu_decoder=nvjpeg equal torchvision's."""
    batch = _mixed_batch()[:4]
    ours = decode_batch(batch, "cpu", decoder="nvjpeg")
    ref = decode_batch(batch, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    folder = make_image_folder(tmp_path, num_classes=2, train_per_class=2, val_per_class=1,
                               size=20)  # fmt: skip
    outs = []
    for name in ("torchvision", "nvjpeg"):
        cfg = ImageDataConfig(kind="folder", root=str(folder), img_size=16, num_workers=0,
                              decode="gpu", gpu_decoder=name)  # fmt: skip
        if name == "nvjpeg" and torch.cuda.is_available() and not nvjb.available():
            pytest.skip("CUDA without nvJPEG's build inputs")
        train, *_ = build_image_loaders(cfg, 4, seed=0)
        data, _ = next(iter(train))
        outs.append(build_gpu_pipeline(cfg, seed=3)(data, "cpu", train=True))
    assert torch.equal(outs[0], outs[1])


def test_source_builds_where_nvjpeg_is_found():
    """The C source compiles and exports its four functions wherever nvJPEG's headers and
    library are found (skipped elsewhere, as in CI)."""
    if not nvjb.available():
        pytest.skip("nvJPEG's headers, library or a C compiler not found")
    lib = nvjb.load()
    for name in ("nvjb_create", "nvjb_info", "nvjb_decode", "nvjb_destroy"):
        assert hasattr(lib, name)


@pytest.mark.gpu
def test_cuda_nvjpeg_decoder_gives_torchvisions_images():
    """On CUDA the batched call decodes the baseline JPEGs as torchvision's nvJPEG path does
    (the same library call: equal pixels) and hands the rest to torchvision; the outputs are
    ordered on the current stream, with no host wait needed before they are read there."""
    if not nvjb.available():
        pytest.skip("nvJPEG's headers, library or a C compiler not found")
    batch = _mixed_batch(1)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(10):  # queue work ahead of the decode on this stream
            big = big @ big / 64.0
        ours = decode_batch(batch, "cuda", stream, decoder="nvjpeg")
        sums = [img.sum(dtype=torch.int64) for img in ours]
    ref = decode_batch(batch, "cuda")
    torch.cuda.synchronize()
    assert len(ours) == len(ref) == len(batch)
    for i, (a, b, s) in enumerate(zip(ours, ref, sums)):
        assert a.is_cuda and a.dtype == torch.uint8 and a.shape == b.shape, i
        assert torch.equal(a, b), i
        assert int(s) == int(b.sum(dtype=torch.int64)), i
    for _ in range(3):  # the two jpeg states in turn, outputs kept apart
        again = decode_batch(batch, "cuda", decoder="nvjpeg")
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(again, ref))
