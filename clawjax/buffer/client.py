"""`BufferClient`: the rollout fleet's and the trainer's handle on a `BufferServer`.

Trainer protocol (exactly-once after ack):
    samples = client.lease(256, timeout_s=1.0)        # or: for s in client.stream(...)
    ... train; until the checkpoint commits call client.extend_lease(ids) every
        lease_timeout_s / 3 seconds (a `LeaseKeeper` does it in a thread) ...
    client.ack(ids)                                     # durable: never delivered again
On a crash, unacked samples come back after the buffer restarts (leases are not persisted) or
when their lease expires.

Retries: UNAVAILABLE and DEADLINE_EXCEEDED are retried with exponential backoff (jittered),
RESOURCE_EXHAUSTED with the server's `retry-after-ms` hint (buffer full) as well, for up to
`retry_budget_s` per call; everything else raises at once (see `clawjax.buffer.errors`), and
so does an UNAVAILABLE that is a failed TLS handshake (`TLSHandshakeError`, see
`clawjax.buffer.handshake`). Every RPC here is safe to repeat: pushes are idempotent by sample
id, acks/nacks by id.

Deadlines: each attempt's gRPC deadline is what is left of the retry budget (at least
`MIN_ATTEMPT_S`, at most `rpc_timeout_s`), plus the seconds a Lease asks the server to wait
(`attempt_timeout_s`), so a buffer that stops answering (frozen, partitioned: its connection
still open) holds a call about `retry_budget_s` or `MIN_ATTEMPT_S` (5 s), whichever is
longer (+ that wait), never `rpc_timeout_s` per attempt. A Stream has no deadline: HTTP/2 keep-alive pings (`clawjax.buffer.keepalive`) turn
such a buffer into UNAVAILABLE within `ping_interval_s + ping_timeout_s`, retried as above.

Consumer token: each client names itself (`consumer`, a random uuid4 hex unless given) in the
`x-clawjax-consumer` metadata of Lease, Stream, Ack, Nack and ExtendLease, so the server lets
only the current lease holder nack or extend a lease (`clawjax.buffer.consumer`). Clients
that should act as one consumer (lease in one, nack in another) share a `consumer` value.
"""

from __future__ import annotations

import collections
import math
import random
import threading
import time
from typing import Iterable, Iterator, NamedTuple

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from clawjax.buffer import decode, keepalive
from clawjax.buffer import rollout_pb2 as pb
from clawjax.buffer import rollout_pb2_grpc as pb_grpc
from clawjax.buffer import wire
from clawjax.buffer.consumer import HEADER as CONSUMER_HEADER
from clawjax.buffer.consumer import check_token, new_token
from clawjax.buffer.errors import (AuthenticationError, BufferFullError, BufferUnavailableError,
                                   InvalidSampleError, MessageTooLargeError, RolloutBufferError,
                                   TLSHandshakeError)
from clawjax.buffer.handshake import give_up_on_tls
from clawjax.buffer.validate import MAX_LEASE_SAMPLES, MAX_WAIT_S, lease_wait_s
from clawjax.sample import Sample, SampleError

_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# The shortest deadline an attempt gets, however little budget is left: a healthy buffer's
# answer is not cut short on a loaded machine (a Lease cut short leaves its samples leased to
# this client, unreceived, until the lease expires).
MIN_ATTEMPT_S = 5.0


def attempt_timeout_s(rpc_timeout_s: float, budget_left_s: float, wait_s: float = 0.0) -> float:
    """The gRPC deadline of one attempt: `budget_left_s` of the retry budget (at least
    `MIN_ATTEMPT_S`, so no attempt is cut short to nothing; at most
    `rpc_timeout_s`), plus `wait_s`, the seconds the server waits on purpose (a Lease's
    long-poll). Invariant: a call's attempts end within `retry_budget_s + wait_s +
    MIN_ATTEMPT_S` of its start, whatever `rpc_timeout_s` is."""
    return wait_s + min(rpc_timeout_s, max(budget_left_s, MIN_ATTEMPT_S))


class PushResult(NamedTuple):
    accepted: int    # new samples, durable on return
    duplicates: int  # ids already known to the buffer (ignored)


def _retry_hint_s(err: grpc.RpcError) -> float | None:
    for key, value in (err.trailing_metadata() or ()):
        if key == "retry-after-ms":
            try:
                return int(value) / 1000.0
            except ValueError:
                return None
    return None


def _permanent(err: grpc.RpcError, what: str) -> RolloutBufferError:
    code, details = err.code(), err.details() or ""
    msg = f"{what}: {code.name}: {details}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidSampleError(msg, code.name, details)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthenticationError(msg, code.name, details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # no retry hint: not the buffer being full
        return MessageTooLargeError(msg, code.name, details)
    return RolloutBufferError(msg, code.name, details)


