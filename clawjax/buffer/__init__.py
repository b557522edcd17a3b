"""The gRPC rollout buffer: durable (write-ahead log, group-committed fsync), bounded (bytes),
authenticated (bearer token, TLS), exactly-once after acknowledgement.

    from clawjax.buffer import BufferServer, BufferClient
    server = BufferServer("/tmp/buf"); port = server.start()
    client = BufferClient(f"127.0.0.1:{port}")
    client.push(samples); got = client.lease(64, timeout_s=1.0); client.ack([s.sample_id ...])

CLI: `python -m clawjax.buffer serve --port P --dir DIR ...` (see `__main__.py`).
"""

from clawjax.buffer.client import BufferClient, LeaseKeeper, PushResult
from clawjax.buffer.errors import (AuthenticationError, BufferFullError, BufferUnavailableError,
                                   InsecureBindError, InvalidSampleError, MessageTooLargeError,
                                   RolloutBufferError, TLSHandshakeError)
from clawjax.buffer.server import BufferServer

__all__ = [
    "BufferServer", "BufferClient", "LeaseKeeper", "PushResult", "RolloutBufferError",
    "InvalidSampleError", "AuthenticationError", "BufferUnavailableError", "BufferFullError",
    "InsecureBindError", "MessageTooLargeError", "TLSHandshakeError",
]
