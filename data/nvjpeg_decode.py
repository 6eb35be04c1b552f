"""``data.gpu_decoder=nvjpeg``: a batch of JPEGs decoded by the GPU's JPEG engines, in one call.

torchvision's ``decode_jpeg(list, device="cuda")`` drives the same hardware decoder, but
allocates, parses and synchronises image by image behind one lock. Here the batch goes to
nvJPEG's hardware backend (``NVJPEG_BACKEND_HARDWARE``, the JPEG engines of A100, H100 and
later) through ``ctypes``:

- the images' sizes come from their headers (one parse an image, in C);
- the outputs are views into **one** device buffer a batch, planar RGB (3, H, W) each, the
  layout the rest of the pipeline reads;
- one ``nvjpegDecodeBatched`` call decodes every image the engines support, ordered on the
  caller's stream (the outputs may be used on it at once);
- each calling thread has a decoder state of its own, so the pipeline's decoding threads do
  not wait for one another.

Chroma is upsampled by interpolation (``NVJPEG_FLAGS_UPSAMPLING_WITH_INTERPOLATION``), as
libjpeg-turbo (PIL) does by default, so pixels match a CPU decode up to IDCT rounding
(``INTERPOLATED`` says, per device, whether the library took the flag).

Images the engines do not take (progressive, grayscale, CMYK, PNGs, 4:1:1) are decoded one by
one by torchvision's and PIL's decoders, as in ``decode_batch``. The library is found beside
torchvision (its wheels bundle ``libnvjpeg``), in NVIDIA's ``nvidia-nvjpeg`` wheels, or on the
system path. GPUs without JPEG engines (consumer cards, V100) fail at the decoder's creation
with a message naming ``data.gpu_decoder=torchvision``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
import warnings

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
_LOCAL = threading.local()  # per thread: {device index: (state, jpeg stream, batch size)}
_KEEP: list = []  # (event, encoded bytes) until the engines have read them
INTERPOLATED: dict[int, bool] = {}  # device index -> whether chroma is interpolated
ALLOCATOR = os.environ.get("ATTNLAB_NVJPEG_ALLOCATOR", "cuda")  # or torch (experiment)


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


_QUICK = ("nvjpegJpegStreamParseHeader", "nvjpegJpegStreamGetFrameDimensions",
          "nvjpegJpegStreamGetComponentsNum", "nvjpegDecodeBatchedSupported")  # fmt: skip
"""Calls of microseconds made per image: bound through ``ctypes.PyDLL``, which keeps the GIL.
Through ``CDLL`` each would release and take it again, and with the pipeline's other threads
waiting for it, a batch's thousand hand-overs cost more than the parsing."""


def _bind(path: str) -> ctypes.CDLL:
    """The library through ``CDLL`` (calls release the GIL), its per-image calls replaced by
    the same functions through ``PyDLL`` (they keep it)."""
    lib, quick = ctypes.CDLL(path), ctypes.PyDLL(path)
    p, i, u, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
    ptr = ctypes.POINTER
    sigs = {
        "nvjpegCreateEx": (i, p, p, u, ptr(p)),
        "nvjpegCreateExV2": (i, p, p, u, ptr(p)),
        "nvjpegJpegStateCreate": (p, ptr(p)),
        "nvjpegJpegStreamCreate": (p, ptr(p)),
        "nvjpegJpegStreamParseHeader": (p, p, sz, p),
        "nvjpegJpegStreamGetFrameDimensions": (p, ptr(u), ptr(u)),
        "nvjpegJpegStreamGetComponentsNum": (p, ptr(u)),
        "nvjpegDecodeBatchedSupported": (p, p, ptr(i)),
        "nvjpegDecodeBatchedInitialize": (p, p, i, i, i),
        "nvjpegDecodeBatched": (p, p, p, p, p, p),
    }
    for name, args in sigs.items():
        fn = getattr(quick if name in _QUICK else lib, name)
        fn.argtypes, fn.restype = list(args), ctypes.c_int
        setattr(lib, name, fn)
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
            allocs = _allocators(index) if ALLOCATOR == "torch" else (None, None)
            with torch.cuda.device(index):
                for flags in (FLAG_INTERPOLATED_CHROMA, 0):  # (older nvJPEG lacks the flag)
                    if allocs[0] is None:
                        status = lib.nvjpegCreateEx(BACKEND_HARDWARE, None, None, flags,
                                                    ctypes.byref(h))  # fmt: skip
                    else:
                        status = lib.nvjpegCreateExV2(BACKEND_HARDWARE, ctypes.byref(allocs[0]),
                                                      ctypes.byref(allocs[1]), flags,
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


_MALLOC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                           ctypes.c_size_t, ctypes.c_void_p)  # fmt: skip
_FREE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                         ctypes.c_void_p)  # fmt: skip


