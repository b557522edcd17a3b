"""`AppThread`: a real aiohttp app (a scripted upstream: policy, teacher or judge) served on
loopback from its own event loop in a daemon thread, for the rollout tests."""

from __future__ import annotations

from aiohttp import web

from clawjax.loop_thread import LoopThread
from clawjax.serving.launch import free_port


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
