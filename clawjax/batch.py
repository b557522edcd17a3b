"""Host `Sample`s → packed `TokenBatch` rows (first-fit-decreasing, bucketed row counts).

`Sample` (the data contract, DESIGN.md) lives in `clawjax.sample` and is re-exported here.

A `TokenBatch` is a JAX pytree of `[R, L]` arrays (top-K fields `[R, L, K]`), L = token budget.
Row layout: samples sit one after another, segment k (1-based) holding the row's k-th sample;
`segment_ids` 0 marks padding. Alignment: the value at `[r, t]` is about `tokens[r, t]`
predicted from the tokens before it in the same segment, so
- `positions` restart at 0 in every segment (0 on padding);
- `loss_mask` is 1 only on response tokens whose sample `loss_mask` is 1; prompt tokens (the
  first token of a segment is always a prompt token), padding and masked tokens are 0;
- `rollout_logp`, `teacher_logp` hold the sample's per-response-token values on its response
  tokens, 0 elsewhere; `old_logp` starts as a copy of `rollout_logp` (the trainer may replace
  it, e.g. `dataclasses.replace(batch, old_logp=recomputed)`);
- `teacher_mask` is 1 on the response tokens of samples that carry `teacher_logp`;
- `rewards` is the sample's scalar reward on every one of its tokens (prompt and response);
- `ref_logp` is None from `pack` (the trainer fills it when it uses a KL reference);
- `teacher_topk_logp` / `teacher_topk_ids` `[R, L, K]` and `teacher_topk_mask` `[R, L]` are
  present when any packed sample has top-K data (all such samples must share K), else None;
- `score_index` `[R, C]` (optional, `with_score_index`): per row, the positions whose
  log-prob the loss reads (loss_mask > 0), in order, then 0s. Position 0 starts a segment (or
  is padding): its log-prob is 0 by definition, so a 0 entry is inert. With it the trainer
  runs the LM head on C positions per row instead of L (prompt and padding are never scored).

Host bookkeeping: `TokenBatch.sample_ids[r][k - 1]` is the id of the sample in segment k of row
r (padding rows have `()`). It is a dropped pytree field: jit and device_put ignore it (it comes
back as None from any jax transformation), so it never causes a retrace; read it from the host
batch that `pack` returned.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from clawjax.sample import Sample, SampleError, require_rollout_logp

__all__ = ["Sample", "SampleError", "TokenBatch", "pack", "DEFAULT_ROW_BUCKETS", "row_bucket",
           "score_capacity", "with_score_index"]

DEFAULT_ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Packed device pytree; all arrays `[R, L]` unless noted (see module docstring)."""

    tokens: np.ndarray | jax.Array            # int32
    positions: np.ndarray | jax.Array         # int32, restart at 0 per segment
    segment_ids: np.ndarray | jax.Array       # int32, 1..n per row, 0 = padding
    loss_mask: np.ndarray | jax.Array         # float32 0/1
    old_logp: np.ndarray | jax.Array          # float32
    rollout_logp: np.ndarray | jax.Array      # float32
    teacher_logp: np.ndarray | jax.Array      # float32 (0 where teacher_mask is 0)
    teacher_mask: np.ndarray | jax.Array      # float32 0/1
    rewards: np.ndarray | jax.Array           # float32
    ref_logp: np.ndarray | jax.Array | None = None
    teacher_topk_logp: np.ndarray | jax.Array | None = None   # [R, L, K] float32
    teacher_topk_ids: np.ndarray | jax.Array | None = None    # [R, L, K] int32
    teacher_topk_mask: np.ndarray | jax.Array | None = None   # float32 0/1
    score_index: np.ndarray | jax.Array | None = None         # [R, C] int32, 0 = none
    sample_ids: tuple[tuple[str, ...], ...] | None = dataclasses.field(default=None, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(R, L)."""
        return tuple(self.tokens.shape)


_DATA_FIELDS = [f.name for f in dataclasses.fields(TokenBatch) if f.name != "sample_ids"]
jax.tree_util.register_dataclass(TokenBatch, data_fields=_DATA_FIELDS, meta_fields=[],
                                 drop_fields=["sample_ids"])


def row_bucket(n_rows: int, row_buckets: Sequence[int], row_multiple: int = 1) -> int:
    """Smallest bucket ≥ n_rows, each bucket first rounded up to a multiple of `row_multiple`.
    Past the largest bucket: n_rows rounded up to a multiple of the largest (rounded) bucket."""
    buckets = sorted({-(-b // row_multiple) * row_multiple for b in row_buckets})
    for b in buckets:
        if b >= n_rows:
            return b
    return -(-n_rows // buckets[-1]) * buckets[-1]


def _first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of total ≤ budget (longest first, first fit).
    Ties keep input order, so the result is deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(budget - lengths[i])
    return rows


def _check(samples: Sequence[Sample], token_budget: int, vocab_size: int | None,
           need_rollout_logp: bool) -> int | None:
    """Validates every sample; returns the shared top-K width (None if no sample has top-K)."""
    seen: set[str] = set()
    topk = None
    for s in samples:
        if not isinstance(s, Sample):
            raise TypeError(f"pack: expected Sample objects, got {type(s).__name__}")
        s.validate(vocab_size=vocab_size)
        n = int(s.tokens.shape[0])
        if n > token_budget:
            raise SampleError(s.sample_id, "tokens", f"length {n}",
                              f"at most token_budget = {token_budget} tokens (no truncation)")
        if s.sample_id in seen:
            raise SampleError(s.sample_id, "sample_id", s.sample_id, "unique within one pack call")
        seen.add(s.sample_id)
        if need_rollout_logp:
            require_rollout_logp(s, "(pack: pass need_rollout_logp=False when the batch's old "
                                    "policy is recomputed or unused, e.g. SFT)")
        k = s.topk_width
        if k is not None:
            if topk is not None and k != topk:
                raise SampleError(s.sample_id, "teacher_topk_logp", f"K = {k}",
                                  f"the same K = {topk} as the other samples in the batch")
            topk = k
    return topk


def _fill_rows(samples: Sequence[Sample], rows: list[list[int]], n_rows: int, length: int,
               topk: int | None) -> TokenBatch:
    """Lays the rows' samples out as numpy arrays `[n_rows, length]` (extra rows are padding)."""
    shape = (n_rows, length)
    a = {name: np.zeros(shape, np.int32) for name in ("tokens", "positions", "segment_ids")}
    for name in ("loss_mask", "rollout_logp", "teacher_logp", "teacher_mask", "rewards"):
        a[name] = np.zeros(shape, np.float32)
    if topk is not None:
        a["teacher_topk_logp"] = np.zeros(shape + (topk,), np.float32)
        a["teacher_topk_ids"] = np.zeros(shape + (topk,), np.int32)
        a["teacher_topk_mask"] = np.zeros(shape, np.float32)
    ids: list[tuple[str, ...]] = []
    for r, members in enumerate(rows):
        start = 0
        for k, i in enumerate(members):
            s = samples[i]
            n, p = int(s.tokens.shape[0]), s.prompt_len
            seg, resp = slice(start, start + n), slice(start + p, start + n)
            a["tokens"][r, seg] = s.tokens
            a["positions"][r, seg] = np.arange(n, dtype=np.int32)
            a["segment_ids"][r, seg] = k + 1
            a["rewards"][r, seg] = s.reward
            a["loss_mask"][r, resp] = s.loss_mask
            if s.rollout_logp is not None:
                a["rollout_logp"][r, resp] = s.rollout_logp
            if s.teacher_logp is not None:
                a["teacher_logp"][r, resp] = s.teacher_logp
                a["teacher_mask"][r, resp] = 1.0
            if s.teacher_topk_logp is not None:
                a["teacher_topk_logp"][r, resp] = s.teacher_topk_logp
                a["teacher_topk_ids"][r, resp] = s.teacher_topk_ids
                a["teacher_topk_mask"][r, resp] = 1.0
            start += n
        ids.append(tuple(samples[i].sample_id for i in members))
    ids.extend(() for _ in range(n_rows - len(rows)))
    return TokenBatch(old_logp=a["rollout_logp"].copy(), sample_ids=tuple(ids), **a)


SCORE_STEPS = 8  # score_index capacities are multiples of L / SCORE_STEPS


def score_capacity(loss_mask: np.ndarray) -> int:
    """C for `with_score_index`: the fullest row's count of scored positions rounded up to a
    multiple of L / SCORE_STEPS (so a run compiles at most SCORE_STEPS shapes per row count),
    at least 1 step, at most L. `loss_mask` is `[..., R, L]`."""
    length = int(loss_mask.shape[-1])
    step = max(1, length // SCORE_STEPS)
    need = int(np.max(np.count_nonzero(np.asarray(loss_mask) > 0, axis=-1), initial=0))
    return min(length, max(step, -(-need // step) * step))


def with_score_index(batch: TokenBatch, capacity: int | None = None) -> TokenBatch:
    """`batch` with `score_index` `[R, C]` set (C = `capacity` or `score_capacity`): row r
    lists the t with loss_mask[r, t] > 0 and segment_ids[r, t] > 0, ascending, then 0s.
    Raises ValueError when a row has more scored positions than `capacity`."""
    mask = (np.asarray(batch.loss_mask) > 0) & (np.asarray(batch.segment_ids) > 0)
    cap = score_capacity(mask) if capacity is None else int(capacity)
    counts = np.count_nonzero(mask, axis=-1)
    if counts.size and int(counts.max()) > cap:
        raise ValueError(f"with_score_index: capacity = {cap}, expected ≥ the fullest row's "
                         f"{int(counts.max())} scored positions")
    index = np.zeros(mask.shape[:-1] + (cap,), np.int32)
    rows, cols = np.nonzero(mask)                      # row-major: ascending t within a row
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    index[rows, slot] = cols
    return dataclasses.replace(batch, score_index=index)


def pack(samples: Sequence[Sample], token_budget: int,
         row_buckets: Sequence[int] = DEFAULT_ROW_BUCKETS, row_multiple: int = 1,
         vocab_size: int | None = None, need_rollout_logp: bool = True) -> list[TokenBatch]:
    """Packs samples into rows of `token_budget` tokens (first-fit-decreasing) → TokenBatches.

    Every sample is validated (`Sample.validate`); one longer than `token_budget` raises a
    `SampleError` naming its id and length (never truncated), as do duplicate ids and mixed
    top-K widths, and (with `need_rollout_logp`, the default) a sample without `rollout_logp`:
    the batch's `old_logp` is their copy. With `need_rollout_logp=False` (the old policy is
    recomputed, or no ratio is taken: SFT, probes) such a sample packs zeros there. Rows are
    grouped into batches of at most `max(row_buckets)` rows (rounded up to `row_multiple`);
    each batch's row count is rounded up to a bucket (`row_bucket`), so a run compiles one
    shape per bucket. Padding rows are all zeros (segment 0). Each sample lands
    in exactly one row of one batch. Returns numpy-backed TokenBatches (`[] ` for no samples);
    the trainer device_puts them with its sharding.
    """
    if isinstance(token_budget, bool) or not isinstance(token_budget, (int, np.integer)) \
            or token_budget < 2:
        raise ValueError(f"pack: token_budget = {token_budget!r}, expected an int ≥ 2")
    if not row_buckets or any(int(b) < 1 for b in row_buckets):
        raise ValueError(f"pack: row_buckets = {tuple(row_buckets)!r}, expected positive ints")
    if isinstance(row_multiple, bool) or int(row_multiple) < 1:
        raise ValueError(f"pack: row_multiple = {row_multiple!r}, expected an int ≥ 1")
    token_budget, row_multiple = int(token_budget), int(row_multiple)
    topk = _check(samples, token_budget, vocab_size, need_rollout_logp)
    rows = _first_fit_decreasing([int(s.tokens.shape[0]) for s in samples], token_budget)
    per_batch = row_bucket(max(int(b) for b in row_buckets), (1,), row_multiple)
    batches = []
    for lo in range(0, len(rows), per_batch):
        group = rows[lo:lo + per_batch]
        n_rows = row_bucket(len(group), row_buckets, row_multiple)
        batches.append(_fill_rows(samples, group, n_rows, token_budget, topk))
    return batches
