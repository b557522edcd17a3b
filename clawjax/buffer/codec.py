"""Conversion between the host `clawjax.sample.Sample` and the wire `rollout_pb2.Sample`.

Optional arrays travel as sub-messages so that absent and empty differ: `teacher_logp` and
`step_rewards` are `FloatArray`s, the teacher top-K `[response_len, K]` pair is one `TopK`
holding K and both arrays flattened row-major. Decoding never validates beyond what the wire
format itself needs (a top-K payload must reshape to `[?, K]`); `Sample.validate()` does the rest.
"""

from __future__ import annotations

import numpy as np

from clawjax.buffer import rollout_pb2 as pb
from clawjax.sample import Sample, SampleError, require_rollout_logp


def _floats(container) -> np.ndarray:
    """A repeated float field as a new float32 array (upb containers expose `__array__`, which
    returns an owned copy of the right dtype: one memcpy, no per-item loop)."""
    return np.asarray(container, dtype=np.float32)


def _ints(container) -> np.ndarray:
    return np.asarray(container, dtype=np.int32)


UTF8_TEXT = "a string encodable as UTF-8 (no lone surrogates)"


def _set_text(msg: pb.Sample, name: str, value, sid: str) -> None:
    """`msg.<name> = value`, or `SampleError` naming `name`: the value is not a string, or one
    without a UTF-8 encoding (protobuf raises UnicodeEncodeError, a ValueError)."""
    try:
        setattr(msg, name, value)
    except (TypeError, ValueError) as e:
        raise SampleError(sid, name, value, UTF8_TEXT) from e


def scalars_to_proto(sample: Sample, msg: pb.Sample) -> pb.Sample:
    """Sets the non-array fields of `msg` from `sample` (ids, counters, reward, kind,
    metadata). Raises `SampleError` for values the wire cannot carry, naming the field: every
    string (ids, kind, metadata keys and values) must be a str with a UTF-8 encoding, and the
    sample must carry its rollout log-probs (checked here for both encoders)."""
    require_rollout_logp(sample, "on the buffer's wire")
    sid = sample.sample_id if isinstance(sample.sample_id, str) else repr(sample.sample_id)
    _set_text(msg, "sample_id", sample.sample_id, sid)
    for name in ("turn_index", "policy_version", "created_unix_ms", "response_len"):
        value = getattr(sample, name)
        try:
            setattr(msg, name, int(value))
        except (TypeError, ValueError, OverflowError) as e:
            raise SampleError(sid, name, value, "a non-negative integer") from e
    for name in ("session_id", "kind"):
        _set_text(msg, name, getattr(sample, name), sid)
    msg.reward = float(sample.reward)
    for key, value in sample.metadata.items():
        try:
            msg.metadata[key] = value
        except (TypeError, ValueError) as e:
            raise SampleError(sid, "metadata", {key: value},
                              f"a map of string to string, each {UTF8_TEXT}") from e
    return msg


def checked_topk(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(teacher_topk_logp, teacher_topk_ids), both [R, K]; `SampleError` if they do not pair."""
    logp, ids = sample.teacher_topk_logp, sample.teacher_topk_ids
    if logp is None or ids is None or logp.ndim != 2 or ids.shape != logp.shape:
        raise SampleError(str(sample.sample_id), "teacher_topk_logp",
                          None if logp is None else f"shape {logp.shape}",
                          "teacher_topk_logp and teacher_topk_ids both [response_len, K]")
    return logp, ids


def to_proto(sample: Sample, out: pb.Sample | None = None) -> pb.Sample:
    """Host sample → wire message. Raises `SampleError` for values the wire cannot carry
    (no rollout log-probs, negative counters, non-string metadata, unpaired top-K arrays),
    naming the field."""
    msg = scalars_to_proto(sample, pb.Sample() if out is None else out)
    msg.tokens.extend(np.asarray(sample.tokens).reshape(-1).tolist())
    msg.loss_mask.extend(np.asarray(sample.loss_mask).reshape(-1).tolist())
    msg.rollout_logp.extend(np.asarray(sample.rollout_logp).reshape(-1).tolist())
    if sample.step_rewards is not None:
        msg.step_rewards.SetInParent()
        msg.step_rewards.values.extend(sample.step_rewards.reshape(-1).tolist())
    if sample.teacher_logp is not None:
        msg.teacher_logp.SetInParent()
        msg.teacher_logp.values.extend(sample.teacher_logp.reshape(-1).tolist())
    if sample.teacher_topk_logp is not None or sample.teacher_topk_ids is not None:
        logp, ids = checked_topk(sample)
        msg.teacher_topk.k = int(logp.shape[1])
        msg.teacher_topk.logp.extend(logp.reshape(-1).tolist())
        msg.teacher_topk.ids.extend(ids.reshape(-1).tolist())
    return msg


def from_proto(msg: pb.Sample) -> Sample:
    """Wire message → host sample (not validated). A top-K payload whose lengths do not reshape
    to `[?, K]` raises `SampleError` naming `teacher_topk`."""
    topk_logp = topk_ids = None
    if msg.HasField("teacher_topk"):
        k, n, n_ids = msg.teacher_topk.k, len(msg.teacher_topk.logp), len(msg.teacher_topk.ids)
        if k == 0 or n != n_ids or n % k:
            raise SampleError(msg.sample_id, "teacher_topk",
                              f"k={k}, len(logp)={n}, len(ids)={n_ids}",
                              "k ≥ 1 and both arrays of length response_len * k")
        topk_logp = _floats(msg.teacher_topk.logp).reshape(n // k, k)
        topk_ids = _ints(msg.teacher_topk.ids).reshape(n // k, k)
    return Sample(
        sample_id=msg.sample_id,
        tokens=_ints(msg.tokens),
        response_len=msg.response_len,
        loss_mask=_floats(msg.loss_mask),
        rollout_logp=_floats(msg.rollout_logp),
        reward=msg.reward,
        kind=msg.kind,
        session_id=msg.session_id,
        turn_index=msg.turn_index,
        policy_version=msg.policy_version,
        created_unix_ms=msg.created_unix_ms,
        step_rewards=_floats(msg.step_rewards.values) if msg.HasField("step_rewards") else None,
        teacher_logp=_floats(msg.teacher_logp.values) if msg.HasField("teacher_logp") else None,
        teacher_topk_logp=topk_logp,
        teacher_topk_ids=topk_ids,
        metadata=dict(msg.metadata),
    )
