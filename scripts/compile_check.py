"""Compile our attention kernels for a GPU target on a machine without a GPU.

    python scripts/compile_check.py [--arch 90] [--cases flash,na1d,na2d,na3d,na2d_large,hyper,
        simplicial,cga] [--only SUBSTRING] [--sass]

Triton's code generator and ``ptxas`` run on the CPU, so a kernel can be compiled for an H100
(sm_90) here (flash, neighborhood 1-D/2-D/3-D, HyperAttention's gathered kernels and merges,
2-simplicial, EfficientViT's fused CGA and stem conv), with the launch arguments the launchers pass on the GPU (the launchers run on CPU
tensors with ``ops.launch.launch`` recording instead of launching). This finds what the
interpreter cannot: a Triton version that fails to compile a kernel, register spills, shared
memory. ``--sass`` also prints the SASS instruction mix of each kernel's main loop (the longest
loop with a matrix instruction): how integer work per tile was counted without device time
(docs/benchmarks.md). Runs without ``TRITON_INTERPRET``; exit status 1 if a kernel fails.

One line per kernel and case: name, registers, spill stack bytes, shared memory, and with
``--sass`` the loop's instruction count and mix. Another Triton than the installed one: install
it elsewhere (``pip install --target DIR triton==3.6.0``) and put DIR first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the kernels must be JIT functions)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from data import augment_kernels, resize_kernel  # noqa: E402
from ops import (  # noqa: E402
    cascaded,
    conv_stem,
    cross_entropy,
    flash,
    hyper_kernels,
    neighborhood,
    neighborhood_nd,
    rotary,
    simplicial,
)
from ops.neighborhood_ref import check_window  # noqa: E402
from trainer import agc_kernel  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = ()

_DTYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.float64: "fp64",
}


def _qkv(shape, h, d, dtype=torch.bfloat16):
    return [torch.zeros(1, *shape, h, d, dtype=dtype) for _ in range(3)]


def _na(shape, ks, d, causal=False, tma=None):
    """Forward and backward launches of ``neighborhood`` for one layout."""
    q, k, v = _qkv(shape, 2, d)
    ks3, ds, ss, cs = check_window(shape, ks, 1, 1, causal)
    nd = len(shape) > 1
    win = (ks3, ds, ss, cs) if nd else (ks3[0], ds[0], ss[0], cs[0])
    opts = dict(block_m=None, block_n=None, num_warps=None, num_stages=None, flat_tiles=None,
                tma=tma)  # fmt: skip
    fwd, bwd = (
        (neighborhood_nd._forward_nd, neighborhood_nd._backward_nd)
        if nd
        else (neighborhood._forward, neighborhood._backward)
    )
    o, lse = fwd(q, k, v, win, d**-0.5, opts)
    bwd(torch.zeros_like(o), None, q, k, v, o, lse, win, d**-0.5, opts)


def _flash(n, d, causal, tma=None):
    q, k, v = _qkv((n,), 4, d)
    opts = dict(block_m=None, block_n=None, num_warps=None, num_stages=None, tma=tma)
    o, lse = flash._forward(q, k, v, causal, d**-0.5, opts)
    flash._backward(torch.zeros_like(o), None, q, k, v, o, lse, causal, d**-0.5, opts)


def _hyper(n=16384, d=128, block=256, samples=256):
    """HyperAttention's gathered kernels and merge, at a causal level's shapes (B*H = 2)."""
    q, k, v = (torch.zeros(2, n, d, dtype=torch.bfloat16) for _ in range(3))
    tiles = n // block
    q_index = torch.zeros(2, tiles * block, dtype=torch.long)
    k_index = torch.zeros(2, tiles, block + samples, dtype=torch.long)
    o, lse = hyper_kernels._forward(q, k, v, q_index, k_index, block, 3.0, d**-0.5)
    hyper_kernels._backward(torch.zeros_like(o), None, q, k, v, o, lse, q_index, k_index, block,
                            3.0, d**-0.5)  # fmt: skip
    o12 = torch.zeros(2, n, d, dtype=torch.bfloat16, requires_grad=True)
    l12 = torch.zeros(2, n, requires_grad=True)
    o3 = torch.zeros(2, n // 2, d, dtype=torch.bfloat16, requires_grad=True)
    l3 = torch.zeros(2, n // 2, requires_grad=True)
    out, lse = hyper_kernels.merge_halves(o12, l12, o3, l3)
    torch.autograd.grad(
        (out, lse), (o12, l12, o3, l3), (torch.zeros_like(out), torch.zeros_like(lse))
    )
    # the fused causal recursion's variants: the forward merging into earlier rows in place,
    # the backward adding into the recursion's buffers from row views of the top level's
    # dO / LSE / Delta (merge_halves above already runs the in-place merge kernel)
    big = torch.zeros(2, 2 * n, d, dtype=torch.bfloat16)
    big_l = torch.zeros(2, 2 * n)
    hyper_kernels._forward(q, k, v, q_index, k_index, block, 3.0, d**-0.5,
                           into=(big[:, n:], big_l[:, n:]))  # fmt: skip
    bufs = tuple(torch.zeros(2, 2 * n, d, dtype=torch.bfloat16)[:, n:] for _ in range(3))
    hyper_kernels._backward(big[:, n:], None, q, k, v, None, big_l[:, n:], q_index, k_index,
                            block, 3.0, d**-0.5, out=bufs, delta=big_l[:, n:])  # fmt: skip


_OPTS: dict = {}  # --opts: tile options for the simplicial launchers (simplicial._OPTIONS)


def _simplicial(n, h, hkv, d, w1, w2):
    """2-simplicial forward and backward (scripts/bench_simplicial.py's cases, batch 1)."""
    q = torch.zeros(1, n, h, d, dtype=torch.bfloat16)
    k1, k2, v1, v2 = (torch.zeros(1, n, hkv, d, dtype=torch.bfloat16) for _ in range(4))
    o, lse = simplicial._forward(q, k1, k2, v1, v2, True, w1, w2, d**-0.5, _OPTS)
    simplicial._backward(torch.zeros_like(o), None, q, k1, k2, v1, v2, o, lse, True, w1, w2,
                         d**-0.5, _OPTS)  # fmt: skip


def _simplicial_plain(*case):
    """The window GQA backward again with the separate dQ and dK1/dV1 kernels
    (simplicial.DQ_DK1=False; the 16-bit default splits them into dQ with dK1 and dV1 alone),
    dK1/dV1 once reading q and dO again after its k2 loop (DK1_RELOAD, the 16-bit default) and
    once holding them through it."""
    simplicial.DQ_DK1 = False
    try:
        _simplicial(*case)
        simplicial.DK1_RELOAD = False
        _simplicial(*case)
    finally:
        simplicial.DK1_RELOAD = None
        simplicial.DQ_DK1 = None


def _cga(heads, cs, window, kernels, side):
    """EfficientViT's fused CGA layer (ops/cascaded.py) in fp16, one image of a side x side map."""
    kd = 16
    packed = cascaded.pack_weights(
        [torch.zeros(2 * kd + cs, cs, 1, 1)] * heads, [torch.zeros(2 * kd + cs)] * heads,
        [torch.zeros(kd, 1, k, k) for k in kernels[:heads]], [torch.zeros(kd)] * heads,
        torch.zeros(heads, window**2, window**2), kd, window, torch.float16, "cpu",
    )  # fmt: skip
    x = torch.zeros(1, heads * cs, side, side, dtype=torch.float16)
    cascaded.cascaded_group_attention(x.to(memory_format=torch.channels_last), packed, kd**-0.5)
    if heads == 4 and cs == 16:  # and the stem's first conv (ops/conv_stem.py), fp32 NCHW in
        conv_stem.conv3x3_s2(torch.zeros(2, 3, 224, 224), torch.zeros(8, 3, 3, 3),
                             torch.zeros(8), True, torch.float16)  # fmt: skip


def _augment():
    """data.decode=gpu's kernels (the batch crop-resize, RandAugment's three op families) and
    the trainer's one-launch AGC."""
    images = [torch.zeros(3, 375, 500, dtype=torch.uint8) for _ in range(2)]
    resize_kernel.resize_batch(images, [(0, 0, 300, 400), (10, 20, 100, 90)], [(224, 224)] * 2,
                               [(0, 0)] * 2, [False, True], 224)  # fmt: skip
    x, rows = torch.zeros(4, 3, 224, 224), torch.tensor([0, 3])
    augment_kernels.affine_rows(x, rows, torch.zeros(2, 6), torch.zeros(3))
    augment_kernels.blend_rows(
        x, rows, torch.tensor([1, 3]), torch.zeros(2, 1, dtype=torch.float64)
    )
    augment_kernels.lut_rows(
        x, rows, torch.tensor([0, 4]), torch.zeros(2, 256, dtype=torch.float64)
    )
    ps = [torch.nn.Parameter(torch.zeros(8, 3, 3, 3)), torch.nn.Parameter(torch.zeros(8))]
    for p in ps:
        p.grad = torch.zeros_like(p)
    agc_kernel.adaptive_clip_fused_(ps, 0.02)  # the trainer's AGC (optim.fused_agc)


def _rotary(b=32, t=1024, h=12, d=64, block_t=32, num_warps=4):
    """GPT-2's fused-qkv RoPE and CARoPE, forward and backward (scripts/bench_rotary.py)."""
    qkv = torch.zeros(b, t, 3 * h * d, dtype=torch.bfloat16)
    q, k, v = rotary.split_qkv(qkv, h, h)
    cos = sin = torch.zeros(t, d // 2)
    rotary._rope(q, k, cos, sin, False, block_t, num_warps)
    log_f = torch.zeros(b, t, h)
    _, _, carry = rotary._carope_fwd(q, k, log_f, block_t, num_warps)
    dqkv = torch.empty_like(qkv)
    rotary._carope_bwd(rotary._carope_qkv_bwd_kernel, (q, k, v), q, k, log_f, carry, (dqkv,),
                       dqkv.stride()[:2], block_t, num_warps)  # fmt: skip


# name -> launches of the benchmark cases (scripts/bench_attention.py) at one head / batch
CASES = {
    "flash": lambda: (_flash(4096, 64, True, tma=True), _flash(4096, 128, True, tma=False)),
    "na1d": lambda: _na((32768,), [2049], 128, tma=True),
    "na2d": lambda: _na((128, 128), [13, 13], 64),
    "na3d": lambda: _na((32, 32, 32), [7, 7, 7], 64, tma=False),
    "na2d_large": lambda: _na((256, 256), [80, 80], 128, tma=True),
    "hyper": _hyper,
    "simplicial": lambda: (
        _simplicial(4096, 64, 1, 128, 32, 512),
        _simplicial(1024, 12, 12, 64, 64, 64),
        _simplicial_plain(4096, 64, 1, 128, 32, 512),
    ),
    "augment": _augment,
    "rotary": _rotary,
    # M0's three stages at 224 (maps 14, 7, 4) and M5's widest (7/5/3/3 kernels, Cs 96)
    "cga": lambda: (
        _cga(4, 16, 7, (5, 5, 5, 5), 14),
        _cga(4, 48, 4, (5, 5, 5, 5), 4),
        _cga(4, 96, 7, (7, 5, 3, 3), 7),
    ),
}
_LAUNCHING = (
    agc_kernel,
    resize_kernel,
    augment_kernels,
    flash,
    rotary,
    cross_entropy,
    hyper_kernels,
    simplicial,
    cascaded,
    conv_stem,
)  # modules calling launch


def _signature(kernel, args, kwargs, float_type="fp32"):
    """ASTSource arguments for one recorded launch, specialized as Triton's launcher does
    (``float_type``: what Python floats become; Triton's launcher makes them fp32, Inductor
    fp64 when torch.compile captures the launch)."""
    values = dict(zip(kernel.arg_names, args))
    values.update(kwargs)
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        val = values.get(p.name, getattr(p, "default", None))
        if p.is_constexpr or val is None or (type(val) is int and val == 1):
            sig[p.name], const[p.name] = "constexpr", val
        elif isinstance(val, torch.Tensor):
            sig[p.name] = "*" + _DTYPES[val.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif TensorDescriptor and isinstance(val, TensorDescriptor):
            sig[p.name] = f"tensordesc<{_DTYPES[val.base.dtype]}{list(val.block_shape)}>"
        elif type(val) is bool:
            sig[p.name] = "i1"
        elif type(val) is int:
            sig[p.name] = "i32" if -(2**31) <= val < 2**31 else "i64"
            if val % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif type(val) is float:
            sig[p.name] = float_type
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {p.name} of type {type(val)}")
    return sig, const, attrs


def _loop_mix(sass: str):
    """Instruction count and mix of the longest loop holding a matrix instruction."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^(\w+):$", l))}
    best = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA (\w+);", line)
        if m and labels.get(m.group(1), i) < i:
            body = [re.sub(r"^[^\t]*\t(@!?U?P\w+\s+)?", "", x).split(" ")[0].rstrip(";")
                    for x in lines[labels[m.group(1)] + 1 : i + 1] if "\t" in x]  # fmt: skip
            if any(op.startswith(("HGMMA", "HMMA")) for op in body):
                if best is None or len(body) > len(best):
                    best = body
    if best is None:
        return "no loop with a matrix instruction"
    mix = collections.Counter(op.split(".")[0] for op in best)
    return f"loop {len(best)} instr: " + ", ".join(f"{k} {v}" for k, v in mix.most_common(12))


class _Quiet:
    """Send the C++ side's stderr (MLIR reproducers, nvdisasm notes) to a file; keep its tail."""

    def __enter__(self):
        import tempfile

        self.file = tempfile.TemporaryFile(mode="w+")
        sys.stderr.flush()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read()
        self.file.close()

    def reason(self) -> str:
        notes = [line for line in self.text.splitlines() if "note:" in line or "error:" in line]
        return notes[-1].split("note:")[-1].strip() if notes else ""


def _resources(cubin: bytes) -> tuple[str, str]:
    """(registers, spill stack bytes) from cuobjdump, or '?' where it is missing."""
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    path = Path("/tmp") / f"compile_check_{os.getpid()}.cubin"
    path.write_bytes(cubin)
    try:
        out = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True,
                             text=True).stdout  # fmt: skip
    except OSError:
        out = ""
    finally:
        path.unlink(missing_ok=True)
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (regs.group(1) if regs else "?", stack.group(1) if stack else "?")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ",".join(CASES))
    ap.add_argument("--only", default="", help="kernels whose name contains this")
    ap.add_argument("--sass", action="store_true", help="print the main loop's SASS mix")
    ap.add_argument(
        "--opts",
        default="",
        help="simplicial tile options, e.g. "
        "block_m=32,block_n2=32,num_warps=4,num_stages=2,fwd_kernel=tiled (to find "
        "spill-free tiles)",
    )
    ap.add_argument(
        "--float",
        default="fp32",
        choices=("fp32", "fp64"),
        help="type of Python float arguments: fp32 as Triton's launcher passes them, fp64 as "
        "Inductor does when torch.compile captures the launch",
    )
    args = ap.parse_args()
    _OPTS.update({k: int(v) if v.isdigit() else v
                  for k, v in (kv.split("=") for kv in args.opts.split(",") if kv)})  # fmt: skip
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    failures = 0
    for case in args.cases.split(","):
        launches = []

        def record(kernel, grid, *a, _into=launches, **kw):
            _into.append((kernel, a, kw))

        saved = [m.launch for m in _LAUNCHING]
        for m in _LAUNCHING:
            m.launch = record
        try:
            CASES[case]()
        finally:
            for m, fn in zip(_LAUNCHING, saved):
                m.launch = fn
        seen = set()
        for kernel, a, kw in launches:
            name = kernel.fn.__name__
            if args.only not in name:
                continue
            sig, const, attrs = _signature(kernel, a, kw, args.float)
            key = (name, repr(sorted(sig.items())), repr(sorted(const.items())), repr(attrs))
            if key in seen:
                continue
            seen.add(key)
            options = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
            quiet = _Quiet()
            try:
                with quiet:
                    compiled = triton.compile(ASTSource(kernel, sig, const, attrs), target=target,
                                              options=options)  # fmt: skip
                    sass = compiled.asm["sass"] if args.sass else ""
            except Exception as e:  # report every kernel, then fail
                failures += 1
                msg = str(e).strip().splitlines()
                print(f"{case:11s} {name:22s} FAILED: {type(e).__name__}: {msg[-1] if msg else ''}"
                      f" ({quiet.reason()[:160]})")  # fmt: skip
                continue
            regs, stack = _resources(compiled.asm["cubin"])
            line = (f"{case:11s} {name:22s} regs {regs:>3s} spill {stack:>3s} B "
                    f"shared {compiled.metadata.shared:>6d} B")  # fmt: skip
            if args.sass:
                line += "  " + _loop_mix(sass)
            print(line, flush=True)
    print(f"{failures} kernel(s) failed to compile" if failures else "all kernels compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
