"""The committed protobuf modules match rollout.proto; Sample ⇄ wire message is lossless."""

import dataclasses
import re

import numpy as np
import pytest

from clawjax.buffer import codec, protogen, wire
from clawjax.buffer import rollout_pb2 as pb
from clawjax.sample import Sample, SampleError

_VERSION_LINES = [
    (re.compile(r"# Protobuf Python Version: \S+"), "# Protobuf Python Version: X"),
    (re.compile(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
                r"\d+,\s*\d+,\s*\d+,"), "ValidateProtobufRuntimeVersion(PUBLIC, X,"),
    (re.compile(r"GRPC_GENERATED_VERSION = '[^']*'"), "GRPC_GENERATED_VERSION = 'X'"),
]


def _normalize(text: str) -> str:
    """Drops the generator's version stamps (a newer grpcio-tools in CI must not fail this)."""
    for pattern, repl in _VERSION_LINES:
        text = pattern.sub(repl, text)
    return text


def test_committed_generated_code_matches_proto():
    fresh = protogen.generate()
    for name, text in fresh.items():
        committed = protogen.PROTO.with_name(name).read_text()
        assert _normalize(committed) == _normalize(text), (
            f"{name} is out of date with rollout.proto: run `python -m clawjax.buffer gen-proto`")


def test_normalize_still_sees_real_changes():
    text = protogen.PROTO.with_name("rollout_pb2.py").read_text()
    assert _normalize(text) != _normalize(text.replace("sample_id", "sample_idx"))


def full_sample(sid="full-1") -> Sample:
    rng = np.random.default_rng(0)
    r, k = 5, 3
    return Sample(
        sample_id=sid, tokens=rng.integers(0, 50_000, size=12).astype(np.int32), response_len=r,
        loss_mask=np.array([1, 0, 1, 1, 0], np.float32),
        rollout_logp=-rng.random(r).astype(np.float32), reward=0.123456789012345,
        kind="both", session_id="sess-é", turn_index=7, policy_version=2**40 + 3,
        created_unix_ms=1_764_000_000_123, step_rewards=np.array([0.5, -1.0], np.float32),
        teacher_logp=-rng.random(r).astype(np.float32),
        teacher_topk_logp=(-1.5 - rng.random((r, k))).astype(np.float32),  # row mass < 1
        teacher_topk_ids=rng.integers(0, 50_000, size=(r, k)).astype(np.int32),
        metadata={"env": "terminal", "ключ": "значение", "empty": ""})


def test_round_trip_every_field_through_bytes():
    s = full_sample()
    back = codec.from_proto(pb.Sample.FromString(codec.to_proto(s).SerializeToString()))
    assert back.equals(s)
    assert back.reward == s.reward  # double on the wire, not float32
    assert back.teacher_topk_logp.shape == (5, 3) and back.teacher_topk_ids.dtype == np.int32


def test_absent_optionals_stay_absent_and_empty_stays_empty():
    s = Sample("rl-1", [3, 4, 5], 1, rollout_logp=[-0.25], step_rewards=np.zeros(0, np.float32))
    back = codec.from_proto(pb.Sample.FromString(codec.to_proto(s).SerializeToString()))
    assert back.teacher_logp is None and back.teacher_topk_logp is None
    assert back.teacher_topk_ids is None
    assert back.step_rewards is not None and back.step_rewards.shape == (0,)
    assert back.equals(s)


@pytest.mark.parametrize("encode", [codec.to_proto, wire.encode_sample])
def test_a_sample_without_rollout_logprobs_is_refused_before_it_travels(encode):
    """The buffer's data contract requires them (a trainer under old_logp = 'rollout' reads
    them as the old policy): refused at the client, naming the sample and the field."""
    with pytest.raises(SampleError) as info:
        encode(Sample("no-logp", [3, 4, 5], 1))
    assert info.value.sample_id == "no-logp" and info.value.field == "rollout_logp"


def test_tokens_and_logps_are_packed_on_the_wire():
    s = Sample("p", np.arange(1000), 500, rollout_logp=np.full(500, -1.0))
    size = codec.to_proto(s).ByteSize()
    # packed: 4 bytes per token id and per float, one tag per array; unpacked would add a tag
    # byte per element (+2000)
    assert 1000 * 4 + 500 * 4 * 2 < size < 1000 * 4 + 500 * 4 * 2 + 64


@pytest.mark.parametrize("sample", [
    full_sample(),
    Sample("rl", [5, 6, 7], 2, rollout_logp=[0.0, -1.5]),
    Sample("neg", [-1, -2**31, 2**31 - 1, 0, 300], 2, rollout_logp=[-1.0, -2.0],
           step_rewards=np.zeros(0, np.float32),
           teacher_logp=np.zeros(0, np.float32), kind="opd"),
    Sample("nan", [1, 2], 1, rollout_logp=[float("nan")], reward=float("inf"),
           teacher_topk_logp=np.zeros((0, 3)), teacher_topk_ids=np.zeros((0, 3))),
], ids=lambda s: s.sample_id)
def test_fast_encoder_parses_to_the_same_message(sample):
    assert pb.Sample.FromString(wire.encode_sample(sample)) == codec.to_proto(sample)
    request = pb.PushRequest.FromString(wire.encode_push_request([sample, full_sample("2nd")]))
    assert list(request.samples) == [codec.to_proto(sample), codec.to_proto(full_sample("2nd"))]


def test_join_and_split_repeated_round_trip_and_refuse_garbage():
    items = [wire.encode_sample(full_sample(f"s{i}")) for i in range(3)] + [b""]
    joined = wire.join_repeated(items)
    assert wire.split_repeated(joined) == items
    assert [codec.from_proto(m).sample_id for m in pb.PushRequest.FromString(joined).samples] \
        == ["s0", "s1", "s2", ""]
    for bad in (joined[:-5], b"\x12\x00", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"):
        with pytest.raises(ValueError):
            wire.split_repeated(bad)


def test_topk_payload_that_does_not_reshape_names_the_field():
    msg = codec.to_proto(full_sample())
    del msg.teacher_topk.ids[-1]
    with pytest.raises(SampleError, match="teacher_topk"):
        codec.from_proto(msg)


def test_negative_counter_cannot_be_encoded_and_names_the_field():
    s = Sample("neg", [1, 2], 1, rollout_logp=[-0.5], turn_index=-1)
    with pytest.raises(SampleError, match="turn_index"):
        codec.to_proto(s)


NO_UTF8 = "user-\ud83d"   # a lone surrogate (half an emoji, as a JS client may cut it): no UTF-8


@pytest.mark.parametrize("encode", [codec.to_proto, wire.encode_sample])
@pytest.mark.parametrize("changes, field", [
    ({"sample_id": NO_UTF8}, "sample_id"),
    ({"session_id": NO_UTF8}, "session_id"),
    ({"kind": NO_UTF8}, "kind"),
    ({"metadata": {NO_UTF8: "v"}}, "metadata"),
    ({"metadata": {"k": NO_UTF8}}, "metadata"),
], ids=["sample_id", "session_id", "kind", "metadata-key", "metadata-value"])
def test_a_string_without_utf8_encoding_is_refused_naming_the_field(encode, changes, field):
    """A string the wire cannot carry is a `SampleError` naming the field (as a wrong type is),
    never a bare UnicodeEncodeError that a pusher would take for a transient failure."""
    s = dataclasses.replace(full_sample(), **changes)
    with pytest.raises(SampleError, match=field) as info:
        encode(s)
    assert info.value.field == field and "UTF-8" in info.value.expected
    assert "\\ud83d" in str(info.value)   # the value shown escaped, printable anywhere
