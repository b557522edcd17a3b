"""A 3-server fleet of `python -m clawjax.serve` subprocesses: one is SIGKILLed mid-run while
requests keep flowing; the others are updated by the publisher and keep serving; the dead one
is marked down, and once restarted it is brought to the newest weights before it serves. And
the prober against scripted servers: one server's slow weight load does not hold up the
probes of the others, and closing the fleet mid-load leaves no task behind."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clawjax import model as cm
from clawjax.publish import Publisher
from clawjax.serving.fleet import Fleet
from clawjax.serving.sync import SyncFleet
from test_serving_helpers import (Scripted, free_port, hf_model, model_a,  # noqa: F401
                                  model_b, start_subprocess_server, token_logps, tokenizer)

TOL = 1e-4


def scored(url, ids):
    out = httpx.post(url + "/generate", timeout=60, json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
        "logprob_start_len": 0}).json()
    return (out["meta_info"]["weight_version"],
            np.array([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]]))


@pytest.mark.slow
def test_fleet_survives_a_killed_server_and_updates_it_when_back(tmp_path, model_a, model_b,
                                                                 tokenizer):
    ports = [free_port() for _ in range(3)]
    cache = tmp_path / "jax_cache"
    ids = tokenizer.encode("Fleet test prompt")
    # the first server compiles (and fills the shared compilation cache), the others load it
    procs = [start_subprocess_server(model_a, ports[0], compile_cache=cache), None, None]
    scored(f"http://127.0.0.1:{ports[0]}", ids)
    httpx.post(f"http://127.0.0.1:{ports[0]}/generate", timeout=60, json={
        "input_ids": ids, "sampling_params": {"max_new_tokens": 4}})
    starters = [threading.Thread(target=lambda i=i: procs.__setitem__(
        i, start_subprocess_server(model_a, ports[i], compile_cache=cache))) for i in (1, 2)]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    fleet = SyncFleet(urls, probe_interval=0.2, backoff=0.05, timeout=60)
    model, config = cm.from_pretrained(model_b, dtype=jnp.float32)
    pub = Publisher(fleet, tmp_path / "publish", every_steps=1, keep=2, dtype=jnp.float32,
                    tokenizer_dir=str(model_a))
    errors, done, stop = [], [0], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                out = fleet.generate(input_ids=ids, sampling_params={"max_new_tokens": 4})
                assert out["meta_info"]["completion_tokens"] >= 1
                done[0] += 1
                time.sleep(0.02)
            except Exception as e:  # noqa: BLE001 - collected and asserted empty below
                errors.append(e)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    try:
        for w in workers:
            w.start()
        while done[0] < 6:
            time.sleep(0.05)
        procs[2].send_signal(signal.SIGKILL)  # mid-run, with requests in flight
        procs[2].wait(10)
        n = done[0]
        while done[0] < n + 6:
            time.sleep(0.05)
        assert not fleet.stats()["per_server"][2]["up"]

        assert pub.maybe_publish(1, nnx.split(model, nnx.Param), config, policy_version=1)
        assert pub.wait(120)
        results = pub.stats()["last_update_results"]
        assert results[urls[0]]["success"] and results[urls[1]]["success"]
        assert not results[urls[2]]["success"]
        expected = token_logps(hf_model(tmp_path / "publish" / "v1"), ids, 1)
        for url in urls[:2]:
            version, lp = scored(url, ids)
            assert version == "1"
            np.testing.assert_allclose(lp, expected, atol=TOL)
        n = done[0]
        while done[0] < n + 6:  # the survivors keep serving
            time.sleep(0.05)

        # back, with the OLD weights
        procs[2] = start_subprocess_server(model_a, ports[2], compile_cache=cache)
        deadline = time.monotonic() + 60
        while not fleet.stats()["per_server"][2]["up"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fleet.stats()["per_server"][2]["up"]
        version, lp = scored(urls[2], ids)
        assert version == "1"
        np.testing.assert_allclose(lp, expected, atol=TOL)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
        pub.close()
        fleet.close()
        for p in procs:
            if p is not None:
                p.kill()
                p.wait(10)
    assert errors == []


def test_a_slow_load_on_one_server_does_not_hold_up_probing_the_others():
    """The prober retries a refused update on server a, whose load then takes 2 s; meanwhile
    b (healthy, on the target) is marked down by a transient failure and must be probed and
    marked up again within a few probe intervals, not after a's load. The update to a is sent
    once while it loads, and closing the fleet mid-load cancels every task it started."""
    async def main():
        a, b, sent = Scripted("a"), await Scripted("b").start(), []
        update = a._update

        async def counted(request):  # counts the updates a receives, as they arrive
            sent.append(time.monotonic())
            return await update(request)

        a._update = counted
        await a.start()
        a.update_status = 400  # refused: a stays up, stale, and the prober retries it
        try:
            async with Fleet([a.url, b.url], probe_interval=0.05, health_timeout=1.0,
                             update_timeout=30, update_retry_interval=0.1) as fleet:
                sa, sb = fleet.servers
                res = await fleet.update_weights_from_disk("/ckpt/v2", "2")
                assert not res[a.url]["success"] and res[b.url]["success"]
                a.update_status, a.update_delay = 200, 2.0
                deadline = time.monotonic() + 10
                while not sa.updating and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert sa.updating and sa.up  # the prober's retry is loading on a
                fleet.mark_down(sb, "transient failure")
                t0 = time.monotonic()
                while not sb.up and time.monotonic() - t0 < 5:
                    await asyncio.sleep(0.01)
                took = time.monotonic() - t0
                assert sb.up and took < 1.0, f"b stayed down {took:.2f}s during a's load"
                await asyncio.sleep(0.3)  # six probe rounds: nothing more sent to a
                assert sa.updating and a.version == "default" and len(sent) == 2
        finally:
            await a.stop(), await b.stop()
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert left == [], left
    asyncio.run(main())
