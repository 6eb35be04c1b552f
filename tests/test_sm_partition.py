"""trainer.step_sms: the loop on a CUDA green context of N SMs (trainer/sm_partition.py)."""

import pytest
import torch

from trainer import sm_partition

from .helpers import DIGITS, assert_same_training, compose_cfg, digits_metrics


@pytest.mark.parametrize("bad", [0, -3, -0.5, True, 2.5, "8", float("nan"), float("inf")])
def test_check_refuses_what_is_not_a_number_or_fraction_of_sms(bad):
    with pytest.raises(
        ValueError,
        match=r"trainer.step_sms=.*: use null \(all SMs\), a number "
        r"of SMs, or a fraction of them in \(0, 1\)",
    ):
        sm_partition.check(bad, torch.device("cuda", 0))


@pytest.mark.parametrize(("step_sms", "total", "n"), [
    (120, 132, 120), (120.0, 132, 120), (1, 132, 1),  # a count (the config's float field: 120.0)
    (0.8, 132, 106), (0.8, 114, 91), (0.5, 132, 66), (0.001, 132, 1),  # a fraction, rounded
])  # fmt: skip
def test_sm_count_takes_a_count_or_a_fraction(step_sms, total, n):
    assert sm_partition.sm_count(step_sms, total) == n


@pytest.mark.parametrize(("step_sms", "n"), [(132, 132), (200, 200), (0.999, 132)])
def test_sm_count_leaves_some_sms_to_the_rest(step_sms, n):
    with pytest.raises(
        ValueError,
        match=rf"trainer.step_sms=.*: {n} SMs, use 1 .. 131 "
        r"\(this GPU has 132\)",
    ):
        sm_partition.sm_count(step_sms, 132)


def test_check_needs_cuda_and_passes_null():
    sm_partition.check(None, torch.device("cpu"))
    sm_partition.check(100, torch.device("cuda", 0))  # (no device is touched)
    with pytest.raises(ValueError, match="it needs a CUDA device .*resolved to cpu"):
        sm_partition.check(100, torch.device("cpu"))


def test_null_leaves_the_stream_as_it_is():
    with sm_partition.on_sms(None, torch.device("cpu")) as stream:
        assert stream is None


def test_the_trainer_refuses_it_on_the_cpu_before_building(tmp_path):
    from trainer import run

    cfg = compose_cfg([*DIGITS, "trainer.device=cpu", "trainer.step_sms=64",
                       f"trainer.run_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(ValueError, match="trainer.step_sms=64: it needs a CUDA device"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_the_config_takes_a_fraction_and_refuses_text(tmp_path):
    from trainer import config as config_lib

    base = [*DIGITS, "trainer.device=cpu", f"trainer.run_dir={tmp_path}"]
    assert config_lib.load(compose_cfg([*base, "trainer.step_sms=0.8"])).trainer.step_sms == 0.8
    with pytest.raises(ValueError, match="bad config in 'trainer' at trainer.step_sms"):
        config_lib.load(compose_cfg([*base, "trainer.step_sms=half"]))


@pytest.mark.gpu
def test_green_stream_limits_a_kernel_to_its_sms():
    """A kernel that keeps every SM's issue slots busy (4 blocks of 32 warps per SM, a chain
    of dependent FMAs in each thread) takes time in proportion to the work over the SMs: on a
    green context of a quarter of them (rounded up to the architecture's granule) about 3-4
    times as long as on all."""
    import triton
    import triton.language as tl

    @triton.jit
    def _spin(out, n_iter):
        acc = tl.program_id(0).to(tl.float32)
        for _ in range(n_iter):
            acc = acc * 0.999 + 1.0
        tl.store(out + tl.program_id(0), acc)

    dev = torch.device("cuda", torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    out = torch.empty(4 * sms, device=dev)

    def ms(stream):
        with torch.cuda.stream(stream):
            _spin[(4 * sms,)](out, 20_000, num_warps=32)  # compile, warm
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _spin[(4 * sms,)](out, 20_000, num_warps=32)
            end.record()
        end.synchronize()
        return start.elapsed_time(end)

    ctx, green = sm_partition.green_stream(sms // 4, dev)
    full, part = ms(torch.cuda.Stream(dev)), ms(green)
    assert 2.5 < part / full < 6, (full, part)
    del ctx


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_training_on_part_of_the_sms_trains_as_on_all(tmp_path, graph):
    """On half the SMs (``trainer.step_sms=0.5``) the same losses, gradient norms and validation
    as on all SMs, step by step, eager and with the step captured as CUDA graphs (captured on
    the green context's stream)."""
    got = [digits_metrics(tmp_path / f"sms_{part}", f"trainer.step_graph={graph}",
                          f"trainer.step_sms={part}")
           for part in ("null", 0.5)]  # fmt: skip
    assert_same_training(*got)


def test_idle_note_says_where_the_freed_sms_go_unused():
    assert sm_partition.idle_note(None, decode_gpu=False, pipeline_here=False) is None
    assert sm_partition.idle_note(0.8, decode_gpu=True, pipeline_here=True) is None
    child = sm_partition.idle_note(0.8, decode_gpu=True, pipeline_here=False)
    assert child.startswith("trainer.step_sms=0.8: ") and "child process" in child
    assert "data.decode_process=false" in child
    none = sm_partition.idle_note(104.0, decode_gpu=False, pipeline_here=False)
    assert none.startswith("trainer.step_sms=104: ") and "no GPU image pipeline" in none
    pixels = sm_partition.idle_note(0.8, decode_gpu=True, pipeline_here=True, pixels=True)
    assert "data.kind=pixels nothing is decoded" in pixels and "null" in pixels
    assert sm_partition.idle_note(None, decode_gpu=True, pipeline_here=True, pixels=True) is None
