"""scripts/bench_gemm_fp8.py on the CPU: the FP8 GEMMs it times compute the bf16 products
(operand layouts and scales right), and its projection adds up."""

from __future__ import annotations

import pytest
import torch

from scripts import bench_gemm_fp8


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="no torch._scaled_mm")
def test_fp8_gemms_match_bf16_and_the_projection_adds_up(tmp_path, capsys):
    out = tmp_path / "fp8.json"
    res = bench_gemm_fp8.main(["--tokens", "32", "--reps", "1", "--step-ms", "70",
                               "--out", str(out)])  # fmt: skip
    assert [r["layer"] for r in res["rows"]] == [name for name, *_ in bench_gemm_fp8.LAYERS]
    bf16 = sum(r["bf16_ms"] * r["count"] for r in res["rows"])
    for recipe in bench_gemm_fp8.RECIPES:
        # e4m3/e5m2 round to 3/2 mantissa bits: a few percent, where a wrong layout or scale
        # gives ~140%
        errs = [r[recipe]["rel_err"] for r in res["rows"]]
        assert all(0 < e < 0.1 for e in errs), (recipe, errs)
        tot = res[recipe]
        assert tot["projected_step_ms"] == pytest.approx(
            70 - bf16 + tot["fp8_gemm_ms"] + tot["cast_ms"]
        )
    assert out.exists() and capsys.readouterr().out.count("Projected step") == 2


def test_rowwise_casts_scale_each_row():
    x = torch.randn(40, 24, dtype=torch.bfloat16) * torch.logspace(-3, 3, 40)[:, None]
    x8, inv = bench_gemm_fp8._to_fp8_rows(x)
    assert inv.shape == (40, 1) and (x8.float().abs().amax(1) == 448).all()
    back = x8.float() * inv
    assert ((back - x.float()).abs() <= 0.07 * x.float().abs().amax(1, keepdim=True)).all()
    w8, sw, wt8, swt = bench_gemm_fp8._weight_rows_and_cols(x)
    assert sw.shape == (1, 40) and swt.shape == (1, 24) and wt8.is_contiguous()
    assert wt8.t().stride() == (1, 40)  # (40, 24) column-major: _scaled_mm's second operand


def test_casts_scale_into_range_and_back():
    x = torch.randn(40, 24, dtype=torch.bfloat16) * 1000
    for dtype in (bench_gemm_fp8.E4M3, bench_gemm_fp8.E5M2):
        x8, xt8, inv = bench_gemm_fp8._to_fp8_both(x, dtype)
        assert x8.dtype == dtype and torch.equal(xt8, x8.t().contiguous().view(xt8.shape))
        assert x8.float().abs().max() == torch.finfo(dtype).max  # the largest value maps to max
        back = x8.float() * inv
        assert ((back - x.float()).abs() <= 0.13 * x.float().abs() + 1e-3 * 1000).all()
