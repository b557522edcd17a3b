"""HTTP/2 keep-alive between `BufferClient` and `BufferServer`: how a client notices a buffer
that stopped answering (host frozen, network partitioned, its TCP connection still open)
during a call without a deadline (a `Stream` waiting for samples), and what the server permits
so that those pings are never answered with GOAWAY `too_many_pings`.

Invariants:
- While a call is open the client pings every `ping_interval_s` (at least
  `MIN_PING_INTERVAL_S`), with no limit on pings between data frames (a Stream waiting for
  samples receives none for long); a ping not acknowledged within `ping_timeout_s` closes the
  connection, and its calls fail with UNAVAILABLE, which the client retries within its retry
  budget.
- The server accepts pings as often as every `SERVER_MIN_PING_INTERVAL_S` (below
  `MIN_PING_INTERVAL_S`), with or without calls open, so no setting the client accepts earns
  ping strikes.
"""

from __future__ import annotations

import math

DEFAULT_PING_INTERVAL_S = 20.0     # a frozen buffer is noticed within this plus the timeout
DEFAULT_PING_TIMEOUT_S = 10.0
MIN_PING_INTERVAL_S = 1.0          # the most often a client may ping
SERVER_MIN_PING_INTERVAL_S = 0.5   # the most often the server accepts pings (< the above)


def _ms(name: str, seconds: float, low: float) -> int:
    """`seconds` as whole milliseconds; ValueError naming `name` unless finite and ≥ `low`."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
            or not math.isfinite(seconds) or seconds < low:
        raise ValueError(f"{name} = {seconds!r}, expected finite seconds ≥ {low:g}")
    return int(seconds * 1000)


def client_options(ping_interval_s: float = DEFAULT_PING_INTERVAL_S,
                   ping_timeout_s: float = DEFAULT_PING_TIMEOUT_S
                   ) -> list[tuple[str, int]]:
    """gRPC channel options of a client: ping every `ping_interval_s` (≥ `MIN_PING_INTERVAL_S`)
    while a call is open, give the connection up when a ping is not acknowledged within
    `ping_timeout_s` (≥ 0.1 s). Out-of-range values are a ValueError naming them."""
    timeout_ms = _ms("ping_timeout_s", ping_timeout_s, 0.1)
    return [("grpc.keepalive_time_ms",
             _ms("ping_interval_s", ping_interval_s, MIN_PING_INTERVAL_S)),
            ("grpc.keepalive_timeout_ms", timeout_ms),
            # gRPC core times every ping out after this one (60 s by default), whatever the
            # keep-alive timeout says: a keep-alive ping is one too
            ("grpc.http2.ping_timeout_ms", timeout_ms),
            ("grpc.http2.max_pings_without_data", 0)]   # 0: no limit (a quiet Stream)


def server_options() -> list[tuple[str, int]]:
    """gRPC server options accepting every client's keep-alive pings (module docstring)."""
    return [("grpc.http2.min_ping_interval_without_data_ms",
             int(SERVER_MIN_PING_INTERVAL_S * 1000)),
            ("grpc.keepalive_permit_without_calls", 1)]
