"""Scripted upstreams for the rollout proxy's tests: `AppThread` (a real aiohttp app served on
loopback from its own event loop in a daemon thread), `scripted_policy` (a `/generate` whose
answers a test sets) and `proxy_stack` (that policy, the rule judge and a real gRPC buffer
behind a real proxy). Only a tokenizer is needed: no model is compiled."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from clawjax.buffer import BufferServer
from clawjax.loop_thread import LoopThread
from clawjax.rollout import rule_judge
from clawjax.rollout.proxy import ProxyConfig, ProxyThread
from clawjax.serving.launch import free_port
from clawjax.tokenizer import build_tokenizer, save_tokenizer


class AppThread:
    """An aiohttp app on its own loop in a daemon thread."""

    def __init__(self, app: web.Application):
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker = LoopThread("test-app")

        async def up():
            self.runner = web.AppRunner(self.app, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.worker.launch(up(), 30)

    def stop(self):
        self.worker.run(self.runner.cleanup(), 30)
        self.worker.stop()


GOOD = {"text": "hi", "output_ids": [5], "meta_info": {
    "output_token_logprobs": [[-0.1, 5, None]], "weight_version": "1",
    "finish_reason": {"type": "stop"}, "prompt_tokens": 3, "completion_tokens": 1}}


def scripted_policy(script: dict) -> web.Application:
    """`/generate` answers `script["answer"]` (plain) or the SSE payloads of `script["stream"]`
    (raw strings, then `[DONE]`); `script["last_body"]` is the last request body. While `script["holds"]` > 0 a call takes one and waits until
    the `script["release"]` event is set (a generation still running)."""
    app = web.Application()

    async def health(request):
        return web.Response(text="")

    async def generate(request):
        body = await request.json()
        script["calls"] += 1
        script["last_body"] = body
        if script["holds"] > 0:
            script["holds"] -= 1
            while not script["release"].is_set():
                await asyncio.sleep(0.01)
        if not body.get("stream"):
            return web.json_response(script["answer"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for payload in script["stream"]:
            await resp.write(f"data: {payload}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app.router.add_get("/health", health)
    app.router.add_post("/generate", generate)
    return app


def proxy_stack(tmp_path_factory, name: str):
    """Yields `dict(proxy, script, address)`: a proxy in front of `scripted_policy(script)`,
    the rule judge and a buffer at `address`; stops them all after. `script` starts with the
    one-token answer `GOOD`, no stream payloads and no held calls."""
    model_dir = tmp_path_factory.mktemp(f"{name}_tokenizer")
    save_tokenizer(build_tokenizer(), str(model_dir))
    script: dict = {"answer": GOOD, "stream": [], "holds": 0, "calls": 0,
                    "release": threading.Event()}
    policy = AppThread(scripted_policy(script))
    judge = AppThread(rule_judge.build_app())
    buffer = BufferServer(tmp_path_factory.mktemp(f"{name}_buffer"), fsync=False)
    address = f"127.0.0.1:{buffer.start()}"
    proxy = ProxyThread(ProxyConfig(model_dir=str(model_dir), policy_urls=[policy.url],
                                    judge_url=judge.url + "/v1", buffer=address)).start()
    yield dict(proxy=proxy, script=script, address=address)
    proxy.stop()
    buffer.stop()
    judge.stop()
    policy.stop()


def script_for_one_test(stack: dict):
    """Yields `stack`'s script (a fixture's body); after the test, releases any held call and
    resets the script to the good plain answer, no stream payloads and no holds."""
    yield stack["script"]
    stack["script"]["release"].set()
    stack["script"].update(answer=GOOD, stream=[], holds=0, release=threading.Event())
