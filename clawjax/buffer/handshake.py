"""Telling a TLS misconfiguration from a server that is down.

gRPC reports both as UNAVAILABLE, but a failed TLS handshake leaves its trace in the status
details (observed with grpcio 1.85, BoringSSL):
  client given `tls_ca`, server plaintext   "Tls handshake failed ... WRONG_VERSION_NUMBER"
  certificate not signed by `tls_ca`        "... CERTIFICATE_VERIFY_FAILED ..."
  certificate does not name the host        "... Hostname Verification Check failed"
A server that is down or restarting reads "Connection refused" / "Socket closed" and stays a
transient failure (a plaintext client facing a TLS server also reads "Socket closed": that one
cannot be told apart and is retried).
"""

from __future__ import annotations

# (marker in the lower-cased details, likely cause); the first match names the cause.
_CAUSES = (
    ("wrong_version_number", "the server does not speak TLS (started without --tls-cert?) "
                             "while this client was given tls_ca"),
    ("certificate_verify_failed", "the server's certificate is not signed by the CA given as "
                                  "tls_ca (wrong CA file, or a self-signed certificate that is "
                                  "not the one the server uses)"),
    ("hostname verification", "the server's certificate does not name the host in the "
                              "address (connect by a name the certificate lists, or pass "
                              "tls_server_name)"),
    ("peer name", "the server's certificate does not name the host in the address (connect "
                  "by a name the certificate lists, or pass tls_server_name)"),
)
_VAGUE = ("handshake failed", "ssl_error", "certificate")

# A handshake failure of no known cause may be a server cut off mid-handshake (a restart):
# it is retried, and called a misconfiguration once this many attempts in a row failed.
VAGUE_ATTEMPTS = 3


def tls_failure(details: str) -> tuple[str, bool] | None:
    """(likely cause, definite) when gRPC status `details` show a failed TLS handshake, else
    None. `definite` is True for a recognised misconfiguration (never transient)."""
    text = (details or "").lower()
    for marker, cause in _CAUSES:
        if marker in text:
            return cause, True
    if any(marker in text for marker in _VAGUE):
        return ("check tls_ca, tls_server_name and that the server serves TLS "
                "(--tls-cert/--tls-key)"), False
    return None


def give_up_on_tls(details: str, attempt: int) -> str | None:
    """The likely cause, when a failure with `details` at 0-based `attempt` (failures in a row
    so far in this call) should end the call as a TLS misconfiguration; else None (retry)."""
    found = tls_failure(details)
    if found is None:
        return None
    cause, definite = found
    return cause if definite or attempt + 1 >= VAGUE_ATTEMPTS else None
