"""AdamW with decay only on matrices, the warmup + cosine learning-rate schedule, adaptive
gradient clipping and the weight EMA."""

from __future__ import annotations

import copy
import math

import torch

from ops.launch import _INTERPRET

from .agc_kernel import adaptive_clip_fused_, unit_layout
from .parallel import is_dtensor


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on >= 2-D parameters (weights, embeddings), none on norms/biases
    nor on what the model lists in ``no_weight_decay()`` (EfficientViT's attention biases)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and n not in skip]
    no_decay = [p for n, p in named if p.dim() < 2 or n in skip]
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_at(step: int, cfg, max_steps: int, steps_per_epoch: int | None = None) -> float:
    """Warmup to cfg.lr over warmup_steps, then cosine to cfg.min_lr at decay_steps.

    Warmup is linear from cfg.warmup_init_lr (0: from lr / warmup_steps at the first step).
    With cfg.schedule_unit == "epoch" every count (warmup_steps, decay_steps, max_steps) is in
    epochs and the lr is constant within an epoch (timm's per-epoch scheduler)."""
    if cfg.schedule_unit == "epoch":
        if not steps_per_epoch:
            raise ValueError("optim.schedule_unit=epoch needs the number of steps per epoch")
        step, max_steps = step // steps_per_epoch, max(1, max_steps // steps_per_epoch)
    decay_steps = cfg.decay_steps or max_steps
    if step < cfg.warmup_steps:
        if cfg.warmup_init_lr > 0 or cfg.schedule_unit == "epoch":  # timm: init + t * slope
            return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / cfg.warmup_steps
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    frac = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit: per row (dim 0) of a >= 2-D weight, whole tensor for 0/1-D."""
    if x.dim() <= 1:
        return x.norm()
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


@torch.no_grad()
def adaptive_clip_(
    params, clip: float, eps: float = 1e-3, fused: bool = False
) -> torch.Tensor | None:
    """Adaptive gradient clipping (Brock et al. 2021, NFNets), in place: each unit's gradient is
    scaled down to ``clip`` x its weight norm (weight norm floored at ``eps``) where larger.

    Returns the global L2 norm of the gradients before clipping (what the trainer logs), from
    the units' norms it computes anyway, so that no second pass over the gradients is needed;
    None when a gradient is sharded (DTensor: its norm needs a reduction over ranks).
    ``fused``: float32 groups on CUDA (or under the Triton interpreter) in one Triton launch
    (``agc_kernel``: the same rule, norms equal to float32 rounding, far fewer host calls).

    Plain tensors with contiguous gradients of one device and dtype go through a fixed number of
    kernels whatever the parameter count (flatten, per-unit sums by ``segment_reduce``, one
    gather, one multi-tensor multiply): a per-parameter loop launched ~7 kernels a parameter,
    ~2,500 a step for EfficientViT-M0, and bounded its training step by the host. Sharded
    (DTensor) parameters and the rest take the per-parameter path (same result)."""
    fast, slow, sq = [], [], []
    for p in params:
        g = p.grad
        if g is None:
            continue
        ok = type(g) is torch.Tensor and g.is_contiguous() and p.is_contiguous() and p.numel()
        (fast if ok and not is_dtensor(p) else slow).append(p)
    groups: dict = {}
    for p in fast:
        groups.setdefault((p.device, p.dtype, p.grad.dtype), []).append(p)
    for (dev, p_dtype, g_dtype), group in groups.items():
        if fused and p_dtype == g_dtype == torch.float32 and (dev.type == "cuda" or _INTERPRET):
            sq.append(adaptive_clip_fused_(group, clip, eps))
        elif len(group) > 1:
            sq.append(_adaptive_clip_flat(group, clip, eps))
        else:
            slow.extend(group)
    sharded = False
    for p in slow:
        limit = _unitwise_norm(p.detach()).clamp(min=eps).mul_(clip)
        g = p.grad.detach()
        g_norm = _unitwise_norm(g)
        sharded = sharded or is_dtensor(g_norm)
        if not sharded:
            sq.append(g_norm.float().square().sum())
        scale = torch.where(g_norm > limit, limit / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
        g.mul_(scale)
    if sharded:
        return None
    if not sq:
        return torch.zeros(())
    dev = sq[0].device
    return torch.stack([t.to(dev) for t in sq]).sum().sqrt()


_UNIT_LENGTHS: dict = {}  # (device, shapes) -> elements per unit, made once per model


def _adaptive_clip_flat(params, clip: float, eps: float) -> torch.Tensor:
    """:func:`adaptive_clip_` over parameters of one device and dtype, all contiguous: a unit is
    a row of a >= 2-D tensor or a whole 0/1-D one, so units are consecutive runs of the
    flattened tensors and their squared norms one ``segment_reduce``. Returns the gradients'
    squared norm before clipping."""
    sizes = [p.numel() for p in params]
    key = (params[0].device, tuple(tuple(p.shape) for p in params))
    lengths = _UNIT_LENGTHS.get(key)
    if lengths is None:  # unit_layout's lengths, on the device
        lengths = torch.from_numpy(unit_layout(params)[2]).to(params[0].device)
        if len(_UNIT_LENGTHS) > 16:
            _UNIT_LENGTHS.clear()
        _UNIT_LENGTHS[key] = lengths

    def unit_sq(tensors):
        flat = torch.cat([t.reshape(-1) for t in tensors]).float()
        return torch.segment_reduce(flat * flat, "sum", lengths=lengths)

    limit = unit_sq(params).sqrt_().clamp_(min=eps).mul_(clip)  # (under no_grad: no graph)
    g_sq = unit_sq([p.grad for p in params])
    g_norm = g_sq.sqrt()
    scale = torch.where(g_norm > limit, limit / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
    per_elem = torch.repeat_interleave(scale, lengths, output_size=sum(sizes))
    grads = [p.grad.view(-1) for p in params]
    torch._foreach_mul_(grads, [s.to(g.dtype) for s, g in zip(per_elem.split(sizes), grads)])
    return g_sq.sum()


class WeightEMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers),
    kept in a frozen copy of the model: ``ema = decay * ema + (1 - decay) * current`` after each
    update; integer buffers (e.g. BatchNorm's step count) are copied. Evaluate ``ema.model``."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema_decay={decay}: use a value in (0, 1), e.g. 0.9998")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs(model)

    def _pairs(self, model) -> None:
        # state_dict() tensors share storage with the modules: collect them once.
        ema_sd, cur_sd = self.model.state_dict(), model.state_dict()
        if list(ema_sd) != list(cur_sd):
            raise ValueError("WeightEMA: the model's state keys changed since the EMA was made")
        pairs = [(ema_sd[k], cur_sd[k]) for k in cur_sd]
        self._float = [(e, c) for e, c in pairs if e.dtype.is_floating_point]
        self._other = [(e, c) for e, c in pairs if not e.dtype.is_floating_point]

    @torch.no_grad()
    def update(self) -> None:
        if self._float:
            ema, cur = zip(*self._float)
            torch._foreach_lerp_(list(ema), list(cur), 1.0 - self.decay)
        if self._other:
            ema, cur = zip(*self._other)
            torch._foreach_copy_(list(ema), list(cur))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
