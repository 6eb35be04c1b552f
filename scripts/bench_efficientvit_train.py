"""EfficientViT training images/s, ours against timm's model in the same trainer (issue 4).

    python scripts/bench_efficientvit_train.py [--variants m0 m4] [--impls ours,timm]
        [--compile none,default,reduce-overhead] [--batch 256] [--steps 80]
        [--data synthetic,cpu,gpu-inline,gpu,gpu-process --root DIR | --generate N [--from-packed F]]
        [--workers 15] [--warmup 20] [--out bench_efficientvit_train.json]
        [-- extra train.py overrides]

Each cell is one ``train.py`` run (a fresh process) of ``experiment=efficientvit_mX_imagenet``
(the paper's recipe: AdamW, AGC 0.02, EMA, mixup/cutmix and label smoothing on the GPU, bf16
autocast, channels_last) on ``data=synthetic_images`` (one random batch already on the GPU, so
that no decoding or host copy is timed), with ``model.impl`` ours or timm and ``trainer.compile``
off or in the given ``torch.compile`` mode. Images/s is the trainer's own steady-state figure
(summary.json: every step after the first, evaluation and checkpoint time left out). Prints a
table and writes JSON. Needs a CUDA GPU.

``--data`` adds real loading, to see whether it keeps up with the step: ``cpu`` (``data=imagenet``
from the folder ``--root``, workers decode and augment, uint8 to the GPU), ``gpu-inline``
(``data.decode=gpu``, decoded in the training loop, ``data.decode_ahead=0``), ``gpu``
(``data.decode=gpu``, decoded ahead by two background threads, ``data.decode_process=false``) and
``gpu-process`` (the same in a child process of its own, ``data.decode_process=true``, the
default on CUDA). A ``--root`` holding a pixel store (``train.pixels`` and ``val/``, from
``scripts/shrink_image_folder.py --format pixels``) runs with ``data.kind=pixels``: the
training batches are read as raw pixels, not decoded. ``--generate N`` writes an
ImageNet-like folder of N 500x375 JPEGs first (``scripts/bench_image_loader.py``'s generator).
A loading cell runs ``--steps`` optimizer steps over that folder (several epochs if it is small).

Before the first timed cell of each (variant, impl, compile) an untimed synthetic run of
``--warmup`` steps fills the compile caches (inductor's, Triton's). A cell that compiles from
cold runs slower for the rest of its steps too: on an H100, M0 on synthetic data gave 12,179
images/s as the first cell of a call against 17,082 with warm caches (``docs/benchmarks.md``),
so without the warm-up the first cell is not comparable with the rest. ``--warmup 0`` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_efficientvit import VARIANTS  # noqa: E402

COMPILE_CHOICES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


DATA_CHOICES = ("synthetic", "cpu", "gpu-inline", "gpu", "gpu-process")


def data_overrides(data: str, steps: int, root: str | None, workers: int) -> list[str]:
    if data == "synthetic":  # one random batch already on the GPU
        return ["data=synthetic_images", f"data.synthetic_batches={steps}", "trainer.epochs=1"]
    decode = {"cpu": ["data.decode=cpu"], "gpu-inline": ["data.decode=gpu", "data.decode_ahead=0"],
              "gpu": ["data.decode=gpu", "data.decode_ahead=2", "data.decode_process=false"],
              "gpu-process": ["data.decode=gpu", "data.decode_ahead=2",
                              "data.decode_process=true"]}[data]  # fmt: skip
    store = (Path(root) / "train.pixels").is_file()  # a pixel store: data.kind=pixels
    return ["data=imagenet", f"data.root={root}", f"data.num_workers={workers}",
            *(["data.kind=pixels"] if store else []),
            f"model.num_classes={_classes(root)}", "trainer.epochs=null",
            f"trainer.max_steps={steps}", "optim.schedule_unit=step", "optim.warmup_steps=5",
            *decode]  # fmt: skip


def _classes(root: str) -> int:
    split = Path(root) / "train"
    return sum(1 for p in (split if split.is_dir() else Path(root) / "val").iterdir() if p.is_dir())


def run_cell(variant: str, impl: str, compile_: str, batch: int, steps: int, extra: list[str],
             run_dir: Path, data: list[str] | None = None,
             timeout: float | None = None) -> dict:  # fmt: skip
    overrides = [
        f"experiment=efficientvit_{variant}_imagenet",
        *(data or data_overrides("synthetic", steps, None, 0)), f"trainer.global_batch={batch}",
        f"trainer.micro_batch={batch}", "trainer.eval_every=1000000",
        "trainer.ckpt_every=1000000", "trainer.log_every=20", "logger=none",
        "trainer.progress=false", f"model.impl={impl}", f"trainer.run_dir={run_dir}",
        "trainer.resume=never", f"trainer.compile={'false' if compile_ == 'none' else 'true'}",
    ]  # fmt: skip
    if compile_ != "none":
        overrides.append(f"trainer.compile_mode={compile_}")
    t0 = time.perf_counter()
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}  # a failed cell shows its whole traceback
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, *extra],
                              cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as e:  # its output so far (trainer.watchdog_s's stacks)
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        lines = (err or "").strip().splitlines()
        print("\n".join(["  | " + ln for ln in lines[-80:]]), file=sys.stderr, flush=True)
        return {"error": f"killed after --cell-timeout {timeout:g} s",
                "wall_s": time.perf_counter() - t0}  # fmt: skip
    wall = time.perf_counter() - t0
    summary_path = run_dir / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        print("\n".join(["  | " + ln for ln in lines[-30:]]), file=sys.stderr, flush=True)
        tail = lines[-3:]
        return {"error": " | ".join(tail), "wall_s": wall}
    s = json.loads(summary_path.read_text())
    ips = s["images_per_s"]
    return {"images_per_s": ips, "ms_per_step": 1e3 * batch / ips if ips else None,
            "peak_memory_gib": s["peak_memory_gib"], "train_loss": s["train_loss"],
            "wall_s": wall}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["m0"], choices=VARIANTS)
    ap.add_argument("--impls", default="ours,timm", help="comma list of model.impl values")
    ap.add_argument("--compile", default="none,default",
                    help=f"comma list of: {', '.join(COMPILE_CHOICES)}")  # fmt: skip
    ap.add_argument("--batch", type=int, default=256, help="images per step (one GPU)")
    ap.add_argument("--steps", type=int, default=80, help="steps per run (the first is not timed)")
    ap.add_argument("--cell-timeout", type=float, default=None,
                    help="kill a run after this many seconds and print the end of its stderr "
                    "(with -- trainer.watchdog_s=S, where its threads waited)")  # fmt: skip
    ap.add_argument("--data", default="synthetic", help=f"comma list of: {', '.join(DATA_CHOICES)}")
    ap.add_argument("--root", help="ImageNet-style folder (train/, val/), or a pixel store "
                    "(train.pixels, val/), for the loading cells")  # fmt: skip
    ap.add_argument("--generate", type=int, default=0, help="write N JPEGs to a temporary --root")
    ap.add_argument("--from-packed", default=None, help="packed .npz(.xz) set to upscale from")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="data.num_workers of the loading cells")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=20,
                    help="steps of an untimed synthetic run before each model's first cell "
                         "(warm compile caches); 0: none")  # fmt: skip
    ap.add_argument("--out", default="bench_efficientvit_train.json")
    ap.add_argument("extra", nargs="*", help="more train.py overrides (after --)")
    args = ap.parse_args()
    impls = [i for i in args.impls.split(",") if i]
    modes = [m for m in args.compile.split(",") if m]
    bad = [m for m in modes if m not in COMPILE_CHOICES] + [
        i for i in impls if i not in ("ours", "timm")
    ]
    if bad:
        ap.error(f"unknown --compile/--impls value(s) {bad}; --compile takes {COMPILE_CHOICES}, "
                 "--impls takes ours, timm")  # fmt: skip
    datas = [d for d in args.data.split(",") if d]
    if [d for d in datas if d not in DATA_CHOICES]:
        ap.error(f"--data takes {DATA_CHOICES}, got {datas}")
    if set(datas) - {"synthetic"} and not (args.root or args.generate):
        ap.error(
            "the loading cells (--data cpu, gpu-inline, gpu, gpu-process) need --root or --generate"
        )
    if args.steps < 3:
        ap.error("--steps must be at least 3 (the first step is compilation and is not timed)")
    if args.warmup and args.warmup < 3:
        ap.error("--warmup must be 0 (none) or at least 3 steps")

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_efficientvit_train.py times GPU training: no CUDA device here")
    from scripts.bench_attention import _env

    rows = []
    env = _env(batch=args.batch, steps=args.steps, extra=args.extra, data=datas,
               workers=args.workers, root=args.root, generate=args.generate,
               warmup=args.warmup)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if args.generate:
            from scripts.bench_image_loader import generate_folder

            t0 = time.perf_counter()
            root = str(generate_folder(Path(tmp) / "images", args.generate, (500, 375),
                                       args.from_packed))  # fmt: skip
            print(f"wrote {args.generate} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
        warmed = set()
        for variant in args.variants:
            for mode in modes:
                for data in datas:
                    for impl in impls:
                        if args.warmup and (variant, impl, mode) not in warmed:
                            warmed.add((variant, impl, mode))
                            warm = run_cell(variant, impl, mode, args.batch, args.warmup,
                                            args.extra, Path(tmp) / f"warm_{variant}_{impl}_{mode}",
                                            data_overrides("synthetic", args.warmup, None, 0))  # fmt: skip
                            print(f"{variant} {impl:<5} compile={mode:<16} warm-up, {args.warmup} "
                                  f"synthetic steps, untimed{'' if 'images_per_s' in warm else ' (failed)'}"
                                  f"  ({warm['wall_s']:.0f} s)", flush=True)  # fmt: skip
                        run_dir = Path(tmp) / f"{variant}_{impl}_{mode}_{data}"
                        over = data_overrides(data, args.steps, root, args.workers)
                        cell = run_cell(variant, impl, mode, args.batch, args.steps, args.extra,
                                        run_dir, over, args.cell_timeout)  # fmt: skip
                        row = {"variant": variant, "impl": impl, "compile": mode, "data": data,
                               **cell}  # fmt: skip
                        rows.append(row)
                        # after every cell: a run stopped part-way keeps what it measured
                        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
                        shown = (f"{cell['images_per_s']:>9,.0f} img/s "
                                 f"{cell['ms_per_step']:6.1f} ms/step" if "images_per_s" in cell
                                 else f"failed: {cell['error']}")  # fmt: skip
                        print(f"{variant} {impl:<5} compile={mode:<16} data={data:<10} {shown}  "
                              f"({cell['wall_s']:.0f} s)", flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"\n{env['gpu']} | torch {env['torch']} | batch {args.batch}, 224², bf16 autocast, "
          "channels_last, paper recipe; training images/s (data: synthetic = one batch already "
          f"on the GPU; cpu, gpu-inline, gpu, gpu-process = loading with {args.workers} workers)")  # fmt: skip
    head = f"{'variant':<8}{'compile':<28}{'data':<12}" + "".join(f"{i:>12}" for i in impls)
    both = {"ours", "timm"} <= set(impls)
    print(head + ("   ours/timm" if both else ""))
    for at in range(0, len(rows), len(impls)):  # one line per cell, repeated --data included
        cells = dict(zip(impls, rows[at : at + len(impls)]))
        first = rows[at]
        vals = [cells[i].get("images_per_s") for i in impls]
        line = f"{first['variant']:<8}{first['compile']:<28}{first['data']:<12}" + "".join(
            f"{v:>12,.0f}" if v else f"{'failed':>12}" for v in vals
        )
        if both:
            o, t = cells["ours"].get("images_per_s"), cells["timm"].get("images_per_s")
            line += f"{o / t:>11.2f}x" if o and t else f"{'-':>12}"
        print(line)


if __name__ == "__main__":
    main()
