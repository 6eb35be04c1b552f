"""Parallelism applied outside the model, by one function (torchtitan's style): activation
checkpointing per transformer block, ``torch.compile``, and FSDP2 or DDP.

``parallelize(model, trainer_cfg, info)`` returns the module the training step calls. The model
is only asked for its list of transformer blocks (``transformer_blocks``: ``model.blocks`` of
GPT-2 and our LLM, ``hf.base_model.layers`` of transformers models); nothing in ``models/``
knows about parallelism.

- **DDP** (``trainer.parallel=ddp``, the default): the whole model compiled, then wrapped;
  gradients all-reduced in buckets of ``trainer.ddp_bucket_mb`` (100 MiB; DDP's 25 gave 1.3%
  fewer tokens/s on two H100s). Dynamo compiles the model at its first call, inside DDP's
  forward, where it would cut the graph at every bucket (``optimize_ddp``) so that each
  bucket's all-reduce overlaps the rest of the backward; ``trainer.ddp_split_graphs=false``
  (default) keeps one graph, the all-reduces after the backward, measured 0.5-1.3% faster a
  step on two H200s. ``gradient_as_bucket_view``, ``broadcast_buffers=False``, zeroing
  gradients in place and a bf16 all-reduce were measured too and gave nothing or less
  (docs/benchmarks.md).
- **Flat all-reduce** (``trainer.ddp_flat=true``, with ``parallel=ddp``): no DDP wrapper.
  After the step's last backward, the gradients are copied into one flat buffer and
  all-reduced once; the gradients become views of it (:class:`FlatDataParallel`). On two
  H200s it ran as fast as DDP (within 0.3%), so DDP stays the default.
- **FSDP2** (``trainer.parallel=fsdp``): ``fully_shard`` on every block, then on the root
  (embedding, final norm, LM head and tied weights). The last block keeps its parameters
  gathered after the forward (the backward starts with it). On CUDA with bf16 the parameters are
  gathered in bf16 and gradients reduced in fp32 (``MixedPrecisionPolicy``); on CPU nothing is
  cast. Gradients are reduce-scattered after every micro-batch (no ``no_sync``): accumulating
  them unsharded would hold a full copy of the gradients, which is what FSDP is for avoiding.
  On one process there is nothing to shard and the model runs unsharded.
- **Activation checkpointing** (``trainer.activation_checkpointing=true``, with or without
  FSDP): each block's forward runs under ``torch.utils.checkpoint`` (``use_reentrant=False``)
  and is recomputed in the backward. The block's ``forward`` attribute is wrapped in place
  instead of wrapping the module, so parameter names, state-dict keys and the attention
  backends' names stay those of the plain model (checkpoints are the same either way).
  Stochastic backends (``attn=hyper``) replay the forward's random draws in the recompute.
- **compile** with FSDP or checkpointing: each block's forward is compiled on its own (inside
  the checkpoint, outside FSDP's hooks), as torchtitan does; otherwise the whole model.

Checkpoints under FSDP hold *full* state dicts in the single-process format (``model``: the
plain ``state_dict()`` keys with tied weights sharing storage; ``optimizer``: the integer-keyed
``Optimizer.state_dict()``), gathered to CPU on rank 0, so a checkpoint written by any number of
processes loads in one process, in ``eval.py`` and in a sharded run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.checkpoint import checkpoint

import ops

try:  # FSDP2: public in torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # older torch
    from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor

_BLOCK_PATHS = ("blocks", "hf.base_model.layers")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, the unit of sharding and checkpointing."""
    for path in _BLOCK_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj):
            return obj
    raise ValueError(
        f"{type(model).__name__} has no list of transformer blocks ({' or '.join(_BLOCK_PATHS)}):"
        " trainer.parallel=fsdp and trainer.activation_checkpointing need one; use "
        "trainer.parallel=ddp and trainer.activation_checkpointing=false for this model"
    )


def is_sharded(model: nn.Module) -> bool:
    """True for a model under FSDP2 (its forward is a collective on every rank)."""
    return isinstance(model, FSDPModule)


# ----------------------------------------------------------------------------- checkpointing


def _backend_holders(block: nn.Module) -> list[nn.Module]:
    """Submodules of a block that hold an attention backend (``.attention``)."""
    return [m for m in block.modules() if isinstance(getattr(m, "attention", None), ops.Attention)]


