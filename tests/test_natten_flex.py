"""The FlexAttention peer of the benchmarks implements the same window as our reference."""

import pytest
import torch

import ops
from ops.neighborhood_ref import check_window

flex = pytest.importorskip("torch.nn.attention.flex_attention")

from scripts.natten_flex import natten_mask_mod  # noqa: E402


@pytest.mark.parametrize(
    "shape, k, d, s, c",
    [
        ((13,), 4, 2, 1, False),
        ((13,), 5, 1, 3, True),
        ((7, 9), (3, 4), (2, 1), (1, 2), (False, True)),
        ((5, 6, 4), (3, 2, 2), (1, 2, 1), (2, 1, 1), (True, False, False)),
    ],
)
def test_flex_mask_equals_reference_mask(shape, k, d, s, c):
    ks, ds, ss, cs = check_window(shape, k, d, s, c)
    mod = natten_mask_mod(shape, ks, ds, ss, cs)
    n = 1
    for L in shape:
        n *= L
    q_idx = torch.arange(n)[:, None].expand(n, n)
    kv_idx = torch.arange(n)[None, :].expand(n, n)
    got = mod(0, 0, q_idx, kv_idx)
    want = ops.neighborhood_mask(shape, ks, ds, ss, cs)
    assert torch.equal(got, want)
