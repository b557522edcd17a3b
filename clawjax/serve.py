"""`python -m clawjax.serve --model DIR --port P [--host H] [--max-batch N] [--api-key K]`

The embedded JAX server: speaks SGLang's native HTTP API (`/generate`,
`/update_weights_from_disk`, `/get_model_info`, ...) and OpenAI chat completions for a
`clawjax.model` checkpoint directory, so the rollout code, the publisher and the client work the
same against it as against an SGLang fleet. Prints `READY http://H:P` once it accepts requests.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from clawjax.cli_signals import LOG_LEVELS, serve_app_until_signal


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clawjax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--model-path", dest="model", required=True,
                   help="HF model directory (config.json + safetensors [+ tokenizer files])")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max-batch", type=int, default=8,
                   help="KV-cache slots = concurrent sequences decoded together")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens per sequence (prompt + output); default min(max positions, 1024)")
    p.add_argument("--weight-version", default="default",
                   help="weight_version reported until the first /update_weights_from_disk")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for unseeded requests")
    p.add_argument("--log-level", default="warning", type=str.lower, choices=LOG_LEVELS)
    args = p.parse_args(argv)
    if args.context_length is not None and args.context_length < 2:
        p.error(f"--context-length = {args.context_length}, expected >= 2 (a prompt token and "
                "one generated token)")
    if args.seed < 0:
        p.error(f"--seed = {args.seed}, expected >= 0")
    if args.max_batch < 1:
        p.error(f"--max-batch = {args.max_batch}, expected >= 1")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model = {args.model!r}, expected a model directory with config.json")
    if not 0 < args.port < 65536:
        p.error(f"--port = {args.port}, expected 1..65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from clawjax.serving.launch import make_context
    from clawjax.serving.server import build_app

    ctx = make_context(args.model, max_batch=args.max_batch, context_len=args.context_length,
                       api_key=args.api_key, weight_version=args.weight_version,
                       seed=args.seed)
    asyncio.run(serve_app_until_signal(build_app(ctx), args.host, args.port, access_log=None,
                                       handler_cancellation=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