class _AllocatorV2(ctypes.Structure):  # nvjpegDevAllocatorV2_t and nvjpegPinnedAllocatorV2_t
    _fields_ = [("malloc", _MALLOC), ("free", _FREE), ("ctx", ctypes.c_void_p)]


_PINNED: dict[int, torch.Tensor] = {}  # pinned buffers lent to nvJPEG, by address
ALLOC_CALLS = {"device": 0, "device_free": 0, "pinned": 0, "pinned_free": 0}


def _allocators(index: int):
    """nvJPEG's device and pinned allocations from PyTorch's caching allocators (stream-ordered,
    no cudaFree or cudaFreeHost, which would wait for the whole device)."""

    def dev_malloc(ctx, out, size, stream):
        try:
            out[0] = torch.cuda.caching_allocator_alloc(max(int(size), 1), index, stream or None)
        except Exception:  # (a Python error cannot cross into C)
            return 1
        ALLOC_CALLS["device"] += 1
        return 0

    def dev_free(ctx, ptr, size, stream):
        if ptr:
            torch.cuda.caching_allocator_delete(ptr)
        ALLOC_CALLS["device_free"] += 1
        return 0

    def pin_malloc(ctx, out, size, stream):
        try:
            t = torch.empty(max(int(size), 1), dtype=torch.uint8, pin_memory=True)
        except Exception:
            return 1
        _PINNED[t.data_ptr()] = t
        out[0] = t.data_ptr()
        ALLOC_CALLS["pinned"] += 1
        return 0

    def pin_free(ctx, ptr, size, stream):
        _PINNED.pop(ptr, None)
        ALLOC_CALLS["pinned_free"] += 1
        return 0

    funcs = (_MALLOC(dev_malloc), _FREE(dev_free), _MALLOC(pin_malloc), _FREE(pin_free))
    dev, pin = _AllocatorV2(funcs[0], funcs[1], None), _AllocatorV2(funcs[2], funcs[3], None)
    _KEEP_ALIVE.append((funcs, dev, pin))
    return dev, pin


_KEEP_ALIVE: list = []  # the callbacks handed to nvJPEG live as long as the process


def _state(lib: ctypes.CDLL, handle: ctypes.c_void_p, index: int) -> list:
    per = getattr(_LOCAL, "states", None)
    if per is None:
        per = _LOCAL.states = {}
    if index not in per:
        state, stream = ctypes.c_void_p(), ctypes.c_void_p()
        with torch.cuda.device(index):
            _check("nvjpegJpegStateCreate", lib.nvjpegJpegStateCreate(handle, ctypes.byref(state)))
            _check("nvjpegJpegStreamCreate",
                   lib.nvjpegJpegStreamCreate(handle, ctypes.byref(stream)))  # fmt: skip
        outs = (ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint(), ctypes.c_int())
        # (state, stream, batch size the state was initialised for, out-parameters of _parse)
        per[index] = [state, stream, 0, outs, tuple(ctypes.byref(o) for o in outs)]
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


