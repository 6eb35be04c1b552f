"""``data.gpu_decoder=nvjpeg``: a batch of JPEGs decoded by the GPU's JPEG engines, in one call.

torchvision's ``decode_jpeg(list, device="cuda")`` drives the same hardware decoder, but
upsamples chroma without interpolation: its pixels differ from PIL's by 5-14 levels on
average on detailed images, and more threads calling it do not decode faster
(docs/benchmarks.md). Here the batch goes
to nvJPEG's hardware backend (``NVJPEG_BACKEND_HARDWARE``, the JPEG engines of A100, H100 and
later) through ``ctypes``:

- each image's size and whether the engines take it come from its header, read by the
  loader's workers (:func:`jpeg_header`, in Python; ``EncodedImages.headers``), so the training
  process makes no call an image;
- the outputs are views into **one** device buffer a batch, planar RGB (3, H, W) each, the
  layout the rest of the pipeline reads;
- one ``nvjpegDecodeBatched`` call decodes every image the engines take, on a CUDA stream of
  the calling thread's, which the caller's stream then waits for. The host first waits for
  the caller's queued work: the engines write when called, not in stream order (torchcodec
  #1634), and the buffer may reuse memory that queued work still reads;
- chroma is upsampled by interpolation (``NVJPEG_FLAGS_UPSAMPLING_WITH_INTERPOLATION``), as
  libjpeg-turbo (PIL) does, so pixels equal a CPU decode up to IDCT rounding (``INTERPOLATED``
  says, per device, whether the library took the flag).

Measured on an H100 (docs/benchmarks.md): EfficientViT-M0 trained from JPEGs at torchvision's
rate with it (twenty-second session); since the pipeline reads its batch without a tensor an
image (:class:`PackedImages`), 1.11-1.12x that code's rate for M0 and M5 (twenty-sixth). Two
concurrent engine calls a batch decoded 1.58x faster in isolation but trained 18% slower, and
bitstreams copied to the device first (``NVJPEG_BACKEND_HARDWARE_DEVICE``) 38% slower
(twenty-third session), so a batch is one call from host memory. The engines' path waits on
the host once an image whatever the output format; planar YUV (no colour conversion) decoded
slower, and ``max_cpu_threads`` changed nothing (twenty-fourth session).
The engine call made by a thread of its own while the pipeline threads work on other
batches trained no faster (M0) and hung 2 runs in 5, and a high-priority stream for the
engines' per-image work changed nothing (twenty-fifth session); both were dropped.

Images the engines do not take (progressive, grayscale, CMYK, PNGs, 4:1:1) are decoded one by
one by torchvision's and PIL's decoders, as in ``decode_batch``; where a header misleads, nvJPEG's
own check sorts the batch again. The library is found beside torchvision (its CUDA wheels
bundle ``libnvjpeg``), in NVIDIA's ``nvidia-nvjpeg`` wheels, or on the system path. GPUs
without JPEG engines (consumer cards, V100) fail at the decoder's creation with a message
naming ``data.gpu_decoder=torchvision``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

BACKEND_HARDWARE = 3
OUTPUT_RGB = 3  # planar R, G, B
FLAG_INTERPOLATED_CHROMA = 1 << 5  # NVJPEG_FLAGS_UPSAMPLING_WITH_INTERPOLATION
ALIGN = 256  # each image's planes start on this many bytes
STATUS = {1: "NOT_INITIALIZED", 2: "INVALID_PARAMETER", 3: "BAD_JPEG", 4: "JPEG_NOT_SUPPORTED",
          5: "ALLOCATOR_FAILURE", 6: "EXECUTION_FAILED", 7: "ARCH_MISMATCH",
          8: "INTERNAL_ERROR", 9: "IMPLEMENTATION_NOT_SUPPORTED",
          10: "INCOMPLETE_BITSTREAM"}  # fmt: skip

INSTALL_HINT = (
    "data.gpu_decoder=nvjpeg needs NVIDIA's libnvjpeg (bundled with CUDA builds of torchvision; "
    "or pip install nvidia-nvjpeg) and a GPU with JPEG engines (A100, H100 or later); "
    "data.gpu_decoder=torchvision works everywhere"
)

_LIB: ctypes.CDLL | None = None
_LIB_ERR: str | None = None
_LOCK = threading.Lock()
_HANDLES: dict[int, ctypes.c_void_p] = {}  # device index -> nvjpegHandle_t
_LOCAL = threading.local()  # per thread: {device index: _State}
_KEEP: list = []  # (event, encoded bytes) until the engines have read them
_KEEP_MAX = 8  # batches kept before a decode drops those read (release_read_bytes: sooner)
INTERPOLATED: dict[int, bool] = {}  # device index -> whether chroma is interpolated


class NvjpegError(RuntimeError):
    """An nvJPEG call failed; ``status`` is its nvjpegStatus_t."""

    def __init__(self, call: str, status: int):
        super().__init__(f"{call} failed: NVJPEG_STATUS_{STATUS.get(status, status)}")
        self.status = status


def library_candidates() -> list[str]:
    """Where libnvjpeg may be, in the order tried: torchvision's bundled copy, NVIDIA's pip
    wheels (``nvidia/cu13/lib``, ``nvidia/nvjpeg/lib``), then the loader's search path."""
    found: list[str] = []
    try:
        import torchvision

        site = os.path.dirname(os.path.dirname(torchvision.__file__))
        found += sorted(glob.glob(os.path.join(site, "torchvision.libs", "libnvjpeg*.so*")))
        found += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvjpeg.so*")))
    except ImportError:
        pass
    return found + ["libnvjpeg.so.13", "libnvjpeg.so.12", "libnvjpeg.so"]


