"""Per-token log-probs and entropy straight from hidden states, without the `[T, V]` logits.

Imports jax and the standard library only (re-exported by `clawjax.losses`, which must import
with just jax and numpy installed).

Shapes: hidden `[..., T, D]`, lm_head `[D, V]` (logits = hidden @ lm_head), targets `[..., T]`;
packed rows are hidden `[R, L, D]` with tokens / segment_ids `[R, L]` as in `TokenBatch`
(`segment_ids` 1..n per row, 0 is padding).

Invariants:
- logits are computed in float32 (float64 for float64 inputs) even for bfloat16 inputs, and
  results come back in that dtype;
- the vocabulary is walked `chunk` columns at a time: forward and backward hold a few
  `[B, T, chunk]` logits blocks, never `[B, T, V]`, and the lm_head gradient is written into
  its `[D, V]` slot block by block, with no second `[D, V]` accumulator;
- entropy is over the full vocabulary; gradients flow to `hidden` and `lm_head` only;
- `sequence_*` outputs are aligned like `TokenBatch`: the value at `[r, t]` is about
  `tokens[r, t]`, predicted from `hidden[r, t − 1]` of the same segment; positions that start a
  segment or are padding hold exactly 0 and pass no gradient;
- token ids (targets, tokens, topk_ids) have an integer dtype: a float dtype is refused at trace
  time, naming the argument. Their values must lie in [0, V), and that is NOT checked (values are
  invisible under jit): an id outside matches no vocabulary column, so its log-prob comes out as
  the finite, meaningless −logsumexp(logits). Check ids on the host (`Sample.validate` does).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def _vocab_block(h: Array, lm_head: Array, i: Array, c: int, dtype: Any):
    """Block i of the vocabulary walk: columns [start, start + c) with start = min(i·c, V − c),
    so every block has c columns and the last one may overlap its predecessor.
    Returns (start, lm_head block `[D, c]` in dtype, logits `[B, T, c]`, fresh `[c]`) where
    `fresh` marks the columns no earlier block covered (col ≥ i·c)."""
    v = lm_head.shape[1]
    start = jnp.minimum(i * c, v - c)
    w_c = jax.lax.dynamic_slice_in_dim(lm_head, start, c, axis=1).astype(dtype)
    logits = jnp.einsum("BTD,DV->BTV", h, w_c)
    fresh = start + jnp.arange(c) >= i * c
    return start, w_c, logits, fresh


def _block_stats(logits: Array, fresh: Array) -> tuple[Array, Array, Array]:
    """Softmax statistics of one block's fresh columns, each `[B, T]`: m = max z,
    s = Σ exp(z − m), a = Σ exp(z − m)·(z − m)."""
    m = jnp.max(jnp.where(fresh, logits, -jnp.inf), axis=-1)
    shifted = jnp.where(fresh, logits - m[..., None], 0.0)
    e = jnp.where(fresh, jnp.exp(shifted), 0.0)
    return m, jnp.sum(e, axis=-1), jnp.sum(e * shifted, axis=-1)


def _merge_stats(x: tuple[Array, Array, Array], y: tuple[Array, Array, Array]):
    """(m, s, a) of the union of two disjoint column sets (online softmax): rescales both to
    the larger max; a uses Σ e^{z−m'}(z−m') = e^{m−m'}(a + (m − m')·s)."""
    (m1, s1, a1), (m2, s2, a2) = x, y
    m = jnp.maximum(m1, m2)
    d1, d2 = m1 - m, m2 - m
    e1, e2 = jnp.exp(d1), jnp.exp(d2)
    return m, s1 * e1 + s2 * e2, e1 * (a1 + d1 * s1) + e2 * (a2 + d2 * s2)


def _compute_dtype(hidden: Array, lm_head: Array) -> Any:
    return jnp.promote_types(jnp.promote_types(hidden.dtype, lm_head.dtype), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _vocab_scan(h: Array, lm_head: Array, ids: Array, c: int) -> tuple[Array, Array]:
    """h `[B, T, D]`, lm_head `[D, V]`, ids `[B, T, K]` int32, vocabulary block c ≤ V →
    (log π(ids) `[B, T, K]`, entropy `[B, T]`) in the compute dtype."""
    return _vocab_scan_fwd(h, lm_head, ids, c)[0]


def _vocab_scan_fwd(h, lm_head, ids, c):
    """One online pass over vocabulary blocks: running (max, Σe, Σe·(z − max)) and the logits
    at ids; saves only `[B, T]` log-normaliser and entropy (besides the inputs)."""
    dtype = _compute_dtype(h, lm_head)
    hd = h.astype(dtype)
    n_blocks = -(-lm_head.shape[1] // c)

    def block(i):
        start, _, logits, fresh = _vocab_block(hd, lm_head, i, c, dtype)
        hit = (ids >= i * c) & (ids < start + c)
        at_ids = jnp.take_along_axis(logits, jnp.clip(ids - start, 0, c - 1), axis=-1)
        return _block_stats(logits, fresh), jnp.where(hit, at_ids, 0.0)

    def step(carry, i):
        stats, at_ids = carry
        new_stats, new_at_ids = block(i)
        return (_merge_stats(stats, new_stats), at_ids + new_at_ids), None

    (m, s, a), at_ids = jax.lax.scan(step, block(0), jnp.arange(1, n_blocks))[0]
    log_s = jnp.log(s)
    lse = m + log_s                                   # log Σ_V exp(z)
    entropy = log_s - a / s                           # lse − E_p[z], without cancellation
    logp = at_ids - lse[..., None]
    return (logp, entropy), (h, lm_head, ids, lse, entropy)


def _vocab_scan_bwd(c, residuals, cotangents):
    """Walks the vocabulary blocks again: dz = Σ_k g_k·(1[j = id_k] − p_j)
    − g_H·p_j·(log p_j + H); dW[:, block] = hᵀ·dz is written into a `[D, V]` loop carry (no
    accumulator: each column is written, never summed; an overlapping last block rewrites
    equal values) and dh += dz·W_blockᵀ over fresh columns only."""
    h, lm_head, ids, lse, entropy = residuals
    g_logp, g_entropy = cotangents
    dtype = _compute_dtype(h, lm_head)
    hd = h.astype(dtype)
    g_sum = jnp.sum(g_logp, axis=-1)[..., None]
    n_blocks = -(-lm_head.shape[1] // c)

    def step(carry, i):
        dh, dw = carry
        start, w_c, logits, fresh = _vocab_block(hd, lm_head, i, c, dtype)
        logsm = logits - lse[..., None]
        dz = -jnp.exp(logsm) * (g_sum + g_entropy[..., None] * (logsm + entropy[..., None]))
        cols = start + jnp.arange(c)
        for k in range(ids.shape[-1]):                # K is small: one fused elementwise pass
            dz = dz + jnp.where(cols == ids[..., k:k + 1], g_logp[..., k:k + 1], 0.0)
        dw_c = jnp.einsum("BTV,BTD->DV", dz, hd).astype(dw.dtype)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=1)
        dh = dh + jnp.einsum("BTV,DV->BTD", jnp.where(fresh, dz, 0.0), w_c)
        return (dh, dw), None

    init = (jnp.zeros(h.shape, dtype), jnp.zeros_like(lm_head))
    dh, dw = jax.lax.scan(step, init, jnp.arange(n_blocks))[0]
    return dh.astype(h.dtype), dw, None


_vocab_scan.defvjp(_vocab_scan_fwd, _vocab_scan_bwd)


def _chunked_logp_entropy(hidden: Array, lm_head: Array, ids: Array, chunk: int
                          ) -> tuple[Array, Array]:
    """hidden `[..., T, D]`, lm_head `[D, V]`, ids `[..., T, K]` → (log π(ids) `[..., T, K]`,
    entropy `[..., T]`), float32 (float64 for float64 inputs).

    The leading dims are flattened to B rows that stay a batch dimension (so a data-parallel
    sharding of rows is kept). A scan walks the VOCABULARY `chunk` columns at a time (a
    `jax.custom_vjp`): the forward keeps an online log-sum-exp and entropy statistic, the
    backward recomputes each `[B, T, chunk]` logits block, writes its `[D, chunk]` slice of
    the lm_head gradient in place and accumulates the `[B, T, D]` hidden gradient. Neither pass
    holds `[B, T, V]` logits nor a separate `[D, V]` accumulator."""
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"chunk = {chunk!r}, expected a positive int (Python or NumPy)")
    chunk = int(chunk)
    lead, d = hidden.shape[:-1], hidden.shape[-1]
    k = ids.shape[-1]
    if not lead or ids.shape[:-1] != lead:
        raise ValueError(f"ids shape {ids.shape} does not match hidden {hidden.shape} (…, T)")
    if lm_head.ndim != 2 or lm_head.shape[0] != d:
        raise ValueError(f"lm_head shape {lm_head.shape}, expected (D={d}, V)")
    t = lead[-1]
    h = hidden.reshape(-1, t, d)                                   # [B, T, D]
    i = ids.reshape(-1, t, k).astype(jnp.int32)                    # [B, T, K]
    logp, entropy = _vocab_scan(h, lm_head, i, min(chunk, lm_head.shape[1]))
    return logp.reshape(*lead, k), entropy.reshape(lead)


def _check_ids(fn: str, ids: dict[str, Any]) -> None:
    """Refuses token ids (name → array; None skipped) of a non-integer dtype, naming the field:
    the int32 cast would silently truncate them (1.7 → 1). Dtypes are static: trace time only."""
    for name, x in ids.items():
        dtype = None if x is None else x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"{fn}: {name} has dtype {dtype}, expected an integer dtype "
                             "(token ids in [0, V))")


def token_logp_and_entropy(hidden: Array, lm_head: Array, targets: Array, chunk: int = 512
                           ) -> tuple[Array, Array]:
    """(log π(targets), full-vocabulary entropy), each `[..., T]` float32, from hidden
    `[..., T, D]` and lm_head `[D, V]` (logits = hidden @ lm_head, computed in float32 even for
    bfloat16 inputs). `chunk` is the VOCABULARY block: forward and backward hold a few
    `[T, chunk]` logits blocks, never `[T, V]`, and the lm_head gradient is written block by
    block without a second `[D, V]` buffer. Gradients flow to `hidden` and `lm_head`.
    `targets` are integer ids in [0, V): a float dtype is refused; the values are not checked
    (an id outside [0, V) gives a finite, meaningless log-prob: see the module docstring)."""
    _check_ids("token_logp_and_entropy", {"targets": targets})
    logp, entropy = _chunked_logp_entropy(hidden, lm_head, targets[..., None], chunk)
    return logp[..., 0], entropy


def _shift(ids: Array, segment_ids: Array) -> tuple[Array, Array]:
    """The ids each hidden position predicts: `[R, L, ...]` ids → next ids (ids[t + 1] at t, 0
    at the last position) and valid `[R, L]` (t + 1 continues t's non-padding segment). The
    hidden states are used whole, not sliced, so no `[R, L−1, D]` copy is made."""
    nxt = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return nxt, jnp.pad(valid, ((0, 0), (0, 1)))


def _unshift(values: Array, valid: Array) -> Array:
    """`[R, L, ...]` values about the next token → `[R, L, ...]` aligned like the tokens
    (value at t about tokens[t]); 0 at position 0 and where not valid (no gradient there)."""
    mask = valid.reshape(valid.shape + (1,) * (values.ndim - valid.ndim))
    values = jnp.where(mask, values, 0.0)[:, :-1]
    return jnp.pad(values, ((0, 0), (1, 0)) + ((0, 0),) * (values.ndim - 2))


def sequence_logp_and_entropy(hidden: Array, lm_head: Array, tokens: Array, segment_ids: Array,
                              chunk: int = 512) -> tuple[Array, Array]:
    """Packed-row log-probs: hidden `[R, L, D]`, lm_head `[D, V]`, tokens / segment_ids
    `[R, L]` → (logp `[R, L]`, entropy `[R, L]`), float32, aligned like `TokenBatch`: the value
    at t is about tokens[t], computed from hidden[t−1] of the same segment; positions that start
    a segment or are padding hold 0 (and pass no gradient). Memory-lean as
    `token_logp_and_entropy`; tokens are integer ids in [0, V) (only the dtype is checked)."""
    _check_ids("sequence_logp_and_entropy", {"tokens": tokens})
    ids, valid = _shift(tokens, segment_ids)
    logp, entropy = token_logp_and_entropy(hidden, lm_head, ids, chunk)
    return _unshift(logp, valid), _unshift(entropy, valid)


def sequence_logp_entropy_topk(hidden: Array, lm_head: Array, tokens: Array, segment_ids: Array,
                               topk_ids: Array, chunk: int = 512
                               ) -> tuple[Array, Array, Array]:
    """`sequence_logp_and_entropy` plus the student's log-probs at the teacher's top-K ids
    (`topk_ids [R, L, K]`, aligned like tokens: row t holds the ids for the prediction of
    tokens[t]) → (logp `[R, L]`, entropy `[R, L]`, topk_logp `[R, L, K]`), one pass.
    tokens and topk_ids are integer ids in [0, V) (only the dtype is checked)."""
    _check_ids("sequence_logp_entropy_topk", {"tokens": tokens, "topk_ids": topk_ids})
    ids = jnp.concatenate([tokens[..., None], topk_ids.astype(tokens.dtype)], axis=-1)
    ids, valid = _shift(ids, segment_ids)
    both, entropy = _chunked_logp_entropy(hidden, lm_head, ids, chunk)
    both = _unshift(both, valid)
    return both[..., 0], _unshift(entropy, valid), both[..., 1:]


def _take_rows(x: Array, index: Array) -> Array:
    """x `[R, L, ...]`, index `[R, C]` → `[R, C, ...]` (per-row gather, no cross-row traffic:
    a data-parallel sharding of rows is kept)."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def sequence_logp_at(hidden: Array, lm_head: Array, tokens: Array, segment_ids: Array,
                     index: Array, chunk: int = 512, topk_ids: Array | None = None
                     ) -> tuple[Array, Array, Array | None]:
    """`sequence_logp_and_entropy` (and, with `topk_ids` `[R, L, K]`, the top-K log-probs of
    `sequence_logp_entropy_topk`) evaluated only at the positions `index` `[R, C]` of each row
    (`TokenBatch.score_index`): the LM head runs on `[R, C]` hidden states instead of `[R, L]`.
    Returns `[R, L]` arrays (and `[R, L, K]`), equal to the full functions' at the indexed
    positions and 0 everywhere else (no gradient there). Entries 0 of `index` are inert.
    tokens and topk_ids are integer ids in [0, V) (only the dtype is checked)."""
    _check_ids("sequence_logp_at", {"tokens": tokens, "topk_ids": topk_ids, "index": index})
    prev = jnp.maximum(index - 1, 0)
    ids = tokens[..., None]
    if topk_ids is not None:
        ids = jnp.concatenate([ids, topk_ids.astype(tokens.dtype)], axis=-1)
    seg_t, seg_prev = _take_rows(segment_ids, index), _take_rows(segment_ids, prev)
    valid = (index > 0) & (seg_t == seg_prev) & (seg_t > 0)                 # [R, C]
    both, entropy = _chunked_logp_entropy(_take_rows(hidden, prev), lm_head,
                                          _take_rows(ids, index), chunk)    # [R, C, K+1], [R, C]
    both = jnp.where(valid[..., None], both, 0.0)
    entropy = jnp.where(valid, entropy, 0.0)
    rows = jnp.arange(index.shape[0])[:, None]
    both_full = jnp.zeros(tokens.shape + both.shape[-1:], both.dtype).at[rows, index].add(both)
    ent_full = jnp.zeros(tokens.shape, entropy.dtype).at[rows, index].add(entropy)
    topk = both_full[..., 1:] if topk_ids is not None else None
    return both_full[..., 0], ent_full, topk
