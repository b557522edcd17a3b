"""`python -m clawjax.rollout serve --port P --model-dir DIR --policy-url URL[,URL...]
--judge-url URL [--judge-model NAME] [--teacher-url URL[,URL...]] --buffer ADDR
[--buffer-token-file F] [--method combine|rl|opd] [--prm-m M] [--api-key K] ...`

Runs the OpenAI-compatible rollout proxy (see `clawjax.rollout.proxy`). Prints
`READY http://H:P` once it serves; SIGINT/SIGTERM stop it after the judge loop drains.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from clawjax.cli_signals import LOG_LEVELS, serve_until_signal
from clawjax.methods import prm_m_for
from clawjax.sample import MAX_TOPK


def _urls(value: str) -> list[str]:
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls or not all(u.startswith(("http://", "https://")) for u in urls):
        raise argparse.ArgumentTypeError(f"{value!r}: expected http(s)://host:port[,...]")
    return urls


def _read(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path) as f:
        return f.read().strip() or None


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m clawjax.rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the rollout proxy")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--model-dir", required=True,
                   help="the policy's HF directory (tokenizer + chat template)")
    s.add_argument("--policy-url", type=_urls, required=True, help="policy fleet URL(s)")
    s.add_argument("--judge-url", required=True, help="OpenAI-compatible judge base URL")
    s.add_argument("--judge-model", default=None, help="'model' sent to the judge")
    s.add_argument("--judge-api-key-file", default=None)
    s.add_argument("--teacher-url", type=_urls, default=[],
                   help="teacher server URL(s); default: the policy fleet (self-distillation)")
    s.add_argument("--buffer", required=True, help="gRPC buffer address host:port")
    s.add_argument("--buffer-token-file", default=None)
    s.add_argument("--method", choices=("combine", "rl", "opd"), default="combine")
    s.add_argument("--prm-m", type=int, default=None,
                   help="votes per judge (PRM and hint); default 3 for --method rl, else 1")
    s.add_argument("--teacher-topk", type=int, default=0,
                   help="K: OPD samples also carry the teacher's top-K log-probs and token ids "
                        "per response token (SPEC §5, for loss.topk_coef); 0 = none")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument("--policy-api-key-file", default=None)
    s.add_argument("--judge-temperature", type=float, default=0.7)
    s.add_argument("--judge-max-tokens", type=int, default=None)
    s.add_argument("--judge-concurrency", type=int, default=16,
                   help="turns judged at the same time")
    s.add_argument("--session-expiry-s", type=float, default=600.0,
                   help="idle sessions are closed (as on session_done) after this long")
    s.add_argument("--model-name", default=None, help="model id shown at /v1/models")
    s.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port = {args.port}, expected 1..65535")
    args.prm_m = prm_m_for(args.method, args.prm_m)
    if args.prm_m < 1:
        p.error(f"--prm-m = {args.prm_m}, expected >= 1")
    if not 0 <= args.teacher_topk <= MAX_TOPK:
        p.error(f"--teacher-topk = {args.teacher_topk}, expected 0 (none) to {MAX_TOPK}")
    if not 0.0 <= args.judge_temperature < float("inf"):  # NaN fails this too
        p.error(f"--judge-temperature = {args.judge_temperature}, expected a finite number "
                ">= 0")
    if args.judge_max_tokens is not None and args.judge_max_tokens < 0:
        p.error(f"--judge-max-tokens = {args.judge_max_tokens}, expected >= 1, or 0 (or no "
                "flag) for the judge's own limit")
    if args.judge_concurrency < 1:
        p.error(f"--judge-concurrency = {args.judge_concurrency}, expected >= 1")
    if not args.session_expiry_s > 0:
        p.error(f"--session-expiry-s = {args.session_expiry_s}, expected > 0")
    return args


async def _serve(config, host: str, port: int) -> None:
    from clawjax.rollout.proxy import start

    async def start_proxy():
        return (await start(config, host, port)).aclose

    await serve_until_signal(start_proxy, host, port)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from clawjax.rollout.proxy import ProxyConfig
    config = ProxyConfig(
        model_dir=args.model_dir, policy_urls=args.policy_url, judge_url=args.judge_url,
        buffer=args.buffer, judge_model=args.judge_model, teacher_urls=args.teacher_url,
        buffer_token=_read(args.buffer_token_file), method=args.method, prm_m=args.prm_m,
        teacher_topk=args.teacher_topk, api_key=args.api_key,
        policy_api_key=_read(args.policy_api_key_file),
        judge_api_key=_read(args.judge_api_key_file),
        judge_temperature=args.judge_temperature, judge_max_tokens=args.judge_max_tokens,
        judge_concurrency=args.judge_concurrency, session_expiry_s=args.session_expiry_s,
        model_name=args.model_name)
    asyncio.run(_serve(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