def _bind(path: str) -> ctypes.CDLL:
    """The library with the signatures of the calls used here (they release the GIL)."""
    lib = ctypes.CDLL(path)
    p, i, u, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
    ptr = ctypes.POINTER
    sigs = {
        "nvjpegCreateEx": (i, p, p, u, ptr(p)),
        "nvjpegJpegStateCreate": (p, ptr(p)),
        "nvjpegJpegStreamCreate": (p, ptr(p)),
        "nvjpegJpegStreamParseHeader": (p, p, sz, p),
        "nvjpegJpegStreamGetComponentsNum": (p, ptr(u)),
        "nvjpegDecodeBatchedSupported": (p, p, ptr(i)),
        "nvjpegDecodeBatchedInitialize": (p, p, i, i, i),
        "nvjpegDecodeBatched": (p, p, p, p, p, p),
    }
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = list(args), ctypes.c_int
    return lib


def _lib() -> ctypes.CDLL:
    global _LIB, _LIB_ERR
    with _LOCK:
        if _LIB is None and _LIB_ERR is None:
            errors = []
            for path in library_candidates():
                try:
                    _LIB = _bind(path)
                    break
                except (OSError, AttributeError) as err:
                    errors.append(f"{path}: {err}")
            else:
                _LIB_ERR = "; ".join(errors[-3:])
    if _LIB is None:
        raise ImportError(f"{INSTALL_HINT} (libnvjpeg not loaded: {_LIB_ERR})")
    return _LIB


def available() -> bool:
    """Whether libnvjpeg loads here (the engines are only checked by the first decode)."""
    try:
        _lib()
    except ImportError:
        return False
    return True


def _check(call: str, status: int) -> None:
    if status:
        raise NvjpegError(call, status)


def _handle(lib: ctypes.CDLL, index: int) -> ctypes.c_void_p:
    with _LOCK:
        if index not in _HANDLES:
            h = ctypes.c_void_p()
            with torch.cuda.device(index):
                for flags in (FLAG_INTERPOLATED_CHROMA, 0):  # (older nvJPEG lacks the flag)
                    status = lib.nvjpegCreateEx(BACKEND_HARDWARE, None, None, flags,
                                                ctypes.byref(h))  # fmt: skip
                    if not status:
                        INTERPOLATED[index] = bool(flags)
                        break
            if status:
                raise RuntimeError(f"nvJPEG's hardware decoder is not available on "
                                   f"{torch.cuda.get_device_name(index)} (nvjpegCreateEx: "
                                   f"NVJPEG_STATUS_{STATUS.get(status, status)}); {INSTALL_HINT}")  # fmt: skip
            _HANDLES[index] = h
    return _HANDLES[index]


@dataclass
class _State:
    """A thread's decoder state on one device: nvJPEG's state and parsed-stream objects, the
    batch size the state was initialised for (0: not yet), and the thread's CUDA stream."""

    state: ctypes.c_void_p
    jpeg_stream: ctypes.c_void_p
    stream: torch.cuda.Stream
    batch: int = 0


def _state(lib: ctypes.CDLL, handle: ctypes.c_void_p, index: int) -> _State:
    per = getattr(_LOCAL, "states", None)
    if per is None:
        per = _LOCAL.states = {}
    if index not in per:
        state, jpeg_stream = ctypes.c_void_p(), ctypes.c_void_p()
        with torch.cuda.device(index):
            _check("nvjpegJpegStateCreate", lib.nvjpegJpegStateCreate(handle, ctypes.byref(state)))
            _check("nvjpegJpegStreamCreate",
                   lib.nvjpegJpegStreamCreate(handle, ctypes.byref(jpeg_stream)))  # fmt: skip
        per[index] = _State(state, jpeg_stream, torch.cuda.Stream(index))
    return per[index]


