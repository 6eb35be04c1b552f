"""The one training loop shared by every model family (see DESIGN.md, "Trainer")."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

import ops
from data import ProcessAhead

from . import checkpoint as ckpt_lib
from . import config as config_lib
from . import distributed as dist_lib
from . import parallel as par
from . import sm_partition
from .monitor import Monitor, Throughput, Watchdog, peak_flops
from .optim import WeightEMA, adaptive_clip_, build_optimizer, lr_at
from .parallel import compile_model  # noqa: F401  (scripts/bench_train.py imports it from here)
from .step_graph import StepGraph
from .step_graph import check as check_step_graph
from .tasks import build_task


class NonFiniteLoss(RuntimeError):
    pass


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits. A second SIGINT aborts."""

    def __init__(self):
        self.signum = None

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def install(self):
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    @classmethod
    @contextlib.contextmanager
    def restored(cls):
        """The block may ``install`` a request; the process's handlers are put back after it.
        Left installed, they outlived the run: a process that had called ``trainer.run``
        (a test, a notebook) then only set a stale flag on SIGTERM, and so did the processes it
        forked, so ``multiprocessing.Pool.terminate`` waited forever for its workers."""
        before = {sig: signal.getsignal(sig) for sig in cls.SIGNALS}
        try:
            yield
        finally:
            for sig, handler in before.items():
                if handler is not None:  # (None: set outside Python; left as it is)
                    signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


def autocast_factory(precision: str, device: torch.device, cache_enabled: bool = True):
    """bf16 autocast for ``precision`` on ``device`` (or a no-op context). ``cache_enabled=False``
    inside CUDA-graph captures: a weight cast cached outside the capture lies in memory the
    graph does not own."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)


def _resume(rc, task, opt, manager, info, monitor_say) -> tuple[int, dict]:
    """Load the checkpoint that trainer.resume names; return (start step, checkpoint extras)."""
    mode = rc.trainer.resume
    if mode == "never":
        if manager.last.exists():
            monitor_say(f"trainer.resume=never: starting over; {manager.dir} will be overwritten")
        return 0, {}
    path = manager.last if mode == "auto" else Path(mode)
    if mode == "auto" and not path.exists():
        return 0, {}
    ckpt = ckpt_lib.load(path)
    ckpt_lib.check_compatible(task.model, ckpt, path)
    par.load_model_state(task.model, ckpt["model"])  # plain or sharded (FSDP)
    if getattr(task, "ema", None) is not None:
        if "ema" in ckpt:
            task.ema.load_state_dict(ckpt["ema"])
        else:
            task.ema.load_state_dict(ckpt["model"])
            monitor_say(f"{path} holds no weight EMA: the EMA starts from its weights")
    par.load_optimizer_state(task.model, opt, ckpt["optimizer"])
    for name, backend in _attention_backends(task.model).items():
        backend.load_state_dict(ckpt.get("attention", {}).get(name, {}))
    task.train_loader.load_state_dict(_data_state(ckpt, task.train_loader, rc, monitor_say))
    rngs = ckpt["rng"]
    ckpt_lib.set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
    monitor_say(f"resumed from {path} at step {ckpt['step']}")
    return int(ckpt["step"]), ckpt


def _data_state(ckpt: dict, loader, rc, say) -> dict:
    """The checkpoint's data position, for this run's loader.

    A token loader's cursor is a position in one stream of tokens, whatever the number of
    processes: with the same tokens per step and sequence length, a run on another number of
    processes (a checkpoint written under FSDP on 8 GPUs, resumed on one) reads the same
    sequences in every step, so the cursor carries over. The loader still refuses anything else
    (other seeds, shards, sequence lengths), naming what differs."""
    state = ckpt["data"]
    mine = loader.state_dict()
    was = state.get("world_size") if isinstance(state, dict) else None
    if was is None or was == mine.get("world_size"):
        return state
    old_tokens = ckpt.get("config", {}).get("trainer", {}).get("global_batch_tokens")
    if old_tokens != rc.trainer.global_batch_tokens or state.get("seq_len") != mine["seq_len"]:
        return state
    say(f"data position of a {was}-process run continued on {mine['world_size']} (same tokens "
        "per step)")  # fmt: skip
    return {**state, "world_size": mine["world_size"], "batch_size": mine["batch_size"]}


def _init_from(model, path: str, say) -> None:
    """Weights only from a checkpoint (trainer.init_from: continued training, e.g. at a longer
    context); the optimizer, schedule, step and data position start afresh."""
    ckpt = ckpt_lib.load(path)
    ckpt_lib.check_compatible(model, ckpt, path)
    model.load_state_dict(ckpt["model"])
    say(f"weights from {path} (step {ckpt.get('step')}); optimizer, schedule and data start afresh")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the step we restart from (logged before a crash, never checkpointed)."""
    if step == 0:
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def _attention_backends(model) -> dict:
    """The model's attention backends (``ops.Attention`` attributes named ``attention``) by
    the first module that holds each (GPT-2 shares one across its blocks)."""
    found, seen = {}, set()
    for name, module in model.named_modules():
        backend = getattr(module, "attention", None)
        if isinstance(backend, ops.Attention) and id(backend) not in seen:
            seen.add(id(backend))
            found[name] = backend
    return found


