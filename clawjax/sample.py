"""`Sample`: one trained turn on the host, the data contract of DESIGN.md.

A sample holds `tokens` = prompt followed by response; the last `response_len` tokens are the
response. Every per-response-token array (`loss_mask`, `rollout_logp`, `teacher_logp`) has length
`response_len` and is about the response token at the same index: `rollout_logp[i]` is
log π(tokens[P + i] | tokens[:P + i]) with P = len(tokens) - response_len. The prompt is never
empty (the first token of a sequence is never scored).

`clawjax.batch` re-exports `Sample`; the gRPC buffer, the replay file and the rollout side all
produce and consume this one class. It imports numpy only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np

from clawjax.error_text import shown_value

KINDS = ("rl", "opd", "both")

# Size limits a single sample must respect (the buffer enforces them as well).
MAX_TOKENS = 1 << 20
MAX_TOPK = 1024
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)

# The lowest log-prob a sample may carry (rollout_logp, teacher_logp, teacher_topk_logp). Every
# real log-prob of a float32 softmax is above about -104 (the log of the smallest denormal), and
# the serving side encodes a -inf log-prob as -9999.0 (OpenAI's "negligible"), well above this
# floor. A value near -3.4e38 (finite float32) would overflow the OPD advantage
# w_opd · (teacher_logp − old_logp) to -inf for w_opd > 1 and make the loss NaN; with every
# log-prob ≥ -1e6 that advantage stays far inside float32.
LOGP_FLOOR = -1e6

# How far above 0 the logsumexp of a top-K row (its total probability, in log space) may be.
# The K log-probs of a float32 softmax sum to at most 1 + K · 2^-24 ≈ 1 + 6e-5 for K = 1024, so
# a correct row never comes near the limit; 1e-3 is also the slack by which the rollout side
# lets a single log-prob round above 0 before clamping it to 0 (emit.POSITIVE_LOGP_SLACK), so a
# row so clamped is still accepted. A row above it is no distribution (mass > 1.001): its tail
# bin would be clamped and its bins trained towards impossible targets.
TOPK_MASS_SLACK = 1e-3


class SampleError(ValueError):
    """A sample breaks the data contract. Names the sample, the field, the value and what was
    expected, so a producer can find and fix it."""

    def __init__(self, sample_id: str, field: str, value: Any, expected: str):
        self.sample_id = sample_id
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(
            f"sample {sample_id!r}: field {field!r} = {shown_value(value)}, expected {expected}")


# What a missing `rollout_logp` is refused with where the field is required (the buffer's
# wire, replay JSONL, `pack` for a PPO ratio against the rollout policy).
ROLLOUT_LOGP_REQUIRED = ("the rollout engine's log-prob of each response token (required: the "
                         "PPO ratio's old policy under loss.old_logp = 'rollout'; zeros would "
                         "train against a policy of probability 1)")
_FLOOR_RULE = (f"log-probs ≥ LOGP_FLOOR = {LOGP_FLOOR:g} (lower values overflow the OPD "
               "advantage; an impossible token is -9999.0 on the wire)")
_TOPK_MASS_MAX = math.exp(TOPK_MASS_SLACK)


def _as_array(value, dtype) -> np.ndarray | None:
    if value is None:
        return None
    return np.asarray(value, dtype=dtype)


def _as_int32_ids(sample_id: str, field: str, value) -> np.ndarray | None:
    """`value` (token ids, any shape) as an int32 array, refusing what a cast would corrupt.

    Accepts integer arrays of any width and lists of ints whose values fit int32, and whole
    numbers held as floats (3.0); raises `SampleError` naming `field` for a fractional or
    non-finite value (3.9 would truncate to 3), a value outside int32 (2**32 + 7 would wrap to
    7) or a non-numeric dtype. int32 input is returned as is (no copy, no scan)."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype == np.int32:
        return arr
    if arr.dtype.kind not in "iuf":
        raise SampleError(sample_id, field, f"dtype {arr.dtype}",
                          "integer token ids (an integer dtype, values fitting int32)")
    if arr.dtype.kind == "f":
        fractional = arr[arr != np.round(arr)]           # NaN included (NaN != NaN)
        if fractional.size:
            raise SampleError(sample_id, field, float(fractional[0]),
                              "integral token ids (an integer dtype, values fitting int32)")
    outside = arr[(arr < INT32_MIN) | (arr > INT32_MAX)]
    if outside.size:
        bad = outside[0]
        raise SampleError(sample_id, field, int(bad) if np.isfinite(bad) else float(bad),
                          f"token ids that fit int32 ({INT32_MIN} .. {INT32_MAX})")
    return arr.astype(np.int32)


