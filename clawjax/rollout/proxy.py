"""The rollout proxy: an OpenAI-compatible chat server that agents call instead of the model.
(Request parsing: `clawjax.rollout.chatapi`; calls to the policy fleet:
`clawjax.rollout.policy_calls`; response bodies: `clawjax.rollout.chat_bodies`; the judge loop
and the buffer pusher: `clawjax.rollout.judge_loop` and `clawjax.rollout.pusher`, run on a
thread of their own by `clawjax.rollout.judge_thread`; session rules:
`clawjax.rollout.sessions`.)

Endpoints: POST `/v1/chat/completions` (optionally streamed as SSE chat chunks), GET
`/v1/models`, GET `/health`, GET `/stats` (the counters of `clawjax.rollout.emit.Stats`;
`?idle_timeout=S` first waits up to S seconds for the judge loop and the buffer queue to go
idle). With an API key every endpoint but `/health` wants `Authorization: Bearer <key>`.
Non-streamed completions carry `Server-Timing: upstream;dur=MS, proxy;dur=MS`: the time spent
waiting on the policy fleet and the proxy's own time around it (parsing, chat template,
bookkeeping, response body), for latency accounting.

A chat request is served by applying the model directory's chat template here
(`apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`) and sending the
token ids to the policy fleet's `/generate` with `return_logprob` (`logprob_start_len = -1`).
The turn keeps prompt ids, response ids (`output_ids`), rollout log-probs
(`meta_info.output_token_logprobs`) and `meta_info.weight_version`.

Session fields (SPEC.md §8) come from the body (`session_id`, `turn_type`, `session_done`) or
the headers `X-Session-Id`, `X-Turn-Type`, `X-Session-Done`; the body wins when both are given.
General-agent episodes (SPEC §2) also send `episode: true` (`X-Episode`) on their requests and
the verified `outcome_reward` (`X-Outcome-Reward`) with `session_done`: their samples are held
until the session closes and each step's reward is the outcome plus its judged reward.
A request without a session id is served and never trained. A body with `session_done: true`
and no `messages` only closes the session (answer `{"object": "session.done", ...}`).
A close-only call may also carry the final next state: `session_done: true` with `messages` and
`max_tokens: 0` (or `max_completion_tokens: 0`) generates nothing and adds no turn; its
trailing user/tool messages are the next state of the session's pending main turn (as on any
main request), then the session closes. The answer is the same `session.done` object, also
for `stream: true`. (`python -m clawjax.rollout.runner` closes its episodes so: the last
observation is judged and no spurious turn is counted under `no_next_state`.) A
`session_done` request with messages and any other `max_tokens` is an ordinary turn whose
reply is generated and then closes the session: that last turn gets no next state.

Bad input gets a 400 `{"error": {"message", "type", "param", "code"}}` naming the field; the
policy fleet being down gives a 503 of the same shape. The proxy keeps serving either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid

from aiohttp import web

from clawjax.methods import prm_m_for
from clawjax.loop_thread import LoopThread
from clawjax.rollout import chat_bodies, chatapi, policy_calls
from clawjax.rollout.chatapi import RequestError
from clawjax.rollout.emit import Stats
from clawjax.rollout.judge_loop import JudgeLoop
from clawjax.rollout.judge_thread import JudgeThread
from clawjax.rollout.proxy_state import Proxy, prompt_ids
from clawjax.rollout.pusher import Pusher
from clawjax.rollout.sessions import SessionTable

log = logging.getLogger(__name__)
MAX_BODY = 64 << 20


PROXY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)


def error_response(status: int, message: str, param: str | None = None,
                   kind: str | None = None) -> web.Response:
    kind = kind or {400: "invalid_request_error", 401: "authentication_error",
                    404: "not_found_error", 503: "service_unavailable"}.get(status, "server_error")
    return web.json_response({"error": {"message": message, "type": kind, "param": param,
                                        "code": status}}, status=status)


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    proxy: Proxy = request.app[PROXY]
    if proxy.api_key and request.path != "/health":
        if request.headers.get("Authorization", "") != f"Bearer {proxy.api_key}":
            return error_response(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                  "Authorization")
    try:
        return await handler(request)
    except RequestError as e:
        return error_response(e.status, str(e), e.field)
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(e.status, f"{request.method} {request.path}: {e.reason}")
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - the proxy stays up; the client gets a 500
        log.exception("handler failed: %s %s", request.method, request.path)
        return error_response(500, f"internal error: {e!r}")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    proxy: Proxy = request.app[PROXY]
    t0 = time.perf_counter()
    raw = await request.read()
    call = chatapi.parse_call(raw, request.headers, proxy.vocab_size)
    if call.close_only:  # session_done only; with messages, they carry the last next state
        if call.messages is not None and call.session_id in proxy.table:
            proxy.end(call, proxy.begin(call))  # closes the session (session_done)
        else:  # (a session no longer open has no pending turn: nothing to open or carry)
            proxy.session_done(call)
        return web.json_response({"object": "session.done", "session_id": call.session_id})
    try:
        prompt_ids = proxy.encode(call.messages, call.tools)
    except Exception as e:  # noqa: BLE001 - a template error is the request's fault
        raise RequestError("messages", f"<{len(call.messages)} messages>",
                           f"messages the model's chat template accepts ({e})")
    body = chatapi.generate_body(call, prompt_ids)
    index = proxy.begin(call)
    try:
        if call.stream:
            return await _stream(request, proxy, call, body, index, prompt_ids)
        t1 = time.perf_counter()
        result = await policy_calls.generate(proxy.policy, body, call.length_field)
        t2 = time.perf_counter()
        proxy.record(call, index, prompt_ids, result)
        resp = web.json_response(chat_bodies.completion(
            result, call, proxy.model_name, index, proxy.tokenizer))
        own = (t1 - t0) + (time.perf_counter() - t2)
        resp.headers["Server-Timing"] = \
            f"upstream;dur={(t2 - t1) * 1e3:.3f}, proxy;dur={own * 1e3:.3f}"
        return resp
    finally:
        proxy.end(call, index)


async def _stream(request: web.Request, proxy: Proxy, call: chatapi.ChatCall, body: dict,
                  index: int, prompt_ids: list[int]) -> web.StreamResponse:
    events: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(policy_calls.generate_stream(proxy.policy, body, events,
                                                         call.length_field))
    resp: web.StreamResponse | None = None
    ident, created, sent, first = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), "", True
    logged = 0  # output tokens whose log-probs the chunks carried (with `logprobs` only)
    # Stop strings the server trims from the final text: their first characters wait.
    stops = () if call.sampling.get("no_stop_trim") else call.sampling.get("stop") or ()
    try:
        while True:
            kind, item = await events.get()
            if kind == "error":
                if resp is None:
                    raise item
                await resp.write(chat_bodies.sse({"error": chat_bodies.error_of(item)}))
                break
            if resp is None:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
                await resp.prepare(request)
            if kind == "event":
                chunk, sent = chat_bodies.delta_chunk(item, sent, ident, created,
                                                  call.model or proxy.model_name, first,
                                                  stops=stops)
                if chunk is not None:
                    first = False
                    if call.logprobs:
                        logged = chat_bodies.add_logprobs(chunk, item, proxy.tokenizer, logged)
                    await resp.write(chat_bodies.sse(chunk))
                continue
            result = item  # kind == "end": the whole result, output ids and log-probs joined
            proxy.record(call, index, prompt_ids, result)
            for chunk in chat_bodies.final_chunks(result, call, ident, created,
                                                  proxy.model_name, sent, first, index,
                                                  proxy.tokenizer, logged):
                await resp.write(chat_bodies.sse(chunk))
            break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    except ConnectionResetError:  # the agent went away mid-stream: an ordinary disconnect,
        # not a proxy failure (no ERROR traceback, no 500 for a client that is gone); aiohttp
        # then drops the connection quietly, and the upstream generation is cancelled below
        log.info("stream client disconnected: %s %s", request.method, request.path)
        return resp
    finally:
        task.cancel()


async def list_models(request: web.Request) -> web.Response:
    name = request.app[PROXY].model_name
    return web.json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "clawjax"}]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    proxy: Proxy = request.app[PROXY]
    wait = request.query.get("idle_timeout")
    idle = None
    if wait is not None:
        try:
            seconds = float(wait)
        except ValueError:
            seconds = math.nan
        if math.isnan(seconds):  # NaN would never reach a deadline: an unbounded wait
            raise RequestError("idle_timeout", wait, "a number of seconds")
        idle = await proxy.loop.idle(min(max(seconds, 0.0), 600.0))
    out = proxy.stats.snapshot()
    out.update(sessions_open=len(proxy.table), judging=proxy.loop.busy,
               idle=idle if idle is not None else not proxy.loop.busy)
    return web.json_response(out)


def build_app(proxy: Proxy) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY)
    app[PROXY] = proxy
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    return app


async def expire_loop(proxy: Proxy, interval_s: float) -> None:
    """Closes idle sessions every `interval_s` seconds (their pending turns as on
    session_done)."""
    while True:
        await asyncio.sleep(interval_s)
        proxy.loop.handle(proxy.table.expire(time.monotonic()))


@dataclasses.dataclass
class ProxyConfig:
    """Everything `python -m clawjax.rollout serve` configures (see `__main__.py` for the flags).
    `teacher_urls` empty = the policy fleet is the teacher (self-distillation); `prm_m` None =
    the method's default (`clawjax.methods.prm_m_for`: 3 for rl, else 1); `teacher_topk` K > 0:
    OPD samples carry the teacher's top-K log-probs and ids (SPEC §5)."""
    model_dir: str
    policy_urls: list[str]
    judge_url: str
    buffer: str
    judge_model: str | None = None
    teacher_urls: list[str] = dataclasses.field(default_factory=list)
    buffer_token: str | None = None
    method: str = "combine"
    prm_m: int | None = None
    teacher_topk: int = 0
    api_key: str | None = None
    policy_api_key: str | None = None
    judge_api_key: str | None = None
    judge_temperature: float = 0.7
    judge_max_tokens: int | None = None
    judge_timeout_s: float = 120.0
    judge_concurrency: int = 16
    session_expiry_s: float = 600.0
    push_batch: int = 64
    queue_size: int = 4096
    model_name: str | None = None


