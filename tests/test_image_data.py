"""Tests for data/images.py (image datasets, transforms, mixup, samplers, loaders) and
scripts/unpack_images.py. CPU only, offline, no files outside tmp_path."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from data import (  # noqa: E402
    BatchMixup,
    DevicePrep,
    DigitsDataset,
    HFImageDataset,
    ImageDataConfig,
    ImageFolderDataset,
    PackedImageDataset,
    RepeatAugSampler,
    ShardSampler,
    build_device_prep,
    build_image_datasets,
    build_image_loaders,
    build_transforms,
    load_hf_split,
    make_image_folder,
    open_packed,
    to_device,
    write_packed,
)
from scripts import unpack_images  # noqa: E402

LAYOUT_HINT = "<class_a>/"  # every layout error prints the expected tree


def folder_cfg(root, **kw) -> ImageDataConfig:
    kw.setdefault("img_size", 16)
    kw.setdefault("num_workers", 0)
    return ImageDataConfig(name="synthetic", kind="folder", root=str(root), **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(
        tmp_path_factory.mktemp("folder"),
        num_classes=3,
        train_per_class=4,
        val_per_class=2,
        size=16,
    )


def jpeg_bytes(seed: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


# --------------------------------------------------------------------------- folder


def test_folder_dataset_reads_generated_folder(folder):
    ds = ImageFolderDataset(folder / "train")
    assert ds.classes == ["class_00", "class_01", "class_02"]
    assert len(ds) == 12 and ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    img, label = ds[5]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (16, 16)
    assert label == 1 and ds.path(5).parent.name == "class_01"
    # stray non-image files and hidden folders are ignored
    (folder / "train" / "class_00" / "notes.txt").write_text("x")
    (folder / "train" / ".cache").mkdir(exist_ok=True)
    assert len(ImageFolderDataset(folder / "train")) == 12


def test_folder_names_are_one_byte_array_and_read_back_exactly(tmp_path):
    """File names live in one fixed-width byte array (no per-item objects for loader workers
    to copy); names with non-ASCII letters and of different lengths read back exactly."""
    names = {"zebra": ["é_1.jpg", "a.jpg"], "ñandú": ["longer_name_than_the_others.jpg"]}
    for cls, files in names.items():
        (tmp_path / cls).mkdir()
        for i, f in enumerate(files):
            (tmp_path / cls / f).write_bytes(jpeg_bytes(i))
    ds = ImageFolderDataset(tmp_path)
    assert isinstance(ds.files, np.ndarray) and ds.files.dtype.kind == "S"
    assert ds.classes == ["zebra", "ñandú"]
    got = [str(ds.path(i).relative_to(tmp_path)) for i in range(len(ds))]
    assert got == ["zebra/a.jpg", "zebra/é_1.jpg", "ñandú/longer_name_than_the_others.jpg"]
    assert all(ds.path(i).is_file() for i in range(len(ds)))
    assert ds.use_encoded() is None and bytes(ds[1][0].numpy()) == jpeg_bytes(0)


def test_folder_layout_errors_show_expected_layout(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        ImageFolderDataset(tmp_path / "nope")
    assert LAYOUT_HINT in str(err.value)

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "a.jpg")
    with pytest.raises(ValueError, match="no class sub-folders .1 image file") as err:
        ImageFolderDataset(flat)
    assert LAYOUT_HINT in str(err.value)

    empty_class = tmp_path / "empty_class"
    (empty_class / "cat").mkdir(parents=True)
    (empty_class / "dog").mkdir()
    Image.new("RGB", (4, 4)).save(empty_class / "cat" / "a.png")
    with pytest.raises(ValueError, match="hold no image files: dog") as err:
        ImageFolderDataset(empty_class)
    assert LAYOUT_HINT in str(err.value)

    with pytest.raises(FileNotFoundError, match="has no train/ folder") as err:
        build_image_datasets(folder_cfg(empty_class))
    assert LAYOUT_HINT in str(err.value)

    (empty_class / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="has no val/ folder") as err:
        build_image_datasets(folder_cfg(empty_class))
    assert LAYOUT_HINT in str(err.value)

    with pytest.raises(ValueError, match="data.root: required") as err:
        build_image_datasets(ImageDataConfig(kind="folder"))
    assert LAYOUT_HINT in str(err.value)


def test_folder_train_val_class_mismatch(tmp_path):
    root = make_image_folder(tmp_path / "mm", num_classes=3, train_per_class=1, val_per_class=1)
    (root / "val" / "class_02").rename(root / "val" / "zebra")
    with pytest.raises(ValueError, match="only in train: class_02; only in val: zebra") as err:
        build_image_datasets(folder_cfg(root))
    assert LAYOUT_HINT in str(err.value)


# --------------------------------------------------------------------------- packed


def test_packed_round_trip_through_unpack_script(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    classes = ["ant", "bee", "cat"]
    labels = [2, 0, 1, 1, 0, 2, 2]
    blobs = [jpeg_bytes(i, mode="L" if i == 3 else "RGB") for i in range(len(labels))]
    packed = write_packed(tmp_path / "toy_train.npz.xz", blobs, labels, classes)

    ds = PackedImageDataset(packed, progress=False)
    assert ds.classes == classes and ds.labels.tolist() == labels
    assert [ds.encoded(i) for i in range(len(ds))] == blobs
    img, label = ds[3]  # stored greyscale, read as RGB
    assert img.mode == "RGB" and img.size == (12, 10) and label == 1
    ref = np.asarray(Image.open(io.BytesIO(blobs[0])).convert("RGB"))
    assert np.array_equal(np.asarray(ds.image(0)), ref)
    cached = list((tmp_path / "cache" / "images").glob("toy_train-*/data.npy"))
    assert len(cached) == 1  # decompressed once into $ATTNLAB_CACHE/images
    mtime = cached[0].stat().st_mtime_ns
    again = PackedImageDataset(packed, progress=False)
    assert cached[0].stat().st_mtime_ns == mtime and again.labels.tolist() == labels

    # a pickled copy (what a spawn worker gets) reopens the memory map lazily
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    assert clone._data is None and clone.encoded(6) == blobs[6]

    out = tmp_path / "unpacked"
    assert unpack_images.main([str(packed), str(out), "--verify", "--no-progress"]) == 0
    folder = ImageFolderDataset(out)
    assert folder.classes == classes and len(folder) == len(labels)
    for i in range(len(folder)):
        index = int(folder.path(i).stem)
        assert folder.path(i).read_bytes() == blobs[index]
        assert folder.labels[i] == labels[index]
    # resumable: a second run skips the files already there
    assert unpack_images.unpack(packed, out, progress=False) == {"written": 0, "skipped": 7}


def test_packed_bad_files_are_explained(tmp_path, capsys):
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="(?s)does not exist.*offsets"):
        open_packed(tmp_path / "missing.npz.xz", cache)
    junk = tmp_path / "junk.npz.xz"
    junk.write_bytes(b"not xz at all")
    with pytest.raises(ValueError, match="not valid xz data"):
        open_packed(junk, cache, progress=False)

    no_classes = tmp_path / "no_classes.npz"
    np.savez(no_classes, data=np.zeros(3, np.uint8), offsets=np.array([0, 3]), labels=[0])
    with pytest.raises(ValueError, match=r"missing array\(s\) \['classes'\]"):
        open_packed(no_classes, cache, progress=False)

    bad_offsets = tmp_path / "bad_offsets.npz"
    np.savez(
        bad_offsets,
        data=np.zeros(5, np.uint8),
        offsets=np.array([0, 3, 4]),
        labels=np.array([0, 0], np.int16),
        classes=np.array(["a"]),
    )
    with pytest.raises(ValueError, match="offsets must rise strictly from 0 to len.data.=5"):
        open_packed(bad_offsets, cache, progress=False)

    bad_label = write_packed(tmp_path / "bad_label.npz", [jpeg_bytes(0)], [3], ["a", "b"])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\), found 3..3"):
        open_packed(bad_label, cache, progress=False)

    not_jpeg = write_packed(tmp_path / "not_jpeg.npz.xz", [b"GIF89a....."], [0], ["a"])
    args = [str(not_jpeg), str(tmp_path / "o"), "--no-progress", "--cache-dir", str(cache)]
    assert unpack_images.main(args) == 2
    assert "image 0 is neither JPEG nor PNG" in capsys.readouterr().err

    slashed = write_packed(tmp_path / "slashed.npz.xz", [jpeg_bytes(0)], [0], ["a/b"])
    assert unpack_images.main([str(slashed), str(tmp_path / "o2"), "--cache-dir", str(cache)]) == 2
    assert "unusable as folder names" in capsys.readouterr().err


# --------------------------------------------------------------------------- hf / digits


def test_hf_local_saved_dataset(tmp_path):
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "green"])}
    )

    def split(n: int, offset: int) -> datasets.Dataset:
        images = [Image.new("L", (9, 7), color=(i + offset) * 30) for i in range(n)]
        labels = [(i + offset) % 2 for i in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    root = tmp_path / "hf_dict"
    datasets.DatasetDict({"train": split(6, 0), "validation": split(3, 1)}).save_to_disk(root)
    train, val = build_image_datasets(
        ImageDataConfig(kind="hf", root=str(root), img_size=16, num_workers=0)
    )
    assert isinstance(train, HFImageDataset) and train.classes == ["red", "green"]
    assert train.labels.tolist() == [0, 1, 0, 1, 0, 1] and val.labels.tolist() == [1, 0, 1]
    x, y = val[1]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 0  # device_normalize
    raw = HFImageDataset(load_hf_split(str(root), "train"))
    assert raw.image(2).mode == "RGB" and raw.image(2).size == (9, 7)

    # single saved splits given as data.train / data.val paths
    split(4, 0).save_to_disk(tmp_path / "tr")
    split(2, 0).save_to_disk(tmp_path / "va")
    cfg = ImageDataConfig(kind="hf", train=str(tmp_path / "tr"), val=str(tmp_path / "va"))
    train, val = build_image_datasets(cfg)
    assert (len(train), len(val)) == (4, 2)

    with pytest.raises(ValueError, match="no split 'test'; splits present"):
        load_hf_split(str(root), "test")
    with pytest.raises(FileNotFoundError, match="no such saved-dataset directory"):
        load_hf_split(None, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        load_hf_split(str(tmp_path / "absent"), "train")
    with pytest.raises(ValueError, match=r"no column\(s\) \['img'\]"):
        build_image_datasets(ImageDataConfig(kind="hf", root=str(root), image_key="img"))


def test_digits_dataset_split_sizes_and_images():
    train, val = DigitsDataset("train", size=24), DigitsDataset("val", size=24)
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert not set(train.indices) & set(val.indices)
    for ds in (train, val):
        assert sorted(set(ds.labels.tolist())) == list(range(10)) and ds.classes[3] == "3"
    img = train.image(0)
    assert img.mode == "RGB" and img.size == (24, 24)
    pixels = np.asarray(img)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and pixels.max() > 100
    again = DigitsDataset("val", size=24)
    assert np.array_equal(again.indices, val.indices)  # deterministic split
    native = DigitsDataset("train", size=8)
    assert native.image(0).size == (8, 8)


# --------------------------------------------------------------------------- transforms, mixup


@pytest.mark.parametrize("on_device", [False, True])
def test_transforms_output_shape_dtype_and_upscaling(on_device):
    cfg = ImageDataConfig(img_size=32, device_normalize=on_device)
    train_tf, val_tf = build_transforms(cfg)
    prep = build_device_prep(cfg)
    assert (prep is not None) == on_device
    for size in ((8, 8), (64, 48)):  # smaller images are upscaled, larger cropped down
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), np.uint8))
        for tf in (train_tf, val_tf):
            x = tf(img)
            assert x.shape == (3, 32, 32)
            assert x.dtype == (torch.uint8 if on_device else torch.float32)
    # eval normalises with the ImageNet mean/std: a mean-coloured image becomes ~zero
    mean_img = Image.new("RGB", (40, 40), tuple(round(255 * m) for m in cfg.mean))
    x = val_tf(mean_img)
    if on_device:
        x = prep(x[None], train=False)[0]
    assert x.dtype == torch.float32 and x.abs().max() < 0.02
    names = " ".join(type(t).__name__ for t in train_tf.transforms)
    assert "RandomResizedCrop" in names and "RandAugment" in names
    assert ("RandomErasing" in names) != on_device  # erasing moves to DevicePrep


def test_device_prep_matches_worker_normalisation():
    """Same crop, flip and RandAugment draws: uint8 + DevicePrep equals timm's float path."""
    import random

    base = dict(img_size=24, re_prob=0.0)
    float_tf, float_val = build_transforms(ImageDataConfig(device_normalize=False, **base))
    cfg = ImageDataConfig(device_normalize=True, **base)
    u8_tf, u8_val = build_transforms(cfg)
    prep = build_device_prep(cfg)
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 30, 3), np.uint8))
    for seed in range(4):
        outs = []
        for tf in (float_tf, u8_tf):
            random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
            outs.append(tf(img))
        got = prep(outs[1][None], train=True)[0]
        assert torch.allclose(got, outs[0], atol=1e-5)
    assert torch.allclose(prep(u8_val(img)[None], train=False)[0], float_val(img), atol=1e-5)
    with pytest.raises(ValueError, match="expected uint8 images"):
        prep(torch.zeros(2, 3, 4, 4), train=False)


