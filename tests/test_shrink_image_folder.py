"""scripts/shrink_image_folder.py: a smaller-stored copy of an ImageNet-style folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from data.image_sets import ImageFolderDataset
from scripts.shrink_image_folder import ShrinkError, main, shrink_folder, target_size


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth image with some texture, so that resizing is measurable but JPEG loses little."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 80 * np.sin(xx / 9.0 + seed)[..., None] * np.cos(yy / 13.0)[..., None]
    arr = base + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture
def src(tmp_path):
    """train/ with large JPEGs, one small JPEG, a PNG, a CMYK JPEG and a grey JPEG; val/ as is."""
    root = tmp_path / "src"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
    _photo(120, 90, 0).save(root / "train/cat/a.jpg", quality=95)
    _photo(64, 100, 1).save(root / "train/cat/b.JPEG", quality=95)
    _photo(40, 30, 2).save(root / "train/cat/small.jpg", quality=95)  # short side below 48
    _photo(96, 72, 3).save(root / "train/dog/c.png")
    _photo(90, 60, 4).convert("CMYK").save(root / "train/dog/d.jpg", quality=95)
    _photo(80, 80, 5).convert("L").save(root / "train/dog/e.jpg", quality=95)
    _photo(100, 75, 6).save(root / "val/cat/v.jpg", quality=95)
    _photo(100, 75, 7).save(root / "val/dog/w.jpg", quality=95)
    return root


def test_target_size_keeps_aspect_and_short_side():
    assert target_size(500, 375, 256) == (341, 256)
    assert target_size(375, 500, 256) == (256, 341)
    assert target_size(300, 300, 256) == (256, 256)
    assert target_size(5000, 10, 8) == (4000, 8)


def test_copy_is_a_smaller_complete_root(src, tmp_path):
    dst = tmp_path / "dst"
    counts = shrink_folder(src, dst, short_side=48, quality=90, workers=1, progress=False)
    assert counts == {"resized": 5, "kept": 1, "stored": 0, "there": 0, "linked": 2, "failed": []}
    for split in ("train", "val"):  # the loader sees the same classes and files
        a, b = ImageFolderDataset(src / split), ImageFolderDataset(dst / split)
        assert a.classes == b.classes and list(a.files) == list(b.files)
        assert list(a.labels) == list(b.labels)
    sizes = {
        "train/cat/a.jpg": ((64, 48), "JPEG", "RGB"),
        "train/cat/b.JPEG": ((48, 75), "JPEG", "RGB"),
        "train/dog/c.png": ((64, 48), "PNG", "RGB"),
        "train/dog/d.jpg": ((72, 48), "JPEG", "RGB"),  # CMYK converted
        "train/dog/e.jpg": ((48, 48), "JPEG", "L"),
    }
    for rel, (size, fmt, mode) in sizes.items():
        with Image.open(dst / rel) as img:
            assert (img.size, img.format, img.mode) == (size, fmt, mode), rel
    # small enough already, and the other split: the same bytes, nothing re-encoded
    for rel in ("train/cat/small.jpg", "val/cat/v.jpg", "val/dog/w.jpg"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    assert json.loads((dst / "shrink.json").read_text()) == {
        "short_side": 48,
        "quality": 90,
        "splits": ["train"],
    }


def test_resized_pixels_are_a_bicubic_resize(src, tmp_path):
    dst = tmp_path / "dst"
    shrink_folder(src, dst, short_side=48, quality=95, workers=1, progress=False)
    with Image.open(src / "train/cat/a.jpg") as img:
        want = np.asarray(img.convert("RGB").resize((64, 48), Image.BICUBIC), dtype=np.float64)
    with Image.open(dst / "train/cat/a.jpg") as img:
        got = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert np.abs(got - want).mean() < 2.0  # JPEG at quality 95 only
    # a nearest-neighbour resize of the same image is measurably further away
    with Image.open(src / "train/cat/a.jpg") as img:
        near = np.asarray(img.convert("RGB").resize((64, 48), Image.NEAREST), dtype=np.float64)
    assert np.abs(near - want).mean() > np.abs(got - want).mean()
    with Image.open(src / "train/dog/c.png") as img:  # PNG: lossless, exactly PIL's resize
        want = np.asarray(img.resize((64, 48), Image.BICUBIC))
    with Image.open(dst / "train/dog/c.png") as img:
        assert np.array_equal(np.asarray(img), want)


def test_shrinking_val_too_and_in_processes(src, tmp_path):
    dst = tmp_path / "dst"
    counts = shrink_folder(src, dst, 48, 90, splits=("train", "val"), workers=2, progress=False)
    assert counts["resized"] == 7 and counts["linked"] == 0 and counts["failed"] == []
    with Image.open(dst / "val/cat/v.jpg") as img:
        assert img.size == (64, 48)


def test_interrupted_run_continues(src, tmp_path):
    dst = tmp_path / "dst"
    shrink_folder(src, dst, 48, 90, workers=1, progress=False)
    a = dst / "train/cat/a.jpg"
    first = a.read_bytes()
    # as a killed run leaves it: one output missing with its half-written temporary beside it
    a.unlink()
    (dst / "train/cat/a.jpg.tmp").write_bytes(first[:10])
    (dst / "val/dog/w.jpg").unlink()
    counts = shrink_folder(src, dst, 48, 90, workers=1, progress=False)
    assert counts == {"resized": 1, "kept": 0, "stored": 0, "there": 6, "linked": 1, "failed": []}
    assert a.read_bytes() == first
    assert not (dst / "train/cat/a.jpg.tmp").exists()


def test_other_settings_are_refused(src, tmp_path):
    dst = tmp_path / "dst"
    shrink_folder(src, dst, 48, 90, workers=1, progress=False)
    with pytest.raises(ShrinkError, match="other settings"):
        shrink_folder(src, dst, 40, 90, workers=1, progress=False)
    with pytest.raises(ShrinkError, match="other settings"):
        shrink_folder(src, dst, 48, 80, workers=1, progress=False)


def test_bad_inputs_are_clear(src, tmp_path, capsys):
    with pytest.raises(ShrinkError, match="(?s)does not exist.*expected layout"):
        shrink_folder(tmp_path / "nowhere", tmp_path / "d", progress=False)
    with pytest.raises(ShrinkError, match="must not be the source or inside it"):
        shrink_folder(src, src / "train" / "copy", progress=False)
    with pytest.raises(ShrinkError, match=r"no split folder\(s\) \['test'\]"):
        shrink_folder(src, tmp_path / "d", splits=("test",), progress=False)
    with pytest.raises(ShrinkError, match="positive"):
        shrink_folder(src, tmp_path / "d", short_side=0, progress=False)
    with pytest.raises(ShrinkError, match="quality"):
        shrink_folder(src, tmp_path / "d", quality=101, progress=False)
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    _photo(10, 10, 0).save(flat / "train/x.jpg")
    assert main([str(flat), str(tmp_path / "d2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no class sub-folders" in err and "expected layout" in err


def test_an_undecodable_image_is_reported_and_the_rest_written(src, tmp_path, capsys):
    (src / "train/cat/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), "--short-side", "48", "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "1 failed" in err and "broken.jpg" in err
    assert not (dst / "train/cat/broken.jpg").exists()
    assert (dst / "train/cat/a.jpg").is_file() and (dst / "val/dog/w.jpg").is_file()
    assert not any(n.endswith(".tmp") for _, _, fs in os.walk(dst) for n in fs)
