"""Pixel stores (data.kind=pixels, data/pixel_store.py): what scripts/shrink_image_folder.py
--format pixels writes, reading it back by image and by batch, resuming an interrupted write,
errors on bad stores, and training from a store as from the folder it was made from. CPU
only, tiny images (the CUDA copy is the GPU test at the end)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data import ImageDataConfig, build_gpu_pipeline, build_image_loaders
from data.gpu_augment import Decoded
from data.image_sets import ImageFolderDataset, make_image_folder
from data.pixel_store import PixelBatch, PixelStoreDataset, PixelStoreWriter, index_path
from data.resize_kernel import resize_batch
from scripts import shrink_image_folder as shrink

S = 16  # training crop size of the pipeline tests


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A class folder with images of several sizes and modes: larger and smaller than the
    stored short side (20), greyscale and RGBA among them."""
    root = tmp_path_factory.mktemp("pixels_src")
    make_image_folder(root, num_classes=3, train_per_class=4, val_per_class=2, size=24)
    rng = np.random.default_rng(3)
    extra = [("L", (30, 41), "jpg"), ("RGBA", (17, 26), "png"), ("RGB", (52, 23), "png")]
    for k, (mode, (w, h), ext) in enumerate(extra):
        arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8).squeeze()
        Image.fromarray(arr, mode).save(root / "train" / f"class_0{k}" / f"x{k}.{ext}")
    return root


def _store(src, dst, *extra) -> int:
    return shrink.main([str(src), str(dst), "--short-side", "20", "--format", "pixels",
                        "--workers", "1", "--no-progress", *extra])  # fmt: skip


def test_store_holds_each_image_resized_in_rgb(source, tmp_path):
    assert _store(source, tmp_path / "dst") == 0
    store = PixelStoreDataset(tmp_path / "dst" / "train.pixels")
    folder = ImageFolderDataset(source / "train")
    assert store.classes == folder.classes and store.labels.tolist() == folder.labels.tolist()
    assert len(store) == 15 and (tmp_path / "dst" / "val" / "class_00").is_dir()
    for i in range(len(folder)):
        img = folder.image(i)  # RGB, as the folder reader converts it
        if min(img.size) > 20:
            img = img.resize(shrink.target_size(*img.size, 20), Image.BICUBIC)
        want = np.asarray(img).transpose(2, 0, 1)
        assert np.array_equal(store.pixels(i), want), folder.path(i)
        assert np.array_equal(np.asarray(store.image(i)), np.asarray(img))
        assert store.files[i] == folder.files[i]
    # the resized ones took the short side 20, the small ones stayed as they were
    assert sorted(set(store.hw.min(1).tolist())) == [17, 20]
    # batches of pixels: one buffer, each image at an aligned offset, read by threads
    store.use_encoded()
    store.read_threads = 3
    order = [14, 2, 9, 0, 13]
    batch = store.__getitems__(order)
    assert isinstance(batch, PixelBatch) and batch.labels.tolist() == store.labels[order].tolist()
    assert ((batch.ptrs - batch.pixels.data_ptr()) % 256 == 0).all()
    for k, i in enumerate(order):
        assert torch.equal(batch[k], torch.from_numpy(store.pixels(i)))