def _save(manager, task, opt, step, info, config_dict, extras) -> Path | None:
    rngs = dist_lib.gather_objects(ckpt_lib.rng_state(), info)
    # full (unsharded) states on rank 0; collectives under FSDP, so every rank takes part
    model_state = par.model_state(task.model)
    optimizer_state = par.optimizer_state(task.model, opt)
    path = None
    if info.is_main:
        state = {
            "step": step,
            "model": model_state,
            "optimizer": optimizer_state,
            "data": task.train_loader.state_dict(),
            "rng": rngs,
            "config": config_dict,
            **({"ema": task.ema.state_dict()} if getattr(task, "ema", None) else {}),
            # random streams of stochastic backends (hyper): a resumed run draws the same
            "attention": {n: a.state_dict() for n, a in _attention_backends(task.model).items()},
            **extras,
        }
        path = manager.save(state, step)
    dist_lib.barrier(info)
    return path


def _graph_step(task, graph, rc, step, max_steps):
    """trainer.step_graph: one optimizer step as replays of ``graph`` (a ``StepGraph``) on the
    next micro-batches; returns what ``_train_step`` does."""
    lr = lr_at(step, rc.optim, max_steps, getattr(task, "steps_per_epoch", None))
    return (*graph(task.next_batch, lr), lr)


def _train_step(task, train_model, opt, accum, autocast, info, rc, step, max_steps):
    """One optimizer step over `accum` micro-batches.

    Returns (mean loss, grad norm) as device tensors and the lr: nothing here waits for the
    GPU, so the host can queue the next step while this one runs. Losses are read back (and
    checked for NaN/Inf) in batches by `_flush`.
    """
    lr = lr_at(step, rc.optim, max_steps, getattr(task, "steps_per_epoch", None))
    for group in opt.param_groups:
        group["lr"] = lr
    loss_acc = torch.zeros((), device=info.device)
    graphs = rc.trainer.compile and rc.trainer.compile_mode == "reduce-overhead"
    for micro in range(accum):
        batch = task.next_batch()
        if graphs:  # CUDA graphs: this forward may reuse the previous replay's memory
            torch.compiler.cudagraph_mark_step_begin()
        last = micro == accum - 1
        with par.no_sync(train_model, last):
            with autocast():
                loss = task.loss(train_model, batch)
            (loss / accum).backward()
        loss_acc += loss.detach()
    par.reduce_gradients(train_model)  # (trainer.ddp_flat: the all-reduce; else nothing)
    norm = clip_gradients(task.model, rc.optim)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_acc / accum, norm, lr


def clip_gradients(model, cfg) -> torch.Tensor:
    """``optim.clip_mode`` / ``grad_clip`` on ``model``'s gradients; returns the norm before
    clipping (logged), as a device tensor (no host synchronisation)."""
    clip = cfg.grad_clip
    if cfg.clip_mode == "agc" and clip > 0:
        params = list(model.parameters())
        sharded = any(par.is_dtensor(p.grad) for p in params if p.grad is not None)
        # the norm logged is the one before clipping: AGC's unit norms give it, but for sharded
        # gradients it needs the reduction over ranks of clip_grad_norm_, taken first
        norm = par.clip_grad_norm_(params, math.inf) if sharded else None
        # the one-launch kernel where it is compiled (CUDA), not the interpreter's CPU runs
        fused = cfg.fused_agc and bool(params) and params[0].is_cuda
        agc_norm = adaptive_clip_(params, clip, fused=fused)
        return agc_norm if norm is None else norm
    # sharded (DTensor) gradients too: the norm is reduced over ranks
    return par.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)


