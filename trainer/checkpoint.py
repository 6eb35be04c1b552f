"""Checkpoints: atomic writes, ``last.pt`` plus the last k step files, and safe loading.

A checkpoint holds everything a resumed run needs to continue exactly: model, optimizer, step,
data position, RNG states of every rank, the resolved config and the wandb run id.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

STEP_RE = re.compile(r"step_(\d+)\.pt$")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.dir = Path(directory)
        self.keep_last = keep_last

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    def step_files(self) -> list[Path]:
        files = [p for p in self.dir.glob("step_*.pt") if STEP_RE.search(p.name)]
        return sorted(files, key=lambda p: int(STEP_RE.search(p.name).group(1)))

    def save(self, state: dict, step: int) -> Path:
        """Write step_XXXXXXX.pt atomically, point last.pt at it, prune old step files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:07d}.pt"
        _atomic_save(state, path)
        tmp = self.last.with_name("last.pt.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)  # same bytes, no second copy on disk
        except OSError:
            _atomic_save(state, tmp)
        os.replace(tmp, self.last)
        for old in self.step_files()[: -self.keep_last] if self.keep_last > 0 else []:
            old.unlink(missing_ok=True)
        return path


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)


def check_compatible(model: torch.nn.Module, ckpt: dict, path) -> None:
    """Raise one clear ValueError if the checkpoint's weights don't fit this model."""
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    missing = sorted(set(have) - set(got))
    extra = sorted(set(got) - set(have))
    shapes = sorted(k for k in set(have) & set(got) if have[k] != got[k])
    if not (missing or extra or shapes):
        return
    cfg = ckpt.get("config", {})
    was = {s: (cfg.get(s) or {}).get("name") for s in ("model", "pos", "attn")}
    parts = []
    if missing:
        parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if extra:
        parts.append(f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    if shapes:
        k = shapes[0]
        parts.append(f"shape of {k}: checkpoint {got[k]} vs model {have[k]}")
    raise ValueError(
        f"checkpoint {path} was written by another model (model={was['model']}, "
        f"pos={was['pos']}, attn={was['attn']}): {'; '.join(parts)}. Use the same model= and "
        "pos= as that run, or start a new run (trainer.resume=never or another trainer.run_dir)"
    )


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
