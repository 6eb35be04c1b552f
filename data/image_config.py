"""Image data configuration: the typed ``data`` group of image tasks (``ImageDataConfig``),
its checks, and the constants of the formats (layouts, ImageNet statistics, the pinned Hub
revision). Split out of ``data/images.py``, which re-exports everything here."""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_KINDS = ("folder", "hf", "packed", "pixels", "digits", "synthetic")
DECODE_MODES = ("cpu", "gpu")
GPU_DECODERS = ("torchvision", "nvjpeg", "nvimgcodec")  # data.gpu_decoder
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # = timm.data.IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # = timm.data.IMAGENET_DEFAULT_STD

IMAGENET_HF_REPO = "ILSVRC/imagenet-1k"
IMAGENET_HF_REVISION = "4603483700ee984ea9debe3ddbfdeae86f6489eb"
"""Hub commit of ImageNet-1k pinned so every run reads the same files (the commit public
training code pins; not checked from here, these machines have no network). It is a
loading-script dataset, which ``datasets`` >= 4 no longer runs: there, convert once (with
``datasets`` < 4, ``save_to_disk``) and point ``root`` at the copy, set ``hf_revision`` to a
Parquet revision, or use kind=folder."""
HF_ALIASES = {"imagenet-1k": IMAGENET_HF_REPO, "imagenet": IMAGENET_HF_REPO}

PACKED_KEYS = ("data", "offsets", "labels", "classes")
_PACKED_CACHE_FORMAT = 1  # bump when the cache layout changes

FOLDER_LAYOUT = """\
expected layout (ImageNet style, one sub-folder per class, same class names in train/ and val/):
    <root>/
        train/
            <class_a>/  img_0001.jpg  img_0002.jpg ...
            <class_b>/  ...
        val/
            <class_a>/  ...
            <class_b>/  ...
set data.root=<root>, or data.train / data.val to the two class-folder directories
(image files: {exts})""".format(exts=" ".join(IMAGE_EXTENSIONS))

PACKED_FORMAT = """\
expected a packed image set: an .npz (optionally lzma-compressed, .npz.xz) holding
    data     uint8 (total bytes,)  all JPEG files concatenated
    offsets  int64 (n+1,)          image i is data[offsets[i]:offsets[i+1]]; offsets[0] = 0
    labels   int (n,)              class index of each image, 0 <= label < len(classes)
    classes  str (num_classes,)    class names"""


# --------------------------------------------------------------------------- config


