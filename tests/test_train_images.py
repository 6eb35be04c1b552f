"""The shared trainer on image classification (EfficientViT on scikit-learn's digits, CPU):
accuracy far above chance, exact resume, the per-epoch schedule, EMA/AGC, clear errors."""

import json
import math

import pytest
import torch

from trainer import config as config_lib
from trainer.optim import lr_at

from .helpers import compose_cfg

# EfficientViT-M0 at 32 px on digits, small batches: seconds per epoch on a CPU
DIGITS = [
    "experiment=efficientvit_m0_digits",
    "logger=none",
    "trainer.progress=false",
    "trainer.micro_batch=32",
]


def run(run_dir, *overrides):
    from trainer import run as run_training

    return run_training(compose_cfg([*DIGITS, f"trainer.run_dir={run_dir}", *overrides]))


def records(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_digits_reach_accuracy_far_above_chance(tmp_path):
    s = run(tmp_path / "r", "trainer.epochs=3", "trainer.eval_every=1000")
    assert s["finished"] and s["final_step"] == 3 * 44  # 1,438 train images // 32 per step
    assert s["val_acc1"] > 50.0, s  # chance: 10%
    assert s["val_acc5"] >= s["val_acc1"] and "ema_val_acc1" in s and s["images_per_s"] > 0
    first = records(tmp_path / "r")[0]
    assert first["step"] == 0 and first["val_acc1"] < 30.0  # untrained


def test_image_run_stopped_and_resumed_matches(tmp_path):
    common = ["trainer.max_steps=10", "trainer.eval_every=10", "trainer.ckpt_every=100",
              "trainer.epochs=null", "optim.schedule_unit=step", "optim.warmup_steps=2"]  # fmt: skip
    a = run(tmp_path / "a", *common)
    b1 = run(tmp_path / "b", *common, "trainer.stop_at=4")
    assert b1["final_step"] == 4
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["data"] == {"epoch": 0, "batch": 4} and "ema" in ckpt
    b = run(tmp_path / "b", *common)
    assert (b["val_loss"], b["val_acc1"], b["ema_val_loss"]) == (
        a["val_loss"],
        a["val_acc1"],
        a["ema_val_loss"],
    )
    la = {r["step"]: r["loss"] for r in records(tmp_path / "a") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in records(tmp_path / "b") if "loss" in r}
    assert la == lb


def test_epoch_schedule_warms_up_from_init_and_holds_within_an_epoch():
    class Cfg:
        lr, min_lr, warmup_steps, decay_steps = 4e-3, 1e-5, 5, None
        warmup_init_lr, schedule_unit = 1e-6, "epoch"

    spe, epochs = 10, 300
    lrs = [lr_at(s, Cfg, epochs * spe, spe) for s in range(epochs * spe)]
    assert lrs[0] == 1e-6 and lrs[9] == 1e-6  # epoch 0 at the warmup start, all of it
    assert math.isclose(lrs[10], 1e-6 + (4e-3 - 1e-6) / 5)  # epoch 1
    assert math.isclose(lrs[50], 4e-3)  # first epoch after warmup: the peak
    assert lrs[-1] < 1e-4 and all(a >= b for a, b in zip(lrs[50:], lrs[51:]))
    with pytest.raises(ValueError, match="steps per epoch"):
        lr_at(0, Cfg, 100)


def test_image_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"trainer.global_batch=48 must be a multiple of"):
        config_lib.validate(config_lib.load(compose_cfg([*DIGITS, "trainer.global_batch=48"])))
    with pytest.raises(ValueError, match="optim.schedule_unit='epochs'; valid: step, epoch"):
        config_lib.validate(config_lib.load(compose_cfg([*DIGITS, "optim.schedule_unit=epochs"])))
    with pytest.raises(ValueError, match="trainer.epochs are for image classification"):
        config_lib.validate(config_lib.load(compose_cfg(["trainer.epochs=3"])))
    rc = config_lib.load(compose_cfg([*DIGITS, "model.num_classes=7"]))
    from trainer.distributed import DistInfo
    from trainer.tasks import build_task

    with pytest.raises(ValueError, match="has 10 classes but model.num_classes=7"):
        build_task(rc, DistInfo(device=torch.device("cpu")))
    assert config_lib.validate(rc) == 1


def test_eval_cli_reports_top1_top5_for_raw_and_ema_weights(tmp_path):
    """eval.py on an image checkpoint: top-1, top-5, loss, parameter count and image size for the
    raw and the EMA weights; the same numbers as the trainer's own final evaluation."""
    import subprocess
    import sys

    from .helpers import REPO_ROOT

    s = run(tmp_path / "r", "trainer.max_steps=6", "trainer.epochs=null",
            "optim.schedule_unit=step", "optim.warmup_steps=2")  # fmt: skip
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "eval.py", f"ckpt={tmp_path}/r/checkpoints/last.pt",
           f"eval.out={out}", "eval.batch_size=64"]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads(out.read_text())
    assert r["img_size"] == 32 and 2.0e6 < r["param_count"] < 2.4e6 and r["step"] == 6
    assert set(r["weights"]) == {"raw", "ema"} and r["weights"]["raw"]["val_images"] == 359
    assert math.isclose(r["weights"]["raw"]["val_acc1"], s["val_acc1"])
    assert math.isclose(r["weights"]["ema"]["val_loss"], s["ema_val_loss"], rel_tol=1e-6)
    assert "top-1" in res.stdout and "ema" in res.stdout


def test_two_processes_resume_the_ema_exactly(tmp_path):
    """Under DDP each rank's BatchNorm statistics come from its own batches, so the ranks' EMA
    buffers drift apart; checkpoints hold rank 0's. Every rank evaluates rank 0's, so a
    two-process run stopped at a step with no evaluation or checkpoint due (5) and resumed
    equals the uninterrupted one, EMA included."""
    from .helpers import run_two_processes

    common = ["trainer.device=cpu", "trainer.micro_batch=8", "trainer.global_batch=16",
              "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=2",
              "trainer.epochs=null", "optim.schedule_unit=step", "optim.warmup_steps=1",
              "data.num_workers=0"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    run_two_processes(run, [(a, common), (b, [*common, "trainer.stop_at=5"]), (b, common)], 300)
    ra = {r["step"]: r for r in records(a)}
    rb = {r["step"]: r for r in records(b)}
    assert ra[6]["ema_val_loss"] == rb[6]["ema_val_loss"]
    assert (ra[6]["val_loss"], ra[6]["loss"]) == (rb[6]["val_loss"], rb[6]["loss"])


def test_a_run_gives_the_process_its_signal_handlers_back(tmp_path):
    """The run's SIGTERM/SIGINT handlers (checkpoint and stop) go with it: left installed, a
    process that had trained ignored SIGTERM, and so did the pool workers it forked, which
    ``multiprocessing.Pool.terminate`` then waited for forever."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    s = run(tmp_path / "r", "trainer.max_steps=2", "trainer.epochs=null",
            "optim.schedule_unit=step", "optim.warmup_steps=1")  # fmt: skip
    assert s["finished"]
    assert {sig: signal.getsignal(sig) for sig in before} == before
