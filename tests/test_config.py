"""Every experiment and every model x attn x pos composes and builds (meta device) or raises
its documented error; config typos and bad inputs give one clear message."""

import glob
import os

import pytest
import torch
from omegaconf import OmegaConf

import ops
from models import VARIANTS, build_model
from models.efficientvit import is_neighborhood
from trainer import config as config_lib

from .helpers import CONF, compose_cfg


def names(group):
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONF, group, "*.yaml")))


def family(model):
    return OmegaConf.load(os.path.join(CONF, "model", f"{model}.yaml")).family


def build_on_meta(cfg, validate=True):
    rc = config_lib.load(cfg)
    if validate:
        config_lib.validate(rc)
    with torch.device("meta"):
        return build_model(rc.model, ops.build(rc.attn.name, **rc.attn.options), rc.pos), rc


@pytest.mark.parametrize("experiment", names("experiment"))
def test_every_experiment_composes_and_builds(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    model, rc = build_on_meta(cfg)
    assert rc.experiment == experiment
    assert config_lib.validate(rc, world_size=1) >= 1  # batch sizes fit, cross-field checks pass
    assert sum(p.numel() for p in model.parameters()) > 0


def test_efficientvit_imagenet_recipe_is_the_papers():
    for v in range(6):
        rc = config_lib.load(compose_cfg([f"experiment=efficientvit_m{v}_imagenet"]))
        assert rc.model.variant == f"m{v}" and rc.pos.name == "none"
        o, t, d = rc.optim, rc.trainer, rc.data
        assert (o.lr, o.min_lr, o.weight_decay, o.betas) == (4e-3, 1e-5, 0.025, [0.9, 0.999])
        assert (o.warmup_steps, o.warmup_init_lr, o.schedule_unit) == (5, 1e-6, "epoch")
        assert (o.clip_mode, o.grad_clip) == ("agc", 0.02)
        assert (t.epochs, t.global_batch, t.ema_decay) == (300, 2048, 0.99996)
        assert (d.kind, d.img_size, d.auto_augment, d.re_prob) == (
            "folder",
            224,
            "rand-m9-mstd0.5-inc1",
            0.25,
        )
        assert (d.mixup, d.cutmix, d.label_smoothing, d.repeated_aug) == (0.8, 1.0, 0.1, True)
        assert config_lib.validate(rc, world_size=8) == 1  # 8 GPUs x 256


def test_experiment_recipes():
    rc = config_lib.load(compose_cfg(["experiment=gpt2_small_fineweb_edu"]))
    assert (rc.model.n_layer, rc.model.d_model, rc.trainer.seq_len) == (12, 768, 1024)
    assert rc.trainer.global_batch_tokens == 524288 and rc.trainer.max_steps == 19073
    assert (rc.optim.lr, rc.optim.warmup_steps, rc.optim.weight_decay, rc.optim.grad_clip) == (
        6e-4,
        715,
        0.1,
        1.0,
    )
    assert rc.pos.name == "learned" and rc.data.name == "fineweb_edu"
    for name, layers, width in [("carope_paper_tiny", 6, 512), ("carope_paper_small", 12, 768)]:
        rc = config_lib.load(compose_cfg([f"experiment={name}"]))
        assert (rc.model.n_layer, rc.model.d_model, rc.trainer.seq_len) == (layers, width, 512)
        assert (rc.optim.lr, rc.optim.min_lr, rc.optim.warmup_steps, rc.trainer.max_steps) == (
            6e-4,
            6e-5,
            750,
            19000,
        )
    # the command line wins over the experiment's choices
    rc = config_lib.load(compose_cfg(["experiment=gpt2_small_fineweb_edu", "pos=rope"]))
    assert rc.pos.name == "rope"


def matrix():
    """Every model x attn x pos for GPT-2; EfficientViT (whose own attention biases replace
    positions) every variant x attn with pos=none, and the first variant x attn x every pos;
    LLMs (their own RoPE) every size x attn with pos=rope, and llm_tiny x attn x every pos."""
    evit = [m for m in names("model") if family(m) == "efficientvit"]
    return [
        (m, a, p)
        for m in names("model")
        for a in names("attn")
        for p in names("pos")
        if (family(m) != "efficientvit" or p == "none" or m == evit[0])
        and (family(m) != "llm" or p == "rope" or m == "llm_tiny")
    ]


@pytest.mark.parametrize("model, attn, pos", matrix())
def test_model_attn_pos_matrix_builds(model, attn, pos):
    data = ["data=digits"] if family(model) == "efficientvit" else []  # images, not tokens
    cfg = compose_cfg([f"model={model}", f"attn={attn}", f"pos={pos}", *data])
    if family(model) == "gpt2":
        built, rc = build_on_meta(cfg)
        has_wpe = any(n.startswith("pos.wpe") for n, _ in built.named_parameters())
        has_carope = any(n.startswith("pos.proj") for n, _ in built.named_parameters())
        assert has_wpe == (pos == "learned") and has_carope == (pos == "carope")
        assert len(built.blocks) == rc.model.n_layer
        return
    if family(model) == "llm":
        if OmegaConf.load(os.path.join(CONF, "model", f"{model}.yaml")).hf_name == "":
            with pytest.raises(ValueError, match="model.hf_name is empty"):  # needs a model
                build_on_meta(cfg)
        elif pos not in ("rope", "none"):  # its own RoPE is its position encoding
            with pytest.raises(ValueError, match=f"pos={pos} would be a second encoding"):
                build_on_meta(cfg)
        else:
            built, rc = build_on_meta(cfg)
            assert [b.attn.attention.name for b in built.blocks] == [attn] * rc.model.n_layer
            assert (built.rope is None) == (pos == "none")
        return
    assert family(model) == "efficientvit", f"{model}: add its family's expectations here"
    # trainer.validate checks token-model fields (seq_len vs max_seq_len): build directly
    rc = config_lib.load(cfg)
    if pos != "none":  # its attention biases are its positions
        with pytest.raises(ValueError, match="efficientvit uses its own relative-position"):
            build_on_meta(cfg, validate=False)
        return
    backend = ops.build(rc.attn.name, **rc.attn.options)
    if attn == "simplicial":  # five-input attention, for causal sequence models only
        with pytest.raises(ValueError, match="efficientvit does not take attn=simplicial"):
            build_on_meta(cfg, validate=False)
        return
    na = is_neighborhood(backend)  # the bias-free 2-D NA variant
    if not backend.capabilities.bias and not na:
        with pytest.raises(ValueError, match=f"'{attn}' does not support: an additive attention"):
            build_on_meta(cfg, validate=False)
        return
    built, rc = build_on_meta(cfg, validate=False)
    depths = VARIANTS[rc.model.variant][1]
    assert [len(stage.blocks) for stage in built.stages] == list(depths)
    assert not any(n.startswith("pos.") for n, _ in built.named_parameters())
    assert any(n.endswith("attn_bias") for n, _ in built.named_parameters()) == (not na)


def test_sizes_match_the_papers():
    counts = {}
    for m in ("gpt2_tiny", "gpt2_small", "gpt2_medium"):
        built, _ = build_on_meta(compose_cfg([f"model={m}", "pos=learned"]))
        counts[m] = sum(p.numel() for p in built.parameters())
    assert 124e6 < counts["gpt2_small"] < 125e6  # GPT-2 124M (with the 50304-token table)
    assert 354e6 < counts["gpt2_medium"] < 356e6
    assert 44e6 < counts["gpt2_tiny"] < 46e6
    for m, millions in [("efficientvit_m0", 2.35), ("efficientvit_m5", 12.4)]:  # = timm's
        built, _ = build_on_meta(compose_cfg([f"model={m}", "pos=none", "data=digits"]))
        assert abs(sum(p.numel() for p in built.parameters()) / 1e6 - millions) < 0.1


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["attn.name=flash9"],
            "unknown attention backend 'flash9'; valid backends: .*reference, sdpa",
        ),
        (["+attn.options.window=4"], "attention backend 'sdpa' got unknown option\\(s\\) window"),
        (["pos.name=alibi"], "unknown position encoding pos.name='alibi'"),
        (["model.n_head=5"], "model.d_model=128 is not divisible by model.n_head=5"),
        (["model.n_kv_head=3"], "model.n_kv_head=3 must divide model.n_head=4"),
        (["model.loss=fast"], "model.loss='fast'; valid: auto, torch, fused"),
        (["model.residual=bf16"], "model.residual='bf16'; valid: float32, autocast"),
        (
            ["pos=learned", "model.max_seq_len=64", "trainer.seq_len=128"],
            "trainer.seq_len=128 is longer than pos=learned allows",
        ),
        (["trainer.global_batch_tokens=1000"], "global_batch_tokens=1000 must be a multiple of"),
        (["trainer.resume=sometimes"], "trainer.resume='sometimes'"),
        (
            ["+model.n_layers=3"],
            "bad config in 'model'.*n_layers.*Valid keys of model \\(GPT2Config\\)",
        ),
        (["+trainer.max_step=3"], "bad config in 'trainer'.*max_step"),
        (["model.family=bert"], "unknown model.family='bert'; valid: gpt2, efficientvit"),
        (
            ["model=efficientvit_m0", "pos=none", "data=digits", "model.variant=m7"],
            "unknown EfficientViT variant model.variant='m7'; valid: m0, m1, m2, m3, m4, m5",
        ),
        (
            ["model=efficientvit_m0", "pos=none", "data=digits", "model.img_size=200"],
            "model.img_size=200 must be a positive multiple of 16",
        ),
        (
            ["model=efficientvit_m0", "pos=none", "data=digits", "+model.depth=3"],
            "bad config in 'model'.*depth.*Valid keys of model \\(EfficientViTConfig\\)",
        ),
        (
            ["model=efficientvit_m0", "pos=rope", "data=digits"],
            "efficientvit uses its own relative-position attention biases; set pos=none",
        ),
        (
            ["model=efficientvit_m0", "pos=none", "data=digits", "attn=flash"],
            "'flash' does not support: an additive attention bias",
        ),
        (
            ["model=efficientvit_m0", "pos=none"],
            "model.family=efficientvit trains on images: data=digits.*got data=pycorpus",
        ),
        (["data=digits"], "model.family=gpt2 trains on tokens: data=pycorpus"),
        (["logger.name=tensorboard"], "logger.name='tensorboard'"),
        (
            ["trainer.compile_mode=cudagraphs"],
            "trainer.compile_mode='cudagraphs'; valid: default, reduce",
        ),
    ],
)
def test_bad_inputs_raise_one_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_on_meta(compose_cfg(overrides))


