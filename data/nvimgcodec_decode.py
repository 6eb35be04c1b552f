"""``data.gpu_decoder=nvimgcodec``: a batch of JPEGs decoded by NVIDIA nvImageCodec.

NVIDIA nvImageCodec (``pip install 'nvidia-nvimgcodec-cu13[nvjpeg]'``, or ``-cu12``) takes
the batch in one Python call, with hardware, CUDA and hybrid backends. It writes planar RGB
(3, H, W), the layout the rest of the pipeline reads, into buffers of its own, handed to torch
through DLPack (no copy), with the consumer's stream made to wait for the decode.

Measured (docs/benchmarks.md, twelfth session, H100 and H200): it decodes at about half the
rate of torchvision's ``decode_jpeg(list, device="cuda")`` and trains 9-13% slower beside the
step. Inside, it still allocates, copies and waits once per image. Its pixels equal PIL's
(libjpeg-turbo's) decode up to IDCT rounding (mean 0-0.05 levels). torchvision's GPU decode
differs from PIL by 5-14 levels on average on high-frequency images. So choose it when
training pixels must match a CPU-decoded evaluation. ``torchvision`` stays the default.

On a CPU device the same call runs nvImageCodec's CPU backend (libjpeg-turbo), which the CPU
tests use. Images nvImageCodec cannot read come back as None and are decoded one by one by
torchvision's and PIL's decoders, as in ``decode_batch``.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch

INSTALL_HINT = (
    "data.gpu_decoder=nvimgcodec needs NVIDIA nvImageCodec: pip install "
    "'nvidia-nvimgcodec-cu13[nvjpeg]' (-cu12 for CUDA 12 builds of torch)"
)

_DECODERS: dict[torch.device, object] = {}
_LOCK = threading.Lock()


def available() -> bool:
    """Whether nvImageCodec's Python package imports here."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


def _decoder(device: torch.device):
    """One decoder per device (made on first use; nvImageCodec's decoder is thread-safe for
    calls from one thread at a time, which ``_LOCK`` ensures)."""
    from nvidia import nvimgcodec as nv

    if device not in _DECODERS:
        if device.type == "cuda":  # (an indexed device: decode_nvimgcodec resolves it)
            kinds = (nv.BackendKind.HW_GPU_ONLY, nv.BackendKind.GPU_ONLY,
                     nv.BackendKind.HYBRID_CPU_GPU)  # fmt: skip
            _DECODERS[device] = nv.Decoder(device_id=device.index,
                                           backends=[nv.Backend(k) for k in kinds])  # fmt: skip
        else:
            _DECODERS[device] = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY,
                                           backends=[nv.Backend(nv.BackendKind.CPU_ONLY)])  # fmt: skip
    return _DECODERS[device]


def decode_nvimgcodec(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Encoded images (uint8 1-D CPU tensors) -> RGB uint8 (3, H, W) tensors on ``device``,
    one nvImageCodec call for the batch. On CUDA the decode is ordered on the current stream
    (the outputs may be used on it at once) and the outputs live in nvImageCodec's memory,
    outside PyTorch's allocator, until the tensors are freed. EXIF orientation is not applied
    (as torchvision and PIL leave it)."""
    try:
        from nvidia import nvimgcodec as nv
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    from .gpu_augment import _decode_one

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not len(data):
        return []
    params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                             allow_any_depth=False, sample_format=nv.SampleFormat.P_RGB)  # fmt: skip
    streams = [nv.CodeStream(np.asarray(d.numpy())) for d in data]
    cuda = device.type == "cuda"
    stream = torch.cuda.current_stream(device) if cuda else None
    with _LOCK:
        dec = _decoder(device)
        if cuda:
            images = dec.decode(streams, params=params, cuda_stream=stream.cuda_stream)
        else:
            images = dec.decode(streams, params=params)
    if all(img is None for img in images):
        warnings.warn(f"nvImageCodec decoded none of a batch of {len(images)} images on {device} "
                      "(decoding them one by one instead, slowly); if they are JPEGs, its nvJPEG "
                      "library is missing: pip install 'nvidia-nvimgcodec-cu13[nvjpeg]'",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    out = []
    for raw, img in zip(data, images):
        if img is None:  # unreadable for nvImageCodec: torchvision's decoders, then PIL's
            out.append(_decode_one(raw, device))
            continue
        t = torch.from_dlpack(img) if cuda else torch.from_numpy(np.asarray(img))
        if t.shape[0] != 3 or t.dim() != 3:
            raise RuntimeError(f"nvImageCodec returned a {tuple(t.shape)} image; expected planar "
                               "RGB (3, H, W)")  # fmt: skip
        out.append(t)
    return out
