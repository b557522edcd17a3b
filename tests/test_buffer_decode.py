"""`decode`: serialized Sample → numpy without a protobuf parse of the arrays. The reference is
always the protobuf parse (`pb.Sample.FromString` + `codec.from_proto`), on the encoding this
package writes, on unusual but valid encodings, and on damaged bytes."""

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings, strategies as st

from clawjax.buffer import codec, decode, wire
from clawjax.buffer import rollout_pb2 as pb
from clawjax.sample import Sample, SampleError

from sample_factory import make_samples
from test_buffer_proto import full_sample


def reference(data: bytes):
    """What the protobuf parse gives: a Sample, or the exception type it raises."""
    try:
        return codec.from_proto(pb.Sample.FromString(bytes(data)))
    except (DecodeError, SampleError) as e:
        return type(e)


def fast(data: bytes, copy: bool):
    """The fast walk whatever the size (with its protobuf fallback for unusual encodings)."""
    try:
        return decode.to_sample(decode.parse(data, copy=copy))
    except (DecodeError, SampleError) as e:
        return type(e)


def same(a, b) -> bool:
    if isinstance(a, Sample) and isinstance(b, Sample):
        return a.equals(b) and all(
            (x is None) == (y is None) and (x is None or x.dtype == y.dtype)
            for x, y in ((a.tokens, b.tokens), (a.loss_mask, b.loss_mask),
                         (a.rollout_logp, b.rollout_logp), (a.step_rewards, b.step_rewards),
                         (a.teacher_logp, b.teacher_logp), (a.teacher_topk_ids, b.teacher_topk_ids),
                         (a.teacher_topk_logp, b.teacher_topk_logp)))
    return a == b


def _no_fallback(monkeypatch):
    def refuse(data):
        raise AssertionError("the fast walk fell back to the protobuf parse")
    monkeypatch.setattr(decode, "_slow", refuse)


@pytest.mark.parametrize("copy", [False, True])
def test_fast_path_matches_protobuf_on_this_package_encoding(monkeypatch, copy):
    samples = [full_sample(), *make_samples(6, seed=3),
               Sample("empties", [1, 2], 1, rollout_logp=[-0.5], step_rewards=[],
                      teacher_logp=[-0.5], kind="opd",
                      teacher_topk_logp=np.zeros((1, 2)), teacher_topk_ids=np.zeros((1, 2)))]
    encoded = [wire.encode_sample(s) for s in samples]
    _no_fallback(monkeypatch)
    for s, data in zip(samples, encoded):
        got = decode.to_sample(decode.parse(data, copy=copy))
        assert same(got, reference(data)) and got.equals(s)
        assert got.tokens.flags.writeable == copy
    absent = decode.to_sample(decode.parse(wire.encode_sample(
        Sample("a", [1, 2, 3], 2, rollout_logp=[-0.5, -0.25]))))
    assert absent.step_rewards is None and absent.teacher_logp is None
    assert absent.teacher_topk_logp is None and absent.metadata == {}


def test_copies_own_their_memory_and_views_share_it():
    data = bytearray(wire.encode_sample(full_sample()))
    view = decode.to_sample(decode.parse(data, copy=False))
    owned = decode.to_sample(decode.parse(data, copy=True))
    before = owned.tokens.copy()
    data[:] = bytes(len(data))  # the views see the change, the copies do not
    assert np.array_equal(owned.tokens, before) and not np.array_equal(view.tokens, before)


def _ld(field: int, payload: bytes) -> bytes:
    return wire.varint(field << 3 | 2) + wire.varint(len(payload)) + payload


@pytest.mark.parametrize("extra", [
    _ld(6, np.arange(3, dtype="<i4").tobytes()),                # packed field twice: concatenated
    b"".join(wire.varint(6 << 3 | 5) + np.int32(v).tobytes() for v in (7, 8)),  # unpacked
    _ld(12, _ld(1, np.float32([-1.0]).tobytes())),              # sub-message twice: merged
    _ld(13, wire.varint(1 << 3) + wire.varint(2)),              # TopK.k again: last wins
    wire.varint(99 << 3) + wire.varint(5),                      # unknown field
    _ld(9, b"\x00\x00"),                                        # packed length not a multiple of 4
    _ld(11, _ld(2, b"x")),                                      # unknown field inside FloatArray
    b"\x0b\x0c",                                                # a group (wire type 3)
    _ld(1, b"\xff\xfe"),                                        # sample_id not UTF-8
])
def test_unusual_or_bad_encodings_match_protobuf(extra):
    data = wire.encode_sample(full_sample()) + extra
    for copy in (False, True):
        assert same(fast(data, copy), reference(data))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_damaged_bytes_match_protobuf(data):
    good = wire.encode_sample(full_sample())
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    pos = data.draw(st.integers(0, len(good) - 1))
    if kind == "truncate":
        bad = good[:pos]
    elif kind == "flip":
        bad = good[:pos] + bytes([good[pos] ^ data.draw(st.integers(1, 255))]) + good[pos + 1:]
    else:
        bad = good[:pos] + data.draw(st.binary(min_size=1, max_size=6)) + good[pos:]
    assert same(fast(bad, False), reference(bad))


def test_topk_that_does_not_reshape_names_the_field():
    msg = codec.to_proto(full_sample())
    msg.teacher_topk.ids.append(1)
    with pytest.raises(SampleError, match="teacher_topk"):
        decode.decode_sample(msg.SerializeToString())


def test_push_id_reads_the_id_like_decode_push():
    from clawjax.buffer.wal import decode_push, encode_push, push_id
    for sid in ("a", "sess-é/7", "x" * 300):
        head, body = encode_push(sid, 2**40, b"\x01\x02payload")
        payload = head + body
        assert push_id(payload) == decode_push(payload)[0] == sid
        assert push_id(memoryview(payload)) == sid