def test_unknown_override_is_refused_by_hydra():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_cfg(["trainer.max_stepz=3"])


def test_missing_data_path_names_the_field(tmp_path):
    from data import build_token_data

    rc = config_lib.load(compose_cfg(["data=files", f"data.train={tmp_path}/nothing/*.jsonl"]))
    with pytest.raises(FileNotFoundError, match="data.train"):
        build_token_data(rc.data, batch_size=2, seq_len=8, rank=0, world_size=1, seed=0)
    rc = config_lib.load(compose_cfg(["data=gutenberg", f"data.train={tmp_path}/x/train_*.bin.xz"]))
    with pytest.raises(FileNotFoundError, match="data.train"):
        build_token_data(rc.data, batch_size=2, seq_len=8, rank=0, world_size=1, seed=0)


@pytest.mark.parametrize("model", [m for m in names("model") if family(m) == "gpt2"])
def test_model_loss_is_configurable(model):
    assert config_lib.load(compose_cfg([f"model={model}"])).model.loss == "auto"
    rc = config_lib.load(compose_cfg([f"model={model}", "model.loss=fused"]))
    assert rc.model.loss == "fused"
    assert config_lib.load(compose_cfg([f"model={model}"])).model.residual == "float32"
    rc = config_lib.load(compose_cfg([f"model={model}", "model.residual=autocast"]))
    assert rc.model.residual == "autocast"


def test_resolved_config_round_trips():
    rc = config_lib.load(compose_cfg([]))
    again = config_lib.load(OmegaConf.create(config_lib.to_dict(rc)))
    assert again == rc
