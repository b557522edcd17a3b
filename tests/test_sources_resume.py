"""Resuming a replay source from a checkpoint's source state: a state that cannot belong to the
replay file now given (it names file indices past the file's end: the checkpoint was saved with
a longer file) is refused naming replay, the file and what was expected, on one process and on
several; the state's values themselves are checked the same way."""

from __future__ import annotations

import pytest

from clawjax import distributed
from clawjax.config import ConfigError
from clawjax.sources import ReplaySource, write_replay
from sample_factory import make_samples


def _file(tmp_path, name: str, count: int) -> str:
    path = str(tmp_path / name)
    write_replay(path, make_samples(count, seed=40 + count))
    return path


def _checkpointed_state(tmp_path) -> dict:
    """The source state a run over a 6-sample file checkpoints at a stop mid-step: samples 4 and
    5 taken and given back untrained."""
    source = ReplaySource(_file(tmp_path, "long.jsonl", 6))
    source.take(4)
    source.release(source.take(2))
    state = source.state()
    assert state == {"position": 6, "released": [4, 5]}
    return state


def test_a_state_of_a_longer_file_is_refused_naming_replay(tmp_path):
    state = _checkpointed_state(tmp_path)
    short = _file(tmp_path, "short.jsonl", 4)
    source = ReplaySource(short)
    with pytest.raises(ConfigError, match="'replay'") as e:
        source.restore(state)
        source.take(4)  # before the fix: a bare IndexError here
    message = str(e.value)
    assert short in message and "holds 4 samples" in message and "index 5" in message


def test_process_shares_refuse_a_state_of_a_longer_file(tmp_path):
    """Each process's share checks the whole state, not only its own part of it (process 0's
    part, index 4, alone is past the end of the 4-sample file too, process 1's is 5)."""
    state = _checkpointed_state(tmp_path)
    short = _file(tmp_path, "short.jsonl", 4)
    for i in range(2):
        share = distributed.ProcessShardReplay(ReplaySource(short), i, 2,
                                               gather=lambda part: [part, part])
        with pytest.raises(ConfigError, match="'replay'") as e:
            share.restore(state)
            share.take(2)
        assert short in str(e.value) and "holds 4 samples" in str(e.value)


@pytest.mark.parametrize("state, fragment", [
    ({"position": -1}, "position -1"),
    ({"position": "x"}, "position 'x'"),
    ({"position": 2, "released": [-1]}, "index -1"),
    ({"position": 2, "released": "01"}, "released '01'"),
])
def test_malformed_states_are_refused_naming_replay(tmp_path, state, fragment):
    """A negative index would silently take a sample from the file's end; a string of released
    indices would be read digit by digit."""
    source = ReplaySource(_file(tmp_path, "r.jsonl", 4))
    with pytest.raises(ConfigError, match="'replay'") as e:
        source.restore(state)
        source.take(4)
    assert fragment in str(e.value)


def test_a_state_of_the_same_file_resumes(tmp_path):
    state = _checkpointed_state(tmp_path)
    source = ReplaySource(str(tmp_path / "long.jsonl"))
    source.restore(state)
    assert [s.sample_id for s in source.take(3)] == \
        [s.sample_id for s in (source.samples[4], source.samples[5], source.samples[0])]
