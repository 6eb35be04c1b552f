"""``data.gpu_decoder=nvjpeg``: a batch of JPEGs decoded by nvJPEG's batched API without a host
synchronisation (``data/csrc/nvjpeg_batch.c``, built with the system C compiler on first use).

torchvision's ``decode_jpeg(device="cuda")`` drives the same nvJPEG call
(``nvjpegDecodeBatched``, the JPEG engines where the GPU has them), but waits on the host until
each batch is decoded and lets one caller in at a time. Here the work is queued on the caller's
stream and the call returns, with the GIL released (ctypes): a decoding thread can read and
queue batch k+1 while the GPU still decodes batch k. The outputs are views of one device buffer
a batch, planar RGB (3, H, W) uint8 as torchvision's. Images the batched call cannot take
(progressive or CMYK JPEGs, other formats) are decoded one by one by torchvision.

Building needs ``nvjpeg.h`` and ``cuda_runtime_api.h`` (with ``crt/``) and ``libnvjpeg.so``:
``pip install nvidia-nvjpeg nvidia-cuda-runtime nvidia-cuda-crt`` (CUDA 13 wheels; they are looked
up on ``sys.path``), a CUDA toolkit (``$CUDA_HOME``, ``/usr/local/cuda``), or
``$ATTNLAB_NVJPEG_HOME`` with ``include/`` and ``lib/``. The library is cached under
``$ATTNLAB_CACHE`` (default ``~/.cache/attnlab``)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "nvjpeg_batch.c"
INSTALL_HINT = (
    "data.gpu_decoder=nvjpeg builds a small C library against nvJPEG: it needs a C compiler "
    "(cc), nvjpeg.h and cuda_runtime_api.h and libnvjpeg.so.13: pip install nvidia-nvjpeg "
    "nvidia-cuda-runtime nvidia-cuda-crt, or a CUDA toolkit ($CUDA_HOME), or "
    "$ATTNLAB_NVJPEG_HOME with include/ and lib/"
)

_lib = None
_lib_error: str | None = None
_build_lock = threading.Lock()
_local = threading.local()  # one decoder per thread and device


def _roots() -> list[Path]:
    """Directories that may hold include/ and lib/ (or lib64/) of nvJPEG and the CUDA runtime."""
    roots = []
    if os.environ.get("ATTNLAB_NVJPEG_HOME"):
        roots.append(Path(os.environ["ATTNLAB_NVJPEG_HOME"]))
    for p in sys.path:
        for sub in ("nvidia/cu13", "nvidia/nvjpeg", "nvidia/cuda_runtime", "nvidia/cuda_nvcc"):
            roots.append(Path(p or ".") / sub)
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            roots.append(Path(os.environ[env]))
    roots.append(Path("/usr/local/cuda"))
    return [r for r in roots if r.is_dir()]


def _find(roots: list[Path], rel: str) -> Path | None:
    for root in roots:
        for sub in ("include", "lib", "lib64", "targets/x86_64-linux/include",
                    "targets/x86_64-linux/lib"):  # fmt: skip
            if (root / sub / rel).exists():
                return root / sub
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("ATTNLAB_CACHE", Path.home() / ".cache" / "attnlab"))


def _build() -> ctypes.CDLL:
    """Compile (once per source and toolchain) and load the library."""
    roots = _roots()
    inc = {h: _find(roots, h) for h in ("nvjpeg.h", "cuda_runtime_api.h", "crt/host_defines.h")}
    lib = _find(roots, "libnvjpeg.so.13") or _find(roots, "libnvjpeg.so")
    cudart = _find(roots, "libcudart.so.13") or _find(roots, "libcudart.so")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    missing = [k for k, v in inc.items() if v is None]
    missing += ["libnvjpeg.so"] * (lib is None) + ["libcudart.so"] * (cudart is None)
    missing += ["a C compiler (cc)"] * (cc is None)
    if missing:
        raise ImportError(f"{INSTALL_HINT} (not found: {', '.join(missing)})")
    nvjpeg_so = "libnvjpeg.so.13" if (lib / "libnvjpeg.so.13").exists() else "libnvjpeg.so"
    cudart_so = "libcudart.so.13" if (cudart / "libcudart.so.13").exists() else "libcudart.so"
    incs = sorted({str(p) for p in inc.values()})
    cmd = [cc, "-O2", "-shared", "-fPIC", str(SOURCE), *(f"-I{p}" for p in incs),
           f"-L{lib}", f"-L{cudart}", f"-l:{nvjpeg_so}", f"-l:{cudart_so}",
           f"-Wl,-rpath,{lib}", f"-Wl,-rpath,{cudart}"]  # fmt: skip
    key = hashlib.sha256((SOURCE.read_text() + "\0".join(cmd)).encode()).hexdigest()[:16]
    out = _cache_dir() / f"nvjpeg_batch-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ImportError(f"building {SOURCE.name} failed:\n{proc.stderr.strip()}")
        os.replace(tmp, out)
    so = ctypes.CDLL(str(out))
    p, i, vp = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER
    so.nvjb_create.argtypes = [vp(p), vp(i)]
    so.nvjb_info.argtypes = [p, i, p, p, p]
    so.nvjb_decode.argtypes = [p, i, p, p, p, p, p, p]
    so.nvjb_destroy.argtypes = [p]
    for f in (so.nvjb_create, so.nvjb_info, so.nvjb_decode):
        f.restype = i
    so.nvjb_destroy.restype = None
    return so


def load() -> ctypes.CDLL:
    """The built library; ImportError (with what is missing) where it cannot be built."""
    global _lib, _lib_error
    with _build_lock:
        if _lib is None and _lib_error is None:
            try:
                _lib = _build()
            except ImportError as e:
                _lib_error = str(e)
        if _lib is None:
            raise ImportError(_lib_error)
        return _lib


def available() -> bool:
    try:
        load()
        return True
    except ImportError:
        return False


class _Decoder:
    """One nvJPEG handle with two jpeg states used in turn (see the C source): not shared
    between threads. Keeps each call's inputs and outputs until its slot is used again, when
    the C side has waited for that decode to finish."""

    SLOTS = 2

    def __init__(self, device: torch.device) -> None:
        self.lib, self.device = load(), device
        self.handle = ctypes.c_void_p()
        hw = ctypes.c_int()
        with torch.cuda.device(device):
            code = self.lib.nvjb_create(ctypes.byref(self.handle), ctypes.byref(hw))
        if code:
            raise RuntimeError(f"nvjpeg_batch: creating the decoder failed (code {code})")
        self.hardware = bool(hw.value)
        self._keep: list = [None] * self.SLOTS
        self._slot = 0

    def __del__(self) -> None:
        if getattr(self, "handle", None) and self.handle.value:
            try:
                self.lib.nvjb_destroy(self.handle)
            except Exception:  # noqa: BLE001 (interpreter shutdown)
                pass

    def info(self, ptrs, lens, n: int) -> list[tuple[int, int, int, bool]]:
        out = (ctypes.c_int * (4 * n))()
        self.lib.nvjb_info(self.handle, n, ptrs, lens, out)
        return [(out[4 * i], out[4 * i + 1], out[4 * i + 2], bool(out[4 * i + 3]))
                for i in range(n)]  # fmt: skip

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Planar RGB (3, H, W) uint8 on ``self.device`` for each image, None for those the
        batched call cannot take; queued on the current stream."""
        n = len(data)
        data = [d if d.is_contiguous() else d.contiguous() for d in data]
        ptrs = (ctypes.c_void_p * n)(*[d.data_ptr() for d in data])
        lens = (ctypes.c_size_t * n)(*[d.numel() for d in data])
        infos = self.info(ptrs, lens, n)
        take = [i for i, (_, h, w, ok) in enumerate(infos) if ok and h > 0 and w > 0]
        out: list[torch.Tensor | None] = [None] * n
        if not take:
            return out
        sizes = [3 * infos[i][1] * infos[i][2] for i in take]
        buf = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        k = len(take)
        base = buf.data_ptr()
        args = (
            (ctypes.c_void_p * k)(*[ptrs[i] for i in take]),
            (ctypes.c_size_t * k)(*[lens[i] for i in take]),
            (ctypes.c_void_p * k)(*[base + o for o in offsets]),
            (ctypes.c_int * k)(*[infos[i][1] for i in take]),
            (ctypes.c_int * k)(*[infos[i][2] for i in take]),
        )
        stream = torch.cuda.current_stream(self.device)
        code = self.lib.nvjb_decode(self.handle, k, *args, ctypes.c_void_p(stream.cuda_stream))
        self._keep[self._slot] = (data, buf, args)  # until this slot's decode has run
        self._slot = (self._slot + 1) % self.SLOTS
        if code:
            raise RuntimeError(f"nvjpeg_batch: nvjpegDecodeBatched failed (code {code})")
        for j, i in enumerate(take):
            h, w = infos[i][1], infos[i][2]
            out[i] = buf[offsets[j] : offsets[j] + sizes[j]].view(3, h, w)
        return out


def decode_nvjpeg(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Encoded images (uint8 1-D CPU tensors) -> RGB uint8 (3, H, W) tensors on ``device``:
    the batched nvJPEG call on CUDA (queued on the current stream), torchvision's decoders for
    the images it cannot take and on other devices."""
    from .gpu_augment import _decode_all, _decode_one

    device = torch.device(device)
    if device.type != "cuda":
        return _decode_all(data, device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    decoders = getattr(_local, "decoders", None)
    if decoders is None:
        decoders = _local.decoders = {}
    if device not in decoders:
        decoders[device] = _Decoder(device)
    out = decoders[device].decode(list(data))
    return [img if img is not None else _decode_one(d, device) for img, d in zip(out, data)]
