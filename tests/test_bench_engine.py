"""`python -m clawjax.bench engine` at a small size: three cases with finite positive times,
ratio = naive / engine, and the engine's steps give the naive steps' log-probs (<= 1e-4); the
CLI prints one row per case. No timing assertions."""

from __future__ import annotations

import math

import pytest

from clawjax.bench import engine as bench_engine

SMALL = dict(prompt=20, max_batch=4, context=64, hidden=32, layers=2, vocab=50, rounds=1)


def test_the_engine_steps_agree_with_the_naive_steps():
    rows = bench_engine.measure(**SMALL)
    assert [r["case"] for r in rows] == ["prefill 1 of 4 (T=32)", "prefill 4 of 4 (T=32)",
                                         "decode 4 rows (window 64 of 64)"]
    for r in rows:
        assert r["naive"] > 0 and r["engine"] > 0 and math.isfinite(r["ratio"]), r
        assert r["ratio"] == pytest.approx(r["naive"] / r["engine"]), r
        assert r["diff"] <= 1e-4, r


def test_cli_prints_a_row_per_case(capsys):
    assert bench_engine.main(["--prompt", "20", "--max-batch", "4", "--context", "64",
                              "--hidden", "32", "--vocab", "50", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    cases = [line.split("  ")[0] for line in out.splitlines()
             if line.startswith(("prefill", "decode"))]
    assert cases == ["prefill 1 of 4 (T=32)", "prefill 4 of 4 (T=32)",
                     "decode 4 rows (window 64 of 64)"], out


@pytest.mark.parametrize("argv,flag", [(["--prompt", "60", "--context", "64"], "--prompt"),
                                       (["--max-batch", "0"], "--max-batch"),
                                       (["--hidden", "30"], "--hidden")])
def test_bad_flags_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        bench_engine.main(argv)
    assert flag in capsys.readouterr().err