def plane_layout(heights, widths, align: int = ALIGN) -> tuple[np.ndarray, int]:
    """Byte offsets of planar RGB images (3, H, W) packed in one buffer, each start aligned to
    ``align`` bytes, and the buffer's size."""
    sizes = 3 * np.asarray(heights, dtype=np.int64) * np.asarray(widths, dtype=np.int64)
    padded = (sizes + align - 1) // align * align
    offsets = np.concatenate(([0], np.cumsum(padded)[:-1])).astype(np.int64)
    return offsets, int(padded.sum())


def image_descriptors(base: int, offsets, heights, widths) -> np.ndarray:
    """nvjpegImage_t for each image, as uint64 rows of 8: ``channel[4]`` (the R, G, B plane
    pointers, then null) and ``pitch[4]`` (each plane's row length, W)."""
    h = np.asarray(heights, dtype=np.uint64)
    w = np.asarray(widths, dtype=np.uint64)
    start = np.uint64(base) + np.asarray(offsets, dtype=np.uint64)
    desc = np.zeros((len(h), 8), dtype=np.uint64)
    for c in range(3):
        desc[:, c] = start + np.uint64(c) * h * w
        desc[:, 4 + c] = w
    return desc


def _engines_take(lib, handle, st: _State, ptr: int, length: int) -> bool:
    """nvJPEG's own verdict on one image: a three-component JPEG the engines decode."""
    if lib.nvjpegJpegStreamParseHeader(handle, ptr, length, st.jpeg_stream):
        return False  # not a JPEG nvJPEG reads (a PNG, a broken file): the fallback's
    n, unsupported = ctypes.c_uint(), ctypes.c_int(1)
    lib.nvjpegJpegStreamGetComponentsNum(st.jpeg_stream, ctypes.byref(n))
    lib.nvjpegDecodeBatchedSupported(handle, st.jpeg_stream, ctypes.byref(unsupported))
    return unsupported.value == 0 and n.value == 3


def jpeg_header(raw) -> tuple[int, int, bool]:
    """(H, W, whether the JPEG engines take it) from a JPEG's markers, in Python: what the
    loader's workers compute for each image (``data.gpu_decoder=nvjpeg``), so that the training
    process makes no call an image. The engines take 8-bit baseline or extended sequential
    Huffman JPEGs of three components (YCbCr 4:4:4, 4:2:2, 4:2:0 or 4:4:0) in a single
    interleaved scan; anything else, or what is not a JPEG, gives ``(0, 0, False)`` or False.
    ``raw``: bytes or a uint8 array."""
    b = raw if isinstance(raw, bytes) else bytes(np.asarray(raw, dtype=np.uint8).data)
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return 0, 0, False
    i, sof, rgb = 2, None, False
    while i + 4 <= n:
        if b[i] != 0xFF:
            return 0, 0, False
        m = b[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a segment
            i += 2
            continue
        seg = (b[i + 2] << 8) | b[i + 3]
        if m == 0xEE and seg >= 12 and b[i + 4 : i + 9] == b"Adobe" and i + 15 < n:
            rgb = b[i + 15] == 0  # APP14 transform 0: the components are R, G, B
        elif 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC) and i + 10 <= n:  # a frame
            nc = b[i + 9]
            samp = tuple(b[i + 11 + 3 * k] for k in range(nc)) if i + 10 + 3 * nc <= n else ()
            sof = (m, b[i + 4], (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8], nc, samp)
        elif m == 0xDA:  # the first scan: the frame must be one the engines decode in one scan
            if sof is None:
                return 0, 0, False
            kind, bits, h, w, nc, samp = sof
            ok = (kind in (0xC0, 0xC1) and bits == 8 and nc == 3 and len(samp) == 3
                  and samp[0] in (0x11, 0x21, 0x22, 0x12) and samp[1] == samp[2] == 0x11
                  and not rgb and i + 4 < n and b[i + 4] == 3
                  and b.find(b"\xff\xda", i + 2 + seg) < 0 and h > 0 and w > 0)  # fmt: skip
            return h, w, ok
        elif m == 0xD9:
            break
        i += 2 + seg
    return (sof[2], sof[3], False) if sof else (0, 0, False)


