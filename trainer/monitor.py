"""Progress display, metrics file and wandb logging (rank 0 only)."""

from __future__ import annotations

import faulthandler
import json
import sys
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s per device, for MFU (vendor datasheets, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Monitor:
    """Writes metrics.jsonl and wandb on rank 0; prints one progress line per log interval."""

    def __init__(self, rc, run_dir: Path, is_main: bool, config_dict: dict, wandb_id=None):
        self.is_main, self.rc = is_main, rc
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        if is_main and rc.logger.name == "wandb":
            self._start_wandb(run_dir, config_dict)

    def _start_wandb(self, run_dir: Path, config_dict: dict) -> None:
        import wandb

        lg = self.rc.logger
        self.wandb = wandb.init(
            project=lg.project,
            entity=lg.entity,
            name=lg.run_name,
            group=lg.group,
            tags=list(lg.tags),
            mode=lg.mode,
            dir=str(run_dir),
            config=config_dict,
            id=self.wandb_id,
            resume="allow",
        )
        self.wandb_id = self.wandb.id

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def progress(self, step, max_steps, loss, lr, tok_s, mfu, step_time, unit="tok"):
        if not (self.is_main and self.rc.trainer.progress):
            return
        eta = fmt_duration((max_steps - step) * step_time)
        mfu_s = f"{100 * mfu:5.1f}%" if mfu is not None else "    -"
        print(
            f"step {step:>6}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{tok_s / 1e3:8.1f}k {unit}/s | MFU {mfu_s} | {step_time * 1e3:7.1f} ms/step | ETA {eta}",
            flush=True,
        )

    def say(self, msg: str) -> None:
        if self.is_main:
            print(msg, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class Throughput:
    """Tokens/s over the last log interval (the loop leaves the warm-up steps out)."""

    def __init__(self):
        self.t0, self.tokens, self.steps = time.perf_counter(), 0, 0
        self.total_time, self.total_tokens = 0.0, 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def read(self, count: bool = True) -> tuple[float, float]:
        """(tokens/s, seconds/step) since the last read; reset."""
        dt = time.perf_counter() - self.t0
        tok_s = self.tokens / dt if dt > 0 else 0.0
        step_t = dt / max(1, self.steps)
        if count:
            self.total_time += dt
            self.total_tokens += self.tokens
        self.t0, self.tokens, self.steps = time.perf_counter(), 0, 0
        return tok_s, step_t

    def mean(self) -> float:
        return self.total_tokens / self.total_time if self.total_time > 0 else 0.0


class Watchdog:
    """``trainer.watchdog_s``: when no training step has been issued for ``seconds``, every
    thread's Python stack goes to ``file`` (stderr), and again each further ``seconds`` while
    it lasts; the run goes on. A hung run (a data pipeline or a collective that never returns)
    then says where it waits, in its log. ``pet()`` after each step restarts the count; None
    or 0 leaves it off. It uses ``faulthandler``'s own thread, so a hang holding the GIL is
    shown too, and a process has one such timer: the last Watchdog armed wins."""

    def __init__(self, seconds: float | None, file=None):
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"trainer.watchdog_s={seconds}: use null (off) or seconds > 0")
        self.seconds = float(seconds) if seconds else None
        self.file = file

    def pet(self) -> None:
        if self.seconds:
            faulthandler.dump_traceback_later(self.seconds, repeat=True, file=self._file())

    def _file(self):
        """``file``, else stderr; where stderr was replaced by an object without a file
        descriptor (a capturing test or notebook), the process's own stderr."""
        file = self.file or sys.stderr
        try:
            file.fileno()
        except (AttributeError, OSError, ValueError):
            return sys.__stderr__
        return file

    def __enter__(self) -> Watchdog:
        self.pet()
        return self

    def __exit__(self, *exc) -> None:
        if self.seconds:
            faulthandler.cancel_dump_traceback_later()
