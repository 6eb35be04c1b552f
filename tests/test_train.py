"""The trainer end to end on the CPU: loss falls, exact resume, DDP (gloo) = one process,
signals, NaN stop, checkpoint checks, eval.py and HellaSwag scoring."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from .helpers import REPO_ROOT, TINY, compose_cfg, train


def losses(run_dir):
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def first_val(run_dir):
    return json.loads(open(os.path.join(run_dir, "metrics.jsonl")).readline())["val_loss"]


def test_loss_falls_and_run_dir_has_everything(tmp_path):
    run = tmp_path / "run"
    s = train(
        run,
        "trainer.max_steps=40",
        "trainer.eval_every=40",
        "trainer.ckpt_every=10",
        "trainer.keep_last=2",
        "optim.lr=3e-3",
    )
    start = first_val(run)
    assert start > 10.0  # ~ln(50304) at initialisation
    assert s["val_loss"] < start - 2.0, (start, s["val_loss"])
    assert s["final_step"] == 40 and s["finished"] and s["tokens_seen"] == 40 * 256
    assert set(s) >= {"train_loss", "val_loss", "val_ppl", "tokens_per_s"}
    assert math.isclose(s["val_ppl"], math.exp(s["val_loss"]), rel_tol=1e-9)
    assert json.loads((run / "summary.json").read_text())["final_step"] == 40
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.pt", "step_0000030.pt", "step_0000040.pt"]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"] == 40
    assert "trainer:" in (run / "config.yaml").read_text()


def test_stopped_and_resumed_run_matches_uninterrupted(tmp_path):
    common = ["trainer.max_steps=8", "trainer.eval_every=4", "trainer.ckpt_every=100"]
    a = train(tmp_path / "a", *common)
    b1 = train(tmp_path / "b", *common, "trainer.stop_at=3")
    assert b1["final_step"] == 3 and not b1["finished"]
    with open(
        tmp_path / "b" / "metrics.jsonl", "a"
    ) as f:  # logged, then killed before a checkpoint
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    b2 = train(tmp_path / "b", *common)  # resume=auto picks up last.pt
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(la) == list(range(1, 9)) and sorted(lb) == list(range(1, 9))
    assert [la[i] for i in range(1, 9)] == [lb[i] for i in range(1, 9)]  # exactly
    assert a["val_loss"] == b2["val_loss"]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in ln for ln in lines) == 8  # the stale step-4 record was dropped


def test_resume_never_and_explicit_path(tmp_path):
    train(tmp_path / "a", "trainer.max_steps=4", "trainer.ckpt_every=2")
    s = train(
        tmp_path / "b",
        "trainer.max_steps=4",
        f"trainer.resume={tmp_path}/a/checkpoints/step_0000002.pt",
    )
    assert losses(tmp_path / "b").keys() == {3, 4}
    assert losses(tmp_path / "b")[4] == losses(tmp_path / "a")[4] and s["final_step"] == 4
    train(tmp_path / "a", "trainer.max_steps=4", "trainer.resume=never")
    assert sorted(losses(tmp_path / "a")) == [1, 2, 3, 4]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tmp_path / "c", f"trainer.resume={tmp_path}/nope.pt")


def test_checkpoint_of_another_model_is_refused(tmp_path):
    train(tmp_path, "trainer.max_steps=2")
    with pytest.raises(ValueError, match="written by another model.*shape of"):
        train(tmp_path, "trainer.max_steps=4", "model.d_model=64")
    with pytest.raises(ValueError, match="written by another model.*(missing|unexpected)"):
        train(tmp_path, "trainer.max_steps=4", "pos=learned")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from trainer import NonFiniteLoss
    from trainer.tasks import LanguageModelTask

    calls = {"n": 0}
    real = LanguageModelTask.loss

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] > 10 else loss  # 2 micro-batches a step

    monkeypatch.setattr(LanguageModelTask, "loss", staticmethod(poisoned))
    with pytest.raises(
        NonFiniteLoss,
        match="non-finite training loss nan.*at step 6.*last good checkpoint is .*step_0000004.pt",
    ):
        train(tmp_path, "trainer.max_steps=20", "trainer.ckpt_every=4", "trainer.log_every=2")
    ck = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def _cli(*args, env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return [sys.executable, *args], env


def test_sigterm_checkpoints_then_resume(tmp_path):
    cmd, env = _cli(
        "train.py",
        *TINY,
        f"trainer.run_dir={tmp_path}",
        "trainer.max_steps=100000",
        "trainer.eval_every=100000",
        "trainer.ckpt_every=100000",
    )
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped at step" in out and "SIGTERM" in out
    step = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert step >= 2
    s = train(
        tmp_path,
        f"trainer.max_steps={step + 2}",
        "trainer.eval_every=100000",
        "trainer.ckpt_every=100000",
    )
    assert s["final_step"] == step + 2 and s["finished"]


def test_two_gloo_processes_match_one(tmp_path):
    common = [*TINY, "trainer.max_steps=4", "trainer.eval_every=4", "trainer.device=cpu"]
    one = train(tmp_path / "one", *common[len(TINY) :])
    cmd, env = _cli(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        *common,
        f"trainer.run_dir={tmp_path / 'two'}",
    )
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    for s in range(1, 5):
        assert math.isclose(l1[s], l2[s], rel_tol=1e-5), (s, l1[s], l2[s])
    assert math.isclose(one["val_loss"], two["val_loss"], rel_tol=1e-5)


def test_wandb_offline_run_is_written(tmp_path):
    train(tmp_path, "trainer.max_steps=2", "logger=wandb", "logger.tags=[test]")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, list(tmp_path.iterdir())


def test_eval_cli_table_json_and_hellaswag(tmp_path):
    train(tmp_path / "run", "trainer.max_steps=2", "pos=learned", "model.max_seq_len=64")
    hs = tmp_path / "hellaswag_val.jsonl"
    ex = {
        "ctx": "def add(a, b):",
        "endings": ["return a + b", "import os", "pass", "x = 1"],
        "label": 0,
    }
    hs.write_text("\n".join(json.dumps(ex) for _ in range(3)) + "\n")
    out = tmp_path / "eval.json"
    cmd, env = _cli(
        "eval.py",
        f"ckpt={tmp_path}/run/checkpoints/last.pt",
        "eval.seq_lens=[16,32]",
        "eval.max_tokens=512",
        f"eval.hellaswag={hs}",
        f"eval.out={out}",
        "data.max_chars=200000",
        "data=pycorpus",
    )
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads(out.read_text())
    assert set(r["perplexity"]) == {"16", "32"} and r["perplexity"]["16"]["tokens"] == 512
    assert r["hellaswag"]["examples"] == 3 and 0 <= r["hellaswag"]["acc"] <= 1
    assert "HellaSwag" in res.stdout and "ppl" in res.stdout
    cmd, env = _cli("eval.py", f"ckpt={tmp_path}/run/checkpoints/last.pt", "eval.seq_lens=[128]")
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "exceeds what pos=learned allows" in res.stderr + res.stdout


class OracleLM(torch.nn.Module):
    """Predicts a fixed token sequence perfectly: logits favour `target[t+1]` at position t."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, idx):
        b, t = idx.shape
        logits = torch.zeros(b, t, 50304)
        for i in range(t - 1):
            if i + 1 < len(self.target):
                logits[:, i, self.target[i + 1]] = 20.0
        return logits


