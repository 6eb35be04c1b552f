"""EfficientViT inference throughput, ours against timm's, in the same process (issue 4).

    python scripts/bench_efficientvit.py [--variants m0 m1 ...] [--batch 2048] [--img 224]
                                         [--attn sdpa] [--no-compile] [--impls timm,timm_cl,ours,ours_plain]
                                         [--compile-impls timm,timm_cl]
                                         [--out bench_efficientvit.json]

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


def models_for(variant: str, attn: str, img: int, impls=("timm", "ours")) -> dict:
    """The models to time, by name, all holding timm's random init (converted for ours):

    timm        timm's model as created (NCHW), its Conv+BN folded: the paper's protocol
    timm_cl     the same, channels_last (timm's fastest eager layout here)
    ours        ``fuse_bn()``: folded, fused CGA kernel, channels_last (our inference copy)
    ours_plain  ``fuse_bn(fused_attention=False, channels_last=False)``: the per-head path
    """
    import copy

    import timm

    torch.manual_seed(0)
    ref = timm.create_model(f"efficientvit_{variant}", pretrained=False, img_size=img)
    cfg = EfficientViTConfig(name=f"efficientvit_{variant}", variant=variant, img_size=img)
    ours = build_efficientvit(cfg, ops.build(attn))
    ours.load_state_dict(from_timm_state_dict(ref.state_dict()))
    ref, ours = fold_timm(ref.eval()).cuda(), ours.eval()
    make = {
        "timm": lambda: ref,
        "timm_cl": lambda: copy.deepcopy(ref).to(memory_format=torch.channels_last),
        "ours": lambda: ours.fuse_bn().cuda(),
        "ours_plain": lambda: ours.fuse_bn(fused_attention=False, channels_last=False).cuda(),
    }
    return {name: make[name]() for name in impls}


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--attn", default="sdpa", help="our attention backend")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--impls",
        default="timm,timm_cl,ours,ours_plain",
        help="comma list of timm, timm_cl, ours, ours_plain (models_for)",
    )
    ap.add_argument(
        "--compile-impls", default=None, help="compile only these (default: all of --impls)"
    )
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="bench_efficientvit.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_efficientvit.py needs a CUDA GPU")
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    impls = [s.strip() for s in args.impls.split(",")]
    compile_impls = impls if args.compile_impls is None else args.compile_impls.split(",")
    env = _env(timm=__import__("timm").__version__, batch=args.batch, img=args.img,
               attn=args.attn)  # fmt: skip
    rows = []
    for v in args.variants:
        models = models_for(v, args.attn, args.img, impls)
        x = torch.randn(args.batch, 3, args.img, args.img, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", torch.float16):
            want = models[impls[0]](x[:8]).float()
            for mode in modes:
                for impl, model in models.items():
                    if mode == "compiled" and impl not in compile_impls:
                        continue
                    torch._dynamo.reset()
                    fn_model = torch.compile(model) if mode == "compiled" else model
                    diff = (fn_model(x[:8]).float() - want).abs().max().item()
                    ms = median_ms(lambda m=fn_model, x=x: m(x), args.warmup, args.iters)
                    rows.append({"variant": v, "impl": impl, "mode": mode, "ms": ms,
                                 "images_per_s": args.batch / ms * 1e3,
                                 f"max_abs_logit_diff_vs_{impls[0]}_eager_fp16": diff})  # fmt: skip
                    print(f"{v} {impl:10s} {mode:8s} {args.batch / ms * 1e3:10,.0f} img/s "
                          f"(max |logit diff| {diff:.2e})", flush=True)  # fmt: skip
        del models, x
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))  # so far
    print(
        f"\n{env['gpu']} | torch {env['torch']} | timm {env['timm']} | batch {args.batch} "
        f"{args.img}x{args.img} fp16 autocast, BN folded; images/s"
    )
    cols = [(i, m) for m in modes for i in impls]
    print(f"{'variant':<8}" + "".join(f"{i + ' ' + m[:4]:>17}" for i, m in cols))
    get = {(r["variant"], r["impl"], r["mode"]): r["images_per_s"] for r in rows}
    for v in args.variants:
        print(f"{v:<8}" + "".join(f"{get.get((v, i, m), float('nan')):17,.0f}" for i, m in cols))
    if "timm" in impls and "ours" in impls:
        print("goal (issue 4): ours >= 1.3x timm eager and >= timm compiled")
        for v in args.variants:
            line = f"  {v}: ours eager / timm eager {get[v, 'ours', 'eager'] / get[v, 'timm', 'eager']:.2f}x"
            if "timm_cl" in impls:
                line += f" (/ timm channels_last eager {get[v, 'ours', 'eager'] / get[v, 'timm_cl', 'eager']:.2f}x)"
            tcs = [get[v, t, "compiled"] for t in ("timm", "timm_cl") if (v, t, "compiled") in get]
            if tcs:
                best = max(get[v, "ours", m] for m in modes if (v, "ours", m) in get)
                tc = max(tcs)
                line += f"; best ours / best timm compiled {best / tc:.2f}x"
            print(line)


if __name__ == "__main__":
    main()
