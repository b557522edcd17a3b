"""Hypothesis-generated bad samples are refused with INVALID_ARGUMENT naming the sample id and
the field; the whole push is refused (its good samples too) and the server keeps serving."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clawjax.buffer import BufferClient, InvalidSampleError
from clawjax.buffer.testing import ServerProcess
from clawjax.sample import LOGP_FLOOR, TOPK_MASS_SLACK, Sample

MAX_TOKENS, MAX_SAMPLE_BYTES = 4096, 64 << 10
_ids = itertools.count()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    directory = tmp_path_factory.mktemp("buf")
    with ServerProcess(str(directory), "--max-sample-tokens", str(MAX_TOKENS),
                       "--max-sample-bytes", str(MAX_SAMPLE_BYTES)) as proc, \
            BufferClient(proc.address, retry_budget_s=30) as c:
        yield c


def good(sid: str, n: int = 12, r: int = 4) -> Sample:
    return Sample(sid, np.arange(n), r, rollout_logp=np.full(r, -1.0))


def _bad_float():
    return st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.5, 3.0, 1e30])


@st.composite
def bad_samples(draw):
    """(bad sample, name of the field the error must name)."""
    sid = f"bad-{next(_ids)}"
    n = draw(st.integers(4, 64))
    r = draw(st.integers(1, n - 1))
    base = dict(sample_id=sid, tokens=np.arange(n), response_len=r,
                rollout_logp=np.full(r, -0.5))
    kind = draw(st.sampled_from(["logp_len", "mask_len", "teacher_len", "logp_value",
                                 "teacher_value", "mask_value", "empty_id", "kind",
                                 "response_len", "huge_tokens", "huge_bytes", "negative_token",
                                 "topk_shape", "reward"]))
    if kind == "logp_len":
        wrong = r + draw(st.integers(-r, 5).filter(lambda d: d != 0))
        base["rollout_logp"] = np.full(wrong, -0.5)
        return Sample(**base), "rollout_logp"
    if kind == "mask_len":
        base["loss_mask"] = np.ones(r + draw(st.integers(1, 8)))
        return Sample(**base), "loss_mask"
    if kind == "teacher_len":
        return Sample(**base, kind="opd", teacher_logp=np.full(r + 1, -0.1)), "teacher_logp"
    if kind == "logp_value":
        base["rollout_logp"][draw(st.integers(0, r - 1))] = draw(_bad_float())
        return Sample(**base), "rollout_logp"
    if kind == "teacher_value":
        t = np.full(r, -0.2)
        t[draw(st.integers(0, r - 1))] = draw(_bad_float())
        return Sample(**base, kind="both", teacher_logp=t), "teacher_logp"
    if kind == "mask_value":
        m = np.ones(r)
        m[draw(st.integers(0, r - 1))] = draw(st.sampled_from([0.5, 2.0, -1.0]))
        return Sample(**base, loss_mask=m), "loss_mask"
    if kind == "empty_id":
        base["sample_id"] = ""
        return Sample(**base), "sample_id"
    if kind == "kind":
        bad_kind = draw(st.text(max_size=8).filter(lambda k: k not in ("rl", "opd", "both")))
        return Sample(**base, kind=bad_kind), "kind"
    if kind == "response_len":
        base["response_len"] = draw(st.sampled_from([0, n, n + 3]))
        base["rollout_logp"] = np.full(base["response_len"], -0.5)
        return Sample(**base), "response_len"
    if kind == "huge_tokens":
        big = MAX_TOKENS + draw(st.integers(1, 1000))
        return Sample(sid, np.arange(big) % 7, 2, rollout_logp=[-1.0, -1.0]), "tokens"
    if kind == "huge_bytes":
        pad = "x" * (MAX_SAMPLE_BYTES + draw(st.integers(1, 10_000)))
        return Sample(**base, metadata={"blob": pad}), "sample (serialized size)"
    if kind == "negative_token":
        tokens = np.arange(n)
        tokens[draw(st.integers(0, n - 1))] = -draw(st.integers(1, 10))
        base["tokens"] = tokens
        return Sample(**base), "tokens"
    if kind == "topk_shape":
        k = draw(st.integers(1, 4))
        return Sample(**base, teacher_topk_logp=np.full((r + 1, k), -1.0),
                      teacher_topk_ids=np.zeros((r + 1, k), np.int32)), "teacher_topk_logp"
    return Sample(**base, reward=draw(st.sampled_from([float("nan"), float("inf")]))), "reward"


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=bad_samples(), position=st.integers(0, 2))
def test_bad_samples_are_refused_naming_the_field(client, case, position):
    bad, field = case
    batch = [good(f"ok-{next(_ids)}"), good(f"ok-{next(_ids)}")]
    batch.insert(position, bad)
    before = client.stats()
    with pytest.raises(InvalidSampleError) as info:
        client.push(batch)
    message = str(info.value)
    assert info.value.code == "INVALID_ARGUMENT"
    assert f"field {field!r}" in message, message
    assert f"sample {bad.sample_id!r}" in message, message
    assert f"samples[{position}]" in message, message
    after = client.stats()
    assert after["pushed_total"] == before["pushed_total"]       # all or nothing
    assert after["rejected_total"] == before["rejected_total"] + 3


def test_server_keeps_serving_after_bad_pushes(client):
    with pytest.raises(InvalidSampleError):
        client.push([good("", 4, 1)])
    assert client.push([good("after-bad")]) == (1, 0)
    got = client.lease(1000, timeout_s=5)
    assert [s.sample_id for s in got] == ["after-bad"]   # no sample of a refused push is there
    assert client.ack(["after-bad"]) == 1


_SPECIAL = [0.0, -0.0, 1.0, 0.5, -3.0, 2.0, 1e-45, -1e-45, float("nan"), float("inf"),
            float("-inf"), np.nextafter(np.float32(1), np.float32(2)).item(), -1e7, -1e6]


def _expected_field(mask, logp, teacher, topk) -> str | None:
    """The first field `Sample.validate` must name, from plain Python floats (`topk` holds
    rows of 2; log-probs must be finite, in [LOGP_FLOOR, 0], a top-K row's probability at most
    exp(TOPK_MASS_SLACK))."""
    if any(v not in (0.0, 1.0) for v in mask):
        return "loss_mask"
    for name, arr in (("rollout_logp", logp), ("teacher_logp", teacher)):
        if any(v != v or v in (float("inf"), float("-inf")) or v > 0 or v < LOGP_FLOOR
               for v in arr):
            return name
    if any(v != v or abs(v) == float("inf") or v > 0 or v < LOGP_FLOOR for v in topk):
        return "teacher_topk_logp"
    rows = [topk[i:i + 2] for i in range(0, len(topk), 2)]
    if any(math.fsum(math.exp(v) for v in row) > math.exp(TOPK_MASS_SLACK) for row in rows):
        return "teacher_topk_logp"
    return None


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_validate_float_rules_match_a_plain_reference(data):
    """The vectorised checks in `Sample.validate` accept and refuse exactly what the rules
    say, naming the same field and value, for NaN, ±inf, ±0, denormals and near-1 values."""
    r = data.draw(st.integers(1, 6))
    pick = lambda n: data.draw(st.lists(st.sampled_from(_SPECIAL), min_size=n, max_size=n))
    mask, logp, teacher, topk = pick(r), pick(r), pick(r), pick(r * 2)
    s = Sample("p", list(range(r + 1)), r, loss_mask=mask, rollout_logp=logp, kind="both",
               teacher_logp=teacher, teacher_topk_logp=np.reshape(topk, (r, 2)),
               teacher_topk_ids=np.tile([0, 1], (r, 1)))
    want = _expected_field([float(np.float32(v)) for v in mask],
                           [float(np.float32(v)) for v in logp],
                           [float(np.float32(v)) for v in teacher],
                           [float(np.float32(v)) for v in topk])
    if want is None:
        s.validate()
        return
    from clawjax.sample import SampleError
    with pytest.raises(SampleError) as info:
        s.validate()
    assert info.value.field == want
    if want in ("loss_mask", "rollout_logp", "teacher_logp"):
        values = {"loss_mask": mask, "rollout_logp": logp, "teacher_logp": teacher}[want]
        bad = [float(np.float32(v)) for v in values]
        if want == "loss_mask":
            first = next(v for v in bad if v not in (0.0, 1.0))
        elif any(v != v or abs(v) == float("inf") for v in bad):
            first = next(v for v in bad if v != v or abs(v) == float("inf"))
        elif any(v > 0 for v in bad):
            first = next(v for v in bad if v > 0)
        else:
            first = next(v for v in bad if v < LOGP_FLOOR)
        got = info.value.value
        assert (got != got and first != first) or got == first


@pytest.mark.parametrize("changes,field", [
    (dict(rollout_logp=[-1e7, -0.5]), "rollout_logp"),
    (dict(kind="opd", teacher_logp=[-3e6, -0.1]), "teacher_logp"),
    (dict(kind="both", teacher_logp=[-0.5, -2 * 1e6]), "teacher_logp"),
    (dict(reward=1e300), "reward"),
    (dict(reward=-1e39), "reward"),
], ids=["logp-below-floor", "teacher-below-floor", "both-below-floor", "reward-past-f32",
        "reward-past-f32-negative"])
def test_the_servers_fast_check_refuses_what_validate_refuses(changes, field):
    """`check_wire` clears ordinary samples on a fast path (`_surely_valid`); it must not clear
    one `Sample.validate` refuses: log-probs below LOGP_FLOOR, a reward past float32 (the
    wire's reward is a double) went through and were stored."""
    from clawjax.buffer import validate, wire
    from clawjax.sample import SampleError

    sample = Sample("fast", np.arange(4), 2, **{"rollout_logp": [-0.5, -0.5], **changes})
    with pytest.raises(SampleError) as want:
        sample.validate()
    with pytest.raises(SampleError) as got:
        validate.check_wire(wire.encode_sample(sample))
    assert got.value.field == want.value.field == field
