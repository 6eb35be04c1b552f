"""EfficientViT inference throughput, ours against timm's, in the same process (issue 4).

    python scripts/bench_efficientvit.py [--variants m0 m1 ...] [--batch 2048] [--img 224]
                                         [--attn sdpa] [--no-compile] [--out bench_efficientvit.json]

The paper's protocol: eval mode, BatchNorm folded into the convolutions / linears, fp16 autocast,
224x224 inputs already on the GPU, images/s = batch / median time of a forward. For every variant
both models get the same weights (timm's random init converted to ours, so the logits agree) and
run eager, then compiled (`torch.compile`). timm's model is folded through its own ``fuse()``
methods. Prints a table and writes JSON. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ops  # noqa: E402
from models.efficientvit import (  # noqa: E402
    EfficientViTConfig,
    build_efficientvit,
    from_timm_state_dict,
)
from scripts.bench_attention import _env  # noqa: E402

VARIANTS = ("m0", "m1", "m2", "m3", "m4", "m5")


def fold_timm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every timm sub-module that has ``fuse()`` (Conv+BN, BN+Linear) by its fused form."""
    for name, child in list(module.named_children()):
        if hasattr(child, "fuse") and callable(child.fuse):
            setattr(module, name, child.fuse())
        else:
            fold_timm(child)
    return module


def median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def models_for(variant: str, attn: str, img: int):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model(f"efficientvit_{variant}", pretrained=False, img_size=img)
    cfg = EfficientViTConfig(name=f"efficientvit_{variant}", variant=variant, img_size=img)
    ours = build_efficientvit(cfg, ops.build(attn))
    ours.load_state_dict(from_timm_state_dict(ref.state_dict()))
    ref, ours = ref.eval(), ours.eval()
    return fold_timm(ref).cuda(), ours.fuse_bn().cuda()


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--attn", default="sdpa", help="our attention backend")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="bench_efficientvit.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_efficientvit.py needs a CUDA GPU")
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    rows = []
    for v in args.variants:
        ref, ours = models_for(v, args.attn, args.img)
        x = torch.randn(args.batch, 3, args.img, args.img, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", torch.float16):
            diff = (ref(x[:8]).float() - ours(x[:8]).float()).abs().max().item()
            for mode in modes:
                for impl, model in (("timm", ref), ("ours", ours)):
                    torch._dynamo.reset()
                    fn_model = torch.compile(model) if mode == "compiled" else model
                    ms = median_ms(lambda m=fn_model, x=x: m(x), args.warmup, args.iters)
                    rows.append({"variant": v, "impl": impl, "mode": mode, "ms": ms,
                                 "images_per_s": args.batch / ms * 1e3,
                                 "max_abs_logit_diff_fp16": diff})  # fmt: skip
                    print(f"{v} {impl:4s} {mode:8s} {args.batch / ms * 1e3:10,.0f} img/s",
                          flush=True)  # fmt: skip
        del ref, ours, x
        torch.cuda.empty_cache()
    env = _env(timm=__import__("timm").__version__, batch=args.batch, img=args.img,
               attn=args.attn)  # fmt: skip
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(
        f"\n{env['gpu']} | torch {env['torch']} | timm {env['timm']} | batch {args.batch} "
        f"{args.img}x{args.img} fp16 autocast, BN folded"
    )
    print(f"{'variant':<8} {'mode':<9} {'timm img/s':>11} {'ours img/s':>11} {'ours/timm':>9}")
    for v in args.variants:
        for mode in modes:
            t, o = (
                next(r for r in rows if r["variant"] == v and r["mode"] == mode and r["impl"] == i)
                for i in ("timm", "ours")
            )
            ratio = o["images_per_s"] / t["images_per_s"]
            print(
                f"{v:<8} {mode:<9} {t['images_per_s']:11,.0f} {o['images_per_s']:11,.0f} {ratio:8.2f}x"
            )
    eager_timm = {r["variant"]: r["images_per_s"] for r in rows if r["impl"] == "timm"
                  and r["mode"] == "eager"}  # fmt: skip
    print("goal (issue 4): ours >= 1.3x timm eager and >= timm compiled")
    for v in args.variants:
        best = max(r["images_per_s"] for r in rows if r["variant"] == v and r["impl"] == "ours")
        print(f"  {v}: best ours {best:,.0f} = {best / eager_timm[v]:.2f}x timm eager")


if __name__ == "__main__":
    main()