@pytest.mark.parametrize("masked", [False, True])  # True: the GPU's sync-free path
def test_device_random_erasing_rectangles(masked):
    """One rectangle per erased image, 2%-1/3 of the area, inside the image, filled with
    noise; the rest of the image and the other images untouched; about re_prob erased."""
    torch.manual_seed(0)
    prep = DevicePrep([0.5] * 3, [0.25] * 3, re_prob=0.5)
    images = torch.randint(0, 256, (400, 3, 20, 24), dtype=torch.uint8)
    clean = prep(images, train=False)
    assert torch.equal(prep(images, train=False), clean)  # eval: no erasing
    out = prep.erase(clean.contiguous(memory_format=torch.channels_last).clone(), masked)
    assert out.is_contiguous(memory_format=torch.channels_last)
    changed = (out != clean).any(1)  # (B, H, W)
    erased = changed.flatten(1).any(1)
    assert 0.4 < erased.float().mean() < 0.6
    for i in torch.nonzero(erased).flatten().tolist():
        ys, xs = torch.nonzero(changed[i], as_tuple=True)
        h, w = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
        # noise equal to the clean value is vanishingly rare: the changed set is the rectangle
        assert changed[i].sum() == h * w
        assert 0.02 * 480 - 24 <= h * w <= 480 / 3 + 24  # rounding of h and w


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_fused_device_prep_equals_the_torch_ops(fmt, device):
    """The one-launch normalisation and erasing (Triton, interpreted on the CPU; the CUDA
    default) gives the torch path's values bit for bit in both memory formats, and under the
    same torch seed the same erased rectangles, filled with N(0, 1) noise."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref, fused = (DevicePrep(mean, std, re_prob=0.5, fused=f) for f in (False, True))
    images = torch.randint(0, 256, (60, 3, 20, 24), dtype=torch.uint8)
    images = images.to(device).contiguous(memory_format=fmt)
    clean = ref(images, train=False)
    got = fused(images, train=False)
    assert torch.equal(got, clean) and got.is_contiguous(memory_format=fmt)
    torch.manual_seed(1)
    want = ref.erase(clean.clone(), masked=True)
    torch.manual_seed(1)
    got = fused(images, train=True)
    assert got.is_contiguous(memory_format=fmt)
    changed = (got != clean).any(1)
    assert torch.equal(changed, (want != clean).any(1))
    assert 0.2 < changed.flatten(1).any(1).float().mean() < 0.8
    noise = got.permute(0, 2, 3, 1)[changed]  # (pixels, 3)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    with pytest.raises(ValueError, match="uint8"):
        fused(images.float(), train=False)


def test_randaugment_posterize_at_full_strength():
    """rand-m9-mstd0.5 reaches level 10, where timm's posterize keeps 0 bits; newer Pillow
    rejects that, so our train transform patches the op to give the black image it meant."""
    train_tf, _ = build_transforms(ImageDataConfig(img_size=16))
    randaug = next(t for t in train_tf.transforms if hasattr(t, "ops"))
    op = next(op for op in randaug.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8))
    assert np.asarray(op(img)).max() == 0
    op.magnitude = 5  # 2 bits kept: Pillow's own posterize
    assert set(np.unique(np.asarray(op(img))).tolist()) <= {0, 64, 128, 192}


@pytest.mark.parametrize("batch", [8, 7, 1])
@pytest.mark.parametrize("alphas", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_targets_sum_to_one(batch, alphas):
    torch.manual_seed(0)
    np.random.seed(0)
    mix = BatchMixup(5, mixup_alpha=alphas[0], cutmix_alpha=alphas[1], label_smoothing=0.1)
    for _ in range(3):
        images = torch.randn(batch, 3, 8, 8).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 5, (batch,))
        out, targets = mix(images, labels)
        assert out.shape == (batch, 3, 8, 8) and targets.shape == (batch, 5)
        assert torch.allclose(targets.sum(1), torch.ones(batch))
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert targets.min() >= 0.1 / 5 - 1e-6  # smoothing keeps every class above zero
    if batch % 2:  # the odd one out keeps its image and a smoothed one-hot target
        expect = torch.full((5,), 0.02)
        expect[labels[-1]] = 0.92
        assert torch.allclose(targets[-1], expect)
    with pytest.raises(ValueError, match="expected images"):
        mix(torch.randn(batch, 8, 8), labels)


def test_mixup_disabled_keeps_images():
    mix = BatchMixup(3)
    mix.enabled = False
    images = torch.randn(4, 3, 4, 4)
    out, targets = mix(images.clone(), torch.tensor([0, 1, 2, 0]))
    assert torch.equal(out, images) and torch.allclose(
        targets.max(1).values, torch.tensor(0.9 + 0.1 / 3)
    )


# --------------------------------------------------------------------------- samplers


def test_shard_sampler_ranks_disjoint_and_epochs_reshuffle():
    n, world = 40, 2
    shards = [list(ShardSampler(n, r, world, seed=3)) for r in range(world)]
    assert all(len(s) == 20 for s in shards)
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(n))
    reference = torch.utils.data.DistributedSampler(range(n), num_replicas=2, rank=1, seed=3)
    assert shards[1] == list(reference)
    sampler = ShardSampler(n, 0, world, seed=3)
    sampler.set_epoch(1)
    other = ShardSampler(n, 1, world, seed=3)
    other.set_epoch(1)
    assert list(sampler) != shards[0] and sorted(list(sampler) + list(other)) == list(range(n))
    # uneven size: padded so every rank has the same count (same number of batches)
    assert {len(ShardSampler(41, r, 4)) for r in range(4)} == {11}
    # epoch_len beyond the dataset continues with the next permutation
    long = list(ShardSampler(10, 0, 1, epoch_len=25))
    assert len(long) == 25 and sorted(long[:10]) == list(range(10)) == sorted(long[10:20])
    # evaluation: every sample exactly once over all ranks, no padding
    evals = [list(ShardSampler(41, r, 4, shuffle=False, pad=False)) for r in range(4)]
    assert sorted(sum(evals, [])) == list(range(41))


def test_repeat_aug_sampler_semantics():
    from timm.data.distributed_sampler import RepeatAugSampler as TimmRepeatAug

    n, world, repeats = 300, 4, 3
    per_rank = []
    for r in range(world):
        ours = RepeatAugSampler(n, r, world, repeats)
        ours.set_epoch(2)
        theirs = TimmRepeatAug(range(n), num_replicas=world, rank=r, num_repeats=repeats)
        theirs.set_epoch(2)
        per_rank.append(list(ours))
        assert per_rank[-1] == list(theirs) and len(ours) == len(theirs) == 256 // world
    # the global order (interleaving the ranks) repeats every index 3 times in a row,
    # so a sample's copies sit on different ranks
    order = [per_rank[p % world][p // world] for p in range(world * len(per_rank[0]))]
    for start in range(0, len(order) - 2, repeats):
        assert order[start] == order[start + 1] == order[start + 2]
    for r in range(world):
        assert len(set(per_rank[r])) == len(per_rank[r])  # no sample twice on one rank
    assert len(RepeatAugSampler(100, 0, 2, epoch_len=30)) == 15


# --------------------------------------------------------------------------- loaders


def test_loader_yields_channels_last_batches(folder):
    cfg = folder_cfg(folder, mixup=0.0, cutmix=0.0)
    train, val, num_classes, mixup_fn = build_image_loaders(cfg, batch_size=5)
    assert num_classes == 3 and mixup_fn is None
    batches = list(train)
    assert len(batches) == 2  # 12 images, drop_last
    images, labels = batches[0]
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8  # device_normalize
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert labels.dtype == torch.int64
    with pytest.raises(ValueError, match="pass prep=build_device_prep"):
        to_device(batches[1], "cpu")
    images, labels = to_device(batches[1], "cpu", prep=build_device_prep(cfg), train=True)
    assert images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert sum(len(y) for _, y in val) == 6  # every val image once, last batch partial


def test_two_rank_loaders_read_disjoint_data_with_workers(folder):
    cfg = folder_cfg(folder, num_workers=1, repeated_aug=False, auto_augment=None)
    seen = []
    for rank in range(2):
        train, val, _, mixup_fn = build_image_loaders(cfg, 3, rank=rank, world=2, seed=1)
        train.sampler.set_epoch(4)
        seen.append(list(train.sampler))
        assert len(train) == 2 and isinstance(mixup_fn, BatchMixup)
        for images, _ in train:
            assert images.shape == (3, 3, 16, 16)
            assert images.is_contiguous(memory_format=torch.channels_last)
    assert not set(seen[0]) & set(seen[1]) and len(seen[0] + seen[1]) == 12
    train, *_ = build_image_loaders(folder_cfg(folder), 2, rank=1, world=2)
    assert isinstance(train.sampler, RepeatAugSampler)  # repeated_aug under DDP


def test_config_errors():
    with pytest.raises(ValueError, match="data.kind must be one of"):
        build_image_loaders(ImageDataConfig(kind="imagenet"), 4)
    with pytest.raises(ValueError, match="must be null for kind='digits'"):
        build_image_datasets(ImageDataConfig(root="/data"))
    with pytest.raises(ValueError, match="data.crop_pct"):
        build_image_datasets(ImageDataConfig(crop_pct=1.5))
    with pytest.raises(ValueError, match="both required for kind='packed'"):
        build_image_datasets(ImageDataConfig(kind="packed", train="x.npz.xz"))
    with pytest.raises(ValueError, match="no full batch"):
        build_image_loaders(ImageDataConfig(img_size=8, num_workers=0), 2000)


def test_synthetic_images_uint8_go_through_device_prep():
    cfg = ImageDataConfig(name="syn", kind="synthetic", img_size=8, num_classes=5,
                          synthetic_batches=2, mixup=0.0, cutmix=0.0)  # fmt: skip
    train, *_ = build_image_loaders(cfg, 4, seed=1)
    batches = list(train)
    assert batches[0][0].dtype == torch.uint8
    prep = build_device_prep(cfg)
    a, _ = to_device(batches[0], "cpu", prep=prep, train=True)
    b, _ = to_device(batches[1], "cpu", prep=prep, train=True)
    assert a.dtype == torch.float32 and a.data_ptr() != b.data_ptr()  # a fresh batch a step
    assert torch.equal(batches[0][0], batches[1][0])  # the stored images are never modified


def test_synthetic_images_kind_hands_out_one_fixed_batch_and_resumes():
    from data.images import SyntheticImages
    from trainer.tasks import _Epochs

    cfg = ImageDataConfig(name="syn", kind="synthetic", img_size=32, num_classes=5,
                          synthetic_batches=3, mixup=0.0, cutmix=0.0,
                          device_normalize=False)  # fmt: skip
    train, val, classes, mixup = build_image_loaders(cfg, 4, seed=1)
    assert isinstance(train, SyntheticImages) and classes == 5 and mixup is None
    assert len(train) == 3 and len(val) == 2
    batches = list(train)
    assert len(batches) == 3
    images, labels = batches[0]
    assert images.shape == (4, 3, 32, 32) and images.is_contiguous(
        memory_format=torch.channels_last
    )
    assert labels.dtype == torch.int64 and int(labels.max()) < 5
    assert all(torch.equal(b[0], images) for b in batches)  # one batch, handed out as copies
    assert len({b[0].data_ptr() for b in batches}) == 3
    images.zero_()  # (mixup mixes in place) later steps still get the original batch
    assert torch.equal(next(iter(train))[0], batches[1][0]) and batches[1][0].abs().sum() > 0
    ep = _Epochs(train)
    ep.next_batch()
    state = ep.state_dict()
    resumed = _Epochs(train)
    resumed.load_state_dict(state)
    assert len(list(resumed._one_epoch())) == 2
    with pytest.raises(ValueError, match="synthetic_batches"):
        build_image_loaders(ImageDataConfig(kind="synthetic", synthetic_batches=0), 4)


class _Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return i


@pytest.mark.parametrize("workers", [0, 1])
def test_epochs_run_as_one_loader_iterator_in_each_epochs_order_and_resume(workers):
    """One DataLoader iterator serves all epochs (its workers run into the next epoch instead
    of restarting), each epoch in its own shuffled order, cut into full batches as the loader
    would; resuming mid-epoch or after an epoch's last batch continues the same sequence."""
    from torch.utils.data import DataLoader

    from data.image_augment import ShardSampler
    from trainer.tasks import _Epochs

    sampler = ShardSampler(10, seed=3)
    kw = {"persistent_workers": True} if workers else {}
    loader = DataLoader(_Indices(), batch_size=3, sampler=sampler, drop_last=True,
                        num_workers=workers, generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
    want = []
    for epoch in range(4):  # the loader epoch by epoch: 3 full batches of 3, one index left out
        sampler.set_epoch(epoch)
        want += [b.tolist() for b in loader]
    assert len(want) == 12 and want[:3] != want[3:6]
    ep = _Epochs(loader)
    got, iterators, states = [], set(), []
    for _ in range(12):
        got.append(ep.next_batch().tolist())
        iterators.add(id(ep._it))
        states.append(ep.state_dict())
    assert got == want
    assert len(iterators) == 1  # not restarted at the epoch boundaries
    assert states[2] == {"epoch": 0, "batch": 3} and states[3] == {"epoch": 1, "batch": 1}
    for at in (1, 2, 4):  # mid-epoch; after epoch 0's last batch; mid-epoch 1
        resumed = _Epochs(loader)
        resumed.load_state_dict(states[at])
        assert [resumed.next_batch().tolist() for _ in range(11 - at)] == want[at + 1 :]