MUTATIONS = [
    lambda m: None,
    lambda m: m.rollout_logp.__setitem__(0, 0.5),
    lambda m: m.rollout_logp.__setitem__(1, float("nan")),
    lambda m: m.rollout_logp.__setitem__(2, float("-inf")),
    lambda m: m.teacher_logp.values.__setitem__(0, float("inf")),
    lambda m: m.loss_mask.__setitem__(0, 0.5),
    lambda m: m.loss_mask.__setitem__(1, float("nan")),
    lambda m: m.loss_mask.__setitem__(2, -0.0),
    lambda m: m.tokens.__setitem__(0, -3),
    lambda m: setattr(m, "kind", "nope"),
    lambda m: setattr(m, "kind", "rl"),               # teacher_logp present on an rl sample
    lambda m: m.ClearField("teacher_logp"),            # kind "both" without teacher_logp
    lambda m: setattr(m, "response_len", 0),
    lambda m: setattr(m, "response_len", len(m.tokens)),
    lambda m: setattr(m, "reward", float("nan")),
    lambda m: setattr(m, "sample_id", ""),
    lambda m: setattr(m, "sample_id", "y" * 2000),
    lambda m: m.tokens.extend([1] * 40),
    lambda m: m.ClearField("loss_mask"),
    lambda m: m.teacher_topk.ids.append(1),
    lambda m: m.step_rewards.values.append(float("nan")),
    lambda m: m.ClearField("teacher_topk"),
    lambda m: m.ClearField("step_rewards"),
    lambda m: _opd_with_reward(m, 1.0),                # fast-path shape, OPD-only with reward
    lambda m: _opd_with_reward(m, 0.0),
]


def _opd_with_reward(m, reward: float) -> None:
    """No top-K or step rewards (the lean check's own path), kind "opd", the given reward."""
    m.ClearField("teacher_topk")
    m.ClearField("step_rewards")
    m.kind, m.reward = "opd", reward


def _mutated(mutate) -> bytes:
    msg = codec.to_proto(full_sample())
    mutate(msg)
    return msg.SerializeToString()


def _outcome(f, whole: bool):
    """What a check returns: the sample's equality to `full_sample()` (`whole`) or its
    (id, version); or the SampleError message."""
    try:
        got = f()
    except SampleError as e:
        return str(e)
    if isinstance(got, tuple):
        return got
    return got.equals(full_sample()) if whole else (got.sample_id, got.policy_version)


@pytest.mark.parametrize("mutate", MUTATIONS)
@pytest.mark.parametrize("walk", [True, False])
def test_check_bytes_agrees_with_check(mutate, walk, monkeypatch):
    from clawjax.buffer.validate import Limits, check, check_bytes
    if walk:  # the fast walk even for this small sample
        monkeypatch.setattr(decode, "FAST_MIN_BYTES", 0)
    limits, data = Limits(max_tokens=32), _mutated(mutate)
    assert _outcome(lambda: check_bytes(data, limits), True) == \
        _outcome(lambda: check(pb.Sample.FromString(data), limits, size=len(data)), True)


@pytest.mark.parametrize("mutate", MUTATIONS)
@pytest.mark.parametrize("walk", [True, False])
def test_check_wire_agrees_with_check(mutate, walk, monkeypatch):
    """The server's lean check accepts exactly what `check` accepts (same id and version) and
    refuses with `check`'s message, whichever path its fallback (`check_bytes`) takes."""
    from clawjax.buffer.validate import Limits, check, check_wire
    if walk:
        monkeypatch.setattr(decode, "FAST_MIN_BYTES", 0)
    limits, data = Limits(max_tokens=32), _mutated(mutate)
    assert _outcome(lambda: check_wire(data, limits), False) == \
        _outcome(lambda: check(pb.Sample.FromString(data), limits, size=len(data)), False)


def test_check_wire_clears_usual_samples_of_any_size_without_the_fallback(monkeypatch):
    """A valid sample without top-K or step rewards, small or large, is cleared by the lean
    predicate alone: the slow `check_bytes` is never called."""
    from clawjax.buffer import validate
    def no_fallback(*args, **kwargs):
        raise AssertionError("check_bytes called for a usual sample")
    monkeypatch.setattr(validate, "check_bytes", no_fallback)
    for n in (8, 600, 20_000):
        sample = make_samples(1, seed=n, min_len=n, max_len=n)[0]
        sample.teacher_topk_logp = sample.teacher_topk_ids = sample.step_rewards = None
        data = wire.encode_sample(sample)
        assert validate.check_wire(data) == (sample.sample_id, sample.policy_version)


def test_size_picks_the_path_and_both_give_the_protobuf_result(monkeypatch):
    from clawjax.buffer.validate import check_bytes
    small = wire.encode_sample(full_sample())
    big_sample = make_samples(1, seed=5, min_len=20_000, max_len=20_000)[0]
    big = wire.encode_sample(big_sample)
    assert len(small) < decode.FAST_MIN_BYTES <= len(big)
    for data in (small, big):
        for got in (decode.decode_sample(data, copy=False), decode.decode_sample(data),
                    check_bytes(data)):
            assert same(got, reference(data))
    assert decode.decode_sample(big).tokens.flags.writeable          # copy=True owns
    assert not decode.decode_sample(big, copy=False).tokens.flags.writeable  # fast walk: views
    assert not check_bytes(big).tokens.flags.writeable
    _no_fallback(monkeypatch)
    assert same(decode.decode_sample(big), reference(big))
