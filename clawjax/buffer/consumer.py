"""Who holds a lease: the consumer token a `BufferClient` sends with every lease-related call.

The requests of `rollout.proto` carry sample ids only, so a late Nack or ExtendLease from a
consumer whose lease expired could not be told from the current holder's. Without changing the
proto, the client names itself in gRPC invocation metadata: `HEADER: <token>` (a random uuid4
hex per client unless given) on Lease, Stream, Ack, Nack and ExtendLease. The server records
the token of the lease holder per leased sample (None when the leasing request had no header:
clients in other languages keep the old behaviour) and lets a Nack or ExtendLease move a lease
only when `may_touch(holder, caller)`.
"""

from __future__ import annotations

import uuid

HEADER = "x-clawjax-consumer"
MAX_TOKEN_CHARS = 128


def new_token() -> str:
    """A fresh random consumer token (32 hex characters)."""
    return uuid.uuid4().hex


def check_token(token: str) -> str:
    """`token` if it can travel as a metadata value (1..MAX_TOKEN_CHARS printable ASCII
    characters), else ValueError naming it."""
    if not (isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_CHARS and token.isascii()
            and token.isprintable()):
        raise ValueError(f"consumer = {token!r}, expected 1 to {MAX_TOKEN_CHARS} printable "
                         "ASCII characters (or None for a random token)")
    return token


def token_of(metadata) -> str | None:
    """The consumer token in invocation `metadata` ((key, value) pairs), or None without one
    (an empty value counts as none)."""
    for key, value in metadata or ():
        if key == HEADER:
            return value or None
    return None


def may_touch(holder: str | None, caller: str | None) -> bool:
    """Whether a request from `caller` may nack or extend a lease held by `holder`: a lease
    taken without a token is anyone's (the behaviour before tokens), one taken with a token
    only its holder's (a request without a token cannot be the holder's)."""
    return holder is None or holder == caller