def _checkpointed_forward(forward, holders, *args, **kwargs):
    """``forward(*args, **kwargs)`` under non-reentrant activation checkpointing.

    The recompute in the backward must see the same random draws as the forward. The global
    RNGs are restored by ``torch.utils.checkpoint``; a backend's own generators (hyper's) are
    not, so their states are taken before the forward, set for the recompute and put back after
    it: the random stream continues as without checkpointing. A backend whose generators did
    not exist before the forward (its first call) recomputes on a fresh copy of itself, which
    seeds them the same way."""
    before = [h.attention.state_dict() for h in holders]
    calls = []

    def run(*a, **k):
        calls.append(None)
        if len(calls) == 1:
            return forward(*a, **k)
        live = [h.attention for h in holders]
        after = [b.state_dict() for b in live]
        try:
            for h, backend, state, now in zip(holders, live, before, after):
                if state:
                    backend.load_state_dict(state)
                elif now:  # stochastic, first drawn in this forward
                    h.attention = ops.build(backend.name, **backend.options)
            return forward(*a, **k)
        finally:
            for h, backend, now in zip(holders, live, after):
                h.attention = backend
                backend.load_state_dict(now)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def _wrap_blocks(blocks: nn.ModuleList, checkpointing: bool, compile_: bool) -> None:
    """Compile and/or checkpoint each block's forward in place (module names unchanged)."""
    for block in blocks:
        forward = block.forward
        if compile_:
            forward = torch.compile(forward)
        if checkpointing:
            forward = functools.partial(_checkpointed_forward, forward, _backend_holders(block))
        block.forward = forward


# ----------------------------------------------------------------------------- sharding


def mixed_precision(device: torch.device, precision: str) -> MixedPrecisionPolicy:
    """bf16 parameters and fp32 gradient reduction on CUDA with bf16; nothing cast otherwise."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if device.type == "cuda" and bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, info, precision: str = "auto") -> nn.Module:
    """Shard every transformer block, then the root (what remains: embeddings, norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = mixed_precision(info.device, precision)
    # Blocks keep their inputs' dtypes: the activations already arrive in bf16 from the root,
    # and side inputs such as the RoPE cos/sin tables must stay fp32 (FSDP2's default casts
    # every floating-point input of a block to param_dtype; the fused RoPE refuses bf16 tables).
    block_policy = dataclasses.replace(policy, cast_forward_inputs=False)
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # the backward starts with the last block: keep it gathered after the forward
        fully_shard(block, mesh=mesh, mp_policy=block_policy,
                    reshard_after_forward=i < len(blocks) - 1)  # fmt: skip
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def parallelize(model: nn.Module, t, info, say=print) -> nn.Module:
    """Apply activation checkpointing, compile and FSDP2 or DDP as ``t`` (TrainerConfig) asks;
    return the module to train. FSDP shards ``model`` in place (then it is also the returned
    module); DDP wraps it. Call before building the optimizer."""
    fsdp = t.parallel == "fsdp" and info.enabled
    if t.parallel == "fsdp" and not info.enabled:
        say("trainer.parallel=fsdp on one process: nothing to shard, the model runs unsharded")
    per_block = fsdp or t.activation_checkpointing
    if per_block:
        _wrap_blocks(transformer_blocks(model), t.activation_checkpointing, t.compile)
        if t.compile and t.compile_tuning:
            _coordinate_descent_tuning()
    if fsdp:
        return apply_fsdp(model, info, t.precision)
    train_model = model if per_block else compile_model(model, t)
    if info.enabled:
        if t.compile:  # Dynamo compiles at the first call, inside DDP's forward: it reads this
            import torch._dynamo as dynamo

            dynamo.config.optimize_ddp = bool(t.ddp_split_graphs)
        if t.ddp_flat:
            return FlatDataParallel(train_model, model)
        ids = [info.device.index] if info.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=ids, bucket_cap_mb=t.ddp_bucket_mb
        )
    return train_model