def _flush(pending: list, info) -> list[dict]:
    """Read back the queued steps' losses (one sync, one collective); raise on NaN/Inf."""
    if not pending:
        return []
    vals = torch.stack([torch.stack([loss.float(), norm.float()]) for _, loss, norm, _ in pending])
    if info.enabled:
        torch.distributed.all_reduce(vals)
        vals = vals / info.world_size
    records = []
    for (step, _, _, lr), (loss, norm) in zip(pending, vals.tolist()):
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise NonFiniteLoss(
                f"non-finite training loss {loss} (grad norm {norm}) at step {step}"
            )
        records.append({"step": step, "loss": loss, "lr": lr, "grad_norm": norm})
    pending.clear()
    return records


def run(cfg) -> dict:
    """Train from a composed Hydra config; returns the summary also written to summary.json."""
    rc = config_lib.load(cfg)
    info = dist_lib.setup(rc.trainer.device)
    try:
        return _run(rc, info)
    finally:
        dist_lib.teardown()


def _run(rc, info) -> dict:
    t = rc.trainer
    accum = config_lib.validate(rc, info.world_size)
    if t.step_graph:
        check_step_graph(rc, info.world_size, info.device)
    sm_partition.check(t.step_sms, info.device)
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = config_lib.to_dict(rc)
    if info.is_main:
        OmegaConf.save(OmegaConf.create(config_dict), run_dir / "config.yaml")
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(rc.seed)  # same initial weights on every rank

    task = build_task(rc, info)
    # Python / NumPy draws (image augmentation) per rank, seeded after the build: first imports
    # may draw from `random`, which would make a process's first run differ from its later ones
    random.seed(rc.seed + info.rank)
    np.random.seed((rc.seed + info.rank) % 2**32)
    if task.unit == "images":  # epochs of the image loader, in optimizer steps
        task.steps_per_epoch = max(1, len(task.train_loader) // accum)
        if t.epochs is not None:
            t.max_steps = t.epochs * task.steps_per_epoch
    say = print if info.is_main else (lambda *a, **k: None)
    manager = ckpt_lib.CheckpointManager(run_dir / "checkpoints", t.keep_last)
    resuming = t.resume not in ("auto", "never") or (t.resume == "auto" and manager.last.exists())
    if t.init_from and not resuming:
        _init_from(task.model, t.init_from, say)
    task.model.to(info.device)
    task.ema = WeightEMA(task.model, t.ema_decay) if t.ema_decay else None
    # checkpointing, compile, FSDP2 / DDP; the optimizer then holds the (sharded) parameters
    train_model = par.parallelize(task.model, t, info, say)
    opt = build_optimizer(task.model, rc.optim, info.device)
    step, extras = _resume(rc, task, opt, manager, info, say)
    start = getattr(task.train_loader, "start", None)  # data.decode_process: its child, now,
    if start is not None and step < t.max_steps:  # beside the first evaluation and compile
        start()
    if info.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", step)
    monitor = Monitor(rc, run_dir, info.is_main, config_dict, wandb_id=extras.get("wandb_id"))
    decode_gpu = getattr(task, "decode", None) is not None  # as built: data.decode=gpu ...
    here = decode_gpu and not isinstance(task.train_loader, ProcessAhead)  # ... in this process
    pixels = getattr(rc.data, "kind", None) == "pixels"  # a pixel store: nothing to decode
    note = sm_partition.idle_note(t.step_sms, decode_gpu, here, pixels)
    if note:
        say(note)
    try:
        with (StopRequest.restored(), sm_partition.on_sms(t.step_sms, info.device, say),
              Watchdog(t.watchdog_s) as dog):  # fmt: skip
            return _loop(rc, info, task, train_model, opt, manager, monitor, step, accum,
                         run_dir, config_dict, dog)  # fmt: skip
    finally:
        monitor.close()
        close = getattr(task.train_loader, "close", None)  # threads or a process decoding ahead
        if close is not None:
            close()


@dataclasses.dataclass
class _Events:
    log: bool
    eval: bool
    ckpt: bool
    stop_at: bool

    @property
    def any(self) -> bool:
        return self.log or self.eval or self.ckpt


_WARMUP_STEPS = 3


def _events(step: int, t, first_step: int) -> _Events:
    """What happens after optimizer step `step` (1-based) besides training."""
    last = step == t.max_steps
    stop_at = t.stop_at is not None and t.stop_at <= step < t.max_steps
    return _Events(
        log=step % t.log_every == 0 or last or step == first_step + 1,
        eval=step % t.eval_every == 0 or last,
        ckpt=step % t.ckpt_every == 0 or last or stop_at,
        stop_at=stop_at,
    )


def _describe(evals: dict, prefix: str = "") -> str:
    out = f"{prefix}val loss {evals['val_loss']:.4f}"
    if "val_ppl" in evals:
        out += f" | {prefix}val ppl {evals['val_ppl']:.2f}"
    if "val_acc1" in evals:
        out += f" | {prefix}top-1 {evals['val_acc1']:.2f}% | {prefix}top-5 {evals['val_acc5']:.2f}%"
    return out


def _peak_memory_gib(info) -> float | None:
    """Peak GPU memory allocated by tensors, the largest over ranks (None on the CPU)."""
    if info.device.type != "cuda":
        return None
    return par.max_over_ranks(torch.cuda.max_memory_allocated(info.device), info) / 2**30


def _parallel(t, info) -> str:
    mode = t.parallel if info.enabled else "1 process"
    if info.enabled and t.parallel == "ddp" and t.ddp_flat:
        mode = "data parallel, one flat all-reduce (trainer.ddp_flat)"
    return mode + (", activation checkpointing" if t.activation_checkpointing else "")


def _evaluate(task, model, autocast, t, monitor, step, info) -> dict:
    ema = getattr(task, "ema", None)
    # under DDP each rank's BatchNorm statistics come from its own batches (the EMA's drift
    # apart too): every rank evaluates rank 0's, the ones a checkpoint holds, so eval.py gives
    # the same numbers and a run resumed at any step equals the uninterrupted one (timm's
    # --dist-bn broadcasts them likewise); identity on one process
    for module in (task.model,) if ema is None else (task.model, ema.model):
        par.broadcast_buffers(module, info)
    evals = task.evaluate(model, autocast, t.eval_tokens)
    line = f"step {step} | {_describe(evals)}"
    if ema is not None:  # the EMA weights, evaluated on the same data
        ema_evals = task.evaluate(ema.model, autocast, t.eval_tokens)
        evals.update({f"ema_{k}": v for k, v in ema_evals.items()})
        line += f" | {_describe(ema_evals, 'ema ')}"
    monitor.say(line)
    return evals


def _loop(rc, info, task, train_model, opt, manager, monitor, step, accum, run_dir,
          config_dict, watchdog: Watchdog) -> dict:  # fmt: skip
    t = rc.trainer
    model = task.model
    autocast = autocast_factory(t.precision, info.device)
    peak = peak_flops(info.device, t.peak_flops)
    flops_tok = task.flops_per_unit()
    unit = task.unit  # "tokens" or "images"
    per_step = task.units_per_micro * accum * info.world_size
    n_params = model.num_params()
    batch = (
        f"{t.global_batch_tokens} tokens/step = {accum} x {t.micro_batch} x {t.seq_len} x "
        f"{info.world_size}"
        if unit == "tokens"
        else f"{per_step} images/step = {accum} x {t.micro_batch} x {info.world_size}, "
        f"{getattr(task, 'steps_per_epoch', '?')} steps/epoch"
    )
    monitor.say(
        f"run {run_dir} | {rc.model.name} ({n_params / 1e6:.1f}M params) pos={rc.pos.name} "
        f"attn={rc.attn.name} | {info.world_size} x {info.device.type} ({_parallel(t, info)}) | "
        f"{batch}"
    )
    stop = StopRequest()
    stop.install()
    extras = lambda: {"wandb_id": monitor.wandb_id}  # noqa: E731
    evals = {}
    if step == 0:
        monitor.log({"step": 0, **_evaluate(task, model, autocast, t, monitor, 0, info)})
    meter = Throughput()
    # steps left out of the throughput: the first compiles; with CUDA graphs (compile_mode
    # reduce-overhead) the next two warm up and record the graphs, slower than the rest
    warm_steps = _WARMUP_STEPS if t.max_steps - step >= 4 * _WARMUP_STEPS else 1
    loss, start, first_step = float("nan"), time.perf_counter(), step
    last_ckpt = manager.last if manager.last.exists() else None
    pending = []  # steps whose losses are still on the device
    graph = None  # trainer.step_graph: the step replayed as CUDA graphs
    if t.step_graph:
        graph = StepGraph(task, train_model, opt, lambda: clip_gradients(model, rc.optim),
                          autocast_factory(t.precision, info.device, cache_enabled=False),
                          info.device, accum=accum)  # fmt: skip
    while step < t.max_steps:
        watchdog.pet()  # trainer.watchdog_s: counts from the last step issued (off: nothing)
        if graph is None:
            out = _train_step(task, train_model, opt, accum, autocast, info, rc, step, t.max_steps)
        else:
            out = _graph_step(task, graph, rc, step, t.max_steps)
        if task.ema is not None:
            task.ema.update()
        step += 1
        pending.append((step, *out))
        meter.add(per_step)
        ev = _events(step, t, first_step)
        if info.enabled:  # a collective only where all ranks meet anyway
            stopping = ev.any and dist_lib.any_rank(stop.signum is not None, info)
        else:
            stopping = stop.signum is not None
        if not (ev.any or stopping or step == first_step + warm_steps):
            continue
        try:
            records = _flush(pending, info)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(
                f"{e}. Stopped without saving; the last good checkpoint is "
                f"{last_ckpt or 'none (no checkpoint written yet)'}. Lower optim.lr, raise "
                "optim.warmup_steps or check the data, then resume from it."
            ) from None
        loss = records[-1]["loss"]
        if step <= first_step + warm_steps:  # compilation, CUDA-graph warm-up and recording
            meter.read(count=False)
        elif ev.log:
            tok_s, step_t = meter.read()
            mfu = flops_tok * tok_s / (peak * info.world_size) if peak else None
            records[-1].update(tok_s=tok_s, mfu=mfu)
            monitor.progress(step, t.max_steps, loss, records[-1]["lr"], tok_s, mfu, step_t,
                             unit="tok" if unit == "tokens" else "img")  # fmt: skip
        if ev.eval:
            evals = _evaluate(task, model, autocast, t, monitor, step, info)
            records[-1].update(evals)
        for rec in records:
            monitor.log(rec)
        if ev.ckpt or stopping:
            last_ckpt = _save(manager, task, opt, step, info, config_dict, extras())
        if ev.eval or ev.ckpt:
            meter.read(count=False)  # keep evaluation and checkpoint time out of tokens/s
        if stopping or ev.stop_at:
            why = f"signal {signal.Signals(stop.signum).name}" if stop.signum else "trainer.stop_at"
            monitor.say(
                f"stopped at step {step} ({why}); checkpoint {manager.last}. "
                "Run the same command to resume."
            )
            break
    if not evals:  # resumed a run that had already finished
        evals = _evaluate(task, model, autocast, t, monitor, step, info)
    metric_keys = ("val_ppl", "val_acc1", "val_acc5")
    summary = {
        "final_step": step,
        "train_loss": loss,
        "val_loss": evals["val_loss"],
        **{k: evals[k] for k in metric_keys if k in evals},
        **{
            f"ema_{k}": evals[f"ema_{k}"] for k in ("val_loss", *metric_keys) if f"ema_{k}" in evals
        },
        f"{unit}_per_s": meter.mean(),
        "mfu": (flops_tok * meter.mean() / (peak * info.world_size)) if peak else None,
        f"{unit}_seen": step * per_step,
        "wall_time_s": time.perf_counter() - start,
        "world_size": info.world_size,
        "peak_memory_gib": _peak_memory_gib(info),
        "finished": step >= t.max_steps,
        "run_dir": str(run_dir),
    }
    if info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        monitor.say(json.dumps(summary))
    if stop.signum is not None:
        summary["exit_code"] = 128 + int(stop.signum)
    return summary
