"""Training throughput of GPT-2 124M: our trainer's step per position encoding vs a minimal GPT-2.

    python scripts/bench_train.py [--pos learned rope carope carope:fp32 rope+residual]
        [--loss auto] [--batch 32] [--rounds 6]
        [--tuning] [--compile-mode max-autotune-no-cudagraphs]

Each variant is compiled, runs bf16 autocast and fused AdamW with gradient clipping. The
minimal loop reads the loss back every step (as build-nanogpt-style loops print it); ours reads
the losses back every 10 steps, as train.py does with trainer.log_every=10. "ours" is the repository's own
train step (trainer.loop._train_step) on models.GPT2 through ops.build("sdpa"); "minimal" is a
single-file nanoGPT-style GPT-2 defined below with learned positions and the same settings.
``--loss`` sets model.loss for ours (auto = the fused linear + cross-entropy on CUDA; torch =
materialised logits, as the minimal model does); several values bench each one.
``--rounds R`` (R > 1) builds and compiles every variant first, then times them in R rounds,
the order reversed every other round (ABBA), and reports each variant's median. An H100 runs
this step at its power cap, its clock varying with the load, and interleaving makes sure that no
variant gains from when it ran. R = 1 times each variant once, right after compiling it.
Prints a table (tokens/s, ms/step, MFU) and writes JSON. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ops  # noqa: E402
from models import GPT2Config, PosConfig, build_model  # noqa: E402
from scripts.bench_attention import _env  # noqa: E402
from trainer.config import OptimConfig, TrainerConfig  # noqa: E402
from trainer.distributed import DistInfo  # noqa: E402
from trainer.loop import (  # noqa: E402
    _flush,
    _graph_step,
    _train_step,
    autocast_factory,
    clip_gradients,
    compile_model,
)
from trainer.monitor import peak_flops  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.step_graph import StepGraph  # noqa: E402


# ----------------------------------------------------------------------------- minimal GPT-2
class MinimalBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class MinimalGPT(nn.Module):
    def __init__(self, vocab=50304, seq=1024, d=768, h=12, layers=12):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(MinimalBlock(d, h) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def minimal_step(model, opt, x, y):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


# ----------------------------------------------------------------------------- harness
class RandomTokens:
    """Stands in for the data loader: fresh random tokens on the GPU every micro-batch."""

    def __init__(self, model, batch, seq, device):
        self.model, self.batch, self.seq, self.device = model, batch, seq, device

    def next_batch(self):
        x = torch.randint(0, 50257, (self.batch, self.seq + 1), device=self.device)
        return x[:, :-1], x[:, 1:]

    @staticmethod
    def loss(model, batch):
        return model(*batch)


def time_steps(step_fn, steps, warmup):
    for _ in range(warmup):
        step_fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def make_ours_step(pos, loss, args, dev):
    """Our model + optimizer + the trainer's step function; returns (step, model)."""
    torch.manual_seed(0)
    pos, *extras = pos.split("+")  # rope+graph: one CUDA graph; rope+residual: bf16 stream
    if set(extras) - {"graph", "residual"}:
        raise SystemExit(f"--pos {pos}+{'+'.join(extras)}: the suffixes are +graph "
                         "(trainer.step_graph) and +residual (model.residual=autocast)")  # fmt: skip
    cfg = GPT2Config(name="gpt2_small", n_layer=12, n_head=12, d_model=768, max_seq_len=args.seq,
                     loss=loss, residual="autocast" if "residual" in extras else "float32")  # fmt: skip
    name, _, proj = pos.partition(":")  # carope:fp32 -> pos.carope_proj=fp32
    pos_cfg = PosConfig(name=name, kernel=args.kernel, **({"carope_proj": proj} if proj else {}))
    model = build_model(cfg, ops.build("sdpa"), pos_cfg).to(dev)
    # the trainer's own schema (defaults + these overrides), so new optim keys reach the bench
    optim_cfg = OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=10, weight_decay=0.1,
                            betas=[0.9, 0.95], eps=1e-8, grad_clip=1.0)  # fmt: skip
    opt = build_optimizer(model, optim_cfg, dev)
    task = RandomTokens(model, args.batch, args.seq, dev)
    task.model = model
    trainer_cfg = TrainerConfig(compile=True, compile_tuning=args.tuning,
                                compile_mode=args.compile_mode)  # fmt: skip
    compiled = compile_model(model, trainer_cfg)
    rc = SimpleNamespace(optim=optim_cfg, trainer=trainer_cfg)
    info = DistInfo(device=dev)
    autocast = autocast_factory("auto", dev)
    counter, pending = [0], []

    graph = None
    if "graph" in extras:  # trainer.step_graph=true: forward, backward, clipping, AdamW replayed
        graph = StepGraph(task, compiled, opt, lambda: clip_gradients(model, optim_cfg),
                          autocast_factory("auto", dev, cache_enabled=False), dev)  # fmt: skip

    def step():  # as train.py runs it: losses read back (and NaN-checked) every 10 steps
        counter[0] += 1
        if graph is None:
            out = _train_step(task, compiled, opt, 1, autocast, info, rc, counter[0], 10_000)
        else:
            out = _graph_step(task, graph, rc, counter[0], 10_000)
        pending.append((counter[0], *out))
        if counter[0] % args.flush_every == 0:
            _flush(pending, info)

    return step, model