@dataclass
class ImageDataConfig:
    """Which images to train and validate on and how to augment them (``data:`` section).

    Paths by kind (see the module docstring): folder: ``root`` with ``train/`` and ``val/``, or
    ``train``/``val`` class-folder directories; hf: ``root`` = Hub name or ``save_to_disk``
    directory (default ImageNet-1k), ``train``/``val`` = split names or saved-split paths;
    packed: ``train``/``val`` = ``.npz.xz`` files; pixels: ``root`` with ``train.pixels`` and
    ``val/``, or ``train`` = the ``.pixels`` file and ``val`` = a class-folder directory;
    digits: nothing. The batch size is not
    here: the trainer passes it to ``build_image_loaders``.
    """

    name: str = "digits"
    kind: str = "digits"
    root: str | None = None
    train: str | None = None
    val: str | None = None
    hf_revision: str = IMAGENET_HF_REVISION
    image_key: str = "image"  # hf columns
    label_key: str = "label"
    val_fraction: float = 0.2  # digits: held-out share of each class
    num_classes: int = 1000  # synthetic: label range
    synthetic_batches: int = 100  # synthetic: training batches per epoch (validation: 2)
    cache_dir: str | None = None  # packed: decompression cache (default $ATTNLAB_CACHE)
    img_size: int = 224
    train_interpolation: str = "bicubic"
    val_interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, center-crop img_size
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment; null/"" disables
    re_prob: float = 0.25  # random erasing (pixel mode)
    mixup: float = 0.8  # mixup alpha (0 disables)
    cutmix: float = 1.0  # cutmix alpha (0 disables)
    label_smoothing: float = 0.1
    repeated_aug: bool = True  # under DDP (world > 1) only
    aug_repeats: int = 3
    num_workers: int = 8  # per process; capped at the CPU count
    pin_memory: bool = True  # when CUDA is available
    # the validation loader keeps its workers between evaluations; training runs all epochs as
    # one loader iterator (trainer.tasks._EndlessBatches), so its workers never restart
    persistent_workers: bool = True
    channels_last: bool = True
    # workers hand out uint8 crops; normalisation and random erasing run on the training device
    # over the batch (data.images.DevicePrep): 4x less data through shared and pinned memory
    device_normalize: bool = True
    # cpu: workers decode and augment (PIL, timm); gpu: workers read the JPEG bytes, the device
    # decodes (nvJPEG) and crops/flips/RandAugments the batch (data.gpu_augment)
    decode: str = "cpu"
    # data.decode=gpu: batches decoded ahead, by two background threads on side streams, while
    # the step runs (data.background.Ahead); 0 decodes them in the training loop
    decode_ahead: int = 2
    # data.decode=gpu: the loader, the decoding and the augmentation in a child process of their
    # own (data.process_ahead; batches through shared CUDA buffers), so that their host work
    # does not share the training step's GIL (+20-25% images/s for EfficientViT-M0 on an H100,
    # docs/benchmarks.md). None: on when training on CUDA without trainer.step_graph (whose
    # one-launch step leaves the GIL to the threads), off elsewhere (the CPU keeps the
    # threads, which spawn no process); true/false force it
    decode_process: bool | None = None
    # data.decode=gpu on CUDA: RandAugment's op families as Triton kernels on the uint8 batch
    # (data.augment_kernels; the same values as the torch ops, +13-37% images/s for
    # EfficientViT-M0 on an H100, docs/benchmarks.md); false: the torch ops on float32
    fused_augment: bool = True
    # data.decode=gpu: the JPEG decoder. torchvision: decode_jpeg (nvJPEG), any CUDA GPU;
    # nvjpeg: the GPU's JPEG engines driven directly, PIL's pixels within rounding at
    # torchvision's training rate (A100/H100 and later; data/nvjpeg_decode.py); nvimgcodec:
    # NVIDIA nvImageCodec, PIL's pixels too but ~10% slower training (pip install
    # 'nvidia-nvimgcodec-cu13[nvjpeg]'; data/nvimgcodec_decode.py; docs/benchmarks.md)
    gpu_decoder: str = "torchvision"
    # data.decode=gpu: the share of each training batch that the loader workers decode (PIL) and
    # random-resize-crop themselves, handing out S x S uint8 crops beside the other images'
    # bytes; the device flips and RandAugments them with the rest. It puts the host's idle
    # cores to work beside nvJPEG (docs/benchmarks.md); 0 (the default): the device decodes all
    cpu_decode_share: float = 0.0
    # data.kind=pixels: threads reading each training batch's pixels into pinned memory (the
    # GIL released); with data.decode=gpu they replace the loader's workers for training
    read_threads: int = 8


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"data.{name} must be in [0, 1], got {value!r}")


