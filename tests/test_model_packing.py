"""Packed rows: 2-3 sequences in one row with segment ids give the same logits as each alone."""

from __future__ import annotations

import numpy as np
import pytest

import hf_tiny
from clawjax import model as cm


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request):
    config = cm.ModelConfig.from_hf(hf_tiny.hf_config(request.param).to_dict())
    return cm.init_random(config, seed=4)


def _pack(seqs, length):
    tokens = np.zeros((1, length), np.int32)
    positions = np.zeros((1, length), np.int32)
    segments = np.zeros((1, length), np.int32)
    start = 0
    for i, s in enumerate(seqs):
        tokens[0, start:start + len(s)] = s
        positions[0, start:start + len(s)] = np.arange(len(s))
        segments[0, start:start + len(s)] = i + 1
        start += len(s)
    return tokens, positions, segments


@pytest.mark.parametrize("lengths", [(7, 12), (5, 9, 11)])
def test_packed_equals_alone(model, lengths):
    rng = np.random.default_rng(sum(lengths))
    seqs = [rng.integers(1, hf_tiny.VOCAB, n).astype(np.int32) for n in lengths]
    tokens, positions, segments = _pack(seqs, sum(lengths) + 6)  # 6 padding tokens at the end
    packed = np.asarray(hf_tiny.jit_logits(model, tokens, positions, segments))
    assert np.isfinite(packed).all()
    start = 0
    for s in seqs:
        alone = np.asarray(hf_tiny.jit_logits(model, s[None]))
        np.testing.assert_allclose(packed[0, start:start + len(s)], alone[0], atol=1e-5, rtol=0)
        start += len(s)


def test_segments_and_positions_matter(model):
    """Guard: without segment ids (attention crossing) or without restarted positions the
    second sequence's logits differ, so the packing test above can fail."""
    seqs = [np.arange(1, 7, dtype=np.int32), np.arange(20, 28, dtype=np.int32)]
    tokens, positions, segments = _pack(seqs, 14)
    good = np.asarray(hf_tiny.jit_logits(model, tokens, positions, segments))[0, 6:]
    crossing = np.asarray(hf_tiny.jit_logits(model, tokens, positions, np.ones_like(segments)))[0, 6:]
    no_restart = np.asarray(hf_tiny.jit_logits(model, tokens, np.arange(14, dtype=np.int32)[None], segments))[0, 6:]
    assert np.abs(good - crossing).max() > 1e-3
    # rope is relative: a shift alone changes nothing ...
    np.testing.assert_allclose(good, no_restart, atol=1e-4)
    # ... but positions that are not contiguous inside a segment do.
    broken = positions.copy()
    broken[0, 9:] += 5
    assert np.abs(good - np.asarray(hf_tiny.jit_logits(model, tokens, broken, segments))[0, 6:]).max() > 1e-3
