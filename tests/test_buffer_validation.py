"""Hypothesis-generated bad samples are refused with INVALID_ARGUMENT naming the sample id and
the field; the whole push is refused (its good samples too) and the server keeps serving."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clawjax.buffer import BufferClient, InvalidSampleError
from clawjax.buffer.testing import ServerProcess
from clawjax.sample import Sample

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
