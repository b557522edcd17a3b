"""`python -m clawjax.buffer serve --port P --dir DIR [--host H] [--token-file F]
[--tls-cert C --tls-key K] [--max-bytes B] [--lease-timeout-s S] [--max-staleness N]
[--max-stale-bytes B]`

Samples moved aside as too stale are copied to DIR/stale.log for inspection; past half of
`--max-stale-bytes` (default 256 MiB) it is rotated to DIR/stale.log.1, dropping the older
rotation, so the two files keep the newest copies in about that many bytes.

Prints `clawjax buffer listening on HOST:PORT` (flushed) once it serves; `--port 0` picks a free
port. SIGTERM / SIGINT stop it cleanly. `gen-proto` regenerates the committed protobuf modules.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from clawjax.buffer.stale import DEFAULT_MAX_STALE_BYTES
from clawjax.cli_signals import LOG_LEVELS, record_stop_signals


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clawjax.buffer")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the rollout buffer")
    s.add_argument("--port", type=int, required=True, help="TCP port (0 = pick a free one)")
    s.add_argument("--dir", required=True, help="directory of the write-ahead log")
    s.add_argument("--host", default="127.0.0.1",
                   help="bind address; non-loopback needs --token-file")
    s.add_argument("--token-file", help="file holding the bearer token every RPC must carry")
    s.add_argument("--tls-cert", help="PEM certificate (chain) for TLS")
    s.add_argument("--tls-key", help="PEM private key for TLS")
    s.add_argument("--max-bytes", type=int, default=1 << 30, help="capacity in sample bytes")
    s.add_argument("--lease-timeout-s", type=float, default=60.0)
    s.add_argument("--max-staleness", type=int, default=None,
                   help="withhold samples more than N policy versions behind the trainer")
    s.add_argument("--max-stale-bytes", type=int, default=DEFAULT_MAX_STALE_BYTES,
                   help="bytes of stale samples kept for inspection in stale.log and "
                        "stale.log.1 together: past half of it stale.log is rotated to "
                        "stale.log.1, dropping the older rotation (default: %(default)s)")
    s.add_argument("--max-message-bytes", type=int, default=64 << 20)
    s.add_argument("--max-sample-bytes", type=int, default=16 << 20)
    s.add_argument("--max-sample-tokens", type=int, default=None,
                   help="tokens per sample (default: clawjax.sample.MAX_TOKENS)")
    s.add_argument("--segment-bytes", type=int, default=64 << 20, help="WAL segment size")
    s.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    sub.add_parser("gen-proto", help="regenerate rollout_pb2*.py from rollout.proto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "gen-proto":
        from clawjax.buffer import protogen
        for path in protogen.write():
            print(f"wrote {path}")
        return 0
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (args.tls_cert is None) != (args.tls_key is None):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    token = None
    if args.token_file:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as e:
            print(f"error: --token-file {args.token_file}: {e.strerror}", file=sys.stderr)
            return 2
        if not token:
            print(f"error: --token-file {args.token_file} is empty", file=sys.stderr)
            return 2
    from clawjax.buffer.errors import InsecureBindError
    from clawjax.buffer.server import BufferServer
    try:
        server = BufferServer(args.dir, host=args.host, port=args.port, token=token,
                              tls_cert=args.tls_cert, tls_key=args.tls_key,
                              max_bytes=args.max_bytes, lease_timeout_s=args.lease_timeout_s,
                              max_staleness=args.max_staleness,
                              max_message_bytes=args.max_message_bytes,
                              max_sample_bytes=args.max_sample_bytes,
                              **({"max_sample_tokens": args.max_sample_tokens}
                                 if args.max_sample_tokens else {}),
                              segment_bytes=args.segment_bytes,
                              max_stale_bytes=args.max_stale_bytes)
        server.start()
    except (InsecureBindError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop_signals = record_stop_signals()
    print(f"clawjax buffer listening on {server.address}", flush=True)
    while not stop_signals:
        time.sleep(0.2)
    logging.getLogger("clawjax.buffer").info("signal received: stopping")
    server.stop(grace=2.0)
    logging.getLogger("clawjax.buffer").info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