def _parse(lib, handle, slot, ptr: int, length: int) -> tuple[int, int, bool]:
    """Header of one image: (H, W, whether the engines decode it)."""
    stream, (w, h, n, ok), (wr, hr, nr, okr) = slot[1], slot[3], slot[4]
    if lib.nvjpegJpegStreamParseHeader(handle, ptr, length, stream):
        return 0, 0, False  # not a JPEG nvJPEG reads (a PNG, a broken file): the fallback's
    ok.value = 1
    lib.nvjpegJpegStreamGetFrameDimensions(stream, wr, hr)
    lib.nvjpegJpegStreamGetComponentsNum(stream, nr)
    lib.nvjpegDecodeBatchedSupported(handle, stream, okr)
    return h.value, w.value, ok.value == 0 and n.value == 3 and h.value > 0 and w.value > 0


def decode_nvjpeg(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Encoded images (uint8 1-D CPU tensors) -> RGB uint8 (3, H, W) tensors on the CUDA
    ``device``, the engines' share in one call on the current stream. EXIF orientation is
    not applied (as torchvision and PIL leave it)."""
    from .gpu_augment import _decode_one

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"data.gpu_decoder=nvjpeg decodes on CUDA devices, not {device}")
    index = torch.cuda.current_device() if device.index is None else device.index
    device = torch.device("cuda", index)
    n = len(data)
    if not n:
        return []
    lib = _lib()
    handle = _handle(lib, index)
    slot = _state(lib, handle, index)
    state = slot[0]
    data = [d if d.is_contiguous() else d.contiguous() for d in data]
    ptr_list = [d.data_ptr() for d in data]
    len_list = [d.numel() for d in data]
    parsed = [_parse(lib, handle, slot, p, m) for p, m in zip(ptr_list, len_list)]
    ptrs = np.array(ptr_list, dtype=np.uint64)
    lengths = np.array(len_list, dtype=np.uint64)
    hw = np.array([(h, w) for h, w, _ in parsed], dtype=np.int64).reshape(n, 2)
    ok = np.array([k for _, _, k in parsed], dtype=bool)
    hw_idx = np.flatnonzero(ok)
    out: list[torch.Tensor | None] = [None] * n
    cuda_stream = torch.cuda.current_stream(device)
    if len(hw_idx):
        offsets, total = plane_layout(hw[hw_idx, 0], hw[hw_idx, 1])
        buf = torch.empty(total, dtype=torch.uint8, device=device)
        desc = image_descriptors(buf.data_ptr(), offsets, hw[hw_idx, 0], hw[hw_idx, 1])
        src = np.ascontiguousarray(ptrs[hw_idx])
        lens = np.ascontiguousarray(lengths[hw_idx])
        m = len(hw_idx)
        with torch.cuda.device(index):
            if slot[2] != m:
                _check("nvjpegDecodeBatchedInitialize",
                       lib.nvjpegDecodeBatchedInitialize(handle, state, m, 1, OUTPUT_RGB))  # fmt: skip
                slot[2] = m
            status = lib.nvjpegDecodeBatched(handle, state, src.ctypes.data, lens.ctypes.data,
                                             desc.ctypes.data, cuda_stream.cuda_stream)  # fmt: skip
        if status:
            slot[2] = 0  # re-initialise the state before its next batch
            warnings.warn(f"nvjpegDecodeBatched failed (NVJPEG_STATUS_"
                          f"{STATUS.get(status, status)}) on a batch of {m}; decoding it image by "
                          "image instead", RuntimeWarning, stacklevel=2)  # fmt: skip
            hw_idx = hw_idx[:0]
        else:
            done = torch.cuda.Event()
            done.record(cuda_stream)
            with _LOCK:  # the host bytes stay alive until the engines have read them
                _KEEP[:] = [(e, d) for e, d in _KEEP if not e.query()]
                _KEEP.append((done, data))
            for j, k in enumerate(hw_idx.tolist()):
                h, w = int(hw[k, 0]), int(hw[k, 1])
                out[k] = buf[int(offsets[j]) : int(offsets[j]) + 3 * h * w].view(3, h, w)
    for k in range(n):
        if out[k] is None:  # not for the engines: torchvision's decoders, then PIL's
            out[k] = _decode_one(data[k], device)
    return out  # type: ignore[return-value]