@pytest.mark.parametrize("label", [0, 2])
def test_hellaswag_scoring_picks_the_likeliest_ending(tmp_path, label):
    import contextlib

    from data import gpt2_encoding
    from trainer.evaluate import hellaswag

    enc = gpt2_encoding()
    ex = {
        "ctx": "The cat sat on the",
        "endings": [" mat today", " roof", " chair by the door", " dog"],
        "label": label,
    }
    target = enc.encode_ordinary(ex["ctx"]) + enc.encode_ordinary(" " + ex["endings"][label])
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(ex) + "\n")
    r = hellaswag(
        OracleLM(target), path, device="cpu", autocast=contextlib.nullcontext, max_len=None
    )
    assert r == {"acc": 1.0, "acc_norm": 1.0, "examples": 1}
    wrong = dict(ex, label=(label + 1) % 4)
    path.write_text(json.dumps(wrong) + "\n")
    r = hellaswag(
        OracleLM(target), path, device="cpu", autocast=contextlib.nullcontext, max_len=None
    )
    assert r["acc"] == 0.0 and r["acc_norm"] == 0.0


def test_quickstart_is_the_default_config():
    cfg = compose_cfg([])
    assert (
        cfg.experiment == "quickstart" and cfg.pos.name == "carope" and cfg.data.kind == "bundled"
    )


def test_gpt2_trains_with_fused_neighborhood_attention_from_config(tmp_path):
    """attn=neighborhood (causal sliding window through the Triton kernel) from the command line.

    Kept short: the kernel runs in Triton's CPU interpreter here."""
    s = train(
        tmp_path,
        "attn=neighborhood",
        "attn.options.kernel_size=8",
        "trainer.max_steps=4",
        "trainer.eval_every=4",
        "trainer.eval_tokens=256",
        "optim.lr=3e-3",
    )
    start = first_val(tmp_path)
    assert s["finished"] and s["val_loss"] < start - 0.2, (start, s["val_loss"])


