"""trainer.watchdog_s (trainer/monitor.py Watchdog): a stalled run prints every thread's stack,
a run that keeps stepping prints nothing, and the timer is off after the run."""

from __future__ import annotations

import threading
import time

import pytest

from trainer.monitor import Watchdog

from .helpers import compose_cfg, train


def _stuck_in_this_function(seconds: float) -> None:
    time.sleep(seconds)


def test_a_stall_prints_every_threads_stack(tmp_path):
    out = tmp_path / "stacks.txt"
    with open(out, "w") as f, Watchdog(0.2, file=f):
        worker = threading.Thread(target=_stuck_in_this_function, args=(0.7,), name="stuck")
        worker.start()
        worker.join()
    text = out.read_text()
    assert "_stuck_in_this_function" in text and "Thread" in text
    assert text.count("_stuck_in_this_function") >= 2, "repeats while the stall lasts"


def test_steps_in_time_print_nothing_and_off_is_off(tmp_path):
    out = tmp_path / "stacks.txt"
    with open(out, "w") as f, Watchdog(0.3, file=f) as dog:
        for _ in range(12):
            time.sleep(0.05)
            dog.pet()
    time.sleep(0.45)  # the timer went with the block
    assert out.read_text() == ""
    for off in (None, 0):
        with Watchdog(off) as dog:
            assert dog.seconds is None
            dog.pet()
    with pytest.raises(ValueError, match="trainer.watchdog_s=-1"):
        Watchdog(-1)


def test_training_run_reports_a_stalled_batch(tmp_path, monkeypatch, capfd):
    """The trainer arms it from trainer.watchdog_s: a batch that takes longer than that shows
    where the loop waits, the run still finishes, and nothing fires after it."""
    from trainer.tasks import LanguageModelTask

    real = LanguageModelTask.next_batch
    calls = {"n": 0}

    def next_batch(self):
        calls["n"] += 1
        if calls["n"] == 5:
            _stuck_in_this_function(1.2)
        return real(self)

    monkeypatch.setattr(LanguageModelTask, "next_batch", next_batch)
    s = train(tmp_path, "trainer.max_steps=6", "trainer.watchdog_s=0.5")
    assert s["finished"]
    err = capfd.readouterr().err
    assert "_stuck_in_this_function" in err and "next_batch" in err
    time.sleep(0.7)
    assert "Thread" not in capfd.readouterr().err
    from trainer.config import load, validate

    with pytest.raises(ValueError, match="trainer.watchdog_s=-2"):
        validate(load(compose_cfg(["trainer.watchdog_s=-2", "logger=none"])))


def test_bench_cell_timeout_prints_the_runs_stderr(tmp_path, monkeypatch, capsys):
    """bench_efficientvit_train.py --cell-timeout: a run killed for time is a failed cell whose
    stderr so far (the watchdog's stacks) is printed, not a lost one."""
    import subprocess

    from scripts import bench_efficientvit_train as bench

    def killed(cmd, **kw):
        assert kw["timeout"] == 9.0
        raise subprocess.TimeoutExpired(cmd, 9.0, stderr=b'File "x.py", line 3 in _stuck\n')

    monkeypatch.setattr(subprocess, "run", killed)
    cell = bench.run_cell("m0", "ours", "none", 8, 3, [], tmp_path, timeout=9.0)
    assert cell["error"] == "killed after --cell-timeout 9 s" and cell["wall_s"] >= 0
    assert "in _stuck" in capsys.readouterr().err
