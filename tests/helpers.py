"""Shared test helpers: compose the real Hydra config and run the real trainer in-process."""

from __future__ import annotations

import os

from hydra import compose, initialize_config_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(REPO_ROOT, "conf")

# A CPU-sized run: 1-layer GPT-2 on a small slice of the bundled corpus.
TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.d_model=32",
    "trainer.seq_len=32",
    "trainer.micro_batch=4",
    "trainer.global_batch_tokens=256",
    "trainer.eval_tokens=1024",
    "trainer.log_every=2",
    "trainer.progress=false",
    "data.max_chars=200000",
    "logger=none",
    "optim.warmup_steps=2",
]


# EfficientViT-M0 on scikit-learn's digits, a batch of 32, no progress bar.
DIGITS = [
    "experiment=efficientvit_m0_digits",
    "logger=none",
    "trainer.progress=false",
    "trainer.micro_batch=32",
]


def digits_metrics(run_dir, *overrides) -> list[dict]:
    """metrics.jsonl of 12 logged steps of DIGITS on the GPU (validation at step 12)."""
    import json

    from trainer import run

    run(compose_cfg([*DIGITS, "trainer.device=cuda", "trainer.max_steps=12", "trainer.epochs=null",
                     "trainer.log_every=1", "trainer.eval_every=12", "optim.schedule_unit=step",
                     f"trainer.run_dir={run_dir}", *overrides]))  # fmt: skip
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_training(a: list[dict], b: list[dict], rel: float = 2e-3) -> None:
    """The same steps, and losses, gradient norms, learning rates and validation losses
    within ``rel``, step by step."""
    import pytest

    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "lr", "val_loss", "ema_val_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-5), (x["step"], key)


def compose_cfg(overrides=(), config_name="config"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def train(run_dir, *overrides):
    """Run train.py's work in this process; returns summary dict."""
    from trainer import run

    cfg = compose_cfg([*TINY, f"trainer.run_dir={run_dir}", *overrides])
    return run(cfg)


def randomize_bn(model, seed=0):
    """Non-trivial BN affine/statistics and attention biases (at init many of EfficientViT's
    branches are zero, so a comparison of outputs would prove little)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bn.weight"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            elif name.endswith(("bn.bias", "attention_biases", "attn_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, train_fn, runs: list) -> None:
    """One rank: ``train_fn(run_dir, *overrides)`` for each (port, run_dir, overrides) in turn,
    each in its own process group."""
    for port, run_dir, overrides in runs:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        train_fn(run_dir, *overrides)


def run_two_processes(train_fn, runs: list, timeout_s: float) -> None:
    """``train_fn(run_dir, *overrides)`` for each (run_dir, overrides) of ``runs`` on two gloo
    processes forked from this one (no re-import: a second each); fails the test on a hang."""
    import time

    import pytest
    import torch.multiprocessing as mp

    runs = [(_free_port(), str(d), list(o)) for d, o in runs]
    ctx = mp.start_processes(_rank_worker, args=(2, train_fn, runs), nprocs=2, join=False,
                             start_method="fork")  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):  # (returns as each process ends)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"two-process runs did not finish in {timeout_s:.0f} s (a hang?)")


def queued_reads_corrupted(decode, n: int, size: int = 64, rounds: int = 20) -> int:
    """How many of ``rounds`` x ``n`` reductions a decode corrupted: tensors of 7s are freed
    on the current stream while sums over them are still queued behind ~matrix products,
    then ``decode()`` runs, whose outputs may be handed those blocks (pytorch/vision#9606,
    torchcodec#1634: nvJPEG's writes do not wait for the stream). 0 when it is safe."""
    import torch

    corrupted = 0
    for _ in range(rounds):
        victims = [torch.full((3, size, size), 7, dtype=torch.uint8, device="cuda")
                   for _ in range(n)]  # fmt: skip
        torch.cuda.synchronize()
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):  # keep the stream busy so the sums below are still queued
            big = big @ big / 64.0
        sums = [v.sum(dtype=torch.int64) for v in victims]
        del victims  # freed on the caller's stream while the sums are queued
        decode()
        torch.cuda.synchronize()
        corrupted += sum(int(s) != 7 * 3 * size * size for s in sums)
    return corrupted
