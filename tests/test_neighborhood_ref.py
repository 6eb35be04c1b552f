"""NATTEN window semantics against a brute-force definition; the NA reference backend."""

import itertools

import pytest
import torch

import ops
from models import GPT2Config, PosConfig, build_model
from ops.neighborhood_ref import axis_mask


def brute_axis(L, K, S, d, causal):
    """Window of every query found by search, from the prose definition (not the closed form)."""
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        g, p = i % d, i // d
        members = [j for j in range(L) if j % d == g]  # the dilation group, in order
        lg = len(members)
        first = (p // S) * S  # stride group of queries sharing one window
        if causal:
            leader = min(first + S - 1, lg - 1)
            window = [q for q in range(lg) if leader - K + 1 <= q <= p]
        else:
            leader = min(first + S // 2, lg - 1)
            best = min(range(lg - K + 1), key=lambda s: abs(s + K // 2 - leader))
            window = list(range(best, best + K))
        for q in window:
            mask[i, members[q]] = True
    return mask


def small_cases():
    for L in range(2, 13):
        for K in range(2, L + 1):
            for d in range(1, L // K + 1):
                for S in range(1, K + 1):
                    yield L, K, S, d


def test_window_rule_matches_brute_force_for_every_small_size():
    n = 0
    for L, K, S, d in small_cases():
        for causal in (False, True):
            got = axis_mask(L, K, S, d, causal)
            want = brute_axis(L, K, S, d, causal)
            assert torch.equal(got, want), (L, K, S, d, causal)
            n += 1
    assert n > 500


def test_window_properties():
    for L, K, S, d in small_cases():
        m = axis_mask(L, K, S, d, False)
        assert (m.sum(1) == K).all(), (L, K, S, d)  # exactly K keys, shifted at borders
        mc = axis_mask(L, K, S, d, True)
        i = torch.arange(L)
        assert mc[i, i].all() and not torch.triu(mc, 1).any()  # ends at the query
        if S == 1:
            assert m[i, i].all()  # the query is in its own window


def test_known_examples():
    rows = lambda m, i: m[i].nonzero().flatten().tolist()  # noqa: E731
    assert rows(axis_mask(10, 3, 1, 1, False), 0) == [0, 1, 2]
    assert rows(axis_mask(10, 3, 1, 1, False), 9) == [7, 8, 9]
    assert rows(axis_mask(10, 4, 1, 1, False), 5) == [3, 4, 5, 6]  # even kernel: one more left
    assert rows(axis_mask(10, 3, 1, 2, False), 4) == [2, 4, 6]  # dilation 2
    assert rows(axis_mask(11, 3, 1, 2, False), 9) == [5, 7, 9]  # odd group at its end
    assert rows(axis_mask(10, 3, 1, 1, True), 5) == [3, 4, 5]
    assert rows(axis_mask(10, 3, 1, 1, True), 1) == [0, 1]
    assert rows(axis_mask(10, 4, 2, 1, False), 2) == rows(
        axis_mask(10, 4, 2, 1, False), 3
    )  # stride


def test_multi_axis_mask_is_the_product():
    shape, ks, ds, cs = (5, 6, 4), (3, 4, 2), (1, 1, 2), (False, True, False)
    m = ops.neighborhood_mask(shape, ks, ds, 1, cs)
    per = [axis_mask(L, k, 1, d, c) for L, k, d, c in zip(shape, ks, ds, cs)]
    idx = list(itertools.product(*(range(L) for L in shape)))
    for a, qa in enumerate(idx):
        for b, kb in enumerate(idx):
            assert m[a, b] == all(p[x, y] for p, x, y in zip(per, qa, kb))


@pytest.mark.parametrize("shape", [(9,), (5, 6), (3, 4, 5)])
def test_reference_equals_dense_when_the_window_covers_everything(shape):
    torch.manual_seed(0)
    q = torch.randn(2, *shape, 4, 8, dtype=torch.float64)
    k = torch.randn(2, *shape, 2, 8, dtype=torch.float64)
    v = torch.randn(2, *shape, 2, 8, dtype=torch.float64)
    na = ops.build("neighborhood_reference", kernel_size=list(shape))
    out, lse = na(q, k, v, return_lse=True)
    ref, ref_lse = ops.reference_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_reference_restricts_attention_to_the_window():
    torch.manual_seed(1)
    q, k = torch.randn(1, 6, 6, 2, 8), torch.randn(1, 6, 6, 2, 8)
    v = torch.zeros(1, 6, 6, 2, 8)
    v[:, 0, 0] = 1.0  # only token (0, 0) carries a value
    out = ops.build("neighborhood_reference", kernel_size=3)(q, k, v)
    seen = out[0, ..., 0, 0] > 0  # (X, Y): which queries have (0, 0) in their window
    want = ops.neighborhood_mask((6, 6), 3)[:, 0].reshape(6, 6)
    assert torch.equal(seen, want)


@pytest.mark.parametrize(
    "shape, opts, match",
    [
        (
            (8,),
            {"kernel_size": 5, "dilation": 2},
            "kernel_size \\* dilation = 5 \\* 2 = 10 is larger than axis 0 of length 8",
        ),
        ((8,), {"kernel_size": 3, "stride": 4}, "stride must be in \\[1, kernel_size=3\\], got 4"),
        ((8, 8), {"kernel_size": [3, 3, 3]}, "kernel_size=\\[3, 3, 3\\]: give one value or 2"),
        ((8,), {"kernel_size": 1}, "kernel_size must be an integer >= 2"),
    ],
)
def test_natten_like_errors(shape, opts, match):
    x = torch.randn(1, *shape, 2, 8)
    with pytest.raises(ValueError, match=match):
        ops.build("neighborhood_reference", **opts)(x, x, x)


def test_mismatched_token_layouts():
    with pytest.raises(ValueError, match="same token layout"):
        ops.build("neighborhood_reference", kernel_size=3)(
            torch.randn(1, 8, 2, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
        )


def test_gpt2_causal_window_covering_the_sequence_equals_causal_sdpa():
    torch.manual_seed(2)
    cfg = GPT2Config(n_layer=2, n_head=4, d_model=32)
    dense = build_model(cfg, ops.build("sdpa"), PosConfig(name="rope")).double()
    na = build_model(
        cfg, ops.build("neighborhood_reference", kernel_size=16), PosConfig(name="rope")
    ).double()
    na.load_state_dict(dense.state_dict())
    idx = torch.randint(0, 50257, (2, 16))
    torch.testing.assert_close(na(idx), dense(idx))
    short = build_model(
        cfg, ops.build("neighborhood_reference", kernel_size=4), PosConfig(name="rope")
    ).double()
    short.load_state_dict(dense.state_dict())
    assert not torch.allclose(short(idx), dense(idx))
    torch.testing.assert_close(short(idx)[:, :4], dense(idx)[:, :4])  # first 4 tokens see all