def headers(data) -> np.ndarray:
    """int64 (n, 3): :func:`jpeg_header` of each encoded image (uint8 1-D tensors)."""
    out = np.zeros((len(data), 3), dtype=np.int64)
    for k, d in enumerate(data):
        out[k] = jpeg_header(d.numpy() if isinstance(d, torch.Tensor) else d)
    return out


def _decode_engines(lib, handle, index: int, ptrs, lengths, desc, caller) -> int:
    """One ``nvjpegDecodeBatched`` call on this thread's decoder state and CUDA stream; the
    caller's stream waits for it. Returns its status (0: done)."""
    st = _state(lib, handle, index)
    m = len(ptrs)
    with torch.cuda.device(index):
        st.stream.wait_stream(caller)  # (the host has waited for it too: see decode_nvjpeg)
        if st.batch != m:
            status = lib.nvjpegDecodeBatchedInitialize(handle, st.state, m, 1, OUTPUT_RGB)
            if status:
                return status
            st.batch = m
        status = lib.nvjpegDecodeBatched(handle, st.state, ptrs.ctypes.data,
                                         lengths.ctypes.data, desc.ctypes.data,
                                         st.stream.cuda_stream)  # fmt: skip
        if status:
            st.batch = 0  # re-initialise the state before its next batch
            return status
        caller.wait_stream(st.stream)
    return 0


def _drop_read() -> None:
    _KEEP[:] = [(e, d) for e, d in _KEEP if not e.query()]


def release_read_bytes() -> None:
    """Drop the encoded batches the engines have read. Freeing a batch's shared-memory buffer
    (an unmap) is work for the host; :class:`~data.gpu_augment.GpuImagePipeline` calls this from
    its second stage, so that the decoding thread, which bounds the loader, does not."""
    with _LOCK:
        _drop_read()


class PackedImages:
    """A decoded batch on one CUDA device without a tensor an image: uint8 planar RGB images
    (3, H, W), sizes differ, the engines' share packed in one buffer, the others (decoded one by
    one) as tensors of their own. (``data.pixel_store.PixelBatch`` is one in host memory.)

    It stands in for the list of images (``len``, indexing and iteration give (3, H, W) views,
    made on first use) while the pipeline reads it as arrays: ``hw`` (n, 2) int64, ``ptrs`` (n,)
    int64 device addresses. Making 256 views a batch and dropping those of earlier batches
    took 16% of the decoding thread's samples in EfficientViT-M0 training on an H100
    (docs/benchmarks.md, twenty-sixth session). ``tensors``: the memory the images live in,
    for ``record_stream`` or to keep it until queued reads are done."""

    def __init__(self, buf: torch.Tensor | None, offsets, hw, engines, others: dict):
        self.hw = np.asarray(hw, dtype=np.int64).reshape(-1, 2)
        n = len(self.hw)
        self._buf, self._offsets = buf, np.zeros(n, dtype=np.int64)
        engines = np.asarray(engines, dtype=np.int64)  # batch positions of the images in ``buf``
        self._offsets[engines] = offsets
        self._others = {int(k): v.contiguous() for k, v in others.items()}
        first = buf if buf is not None else next(iter(self._others.values()))
        self.device = first.device
        self.ptrs = np.zeros(n, dtype=np.int64)
        if buf is not None:
            self.ptrs[engines] = buf.data_ptr() + self._offsets[engines]
        for k, img in self._others.items():
            self.ptrs[k] = img.data_ptr()
        self.tensors = ([buf] if buf is not None else []) + list(self._others.values())
        self._views: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.hw)

    def images(self) -> list[torch.Tensor]:
        """The images as (3, H, W) tensors (views into the buffer), in batch order."""
        if self._views is None:
            views: list[torch.Tensor] = []
            for k, ((h, w), off) in enumerate(zip(self.hw.tolist(), self._offsets.tolist())):
                img = self._others.get(k)
                views.append(img if img is not None else
                             self._buf[off : off + 3 * h * w].view(3, h, w))  # fmt: skip
            self._views = views
        return self._views

    def __getitem__(self, k):
        return self.images()[k]

    def __iter__(self):
        return iter(self.images())


def _flat_parts(data, n: int):
    """(flat buffer, int64 byte offsets, int64 sizes) when ``data`` is one buffer split by sizes
    (``EncodedImages``), so the engines read it without a tensor an image; else None."""
    flat, sizes = getattr(data, "flat", None), getattr(data, "sizes", None)
    if flat is None or sizes is None or len(sizes) != n or not flat.is_contiguous():
        return None
    sizes = np.asarray(sizes, dtype=np.int64)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    return flat, starts, sizes


