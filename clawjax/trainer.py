"""The train state and the jitted, sharded update: model → log-probs → combined loss → optax.

One update consumes a *stack* of micro-batches `[M, R, L]` (every `TokenBatch` field gets a
leading micro-batch axis). The loss is the sum of the micro-batches' loss numerators divided
once by the denominator of the whole stack (SPEC.md §4), so accumulating over M micro-batches
gives exactly the full-batch value and gradient:

    loss = Σ_m S_m(θ) / D,   ∇loss = Σ_m ∇S_m(θ) / D,   D = Σ_m D_m (independent of θ).

A non-finite loss or gradient leaves parameters and optimizer state unchanged and is counted.

Low-precision weights (`model.dtype = "bfloat16"`) are trained through float32 master copies
(`with_float32_master`); gradients of a stack are summed in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from clawjax import logprobs, losses
from clawjax.batch import TokenBatch


@flax.struct.dataclass
class TrainState:
    """Everything an update changes. `step` counts applied updates (= the policy version)."""

    step: jax.Array  # int32 scalar
    params: Any  # nnx.State of nnx.Param
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array  # int32 scalar: updates skipped for a non-finite loss or gradient


def make_optimizer(lr: float, b1: float, b2: float, weight_decay: float,
                   grad_clip: float, float32_master: bool = False) -> optax.GradientTransformation:
    """AdamW with a constant learning rate behind global-norm gradient clipping (SPEC §6); with
    `float32_master` (low-precision weights) run on float32 master copies."""
    adamw = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay),
    )
    return with_float32_master(adamw) if float32_master else adamw


class MasterState(NamedTuple):
    """`with_float32_master`'s state: the float32 master weights and `inner`'s state on them."""
    master: Any
    inner: Any


def with_float32_master(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied to float32 master copies of the weights, which may be of lower precision.

    SPEC §6's lr 1e-5 moves a weight by about 1e-5: less than half a bfloat16 spacing for
    |w| > ~4e-3, so applied to bfloat16 weights directly most updates round away. Here the
    masters take every update (gradients cast to float32 first) and each update returned moves
    a weight exactly onto its master rounded to the weight's dtype (`optax.apply_updates`
    computes w + u in float32 and casts back). Invariant: weights == masters.astype(dtype)."""

    def init(params):
        master = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), params)
        return MasterState(master, inner.init(master))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("with_float32_master: update needs the current params")
        grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
        updates, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        to_master = jax.tree.map(
            lambda m, w: m.astype(w.dtype).astype(jnp.float32) - w.astype(jnp.float32),
            master, params)
        return to_master, MasterState(master, inner_state)

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static configuration of the jitted step (hashable)."""

    loss: losses.LossConfig
    old_logp: str = "rollout"  # rollout | recompute
    logp_chunk: int = 1024
    use_ref: bool = False


def sequence_logp(graphdef, params, batch: TokenBatch, chunk: int):
    """`(logp [R, L], entropy [R, L], student_topk_logp [R, L, K] | None)`, aligned with
    `batch.tokens` (DESIGN.md); top-K only when the batch carries teacher top-K ids. With
    `batch.score_index` the values exist at the scored positions only (0 elsewhere, which the
    loss never reads: it masks with loss_mask)."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden(batch.tokens, batch.positions, batch.segment_ids)
    if batch.score_index is not None:  # the LM head on the scored positions only
        return logprobs.sequence_logp_at(hidden, model.lm_head(), batch.tokens,
                                         batch.segment_ids, batch.score_index, chunk=chunk,
                                         topk_ids=batch.teacher_topk_ids)
    if batch.teacher_topk_ids is not None:
        return losses.sequence_logp_entropy_topk(
            hidden, model.lm_head(), batch.tokens, batch.segment_ids, batch.teacher_topk_ids,
            chunk=chunk)
    logp, entropy = losses.sequence_logp_and_entropy(
        hidden, model.lm_head(), batch.tokens, batch.segment_ids, chunk=chunk)
    return logp, entropy, None


