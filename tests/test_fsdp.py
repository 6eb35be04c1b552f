"""FSDP2 and activation checkpointing (trainer/parallel.py) on the CPU: two gloo processes under
FSDP2 + checkpointing train like one process; checkpoints written under FSDP load in one process
(and in eval) and continue the run; a sharded run continues a single process's checkpoint;
checkpointing alone leaves the gradients (and hyper's random draws) unchanged."""

import contextlib
import dataclasses
import json
import math
import os

import pytest
import torch

import ops
from models import build_model
from trainer import config as config_lib
from trainer import parallel as par
from trainer.distributed import DistInfo

from .helpers import compose_cfg, run_two_processes, train

# llm_tiny (4 blocks, tied embedding, GQA) on 32-token sequences; 256 tokens a step, which is
# 2 micro-batches on one process and 1 on each of two. 33 validation windows: the last one goes
# to rank 0 alone, so rank 1 must join rank 0's all-gathers without data.
LLM = [
    "model=llm_tiny",
    "pos=rope",
    "trainer.device=cpu",
    "trainer.max_steps=6",
    "trainer.ckpt_every=3",
    "trainer.eval_every=6",
    "trainer.eval_tokens=1056",
    "trainer.log_every=1",
    "optim.fused=true",  # fused AdamW on sharded (DTensor) parameters
]
FSDP = ["trainer.parallel=fsdp", "trainer.activation_checkpointing=true"]
TIMEOUT_S = 120


def records(run_dir) -> dict[int, dict]:
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


def assert_same_run(a: dict, b: dict, steps, rel=1e-5):
    """Losses (and val losses) within fp32 rounding; gradient norms within 1e-4: the global
    norm of 7M fp32 gradients has a rounding error near 1e-5 itself (3.125882 single-process,
    3.125885 from shards, 3.125928 in float64 at step 1), which later steps carry."""
    for s in steps:
        for key, tol in (("loss", rel), ("val_loss", rel), ("grad_norm", 1e-4)):
            if key in a[s] or key in b[s]:
                assert math.isclose(a[s][key], b[s][key], rel_tol=tol), (s, key, a[s], b[s])


def test_fsdp_on_two_processes_trains_and_checkpoints_like_one(tmp_path):
    one, two, back, into = (tmp_path / n for n in ("one", "two", "back", "into"))
    train(one, *LLM)  # the reference: one process, no sharding, no checkpointing
    run_two_processes(train, [
        (two, [*LLM, *FSDP]),  # from scratch
        # a full single-process checkpoint loaded into the sharded model and optimizer
        (into, [*LLM, *FSDP, f"trainer.resume={one}/checkpoints/step_0000003.pt"]),
    ], TIMEOUT_S)  # fmt: skip
    r1, r2, r_into = records(one), records(two), records(into)
    assert sorted(r2) == list(range(7)) and sorted(r_into) == [4, 5, 6]
    assert_same_run(r1, r2, range(7))
    assert_same_run(r1, r_into, [4, 5, 6])
    # the sharded run's checkpoint, resumed by one process, continues as both runs did
    s = train(back, *LLM, f"trainer.resume={two}/checkpoints/step_0000003.pt")
    assert s["world_size"] == 1 and s["final_step"] == 6
    assert_same_run(r1, records(back), [4, 5, 6])
    assert_same_run(r2, records(back), [4, 5, 6])
    _assert_same_checkpoint_format(one / "checkpoints" / "last.pt", two / "checkpoints" / "last.pt")


def _assert_same_checkpoint_format(single, sharded):
    """A checkpoint written under FSDP has the single-process layout (full tensors, tied
    weights sharing storage, integer-keyed optimizer state) and loads in eval.py's loader."""
    from trainer.evaluate import load_model

    a = torch.load(single, weights_only=False)
    b = torch.load(sharded, weights_only=False)
    assert a["step"] == b["step"] == 6 and a.keys() == b.keys()
    assert list(a["model"]) == list(b["model"])
    for k, v in a["model"].items():
        assert b["model"][k].shape == v.shape and not isinstance(b["model"][k], par.DTensor)
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5)
    assert b["model"]["lm_head.weight"].data_ptr() == b["model"]["embed.weight"].data_ptr()
    oa, ob = a["optimizer"], b["optimizer"]
    assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
    assert oa["state"].keys() == ob["state"].keys()
    for i, st in oa["state"].items():
        for key, v in st.items():
            torch.testing.assert_close(ob["state"][i][key], v, rtol=1e-3, atol=1e-6)
    model, rc, _ = load_model(sharded, "cpu")
    assert rc.trainer.parallel == "fsdp" and not par.is_sharded(model)
    torch.testing.assert_close(model.state_dict()["norm.weight"], b["model"]["norm.weight"])


HYPER = [  # hyper drawing at 64 tokens: exact inner backend, 8-key blocks, 4 samples
    "attn=hyper",
    "attn.options.min_seq_len=16",
    "attn.options.block_size=8",
    "attn.options.sample_size=4",
    "attn.options.lsh_bits=2",
    "attn.options.inner=reference",
]
GPT2 = ["model=gpt2_nano", "model.n_layer=2", "model.d_model=64", "model.n_head=2"]


