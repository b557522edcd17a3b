"""Fleet servers that fail while the fleet updates their weights, on loopback: one that hangs
mid-load (its event loop blocked: it answers nothing, `/health` included, as a SIGSTOPped
process) is marked down after a failed check without holding up the others, while one whose
`/health` waits for the load (SGLang's generation health check) but answers `/get_model_info`
is waited for; one that
answers with JSON that is not an object is the server's fault (`MalformedResponse`), a refusal
of that server alone, and the publisher still publishes and prunes."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from aiohttp import web

from clawjax.publish import Publisher, list_versions
from clawjax.serving import client as client_lib
from clawjax.serving.client import SGLangClient, ServingError
from clawjax.serving.fleet import Fleet
from clawjax.serving.sync import SyncFleet
from test_publish import tiny_model
from test_serving_helpers import Scripted


class _Wedged:
    """A `Scripted` server on its own thread and loop whose first weight update blocks that loop
    (a synchronous wait) until `release()`: meanwhile it accepts and answers nothing."""

    def __init__(self, name: str):
        self.server, self.released = Scripted(name), threading.Event()
        update = self.server._update

        async def wedged(request):
            self.released.wait(timeout=120)  # the whole server hangs (bounded: no stray thread)
            return await update(request)

        self.server._update = wedged
        self.url = self.server.url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def test_a_server_hung_mid_load_is_marked_down_and_does_not_hold_up_the_others():
    """b hangs on the weight update: the fleet's update returns once b fails a health check
    (not after `update_timeout`: no `loading` answer), with a on the new weights and b marked
    down; the next update skips b; once b answers again the prober brings it to the newest
    weights and marks it up."""
    async def main():
        a, b = await Scripted("a").start(), _Wedged("b")
        try:
            async with Fleet([a.url, b.url], probe_interval=0.1, health_timeout=2.0,
                             update_timeout=30, update_retry_interval=0.1) as fleet:
                sa, sb = fleet.servers
                res = await fleet.update_weights_from_disk("/ckpt/v2", "2")
                assert res[a.url]["success"] and a.version == "2"
                assert not res[b.url]["success"] and not res[b.url].get("loading"), res
                assert "GET /get_model_info did not answer" in res[b.url]["message"]
                assert sa.up and not sb.up
                res = await fleet.update_weights_from_disk("/ckpt/v3", "3")
                assert res[a.url]["success"] and a.version == "3"
                assert res[b.url]["message"].startswith("down"), res
                b.release()
                deadline = time.monotonic() + 60
                while not (sb.up and b.server.version == "3") and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert sb.up and sb.weight_version == "3" and b.server.version == "3"
        finally:
            await a.stop()
            b.close()
    asyncio.run(main())


def test_a_loading_server_whose_health_waits_for_the_load_stays_up():
    """SGLang's `/health` may run a one-token generation, which waits while weights load: a
    load longer than `health_timeout` on such a server (its HTTP front answering
    `/get_model_info`) is a slow load, not a hung server: it stays up and gets the version."""
    async def main():
        server, loaded = Scripted("slow"), asyncio.Event()
        server.update_delay = 1.5
        update, health = server._update, server._health

        async def update_then_answer_health(request):
            loaded.clear()
            try:
                return await update(request)
            finally:
                loaded.set()

        async def health_after_the_load(request):
            await loaded.wait()
            return await health(request)

        loaded.set()
        server._update, server._health = update_then_answer_health, health_after_the_load
        await server.start()
        try:
            async with Fleet([server.url], probe_interval=0.1, health_timeout=0.3,
                             update_timeout=30) as fleet:
                res = await fleet.update_weights_from_disk("/ckpt/v2", "2")
                assert res[server.url]["success"], res
                assert fleet.servers[0].up and server.version == "2"
        finally:
            await server.stop()
    asyncio.run(main())


def _garbage(answer):
    async def handler(request):
        await request.read()
        return web.json_response(answer)
    return handler


@pytest.mark.parametrize("answer", ["OK", None, [1, 2]], ids=["string", "null", "list"])
def test_client_names_an_answer_that_is_not_a_json_object(answer):
    """A 2xx weight-update or model-info answer that is JSON but not an object raises
    MalformedResponse (a ServingError) naming the endpoint and the body, not AttributeError."""
    async def main():
        server = Scripted("g")
        server._update, server._info = _garbage(answer), _garbage(answer)
        await server.start()
        try:
            async with SGLangClient(server.url) as client:
                with pytest.raises(ServingError, match="/update_weights_from_disk") as e:
                    await client.update_weights_from_disk("/ckpt/v1", "1")
                assert isinstance(e.value, client_lib.MalformedResponse)
                assert repr(answer) in str(e.value)
                with pytest.raises(client_lib.MalformedResponse, match="/get_model_info"):
                    await client.get_weight_version()
        finally:
            await server.stop()
    asyncio.run(main())


def test_a_server_answering_updates_with_a_string_is_refused_alone_and_pruning_goes_on(
        tmp_path):
    """g answers every weight update with HTTP 200 and `"OK"`: each publish still counts as
    published, a gets every version, g is reported as failing (up, refused), and `keep`
    holds on disk."""
    model, config = tiny_model()
    a, g = Scripted("a"), Scripted("g")
    g._update = _garbage("OK")
    fleet = SyncFleet([a.url, g.url], probe_interval=0.2)
    fleet.run(a.start()), fleet.run(g.start())
    pub = Publisher(fleet, tmp_path / "pub", every_steps=1, keep=2)
    try:
        for v in (1, 2, 3, 4):
            assert pub.maybe_publish(v, model, config, policy_version=v)
            assert pub.wait(60)
        stats = pub.stats()
        assert stats["published"] == 4 and stats["failed"] == 0, stats["last_error"]
        assert list_versions(tmp_path / "pub") == [3, 4]
        assert [v for _, v in a.updates] == ["1", "2", "3", "4"]
        results = stats["last_update_results"]
        assert results[a.url]["success"] and not results[g.url]["success"]
        assert "expected a JSON object" in results[g.url]["message"]
        assert stats["fleet"]["per_server"][1]["up"]  # a refusal: it answers, it stays up
    finally:
        pub.close()
        fleet.run(a.stop()), fleet.run(g.stop())
        fleet.close()


def test_a_fleet_update_that_raises_still_prunes_and_keeps_the_version_written(tmp_path):
    """A fleet whose update raises (here an async Fleet whose loop is not running): every
    publish counts as failed, yet the versions beyond `keep` are pruned and the newest stays."""
    model, config = tiny_model()
    pub = Publisher(Fleet(["http://127.0.0.1:9"]), tmp_path / "pub", every_steps=1, keep=2)
    try:
        for v in (1, 2, 3):
            assert pub.maybe_publish(v, model, config, policy_version=v)
            assert pub.wait(60)
        stats = pub.stats()
        assert stats["failed"] == 3 and "not started" in stats["last_error"]
        assert list_versions(tmp_path / "pub") == [2, 3]
    finally:
        pub.close()
