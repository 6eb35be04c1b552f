"""trainer.step_graph: the whole optimizer step as one CUDA graph (trainer/step_graph.py)."""

import contextlib
import json

import pytest
import torch

from trainer import config as config_lib
from trainer.step_graph import check

from .helpers import DIGITS, assert_same_training, compose_cfg, digits_metrics


def test_check_names_every_reason_it_cannot_run():
    rc = config_lib.load(compose_cfg([*DIGITS, "trainer.compile=true",
                                      "trainer.compile_mode=reduce-overhead"]))  # fmt: skip
    with pytest.raises(ValueError) as err:
        check(rc, world_size=2, device=torch.device("cpu"))
    msg = str(err.value)
    assert msg.startswith("trainer.step_graph=true: ")
    for part in ("needs a CUDA device", "one process (got 2",
                 "compile_mode=reduce-overhead makes CUDA graphs"):  # fmt: skip
        assert part in msg, msg
    rc = config_lib.load(compose_cfg(DIGITS))
    check(rc, world_size=1, device=torch.device("cuda", 0))  # (no device is touched)


def test_the_trainer_refuses_it_on_the_cpu(tmp_path):
    from trainer import run

    cfg = compose_cfg([*DIGITS, "trainer.device=cpu", "trainer.step_graph=true",
                       f"trainer.run_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(ValueError, match="step_graph=true: it needs a CUDA device"):
        run(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("accum", [1, 3])
def test_graph_step_trains_as_the_eager_step(tmp_path, accum):
    """Same losses, gradient norms and accuracies, step by step, as the eager step (bf16,
    AGC, EMA, mixup): the warm-up before the capture leaves no trace; with accumulation the
    micro-step graph adds into the gradients that the update graph reads and zeroes."""
    got = [digits_metrics(tmp_path / f"graph_{graph}", f"trainer.step_graph={graph}",
                          f"trainer.global_batch={32 * accum}")
           for graph in (False, True)]  # fmt: skip
    assert_same_training(*got)


@pytest.mark.gpu
def test_compiled_gpt2_graph_step_trains_as_the_eager_step(tmp_path):
    """GPT-2 compiled (Triton RoPE, fused linear + cross-entropy) with the whole step as one
    CUDA graph: the same losses and gradient norms, step by step, as the eager loop
    (scripts/bench_train.py times it as ``--pos rope+graph``)."""
    from trainer import run

    from .helpers import TINY

    got = {}
    for graph in (False, True):
        d = tmp_path / f"graph_{graph}"
        run(compose_cfg([*TINY, "pos=rope", "trainer.device=cuda", "trainer.compile=true",
                         f"trainer.step_graph={graph}", "trainer.global_batch_tokens=128",
                         "trainer.max_steps=10", "trainer.log_every=1", "trainer.eval_every=10",
                         f"trainer.run_dir={d}"]))  # fmt: skip
        got[graph] = [json.loads(line) for line in open(d / "metrics.jsonl")]
    eager, graph = got[False], got[True]
    assert [r["step"] for r in eager] == [r["step"] for r in graph]
    for a, b in zip(eager, graph):
        for key in ("loss", "grad_norm", "lr", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-5), (a["step"], key)


def test_the_warm_up_before_the_capture_is_undone():
    """The capture's warm-up steps change weights, BatchNorm statistics, the optimizer's state
    and the RNG; after the undo, a step gives what the first step of an untouched copy gives
    (CPU: the undo itself, without the capture)."""
    from types import SimpleNamespace

    from trainer.step_graph import StepGraph

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                    torch.nn.Flatten(), torch.nn.Dropout(0.5),
                                    torch.nn.Linear(4 * 4 * 4, 5))  # fmt: skip
        task = SimpleNamespace(model=model,
                               loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        g = StepGraph(task, model, opt, clip=lambda: torch.zeros(()),
                      autocast=contextlib.nullcontext, device="cpu")  # fmt: skip
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        return model, opt, g

    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 3, 6, 6, generator=gen), torch.randint(0, 5, (6,), generator=gen))
    (a, opt_a, ga), (b, opt_b, gb) = make(), make()
    ga.inputs = gb.inputs = batch
    torch.manual_seed(7)
    saved = gb._snapshot()
    for _ in range(2):
        gb._body()
    assert not torch.equal(a[0].weight, b[0].weight) and opt_b.state  # the warm-up changed them
    gb._restore(saved)
    loss_b, _ = gb._body()
    torch.manual_seed(7)  # the state the snapshot held
    loss_a, _ = ga._body()
    assert torch.equal(loss_a, loss_b)  # same dropout mask: the RNG was put back
    for x, y in zip((*a.parameters(), *a.buffers()), (*b.parameters(), *b.buffers())):
        assert torch.equal(x, y)
    for pa, pb in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_accumulated_steps_train_as_the_loop_does():
    """StepGraph's micro-step / update split (capture=False: the same work, eagerly, on the
    CPU) against the loop's own step over the same micro-batches: same mean losses, norms
    and weights after each of three steps of three micro-batches."""
    import copy
    from types import SimpleNamespace

    from trainer import loop
    from trainer.step_graph import StepGraph

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen))
               for _ in range(9)]  # fmt: skip

    def loss(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    def make():
        m = copy.deepcopy(model)
        feed = iter(batches)
        task = SimpleNamespace(model=m, loss=loss, next_batch=lambda: next(feed))
        return m, task, torch.optim.AdamW(m.parameters(), lr=0.05)

    rc = config_lib.load(
        compose_cfg(
            [
                *DIGITS,
                "optim.clip_mode=norm",
                "optim.grad_clip=1.0",
                "optim.schedule_unit=step",
                "optim.warmup_steps=2",
            ]
        )
    )
    info = SimpleNamespace(device=torch.device("cpu"))
    a, task_a, opt_a = make()
    b, task_b, opt_b = make()
    g = StepGraph(task_b, b, opt_b, clip=lambda: loop.clip_gradients(b, rc.optim),
                  autocast=contextlib.nullcontext, device="cpu", accum=3, capture=False)  # fmt: skip
    for step in range(3):
        loss_a, norm_a, lr = loop._train_step(task_a, a, opt_a, 3, contextlib.nullcontext, info,
                                              rc, step, 10)  # fmt: skip
        assert lr > 0
        loss_b, norm_b = g(task_b.next_batch, lr)
        assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6), step
        assert norm_b.item() == pytest.approx(norm_a.item(), rel=1e-5), step
        for x, y in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)
        assert all(float(p.grad.abs().max()) == 0 for p in b.parameters())  # zeroed for the next
    with pytest.raises(ValueError, match="accum must be >= 1"):
        StepGraph(task_b, b, opt_b, clip=None, autocast=None, device="cpu", accum=0)
