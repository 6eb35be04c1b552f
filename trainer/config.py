"""Typed run configuration: Hydra composes YAML, these dataclasses check it.

Every config group is merged into its dataclass schema, so a misspelt key in a YAML file or a
``+key=value`` override is an error naming the field and the valid ones, never a silent default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from data import ImageDataConfig, TokenDataConfig
from data.images import IMAGE_KINDS
from models import FAMILIES, PosConfig


@dataclasses.dataclass
class AttnConfig:
    name: str = "sdpa"
    options: dict[str, Any] = field(default_factory=dict)  # bound once by ops.build


@dataclasses.dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 6e-4
    min_lr: float = 6e-5  # end of the cosine
    warmup_steps: int = 715
    decay_steps: int | None = None  # None: trainer.max_steps
    weight_decay: float = 0.1  # on >= 2-D weights only (not norms, biases)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_init_lr: float = 0.0  # lr at the first warmup step/epoch (timm's warmup_lr_init)
    schedule_unit: str = "step"  # step | epoch: lr held constant within an epoch (timm's default)
    grad_clip: float = 1.0  # 0 disables
    clip_mode: str = "norm"  # norm (global grad norm <= grad_clip) | agc (adaptive, per unit)
    fused: bool | None = None  # None: fused AdamW on CUDA
    # clip_mode=agc: all float32 units clipped by one Triton launch on CUDA (trainer.agc_kernel;
    # the same rule to float32 rounding, ~2,000 fewer host calls a step; on an H100 M0 gained
    # 8% in two timings and lost 9% in a third, docs/benchmarks.md); false: the torch ops
    fused_agc: bool = True


@dataclasses.dataclass
class TrainerConfig:
    max_steps: int = 300
    seq_len: int = 256
    micro_batch: int = 8  # sequences per forward, per process
    global_batch_tokens: int = 2048  # tokens per optimizer step over all processes
    global_batch: int | None = None  # images per optimizer step, all processes (classification);
    # None: micro_batch x processes. Language models use global_batch_tokens.
    epochs: int | None = None  # classification: train this many epochs (sets max_steps)
    eval_every: int = 100
    eval_tokens: int = 65536  # validation tokens per evaluation (all processes together)
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3  # step checkpoints kept besides last.pt
    resume: str = "auto"  # auto | never | PATH
    stop_at: int | None = None  # end this process after this step (checkpointed), as if preempted
    init_from: str | None = None  # weights only (continued training) from this checkpoint
    ema_decay: float | None = None  # weight EMA (also evaluated: ema_val_*); None: off
    compile: bool = False  # with fsdp or activation_checkpointing: each block compiled alone
    compile_tuning: bool = False  # Inductor coordinate-descent tuning (slower compile)
    # torch.compile mode of the whole-model compile: default | reduce-overhead (CUDA graphs:
    # removes the per-kernel launch cost that bounds small models such as EfficientViT) |
    # max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # the optimizer step (forward, backward, clipping, AdamW; with accumulation a micro-step
    # graph and an update graph) captured once as CUDA graphs and replayed: one process, CUDA
    # (trainer/step_graph.py; EfficientViT's images/s on an H100 in docs/benchmarks.md)
    step_graph: bool = False
    # the loop's GPU work on a CUDA green context of this many SMs (or this fraction of them, in
    # (0, 1)), the rest left to other work such as the GPU image pipeline
    # (trainer/sm_partition.py; 1.23-1.34x EfficientViT images/s from JPEGs on an H100); null: all
    step_sms: float | None = None
    parallel: str = "ddp"  # ddp | fsdp (FSDP2: blocks, then the root; see trainer/parallel.py)
    # DDP's bucket_cap_mb: gradients are all-reduced in buckets of this size. 100 (DDP's own
    # default is 25): GPT-2 124M on two H100s, 1.87-1.89x one GPU's tokens/s against 1.84x
    # (docs/benchmarks.md, "Data-parallel scaling")
    ddp_bucket_mb: float = 100.0
    # with compile under DDP: let Dynamo cut the compiled model into one graph per bucket
    # (``torch._dynamo.config.optimize_ddp``), so that each bucket's all-reduce starts while
    # the backward of the earlier layers runs. false (default): one graph, the all-reduces after
    # the backward; measured faster on two H200s (docs/benchmarks.md, "Data-parallel scaling")
    ddp_split_graphs: bool = False
    # data parallelism without DDP: one all-reduce of all gradients, as one flat buffer, after
    # the step's last backward (trainer/parallel.py FlatDataParallel); as fast as DDP on two
    # H200s, within 0.3% (docs/benchmarks.md, "Data-parallel scaling")
    ddp_flat: bool = False
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    run_dir: str = "runs/default"
    peak_flops: float | None = None  # per device, for MFU; None: known GPUs only
    progress: bool = True
    # when no step has been issued for this many seconds, print every thread's Python stack
    # to stderr (again each further period; the run goes on): where a hung run waits. null: off
    watchdog_s: float | None = None


@dataclasses.dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "attnlab"
    entity: str | None = None
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"  # offline | online | disabled


@dataclasses.dataclass
class RunConfig:
    model: Any
    attn: AttnConfig
    pos: PosConfig
    data: Any  # TokenDataConfig (language models) or ImageDataConfig (image classifiers)
    optim: OptimConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    seed: int = 1337
    run_name: str = "run"
    experiment: str | None = None


# The data schema follows the model family: token streams for language models, images else.
DATA_SCHEMAS = {"gpt2": TokenDataConfig, "efficientvit": ImageDataConfig}
SECTIONS = {
    "attn": AttnConfig,
    "pos": PosConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
}
TOP_LEVEL = {"seed", "run_name", "experiment", "eval", "ckpt", *SECTIONS, "model", "data"}


def _typed(section: str, schema, node) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    except (ConfigKeyError, ValidationError) as e:
        fields = ", ".join(f.name for f in dataclasses.fields(schema))
        key = f"{section}.{e.full_key}" if getattr(e, "full_key", None) else section
        first = str(e).splitlines()[0]
        raise ValueError(
            f"bad config in '{section}' at {key}: {first}. "
            f"Valid keys of {section} ({schema.__name__}): {fields}"
        ) from None
    return OmegaConf.to_object(merged)


def load(cfg: DictConfig | dict) -> RunConfig:
    """Check a composed config against the schemas and return typed sections."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    OmegaConf.resolve(cfg)
    unknown = sorted(set(cfg.keys()) - TOP_LEVEL)
    if unknown:
        raise ValueError(f"unknown top-level config key(s) {unknown}; valid: {sorted(TOP_LEVEL)}")
    family = cfg.model.get("family")
    if family not in FAMILIES:
        raise ValueError(f"unknown model.family={family!r}; valid: {', '.join(FAMILIES)}")
    typed = {name: _typed(name, schema, cfg[name]) for name, schema in SECTIONS.items()}
    typed["model"] = _typed("model", FAMILIES[family][0], cfg.model)
    schema = DATA_SCHEMAS.get(family, TokenDataConfig)
    kind = cfg.data.get("kind")
    if (schema is ImageDataConfig) != (kind in IMAGE_KINDS):
        want = "images: data=digits|cifar10|imagenet|imagenet_hf" if schema is ImageDataConfig \
            else "tokens: data=pycorpus|files|gutenberg|fineweb_edu"  # fmt: skip
        raise ValueError(
            f"model.family={family} trains on {want}; got data={cfg.data.get('name')} (kind {kind})"
        )
    typed["data"] = _typed("data", schema, cfg.data)
    return RunConfig(
        **typed,
        seed=int(cfg.get("seed", 1337)),
        run_name=str(cfg.get("run_name", "run")),
        experiment=cfg.get("experiment"),
    )