def decode_nvjpeg(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Encoded images (uint8 1-D CPU tensors) -> RGB uint8 (3, H, W) tensors on the CUDA
    ``device``: :func:`decode_nvjpeg_packed`'s images as a list."""
    return decode_nvjpeg_packed(data, device).images() if len(data) else []


def decode_nvjpeg_packed(data, device: torch.device | str) -> PackedImages:
    """Encoded images (uint8 1-D CPU tensors, or ``EncodedImages``: one buffer) -> the
    :class:`PackedImages` of their RGB pixels on the CUDA ``device``, the engines' share in one
    call; the caller's current stream waits for it (the outputs may be used on it at once).
    Image headers come from ``data.headers`` where the loader's workers put them, else
    :func:`headers` here. EXIF orientation is not applied (as torchvision and PIL leave it)."""
    from .gpu_augment import _decode_one

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"data.gpu_decoder=nvjpeg decodes on CUDA devices, not {device}")
    index = torch.cuda.current_device() if device.index is None else device.index
    device = torch.device("cuda", index)
    n = len(data)
    if not n:
        raise ValueError("decode_nvjpeg_packed: no images")
    lib = _lib()
    handle = _handle(lib, index)
    info = getattr(data, "headers", None)
    if info is None or len(info) != n:
        info = headers(data)
    parts = _flat_parts(data, n)
    if parts is None:  # a tensor an image
        data = [d if d.is_contiguous() else d.contiguous() for d in data]
    hw_idx = np.flatnonzero(info[:, 2])
    caller = torch.cuda.current_stream(device)
    # The engines write when the call is made, whatever the stream's queue (torchcodec#1634: a
    # stream wait does not gate the write, a host wait does), and torchvision's fallback decode
    # writes on a stream of its own (pytorch/vision#9606). The outputs may take memory that work
    # queued on the caller's stream still reads, so that work finishes first.
    queued = torch.cuda.Event()
    queued.record(caller)
    queued.synchronize()
    buf, offsets = None, np.zeros(0, dtype=np.int64)
    if len(hw_idx):
        hs, ws = info[hw_idx, 0], info[hw_idx, 1]
        offsets, total = plane_layout(hs, ws)
        buf = torch.empty(total, dtype=torch.uint8, device=device)
        desc = image_descriptors(buf.data_ptr(), offsets, hs, ws)
        if parts is not None:
            flat, starts, sizes = parts
            ptrs = (flat.data_ptr() + starts[hw_idx]).astype(np.uint64)
            lengths = sizes[hw_idx].astype(np.uint64)
        else:
            ptrs = np.array([data[k].data_ptr() for k in hw_idx], dtype=np.uint64)
            lengths = np.array([data[k].numel() for k in hw_idx], dtype=np.uint64)
        status = _decode_engines(lib, handle, index, ptrs, lengths, desc, caller)
        if status:  # a header that passed ours but not nvJPEG's checks: ask nvJPEG, once
            st = _state(lib, handle, index)
            keep = np.array([_engines_take(lib, handle, st, int(p), int(m))
                             for p, m in zip(ptrs, lengths)], dtype=bool)  # fmt: skip
            if not keep.all():
                status = _decode_engines(lib, handle, index, ptrs[keep], lengths[keep],
                                         np.ascontiguousarray(desc[keep]), caller)  # fmt: skip
                hw_idx, offsets = hw_idx[keep], offsets[keep]
            if status:
                warnings.warn(f"nvjpegDecodeBatched failed (NVJPEG_STATUS_"
                              f"{STATUS.get(status, status)}) on a batch of {len(hw_idx)}; "
                              "decoding it image by image instead", RuntimeWarning,
                              stacklevel=2)  # fmt: skip
                hw_idx, offsets = hw_idx[:0], offsets[:0]
        if len(hw_idx):
            done = torch.cuda.Event()
            done.record(caller)
            with _LOCK:  # the host bytes stay alive until the engines have read them
                _KEEP.append((done, parts[0] if parts is not None else data))
                if len(_KEEP) > _KEEP_MAX:
                    _drop_read()
        else:
            buf = None
    rest = np.setdiff1d(np.arange(n), hw_idx, assume_unique=True)
    # not for the engines: torchvision's decoders, then PIL's
    others = {int(k): _decode_one(data[k], device) for k in rest}
    hw = info[:, :2].copy()
    for k, img in others.items():
        hw[k] = img.shape[-2:]
    return PackedImages(buf, offsets, hw, hw_idx, others)
