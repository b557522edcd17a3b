"""`BufferServer`: the gRPC `RolloutBuffer` service (plus standard health checking) over a
`Store` in a directory.

Status codes: bad samples → INVALID_ARGUMENT (the whole push is refused, message names sample id,
field, value, expectation); buffer full → RESOURCE_EXHAUSTED with trailing metadata
`retry-after-ms`; wrong or missing token → UNAUTHENTICATED. A failing request never stops the
server. Lease, Stream, Nack and ExtendLease read the caller's consumer token from the
`x-clawjax-consumer` metadata header (`clawjax.buffer.consumer`): a Nack or ExtendLease never
moves a lease another consumer holds (an Ack needs no lease: `Store.ack`). Lease and Stream
responses are assembled from the stored serialized samples without re-encoding them (a
`LeaseResponse` is `repeated Sample samples = 1` on the wire), and a pushed sample's bytes are
stored as received. Clients' HTTP/2 keep-alive pings are accepted (`clawjax.buffer.keepalive`):
a Stream waiting for samples is pinged, never answered with GOAWAY too_many_pings.
"""

from __future__ import annotations

import concurrent.futures
import hmac
import ipaddress
import logging
import os
import threading
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from google.protobuf.message import DecodeError

from clawjax.buffer import keepalive, wire
from clawjax.buffer import rollout_pb2 as pb
from clawjax.buffer.consumer import token_of
from clawjax.buffer.errors import InsecureBindError
from clawjax.buffer.stale import DEFAULT_MAX_STALE_BYTES, check_max_stale_bytes
from clawjax.buffer.store import BatchTooLarge, BufferFull, Store
from clawjax.buffer.validate import (MAX_LEASE_SAMPLES, MAX_WAIT_S,  # noqa: F401 (API)
                                     Limits, check_wire, lease_wait_s)
from clawjax.sample import MAX_TOKENS, SampleError

log = logging.getLogger(__name__)

SERVICE = "clawjax.buffer.RolloutBuffer"
WAIT_SLICE_S = 0.25   # a waiting Lease or Stream checks its caller is still there this often