def make_minimal_step(args, dev):
    """The minimal GPT-2 + fused AdamW, compiled; returns (step, model)."""
    torch.manual_seed(0)
    model = MinimalGPT(seq=args.seq).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=6e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,
    )
    compiled = torch.compile(model)

    def step():
        x = torch.randint(0, 50257, (args.batch, args.seq + 1), device=dev)
        minimal_step(compiled, opt, x[:, :-1], x[:, 1:])

    return step, model


def build_variant(kind, pos, loss, args, dev):
    """A variant's step function and its (training flops a token, parameters)."""
    if kind == "minimal":
        step, model = make_minimal_step(args, dev)
        n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
        return step, (6 * n + 12 * 12 * 768 * args.seq, n)
    step, model = make_ours_step(pos, loss, args, dev)
    return step, (model.flops_per_token(args.seq), model.num_params())


def bench_rounds(variants, args, dev):
    """Compile every variant, then time them in args.rounds rounds (ABBA order); per variant:
    (median seconds a step, flops a token, params, seconds of each round)."""
    built = []
    for kind, pos, loss in variants:
        step, counts = build_variant(kind, pos, loss, args, dev)
        for _ in range(max(args.warmup, 1)):  # compile and warm up now, not inside a round
            step()
        torch.cuda.synchronize()
        built.append((step, counts, []))
        print(f"built {kind}/{pos}/loss={loss}", flush=True)
    order = list(range(len(built)))
    for r in range(args.rounds):
        for i in order if r % 2 == 0 else order[::-1]:
            step, _, secs = built[i]
            secs.append(time_steps(step, args.steps, 2))
    return [(statistics.median(secs), *counts, secs) for _, counts, secs in built]


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pos", nargs="+", default=["learned", "rope", "carope"],
                    help="ours: pos.name, each a variant; carope:fp32 / carope:autocast also "
                    "set pos.carope_proj; a +graph suffix (rope+graph) replays the step as one "
                    "CUDA graph (trainer.step_graph); +residual keeps the residual stream in "
                    "bf16 (model.residual=autocast, a change of arithmetic)")  # fmt: skip
    ap.add_argument("--no-minimal", action="store_true")
    ap.add_argument("--tuning", action="store_true", help="ours: trainer.compile_tuning=true")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "max-autotune-no-cudagraphs"],
                    help="ours: trainer.compile_mode (max-autotune-no-cudagraphs: Inductor "
                    "times Triton GEMM templates against cuBLAS and may fuse epilogues into "
                    "them; the same model, a longer first compile)")  # fmt: skip
    ap.add_argument(
        "--kernel", default="auto", choices=["auto", "torch", "triton"], help="ours: pos.kernel"
    )
    ap.add_argument(
        "--loss",
        nargs="+",
        default=["auto"],
        choices=["auto", "torch", "fused"],
        help="ours: model.loss (each value is a variant)",
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument(
        "--flush-every", type=int, default=10, help="ours: read losses back every N steps"
    )
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1,
                    help="R > 1: compile all variants first, then time them in R rounds in "
                    "alternating order and report medians")  # fmt: skip
    ap.add_argument("--out", default="bench_train.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_flops(dev, None)
    variants = [("minimal", None, "torch")] * (not args.no_minimal)
    variants += [("ours", p, loss) for p in args.pos for loss in args.loss]
    if args.rounds < 1:
        sys.exit(f"--rounds {args.rounds}: must be at least 1")
    rows = []
    t_start = time.perf_counter()
    if args.rounds > 1:
        timed = bench_rounds(variants, args, dev)
    for vi, (kind, pos, loss) in enumerate(variants):
        t0 = time.perf_counter()
        round_ms = None
        if args.rounds > 1:
            sec, fpt, n, secs = timed[vi]
            round_ms = [1e3 * x for x in secs]
            t0 = t_start
        else:
            torch._dynamo.reset()
            step, (fpt, n) = build_variant(kind, pos, loss, args, dev)
            sec = time_steps(step, args.steps, args.warmup)
        tok_s = args.batch * args.seq / sec
        mfu = fpt * tok_s / peak if peak else math.nan
        rows.append(
            {
                "impl": kind,
                "pos": pos or "learned",
                "flush_every": 1 if kind == "minimal" else args.flush_every,
                "compile_tuning": kind != "minimal" and args.tuning,
                "compile_mode": "default" if kind == "minimal" else args.compile_mode,
                "pos_kernel": None if kind == "minimal" else args.kernel,
                "loss": loss,
                "params": n,
                "ms_per_step": sec * 1e3,
                "round_ms": round_ms,
                "tokens_per_s": tok_s,
                "mfu": mfu,
                "wall_s": time.perf_counter() - t0,
            }
        )
        print(f"done {kind}/{pos}/loss={loss}: {tok_s:,.0f} tok/s", flush=True)
        torch.cuda.empty_cache()
    env = _env(batch=args.batch, seq=args.seq, steps=args.steps, rounds=args.rounds)
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    base = next((r["tokens_per_s"] for r in rows if r["impl"] == "minimal"), None)
    print(
        f"\n{env['gpu']} | torch {env['torch']} | triton {env['triton']} | B={args.batch} T={args.seq} bf16 compiled"
    )
    print(
        f"{'impl':<8} {'pos':<15} {'loss':<6} {'sync':>5} {'ms/step':>8} {'tok/s':>10} {'MFU':>6} {'vs minimal':>10}"
    )
    for r in rows:
        rel = f"{r['tokens_per_s'] / base:.3f}x" if base else "-"
        print(
            f"{r['impl']:<8} {r['pos']:<15} {r['loss']:<6} {r['flush_every']:>5} {r['ms_per_step']:8.1f} {r['tokens_per_s']:10,.0f} "
            f"{100 * r['mfu']:5.1f}% {rel:>10}"
        )
    base_rounds = next((r["round_ms"] for r in rows if r["impl"] == "minimal"), None)
    for r in rows:
        if r["round_ms"] is None:
            continue
        each = " ".join(f"{x:.1f}" for x in r["round_ms"])
        paired = ""
        if base_rounds and r["impl"] != "minimal":  # same round, neighbouring in time
            ratios = [b / x for b, x in zip(base_rounds, r["round_ms"])]
            paired = (f"; vs minimal round by round: median {statistics.median(ratios):.3f}x "
                      f"({min(ratios):.3f}-{max(ratios):.3f})")  # fmt: skip
        print(f"{r['impl']}/{r['pos']}: ms/step per round {each}{paired}")


if __name__ == "__main__":
    main()
