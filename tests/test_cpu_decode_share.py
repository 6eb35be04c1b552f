"""data.cpu_decode_share: the loader's workers decode and crop part of each data.decode=gpu
training batch with PIL. CPU only (torchvision's CPU decoder stands in for nvJPEG), tiny
images."""

from __future__ import annotations

import io
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from data import ImageDataConfig, build_gpu_pipeline, build_image_loaders, make_image_folder
from data.gpu_augment import CROP_TRIES, crop_params
from data.images import EncodedImages, crop_decode_pil
from trainer.tasks import _Epochs

S = 16
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("share_folder"), num_classes=3,
                             train_per_class=4, val_per_class=2, size=24)  # fmt: skip


def _cfg(root, **kw) -> ImageDataConfig:
    kw = {"num_workers": 0, "decode": "gpu", "auto_augment": "rand-m9-mstd0.5-inc1", **kw}
    return ImageDataConfig(kind="folder", root=str(root), img_size=S, **kw)


def _batches(cfg, n: int, state: dict | None = None, seed: int = 7):
    """n augmented training batches (uint8) and their labels, as the trainer draws them."""
    train, *_ = build_image_loaders(cfg, 4, seed=0)
    pipe = build_gpu_pipeline(cfg, seed=seed)
    epochs = _Epochs(train, augment=pipe)
    if state is not None:
        epochs.load_state_dict(state)
    out = []
    for _ in range(n):
        data, labels = epochs.next_batch()
        out.append((pipe(data, "cpu", train=True), labels))
    return out, epochs.state_dict()


def test_crop_decode_pil_is_timms_random_resized_crop():
    """The workers' crop equals torchvision's resized_crop on PIL (what timm's
    RandomResizedCropAndInterpolation runs) with the box crop_params draws: bit for bit."""
    rng = np.random.default_rng(0)
    raws = []
    for h, w in ((37, 29), (20, 50), (64, 64)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
        raws.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    grey = io.BytesIO()  # a grey PNG comes out RGB
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L").save(grey, "PNG")
    raws.append(torch.frombuffer(bytearray(grey.getvalue()), dtype=torch.uint8))
    out = crop_decode_pil(raws, np.random.default_rng(5), S)
    assert out.shape == (4, S, S, 3) and out.dtype == torch.uint8
    u = np.random.default_rng(5).random((4, 2 * CROP_TRIES + 2))
    hw = np.array([Image.open(io.BytesIO(r.numpy().tobytes())).size[::-1] for r in raws])
    top, left, ch, cw = crop_params(hw[:, 0], hw[:, 1], u)
    for i, raw in enumerate(raws):
        img = Image.open(io.BytesIO(raw.numpy().tobytes())).convert("RGB")
        ref = TF.resized_crop(img, int(top[i]), int(left[i]), int(ch[i]), int(cw[i]), [S, S],
                              TF.InterpolationMode.BICUBIC)  # fmt: skip
        assert np.array_equal(out[i].numpy(), np.asarray(ref)), i


def test_share_leaves_the_other_images_and_labels_alone(folder):
    """The images the device decodes keep their draws whatever the share: the first half of
    each batch equals the batch without a share, bit for bit; the labels keep their order."""
    plain, _ = _batches(_cfg(folder), 3)
    half, _ = _batches(_cfg(folder, cpu_decode_share=0.5), 3)
    for (a, la), (b, lb) in zip(plain, half):
        assert b.shape == a.shape == (4, 3, S, S) and b.dtype == torch.uint8
        assert torch.equal(la, lb)
        assert torch.equal(a[:2], b[:2])
    # the worker-cropped halves are other crops of the same images, not a copy of the first
    assert any(not torch.equal(a[2:], b[2:]) for (a, _), (b, _) in zip(plain, half))
    every, _ = _batches(_cfg(folder, cpu_decode_share=1.0), 1)  # nothing left to nvJPEG
    assert every[0][0].shape == (4, 3, S, S) and torch.equal(every[0][1], plain[0][1])


def test_share_is_the_same_whatever_the_workers_and_resumes(folder):
    """The workers' crops are seeded by (seed, rank, epoch, batch), which the trainer's batch
    sampler hands them: two worker processes give the batches of none, and a run resumed at
    batch 2 of 3 (an epoch is 3 batches of 4) continues them, into the next epoch too."""
    cfg = _cfg(folder, cpu_decode_share=0.5)
    ref, _ = _batches(cfg, 5)
    workers, _ = _batches(replace(cfg, num_workers=2), 5)
    for (a, la), (b, lb) in zip(ref, workers):
        assert torch.equal(a, b) and torch.equal(la, lb)
    _, state = _batches(cfg, 2)
    assert state["epoch"] == 0 and state["batch"] == 2
    resumed, _ = _batches(cfg, 3, state=state)
    for (a, _), (b, _) in zip(ref[2:], resumed):
        assert torch.equal(a, b)
    assert not torch.equal(ref[0][0][2:], ref[3][0][2:])  # epochs draw anew


def test_unkeyed_loader_and_pickled_batches(folder):
    """A loader iterated on its own (no batch key) still crops, from the worker's seed; the
    crops travel with the encoded bytes through pickling; eval batches have none."""
    cfg = _cfg(folder, cpu_decode_share=0.25, num_workers=1)
    train, val, *_ = build_image_loaders(cfg, 4, seed=0)
    data, labels = next(iter(train))
    assert isinstance(data, EncodedImages) and len(data) == 3
    assert data.crops.shape == (1, S, S, 3) and len(labels) == 4
    back = pickle.loads(pickle.dumps(data))
    assert torch.equal(back.crops, data.crops) and back.sizes == data.sizes
    out = build_gpu_pipeline(cfg)(data, "cpu", train=True)
    assert out.shape == (4, 3, S, S)
    vdata, _ = next(iter(val))
    assert vdata.crops is None and len(vdata) == 4
    with pytest.raises(ValueError, match="training batches only"):
        build_gpu_pipeline(cfg)(data, "cpu", train=False)


def test_share_config_errors(folder):
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="data.cpu_decode_share must be in"):
            build_image_loaders(_cfg(folder, cpu_decode_share=bad), 2)
    with pytest.raises(ValueError, match="cpu_decode_share > 0 needs data.decode=gpu"):
        build_image_loaders(_cfg(folder, decode="cpu", cpu_decode_share=0.5), 2)


