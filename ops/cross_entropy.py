"""Fused, chunked linear + cross-entropy for LM heads (Triton), gradient computed in forward.

    linear_cross_entropy(h, weight, targets, *, ignore_index=-100, chunk_rows=None) -> loss
    linear_cross_entropy_torch(h, weight, targets, *, ignore_index=-100)            -> loss

Both return the fp32 mean over non-ignored rows of cross_entropy(h @ weight.T, targets), i.e.
``F.cross_entropy((h @ weight.T).float(), targets, ignore_index=ignore_index)``; h is (..., C),
weight (V, C), targets integer with h.shape[:-1] elements. The second one is that expression
itself: the reference, and the fallback where the kernel cannot run (``fused_available``).

Why: for GPT-2 124M at 32 x 1024 tokens the (N, V) = (32768, 50304) bf16 logits are 3.3 GB
(plus a 6.6 GB fp32 copy for the loss), written or read about six times per step. Here only one
chunk of rows exists at a time (``chunk_rows``; by default the largest power of two whose logits
fit in 1 GiB: 8192 rows in bf16 at V=50304), and for each chunk:

1. logits_c = h_c @ W^T in the compute dtype (the autocast dtype when autocast is on for h's
   device, else h's dtype);
2. one kernel launch, one program per row: a first pass over the row keeps an online max and
   sum of exponentials (fp32) and picks out logit[target]; it stores the row loss
   lse - logit[target]; a second pass (the row is still in L2) overwrites the logits in place with
   the gradient (softmax - onehot(target)) / n_valid. Ignored rows get zero loss and zero grad;
   n_valid is read from device memory (no host sync);
3. grad_h_c = G_c @ W and grad_W += G_c^T @ h_c, grad_W accumulated in fp32 (cuBLAS writes fp32
   directly from bf16/fp16 operands on CUDA via ``out_dtype``).

The backward only scales the saved (grad_h, grad_W) by the incoming scalar gradient, on device.
Without grad mode, or when neither h nor weight requires grad, step 3 and the gradient pass are
skipped (evaluation). The work is one ``torch.library.custom_op`` (``attnlab::linear_cross_
entropy``, returning loss, grad_h, grad_W) with ``register_autograd``, so ``torch.compile``
traces it as one opaque node: Inductor neither fuses into it nor materialises the logits.

Edge cases, as PyTorch: all rows ignored (or no rows) gives loss nan (0 / 0) and zero gradients.
A target outside [0, V) that is not ignore_index gives a nan loss (PyTorch raises, which would
need a host sync here); the trainer's non-finite check then stops the run.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # pyproject installs triton on Linux only; keep `import ops` working

    class tl:  # stand-in so that the kernel definition below still parses
        constexpr = staticmethod(lambda x=None: x)

    triton = None

# Triton decides interpreter vs compiler when a kernel is defined, i.e. at this import.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_jit = triton.jit if triton is not None else (lambda fn: fn)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CHUNK_BYTES = 1 << 30  # logits of one chunk: at most 1 GiB (8192 rows of GPT-2 bf16 logits)
# Vocabulary tile and warps of the row kernel, and the gradient pass's tile order: the fastest of
# the settings timed on an H100 (scripts/bench_cross_entropy.py, docs/benchmarks.md).
_BLOCK_V = 4096
_NUM_WARPS = 8
_REVERSE = True
# cuBLAS bf16/fp16 GEMMs with an fp32 output (torch >= 2.8, CUDA only).
_HAS_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype")


# ----------------------------------------------------------------------------- kernel


@_jit
def _ce_rows_kernel(LOGITS, TARGETS, LOSS, INV_N, stride_row, n_cols, ignore_index,
                    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
                    ONE_PASS: tl.constexpr, REVERSE: tl.constexpr):  # fmt: skip
    """One row: LOSS[row] = lse - logit[target] (0 if ignored); with WRITE_GRAD the row of
    LOGITS becomes (softmax - onehot(target)) * INV_N (all zeros if ignored).

    ONE_PASS (BLOCK_V >= n_cols) keeps the whole row in registers: one read and one write of the logits
    instead of two reads and a write. Otherwise the gradient pass re-reads the row, and REVERSE
    walks its tiles last to first: the tiles read last are the likeliest still in L2 (the rows in
    flight over the whole GPU hold about as many bytes as the H100's L2)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    target = tl.load(TARGETS + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    if ONE_PASS:
        mask = offs < n_cols
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        e = tl.exp(x - m)
        s = tl.sum(e, 0)
        lse = m + tl.log(s)
        x_t = tl.sum(tl.where(offs == target, x, 0.0), 0)
        loss = tl.where(in_range, lse - x_t, float("nan"))
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
        if WRITE_GRAD:
            scale = tl.where(valid, tl.load(INV_N), 0.0)
            g = e * (scale / s)
            g = tl.where(offs == target, g - scale, g)
            tl.store(base + offs, g.to(LOGITS.dtype.element_ty), mask=mask)
    else:
        m = float("-inf")  # running max
        s = 0.0  # running sum of exp(x - m)
        x_t = tl.zeros([BLOCK_V], dtype=tl.float32)  # logit[target], picked out lane-wise
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
            x_t += tl.where(cols == target, x, 0.0)
        lse = m + tl.log(s)
        loss = tl.where(in_range, lse - tl.sum(x_t, 0), float("nan"))
        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
        if WRITE_GRAD:
            scale = tl.where(valid, tl.load(INV_N), 0.0)
            n_tiles = tl.cdiv(n_cols, BLOCK_V)
            for i in range(0, n_tiles):  # same layout as above: each thread rewrites only
                if REVERSE:  # the elements it read itself
                    cols = (n_tiles - 1 - i) * BLOCK_V + offs
                else:
                    cols = i * BLOCK_V + offs
                mask = cols < n_cols
                x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * scale
                g = tl.where(cols == target, g - scale, g)
                tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def _ce_rows(logits, targets, loss_rows, inv_n, ignore_index: int, write_grad: bool,
             block_v: int | None = None, num_warps: int | None = None,
             reverse: bool | None = None) -> None:  # fmt: skip
    """Launch the kernel on a (rows, V) chunk with unit column stride (in place if write_grad).
    Unset launch settings take the module's; a row narrower than the tile gets fewer warps
    (one per 512 columns, at least 4)."""
    n, v = logits.shape
    if n == 0:
        return
    if block_v is None:
        block_v = min(_BLOCK_V, triton.next_power_of_2(v))
    if num_warps is None:
        num_warps = _NUM_WARPS if block_v >= _BLOCK_V else max(4, min(_NUM_WARPS, block_v // 512))
    launch(_ce_rows_kernel, (n,), logits, targets, loss_rows, inv_n, logits.stride(0), v,
           ignore_index, WRITE_GRAD=write_grad, BLOCK_V=block_v, ONE_PASS=block_v >= v,
           REVERSE=_REVERSE if reverse is None else reverse, num_warps=num_warps)  # fmt: skip


# ----------------------------------------------------------------------------- chunk loop


def _mm(a, b, out_dtype: torch.dtype, out: torch.Tensor):
    """out = a @ b (out has out_dtype); fp32 straight out of cuBLAS for half operands on CUDA."""
    if a.dtype != out_dtype and out_dtype == torch.float32 and a.is_cuda and _HAS_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    if a.dtype == out_dtype:
        return torch.mm(a, b, out=out)
    return out.copy_(torch.mm(a, b))


def _accumulate(acc, a, b):
    """acc (fp32) += a @ b in place, without rounding a @ b to half precision on CUDA.

    In place matters: the out-of-place addmm copies the whole (V, C) fp32 accumulator (150 MB
    for GPT-2) once per chunk before adding, 0.8 ms of a 70 ms H100 step over 8 chunks."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda and _HAS_OUT_DTYPE:
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.add_(torch.mm(a, b))


def _forward(h, weight, targets, ignore_index, chunk_rows, compute_dtype, need_h, need_w,
             block_v=None, num_warps=None):  # fmt: skip
    """h (N, C), weight (V, C), targets (N,) -> loss (), grad_h (N, C) or (0,), grad_w (V, C)
    or (0,): the gradients of the mean loss, computed chunk by chunk."""
    n, c = h.shape
    v = weight.shape[0]
    dev = h.device
    write_grad = need_h or need_w
    with torch.autocast(dev.type, enabled=False):
        w = weight.to(compute_dtype)  # (V, C)
        targets = targets.contiguous()
        n_valid = (targets != ignore_index).sum()
        inv_n = 1.0 / n_valid.clamp_min(1).to(torch.float32)  # () on device
        loss_rows = torch.empty(n, dtype=torch.float32, device=dev)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=dev) if need_h else h.new_empty(0)
        grad_w = torch.zeros((v, c), dtype=torch.float32, device=dev) if need_w else None
        rows = max(1, min(chunk_rows, n))
        buf = torch.empty((rows, v), dtype=compute_dtype, device=dev)  # reused by every chunk
        for start in range(0, n, rows):
            end = min(start + rows, n)
            h_c = h[start:end].to(compute_dtype)  # (R, C)
            logits = torch.mm(h_c, w.t(), out=buf[: end - start])  # (R, V), becomes G_c
            _ce_rows(logits, targets[start:end], loss_rows[start:end], inv_n, ignore_index,
                     write_grad, block_v, num_warps)  # fmt: skip
            if need_h:
                _mm(logits, w, h.dtype, out=grad_h[start:end])  # (R, C), rows: contiguous
            if need_w:
                grad_w = _accumulate(grad_w, logits.t(), h_c)  # (V, C)
        loss = loss_rows.sum() / n_valid  # 0 / 0 = nan when every row is ignored, as PyTorch
        grad_w = weight.new_empty(0) if grad_w is None else grad_w.to(weight.dtype)
    return loss, grad_h, grad_w


@torch.library.custom_op("attnlab::linear_cross_entropy", mutates_args=())
def _lce_op(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    compute_dtype: torch.dtype,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(h, weight, targets, ignore_index, chunk_rows, compute_dtype, need_h, need_w)


@_lce_op.register_fake
def _(h, weight, targets, ignore_index, chunk_rows, compute_dtype, need_h, need_w):
    loss = h.new_empty((), dtype=torch.float32)
    grad_h = h.new_empty(h.shape) if need_h else h.new_empty(0)
    grad_w = weight.new_empty(weight.shape) if need_w else weight.new_empty(0)
    return loss, grad_h, grad_w


def _setup_context(ctx, inputs, output):
    _, grad_h, grad_w = output
    ctx.save_for_backward(grad_h, grad_w)
    ctx.mark_non_differentiable(grad_h, grad_w)
    ctx.set_materialize_grads(False)  # no zeros for the unused grad outputs


def _backward(ctx, g_loss, _g_grad_h, _g_grad_w):
    grad_h, grad_w = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[:2]
    gh = grad_h * g_loss if need_h and g_loss is not None else None  # dtype of grad_h: g is 0-d
    gw = grad_w * g_loss if need_w and g_loss is not None else None
    return gh, gw, None, None, None, None, None, None


_lce_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def fused_available(device: torch.device | str) -> bool:
    """Whether the kernel can run on tensors of ``device`` (CUDA, or CPU under the interpreter)."""
    dev = torch.device(device)
    return triton is not None and (dev.type == "cuda" or (dev.type == "cpu" and _INTERPRET))


def default_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Largest power of two of rows whose (rows, vocab) logits fit in 1 GiB (>= 16).

    8192 rows of GPT-2 logits: 2.6% faster than 4096 on an H100 (fewer passes over the fp32
    weight-gradient accumulator; scripts/bench_cross_entropy.py), 0.9 GiB instead of 3 GiB
    for the PyTorch path at batch 32 x 1024."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = max(1, _CHUNK_BYTES // max(1, vocab * itemsize))
    return max(16, 1 << (rows.bit_length() - 1))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _check(h, weight, targets, chunk_rows) -> None:
    """ValueError naming the argument, its sizes and what would be right."""
    name = "linear_cross_entropy"
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be (V, C); got weight{tuple(weight.shape)}")
    if h.dim() < 1 or h.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: h{tuple(h.shape)} must end in C={weight.shape[1]} features to match "
            f"weight{tuple(weight.shape)} (V, C)"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"{name}: targets must be integer class ids; got dtype {targets.dtype}")
    rows = h.numel() // h.shape[-1] if h.shape[-1] else h.shape[:-1].numel()
    if targets.numel() != rows:
        raise ValueError(
            f"{name}: targets has {targets.numel()} elements (shape {tuple(targets.shape)}) but "
            f"h{tuple(h.shape)} has {rows} rows; need one target per row"
        )
    if h.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(
            f"{name}: h and weight dtypes must be in {_DTYPES}; got h {h.dtype}, "
            f"weight {weight.dtype} (use linear_cross_entropy_torch for others)"
        )
    if not (h.device == weight.device == targets.device):
        raise ValueError(
            f"{name}: h on {h.device}, weight on {weight.device}, targets on {targets.device}; "
            "put them on one device"
        )
    if not fused_available(h.device):
        raise ValueError(
            f"{name} needs triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU); got h on "
            f"{h.device}{'' if triton is not None else ' and no triton'}. Use "
            "linear_cross_entropy_torch (or model.loss=auto/torch) instead"
        )
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"{name}: chunk_rows must be a positive int or None; got {chunk_rows!r}")


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of (h @ weight.T) against targets, fp32 scalar, never materialising
    more than ``chunk_rows`` rows of logits; see the module docstring. Differentiable in h and
    weight (gradients computed in the forward, scaled in the backward)."""
    _check(h, weight, targets, chunk_rows)
    dtype = _compute_dtype(h)
    rows = chunk_rows or default_chunk_rows(weight.shape[0], dtype)
    grad = torch.is_grad_enabled()
    loss, _, _ = _lce_op(
        h.reshape(-1, h.shape[-1]),
        weight,
        targets.reshape(-1),
        int(ignore_index),
        rows,
        dtype,
        grad and h.requires_grad,
        grad and weight.requires_grad,
    )
    return loss


def linear_cross_entropy_torch(h, weight, targets, *, ignore_index: int = -100) -> torch.Tensor:
    """The PyTorch expression the fused op equals: full fp32 logits, then cross-entropy."""
    logits = F.linear(h, weight)
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index
    )