def _as_int(sample_id: str, field: str, value) -> int:
    """`value` as a Python int; raises `SampleError` naming `field` unless it is an integer
    (a whole-number float such as 2.0 is accepted, 1.7 is refused rather than truncated)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise SampleError(sample_id, field, value, "an integer")


def require_rollout_logp(sample: "Sample", where: str) -> None:
    """Raises `SampleError` (field `rollout_logp`, `ROLLOUT_LOGP_REQUIRED` and `where`, e.g.
    "on the buffer's wire") for a sample that carries no rollout log-probs."""
    if sample.rollout_logp is None:
        raise SampleError(str(sample.sample_id), "rollout_logp", None,
                          f"{ROLLOUT_LOGP_REQUIRED} {where}")


@dataclasses.dataclass(eq=False)
class Sample:
    """One trained turn. Arrays are numpy; construction converts lists to the right dtype.

    Construction refuses (`SampleError` naming the field) what a cast would silently corrupt:
    token ids (`tokens`, `teacher_topk_ids`) must be integral and fit int32 (an int64 id
    ≥ 2**31 would wrap, a float 3.9 would truncate), `response_len` an integer.

    Shapes (N = len(tokens), R = response_len, K = top-K width):
      tokens [N] int32, loss_mask [R] float32 (0/1), rollout_logp [R] float32,
      teacher_logp [R] float32 or None (present ⇒ OPD sample),
      teacher_topk_logp [R, K] float32 / teacher_topk_ids [R, K] int32, both or neither,
      step_rewards [S] float32 or None.
    `loss_mask` defaults to all ones. An omitted `rollout_logp` stays None: not known (SFT
    data, gate probes). Such a sample is valid in process, but it cannot travel (the buffer's
    wire and the replay JSONL require the field) and `pack` refuses it unless told the batch
    needs no rollout log-probs (`need_rollout_logp=False`: loss.old_logp = 'recompute', SFT):
    zeros in its place would be an old policy of probability 1.
    """

    sample_id: str
    tokens: np.ndarray
    response_len: int
    loss_mask: np.ndarray | None = None
    rollout_logp: np.ndarray | None = None
    reward: float = 0.0
    kind: str = "rl"
    session_id: str = ""
    turn_index: int = 0
    policy_version: int = 0
    created_unix_ms: int = 0
    step_rewards: np.ndarray | None = None
    teacher_logp: np.ndarray | None = None
    teacher_topk_logp: np.ndarray | None = None
    teacher_topk_ids: np.ndarray | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        sid = self.sample_id if isinstance(self.sample_id, str) else repr(self.sample_id)
        self.tokens = _as_int32_ids(sid, "tokens", self.tokens)
        self.response_len = _as_int(sid, "response_len", self.response_len)
        if self.loss_mask is None:
            self.loss_mask = np.ones((max(self.response_len, 0),), np.float32)
        self.loss_mask = _as_array(self.loss_mask, np.float32)
        self.rollout_logp = _as_array(self.rollout_logp, np.float32)
        self.teacher_logp = _as_array(self.teacher_logp, np.float32)
        self.teacher_topk_logp = _as_array(self.teacher_topk_logp, np.float32)
        self.teacher_topk_ids = _as_int32_ids(sid, "teacher_topk_ids", self.teacher_topk_ids)
        self.step_rewards = _as_array(self.step_rewards, np.float32)
        self.reward = float(self.reward)
        self.metadata = dict(self.metadata or {})

    # ------------------------------------------------------------------ derived views
    @property
    def prompt_len(self) -> int:
        """Number of prompt tokens P = len(tokens) - response_len (≥ 1 for a valid sample)."""
        return int(self.tokens.shape[0]) - self.response_len

    @property
    def has_teacher(self) -> bool:
        return self.teacher_logp is not None

    @property
    def topk_width(self) -> int | None:
        """K of the teacher top-K arrays `[R, K]` (None without them)."""
        return None if self.teacher_topk_logp is None else int(self.teacher_topk_logp.shape[1])

    @property
    def num_bytes(self) -> int:
        """Approximate payload size, used for buffer capacity accounting."""
        arrays = (self.tokens, self.loss_mask, self.rollout_logp, self.step_rewards,
                  self.teacher_logp, self.teacher_topk_logp, self.teacher_topk_ids)
        size = sum(a.nbytes for a in arrays if a is not None)
        size += len(self.sample_id) + len(self.session_id) + len(self.kind)
        size += sum(len(k) + len(v) for k, v in self.metadata.items())
        return size + 64

    # ------------------------------------------------------------------ validation
    def validate(self, vocab_size: int | None = None, max_tokens: int = MAX_TOKENS) -> "Sample":
        """Checks the data contract; raises `SampleError` on the first violation, else returns
        self. With `vocab_size`, token ids must also be < vocab_size. Log-probs are finite,
        ≤ 0 and ≥ `LOGP_FLOOR`; top-K data needs kind 'opd' or 'both', distinct ids in each
        row and a row probability ≤ 1 (logsumexp ≤ `TOPK_MASS_SLACK`)."""
        sid = self.sample_id

        def fail(field, value, expected):
            raise SampleError(sid if isinstance(sid, str) else repr(sid), field, value, expected)

        if not isinstance(sid, str) or not sid:
            fail("sample_id", sid, "a non-empty string")
        if self.kind not in KINDS:
            fail("kind", self.kind, f"one of {KINDS}")
        if self.tokens.ndim != 1:
            fail("tokens", self.tokens.shape, "a 1-D array of token ids")
        n = int(self.tokens.shape[0])
        if n > max_tokens:
            fail("tokens", f"length {n}", f"at most {max_tokens} tokens")
        if not 1 <= self.response_len <= n - 1:
            fail("response_len", self.response_len,
                 f"between 1 and len(tokens) - 1 = {n - 1} (the prompt is never empty)")
        if n and int(self.tokens.min()) < 0:
            fail("tokens", int(self.tokens.min()), "non-negative token ids")
        if vocab_size is not None and n and int(self.tokens.max()) >= vocab_size:
            fail("tokens", int(self.tokens.max()), f"token ids < vocab_size {vocab_size}")
        r = self.response_len
        for name in ("loss_mask", "rollout_logp", "teacher_logp"):
            arr = getattr(self, name)
            if arr is None:
                continue
            if arr.shape != (r,):
                fail(name, f"shape {arr.shape}", f"shape ({r},) = (response_len,)")

        # Fast checks first (two reductions, no temporaries per rule); only when one does not
        # pass does the plain rule below run, so the outcome and message are the plain rule's.
        def fast_logp_ok(a) -> bool:  # max ≤ 0 excludes NaN, +inf, positives; min ≥ floor
            return (isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.size > 0
                    and bool(a.max() <= 0) and bool(a.min() >= LOGP_FLOOR))

        mask = self.loss_mask
        fast_mask_ok = (isinstance(mask, np.ndarray) and mask.dtype.kind == "f"
                        and np.count_nonzero(mask == 0) + np.count_nonzero(mask == 1) == mask.size)
        if not fast_mask_ok and not np.all((self.loss_mask == 0) | (self.loss_mask == 1)):
            bad = self.loss_mask[(self.loss_mask != 0) & (self.loss_mask != 1)][0]
            fail("loss_mask", float(bad), "values in {0, 1}")
        for name in ("rollout_logp", "teacher_logp"):
            arr = getattr(self, name)
            if arr is None or fast_logp_ok(arr):
                continue
            if not np.all(np.isfinite(arr)):
                fail(name, float(arr[~np.isfinite(arr)][0]), "finite log-probs")
            if np.any(arr > 0):
                fail(name, float(arr[arr > 0][0]), "log-probs ≤ 0")
            if np.any(arr < LOGP_FLOOR):
                fail(name, float(arr[arr < LOGP_FLOOR][0]), _FLOOR_RULE)
        if not math.isfinite(self.reward):
            fail("reward", self.reward, "a finite float")
        if abs(self.reward) > FLOAT32_MAX:   # packed as float32: it would become ±inf
            fail("reward", self.reward, f"a finite float32 (|reward| ≤ {FLOAT32_MAX:.7g})")
        if self.kind == "opd" and self.reward != 0:
            fail("reward", self.reward, "0 for kind 'opd' (an OPD-only sample carries no RL "
                 "reward, SPEC §2; use kind 'both' for a sample with both signals)")
        if self.step_rewards is not None:
            ndim = self.step_rewards.ndim
            if ndim != 1:
                fail("step_rewards", np.atleast_1d(self.step_rewards).ravel().tolist()[:8],
                     f"a 1-D array of finite floats (got {ndim}-D)")
            if not np.all(np.isfinite(self.step_rewards)):
                at = int(np.flatnonzero(~np.isfinite(self.step_rewards))[0])
                fail("step_rewards", float(self.step_rewards[at]),
                     f"a 1-D array of finite floats (entry {at})")
        wants_teacher = self.kind in ("opd", "both")
        if wants_teacher and self.teacher_logp is None:
            fail("teacher_logp", None, f"per-token teacher log-probs for kind {self.kind!r}")
        if not wants_teacher and self.teacher_logp is not None:
            fail("kind", self.kind, "'opd' or 'both' when teacher_logp is present")
        if (self.teacher_topk_logp is None) != (self.teacher_topk_ids is None):
            fail("teacher_topk_ids", None if self.teacher_topk_ids is None else "present",
                 "teacher_topk_logp and teacher_topk_ids both present or both absent")
        if self.teacher_topk_logp is not None:
            shape = self.teacher_topk_logp.shape
            if len(shape) != 2 or shape[0] != r or not 1 <= shape[1] <= MAX_TOPK:
                fail("teacher_topk_logp", f"shape {shape}", f"shape ({r}, K) with 1 ≤ K ≤ {MAX_TOPK}")
            if self.teacher_topk_ids.shape != shape:
                fail("teacher_topk_ids", f"shape {self.teacher_topk_ids.shape}",
                     f"shape {shape} (same as teacher_topk_logp)")
            topk, ids = self.teacher_topk_logp, self.teacher_topk_ids
            if not fast_logp_ok(topk):
                for bad, rule in ((~np.isfinite(topk), "finite log-probs ≤ 0"),
                                  (topk > 0, "finite log-probs ≤ 0"),
                                  (topk < LOGP_FLOOR, _FLOOR_RULE)):
                    if np.any(bad):
                        at = tuple(int(i) for i in np.argwhere(bad)[0])
                        fail("teacher_topk_logp", float(topk[at]), f"{rule} (entry {at})")
            if np.any(ids < 0):
                fail("teacher_topk_ids", int(ids.min()), "non-negative token ids")
            if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
                fail("teacher_topk_ids", int(ids.max()), f"token ids < vocab_size {vocab_size}")
            if shape[1] > 1:
                ordered = np.sort(ids, axis=1)
                repeats = ordered[:, 1:] == ordered[:, :-1]
                if repeats.any():
                    row, col = (int(i) for i in np.argwhere(repeats)[0])
                    fail("teacher_topk_ids", f"row {row} holds id {int(ordered[row, col])} twice",
                         "distinct token ids in each row (a repeated id would count the "
                         "student's probability at it in two bins)")
            # Entries are finite, ≤ 0 and ≥ LOGP_FLOOR here: exp cannot overflow (one pass,
            # float32; its rounding is far below the slack).
            mass = np.exp(topk).sum(axis=1)
            if not bool(mass.max() <= _TOPK_MASS_MAX):
                row = int(np.flatnonzero(mass > _TOPK_MASS_MAX)[0])
                fail("teacher_topk_logp",
                     f"row {row} with logsumexp {math.log(float(mass[row])):.6g} "
                     f"(probability {float(mass[row]):.6g})",
                     f"a total probability ≤ 1 in each row (logsumexp ≤ TOPK_MASS_SLACK = "
                     f"{TOPK_MASS_SLACK:g}, float32 rounding); the top-K log-probs are part of "
                     "one distribution")
            if not wants_teacher:
                fail("kind", self.kind, "'opd' or 'both' when teacher_topk_logp and "
                     "teacher_topk_ids are present (they train the top-K KL term, an OPD "
                     "signal, SPEC §5)")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                fail("metadata", {key: value}, "a map of string to string")
        for name in ("turn_index", "policy_version", "created_unix_ms"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                fail(name, value, "a non-negative integer")
        if not isinstance(self.session_id, str):
            fail("session_id", self.session_id, "a string")
        return self

    # ------------------------------------------------------------------ JSON (replay files)
    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-ready dict whose keys are the field names (None fields are omitted)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = value.tolist() if isinstance(value, np.ndarray) else value
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "Sample":
        """Inverse of `to_json_dict`. Unknown keys raise a `SampleError` naming them, and so
        does a missing `rollout_logp` (DESIGN's data contract: only the teacher fields and
        `step_rewards` are optional; the constructor's zeros default is for in-process use)."""
        names = {f.name for f in dataclasses.fields(cls)}
        sid = str(data.get("sample_id", "<missing>"))
        unknown = sorted(set(data) - names)
        if unknown:
            raise SampleError(sid, unknown[0], data[unknown[0]], f"one of the Sample fields {sorted(names)}")
        for required in ("sample_id", "tokens", "response_len"):
            if required not in data:
                raise SampleError(sid, required, None, "a value (required field)")
        try:
            sample = cls(**dict(data))
        except SampleError:
            raise                        # already names the sample and the field
        except (TypeError, ValueError) as e:
            raise SampleError(sid, "<construction>", str(e), "values of the documented types") from e
        if data.get("rollout_logp") is None:     # checked after the fields' own types
            raise SampleError(sid, "rollout_logp", None, ROLLOUT_LOGP_REQUIRED + " (with "
                              "loss.old_logp = 'recompute' write any values ≤ 0, e.g. zeros)")
        return sample

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "Sample":
        return cls.from_json_dict(json.loads(line))

    def equals(self, other: "Sample") -> bool:
        """Field-by-field equality (arrays compared exactly)."""
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if a is None or b is None or a.shape != b.shape or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True