def test_interrupted_store_continues_to_the_same_bytes(source, tmp_path, monkeypatch):
    assert _store(source, tmp_path / "whole", "--splits", "train") == 0
    real, calls = shrink._pixels_chunk, []

    def dies_on_every_second_chunk(job):
        calls.append(1)
        if len(calls) % 2 == 0:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(shrink, "_CHUNK", 4)
    monkeypatch.setattr(shrink, "_pixels_chunk", dies_on_every_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        _store(source, tmp_path / "cut")
    pixels = tmp_path / "cut" / "train.pixels"
    part = pixels.with_name("train.pixels.part")
    assert not index_path(pixels).is_file() and part.stat().st_size == 4 * 32  # 4 records
    with open(pixels, "ab") as f:  # pixels of an image whose record never came
        f.write(b"\x07" * 100_000)  # (more than the images still to come)
    with open(part, "ab") as f:  # and a record torn halfway
        f.write(b"\x01" * 13)
    assert _store(source, tmp_path / "cut", "--short-side", "18") == 2  # other settings
    assert _store(source, tmp_path / "v", "--splits", "train,val") == 2  # val stays folders
    with pytest.raises(KeyboardInterrupt):  # continued, and cut again
        _store(source, tmp_path / "cut")
    assert part.stat().st_size == 8 * 32
    monkeypatch.setattr(shrink, "_pixels_chunk", real)
    assert _store(source, tmp_path / "cut") == 0
    assert pixels.read_bytes() == (tmp_path / "whole" / "train.pixels").read_bytes()
    a, b = np.load(index_path(pixels)), np.load(tmp_path / "whole" / "train.pixels.npz")
    assert all(np.array_equal(a[k], b[k]) for k in b.files) and not part.exists()
    assert _store(source, tmp_path / "cut") == 0  # done: nothing to write


def test_writer_rejects_what_is_not_planar_rgb(tmp_path):
    w = PixelStoreWriter(tmp_path / "t.pixels")
    with pytest.raises(ValueError, match=r"uint8 \(3, H, W\)"):
        w.append(0, np.zeros((4, 5, 3), dtype=np.uint8), 0)
    w.close()


def test_bad_stores_say_what_is_expected(source, tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a pixel store"):
        PixelStoreDataset(tmp_path / "none.pixels")
    with pytest.raises(ValueError, match="data.root: required for kind='pixels'"):
        build_image_loaders(ImageDataConfig(kind="pixels"), 2)
    assert _store(source, tmp_path / "dst") == 0
    with pytest.raises(FileNotFoundError, match="no validation folder"):
        build_image_loaders(ImageDataConfig(kind="pixels", root=str(tmp_path / "dst"),
                                            val=str(tmp_path / "nowhere")), 2)  # fmt: skip
    pixels = tmp_path / "dst" / "train.pixels"
    with open(pixels, "r+b") as f:
        f.truncate(pixels.stat().st_size - 1)
    with pytest.raises(ValueError, match="truncated or from another store"):
        PixelStoreDataset(pixels)
    with pytest.raises(ValueError, match="cpu_decode_share > 0 has nothing to decode"):
        build_image_loaders(ImageDataConfig(kind="pixels", root=str(tmp_path / "dst"),
                                            decode="gpu", cpu_decode_share=0.5), 2)  # fmt: skip
    with pytest.raises(ValueError, match="read_threads must be >= 1"):
        build_image_loaders(ImageDataConfig(kind="pixels", read_threads=0), 2)


def test_batch_on_one_buffer_gives_the_pipeline_the_same_images(source, tmp_path):
    """A PixelBatch as the device reads it (one buffer through ``PackedImages``, the resize
    kernel under the interpreter) gives the same resized batch and the same train and eval
    batches as the list of its images."""
    assert _store(source, tmp_path / "dst") == 0
    cfg = ImageDataConfig(kind="pixels", root=str(tmp_path / "dst"), decode="gpu", img_size=S,
                          num_workers=2, read_threads=2)  # fmt: skip
    train, *_ = build_image_loaders(cfg, 5, seed=1)
    assert train.num_workers == 0  # the reading threads replace the workers
    batch, labels = next(iter(train))
    assert isinstance(batch, PixelBatch) and torch.equal(labels, batch.labels)
    imgs = [im.clone() for im in batch]
    packed = batch.packed(batch.pixels)
    n = len(imgs)
    boxes = [(0, 0, *im.shape[1:]) for im in imgs]
    args = (boxes, [(S, S)] * n, [(0, 0)] * n, [k % 2 == 0 for k in range(n)], S)
    assert torch.equal(resize_batch(packed, *args), resize_batch(imgs, *args))
    pipe = build_gpu_pipeline(cfg, seed=5)
    pipe.batched_resize = True
    for index in (0, None):
        pipe.batches = 0
        ref = pipe.augment(Decoded(imgs, index))
        pipe.batches = 0
        assert torch.equal(pipe.augment(Decoded(batch.packed(batch.pixels), index)), ref)


_TRAIN = ["experiment=efficientvit_m0_digits", "logger=none", "trainer.progress=false",
          "data=imagenet", "data.img_size=32", "data.decode=gpu", "data.num_workers=0",
          "model.num_classes=3", "trainer.max_steps=4", "trainer.eval_every=4",
          "trainer.ckpt_every=100", "trainer.epochs=null", "optim.schedule_unit=step",
          "optim.warmup_steps=1"]  # fmt: skip


def _train(run_dir, *overrides):
    from trainer import run as run_training

    from .helpers import compose_cfg

    return run_training(compose_cfg([*_TRAIN, f"trainer.run_dir={run_dir}", *overrides]))


def _png_store(tmp_path):
    """A class folder of lossless 24x24 images and its pixel store (the same pixels)."""
    src = make_image_folder(tmp_path / "src", num_classes=3, train_per_class=4, val_per_class=2,
                            size=24, ext="png")  # fmt: skip
    assert shrink.main([str(src), str(tmp_path / "px"), "--short-side", "24", "--format",
                        "pixels", "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    return src, tmp_path / "px"


def test_training_from_a_store_equals_training_from_its_folder(tmp_path):
    """Lossless images no larger than the stored short side: the store holds the folder's
    pixels, so data.kind=pixels trains on the same batches as data.kind=folder (data.decode=gpu
    on the CPU), stopped and resumed included."""
    src, store = _png_store(tmp_path)

    def run(name, *extra):
        return _train(tmp_path / name, "trainer.micro_batch=4", *extra)

    a = run("folder", f"data.root={src}")
    px = ["data.kind=pixels", f"data.root={store}", "data.read_threads=2"]
    run("pixels", *px, "trainer.stop_at=2")
    b = run("pixels", *px)
    assert b["finished"] and b["images_seen"] == 16
    assert (b["val_loss"], b["ema_val_loss"]) == (a["val_loss"], a["ema_val_loss"])
    c = run("cpu", *px, "data.decode=cpu", "data.num_workers=1")  # workers read single images
    assert c["finished"] and np.isfinite(c["val_loss"])


def test_two_processes_train_from_a_store_and_resume_alike(tmp_path):
    """DDP (two gloo processes): each rank reads its share of every batch from the store
    (repeated augmentation's sampler); a run stopped at step 2 and resumed ends as the
    uninterrupted one."""
    import json

    from .helpers import run_two_processes

    _, store = _png_store(tmp_path)
    common = ["data.kind=pixels", f"data.root={store}", "trainer.device=cpu",
              "trainer.micro_batch=2", "trainer.global_batch=4"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    run_two_processes(_train, [(a, common), (b, [*common, "trainer.stop_at=2"]), (b, common)], 300)

    def last(run_dir):
        return [json.loads(line) for line in open(run_dir / "metrics.jsonl")][-1]

    ra, rb = last(a), last(b)
    assert ra["step"] == rb["step"] == 4
    assert (ra["val_loss"], ra["ema_val_loss"]) == (rb["val_loss"], rb["ema_val_loss"])


def test_read_benchmark_prints_a_row_a_thread_count(source, tmp_path, capsys):
    import json

    from scripts import bench_pixel_store

    assert _store(source, tmp_path / "dst") == 0
    out = tmp_path / "bench.json"
    args = [str(tmp_path / "dst" / "train.pixels"), "--threads", "1,3", "--batch", "4",
            "--batches", "2", "--cold", "--out", str(out)]  # fmt: skip
    assert bench_pixel_store.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["threads"] for r in rows] == [1, 3] and all(r["images_per_s"] > 0 for r in rows)
    assert "read from the drive" in capsys.readouterr().out
    assert bench_pixel_store.main([str(tmp_path / "none.pixels")]) == 2


@pytest.mark.gpu
def test_cuda_batch_is_one_copy_of_the_pinned_pixels(source, tmp_path):
    assert _store(source, tmp_path / "dst") == 0
    cfg = ImageDataConfig(kind="pixels", root=str(tmp_path / "dst"), decode="gpu", img_size=S)
    train, *_ = build_image_loaders(cfg, 6, seed=0)
    batch, _ = next(iter(train))
    assert batch.pixels.is_pinned()
    pipe = build_gpu_pipeline(cfg, seed=2)
    got = pipe(batch, "cuda", train=True)
    pipe.batches = 0
    ref = pipe(batch, "cpu", train=True)
    assert got.is_cuda and (got.cpu().float() - ref.float()).abs().mean() < 1.0
    images = pipe.decode(batch, "cuda", train=True).images
    assert all(torch.equal(a.cpu(), b) for a, b in zip(images, batch))
