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
    assert {k: state[k] for k in ("position", "released", "file_samples")} == \
        {"position": 6, "released": [4, 5], "file_samples": 6}
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


# ---------------------------------------------------------------- the recorded file identity
def _state_at_a_pass_boundary(tmp_path) -> dict:
    """A 6-sample file's state after one whole pass: nothing given back, so no index of it
    names a sample past the end of a shorter file."""
    source = ReplaySource(_file(tmp_path, "long.jsonl", 6))
    source.take(6)
    state = source.state()
    assert "released" not in state and state["file_samples"] == 6
    return state


@pytest.mark.parametrize("count, word", [(4, "shorter"), (8, "longer")])
def test_a_state_of_a_file_of_another_length_is_refused_naming_both_counts(tmp_path, count, word):
    """Before, only a given-back index past the end was caught: position 6 went on in the
    4-sample file at its sample 2 (6 mod 4), not where the checkpointed run stopped."""
    state = _state_at_a_pass_boundary(tmp_path)
    other = _file(tmp_path, "other.jsonl", count)
    source = ReplaySource(other)
    with pytest.raises(ConfigError, match="'replay'") as e:
        source.restore(state)
    message = str(e.value)
    assert f"records a file of 6 samples, but {other} now holds {count} samples" in message
    assert f"a {word} file" in message


def test_process_shares_refuse_a_state_of_a_shorter_file(tmp_path):
    state = _state_at_a_pass_boundary(tmp_path)
    short = _file(tmp_path, "short.jsonl", 4)
    for i in range(2):
        share = distributed.ProcessShardReplay(ReplaySource(short), i, 2,
                                               gather=lambda part: [part, part])
        with pytest.raises(ConfigError, match="records a file of 6 samples") as e:
            share.restore(state)
        assert short in str(e.value) and "holds 4 samples" in str(e.value)


def test_a_state_of_another_file_of_the_same_length_is_refused(tmp_path):
    state = _state_at_a_pass_boundary(tmp_path)
    other = str(tmp_path / "other.jsonl")
    write_replay(other, make_samples(6, seed=99))
    with pytest.raises(ConfigError, match="sample ids digest") as e:
        ReplaySource(other).restore(state)
    assert other in str(e.value)
    shuffled = str(tmp_path / "shuffled.jsonl")
    write_replay(shuffled, make_samples(6, seed=46)[::-1])     # the same samples, reordered
    with pytest.raises(ConfigError, match="sample ids digest"):
        ReplaySource(shuffled).restore(state)


def test_the_same_samples_rewritten_and_old_states_without_the_record_resume(tmp_path):
    state = _state_at_a_pass_boundary(tmp_path)
    samples = make_samples(6, seed=46)
    for s in samples:
        s.metadata["note"] = "rewritten"                       # other bytes, the same ids
    rewritten = str(tmp_path / "rewritten.jsonl")
    write_replay(rewritten, samples)
    source = ReplaySource(rewritten)
    source.restore(state)
    assert source.take(1)[0].sample_id == samples[0].sample_id
    old = ReplaySource(_file(tmp_path, "short.jsonl", 4))      # a state saved before the record
    old.restore({"position": 6})
    assert old.take(1)[0].sample_id == old.samples[2].sample_id


@pytest.mark.parametrize("value", ["6", 0, -1, True, 6.0])
def test_a_malformed_recorded_count_is_refused(tmp_path, value):
    source = ReplaySource(_file(tmp_path, "r.jsonl", 6))
    with pytest.raises(ConfigError, match=f"file_samples {value!r}"):
        source.restore({"position": 2, "file_samples": value})


def test_a_merged_process_state_records_the_file_and_is_checked_on_resume(tmp_path):
    """Two processes' merged `state()` (what a multi-process checkpoint holds) records the
    file's count and ids digest like `ReplaySource.state()`, so a resume with another file of
    the same length is refused too (no index past its end would have caught it)."""
    path = _file(tmp_path, "six.jsonl", 6)
    parts = []
    gather = lambda part: parts  # noqa: E731 - both shares' parts, in process order
    shares = [distributed.ProcessShardReplay(ReplaySource(path), i, 2, gather=gather)
              for i in range(2)]
    for share in shares:
        share.take(1)
    parts[:] = [share.local_state() for share in shares]
    state = shares[0].state()
    assert state["file_samples"] == 6
    assert state["file_ids_sha256"] == ReplaySource(path).fingerprint
    other = str(tmp_path / "other.jsonl")
    write_replay(other, make_samples(6, seed=99))
    with pytest.raises(ConfigError, match="sample ids digest"):
        distributed.ProcessShardReplay(ReplaySource(other), 1, 2, gather=gather).restore(state)
    shares[1].restore(state)   # the same file resumes
