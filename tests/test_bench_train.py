"""`python -m clawjax.bench train`: smoke run at its smallest size, and the torch side's packing.

No timing assertions: the smoke run checks the table has a row per size with finite, positive
figures and that clawjax and torch computed the same first-step loss (≤ 1e-4); the packing test
checks the torch baseline's 4-D block-diagonal mask against each sequence run alone.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from clawjax.batch import pack
from clawjax.bench import train as bench_train
from clawjax.sample import Sample

import hf_tiny


def test_quick_bench_prints_both_rows_with_finite_ratio(capsys):
    assert bench_train.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in ("tiny", "small") and len(cells) == 7:
            rows[cells[0]] = cells
    assert set(rows) == {"tiny", "small"}, out
    for name, cells in rows.items():
        tokens, jax_tps, torch_tps = int(cells[1]), float(cells[2]), float(cells[3])
        ratio = float(cells[4].rstrip("x"))
        assert tokens > 0 and jax_tps > 0 and torch_tps > 0, cells
        assert math.isfinite(ratio) and ratio > 0, cells
        assert abs(ratio - jax_tps / torch_tps) <= 0.01 * ratio + 0.01, cells
    diffs = [float(d) for d in re.findall(r"\|diff\|=([0-9.e+-]+)", out)]
    assert len(diffs) == 2 and max(diffs) <= 1e-4, out


def test_torch_packed_rows_match_each_sequence_alone():
    """The torch baseline's packed rows (restarted position_ids + block-diagonal causal mask)
    give each segment the logits it has alone; the guard shows a plain causal mask differs."""
    model = hf_tiny.build("qwen3", seed=1)
    rng = np.random.default_rng(3)
    samples = [Sample(sample_id=f"s{i}", tokens=rng.integers(1, hf_tiny.VOCAB, n).astype(np.int32),
                      response_len=2, rollout_logp=[-1.0, -2.0]) for i, n in enumerate((9, 6, 12))]
    (batch,) = pack(samples, 32, row_buckets=(1,))
    inputs = bench_train.torch_inputs(batch)
    with torch.no_grad():
        packed = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                       attention_mask=inputs["attention_mask"]).logits[0].numpy()
        crossing = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                         ).logits[0].numpy()
    seg = np.asarray(batch.segment_ids)[0]
    tokens = np.asarray(batch.tokens)[0]
    assert sorted(set(seg[seg > 0])) == [1, 2, 3]
    worst_crossing = 0.0
    for s in (1, 2, 3):
        where = np.flatnonzero(seg == s)
        alone = hf_tiny.torch_logits(model, tokens[where][None])[0]
        np.testing.assert_allclose(packed[where], alone, atol=1e-5, rtol=0)
        worst_crossing = max(worst_crossing, float(np.abs(crossing[where] - alone).max()))
    assert worst_crossing > 1e-3


def test_torch_loss_matches_numpy_reference():
    """`torch_loss` against a float64 NumPy loop over samples (SPEC §1, §2, §4)."""
    rng = np.random.default_rng(0)
    vocab = 50
    samples = []
    for i, n in enumerate((10, 7, 12, 5)):
        resp = n // 2
        samples.append(Sample(
            sample_id=f"s{i}", tokens=rng.integers(1, vocab, n).astype(np.int32),
            response_len=resp, rollout_logp=-rng.uniform(2.0, 5.0, resp).astype(np.float32),
            reward=float(rng.choice([-1.0, 1.0])), kind="both" if i % 2 else "rl",
            teacher_logp=(-rng.uniform(2.0, 5.0, resp)).astype(np.float32) if i % 2 else None,
            loss_mask=(rng.uniform(size=resp) < 0.8).astype(np.float32) if i == 2 else None))
    (batch,) = pack(samples, 20, row_buckets=(4,))
    logits = rng.normal(scale=2.0, size=(*np.asarray(batch.tokens).shape, vocab))
    loss, _ = bench_train.torch_loss(torch.as_tensor(logits, dtype=torch.float32),
                                     bench_train.torch_inputs(batch))

    tokens, seg = np.asarray(batch.tokens), np.asarray(batch.segment_ids)
    logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    means = []
    for r in range(tokens.shape[0]):
        for s in set(seg[r][seg[r] > 0]):
            idx = [t for t in np.flatnonzero(seg[r] == s) if batch.loss_mask[r, t] > 0]
            if not idx:
                continue
            per = []
            for t in idx:
                logp = logsm[r, t - 1, tokens[r, t]]
                old = float(batch.old_logp[r, t])
                adv = float(batch.rewards[r, t]) + (float(batch.teacher_logp[r, t]) - old) \
                    * float(batch.teacher_mask[r, t])
                ratio = math.exp(logp - old)
                per.append(max(-ratio * adv, -min(max(ratio, 0.8), 1.28) * adv))
            means.append(np.mean(per))
    assert len(means) == 4
    assert float(loss) == pytest.approx(np.mean(means), abs=1e-5)
