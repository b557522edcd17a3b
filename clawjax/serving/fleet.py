"""`Fleet`: N SGLang (or embedded) servers behind one async client object.

Routing: least-loaded (fewest in-flight requests among servers that are up; ties go to the
server used least recently). A server-side failure (connection refused/reset, 5xx) marks that
server down and the request is retried on another one with exponential backoff
(`max_attempts` in all); a 4xx is the caller's fault and is raised at once. When no server is
up, a request waits (backoff) up to its attempts and then raises `FleetUnavailable`.

Timeouts: a request that outlives `timeout` is followed by a health check of its server. A
server that does not answer it is hung: marked down, and the request retried elsewhere. One
that answers is healthy and only slow for this request (a long generation, a deep queue): it
stays up (in routing, its in-flight work counted) and the `RequestTimedOut` is raised to the
caller, whose deadline it is; re-running the same long generation on another server would only
time out again at several times the cost.

Health: a background task probes every server every `probe_interval` seconds (`GET /health`,
`health_timeout` each), each probe a task of its own: a slow health check or weight load of one
server never delays the probes of the others (a server whose probe is still running is not
probed again until it ends, so it has at most one prober update in flight). A down server that
answers again is asked which weights it holds (a restarted one is back on its launch weights,
whatever it held before); when they are not the fleet's latest (the last
`update_weights_from_disk` the fleet was asked for) it is brought to them first, and only then
marked up. Updates: a server that cannot be reached is marked down and updated when it returns;
a server that refuses an update (4xx: it could not load that checkpoint; or an answer that is
not a JSON object, `MalformedResponse`) stays up on its current weights (its responses keep
reporting their `weight_version`, so the trainer can bound staleness) and the update is retried
every `update_retry_interval` seconds, counted from the end of the last try. The prober never
sends an update to a server that still has one in flight (a checkpoint load may take longer
than the retry interval). A load still running after
`update_timeout` seconds is not a dead server: the update call returns (success False, `loading`
True) while the fleet keeps waiting for the answer in the background as long as the server
answers: an up server stays up on its current weights meanwhile, a returning one stays down, and
the new weights are recorded (and a returning server marked up) when the load ends. A loading
server is checked every `probe_interval` from the start with GET /get_model_info (SGLang's
`/health` may run a generation that waits for the load): one that stops answering mid-load
(hung) is marked down, as any unreachable one, after one failed check, so it holds up an update
of the whole fleet (a publish) for about `probe_interval + health_timeout`, not
`update_timeout`.

All calls run on the loop that called `start()` (`async with Fleet(urls) as fleet:`); for
synchronous callers see `clawjax.serving.sync.SyncFleet`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from typing import Any, Awaitable, Callable, Sequence

from clawjax.serving.client import (RequestTimedOut, SGLangClient, ServerUnavailable,
                                    ServingError)

log = logging.getLogger(__name__)


class FleetUnavailable(ServingError):
    """No server could serve the request within its attempts."""


@dataclasses.dataclass(eq=False)
class Server:
    """One fleet member and what the fleet knows about it."""
    url: str
    client: SGLangClient
    up: bool = True
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    last_used: float = 0.0
    last_error: str | None = None
    weight_version: str | None = None
    update_failures: int = 0
    last_update_try: float = 0.0  # when the last update was sent, and again when it ended
    updating: int = 0  # updates in flight (fleet calls may overlap; the prober adds none then)
    timeouts: int = 0  # requests that timed out while the server stayed healthy
    model_path: str | None = None  # the last checkpoint it took from the fleet (since it came up)

    def summary(self) -> dict:
        return {"url": self.url, "up": self.up, "in_flight": self.in_flight,
                "requests": self.requests, "failures": self.failures,
                "weight_version": self.weight_version, "update_failures": self.update_failures,
                "updating": self.updating > 0, "timeouts": self.timeouts,
                "last_error": self.last_error}


class Fleet:
    """Args: urls; api_key; timeout (seconds per request attempt); max_attempts (per
    request, across servers); backoff (first retry delay, doubled per attempt, capped at
    backoff_max); probe_interval / health_timeout (seconds); update_timeout (seconds for one
    `/update_weights_from_disk`); update_retry_interval (seconds between retries of a refused
    update)."""

    def __init__(self, urls: Sequence[str], *, api_key: str | None = None,
                 timeout: float = 120.0, connect_timeout: float = 5.0, max_attempts: int = 4,
                 backoff: float = 0.1, backoff_max: float = 5.0, probe_interval: float = 1.0,
                 health_timeout: float = 5.0, update_timeout: float = 600.0,
                 update_retry_interval: float = 5.0):
        if not urls:
            raise ValueError("urls is empty, expected at least one server URL")
        if max_attempts < 1:
            raise ValueError(f"max_attempts = {max_attempts}, expected >= 1")
        self.servers = [Server(u.rstrip("/"), SGLangClient(u, api_key=api_key, timeout=timeout,
                                                           connect_timeout=connect_timeout))
                        for u in urls]
        self.max_attempts = max_attempts
        self.backoff, self.backoff_max = backoff, backoff_max
        self.probe_interval, self.health_timeout = probe_interval, health_timeout
        self.update_timeout = update_timeout
        self.update_retry_interval = update_retry_interval
        self.target: tuple[str, str | None] | None = None  # latest (model_path, weight_version)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._probe_task: asyncio.Task | None = None
        self._probes: dict[Server, asyncio.Task] = {}  # the prober's probe running per server
        self._recovering: set[Server] = set()
        self._loads: set[asyncio.Task] = set()  # updates whose answer is still awaited
        self._up_event: asyncio.Event | None = None

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> "Fleet":
        self.loop = asyncio.get_running_loop()
        self._up_event = asyncio.Event()
        self._up_event.set()
        self._probe_task = asyncio.create_task(self._probe_loop(), name="fleet-probe")
        return self

    async def aclose(self) -> None:
        """Cancels and awaits the prober, its running probes, then the loads still awaited
        (a cancelled probe may have left one), and closes the clients."""
        await self._cancel([self._probe_task])
        await self._cancel(list(self._probes.values()))
        await self._cancel(list(self._loads))
        await asyncio.gather(*(s.client.aclose() for s in self.servers))

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task | None]) -> None:
        for task in tasks:
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - it already failed; closing goes on
                pass

    async def __aenter__(self) -> "Fleet":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def stats(self) -> dict:
        return {"up": sum(s.up for s in self.servers), "servers": len(self.servers),
                "target_weight_version": self.target[1] if self.target else None,
                "per_server": [dict(s.summary(), stale=self.is_stale(s))
                               for s in self.servers]}

    # --- routing -------------------------------------------------------------------------
    def _pick(self, tried: set[Server]) -> Server | None:
        up = [s for s in self.servers if s.up and s not in tried] or \
             [s for s in self.servers if s.up]
        if not up:
            return None
        return min(up, key=lambda s: (s.in_flight, s.last_used))

    def mark_down(self, server: Server, error: Exception | str) -> None:
        if server.up:
            log.warning("fleet: %s marked down: %s", server.url, error)
        server.up = False
        server.failures += 1
        server.last_error = str(error)
        if self._up_event is not None and not any(s.up for s in self.servers):
            self._up_event.clear()

    async def call(self, fn: Callable[[SGLangClient], Awaitable[Any]]) -> Any:
        """Runs `fn(client)` on the least-loaded server, retrying server failures elsewhere."""
        if self._up_event is None:
            raise RuntimeError("Fleet is not started: use `async with Fleet(urls) as fleet:` "
                               "or `await fleet.start()` first")
        tried: set[Server] = set()
        last: Exception | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                delay = min(self.backoff * 2 ** (attempt - 1), self.backoff_max)
                await asyncio.sleep(delay * (0.5 + random.random()))
            server = self._pick(tried)
            if server is None:
                try:  # wait (bounded) for the prober to bring one back
                    await asyncio.wait_for(self._up_event.wait(),
                                           timeout=min(self.backoff_max, self.probe_interval * 2))
                except asyncio.TimeoutError:
                    pass
                server = self._pick(tried)
                if server is None:
                    last = last or FleetUnavailable("fleet", "no server is up")
                    continue
            tried.add(server)
            server.in_flight += 1
            server.requests += 1
            server.last_used = time.monotonic()
            try:
                return await fn(server.client)
            except RequestTimedOut as e:
                if await server.client.health(timeout=self.health_timeout):
                    server.timeouts += 1
                    server.last_error = str(e)
                    raise
                self.mark_down(server, f"{e}, and GET /health did not answer either")
                last = e
            except ServerUnavailable as e:
                self.mark_down(server, e)
                last = e
            finally:
                server.in_flight -= 1
        raise FleetUnavailable("fleet", f"no server answered after {self.max_attempts} "
                               f"attempts; last error: {last}")

    # --- API (same names as SGLangClient) -----------------------------------------------
    async def generate(self, *args, **kwargs) -> dict:
        return await self.call(lambda c: c.generate(*args, **kwargs))

    async def generate_raw(self, body: dict, timeout: float | None = None) -> dict:
        return await self.call(lambda c: c.generate_raw(body, timeout))

    async def chat_completions(self, body: dict, timeout: float | None = None) -> dict:
        return await self.call(lambda c: c.chat_completions(body, timeout))

    async def teacher_logprobs(self, prompt_ids, response_ids, top_k: int = 0,
                               timeout: float | None = None):
        """See `SGLangClient.teacher_logprobs` / `clawjax.serving.teacher`."""
        return await self.call(lambda c: c.teacher_logprobs(prompt_ids, response_ids, top_k,
                                                            timeout))

    async def update_weights_from_disk(self, model_path: str,
                                       weight_version: str | None = None) -> dict[str, dict]:
        """Updates every up server concurrently and records (model_path, weight_version) as
        the fleet's target, which down servers get when they return. Never raises for a
        server's failure: returns `{url: {"success": bool, "message": str}}` (a down server:
        success False, "down: will update when it returns"; one still loading after
        `update_timeout`: success False and `"loading": True`)."""
        self.target = (model_path, weight_version)
        results: dict[str, dict] = {}

        async def one(server: Server) -> None:
            if not server.up:
                results[server.url] = {"success": False,
                                       "message": "down: will update when it returns"}
                return
            results[server.url] = await self._update(server, model_path, weight_version)

        await asyncio.gather(*(one(s) for s in self.servers))
        return results

    async def _update(self, server: Server, model_path: str, version: str | None) -> dict:
        """One update, answered within `update_timeout` s. Unreachable, or hung mid-load (no
        answer to `/health`) → marked down (the prober retries when it is back). A refusal
        (4xx: it could not load the weights; or an answer that is not the API's) leaves it up,
        serving and reporting its current version, and the prober retries every
        `update_retry_interval` seconds. A load that is still running then goes on in the
        background (`_load`), and the answer says `loading`."""
        load = asyncio.ensure_future(self._load(server, model_path, version))
        self._loads.add(load)
        load.add_done_callback(self._loads.discard)
        done, _ = await asyncio.wait({load}, timeout=self.update_timeout)
        if done:
            return load.result()
        return {"success": False, "loading": True, "message": (
            f"{server.url}: still loading after {self.update_timeout}s (it answers); "
            "it keeps its current weights until the load ends, then the fleet records it")}

    async def _load(self, server: Server, model_path: str, version: str | None) -> dict:
        """Sends the update and waits for its answer as long as the server's HTTP front answers
        (`responsive`: GET /get_model_info, which a loading SGLang server answers, where its
        `/health` may wait for the load), checked every `probe_interval` s from the start (the
        prober leaves a loading server alone): one that hangs mid-load is marked down after one
        failed check, within about `probe_interval + health_timeout` s, so it holds up the
        fleet's update call (a publish) that long, not `update_timeout`. Records the outcome."""
        server.last_update_try = time.monotonic()
        server.updating += 1
        call = asyncio.ensure_future(server.client.update_weights_from_disk(
            model_path, version, timeout=math.inf))  # the health checks bound it
        try:
            while not (await asyncio.wait({call}, timeout=self.probe_interval))[0]:
                if not await server.client.responsive(timeout=self.health_timeout):
                    raise ServerUnavailable(server.url, "update_weights_from_disk still "
                                            "running and GET /get_model_info did not answer")
            out = call.result()
        except ServerUnavailable as e:
            server.update_failures += 1
            self.mark_down(server, f"update_weights_from_disk failed: {e}")
            return {"success": False, "message": str(e)}
        except ServingError as e:
            server.update_failures += 1
            server.last_error = f"update_weights_from_disk refused: {e}"
            log.warning("fleet: %s", server.last_error)
            return {"success": False, "message": str(e)}
        finally:
            call.cancel()  # a no-op once it answered
            server.updating -= 1
            server.last_update_try = time.monotonic()
        server.weight_version, server.model_path = version, model_path
        if not server.up and not self.is_stale(server):
            self._mark_up(server)  # a returning server whose load outlived the probe
        return {"success": True, "message": out.get("message", "")}

    def _mark_up(self, server: Server) -> None:
        server.up = True
        server.last_error = None if not self.is_stale(server) else server.last_error
        self._up_event.set()
        log.info("fleet: %s is back up (weight_version %s)", server.url, server.weight_version)

    def is_stale(self, server: Server) -> bool:
        """Whether `server` is known not to hold the fleet's target weights: by its
        weight_version, or for a target without one (nothing to compare) by whether it took
        the target's model_path since it last came up."""
        if self.target is None:
            return False
        path, version = self.target
        if version is None:
            return server.model_path != path
        return server.weight_version != version

    async def pause_generation(self, mode: str = "abort") -> None:
        await asyncio.gather(*(s.client.pause_generation(mode) for s in self.servers if s.up),
                             return_exceptions=True)

    async def continue_generation(self) -> None:
        await asyncio.gather(*(s.client.continue_generation() for s in self.servers if s.up),
                             return_exceptions=True)

    # --- health --------------------------------------------------------------------------
    async def _probe_loop(self) -> None:
        """Every `probe_interval` s starts a probe task for each server that has none running
        (one awaiting a weight load may take up to `update_timeout`); never waits on them."""
        while True:
            await asyncio.sleep(self.probe_interval)
            for server in self.servers:
                if server not in self._probes:
                    task = asyncio.create_task(self.probe(server),
                                               name=f"fleet-probe {server.url}")
                    self._probes[server] = task
                    task.add_done_callback(lambda t, s=server: self._probe_done(s, t))

    def _probe_done(self, server: Server, task: asyncio.Task) -> None:
        if self._probes.get(server) is task:
            del self._probes[server]
        if not task.cancelled() and task.exception() is not None:
            log.warning("fleet: probing %s failed: %r", server.url, task.exception())

    async def probe(self, server: Server) -> bool:
        """Checks one server now. A returning server is brought to the target weights before
        it is marked up; an up server that is stale gets its update retried (at most every
        `update_retry_interval` s). A server with an update in flight is left to it (nothing is
        re-sent, a down one stays down until it ends). Returns whether it is up afterwards."""
        if server in self._recovering or server.updating:
            return server.up
        self._recovering.add(server)
        try:
            ok = await server.client.health(timeout=self.health_timeout)
            if not ok:
                if server.up:
                    self.mark_down(server, "health check failed")
                return False
            if server.up:
                if self.is_stale(server) and (time.monotonic() - server.last_update_try
                                              >= self.update_retry_interval):
                    await self._update(server, *self.target)
                return server.up
            # What it holds now: a restarted server is back on its launch weights, whatever
            # it held before it went down.
            server.model_path = None
            try:
                server.weight_version = await server.client.get_weight_version()
            except ServingError:
                server.weight_version = None   # unknown: updated if the fleet has a target
            while self.is_stale(server):  # again if the target moved on during a load
                res = await self._update(server, *self.target)
                if res.get("loading"):
                    return False  # marked up when its load ends
                if not res["success"]:
                    if not await server.client.health(timeout=self.health_timeout):
                        return False
                    break
            self._mark_up(server)
            return True
        finally:
            self._recovering.discard(server)
