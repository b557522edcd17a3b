"""Sample sources: samples given back untrained (`release`, a stop mid-step) are delivered again
by each source, the replay source's checkpointed state included."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from clawjax.buffer import BufferClient
from clawjax.buffer.testing import ServerProcess
from clawjax.sample import SampleError
from clawjax.sources import (BufferSource, QueueSource, ReplaySource, replay_fingerprint,
                             write_replay)
from sample_factory import make_samples


def ids(samples) -> list[str]:
    return [s.sample_id for s in samples]


def test_replay_release_redelivers_from_a_checkpointed_state(tmp_path):
    samples = make_samples(6, seed=30)
    path = str(tmp_path / "replay.jsonl")
    write_replay(path, samples)
    source = ReplaySource(path)
    taken = source.take(4)
    source.release([taken[1], taken[3]])  # e.g. taken[0] and [2] were rejected
    state = source.state()
    assert state == {"position": 4, "released": [1, 3], "file_samples": 6,
                     "file_ids_sha256": replay_fingerprint(samples)}
    again = ReplaySource(path)
    again.restore(state)  # a restart from the checkpoint saved at the stop
    assert ids(again.take(3)) == ids([samples[1], samples[3], samples[4]])
    assert again.state() == {"position": 5, "file_samples": 6,
                             "file_ids_sha256": replay_fingerprint(samples)}
    assert ids(source.take(2)) == ids([samples[1], samples[3]])


def test_a_replay_file_is_not_written_with_a_sample_it_could_not_read(tmp_path):
    """A sample without `rollout_logp` writes a line `read_replay` refuses: refused before any
    line is written, naming the sample and the field."""
    samples = make_samples(3, seed=32)
    samples[1] = dataclasses.replace(samples[1], rollout_logp=None)
    path = tmp_path / "replay.jsonl"
    with pytest.raises(SampleError) as info:
        write_replay(str(path), samples)
    assert (info.value.sample_id, info.value.field) == (samples[1].sample_id, "rollout_logp")
    assert "replay file" in str(info.value) and not path.exists()


def test_replay_release_after_the_file_started_over(tmp_path):
    samples = make_samples(3, seed=31)
    path = str(tmp_path / "replay.jsonl")
    write_replay(path, samples)
    source = ReplaySource(path)
    source.take(2)
    taken = source.take(2)  # samples[2], then samples[0] again
    source.release(taken)
    assert source.state() == {"position": 4, "released": [2, 0], "file_samples": 3,
                              "file_ids_sha256": replay_fingerprint(samples)}
    assert ids(source.take(3)) == ids([samples[2], samples[0], samples[1]])


def test_queue_release_puts_samples_back_first():
    samples = make_samples(4, seed=32)
    source = QueueSource()
    source.put(samples)
    taken = source.take(3, timeout_s=1)
    source.release(taken)
    assert ids(source.take(4, timeout_s=1)) == ids(samples)


def test_buffer_release_requeues_the_leases(tmp_path):
    samples = make_samples(3, seed=33)
    with ServerProcess(str(tmp_path / "buffer"), "--lease-timeout-s", "300") as server:
        client = BufferClient(server.address)
        client.push(samples)
        source = BufferSource(server.address, keepalive_s=0.2)
        try:
            taken = source.take(2, timeout_s=5)
            assert client.stats()["leased"] == 2
            source.release(taken)
            stats = client.stats()
            assert stats["leased"] == 0 and stats["queued"] == 3 and stats["acked_total"] == 0
            assert sorted(ids(source.take(3, timeout_s=5))) == sorted(ids(samples))
        finally:
            source.close()
            client.close()


def test_queue_take_without_waiting_returns_the_queued_samples():
    """`take(n, timeout_s=0)` (never wait: a caller's poll) returns the samples already queued,
    up to n, not none: a poller would otherwise spin on a full queue."""
    samples = make_samples(3, seed=34)
    source = QueueSource()
    source.put(samples)
    assert ids(source.take(2, timeout_s=0)) == ids(samples[:2])
    assert ids(source.take(2, timeout_s=0)) == ids(samples[2:])
    assert source.take(2, timeout_s=0) == []


def test_buffer_take_without_waiting_leases_the_queued_samples(tmp_path):
    samples = make_samples(3, seed=35)
    with ServerProcess(str(tmp_path / "buffer")) as server:
        client = BufferClient(server.address)
        client.push(samples)
        source = BufferSource(server.address, keepalive_s=0.2)
        try:
            taken = source.take(2, timeout_s=0)
            assert len(taken) == 2 and client.stats()["leased"] == 2
        finally:
            source.close()
            client.close()


def test_a_replay_file_repeating_a_sample_id_is_refused_naming_both_lines(tmp_path):
    """Samples are tracked by id (a step's repeat check, `release`'s given-back indices): a file
    holding one id on two lines would be read as a file that started over within a step (an
    error blaming admissible samples) and a given-back sample as the other line. Refused when
    read, naming the file, both lines and the id."""
    import pytest

    from clawjax.sources import ReplayError

    samples = make_samples(4, seed=36)
    path = str(tmp_path / "replay.jsonl")
    write_replay(path, samples + [samples[1]])
    with pytest.raises(ReplayError) as e:
        ReplaySource(path)
    assert f"{path}:5" in str(e.value) and "line 2" in str(e.value)
    assert repr(samples[1].sample_id) in str(e.value)


def test_buffer_reject_is_on_disk_before_the_sample_is_acknowledged(tmp_path, monkeypatch):
    """The buffer forgets an acknowledged sample, so its rejected.jsonl record is all that is
    left of it: the line must be flushed and fsynced (the directory too, when the file is new)
    before the ack. Before, the line was only written, left to the OS to flush some time."""
    path = tmp_path / "rejected.jsonl"
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        stat = os.fstat(fd)
        if path.exists() and stat.st_ino == os.stat(path).st_ino:
            events.append(("fsync file", path.read_text().count("\n")))   # what is written
        elif stat.st_ino == os.stat(tmp_path).st_ino:
            events.append(("fsync dir", None))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    source = BufferSource.__new__(BufferSource)     # no server: `commit` is the ack
    source._rejected_path = str(path)
    source.commit = lambda sample_ids: events.append(("ack", list(sample_ids)))
    first, second = make_samples(2, seed=34)
    source.reject(first, "too long")
    source.reject(second, "stale")
    assert events == [("fsync file", 1), ("fsync dir", None), ("ack", [first.sample_id]),
                      ("fsync file", 2), ("ack", [second.sample_id])]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["reason"], r["sample"]["sample_id"]) for r in records] == \
        [("too long", first.sample_id), ("stale", second.sample_id)]