def test_adaptive_clipping_scales_each_unit_to_its_weight_norm():
    from trainer.optim import adaptive_clip_

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]]))  # row norms 5, 0, 1
    w.grad = torch.tensor([[30.0, 40.0], [1.0, 0.0], [0.001, 0.0]])  # row norms 50, 1, 0.001
    b = torch.nn.Parameter(torch.tensor([2.0]))
    b.grad = torch.tensor([0.01])
    adaptive_clip_([w, b], clip=0.1)
    # row 0: limit 0.5 -> scaled to norm 0.5; row 1: weight norm floored at 1e-3 -> limit 1e-4;
    # row 2: 0.001 < 0.1 untouched; bias: 0.01 < 0.2 untouched
    torch.testing.assert_close(w.grad[0], torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(w.grad[1], torch.tensor([1e-4, 0.0]))
    torch.testing.assert_close(w.grad[2], torch.tensor([0.001, 0.0]))
    torch.testing.assert_close(b.grad, torch.tensor([0.01]))


def test_adaptive_clipping_flat_path_equals_the_per_parameter_rule():
    """The fixed-kernel-count path (all parameters flattened) against the rule applied one
    parameter at a time, on a model whose units are partly clipped, partly not; a
    non-contiguous gradient takes the per-parameter path in the same call."""
    from trainer.optim import _unitwise_norm, adaptive_clip_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.Linear(5, 7), torch.nn.Embedding(6, 4))  # fmt: skip
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) * (0.001 if i % 2 else 1.0)
    params[-1].grad = torch.randn(4, 6).t()  # not contiguous
    want = []
    for p in params:
        limit = _unitwise_norm(p.detach()).clamp(min=1e-3) * 0.02
        g_norm = _unitwise_norm(p.grad)
        want.append(p.grad * torch.where(g_norm > limit, limit / g_norm, torch.ones_like(g_norm)))
    clipped = sum(int((w != p.grad).any()) for w, p in zip(want, params))
    assert 0 < clipped < len(params)
    before = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = adaptive_clip_(params, clip=0.02)
    for w, p in zip(want, params):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(norm, before)  # the norm before clipping, from the unit norms
    assert adaptive_clip_([torch.nn.Parameter(torch.ones(2))], clip=0.1) == 0  # no gradients


