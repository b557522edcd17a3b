"""Exceptions the buffer client raises. Permanent failures are never retried; transient ones
(UNAVAILABLE, RESOURCE_EXHAUSTED with the server's retry hint) are retried with backoff and
raise `BufferUnavailableError` only when the retry budget is spent. An UNAVAILABLE that is a
failed TLS handshake is permanent: `TLSHandshakeError`."""

from __future__ import annotations


class RolloutBufferError(RuntimeError):
    """Base class. `code` is the gRPC status code name (e.g. 'INVALID_ARGUMENT'), `details` the
    server's message."""

    def __init__(self, message: str, code: str = "", details: str = ""):
        super().__init__(message)
        self.code, self.details = code, details


class InvalidSampleError(RolloutBufferError, ValueError):
    """INVALID_ARGUMENT: the server refused the request (the whole push); the message names the
    sample id, the field, the value and what was expected."""


class AuthenticationError(RolloutBufferError, PermissionError):
    """UNAUTHENTICATED / PERMISSION_DENIED: wrong or missing token."""


class BufferUnavailableError(RolloutBufferError, ConnectionError):
    """UNAVAILABLE (or deadline exceeded) for longer than the client's retry budget."""


class TLSHandshakeError(RolloutBufferError, ConnectionError):
    """The TLS handshake with the server failed in a way no retry fixes (client given a CA for
    a plaintext server, a certificate the CA did not sign, a host name the certificate does not
    list): raised at once (or after a few attempts when the cause is unclear) instead of
    retrying for the whole budget. The message names the target and the likely cause."""


class BufferFullError(RolloutBufferError):
    """RESOURCE_EXHAUSTED with the server's retry hint (buffer full) for longer than the
    client's retry budget."""


class MessageTooLargeError(RolloutBufferError, ValueError):
    """RESOURCE_EXHAUSTED without a retry hint: a message over the gRPC size limit (split the
    push). Permanent."""


class InsecureBindError(ValueError):
    """A server without a token was asked to bind a non-loopback address."""