def _check_count(name: str, value: int) -> None:
    """A Lease/Stream count the server accepts (an int in 1..MAX_LEASE_SAMPLES), else
    ValueError naming it: no retry could make another value work."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 1 <= value <= MAX_LEASE_SAMPLES:
        raise ValueError(f"{name} = {value!r}, expected an integer from 1 to "
                         f"{MAX_LEASE_SAMPLES}")


def _wait_s(timeout_s: float) -> float:
    """The seconds a Lease may wait on the server for `timeout_s` (`validate.lease_wait_s`, as
    the server reads it); NaN is a ValueError."""
    timeout_s = float(timeout_s)
    if math.isnan(timeout_s):
        raise ValueError(f"timeout_s = {timeout_s}, expected seconds ≥ 0 (at most {MAX_WAIT_S:g} "
                         "are waited)")
    return lease_wait_s(timeout_s)


def _samples(reply: bytes) -> list[Sample]:
    """The samples of a serialized LeaseResponse (`repeated Sample samples = 1`). Arrays of
    large samples are read-only views of `reply` (an immutable bytes object, kept alive by
    them): no copy on the trainer's hot path; `np.array(a)` gives a writable copy. A malformed
    reply raises `RolloutBufferError`."""
    try:
        parts = wire.split_repeated(reply)
        return [decode.decode_sample(data, copy=False) for data in parts]
    except (ValueError, DecodeError) as e:
        if isinstance(e, SampleError):  # a top-K payload that does not reshape: as codec does
            raise
        raise RolloutBufferError(f"malformed reply from the buffer: {e}", "INTERNAL", str(e)) from e


class BufferClient:
    """Connects to `address` ("host:port"). `token` adds `authorization: Bearer <token>` to every
    call; `tls_ca` (path or PEM bytes) switches to TLS with that root certificate
    (`tls_server_name` overrides the name checked against the certificate). `consumer` is this
    client's consumer token (module docstring); None draws a random one. `ping_interval_s` and
    `ping_timeout_s`: how often an open call pings the server and how long an unanswered
    ping keeps the connection (`keepalive.client_options`, ValueError out of range)."""

    def __init__(self, address: str, token: str | None = None, tls_ca=None,
                 tls_server_name: str | None = None, retry_budget_s: float = 120.0,
                 backoff_initial_s: float = 0.05, backoff_max_s: float = 2.0,
                 rpc_timeout_s: float = 60.0, max_message_bytes: int = 256 << 20,
                 consumer: str | None = None,
                 ping_interval_s: float = keepalive.DEFAULT_PING_INTERVAL_S,
                 ping_timeout_s: float = keepalive.DEFAULT_PING_TIMEOUT_S):
        self.address = address
        self.retry_budget_s, self.rpc_timeout_s = retry_budget_s, rpc_timeout_s
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.consumer = new_token() if consumer is None else check_token(consumer)
        self._tls = tls_ca is not None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._as_consumer = self._metadata + ((CONSUMER_HEADER, self.consumer),)
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000),
                   *keepalive.client_options(ping_interval_s, ping_timeout_s)]
        # An open call this old answered a keep-alive round: its server was alive (a frozen
        # one fails a call within ping_interval_s + ping_timeout_s).
        self._proven_alive_s = 2 * ping_interval_s + ping_timeout_s
        if tls_ca is not None:
            if not isinstance(tls_ca, bytes):
                with open(tls_ca, "rb") as f:
                    tls_ca = f.read()
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.RolloutBufferStub(self._channel)
        # Push with a request assembled by `wire` (numpy → bytes, no per-element loop).
        self._push_raw = self._channel.unary_unary(
            "/clawjax.buffer.RolloutBuffer/Push", request_serializer=None,
            response_deserializer=pb.PushResponse.FromString)
        # Lease and Stream replies stay bytes: `decode` turns each sample into numpy directly.
        self._lease_raw = self._channel.unary_unary(
            "/clawjax.buffer.RolloutBuffer/Lease",
            request_serializer=pb.LeaseRequest.SerializeToString, response_deserializer=None)
        self._stream_raw = self._channel.unary_stream(
            "/clawjax.buffer.RolloutBuffer/Stream",
            request_serializer=pb.StreamRequest.SerializeToString, response_deserializer=None)

    # ------------------------------------------------------------------ plumbing
    def _backoff(self, attempt: int) -> float:
        base = min(self.backoff_max_s, self.backoff_initial_s * (2 ** attempt))
        return base * (0.5 + random.random() / 2)

    def _call(self, method, request, what: str, wait_s: float = 0.0,
              metadata: tuple | None = None):
        """`method(request)` with retries, each attempt under `attempt_timeout_s` (module
        docstring); `wait_s`: the seconds the server may wait on purpose (a Lease);
        `metadata` defaults to the authorization header alone."""
        give_up = time.monotonic() + self.retry_budget_s
        attempt = 0
        metadata = self._metadata if metadata is None else metadata
        while True:
            timeout = attempt_timeout_s(self.rpc_timeout_s, give_up - time.monotonic(), wait_s)
            try:
                return method(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as err:
                wait = self._retry_wait(err, attempt, what)
                if time.monotonic() + wait > give_up:
                    exc = BufferFullError if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED \
                        else BufferUnavailableError
                    raise exc(f"{what}: gave up after {self.retry_budget_s:g} s of retries: "
                              f"{err.code().name}: {err.details()}", err.code().name,
                              err.details() or "") from err
                time.sleep(wait)
                attempt += 1

    def _retry_wait(self, err: grpc.RpcError, attempt: int, what: str) -> float:
        """Seconds to wait before retrying `err`; raises the permanent error otherwise."""
        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE and self._tls:
            cause = give_up_on_tls(err.details() or "", attempt)
            if cause is not None:
                raise TLSHandshakeError(
                    f"{what}: TLS handshake with {self.address} failed after {attempt + 1} "
                    f"attempt(s); likely cause: {cause}. gRPC said: UNAVAILABLE: "
                    f"{err.details()}", code.name, err.details() or "") from err
        if code in _TRANSIENT:
            return self._backoff(attempt)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            hint = _retry_hint_s(err)
            if hint is not None:  # buffer full: the server says when to come back
                return max(hint, self._backoff(attempt))
        raise _permanent(err, what) from err

    # ------------------------------------------------------------------ API
    def push(self, samples: Iterable[Sample]) -> PushResult:
        """Pushes samples in one atomic RPC; returns once they are durable. Raises
        `InvalidSampleError` (nothing stored) naming the bad sample's id, field and value."""
        request = wire.encode_push_request(samples)
        reply = self._call(self._push_raw, request, "push")
        return PushResult(reply.accepted, reply.duplicates)

    def lease(self, max_samples: int, timeout_s: float = 0.0) -> list[Sample]:
        """Leases up to `max_samples` samples, waiting up to `timeout_s` for the first one.
        Array fields may be read-only views of the reply (copy before writing into them).
        A negative `timeout_s` waits not at all, one over `MAX_WAIT_S` that long (as the server
        reads them); NaN or a count outside 1..MAX_LEASE_SAMPLES is a ValueError."""
        _check_count("max_samples", max_samples)
        wait_s = _wait_s(timeout_s)
        reply = self._call(self._lease_raw, pb.LeaseRequest(max_samples=max_samples,
                                                            timeout_s=wait_s),
                           "lease", wait_s=wait_s, metadata=self._as_consumer)
        return _samples(reply)

    def stream(self, max_in_flight: int = 64, max_samples: int | None = None
               ) -> Iterator[Sample]:
        """Yields leased samples continuously. The server keeps at most `max_in_flight` of this
        stream's samples unacknowledged: ack (or nack) to receive more. Reconnects on transient
        failures; stops after `max_samples` if given (closing the generator also stops it).
        Samples of a received batch not handed out when it stops are nacked (deliverable at
        once, not held until their leases expire).
        A `max_in_flight` outside 1..MAX_LEASE_SAMPLES is a ValueError (at the first `next`).
        The retry budget counts from the first failure since the stream last proved alive (a
        batch received, a call the server ended in order, or a call open through a keep-alive
        round: 2 × `ping_interval_s` + `ping_timeout_s`), so a quiet stream's next failure is retried as long as a first one;
        a buffer that stops answering fails the call through keep-alive pings (module
        docstring) and so never proves alive."""
        _check_count("max_in_flight", max_in_flight)
        delivered, attempt = 0, 0
        give_up: float | None = None   # set by the first failure since it proved alive
        held: collections.deque[Sample] = collections.deque()   # received, not yet handed out
        while max_samples is None or delivered < max_samples:
            opened = time.monotonic()
            call = self._stream_raw(pb.StreamRequest(max_in_flight=max_in_flight),
                                    metadata=self._as_consumer)
            try:
                for batch in call:
                    attempt, give_up = 0, None
                    held.extend(_samples(batch))
                    while held:
                        delivered += 1
                        yield held.popleft()
                        if max_samples is not None and delivered >= max_samples:
                            return
                attempt, give_up = 0, None   # ended in order by the server (it is stopping)
            except grpc.RpcError as err:
                if time.monotonic() - opened > self._proven_alive_s:
                    attempt, give_up = 0, None   # it was alive: a new failure, a whole budget
                wait = self._retry_wait(err, attempt, "stream")
                give_up = time.monotonic() + self.retry_budget_s if give_up is None else give_up
                if time.monotonic() + wait > give_up:
                    raise BufferUnavailableError(
                        f"stream: gave up after {self.retry_budget_s:g} s of retries: "
                        f"{err.code().name}: {err.details()}", err.code().name,
                        err.details() or "") from err
                time.sleep(wait)
                attempt += 1
            finally:
                call.cancel()
                self._give_back([s.sample_id for s in held])
                held.clear()

    def _give_back(self, sample_ids: list[str]) -> None:
        """Nacks leased samples this client received but never handed to its caller (a stream
        that stopped part way through a batch), in one attempt (within the retry budget, as
        `_call`'s): should it fail, their leases expire as usual."""
        if not sample_ids:
            return
        timeout = attempt_timeout_s(self.rpc_timeout_s, self.retry_budget_s)
        try:
            self._stub.Nack(pb.SampleIds(sample_ids=sample_ids), timeout=timeout,
                            metadata=self._as_consumer)
        except (grpc.RpcError, ValueError):   # ValueError: this client's channel is closed
            pass

    def ack(self, sample_ids: Iterable[str]) -> int:
        """Finishes samples for good (durable on return); returns how many were held. Honoured
        even after this client's lease expired and another consumer leased the sample
        (`Store.ack` says why); that consumer's ack of it then returns 0."""
        return self._call(self._stub.Ack, pb.SampleIds(sample_ids=list(sample_ids)), "ack",
                          metadata=self._as_consumer).acked

    def nack(self, sample_ids: Iterable[str]) -> int:
        """Returns samples leased to this client to the front of the queue; returns how many
        were requeued (not one whose lease expired and went to another consumer)."""
        return self._call(self._stub.Nack, pb.SampleIds(sample_ids=list(sample_ids)),
                          "nack", metadata=self._as_consumer).requeued

    def extend_lease(self, sample_ids: Iterable[str], lease_timeout_s: float = 0.0
                     ) -> tuple[list[str], list[str]]:
        """Keep-alive: moves each lease's deadline to now + lease_timeout_s (0 = the server's
        default). Returns (extended, lost); lost ids were redelivered (to this or another
        consumer) or finished already."""
        reply = self._call(self._stub.ExtendLease, pb.ExtendLeaseRequest(
            sample_ids=list(sample_ids), lease_timeout_s=lease_timeout_s), "extend_lease",
            metadata=self._as_consumer)
        return list(reply.extended), list(reply.lost)

    def set_policy_version(self, version: int) -> int:
        """Announces the trainer's weights version; returns how many samples became too stale."""
        return self._call(self._stub.SetPolicyVersion, pb.PolicyVersion(version=version),
                          "set_policy_version").moved_stale

    def stats(self) -> dict[str, int]:
        """The server's `StatsResponse` as a dict (`BufferServer._stats` says what survives a
        restart: gauges do, the `*_total` counters start again from 0)."""
        reply = self._call(self._stub.Stats, pb.StatsRequest(), "stats")
        return {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "BufferClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LeaseKeeper:
    """Keeps leases alive from a thread until released: `keeper.add(ids)` after leasing,
    `keeper.remove(ids)` after ack/nack, `keeper.close()` at the end. Calls `extend_lease`
    every `interval_s` (pick ≤ lease_timeout_s / 3). An id the server reports no longer held
    for us (its lease expired, or the buffer restarted, and it was or will be redelivered)
    leaves the keeper and is counted in `lost_total`; only a count is kept, so the keeper's
    memory is the ids it holds now, however long it runs."""

    def __init__(self, client: BufferClient, interval_s: float, lease_timeout_s: float = 0.0):
        self._client, self._interval, self._length = client, interval_s, lease_timeout_s
        self._ids: set[str] = set()
        self.lost_total = 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def add(self, ids: Iterable[str]) -> None:
        with self._lock:
            self._ids.update(ids)

    def remove(self, ids: Iterable[str]) -> None:
        with self._lock:
            self._ids.difference_update(ids)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = list(self._ids)
            if not ids:
                continue
            try:
                _, lost = self._client.extend_lease(ids, self._length)
            except (RolloutBufferError, ValueError):   # ValueError: the client was closed
                continue
            with self._lock:   # ids removed meanwhile (acked, nacked) were not lost to us
                lost = self._ids.intersection(lost)
                self.lost_total += len(lost)
                self._ids.difference_update(lost)

    def close(self, timeout_s: float = 2.0) -> bool:
        """Stops the thread, waiting at most `timeout_s` for an `extend_lease` in flight;
        returns whether the thread ended. One that did not (a buffer that stopped answering)
        ends by itself once its call gives up (within the client's retry budget, see
        `attempt_timeout_s`) or at once when the client is closed (the call is cancelled);
        it starts no further round."""
        self._stop.set()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()