def lease_framing_bytes(sample_bytes: int) -> int:
    """A sample's tag and length varint in a Lease/Stream answer: as in the PushRequest that
    carried it (both are `repeated Sample = 1`)."""
    return 1 + len(wire.varint(sample_bytes))


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def wait_slots(max_workers: int) -> int:
    """How many of `max_workers` handler threads may wait at once (Streams, Lease waits): all
    but a quarter (at least one), which stays for the calls that never wait."""
    return max_workers - max(1, max_workers // 4)


def _read(value) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


class _TokenAuth(grpc.ServerInterceptor):
    """Every RPC needs `authorization: Bearer <token>`; compared in constant time."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        got = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value
        if hmac.compare_digest(str(got).encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong bearer token in 'authorization' metadata")

        def deny_stream(request, context):
            deny(request, context)
            yield from ()

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                deny_stream, handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                deny, handler.request_deserializer, handler.response_serializer)
        return handler  # no streaming-request methods in this service


class BufferServer:
    """The rollout buffer. `start()` binds and returns the port; `stop()` drains and closes.

    Without `token` the server only binds loopback (`InsecureBindError` otherwise). With
    `tls_cert`/`tls_key` (paths or PEM bytes) it serves TLS. `max_message_bytes` bounds every
    gRPC message; `max_sample_bytes`/`max_sample_tokens` bound each sample. Lease keep-alive:
    `ExtendLease` moves deadlines (the trainer calls it while a checkpoint is pending).
    `max_stale_bytes` bounds stale.log and its rotation stale.log.1 together (`stale.py`).

    Of the `max_workers` (≥ 2) handler threads, at most `wait_slots(max_workers)` wait at once
    (an open Stream, a Lease waiting for its first sample), so pushes, acks and stats always
    find a thread: a Lease past that limit answers without waiting, a Stream past it is refused
    with RESOURCE_EXHAUSTED and a `retry-after-ms` hint (the client retries).
    """

    def __init__(self, dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, tls_cert=None, tls_key=None,
                 max_bytes: int = 1 << 30, lease_timeout_s: float = 60.0,
                 max_staleness: int | None = None, max_message_bytes: int = 64 << 20,
                 max_sample_bytes: int = 16 << 20, max_sample_tokens: int = MAX_TOKENS,
                 segment_bytes: int = 64 << 20, fsync: bool = True, max_workers: int = 64,
                 compact_interval_s: float = 1.0, retry_after_s: float = 0.2,
                 max_stale_bytes: int = DEFAULT_MAX_STALE_BYTES):
        if not token and not is_loopback(host):
            raise InsecureBindError(
                f"host = {host!r}: a server without a token binds only loopback addresses "
                "(127.0.0.1, ::1, localhost); pass a token (--token-file) to bind elsewhere")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key: expected both or neither")
        if token is not None and not token:
            raise ValueError("token = '': expected a non-empty token or None")
        self.dir, self.host, self.port = os.fspath(dir), host, int(port)
        self.token = token
        self._tls = (_read(tls_key), _read(tls_cert)) if tls_cert is not None else None
        self.max_message_bytes = int(max_message_bytes)
        self.limits = Limits(max_sample_bytes=min(max_sample_bytes, max_message_bytes),
                             max_tokens=max_sample_tokens)
        self._store_kwargs = dict(max_bytes=max_bytes, lease_timeout_s=lease_timeout_s,
                                  max_staleness=max_staleness, segment_bytes=segment_bytes,
                                  fsync=fsync, compact_interval_s=compact_interval_s,
                                  retry_after_s=retry_after_s,
                                  max_stale_bytes=check_max_stale_bytes(max_stale_bytes))
        if not isinstance(max_workers, int) or max_workers < 2:
            raise ValueError(f"max_workers = {max_workers!r}, expected an integer ≥ 2 (one "
                             "thread at least for calls that never wait)")
        self.max_workers = max_workers
        self._wait_slots = threading.BoundedSemaphore(wait_slots(max_workers))
        self._retry_after_s = retry_after_s
        self.store: Store | None = None
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()
        self._rejected = 0
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> int:
        """Recovers the store from `dir`, binds, serves; returns the bound port. Refuses
        (ValueError) a `max_message_bytes` too small to lease a sample the store holds: one
        accepted under a larger limit would otherwise sit at the queue's head, failing every
        Lease and Stream that reaches it."""
        self.store = Store(self.dir, **self._store_kwargs)
        self._stopping.clear()   # started again after a stop(): its streams serve again
        try:
            self._check_held_samples_fit()
            return self._serve()
        except BaseException:
            # Nothing is served: release the store (its WAL lock, its compactor) and the server.
            if self._server is not None:
                self._server.stop(None)
                self._server = None
            self.store.close()
            self.store = None
            raise

    def _check_held_samples_fit(self) -> None:
        largest = self.store.largest_sample_bytes()
        need = largest + lease_framing_bytes(largest)
        if largest and need > self.max_message_bytes:
            raise ValueError(
                f"max_message_bytes (--max-message-bytes) = {self.max_message_bytes}: the "
                f"buffer in {self.dir} holds a sample of {largest} bytes, accepted under a "
                f"larger limit, that no Lease answer could carry; expected at least {need} "
                "(restart with the limit it was written under, and lower it once the buffer "
                "has drained)")

    def _serve(self) -> int:
        """Binds and starts the gRPC server over the opened store; returns the bound port."""
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes),
                   *keepalive.server_options()]   # clients' keep-alive pings are welcome
        interceptors = [_TokenAuth(self.token)] if self.token else []
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="buffer"),
            options=options, interceptors=interceptors)
        self._server.add_generic_rpc_handlers((self._handlers(),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        target = f"{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"
        if self._tls is not None:
            creds = grpc.ssl_server_credentials([self._tls])
            port = self._server.add_secure_port(target, creds)
        else:
            port = self._server.add_insecure_port(target)
        if not port:   # older grpc returns 0, newer raises RuntimeError
            raise OSError(f"could not bind {target}")
        self.port = port
        if self.token and self._tls is None and not is_loopback(self.host):
            log.warning("serving on %s with a token but without TLS: the token travels in clear",
                        target)
        self._server.start()
        for name in ("", SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("rollout buffer serving on %s (dir %s)", self.address, self.dir)
        return port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stops accepting RPCs, waits up to `grace` s for running ones, closes the log."""
        self._stopping.set()
        if self._server is not None:
            self._health.enter_graceful_shutdown()
            self._server.stop(grace).wait()
            self._server = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()

    def __enter__(self) -> "BufferServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ handlers
    def _handlers(self) -> grpc.GenericRpcHandler:
        raw = lambda b: b  # noqa: E731 (responses already serialized)
        h = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Push": h(self._push, raw, pb.PushResponse.SerializeToString),
            "Lease": h(self._lease, pb.LeaseRequest.FromString, raw),
            "Stream": grpc.unary_stream_rpc_method_handler(
                self._stream, pb.StreamRequest.FromString, raw),
            "Ack": h(self._ack, pb.SampleIds.FromString, pb.AckResponse.SerializeToString),
            "Nack": h(self._nack, pb.SampleIds.FromString, pb.NackResponse.SerializeToString),
            "ExtendLease": h(self._extend, pb.ExtendLeaseRequest.FromString,
                             pb.ExtendLeaseResponse.SerializeToString),
            "SetPolicyVersion": h(self._set_policy, pb.PolicyVersion.FromString,
                                  pb.SetPolicyVersionResponse.SerializeToString),
            "Stats": h(self._stats, pb.StatsRequest.FromString, pb.StatsResponse.SerializeToString),
        })

    def _refuse(self, context, count: int, message: str) -> None:
        with self._lock:
            self._rejected += count
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"push refused, nothing stored: {message}")

    def _push(self, request: bytes, context) -> pb.PushResponse:
        """`request` is a serialized PushRequest: each sample is validated from its own bytes
        and those bytes are what the log and later leases carry (never re-encoded)."""
        try:
            raw = wire.split_repeated(request, field=1)
        except ValueError as e:
            self._refuse(context, 0, f"malformed PushRequest: {e}")
        items = []
        for i, data in enumerate(raw):
            try:
                sid, version = check_wire(data, self.limits)
            except DecodeError as e:
                self._refuse(context, len(raw), f"samples[{i}]: not a valid Sample message: {e}")
            except SampleError as e:
                self._refuse(context, len(raw), f"samples[{i}]: {e}")
            items.append((sid, version, data))
        try:
            accepted, dup = self.store.push(items)
        except BufferFull as e:
            context.set_trailing_metadata(
                (("retry-after-ms", str(max(1, int(e.retry_after_s * 1000)))),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except BatchTooLarge as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.PushResponse(accepted=accepted, duplicates=dup)

    def _check_count(self, context, name: str, value: int, low: int, high: int) -> None:
        if not low <= value <= high:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"field {name!r} = {value}, expected between {low} and {high}")

    def _lease(self, request: pb.LeaseRequest, context) -> bytes:
        """Samples leased to the caller. A wait is taken in slices of `WAIT_SLICE_S`: a caller
        that left (cancelled, died) frees its wait slot within one, and what it was leased
        after it left is nacked at once, as for a Stream."""
        self._check_count(context, "max_samples", request.max_samples, 1, MAX_LEASE_SAMPLES)
        timeout = lease_wait_s(request.timeout_s)
        holder = token_of(context.invocation_metadata())
        if timeout > 0 and self._wait_slots.acquire(blocking=False):
            try:
                got = self._lease_waiting(request.max_samples, timeout, holder, context)
            finally:
                self._wait_slots.release()
        else:   # no wait asked, or every waiting thread taken: answer with what is queued
            got = self.store.lease(request.max_samples, 0.0, holder=holder,
                                   max_out_bytes=self.max_message_bytes // 2)
        if got and not context.is_active():   # the caller left: nobody reads the answer
            self.store.nack([sid for sid, _ in got], holder=holder)
            return b""
        return wire.join_repeated([data for _, data in got])

    def _lease_waiting(self, max_samples: int, timeout: float, holder: str | None, context):
        """`Store.lease` waiting up to `timeout` s for the first sample, in slices, while the
        caller is there and the server is not stopping."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            got = self.store.lease(max_samples, min(max(left, 0.0), WAIT_SLICE_S),
                                   holder=holder, max_out_bytes=self.max_message_bytes // 2)
            if (got or left <= WAIT_SLICE_S or not context.is_active()
                    or self._stopping.is_set()):
                return got

    def _stream(self, request: pb.StreamRequest, context):
        """Batches of leased samples, at most `max_in_flight` unacked at a time. Samples already
        sent stay leased when the client disconnects (it may still ack them); samples leased
        after it left are nacked at once."""
        self._check_count(context, "max_in_flight", request.max_in_flight, 1, MAX_LEASE_SAMPLES)
        if not self._wait_slots.acquire(blocking=False):
            context.set_trailing_metadata(
                (("retry-after-ms", str(max(1, int(self._retry_after_s * 1000)))),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"every stream slot is taken ({wait_slots(self.max_workers)} of "
                          f"max_workers = {self.max_workers} threads wait at most); retry later")
        try:
            yield from self._stream_batches(request.max_in_flight, context)
        finally:
            self._wait_slots.release()

    def _stream_batches(self, limit: int, context):
        """`_stream`'s loop, on a wait slot."""
        owner, holder = uuid.uuid4().hex, token_of(context.invocation_metadata())
        while context.is_active() and not self._stopping.is_set():
            if not self.store.wait_for_slot(owner, limit, WAIT_SLICE_S):
                continue
            free = limit - self.store.in_flight(owner)
            got = self.store.lease(free, WAIT_SLICE_S, owner=owner, holder=holder,
                                   max_out_bytes=self.max_message_bytes // 2)
            if got and not context.is_active():   # the client left while we waited
                self.store.nack([sid for sid, _ in got], holder=holder)
                return
            if got:
                yield wire.join_repeated([data for _, data in got])

    def _ack(self, request: pb.SampleIds, context) -> pb.AckResponse:
        acked, unknown = self.store.ack(list(request.sample_ids))
        return pb.AckResponse(acked=acked, unknown=unknown)

    def _nack(self, request: pb.SampleIds, context) -> pb.NackResponse:
        requeued, unknown = self.store.nack(list(request.sample_ids),
                                            holder=token_of(context.invocation_metadata()))
        return pb.NackResponse(requeued=requeued, unknown=unknown)

    def _extend(self, request: pb.ExtendLeaseRequest, context) -> pb.ExtendLeaseResponse:
        if not 0 <= request.lease_timeout_s <= 24 * 3600:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"field 'lease_timeout_s' = {request.lease_timeout_s}, expected "
                          "0 (server default) to 86400 seconds")
        extended, lost = self.store.extend(list(request.sample_ids), request.lease_timeout_s,
                                           holder=token_of(context.invocation_metadata()))
        return pb.ExtendLeaseResponse(extended=extended, lost=lost)

    def _set_policy(self, request: pb.PolicyVersion, context) -> pb.SetPolicyVersionResponse:
        moved = self.store.set_policy_version(request.version)
        return pb.SetPolicyVersionResponse(version=request.version, moved_stale=moved)

    def _stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        """Gauges (`queued`, `leased`, `bytes`, `policy_version`, `wal_*`) describe the buffer
        now and hold across a restart (rebuilt from disk). Every `*_total` counter counts
        events of this server process only and starts again from 0 after a restart, as
        Prometheus counters do (`rate()`/`increase()` treat the drop as a reset); the state
        they counted is on disk: stale samples in stale.log (`stale.read_stale`), finished ids in
        the WAL and done.log."""
        stats = self.store.stats()
        with self._lock:
            stats["rejected_total"] = self._rejected
        return pb.StatsResponse(**stats)