def check_image_config(cfg: ImageDataConfig) -> None:
    """Raise ValueError naming the field for settings that cannot work."""
    if cfg.kind not in IMAGE_KINDS:
        raise ValueError(f"data.kind must be one of {list(IMAGE_KINDS)}, got {cfg.kind!r}")
    if isinstance(cfg.img_size, bool) or not isinstance(cfg.img_size, int) or cfg.img_size < 1:
        raise ValueError(f"data.img_size must be a positive integer, got {cfg.img_size!r}")
    if not 0.0 < float(cfg.crop_pct) <= 1.0:
        raise ValueError(f"data.crop_pct must be in (0, 1], got {cfg.crop_pct!r}")
    for name in ("mean", "std"):
        value = list(getattr(cfg, name))
        if len(value) != 3:
            raise ValueError(f"data.{name} needs 3 values (RGB), got {value!r}")
    if min(cfg.std) <= 0:
        raise ValueError(f"data.std must be positive, got {list(cfg.std)!r}")
    for name in ("re_prob", "label_smoothing"):
        _check_prob(name, getattr(cfg, name))
    for name in ("mixup", "cutmix"):
        if float(getattr(cfg, name)) < 0:
            raise ValueError(f"data.{name} (a Beta alpha) must be >= 0, got {getattr(cfg, name)!r}")
    if int(cfg.aug_repeats) < 1:
        raise ValueError(f"data.aug_repeats must be >= 1, got {cfg.aug_repeats!r}")
    if int(cfg.decode_ahead) < 0:
        raise ValueError(f"data.decode_ahead must be >= 0, got {cfg.decode_ahead!r}")
    if getattr(cfg, "decode_process", None) and getattr(cfg, "decode", "cpu") != "gpu":
        raise ValueError("data.decode_process=true needs data.decode=gpu (the child process "
                         "decodes on the device); with decode=cpu the loader's workers "
                         "already run in processes of their own")  # fmt: skip
    if getattr(cfg, "gpu_decoder", "torchvision") not in GPU_DECODERS:
        raise ValueError(f"data.gpu_decoder must be one of {GPU_DECODERS}, got "
                         f"{cfg.gpu_decoder!r}")  # fmt: skip
    share = getattr(cfg, "cpu_decode_share", 0.0)
    if isinstance(share, bool) or not 0.0 <= float(share) <= 1.0:
        raise ValueError(f"data.cpu_decode_share must be in [0, 1], got {share!r}")
    if float(share) > 0 and getattr(cfg, "decode", "cpu") != "gpu":
        raise ValueError("data.cpu_decode_share > 0 needs data.decode=gpu (with decode=cpu the "
                         "workers already decode every image)")  # fmt: skip
    if float(share) > 0 and cfg.kind == "pixels":
        raise ValueError("data.cpu_decode_share > 0 has nothing to decode with data.kind=pixels "
                         "(the store holds pixels); set it to 0")  # fmt: skip
    threads = getattr(cfg, "read_threads", 8)
    if isinstance(threads, bool) or int(threads) < 1:
        raise ValueError(f"data.read_threads must be >= 1, got {threads!r}")
    if int(cfg.num_workers) < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers!r}")
    if cfg.kind == "synthetic" and (int(cfg.num_classes) < 1 or int(cfg.synthetic_batches) < 1):
        raise ValueError(
            f"data.num_classes ({cfg.num_classes}) and data.synthetic_batches "
            f"({cfg.synthetic_batches}) must be >= 1 for kind='synthetic'"
        )
    if cfg.kind == "digits" and not 0.0 < float(cfg.val_fraction) < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {cfg.val_fraction!r}")
    _check_decode(cfg)


def decode_in_process(cfg: ImageDataConfig, device, step_graph: bool = False) -> bool:
    """Whether data.decode=gpu's pipeline runs in a child process (data.decode_process; None
    picks it on CUDA devices, except beside ``trainer.step_graph``, whose step leaves the GIL
    to the pipeline's threads: there the threads were as fast or faster in every measurement,
    docs/benchmarks.md)."""
    if getattr(cfg, "decode", "cpu") != "gpu":
        return False
    choice = getattr(cfg, "decode_process", None)
    if choice is None:
        return str(device).split(":")[0] == "cuda" and not step_graph
    return bool(choice)


def _check_decode(cfg: ImageDataConfig) -> None:
    if cfg.decode not in DECODE_MODES:
        raise ValueError(f"data.decode must be one of {list(DECODE_MODES)}, got {cfg.decode!r}")
    if cfg.decode != "gpu":
        return
    if cfg.kind not in ("folder", "packed", "hf", "pixels"):
        raise ValueError(
            f"data.decode=gpu decodes JPEG files on the device, but data.kind={cfg.kind!r} has "
            "no encoded images; use data.kind folder, packed, hf or pixels, or data.decode=cpu"
        )
    if not cfg.device_normalize:
        raise ValueError(
            "data.decode=gpu needs data.device_normalize=true (the device builds uint8 batches "
            "that DevicePrep normalises)"
        )
    for name in ("train_interpolation", "val_interpolation"):
        if getattr(cfg, name) != "bicubic":
            raise ValueError(
                f"data.{name}={getattr(cfg, name)!r}: data.decode=gpu implements bicubic only"
            )
    from data.gpu_augment import parse_rand_augment

    parse_rand_augment(cfg.auto_augment)  # raises for policies the GPU path lacks