def _agc_torch_and_fused(params, grads, rtol: float) -> int:
    """Clip ``grads`` (copies) with the torch path and with the one-launch kernel; the two
    must agree to float32 rounding, pre-clip norm included. Returns how many changed."""
    from trainer.optim import adaptive_clip_

    got = {}
    for fused in (False, True):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        norm = adaptive_clip_(params, clip=0.02, fused=fused)
        got[fused] = (norm, [p.grad.clone() for p in params])
    torch.testing.assert_close(got[True][0], got[False][0], rtol=rtol, atol=0)
    for a, b in zip(got[True][1], got[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    return sum(int(not torch.equal(b, g)) for b, g in zip(got[False][1], grads))


def test_fused_adaptive_clipping_equals_the_flat_path():
    """AGC in one Triton launch (interpreted here; units read through offsets from the first
    weight and gradient) against the torch path: clipped and untouched units, 0-D to 4-D
    parameters, the returned pre-clip norm; equal to float32 rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.Linear(5, 7), torch.nn.Embedding(6, 4))  # fmt: skip
    extra = torch.nn.Parameter(torch.tensor(0.5))  # a 0-D parameter
    params = [*model.parameters(), extra]
    grads = [torch.randn_like(p) * (0.001 if i % 2 else 1.0) for i, p in enumerate(params)]
    assert 0 < _agc_torch_and_fused(params, grads, rtol=1e-6) < len(params)


def test_fused_adaptive_clipping_keeps_its_tables_and_reads_the_current_values():
    """The units' table and the pointer offsets are kept between steps: gradients that lie
    where the last step's did (CUDA graphs) reuse the offsets and are still read anew, and
    gradients elsewhere get offsets of their own."""
    from trainer import agc_kernel
    from trainer.optim import adaptive_clip_

    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    seen = []
    for step in range(3):
        values = [torch.randn_like(p) * (1.0 if step % 2 else 0.01) for p in params]
        for g, v in zip(grads, values):
            g.copy_(v)  # same storage every step, new values
        before = len(agc_kernel._OFFSETS)
        norm = adaptive_clip_(params, clip=0.02, fused=True)
        seen.append(len(agc_kernel._OFFSETS) - before)
        ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for r, v in zip(ref, values):
            r.grad = v.clone()
        want = adaptive_clip_(ref, clip=0.02, fused=False)
        torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r.grad, rtol=1e-5, atol=1e-9)
    assert seen[1:] == [0, 0]  # steps 2 and 3 found step 1's offsets
    moved = [torch.randn_like(p) for p in params]  # new gradient storage: new offsets
    for p, g in zip(params, moved):
        p.grad = g.clone()
    before = len(agc_kernel._OFFSETS)
    adaptive_clip_(params, clip=0.02, fused=True)
    assert len(agc_kernel._OFFSETS) == min(before + 1, agc_kernel._CACHE_MAX)


@pytest.mark.gpu
def test_cuda_fused_adaptive_clipping_equals_the_flat_path():
    """The compiled one-launch AGC against the torch path on EfficientViT-M0's parameters."""
    import ops
    from models.efficientvit import EfficientViT, EfficientViTConfig

    torch.manual_seed(0)
    model = EfficientViT(EfficientViTConfig(variant="m0"), ops.build("sdpa"))
    params = list(model.cuda().parameters())
    grads = [torch.randn_like(p) * 10.0 ** -(i % 4) for i, p in enumerate(params)]
    assert _agc_torch_and_fused(params, grads, rtol=1e-5) > 0


def test_weight_ema_is_the_running_average_and_copies_integer_buffers():
    from trainer.optim import WeightEMA

    m = torch.nn.BatchNorm1d(3)
    ema = WeightEMA(m, 0.9)
    with torch.no_grad():
        m.weight.fill_(2.0)  # EMA weight: 0.9 * 1 + 0.1 * 2
    m.num_batches_tracked.fill_(7)
    ema.update()
    torch.testing.assert_close(ema.model.weight, torch.full((3,), 1.1))
    assert int(ema.model.num_batches_tracked) == 7 and not ema.model.weight.requires_grad
    with pytest.raises(ValueError, match=r"ema_decay=1.0: use a value in \(0, 1\)"):
        WeightEMA(m, 1.0)


def test_ema_and_agc_train_and_resume_exactly(tmp_path):
    """trainer.ema_decay evaluates the EMA beside the weights; the EMA is checkpointed, so a
    stopped and resumed run ends with the same EMA metrics; optim.clip_mode=agc trains."""
    common = ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=100",
              "trainer.ema_decay=0.8", "optim.clip_mode=agc", "optim.grad_clip=0.02"]  # fmt: skip
    a = train(tmp_path / "a", *common)
    assert a["ema_val_loss"] != a["val_loss"] and math.isfinite(a["ema_val_loss"])
    train(tmp_path / "b", *common, "trainer.stop_at=4")
    assert "ema" in torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    b = train(tmp_path / "b", *common)
    assert b["ema_val_loss"] == a["ema_val_loss"] and b["val_loss"] == a["val_loss"]
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    with pytest.raises(ValueError, match="optim.clip_mode='unit'; valid: norm, agc"):
        train(tmp_path / "c", *common, "optim.clip_mode=unit")


@pytest.mark.parametrize("pos", ["rope", "carope"])
def test_fused_rotary_training_follows_the_pytorch_loss_curve(tmp_path, pos):
    """pos.kernel=triton (the fused kernels, interpreter here) and pos.kernel=torch: the same
    training run, step by step, within rounding (fp32 on the CPU)."""
    common = ["trainer.max_steps=6", "trainer.eval_every=100", "trainer.ckpt_every=100",
              f"pos={pos}", "trainer.log_every=1", "optim.lr=3e-3"]  # fmt: skip
    train(tmp_path / "torch", *common, "pos.kernel=torch")
    train(tmp_path / "triton", *common, "pos.kernel=triton")
    la, lb = losses(tmp_path / "torch"), losses(tmp_path / "triton")
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    assert la[6] < la[1] - 0.5  # it trains
    for step in la:
        assert math.isclose(lb[step], la[step], rel_tol=1e-5), (step, la[step], lb[step])


def test_hyper_attention_run_resumes_with_the_same_random_draws(tmp_path):
    """attn=hyper with its sampling active (32 tokens > min_seq_len 8): the backend's generator
    state is checkpointed, so a stopped and resumed run gives the uninterrupted run's losses."""
    common = ["trainer.max_steps=6", "trainer.eval_every=100", "trainer.ckpt_every=100",
              "trainer.log_every=1", "attn=hyper", "attn.options.inner=reference",
              "attn.options.min_seq_len=8", "attn.options.block_size=4",
              "attn.options.sample_size=2", "attn.options.lsh_bits=2"]  # fmt: skip
    train(tmp_path / "a", *common)
    train(tmp_path / "b", *common, "trainer.stop_at=3")
    ck = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    assert ck["attention"] and all(ck["attention"].values())  # generator states were saved
    train(tmp_path / "b", *common)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    assert [la[i] for i in range(1, 7)] == [lb[i] for i in range(1, 7)]
