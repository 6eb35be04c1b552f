"""Write a packed image set (``.npz.xz``) out as class folders: ``OUT/<class>/<i>.jpg``.

Usage (from the repository root, with the project's virtualenv)::

    python -m scripts.unpack_images ../shared/data/images/cifar10_train.npz.xz .data/cifar10/train
    python -m scripts.unpack_images ../shared/data/images/cifar10_test.npz.xz .data/cifar10/val

Each file holds the image's original bytes (nothing is re-encoded); ``i`` is the image's index
in the packed set, zero-padded so that names sort in index order. The result is the layout
``data.kind=folder`` reads (``root/train/<class>/``, ``root/val/<class>/``).

Files are written atomically and existing files of the right size are skipped, so a killed run,
started again, continues where it stopped. ``--verify`` also decodes every image with PIL. A
packed file that is missing, not xz/npz, lacks arrays, has inconsistent offsets/labels, has
class names unusable as folder names, or holds an image that is neither JPEG nor PNG is
reported with the reason and exit status 2.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.images import open_packed  # noqa: E402

_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"))


class BadPackedFile(ValueError):
    """The packed set cannot be unpacked as it is; the message says why."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("packed", help="packed set (.npz.xz or .npz)")
    p.add_argument("out", help="output directory; one sub-folder per class is created")
    p.add_argument("--verify", action="store_true", help="decode every image with PIL")
    p.add_argument("--cache-dir", default=None, help="decompression cache (default $ATTNLAB_CACHE)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def folder_names(classes: list[str]) -> list[str]:
    """Class names checked for use as directory names (unique, no separators, not . or ..)."""
    bad = [c for c in classes if not c or c in (".", "..") or "/" in c or "\\" in c or "\0" in c]
    if bad:
        raise BadPackedFile(f"class names unusable as folder names: {bad[:10]}")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise BadPackedFile(f"duplicate class names (their images would mix): {dupes[:10]}")
    return classes


def suffix_of(blob: bytes, index: int, verify: bool) -> str:
    """File suffix from the image's magic bytes; with ``verify``, decode it fully."""
    suffix = next((sfx for magic, sfx in _MAGIC if blob.startswith(magic)), None)
    if suffix is None:
        raise BadPackedFile(
            f"image {index} is neither JPEG nor PNG (first bytes {blob[:8].hex(' ')}, "
            f"{len(blob)} bytes)"
        )
    if verify:
        try:
            with Image.open(io.BytesIO(blob)) as img:
                img.load()
        except (OSError, ValueError) as err:
            raise BadPackedFile(f"image {index} does not decode: {err}") from err
    return suffix


def unpack(
    packed: str | Path,
    out: str | Path,
    verify: bool = False,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Unpack ``packed`` into ``out``; return counts of written and skipped (already there)."""
    arrays = open_packed(packed, cache_dir, progress)
    data, offsets, labels = arrays["data"], arrays["offsets"], arrays["labels"]
    classes = folder_names([str(c) for c in arrays["classes"]])
    out = Path(out)
    n = len(labels)
    width = len(str(max(n - 1, 0)))
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "skipped": 0}
    for i in tqdm(
        range(n), desc=f"unpacking {Path(packed).name}", unit="img", disable=not progress
    ):
        blob = data[offsets[i] : offsets[i + 1]].tobytes()
        target = out / classes[int(labels[i])] / f"{i:0{width}d}{suffix_of(blob, i, verify)}"
        if target.is_file() and target.stat().st_size == len(blob):
            counts["skipped"] += 1
            continue
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, target)
        counts["written"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        counts = unpack(args.packed, args.out, args.verify, args.cache_dir, not args.no_progress)
    except (FileNotFoundError, ValueError) as err:  # BadPackedFile is a ValueError
        print(f"unpack_images: {args.packed}: {err}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {counts['written']} images written, {counts['skipped']} already there",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
