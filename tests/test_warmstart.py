"""The warm start's cache: reused only when its marker names the same settings, and never
vouching for weights written under other settings (a crash mid-save leaves no marker)."""

from __future__ import annotations

import hashlib
import os

import pytest
import transformers

from clawjax import config as config_lib
from clawjax import warmstart


def tiny(seed: int):
    s = config_lib.base_config().warmstart
    s.steps, s.examples, s.batch_size, s.seed = 3, 64, 8, seed
    s.hidden_size, s.intermediate_size = 64, 128
    return s


def digest(out_dir) -> str:
    with open(os.path.join(out_dir, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_a_crash_while_saving_new_settings_leaves_no_marker_for_the_old(tmp_path, monkeypatch):
    out = str(tmp_path / "warmstart")
    warmstart.warm_start(out, tiny(0), progress=False)
    first = digest(out)
    assert warmstart.is_cached(out, tiny(0)) and not warmstart.is_cached(out, tiny(1))
    assert warmstart.warm_start(out, tiny(0), progress=False) == out and digest(out) == first

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while saving the tokenizer")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        warmstart.warm_start(out, tiny(1), progress=False)
    monkeypatch.undo()
    assert digest(out) != first   # the new weights were written before the crash...
    assert not warmstart.is_cached(out, tiny(0))   # ...so the old marker no longer vouches
    assert not warmstart.is_cached(out, tiny(1))
    warmstart.warm_start(out, tiny(0), progress=False)   # trains again: same seed, same weights
    assert digest(out) == first and warmstart.is_cached(out, tiny(0))


def test_a_one_step_warm_start_trains(tmp_path):
    """`warmstart.steps=1`, the tests' tiny warm start: the schedule is valid for one step (its
    warm-up no longer takes the only step, which optax refused: cosine decay over 0 steps)."""
    s = tiny(0)
    s.steps, s.hidden_size, s.intermediate_size, s.num_layers = 1, 32, 64, 1
    out = warmstart.warm_start(str(tmp_path / "warmstart"), s, progress=False)
    assert warmstart.is_cached(out, s)
    schedule = warmstart.lr_schedule(s)
    assert float(schedule(0)) == pytest.approx(s.lr)   # the one step at the full rate
