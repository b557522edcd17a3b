"""Smoke runs of `python -m clawjax.bench loss` and `... pack` at tiny sizes (figures are not
asserted: no timing assertions in tests; the printed report must be complete)."""

from __future__ import annotations

from clawjax.bench import loss as bench_loss
from clawjax.bench import pack as bench_pack


def test_bench_loss_runs_and_reports_ratios(capsys):
    assert bench_loss.main(["--rows", "2", "--length", "64", "--hidden", "16", "--vocab", "512",
                            "--chunk", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for needle in ("naive", "chunked", "peak memory ratio", "time ratio",
                   "max relative gradient difference"):
        assert needle in out, out
    diff = float(out.split("max relative gradient difference")[1].split()[0])
    assert diff < 1e-4, out


def test_bench_pack_runs_and_reports_fill(capsys):
    assert bench_pack.main(["--samples", "64", "--seeds", "1", "--budgets", "8192"]) == 0
    out = capsys.readouterr().out
    assert "packed fill" in out and "pad-to-longest fill" in out, out
    fill = float(out.split("worst packed fill over budgets and seeds:")[1].split("%")[0])
    assert 50.0 < fill <= 100.0, out