def _micro_terms(graphdef, params, ref_params, batch: TokenBatch, cfg: StepConfig):
    """Loss `(sum, denominator)` terms of one micro-batch, and Σ|logp − rollout_logp|."""
    logp, entropy, student_topk = sequence_logp(graphdef, params, batch, cfg.logp_chunk)
    if cfg.old_logp == "recompute":
        # The parameters before this update *are* `params`: their log-probs, held constant.
        batch = dataclasses.replace(batch, old_logp=jax.lax.stop_gradient(logp))
    if cfg.use_ref:
        ref_logp = sequence_logp(graphdef, ref_params, batch, cfg.logp_chunk)[0]
        batch = dataclasses.replace(batch, ref_logp=jax.lax.stop_gradient(ref_logp))
    terms = losses.combined_loss_terms(logp, batch, cfg.loss, entropy=entropy,
                                       student_topk_logp=student_topk)
    mask = batch.loss_mask
    gap = jnp.sum(jnp.abs(jax.lax.stop_gradient(logp) - batch.rollout_logp) * mask)
    return terms, gap


def make_train_step(graphdef, optimizer: optax.GradientTransformation, cfg: StepConfig):
    """Returns `step(state, stack, ref_params) -> (state, metrics)` (un-jitted; see `jit_step`).

    `stack` is a `TokenBatch` with a leading micro-batch axis `[M, R, L]`.
    """

    def step(state: TrainState, stack: TokenBatch, ref_params):
        # One denominator for the whole stack, from masks only (independent of θ).
        denom = jnp.sum(jax.vmap(lambda b: losses.reduce(
            b.loss_mask, b.loss_mask, b.segment_ids, cfg.loss.reduction)[1])(stack))
        denom = jnp.maximum(denom, 1.0)

        def numerator(params, batch):
            terms, gap = _micro_terms(graphdef, params, ref_params, batch, cfg)
            return terms["loss"][0] / denom, (terms, gap)

        grad_fn = jax.grad(numerator, has_aux=True)

        def accumulate(carry, batch):
            grads_sum, terms_sum, gap_sum = carry
            grads, (terms, gap) = grad_fn(state.params, batch)
            grads_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grads_sum, grads)
            terms_sum = losses.add_terms(terms_sum, terms)
            return (grads_sum, terms_sum, gap_sum + gap), None

        first = jax.tree.map(lambda x: x[0], stack)
        if stack.tokens.shape[0] == 1:  # one micro-batch: no accumulator, no loop
            grads, (terms, gap) = grad_fn(state.params, first)
        else:
            terms_shape = jax.eval_shape(
                lambda: _micro_terms(graphdef, state.params, ref_params, first, cfg)[0])
            zeros = (jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), state.params),
                     jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), terms_shape),
                     jnp.zeros((), jnp.float32))
            (grads, terms, gap), _ = jax.lax.scan(accumulate, zeros, stack)

        grad_norm = optax.global_norm(grads)
        loss = terms["loss"][0] / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(params_and_opt):  # the update runs only when finite (no select pass)
            params, opt_state = params_and_opt
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state

        new_params, new_opt_state = jax.lax.cond(
            finite, apply, lambda params_and_opt: params_and_opt,
            (state.params, state.opt_state))
        new_state = state.replace(
            step=state.step + finite.astype(jnp.int32),
            params=new_params,
            opt_state=new_opt_state,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = losses.divide_terms(terms)
        metrics.update(
            loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
            logp_gap=gap / jnp.maximum(terms["num_tokens"][0], 1.0),
        )
        return new_state, metrics

    return step


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.key_data(jax.random.key(seed)),
                      skipped=jnp.zeros((), jnp.int32))


def split_rows(batch: TokenBatch, micro_batches: int) -> TokenBatch:
    """`[R, L]` rows → a `[M, R / M, L]` stack of micro-batches (R divisible by M)."""
    rows = batch.tokens.shape[0]
    if rows % micro_batches:
        raise ValueError(f"split_rows: {rows} rows do not split into {micro_batches} micro-batches")
    return jax.tree.map(
        lambda x: x.reshape(micro_batches, rows // micro_batches, *x.shape[1:]), batch)