def test_worker_crops_take_their_places_flip(folder):
    """Without RandAugment the worker-cropped rows come out as the workers cropped them,
    mirrored where the pipeline's flip draw for their place says so: with the per-image resize
    and with the batched one (the CUDA default; Triton's interpreter here), which flips the
    device-decoded rows itself."""
    cfg = _cfg(folder, cpu_decode_share=0.5, auto_augment="")
    train, *_ = build_image_loaders(cfg, 4, seed=0)
    data, _ = next(iter(train))
    seen = set()
    for seed, batched in zip(range(12), [False, True] * 6):
        pipe = build_gpu_pipeline(cfg, seed=seed)
        pipe.batched_resize = batched
        out = pipe(data, "cpu", train=True)
        rng = np.random.default_rng([seed, 0, 0, 0x475055])  # batch 0's draws
        rng.random((4, 2 * CROP_TRIES + 2))
        flip = rng.random(4) < 0.5
        for row, crop in zip((2, 3), data.crops):
            want = crop.permute(2, 0, 1)
            want = want.flip(-1) if flip[row] else want
            assert torch.equal(out[row], want), (seed, row)
            seen.add((batched, bool(flip[row])))
    assert len(seen) == 4


def test_trainer_with_a_worker_share_resumes_exactly(tmp_path, folder):
    """The trainer end to end with data.cpu_decode_share (a worker process decoding half of
    each batch, batches decoded ahead by the background threads): stopped at step 2 and
    resumed, the run ends where an uninterrupted one does, and so does the pipeline in a child
    process."""
    from trainer import run as run_training

    from .helpers import compose_cfg

    common = ["experiment=efficientvit_m0_digits", "logger=none", "trainer.progress=false",
              "data=imagenet", f"data.root={folder}", "data.img_size=32", "data.decode=gpu",
              "data.cpu_decode_share=0.5", "data.num_workers=1", "data.repeated_aug=false",
              "model.num_classes=3", "trainer.micro_batch=4", "trainer.max_steps=4",
              "trainer.eval_every=4", "trainer.ckpt_every=100", "trainer.epochs=null",
              "optim.schedule_unit=step", "optim.warmup_steps=1"]  # fmt: skip

    def run(name, *extra):
        return run_training(compose_cfg([*common, f"trainer.run_dir={tmp_path / name}", *extra]))

    a = run("a")
    assert a["finished"] and a["images_seen"] == 16
    run("b", "trainer.stop_at=2")
    b = run("b")
    assert (b["val_loss"], b["ema_val_loss"]) == (a["val_loss"], a["ema_val_loss"])
    c = run("c", "data.decode_process=true")  # the pipeline in a child process: the same
    assert (c["val_loss"], c["ema_val_loss"]) == (a["val_loss"], a["ema_val_loss"])


@pytest.mark.gpu
def test_cuda_share_agrees_with_cpu(folder):
    """On CUDA (nvJPEG for the device's share, the batched resize, the fused RandAugment
    kernels) the worker-cropped rows start from the very crops the CPU run gets, so they differ
    from it only where the CUDA ops do; the device-decoded rows as in test_gpu_augment."""
    cfg = _cfg(folder, cpu_decode_share=0.5)
    train, *_ = build_image_loaders(cfg, 12, seed=0)
    data, _ = next(iter(train))
    outs = {dev: build_gpu_pipeline(cfg, seed=4)(data, dev, train=True) for dev in ("cpu", "cuda")}
    assert outs["cuda"].is_cuda and outs["cuda"].is_contiguous(memory_format=torch.channels_last)
    diff = (outs["cuda"].cpu().float() - outs["cpu"].float()).abs()
    assert diff[6:].mean() < 0.5, diff[6:].mean()  # the workers' crops
    assert diff[:6].mean() < 4.0, diff[:6].mean()  # decoded by nvJPEG