def _grads(overrides, checkpointing: bool, seed: int = 0):
    """Loss and gradients of two forward/backward passes (the second one with the random
    generators already drawn from), and the backends' states afterwards."""
    rc = config_lib.load(compose_cfg(["trainer.device=cpu", *overrides]))
    torch.manual_seed(0)
    attention = ops.build(rc.attn.name, **{**rc.attn.options, **({"seed": seed} if seed else {})})
    model = build_model(rc.model, attention, rc.pos)
    t = dataclasses.replace(rc.trainer, activation_checkpointing=checkpointing)
    assert par.parallelize(model, t, DistInfo(), say=lambda *a: None) is model
    x = torch.randint(0, 50257, (2, 65), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(2):
        losses.append(model(x[:, :-1], x[:, 1:]))
        losses[-1].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return torch.stack(losses).detach(), grads, attention.state_dict()


@pytest.mark.parametrize(
    "overrides",
    [["model=llm_tiny", "pos=rope"], ["model=llm_tiny", "pos=rope", *HYPER], GPT2],
    ids=["llm", "llm-hyper", "gpt2-carope"],
)
def test_activation_checkpointing_gives_the_same_gradients(overrides):
    loss, grads, state = _grads(overrides, checkpointing=False)
    loss_ac, grads_ac, state_ac = _grads(overrides, checkpointing=True)
    torch.testing.assert_close(loss_ac, loss, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ac[name], g, rtol=1e-6, atol=1e-9, msg=name)
    # a stochastic backend's stream continues as without checkpointing (no extra draws)
    assert state.keys() == state_ac.keys()
    for key in state:
        assert torch.equal(state[key], state_ac[key])
    if "attn=hyper" in overrides:  # the draws matter here: another seed gives another loss
        assert state and not torch.equal(_grads(overrides, False, seed=5)[0], loss)


def test_init_from_takes_the_weights_only(tmp_path):
    """trainer.init_from (continued training): the new run starts at step 0 from the
    checkpoint's weights (same validation loss), with a fresh optimizer and schedule."""
    short = [*LLM, "trainer.max_steps=2", "trainer.eval_every=2"]
    a = train(tmp_path / "a", *short)
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    b = train(tmp_path / "b", *short, "trainer.max_steps=1", f"trainer.init_from={ckpt}")
    rb = records(tmp_path / "b")
    assert b["final_step"] == 1 and rb[0]["val_loss"] == a["val_loss"]  # the same weights
    assert rb[1]["lr"] == records(tmp_path / "a")[1]["lr"]  # the schedule starts over
    with pytest.raises(ValueError, match="written by another model"):
        train(tmp_path / "d", *short, "model.d_model=64", f"trainer.init_from={ckpt}")


@contextlib.contextmanager
def _parallelized(tmp_path, overrides):
    """(model, parallelize's module) of GPT2 on the CPU in a one-rank gloo group
    (``DistInfo(world_size=2)``: ``enabled`` is what makes parallelize wrap the model)."""
    import torch.distributed as dist

    rc = config_lib.load(compose_cfg(["trainer.device=cpu", *GPT2, *overrides]))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = build_model(rc.model, ops.build(rc.attn.name, **rc.attn.options), rc.pos)
        yield model, par.parallelize(model, rc.trainer, DistInfo(world_size=2), say=print)
    finally:
        dist.destroy_process_group()


def test_ddp_takes_the_bucket_size(tmp_path):
    """trainer.ddp_bucket_mb reaches DDP, and a size that is not positive is refused."""
    with _parallelized(tmp_path, ["trainer.ddp_bucket_mb=4"]) as (model, ddp):
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.module is model
        assert ddp.bucket_bytes_cap == 4 * 1024 * 1024
    with pytest.raises(ValueError, match="trainer.ddp_bucket_mb=0"):
        config_lib.validate(config_lib.load(compose_cfg(["trainer.ddp_bucket_mb=0"])))


@pytest.mark.parametrize("split", [False, True])
def test_ddp_split_graphs_sets_dynamos_ddp_optimizer(tmp_path, split):
    """trainer.ddp_split_graphs decides whether Dynamo cuts a compiled model under DDP at the
    buckets (``torch._dynamo.config.optimize_ddp``, read when it compiles, inside DDP)."""
    import torch._dynamo

    before = torch._dynamo.config.optimize_ddp
    torch._dynamo.config.optimize_ddp = not split
    try:
        with _parallelized(tmp_path, ["trainer.compile=true", f"trainer.ddp_split_graphs={split}"]):
            assert torch._dynamo.config.optimize_ddp is split
    finally:
        torch._dynamo.config.optimize_ddp = before


def test_flat_all_reduce_on_two_processes_trains_like_one_process_and_like_ddp(tmp_path):
    """trainer.ddp_flat=true (no DDP wrapper: one all-reduce of a flat gradient buffer after
    the step's backward) on two gloo processes follows the one-process run (two micro-batches
    a step there, one on each rank here), as DDP does; and it refuses parallel=fsdp."""
    common = ["trainer.device=cpu", "trainer.max_steps=4", "trainer.eval_every=4",
              "trainer.log_every=1", "trainer.ckpt_every=1000"]  # fmt: skip
    one, ddp, flat = tmp_path / "one", tmp_path / "ddp", tmp_path / "flat"
    train(one, *common)
    run_two_processes(train, [(ddp, common), (flat, [*common, "trainer.ddp_flat=true"])],
                      TIMEOUT_S)  # fmt: skip
    r1, rd, rf = records(one), records(ddp), records(flat)
    assert sorted(rf) == sorted(r1) and "val_loss" in rf[4]
    assert_same_run(r1, rd, sorted(r1))
    assert_same_run(r1, rf, sorted(r1))
    with pytest.raises(ValueError, match="trainer.ddp_flat=true replaces DDP"):
        config_lib.validate(config_lib.load(compose_cfg(["trainer.ddp_flat=true", *FSDP])))
