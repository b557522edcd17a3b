"""The embedded server's batched decoding engine: one background thread, a fixed-shape KV cache
with `max_batch` slots, continuous batching and weight versions.

Each engine step (the thread's loop):
  1. installs a pending weight swap (`load_weights` loaded it off the hot path),
  2. admits waiting requests into free slots and prefills them together in one forward over
     just their cache rows (rows right-padded by position -1; T and the row count bucketed
     to powers of two),
  3. runs one batched decode step (T = 1) for every active slot, one forward per weight
     version in use (rows of the other version are padding, so they are not touched),
     attending a power-of-two window of cache slots that covers the longest active row.

Weight-version policy: a request records the weight version current when it is admitted
(prefilled) and finishes on it; the old parameters stay alive until their last request
finishes, new requests start on the newest version, and generation never pauses for a swap.
So a response never mixes versions and `meta_info.weight_version` names the one that
produced every token of it. The swap itself is a pointer change between two steps.

Log-probs are the model's raw float32 log-softmax (temperature 1, no truncation), computed in
the same forward that produced the token, so they equal a full-forward recomputation of the
same tokens. Input log-probs follow SGLang (SPEC.md §7): entries for prompt positions
`logprob_start_len .. L-1`, the first one `None`; `logprob_start_len = -1` means `L - 1`.
While fewer than `min_new_tokens` are out, `stop_token_ids` (and EOS ids unless `ignore_eos`)
cannot be drawn (SGLang); the mask only affects which token is drawn, not the log-probs.
As in SGLang's detokenizer, a matched stop token id (or EOS) ends `output_ids` but not `text`,
and a matched stop string is cut from `text`, unless `no_stop_trim`. A stop string ends
generation only where it ends past the text of the first `min_new_tokens` tokens (SGLang checks
the recent tail only): an occurrence wholly inside that text is ignored, so the cut never falls
before text a stream already sent (the streams hold back a tail that may start a stop string).
An exception in one request's share of a step aborts it alone ("request error: ...",
`request_errors`; the rest of the step and the cache carry on); a failing forward aborts the
whole step and resets the cache ("engine error: ...", `engine_errors`).
The request record and the response built from it live in `request`, the checks a weight
swap must pass in `weights`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clawjax.serving.fields import ProtocolError
from clawjax.serving.request import Request, result_of
from clawjax.serving.sampling import prompt_logprobs, sample_token, top_logprobs
from clawjax.serving.steps import bucket, make_steps
from clawjax.serving.weights import check_same_architecture, check_same_params

__all__ = ["Engine", "Request"]

log = logging.getLogger(__name__)


class Engine:
    """Continuous-batching generator over a `clawjax.model` Transformer.

    Args:
      model: the Transformer; config: its ModelConfig.
      max_batch: KV-cache slots (concurrent sequences). context_len: cache length (prompt +
        output tokens per sequence). eos_ids: tokens that end generation unless `ignore_eos`.
      detokenize: `(ids, skip_special_tokens) -> str` or None (no stop strings / text then).
    """

    def __init__(self, model, config, *, max_batch: int = 8, context_len: int = 1024,
                 weight_version: str = "default", eos_ids: tuple[int, ...] = (),
                 detokenize: Callable[[list[int], bool], str] | None = None, seed: int = 0):
        self.config = config
        self.max_batch = max_batch
        self.context_len = context_len
        self.eos_ids = frozenset(eos_ids)
        self.detokenize = detokenize
        graphdef, state = nnx.split(model)
        self._graphdef = graphdef
        self._prefill, self._decode = make_steps(graphdef)
        # generation id -> (weight_version label, params); labels may repeat, ids never do.
        self._params: dict[int, tuple[str, Any]] = {0: (weight_version, state)}
        self._gen = 0
        self.weight_version = weight_version
        # The cache lives replicated on the params' mesh: the sharding the jitted steps return
        # it with, so the first and later calls hit the same compiled executable.
        leaf = jax.tree.leaves(state)[0]
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        self._cache_sharding = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                                if isinstance(mesh, jax.sharding.Mesh) else None)
        self._cache_spec = jax.eval_shape(
            lambda: model.init_cache(max_batch, context_len, jnp.float32))
        self._cache = self._new_cache()
        self._slots: list[Request | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._swap: tuple[str, Any, threading.Event] | None = None
        self._load_lock = threading.Lock()
        self._paused = False
        self._closed = False
        self._rng = np.random.default_rng(seed)
        self.counters = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="clawjax-engine", daemon=True)
        self._thread.start()

    def _new_cache(self):
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self._cache_spec)
        return zeros if self._cache_sharding is None else jax.device_put(zeros,
                                                                         self._cache_sharding)

    # --- public, thread-safe ---------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queues a validated request (lengths already checked against `context_len`).
        Raises ProtocolError naming `rid` when a request with the same rid is in flight
        (SGLang refuses a duplicate request id), so `/abort_request` names one request."""
        if req.rng is None:
            req.rng = (np.random.default_rng(req.params.sampling_seed)
                       if req.params.sampling_seed is not None
                       else np.random.default_rng(self._rng.integers(1 << 63)))
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            if any(r is not None and r.rid == req.rid for r in (*self._waiting, *self._slots)):
                raise ProtocolError("rid", req.rid, "a request id no request in flight has")
            self._waiting.append(req)
            self._cv.notify_all()

    def abort(self, rid: str | None = None, message: str = "aborted",
              request: Request | None = None) -> int:
        """Marks the requests with `rid` (all: `rid=None`) aborted, or when `request` is given
        that one alone; returns how many were found. In-flight rids are unique (`submit`)."""
        n = 0
        with self._cv:
            for r in list(self._waiting) + [s for s in self._slots if s is not None]:
                if request is not None:
                    hit = r is request
                else:
                    hit = rid is None or r.rid == rid
                if hit:
                    r.aborted = message
                    n += 1
            self._cv.notify_all()
        return n

    def pause(self) -> None:
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def load_weights(self, model, config, version: str, timeout: float = 600.0) -> None:
        """Installs new weights (already loaded by the caller, off the engine thread) as
        `version`; returns once the engine has switched. Raises ValueError when `config`
        differs from the serving model's (the cache and compiled steps depend on it), and
        TimeoutError when the engine did not switch within `timeout` s (the swap is then
        withdrawn: the current weights keep serving)."""
        check_same_architecture(config, self.config)
        _, state = nnx.split(model)
        with self._cv:
            current = self._params[self._gen][1]
        check_same_params(state, current)
        with self._load_lock:
            done = threading.Event()
            with self._cv:
                self._swap = (version, state, done)
                self._cv.notify_all()
            if not done.wait(timeout):
                with self._cv:
                    if not done.is_set():  # withdrawn: a failed load must not land later
                        self._swap = None
                        raise TimeoutError(f"engine did not take the new weights within "
                                           f"{timeout}s; they were not installed")

    def stats(self) -> dict:
        with self._cv:
            return {"running": sum(s is not None for s in self._slots),
                    "waiting": len(self._waiting), "weight_version": self.weight_version,
                    "versions_alive": sorted(v for v, _ in self._params.values()),
                    "paused": self._paused,
                    **self.counters}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        for r in list(self._waiting) + [s for s in self._slots if s is not None]:
            r.aborted = "server shutting down"
            self._finish(r, {"type": "abort", "message": r.aborted})

    # --- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._closed:
                        return
                    self._install_swap_locked()
                    self._reap_aborted_locked()
                    if not self._paused and (self._waiting or any(self._slots)):
                        break
                    self._cv.wait(timeout=1.0)
                admitted = self._admit_locked()
                active = [r for r in self._slots if r is not None and r.finish is None]
            try:
                if admitted:
                    self._run_prefill(admitted)
                decoding = [r for r in active if r.finish is None and r not in admitted]
                if decoding:
                    self._run_decode(decoding)
            except Exception as e:  # noqa: BLE001 - a failing step must not kill the server
                for r in admitted + active:
                    if r.finish is None:
                        r.finish = {"type": "abort", "message": f"engine error: {e!r}"}
                        self._finish(r, r.finish)
                self.counters["engine_errors"] += 1
                self._cache = self._new_cache()
            with self._cv:
                self._drop_unused_versions_locked()

    def _install_swap_locked(self) -> None:
        """Installs a pending swap (between steps, or while idle or paused) and drops the
        versions no admitted request runs on, before `load_weights` returns: updates with no
        traffic keep one parameter copy, not one per update."""
        if self._swap is None:
            return
        version, state, done = self._swap
        self._swap = None
        self._gen += 1
        self._params[self._gen] = (version, state)
        self.weight_version = version
        self.counters["weight_swaps"] += 1
        self._drop_unused_versions_locked()
        done.set()

    def _drop_unused_versions_locked(self) -> None:
        """Frees every weight version but the current one and those of requests in slots
        (admitted, unfinished: they finish on their own version). Runs on the engine thread
        between steps, so no forward is using a version it drops."""
        in_use = {r.gen for r in self._slots if r is not None} | {self._gen}
        for g in list(self._params):
            if g not in in_use:
                del self._params[g]

    def _reap_aborted_locked(self) -> None:
        for r in list(self._waiting):
            if r.aborted:
                self._waiting.remove(r)
                self._finish(r, {"type": "abort", "message": r.aborted})
        for i, r in enumerate(self._slots):
            if r is not None and r.aborted and r.finish is None:
                self._slots[i] = None
                self._finish(r, {"type": "abort", "message": r.aborted})

    def _admit_locked(self) -> list[Request]:
        admitted = []
        for i in range(self.max_batch):
            if not self._waiting:
                break
            if self._slots[i] is None:
                r = self._waiting.popleft()
                r.slot, r.gen, r.version = i, self._gen, self.weight_version
                self._slots[i] = r
                admitted.append(r)
        return admitted

    def _run_prefill(self, reqs: list[Request]) -> None:
        """Prefills the admitted `reqs` together: b = their count bucketed to a power of two
        (<= max_batch) cache rows, theirs first, then other slots' rows as padding (position
        -1: written back unchanged), so one admission costs one row, not `max_batch`."""
        b = bucket(len(reqs), self.max_batch, least=1)
        t = bucket(max(len(r.prompt) for r in reqs), self.context_len)
        taken = {r.slot for r in reqs}
        rows = [r.slot for r in reqs] + [i for i in range(self.max_batch)
                                         if i not in taken][:b - len(reqs)]
        tokens = np.zeros((b, t), np.int32)
        positions = np.full((b, t), -1, np.int32)
        targets = np.zeros((b, t), np.int32)
        last_idx = np.zeros((b,), np.int32)
        k = 0
        for j, r in enumerate(reqs):
            n = len(r.prompt)
            tokens[j, :n] = r.prompt
            positions[j, :n] = np.arange(n)
            targets[j, :n - 1] = r.prompt[1:]
            last_idx[j] = n - 1
            if r.return_logprob:
                k = max(k, r.top_logprobs_num)
        k = 0 if k == 0 else 1 << (k - 1).bit_length()  # bucket k to bound recompiles
        k = min(k, self.config.vocab_size)
        self._cache, last, tok_logp, top_v, top_i = self._prefill(
            self._params[reqs[0].gen][1], self._cache, np.asarray(rows, np.int32), tokens,
            positions, targets, last_idx, k=k)
        last, tok_logp = np.asarray(last), np.asarray(tok_logp)
        top_v, top_i = (np.asarray(top_v), np.asarray(top_i)) if k else (None, None)
        self.counters["prefill_steps"] += 1
        for j, r in enumerate(reqs):
            try:
                if r.return_logprob:
                    r.input_logp, r.input_top = prompt_logprobs(
                        tok_logp, top_v, top_i, j, len(r.prompt), r.logprob_start_len,
                        r.top_logprobs_num)
                if r.params.max_new_tokens == 0:
                    self._finish(r, {"type": "length", "length": 0})
                else:
                    self._accept(r, last[j])
            except Exception as e:  # noqa: BLE001 - this request's failure, not the step's
                self._request_error(r, e)

    def _run_decode(self, reqs: list[Request]) -> None:
        """One decode step for `reqs`, one forward per weight generation among them; attention
        reads a power-of-two window of slots covering the longest of its rows."""
        by_gen: dict[int, list[Request]] = collections.defaultdict(list)
        for r in reqs:
            by_gen[r.gen].append(r)
        for gen, group in by_gen.items():
            tokens = np.zeros((self.max_batch, 1), np.int32)
            positions = np.full((self.max_batch, 1), -1, np.int32)
            for r in group:
                tokens[r.slot, 0] = r.output_ids[-1]
                positions[r.slot, 0] = len(r.prompt) + len(r.output_ids) - 1
            window = bucket(int(positions.max()) + 1, self.context_len)
            self._cache, logp = self._decode(self._params[gen][1], self._cache, tokens,
                                             positions, window=window)
            logp = np.asarray(logp)
            self.counters["decode_steps"] += 1
            for r in group:
                try:
                    self._accept(r, logp[r.slot])
                except Exception as e:  # noqa: BLE001 - this request's failure, not the step's
                    self._request_error(r, e)

    def _request_error(self, r: Request, e: Exception) -> None:
        """Aborts `r` alone for an exception raised in its share of a step."""
        self.counters["request_errors"] += 1
        log.warning("engine: request %s failed", r.rid, exc_info=e)
        if r.finish is None:  # else it failed in its own on_done: finished, slot freed
            self._finish(r, {"type": "abort", "message": f"request error: {e!r}"})

    def _accept(self, r: Request, logp: np.ndarray) -> None:
        """Samples the next token of `r` from `logp [V]` (stop/EOS ids masked while fewer than
        `min_new_tokens` are out), records it and its raw log-prob, checks stop conditions."""
        p = r.params
        banned = () if len(r.output_ids) >= p.min_new_tokens else \
            [*p.stop_token_ids, *(() if p.ignore_eos else self.eos_ids)]
        tok = sample_token(logp, p, r.rng, banned)
        r.output_ids.append(tok)
        if r.return_logprob:
            r.output_logp.append(float(logp[tok]))
            if r.top_logprobs_num:
                r.output_top.append(top_logprobs(logp, r.top_logprobs_num))
        n_out = len(r.output_ids)
        finish = None
        if n_out >= p.min_new_tokens and (
                tok in p.stop_token_ids or (tok in self.eos_ids and not p.ignore_eos)):
            finish = {"type": "stop", "matched": tok}
        elif p.stop and self.detokenize is not None and n_out > p.min_new_tokens:
            hit = self._match_stop(r, self.detokenize(r.output_ids, p.skip_special_tokens))
            if hit is not None:
                at, s = hit
                finish = {"type": "stop", "matched": s}
                r.trim_text_at = None if p.no_stop_trim else at
        if finish is None and (n_out >= p.max_new_tokens or
                               len(r.prompt) + n_out >= self.context_len):
            finish = {"type": "length", "length": n_out}
        if finish is not None:
            self._finish(r, finish)
        elif r.on_token is not None:
            r.on_token(self._result(r, None))

    def _match_stop(self, r: Request, text: str) -> tuple[int, str] | None:
        """The earliest (position, stop string) in `r`'s output `text` among occurrences that
        end past the text of its first `min_new_tokens` tokens (those hold no match; their
        text is decoded once, and only the part `text` still starts with counts: a character
        completed by a later token is not in it); None when there is none."""
        p = r.params
        protected = 0
        if p.min_new_tokens:
            if r.min_text is None:
                r.min_text = self.detokenize(r.output_ids[:p.min_new_tokens],
                                             p.skip_special_tokens)
            protected = len(os.path.commonprefix([r.min_text, text]))
        hits = [(at, s) for s in p.stop
                if (at := text.find(s, max(0, protected - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _finish(self, r: Request, finish: dict) -> None:
        r.finish = finish
        with self._cv:
            if 0 <= r.slot < self.max_batch and self._slots[r.slot] is r:
                self._slots[r.slot] = None
        self.counters["finished_" + finish["type"]] += 1
        r.on_done(self._result(r, finish))

    def _result(self, r: Request, finish: dict | None) -> dict:
        """The SGLang `/generate` response for `r` so far (`finish=None` while streaming)."""
        return result_of(r, finish, self.detokenize, self.weight_version)