class FlatDataParallel(nn.Module):
    """Data parallelism without DDP's reducer (``trainer.ddp_flat=true``): the ranks start from
    rank 0's parameters, and after the step's last backward :meth:`reduce_gradients` copies
    every gradient into one flat buffer per dtype, all-reduces it once (the mean) and makes
    the gradients views of it: a few launches a step where DDP's reducer makes two copies per
    parameter, one bucket at a time. Nothing overlaps the backward (as with DDP and a model
    compiled into one graph, ``trainer.ddp_split_graphs=false``). Buffers are not broadcast at
    each forward; the trainer gives every rank rank 0's before evaluating and checkpointing
    (:func:`broadcast_buffers`), as it does under DDP."""

    def __init__(self, module: nn.Module, model: nn.Module):
        super().__init__()
        self.module = module  # what runs (the compiled model, or the model)
        params = [p for p in model.parameters() if p.requires_grad]  # (tied ones once)
        self._groups: dict = {}
        for p in params:
            self._groups.setdefault((p.dtype, p.device), []).append(p)
        with torch.no_grad():
            for group in self._groups.values():
                flat = torch.cat([p.detach().reshape(-1) for p in group])
                dist.broadcast(flat, src=0)
                torch._foreach_copy_(group, _views(flat, group))
        self._nccl = "nccl" in str(dist.get_backend())  # (gloo has no average)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Every gradient replaced by its mean over the ranks (a missing one counts as 0, and its
        parameter then gets the mean: DDP would stop on a parameter without a gradient). The
        new gradients are views of the reduced buffer: no copy back."""
        for (_, device), group in self._groups.items():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
            flat = torch.cat([g.reshape(-1) for g in grads])
            average = self._nccl and device.type == "cuda"  # (else the sum of shares)
            if not average:
                flat.div_(dist.get_world_size())
            dist.all_reduce(flat, op=dist.ReduceOp.AVG if average else dist.ReduceOp.SUM)
            for p, view in zip(group, _views(flat, group)):
                p.grad = view


def _views(flat: torch.Tensor, like: list) -> list:
    """``flat`` cut into views shaped as the tensors of ``like``, in order."""
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in like]), like)]


def reduce_gradients(train_model: nn.Module) -> None:
    """After the step's last backward: the flat all-reduce of :class:`FlatDataParallel`;
    nothing for DDP (its reducer did it in the backward), FSDP and single processes."""
    if isinstance(train_model, FlatDataParallel):
        train_model.reduce_gradients()


def _coordinate_descent_tuning() -> None:
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = True


def compile_model(model, t):
    """torch.compile as trainer.compile / trainer.compile_tuning ask (identity when off).

    compile_tuning turns on Inductor's coordinate-descent tuning of its generated kernels
    (longer first compile, faster pointwise/reduction kernels); compile_mode is torch.compile's
    ``mode`` ("reduce-overhead" replays the forward and backward as CUDA graphs).
    """
    if not t.compile:
        return model
    if t.compile_tuning:
        _coordinate_descent_tuning()
    return torch.compile(model, mode=None if t.compile_mode == "default" else t.compile_mode)


def no_sync(train_model: nn.Module, last_micro_batch: bool):
    """DDP's ``no_sync`` before the last micro-batch (one all-reduce a step); a no-op context
    for FSDP (reduce-scatter every micro-batch) and single processes."""
    ddp = isinstance(train_model, torch.nn.parallel.DistributedDataParallel)
    if ddp and not last_micro_batch:
        return train_model.no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- gradients


def is_dtensor(t) -> bool:
    """A sharded (FSDP2 / DTensor) tensor."""
    return isinstance(t, DTensor)


@torch.no_grad()
def broadcast_buffers(module: nn.Module, info) -> None:
    """Give every rank rank 0's buffers of ``module`` (BatchNorm statistics: each rank updates
    its own from its own batches between DDP's broadcasts). Sharded (DTensor) buffers are left
    alone; identity when not distributed."""
    if not info.enabled:
        return
    for b in module.buffers():
        if not is_dtensor(b):
            dist.broadcast(b, src=0)


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes sharded (DTensor) gradients: the
    global norm is reduced over ranks and returned as a plain tensor (inf: measure only)."""
    params = [p for p in params if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# ----------------------------------------------------------------------------- state dicts

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _tie(model: nn.Module, state: dict) -> dict:
    """Shared parameters (tied embeddings) as one tensor under each of their names, as
    ``model.state_dict()`` gives them (the gather returns one copy per name)."""
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and first[id(p)] in state and name in state:
            state[name] = state[first[id(p)]]
        first.setdefault(id(p), name)
    return state


def model_state(model: nn.Module) -> dict:
    """The model's full state dict (on rank 0; ``{}`` on the others under FSDP). A collective
    under FSDP: every rank calls it."""
    if not is_sharded(model):
        return model.state_dict()
    return _tie(model, get_model_state_dict(model, options=_FULL))


def load_model_state(model: nn.Module, state: dict) -> None:
    """Load a full state dict (every rank passes it) into a plain or sharded model."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _param_names(model: nn.Module, opt) -> list[list[str]]:
    """The optimizer's parameters by group, as the model's names (first name of a shared one)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def optimizer_state(model: nn.Module, opt) -> dict:
    """The optimizer's full state in ``Optimizer.state_dict()``'s integer-keyed format (rank 0;
    ``{}`` elsewhere under FSDP). A collective under FSDP."""
    if not is_sharded(model):
        return opt.state_dict()
    full = get_optimizer_state_dict(model, opt, options=_FULL)
    if not full:
        return {}
    ids, groups = {}, []
    for group in full["param_groups"]:
        idx = [ids.setdefault(name, len(ids)) for name in group["params"]]
        groups.append({**group, "params": idx})
    return {"state": {ids[k]: v for k, v in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, opt, state: dict) -> None:
    """Load an integer-keyed full optimizer state (every rank passes it)."""
    if not is_sharded(model):
        opt.load_state_dict(state)
        return
    names = [n for group in _param_names(model, opt) for n in group]
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError("the checkpoint's optimizer holds another number of parameters")
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    by_name = {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))


def max_over_ranks(value: int, info) -> int:
    """The largest of an integer over ranks (identity on one process)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