class Running:
    """A started proxy: `proxy`, the aiohttp `runner`, and `aclose()` to stop everything."""

    def __init__(self, proxy: Proxy, runner, closers: list):
        self.proxy, self.runner, self._closers = proxy, runner, closers

    async def aclose(self, drain_timeout_s: float = 30.0) -> None:
        """Stops serving, closes every open session (as on expiry), waits up to
        `drain_timeout_s` for judging and pushes to finish, then closes the clients."""
        await self.runner.cleanup()
        self.proxy.loop.handle(self.proxy.table.close_all())
        if not await self.proxy.loop.idle(drain_timeout_s):
            log.warning("proxy shutdown: judge loop / buffer queue not idle after %.0fs",
                        drain_timeout_s)
        for close in reversed(self._closers):
            await close()


async def start(config: ProxyConfig, host: str = "127.0.0.1", port: int = 0) -> Running:
    """Builds and starts the proxy on `host:port` (port 0 = any free port; `runner.addresses`
    has the bound one) in the running event loop."""
    from transformers import AutoTokenizer

    from clawjax.buffer import BufferClient
    from clawjax.serving.client import SGLangClient
    from clawjax.serving.fleet import Fleet

    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model_dir = {config.model_dir!r}: its tokenizer has no chat "
                         "template, expected one (the proxy applies it itself)")
    closers: list = []
    policy = await Fleet(config.policy_urls, api_key=config.policy_api_key).start()
    closers.append(policy.aclose)
    stats = Stats()

    async def build_judging():
        """On the judge thread's loop: the judge client, the teacher fleet (its own clients,
        also when it is the policy fleet), the buffer pusher and the JudgeLoop over them."""
        teacher = await Fleet(config.teacher_urls or config.policy_urls,
                              api_key=config.policy_api_key).start()
        judge = SGLangClient(config.judge_url.rstrip("/").removesuffix("/v1"),
                             api_key=config.judge_api_key, timeout=config.judge_timeout_s)
        buffer = BufferClient(config.buffer, token=config.buffer_token)

        async def close_buffer():
            buffer.close()

        pusher = Pusher(buffer, stats, batch=config.push_batch, maxsize=config.queue_size).start()
        # A tokenizer of its own: a fast tokenizer is not safe to share between threads.
        teacher_tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
        loop = JudgeLoop(judge=judge, teacher=teacher,
                         encode=lambda messages, tools: prompt_ids(teacher_tokenizer, messages,
                                                                   tools),
                         pusher=pusher, stats=stats, method=config.method,
                         m=prm_m_for(config.method, config.prm_m),
                         concurrency=config.judge_concurrency,
                         teacher_topk=config.teacher_topk,
                         vote_kwargs={"model": config.judge_model,
                                      "temperature": config.judge_temperature,
                                      "max_tokens": config.judge_max_tokens,
                                      "timeout": config.judge_timeout_s})
        return loop, [teacher.aclose, judge.aclose, close_buffer, pusher.aclose]

    judging = JudgeThread(build_judging)
    await asyncio.get_running_loop().run_in_executor(None, judging.start)
    closers.append(judging.aclose)
    proxy = Proxy(tokenizer=tokenizer, policy=policy, loop=judging, stats=stats,
                  table=SessionTable(config.session_expiry_s), api_key=config.api_key,
                  model_name=config.model_name or config.model_dir.rstrip("/").split("/")[-1])
    expiry = asyncio.create_task(expire_loop(proxy, min(config.session_expiry_s / 4, 1.0)))

    async def stop_expiry():
        expiry.cancel()

    closers.append(stop_expiry)
    runner = web.AppRunner(build_app(proxy), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return Running(proxy, runner, closers)


class ProxyThread:
    """The proxy on its own event loop in a daemon thread (tests, benchmarks): `url` once
    started; `run(coro)` runs a coroutine on the proxy's loop; `stop()` ends it."""

    def __init__(self, config: ProxyConfig, host: str = "127.0.0.1", port: int = 0):
        from clawjax.serving.launch import free_port
        self.config, self.host = config, host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.running: Running | None = None
        self._worker = LoopThread("clawjax-proxy")
        self.loop = self._worker.loop

    def start(self, timeout: float = 60.0) -> "ProxyThread":
        self.running = self._worker.launch(start(self.config, self.host, self.port), timeout)
        return self

    def run(self, coro, timeout: float = 60.0):
        return self._worker.run(coro, timeout)

    @property
    def proxy(self) -> Proxy:
        return self.running.proxy

    def stop(self) -> None:
        if self.running is not None:
            self.run(self.running.aclose())
            self.running = None
        self._worker.stop()

    def __enter__(self) -> "ProxyThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
