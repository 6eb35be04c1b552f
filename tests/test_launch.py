"""ops.launch: the compiled-kernel cache keys at least what Triton specializes on."""

import pytest
import torch

import ops
from ops import launch as L


def test_keys_separate_what_triton_specializes_on():
    ints = [0, 1, 2, 16, 17, 32, 2**31 - 1, 2**31, 2**63]
    keys = [L._spec(x) for x in ints]
    assert keys[1] != keys[2]  # == 1 is a constant in Triton
    assert keys[3] == keys[5] != keys[4]  # divisibility by 16
    assert keys[6] != keys[7] != keys[8]  # 32-bit, 64-bit, unsigned 64-bit
    base = torch.zeros(64, dtype=torch.float16)
    assert L._spec(base) != L._spec(base[1:])  # a 2-byte offset breaks 16-byte alignment
    assert L._spec(base) == L._spec(base[8:])  # 16 bytes further: same alignment
    assert L._spec(base) != L._spec(base.float())  # dtype
    assert L._spec(None) != L._spec(False) != L._spec(True)
    with pytest.raises(L._Uncached):
        L._spec(object())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cached_launches_follow_alignment_and_shapes():
    """Repeated, misaligned and reshaped calls through the cache equal SDPA (a key too coarse
    would reuse a kernel compiled for aligned pointers or other shapes)."""
    attn = ops.build("flash")
    torch.manual_seed(0)
    for n, offset in ((256, 0), (256, 0), (256, 1), (256, 8), (200, 0), (256, 0)):
        buf = torch.randn(3 * 2 * n * 4 * 64 + offset, device="cuda", dtype=torch.float16)
        q, k, v = buf[offset:].view(3, 2, n, 4, 64).unbind(0)
        assert (q.data_ptr() % 16 == 0) == (offset % 8 == 0)
        out = attn(q, k, v, causal=True)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2).float() for t in (q, k, v)), is_causal=True
        ).transpose(1, 2)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_second_launch_of_a_key_goes_to_the_compiled_kernel_with_all_arguments(monkeypatch):
    """The cache's own path, with stand-ins for Triton's JIT and compiled kernels: the first call
    of a key goes through kernel[grid](...), later ones call the compiled kernel with every
    parameter in order (positional, then keywords and defaults); a new key compiles again."""
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *a: calls.append(("direct", grid, a))

    def body(x, n, BLOCK=None, FLAG=7):  # a kernel's signature
        pass

    class Jit:
        fn = staticmethod(body)

        def __getitem__(self, grid):
            def run(*a, **kw):
                calls.append(("triton", grid, a, kw))
                return Compiled()

            return run

    monkeypatch.setattr(L, "_INTERPRET", False)
    monkeypatch.setattr(L, "_JITFunction", Jit)
    monkeypatch.setattr(L, "_COMPILED", {})
    kernel, x = Jit(), torch.zeros(4)
    L.launch(kernel, (2,), x, 5, BLOCK=16, num_warps=4)
    L.launch(kernel, (3,), x, 5, BLOCK=16, num_warps=4)
    L.launch(kernel, (3,), x, 6, BLOCK=16, num_warps=4)  # another int: another key
    assert [c[0] for c in calls] == ["triton", "direct", "triton"]
    assert calls[1][1] == (3, 1, 1) and calls[1][2][1:] == (5, 16, 7)
    assert calls[1][2][0] is x


def test_under_torch_compile_launch_only_calls_kernel_grid(monkeypatch):
    """While Dynamo traces, launch() must do nothing but ``kernel[grid](...)``, which Dynamo
    captures as a user kernel: it cannot evaluate isinstance() on a Triton kernel and broke
    the graph there, once per launch (GPT-2's compiled step split at every rotary kernel).
    Here the type check raises if it is reached."""

    class Raises(type):
        def __instancecheck__(cls, obj):
            raise AssertionError("launch() checked the kernel's type while compiling")

    class NoJit(metaclass=Raises):
        pass

    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((grid, a, kw))

    monkeypatch.setattr(L, "_INTERPRET", False)
    monkeypatch.setattr(L, "_JITFunction", NoJit)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.zeros(4)
    L.launch(Kernel(), (2,), x, 5, BLOCK=16)
    assert calls == [((2,), (x, 5), {"BLOCK": 16})]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn", ["flash", "hyper", "simplicial", "neighborhood"])
def test_compiled_model_through_launch_equals_eager_gpu(attn):
    """A GPT-2 with our attention kernels (and the Triton RoPE) under torch.compile: Dynamo
    captures every launch() (no graph break; HyperAttention breaks the graph around its own
    call only, on purpose: see ``ops.hyper._opaque``) and the loss and gradients equal eager's."""
    from models import GPT2Config, PosConfig, build_model

    torch.manual_seed(0)
    cfg = GPT2Config(name="nano", n_layer=2, n_head=4, d_model=128, max_seq_len=256,
                     loss="torch")  # fmt: skip
    options = {"hyper": dict(min_seq_len=64, block_size=64, sample_size=64),  # its kernels
               "simplicial": dict(every=2, w1=16, w2=32),
               "neighborhood": dict(kernel_size=65)}.get(attn, {})  # fmt: skip
    backend = ops.build(attn, **options)
    model = build_model(cfg, backend, PosConfig(name="rope", kernel="triton")).cuda()
    idx = torch.randint(0, 50257, (2, 257), device="cuda")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = []
    for fn in (model, torch.compile(model)):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn(idx[:, :-1], idx[:, 1:])
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    if attn == "hyper":
        breaks = {k: n for k, n in breaks.items() if "_opaque" not in k}
    assert not breaks, breaks
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=2e-3, atol=2e-3)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


# Triton's compiled launch binds a kernel's arguments in a generated function whose locals
# (params, specialization, options) and globals (backend, specialize_impl, JITCallable) shadow
# a parameter of the same name: that argument then reaches the specializer as the wrong object
# ("failed to specialize argument of type: dict"). The interpreter never runs the binder, so
# only this check catches it on a CPU.
_BINDER_NAMES = {"params", "specialization", "options", "backend", "specialize_impl",
                 "JITCallable"}  # fmt: skip


def test_no_kernel_parameter_shadows_tritons_binder():
    import importlib
    import inspect
    import pkgutil

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kinds = (JITFunction, InterpretedFunction)  # (the second under TRITON_INTERPRET=1)

    seen, bad = 0, []
    for pkg in ("ops", "data", "trainer", "models"):
        base = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(base.__path__, pkg + "."):
            mod = importlib.import_module(info.name)
            for name, obj in vars(mod).items():
                if isinstance(obj, kinds) and obj.fn.__module__ == info.name:
                    seen += 1
                    args = set(inspect.signature(obj.fn).parameters)
                    bad += [f"{info.name}.{name}({a})" for a in args & _BINDER_NAMES]
    assert seen > 20, seen  # the walk found the kernels
    assert not bad, bad