def _validate_parallel(rc: RunConfig) -> None:
    """trainer.parallel and what FSDP cannot do (yet)."""
    t = rc.trainer
    if t.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"trainer.parallel={t.parallel!r}; valid: ddp, fsdp")
    if not t.ddp_bucket_mb > 0:
        raise ValueError(f"trainer.ddp_bucket_mb={t.ddp_bucket_mb}: use a positive size in MiB")
    if t.ddp_flat and t.parallel != "ddp":
        raise ValueError(f"trainer.ddp_flat=true replaces DDP; it needs trainer.parallel=ddp, "
                         f"got {t.parallel}")  # fmt: skip
    if t.parallel != "fsdp":
        return
    if t.ema_decay is not None:
        raise ValueError(
            "trainer.ema_decay with trainer.parallel=fsdp: the weight EMA keeps a full unsharded "
            "copy of the model; use trainer.parallel=ddp or trainer.ema_decay=null"
        )
    if rc.optim.clip_mode == "agc":
        raise ValueError(
            "optim.clip_mode=agc with trainer.parallel=fsdp: adaptive clipping needs whole rows "
            "of every weight; use optim.clip_mode=norm or trainer.parallel=ddp"
        )


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def validate(rc: RunConfig, world_size: int = 1) -> int:
    """Cross-field checks; return gradient-accumulation steps per optimizer step."""
    t = rc.trainer
    if t.resume not in ("auto", "never") and not t.resume.endswith(".pt"):
        raise ValueError(f"trainer.resume={t.resume!r}: use auto, never, or a path to a .pt file")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device={t.device!r}; valid: auto, cpu, cuda")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"trainer.precision={t.precision!r}; valid: auto, bf16, fp32")
    if rc.optim.clip_mode not in ("norm", "agc"):
        raise ValueError(f"optim.clip_mode={rc.optim.clip_mode!r}; valid: norm, agc")
    if t.compile_mode not in COMPILE_MODES:
        raise ValueError(
            f"trainer.compile_mode={t.compile_mode!r}; valid: {', '.join(COMPILE_MODES)}"
        )
    _validate_parallel(rc)
    if t.watchdog_s is not None and not t.watchdog_s >= 0:
        raise ValueError(f"trainer.watchdog_s={t.watchdog_s}: use null (off) or seconds > 0")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ValueError(f"trainer.ema_decay={t.ema_decay}: use null (off) or a value in (0, 1)")
    if rc.logger.name not in ("wandb", "none"):
        raise ValueError(f"logger.name={rc.logger.name!r}; valid: wandb, none (logger=none)")
    if rc.optim.schedule_unit not in ("step", "epoch"):
        raise ValueError(f"optim.schedule_unit={rc.optim.schedule_unit!r}; valid: step, epoch")
    if isinstance(rc.data, ImageDataConfig):
        per_micro = t.micro_batch * world_size
        global_batch = t.global_batch or per_micro
        if global_batch % per_micro:
            raise ValueError(
                f"trainer.global_batch={global_batch} must be a multiple of micro_batch x "
                f"world_size = {t.micro_batch} x {world_size} = {per_micro}"
            )
        return global_batch // per_micro
    if rc.optim.schedule_unit == "epoch" or t.epochs is not None:
        raise ValueError(
            "optim.schedule_unit=epoch and trainer.epochs are for image classification; "
            "language models count trainer.max_steps"
        )
    per_micro = t.micro_batch * t.seq_len * world_size
    if t.global_batch_tokens % per_micro:
        raise ValueError(
            f"trainer.global_batch_tokens={t.global_batch_tokens} must be a multiple of "
            f"micro_batch x seq_len x world_size = {t.micro_batch} x {t.seq_len} x {world_size} "
            f"= {per_micro}"
        )
    max_len = getattr(rc.model, "max_seq_len", None)
    if rc.pos.name == "learned" and max_len is not None and t.seq_len > max_len:
        raise ValueError(
            f"trainer.seq_len={t.seq_len} is longer than pos=learned allows "
            f"(model.max_seq_len={rc.model.max_seq_len}); raise model.max_seq_len or shorten"
        )
    return t.global_batch_tokens // per_micro


def to_dict(rc: RunConfig) -> dict:
    """Plain nested dict (for checkpoints, summary.json and wandb)."""
    return dataclasses.asdict(rc)
